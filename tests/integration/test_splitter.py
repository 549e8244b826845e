"""CsvSplitterFunction on the stack from template.yaml (in-process moto), fed the events in events/."""

import json

import pytest

from conftest import EXAMPLES, load_event


def test_every_row_of_the_brief_csv_becomes_one_task_on_the_queue(pipeline):
    # Given the brief's CSV uploaded under a key with a space (S3 sends it URL-encoded)
    body = (EXAMPLES / "prompts.csv").read_bytes()

    # When the splitter gets the S3 event
    job = pipeline.split("inbox/spring campaign.csv", body)

    # Then each row is one task on TasksQueue, with the row's prompt and size
    tasks = [json.loads(m["Body"]) for m in pipeline.queued_messages()]
    assert sorted(t["row_id"] for t in tasks) == ["1", "2", "3"]
    assert {t["prompt"] for t in tasks} == {"a cat on a table", "a dog in a garden", "a bird in a tree"}
    assert all(t["width"] == t["height"] == 1024 and t["job_id"] == job["job_id"] for t in tasks)
    assert (job["status"], job["rows"], job["queued"], job["rejected"]) == ("split", 3, 3, 0)


def test_a_bad_row_is_rejected_with_its_reason_and_the_others_are_queued(pipeline):
    # Given a file whose second row has an impossible width and fourth an empty prompt
    body = (
        b"id,prompt,negative_prompt,width,height\n"
        b"a,a red fox,,1024,1024\n"
        b"b,a blue whale,,99999,512\n"
        b'c,"a prompt, with a comma",,,\n'
        b"d,,,1024,1024\n"
    )

    # When it is split
    job = pipeline.split("inbox/mixed.csv", body)

    # Then a, c are queued; b, d are recorded as rejected with a reason a person can act on
    assert sorted(json.loads(m["Body"])["row_id"] for m in pipeline.queued_messages()) == ["a", "c"]
    results = {r.id: r for r in pipeline.split_rows(job["job_id"])}
    assert results["b"].status == "rejected"
    assert "width 99999 is out of range" in results["b"].error["message"]
    assert results["d"].status == "rejected" and results["d"].error["message"] == "the prompt is empty"
    assert (job["rows"], job["queued"], job["rejected"]) == (4, 2, 2)


def test_the_uploader_can_name_the_job_and_the_manifest_records_the_counts(pipeline):
    job = pipeline.split("inbox/prompts.csv", (EXAMPLES / "prompts.csv").read_bytes(), job_id="campaign-42")

    manifest = json.loads(
        pipeline.client("s3")
        .get_object(Bucket=pipeline.output_bucket, Key="jobs/campaign-42/manifest.json")["Body"]
        .read()
    )
    assert job["job_id"] == "campaign-42"
    assert manifest["status"] == "split" and manifest["total"] == 3 and manifest["queued"] == 3
    record = pipeline.job("campaign-42")
    assert (record["status"], record["total"], record["queued"], record["rejected"]) == ("running", 3, 3, 0)
    assert manifest["source"]["key"] == "inbox/prompts.csv"


def test_a_file_without_a_prompt_column_is_reported_unreadable_and_queues_nothing(pipeline):
    job = pipeline.split("inbox/wrong.csv", b"id,text\n1,a cat\n")

    assert job["status"] == "unreadable"
    assert "no 'prompt' column" in job["error"]["message"]
    assert pipeline.queued_messages() == []
    # The job still finishes, failed, with the reason (and its completion is announced like any other)
    results = pipeline.results(job["job_id"])
    assert results.status == "failed" and results.rows == []
    assert "no 'prompt' column" in results.job["summary"]["error"]["message"]


def test_jsonl_rows_are_split_like_csv_rows_each_to_its_provider(pipeline_factory):
    pipeline = pipeline_factory(also=("baidu-oauth",))
    job = pipeline.split("inbox/prompts.jsonl", (EXAMPLES / "prompts.jsonl").read_bytes())

    tasks = {json.loads(m["Body"])["row_id"]: json.loads(m["Body"]) for m in pipeline.queued_messages()}
    assert set(tasks) == {"sunrise", "teapot"}
    assert (tasks["sunrise"]["width"], tasks["sunrise"]["height"], tasks["sunrise"]["provider"]) == (
        1376,
        768,
        "atlascloud",
    )
    assert (tasks["teapot"]["negative_prompt"], tasks["teapot"]["steps"]) == ("text, watermark", 30)
    assert tasks["teapot"]["provider"] == "baidu-oauth"
    assert job["queued"] == 2


def test_s3_test_event_is_skipped(pipeline):
    assert pipeline.splitter.invoke(load_event("s3_test_event.json")) == {"jobs": []}
    assert pipeline.queued_messages() == []


def test_the_same_upload_delivered_twice_keeps_one_job_id(pipeline):
    # S3 may deliver an event more than once: the job id comes from the object, not the delivery.
    event = pipeline.upload("inbox/prompts.csv", (EXAMPLES / "prompts.csv").read_bytes())
    first = pipeline.splitter.invoke(event)["jobs"][0]["job_id"]
    second = pipeline.splitter.invoke(event)["jobs"][0]["job_id"]
    assert first == second


def test_an_id_that_is_not_utf8_is_rejected_and_the_job_still_completes(pipeline):
    # Given a Latin-1 id among UTF-8 rows
    body = b"id,prompt\ngood,a red fox\ncaf\xe9,a coffee cup\n"

    job = pipeline.split("inbox/latin1.csv", body)

    # Then the split finishes, the good row is queued and the bad one rejected with the reason
    assert (job["status"], job["queued"], job["rejected"]) == ("split", 1, 1)
    rows = pipeline.results(job["job_id"]).rows
    assert rows[1].status == "rejected" and "not valid UTF-8" in rows[1].error["message"]


