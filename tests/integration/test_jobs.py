"""Jobs on the stack from template.yaml: every way a job can be started makes exactly one job, counts stay
exact under concurrent invocations and duplicate deliveries, a job finishes exactly once, and a budget
stops the paid calls."""

from __future__ import annotations

import json
import threading

import boto3
import pytest

from imagepipe.triggers import ObjectRequest, job_requests
from imagepipe_cli.local.event_sources import lambda_sqs_event

from conftest import EVENTS, REGION

EVENT_BUCKET = "imagepipe-local-input-123456789012-us-east-1"  # the bucket named in events/
CSV = b"id,prompt\nlake,a calm lake\nfox,a fox in the snow\n"
JSONL = b'{"id": "lake", "prompt": "a calm lake"}\n{"id": "fox", "prompt": "a fox in the snow"}\n'
TRIGGERS = [
    "s3_put_csv.json",
    "eventbridge_object_created.json",
    "sqs_wrapped_s3.json",
    "sns_wrapped_s3.json",
    "sqs_sns_wrapped_s3.json",
    "job_requested_object.json",
    "job_requested_inline.json",
]


def event_for(pipeline, name: str) -> dict:
    """An event from events/, pointed at this stack's input bucket, with the objects it names uploaded."""
    text = (EVENTS / name).read_text().replace(EVENT_BUCKET, pipeline.input_bucket)
    # The template's input bucket is versioned (moto's CloudFormation leaves VersioningConfiguration out).
    pipeline.client("s3").put_bucket_versioning(
        Bucket=pipeline.input_bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    for request in job_requests(json.loads(text), default_bucket=pipeline.input_bucket):
        if isinstance(request, ObjectRequest):
            body = JSONL if request.key.endswith(".jsonl") else CSV
            put = pipeline.client("s3").put_object(Bucket=request.bucket, Key=request.key, Body=body)
            if request.version_id:  # the splitter reads the version the event names: this upload's
                text = text.replace(request.version_id, put["VersionId"])
    return json.loads(text)


@pytest.mark.parametrize("name", TRIGGERS)
def test_each_trigger_form_starts_exactly_one_job_per_object_even_when_delivered_twice(
    pipeline_factory, name
):
    # Given an event in one of the forms the stack accepts (inline rows come with a provider we have)
    pipeline = pipeline_factory(also=("baidu-oauth",))
    event = event_for(pipeline, name)

    # When it is delivered twice (at-least-once)
    first = pipeline.splitter.invoke(event)["jobs"]
    second = pipeline.splitter.invoke(event)["jobs"]

    # Then the first delivery started one job per object, the second started nothing new
    assert first and all(job["status"] == "split" for job in first)
    assert [job["job_id"] for job in second] == [job["job_id"] for job in first]
    assert {job["status"] for job in second} == {"duplicate"}
    assert sorted(pipeline.state.recent_jobs(100)) == sorted(job["job_id"] for job in first)
    expected_rows = 3 if name == "job_requested_inline.json" else 2
    assert all(pipeline.job(job["job_id"])["total"] == expected_rows for job in first)


def test_the_same_upload_seen_as_a_notification_and_through_eventbridge_is_one_job(pipeline):
    # Given one object whose creation reaches the splitter both ways
    notification = event_for(pipeline, "s3_put_csv.json")
    via_eventbridge = event_for(pipeline, "eventbridge_object_created.json")

    jobs = [pipeline.splitter.invoke(e)["jobs"][0] for e in (notification, via_eventbridge)]

    assert jobs[0]["job_id"] == jobs[1]["job_id"]
    assert [j["status"] for j in jobs] == ["split", "duplicate"]


def test_an_unrecognised_event_starts_nothing_and_says_why(pipeline):
    answer = pipeline.splitter.invoke({"hello": "world"})

    assert answer["jobs"] == [] and "unrecognised event" in answer["ignored"]
    assert pipeline.state.recent_jobs() == []


def test_concurrent_invocations_and_duplicate_deliveries_count_exactly_and_finish_once(
    pipeline_factory, monkeypatch
):
    # moto's in-process models are not thread-safe (two concurrent updates of one item can lose one);
    # like the local moto server, handle one AWS request at a time. Our code still runs concurrently.
    serialise_moto(monkeypatch)
    # Given a 40-row job whose every task is delivered twice, to 8 concurrent generator invocations
    pipeline = pipeline_factory(provider="qianfan")
    body = "id,prompt\n" + "".join(f"r{i},a painting number {i}\n" for i in range(40))
    job = pipeline.split("inbox/dup.csv", body.encode(), job_id="dup")["job_id"]
    messages = pipeline.queued_messages()
    deliveries = [messages[i : i + 5] for i in range(0, len(messages), 5)] * 2
    completed = capture_events(pipeline)
    arn = pipeline.mapping().queue_arn
    generators = [pipeline.new_generator() for _ in range(8)]

    # When they all run at once
    def work(index: int) -> None:
        for batch in deliveries[index::8]:
            generators[index].invoke(lambda_sqs_event(batch, arn, REGION))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pipeline.drain_all()

    # Then each row was paid once and counted once, and the job finished exactly once
    assert all(pipeline.emulator.paid_for(f"a painting number {i}") == 1 for i in range(40))
    counts = pipeline.state.counts(job)
    assert (counts.succeeded, counts.failed, counts.cancelled) == (40, 0, 0)
    results = pipeline.results(job)
    assert results.status == "completed" and len(results.rows) == 40
    assert [e["detail"]["job_id"] for e in completed()] == [job]
    assert results.job["summary"]["counts"] == {
        "total": 40,
        "succeeded": 40,
        "failed": 0,
        "rejected": 0,
        "cancelled": 0,
    }


def test_a_budget_stops_paid_calls_and_the_rest_of_the_job_ends_cancelled(pipeline_factory):
    # Given a job capped at $0.05 on a provider charging $0.02 an image, its rows worked one at a time
    pipeline = pipeline_factory(provider="qianfan")
    body = "id,prompt\n" + "".join(f"r{i},a budget picture {i}\n" for i in range(8))
    upload = pipeline.upload("inbox/budget.csv", body.encode(), job_id="budget")
    pipeline.client("s3").copy_object(
        Bucket=pipeline.input_bucket,
        Key="inbox/budget.csv",
        CopySource={"Bucket": pipeline.input_bucket, "Key": "inbox/budget.csv"},
        Metadata={"job-id": "budget", "max-cost": "0.05"},
        MetadataDirective="REPLACE",
    )
    pipeline.splitter.invoke(upload)
    arn = pipeline.mapping().queue_arn

    # When the tasks arrive one per invocation
    for message in pipeline.queued_messages():
        pipeline.generator.invoke(lambda_sqs_event([message], arn, REGION))
    pipeline.drain_all()

    # Then calls stopped once the spend reached the cap; the rest are cancelled with the reason
    results = pipeline.results("budget")
    made = [r for r in results.rows if r.status == "succeeded"]
    cancelled = [r for r in results.rows if r.status == "cancelled"]
    assert len(made) == 3 and len(cancelled) == 5  # $0.02, $0.04, $0.06 >= $0.05: stop
    assert all("budget of $0.05 was spent" in r.error["message"] for r in cancelled)
    assert pipeline.emulator.stats()["paid"] == 3
    assert results.job["summary"]["cost"] == pytest.approx(0.06)


def serialise_moto(monkeypatch) -> None:
    from moto.core.botocore_stubber import BotocoreStubber

    lock = threading.Lock()
    handle = BotocoreStubber.__call__

    def one_at_a_time(self, event_name, request, **kwargs):
        with lock:
            return handle(self, event_name, request, **kwargs)

    monkeypatch.setattr(BotocoreStubber, "__call__", one_at_a_time)


def capture_events(pipeline):
    """Every "ImageJob Completed" event the stack publishes, through an EventBridge rule to a queue."""
    sqs, events = pipeline.client("sqs"), boto3.client("events", region_name=REGION)
    url = sqs.create_queue(QueueName="completed-events")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events.put_rule(Name="completed", EventPattern=json.dumps({"detail-type": ["ImageJob Completed"]}))
    events.put_targets(Rule="completed", Targets=[{"Id": "q", "Arn": arn}])

    def received() -> list[dict]:
        found = []
        while batch := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []):
            for message in batch:
                found.append(json.loads(message["Body"]))
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        return found

    return received


class StaleReads:
    """JobsTable as DynamoDB may answer it: a read that does not ask for consistency gets the state from
    before the job's rows finished (an eventually consistent read); a consistent one, the state as it is."""

    def __init__(self, table) -> None:
        self._table = table
        self.meta = type("Meta", (), {"client": StaleClient(table.meta.client)})()

    def __getattr__(self, name):
        return getattr(self._table, name)

    def query(self, **request):
        return self._table.query(**request) if request.get("ConsistentRead") else {"Items": [], "Count": 0}


class StaleClient:
    def __init__(self, client) -> None:
        self._client = client

    def __getattr__(self, name):
        return getattr(self._client, name)

    def query(self, **request):
        return self._client.query(**request) if request.get("ConsistentRead") else {"Items": [], "Count": 0}


def test_the_finisher_sees_every_outcome_even_when_an_eventually_consistent_read_would_not(pipeline_factory):
    from imagepipe.finisher import finish_job
    from imagepipe.jobstate import JobState

    # Given a job whose rows were all just made (and handed to the finisher)
    pipeline = pipeline_factory(provider="qianfan")
    pipeline.split("inbox/fresh.csv", CSV, job_id="fresh")
    event = lambda_sqs_event(pipeline.queued_messages(), pipeline.mapping().queue_arn, REGION)
    assert pipeline.generator.invoke(event) == {"batchItemFailures": []}
    assert pipeline.job("fresh")["status"] == "finishing"

    # When the finisher reads the outcomes from a table whose non-consistent reads are stale
    state = JobState(StaleReads(pipeline.state._table))
    summary = finish_job(
        s3=pipeline.client("s3"),
        events=pipeline.client("events"),
        state=state,
        bucket=pipeline.output_bucket,
        job_id="fresh",
        bus="default",
        source="imagepipe",
    )

    # Then no row made is reported lost: the final result has them all
    assert summary["status"] == "completed"
    assert summary["counts"]["succeeded"] == 2 and summary["counts"]["failed"] == 0