def test_a_row_its_provider_cannot_serve_is_rejected_before_any_paid_call(pipeline_factory):
    # Given a stack with keys for Atlas Cloud and Qianfan only
    pipeline = pipeline_factory(also=("qianfan",))
    body = (
        "id,prompt,provider,width,height,n,negative_prompt,params\n"
        "ok,a calm lake,atlascloud,1024,1024,,,\n"
        "size,a calm lake,atlascloud,640,480,,,\n"
        "field,a calm lake,atlascloud,1024,1024,,blurry,\n"
        "many,a calm lake,qianfan,1024,1024,5,,\n"
        "nokey,a calm lake,openai,1024,1024,,,\n"
        "who,a calm lake,midjourney,1024,1024,,,\n"
        'params,a calm lake,qianfan,1024,1024,,,"{""prompt"": ""x""}"\n'
        'good-params,a calm lake,qianfan,1024,1024,,,"{""style"": ""vivid""}"\n'
    )

    # When it is split
    job = pipeline.split("inbox/providers.csv", body.encode())

    # Then only what the providers can serve is queued; each other row says why, before anything is paid
    queued = {json.loads(m["Body"])["row_id"]: json.loads(m["Body"]) for m in pipeline.queued_messages()}
    assert set(queued) == {"ok", "good-params"}
    assert queued["good-params"]["params"] == {"style": "vivid"}
    reasons = {r.id: r.error["message"] for r in pipeline.split_rows(job["job_id"]) if r.status == "rejected"}
    assert "takes only these sizes" in reasons["size"]
    assert "does not take negative_prompt" in reasons["field"]
    assert "at most 4 image(s)" in reasons["many"]
    assert "no API key is configured for openai" in reasons["nokey"] and "OPENAI_API_KEY" in reasons["nokey"]
    assert "provider 'midjourney' is not one of" in reasons["who"]
    assert "params cannot set prompt" in reasons["params"]
    assert sum(e.stats().get("requests", 0) for e in pipeline.emulators.values()) == 0


def test_a_split_taken_over_after_its_splitter_died_queues_no_row_twice(pipeline):
    # Given a 45-row upload whose splitter dies after queuing its first two batches (20 rows)
    from imagepipe.splitter import SplitTarget, split_object

    body = "id,prompt\n" + "".join(f"r{i},a picture number {i}\n" for i in range(1, 46))
    pipeline.upload("inbox/big.csv", body.encode(), job_id="takeover")
    s3, sqs = pipeline.client("s3"), pipeline.client("sqs")

    class Killed(BaseException):
        """Lambda ending the invocation (its Timeout, out of memory): nothing in the function runs after it."""

    class DiesAfterTwoBatches:
        def __init__(self) -> None:
            self.batches = 0

        def send_message_batch(self, **kwargs):
            if self.batches == 2:
                raise Killed("the splitter's invocation timed out")
            self.batches += 1
            return sqs.send_message_batch(**kwargs)

    def target(lease_s: float) -> SplitTarget:
        return SplitTarget(
            queue_url=pipeline.tasks_queue,
            output_bucket=pipeline.output_bucket,
            state=pipeline.state,
            finisher_queue_url=pipeline.stack.outputs["FinisherQueueUrl"],
            lease_s=lease_s,
        )

    with pytest.raises(Killed):
        split_object(
            s3=s3,
            sqs=DiesAfterTwoBatches(),
            target=target(60),
            bucket=pipeline.input_bucket,
            key="inbox/big.csv",
        )

    # When Lambda retries it while the first is fresh, it waits; once the first is stale, it takes over
    from imagepipe.jobstate import SplitInProgress

    with pytest.raises(SplitInProgress):
        split_object(s3=s3, sqs=sqs, target=target(60), bucket=pipeline.input_bucket, key="inbox/big.csv")
    result = split_object(s3=s3, sqs=sqs, target=target(0), bucket=pipeline.input_bucket, key="inbox/big.csv")

    # Then every row is on the queue exactly once, the job is split and counts all 45
    queued = sorted(json.loads(m["Body"])["row_number"] for m in pipeline.queued_messages())
    assert queued == list(range(1, 46))
    assert (result.status, result.queued) == ("split", 45)
    assert pipeline.job("takeover")["status"] == "running"


def test_a_key_stored_after_the_splitter_read_the_secret_is_seen_by_the_next_upload(pipeline_factory):
    # Given a warm splitter that read the keys secret while it had no OpenAI key (a read it caches for
    # 5 minutes), so an OpenAI row was rejected
    pipeline = pipeline_factory(also=("openai",))
    manager, secret = pipeline.client("secretsmanager"), pipeline.stack.outputs["ProviderKeysSecretName"]
    keys = json.loads(manager.get_secret_value(SecretId=secret)["SecretString"])
    openai_key = keys.pop("OPENAI_API_KEY")
    manager.put_secret_value(SecretId=secret, SecretString=json.dumps(keys))
    body = b"id,prompt,provider\nlake,a calm lake,openai\n"
    before = pipeline.split("inbox/before.csv", body)
    assert [r.status for r in pipeline.split_rows(before["job_id"])] == ["rejected"]

    # When the user stores the key a minute later and uploads again
    manager.put_secret_value(SecretId=secret, SecretString=json.dumps({**keys, "OPENAI_API_KEY": openai_key}))
    pipeline.split("inbox/after.csv", body)

    # Then the row is queued: a row whose provider seems to have no key makes the splitter read the secret
    # again (once an invocation) before it rejects anything
    assert [json.loads(m["Body"])["row_id"] for m in pipeline.queued_messages()] == ["lake"]
