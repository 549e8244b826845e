"""Who owns a split, and how every split ends (issue 10, defects 8, 10, 11): a live split is never taken
over, a split is finished once by its owner, a failure after rows were queued ends the split instead of
leaving the job `splitting`, the version an S3 event names is the one split, and only the stack's own
request source starts jobs - without ever overwriting another job's input."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from imagepipe.jobstate import SplitInProgress
from imagepipe.splitter import SplitTarget, split_object

from conftest import load_event


class Killed(BaseException):
    """Lambda ending an invocation (its Timeout, out of memory): nothing in the function runs after it."""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _target(pipeline, **options: Any) -> SplitTarget:
    return SplitTarget(
        queue_url=pipeline.tasks_queue,
        output_bucket=pipeline.output_bucket,
        state=options.pop("state", pipeline.state),
        finisher_queue_url=pipeline.stack.outputs["FinisherQueueUrl"],
        **options,
    )


def _versioned(pipeline) -> None:
    # The template's input bucket is versioned (moto's CloudFormation leaves VersioningConfiguration out).
    pipeline.client("s3").put_bucket_versioning(
        Bucket=pipeline.input_bucket, VersioningConfiguration={"Status": "Enabled"}
    )


def _rows(n: int, start: int = 1) -> str:
    return "".join(f"r{i},a picture number {i}\n" for i in range(start, start + n))


# ---------------------------------------------------------------------------------- defect 10: the lease


def test_a_long_run_of_rejected_rows_does_not_let_a_duplicate_trigger_take_over_a_live_split(pipeline):
    # Given a file of one good row then 40 rows the splitter rejects (no prompt; a long note each), read
    # slowly: each line takes 20 s of the (fake) clock, so the split lasts far longer than the 60 s lease
    from imagepipe.jobstate import JobState

    clock = FakeClock()
    state = JobState(pipeline.state._table, clock=clock)
    note = "n" * 1100  # lines longer than the reader's first look (1 KB), so they arrive one by one
    body = f"id,prompt,note\nok,a calm lake,{note}\n" + "".join(f"bad{i},,{note}\n" for i in range(40))
    pipeline.upload("inbox/slow.csv", body.encode(), job_id="slow-split")
    s3 = pipeline.client("s3")
    takeovers: list[str] = []

    class SlowBody:
        def __init__(self, real: Any) -> None:
            self._lines = real.read().splitlines(keepends=True)

        def iter_chunks(self, size: int):
            for number, line in enumerate(self._lines):
                clock.now += 20
                if number == 30:  # a duplicate trigger of the same upload arrives mid-file
                    try:
                        state.create_job("slow-split", {}, owner="duplicate", lease_s=60)
                        takeovers.append("taken over")
                    except SplitInProgress:
                        takeovers.append("refused")
                yield line

        def close(self) -> None:
            pass

    class SlowS3:
        def get_object(self, **kwargs):
            answer = s3.get_object(**kwargs)
            answer["Body"] = SlowBody(answer["Body"])
            return answer

        def __getattr__(self, name: str) -> Any:
            return getattr(s3, name)

    # When the first splitter works through it
    result = split_object(
        s3=SlowS3(),
        sqs=pipeline.client("sqs"),
        target=_target(pipeline, state=state, clock=clock),
        bucket=pipeline.input_bucket,
        key="inbox/slow.csv",
    )

    # Then the duplicate found the split alive (its heartbeat moves on time, not on queued rows), and the
    # first splitter finished it: one task, 40 rejections, the job running
    assert takeovers == ["refused"]
    assert (result.status, result.queued, result.rejected) == ("split", 1, 40)
    assert pipeline.job("slow-split")["status"] == "running"
    assert len(pipeline.queued_messages()) == 1


def test_a_split_is_finished_only_by_the_splitter_that_owns_it_and_only_once(pipeline):
    # Given a job whose first splitter was taken over by a second (its lease ran out)
    state = pipeline.state
    assert state.create_job("owned", {"created_iso": "2026-01-01T00:00:00Z"}, owner="first", lease_s=60) == 0
    assert state.create_job("owned", {}, owner="second", lease_s=0) == 0

    # When the first one finishes anyway, it changes nothing: the split is the second's
    assert state.split_done("owned", {"total": 5, "queued": 5}, owner="first") is False
    assert pipeline.job("owned")["status"] == "splitting"
    assert state.split_done("owned", {"total": 9, "queued": 9}, owner="second") is True
    assert (pipeline.job("owned")["status"], pipeline.job("owned")["total"]) == ("running", 9)

    # And a second finish of a job that has moved on (a second event, a retry) never sets it back
    pipeline.client("dynamodb").update_item(
        TableName=pipeline.stack.outputs["JobsTableName"],
        Key={"pk": {"S": "JOB#owned"}, "sk": {"S": "JOB"}},
        UpdateExpression="SET #s = :done",
        ExpressionAttributeNames={"#s": "status"},
        ExpressionAttributeValues={":done": {"S": "completed"}},
    )
    assert state.split_done("owned", {"total": 1, "queued": 1}, owner="second") is False
    assert (pipeline.job("owned")["status"], pipeline.job("owned")["total"]) == ("completed", 9)


def test_an_overwritten_upload_is_split_as_the_version_its_event_names(pipeline):
    # Given an upload, overwritten under the same key before its event is handled
    _versioned(pipeline)
    first_event = pipeline.upload("inbox/campaign.csv", b"id,prompt\nfirst,a red fox\n")
    first_put = pipeline.client("s3").head_object(Bucket=pipeline.input_bucket, Key="inbox/campaign.csv")
    second_event = pipeline.upload("inbox/campaign.csv", b"id,prompt\nsecond,a blue whale\n")
    second_put = pipeline.client("s3").head_object(Bucket=pipeline.input_bucket, Key="inbox/campaign.csv")
    first_event["Records"][0]["s3"]["object"]["versionId"] = first_put["VersionId"]
    second_event["Records"][0]["s3"]["object"]["versionId"] = second_put["VersionId"]

    # When both events arrive (the first one late, the second one twice)
    first = pipeline.splitter.invoke(first_event)["jobs"][0]
    second = pipeline.splitter.invoke(second_event)["jobs"][0]
    again = pipeline.splitter.invoke(second_event)["jobs"][0]

    # Then each upload is its own job with its own rows; the redelivery is a duplicate
    tasks = {
        json.loads(m["Body"])["row_id"]: json.loads(m["Body"])["job_id"] for m in pipeline.queued_messages()
    }
    assert tasks == {"first": first["job_id"], "second": second["job_id"]}
    assert first["job_id"] != second["job_id"] and (again["job_id"], again["status"]) == (
        second["job_id"],
        "duplicate",
    )
    assert pipeline.job(first["job_id"])["source"]["version_id"] == first_put["VersionId"]


def test_a_redelivered_event_hands_a_finished_split_to_the_finisher(pipeline):
    # Given a split whose rows are all done (all rejected) and whose invocation died right after split_done,
    # before it could hand the job to the finisher
    event = pipeline.upload("inbox/rejected.csv", b"id,prompt\na,\nb,\n", job_id="handoff")
    state = pipeline.state
    hand_over = type(state).hand_to_finisher
    calls = {"n": 0}

    def dies_first_time(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise Killed("the splitter's invocation timed out")
        return hand_over(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(state), "hand_to_finisher", dies_first_time)
        with pytest.raises(Killed):
            pipeline.splitter.invoke(event)
        assert pipeline.job("handoff")["status"] == "running"

        # When Lambda retries the event
        retry = pipeline.splitter.invoke(event)["jobs"][0]

    # Then the retry is a duplicate, and hands the job over: it finishes
    assert retry["status"] == "duplicate"
    assert pipeline.job("handoff")["status"] == "finishing"
    assert pipeline.results("handoff").status == "failed"


# ----------------------------------------------------------- defect 8: every split ends, whatever happens


def test_a_failure_after_rows_were_queued_ends_the_split_and_the_queued_rows_go_on(pipeline):
    # Given a 45-row upload whose queue fails for good after the splitter queued two batches (20 rows)
    pipeline.upload("inbox/fails.csv", ("id,prompt\n" + _rows(45)).encode(), job_id="fails-midway")
    sqs = pipeline.client("sqs")

    class FailsAfterTwoBatches:
        def __init__(self) -> None:
            self.batches = 0

        def send_message_batch(self, **kwargs):
            if self.batches == 2:
                raise RuntimeError("SQS is unreachable")
            self.batches += 1
            return sqs.send_message_batch(**kwargs)

    # When it is split
    result = split_object(
        s3=pipeline.client("s3"),
        sqs=FailsAfterTwoBatches(),
        target=_target(pipeline),
        bucket=pipeline.input_bucket,
        key="inbox/fails.csv",
    )

    # Then (with no continuation queue to hand the segment to) the job is not left splitting: it is split
    # with its counts and the error; the rows read but not sent are rejected with the reason (batches are
    # sent in the background, so reading stops a few rows past the failure), the rows after were not read
    job = pipeline.job("fails-midway")
    assert (job["status"], job["queued"]) == ("running", 20)
    assert job["total"] == job["queued"] + job["rejected"] and job["total"] >= 30
    assert job["error"]["type"] == "split_failed"
    assert (
        f"at row {job['total']}" in job["error"]["message"]
        and "SQS is unreachable" in job["error"]["message"]
    )
    assert result.status == "split" and result.queued == 20
    # And the 20 queued rows are made, and the job finishes with them
    results = pipeline.results("fails-midway")
    assert [r.status for r in results.rows].count("succeeded") == 20
    assert results.status not in ("splitting", "running", "finishing")


def test_a_split_that_would_run_out_of_time_and_cannot_hand_over_ends_itself_with_what_it_queued(pipeline):
    # Given an invocation that has time for about 25 rows (its remaining time falls with each row read),
    # and no continuation queue to hand the rest of the file to
    pipeline.upload("inbox/slow.csv", ("id,prompt\n" + _rows(45)).encode(), job_id="out-of-time")
    left = {"s": 68.0}

    def time_left() -> float:
        left["s"] -= 0.3
        return left["s"]

    # When it is split
    result = split_object(
        s3=pipeline.client("s3"),
        sqs=pipeline.client("sqs"),
        target=_target(pipeline, time_left=time_left),
        bucket=pipeline.input_bucket,
        key="inbox/slow.csv",
    )

    # Then it stopped before the function's Timeout could kill it: the job is split with what was queued,
    # and says where and why it stopped
    job = pipeline.job("out-of-time")
    assert job["status"] == "running" and job["error"]["type"] == "split_stopped"
    assert "ran out of time" in job["error"]["message"]
    queued = sorted(json.loads(m["Body"])["row_number"] for m in pipeline.queued_messages())
    assert queued == list(range(1, job["queued"] + 1)) and 0 < job["queued"] < 45
    assert job["queued"] + job["rejected"] == job["total"] == result.rows


def test_a_failure_before_any_row_was_queued_lets_lambdas_retry_take_the_split_over_at_once(pipeline):
    # Given an upload whose first splitter fails on its first send (nothing of the job is on the queue)
    pipeline.upload("inbox/retry.csv", ("id,prompt\n" + _rows(12)).encode(), job_id="retried")

    class Unreachable:
        def send_message_batch(self, **kwargs):
            raise RuntimeError("SQS is unreachable")

    with pytest.raises(RuntimeError):
        split_object(
            s3=pipeline.client("s3"),
            sqs=Unreachable(),
            target=_target(pipeline),
            bucket=pipeline.input_bucket,
            key="inbox/retry.csv",
        )
    assert pipeline.job("retried")["status"] == "splitting"

    # When Lambda retries it a minute later (well inside the 60 s lease of a live split)
    result = split_object(
        s3=pipeline.client("s3"),
        sqs=pipeline.client("sqs"),
        target=_target(pipeline),
        bucket=pipeline.input_bucket,
        key="inbox/retry.csv",
    )

    # Then the retry takes over at once (the failed splitter gave its lease up) and splits every row
    assert (result.status, result.queued) == ("split", 12)
    assert len(pipeline.queued_messages()) == 12


# -------------------------------------------------------------- defect 11: who may start a job by event


def _inline(rows: list[dict], job_id: str | None = None, source: str | None = None) -> dict:
    event = copy.deepcopy(load_event("job_requested_inline.json"))
    event["detail"] = {"rows": rows, **({"job_id": job_id} if job_id else {})}
    if source is not None:
        event["source"] = source
    return event


def test_a_job_request_from_another_source_starts_no_job(pipeline):
    # Given an "ImageJob Requested" event put on the bus by someone the stack does not take requests from
    event = _inline([{"id": "a", "prompt": "a red fox"}], source="com.example.anyone")

    # When it reaches the splitter (a broader rule, a wrapper)
    answer = pipeline.splitter.invoke(event)

    # Then it is refused with the reason, and nothing is started or queued
    assert answer["jobs"] == [] and "refused" in answer["ignored"]
    assert pipeline.state.recent_jobs(10) == [] and pipeline.queued_messages() == []


def test_a_job_request_for_another_bucket_is_refused_without_failing_the_invocation(pipeline):
    # Given a request from the stack's own source naming a file in a bucket the splitter may not read
    event = copy.deepcopy(load_event("job_requested_object.json"))
    event["detail"]["bucket"] = "someone-elses-bucket"

    # When it reaches the splitter
    answer = pipeline.splitter.invoke(event)

    # Then the invocation succeeds (nothing for Lambda to retry, nothing in the splitter's DLQ) with the
    # reason, and no job is started
    assert answer["jobs"] == []
    assert "someone-elses-bucket" in answer["ignored"] and pipeline.input_bucket in answer["ignored"]
    assert pipeline.state.recent_jobs(10) == [] and pipeline.queued_messages() == []


def test_the_splitter_rule_takes_only_the_stacks_request_source_from_its_own_account(pipeline):
    events = pipeline.client("events")
    patterns = [json.loads(rule.get("EventPattern") or "{}") for rule in events.list_rules()["Rules"]]
    (requested,) = [p for p in patterns if p.get("detail-type") == ["ImageJob Requested"]]
    assert requested["source"] == ["imagepipe.requests"]
    assert requested["account"] == [pipeline.client("sts").get_caller_identity()["Account"]]


def test_a_request_naming_an_existing_job_never_overwrites_its_input(pipeline):
    # Given a job started by an inline request with job_id "campaign-7", and an upload's job "upload-1"
    first = pipeline.splitter.invoke(_inline([{"id": "a", "prompt": "a red fox"}], "campaign-7"))["jobs"][0]
    pipeline.split("inbox/prompts.csv", b"id,prompt\nu,a calm lake\n", job_id="upload-1")
    s3 = pipeline.client("s3")
    key = "jobs/campaign-7/input.jsonl"
    before = s3.get_object(Bucket=pipeline.output_bucket, Key=key)["Body"].read()

    # When other requests name those job ids with other rows
    other = pipeline.splitter.invoke(_inline([{"id": "b", "prompt": "a blue whale"}], "campaign-7"))["jobs"][
        0
    ]
    upload = pipeline.splitter.invoke(_inline([{"id": "c", "prompt": "a cat"}], "upload-1"))["jobs"][0]
    same = pipeline.splitter.invoke(_inline([{"id": "a", "prompt": "a red fox"}], "campaign-7"))["jobs"][0]

    # Then they are refused, and the jobs' inputs and tasks are as they were; the same request again is a
    # harmless duplicate
    assert first["status"] == "split"
    assert (other["status"], other["error"]["type"]) == ("rejected", "job_exists")
    assert (upload["status"], upload["error"]["type"]) == ("rejected", "job_exists")
    assert same["status"] == "duplicate"
    assert s3.get_object(Bucket=pipeline.output_bucket, Key=key)["Body"].read() == before
    assert "input.jsonl" not in str(
        s3.list_objects_v2(Bucket=pipeline.output_bucket, Prefix="jobs/upload-1/")
    )
    assert sorted(json.loads(m["Body"])["row_id"] for m in pipeline.queued_messages()) == ["a", "u"]


def test_a_takeover_that_fails_before_the_checkpoint_leaves_the_split_to_the_next_retry(pipeline):
    # Given a 45-row split whose first splitter died after queuing 20 rows, taken over by a retry that then
    # fails on row 5 - before it has caught up with the 20 rows already on the queue
    pipeline.upload("inbox/takeover.csv", ("id,prompt\n" + _rows(45)).encode(), job_id="late-failure")
    s3, sqs = pipeline.client("s3"), pipeline.client("sqs")

    class DiesAfterTwoBatches:
        batches = 0

        def send_message_batch(self, **kwargs):
            if self.batches == 2:
                raise Killed("the splitter's invocation timed out")
            self.batches += 1
            return sqs.send_message_batch(**kwargs)

    def split(sqs_client: Any, **options: Any):
        return split_object(
            s3=s3,
            sqs=sqs_client,
            target=_target(pipeline, **options),
            bucket=pipeline.input_bucket,
            key="inbox/takeover.csv",
        )

    def fails_on_row_5(task) -> str | None:
        if task.row_number == 5:
            raise RuntimeError("S3 reset the connection")
        return None

    with pytest.raises(Killed):
        split(DiesAfterTwoBatches())
    with pytest.raises(RuntimeError):
        split(sqs, lease_s=0, check=fails_on_row_5)

    # Then the job was not ended with 5 rows counted while 20 are on the queue: it is still splitting, and
    # the next retry takes it over at once and counts all 45, each queued once
    assert pipeline.job("late-failure")["status"] == "splitting"
    result = split(sqs)
    assert (result.status, result.queued) == ("split", 45)
    assert sorted(json.loads(m["Body"])["row_number"] for m in pipeline.queued_messages()) == list(
        range(1, 46)
    )


def test_a_split_that_reaches_a_limit_before_queuing_anything_still_ends(pipeline, monkeypatch):
    # Given a file whose rows are all rejected and whose rows.jsonl outgrows the splitter's disk (a limit
    # of 2 KB here) before anything was queued, with no continuation to hand the rest to: a retry would
    # stop at the same place
    import imagepipe.splitter

    monkeypatch.setattr(imagepipe.splitter, "MAX_ROW_LOG_BYTES", 2048)
    body = "id,prompt,note\n" + "".join(f"r{i},,{'n' * 300}\n" for i in range(20))
    pipeline.upload("inbox/big-log.csv", body.encode(), job_id="big-log")

    # When it is split
    split_object(
        s3=pipeline.client("s3"),
        sqs=pipeline.client("sqs"),
        target=_target(pipeline),
        bucket=pipeline.input_bucket,
        key="inbox/big-log.csv",
    )

    # Then the split ends - never left splitting for Lambda's retries to hit the same limit - and says why
    record = pipeline.job("big-log")
    assert record["status"] != "splitting" and record["error"]["type"] == "split_stopped"
    assert "rows.jsonl" in record["error"]["message"] and record["queued"] == 0
    assert pipeline.results("big-log").status not in ("splitting", "running", "finishing")


def test_a_segment_whose_rows_fill_the_splitters_disk_hands_over_early(pipeline, monkeypatch):
    # Given the same file through the stack's splitter, which can hand the rest of a file over
    from splitting import run_continuations

    import imagepipe.splitter

    monkeypatch.setattr(imagepipe.splitter, "MAX_ROW_LOG_BYTES", 2048)
    body = "id,prompt,note\n" + "".join(f"r{i},,{'n' * 300}\n" for i in range(20))

    # When it is split
    job = pipeline.split("inbox/big-log.csv", body.encode())
    assert job["status"] == "continued" and run_continuations(pipeline) >= 2

    # Then each invocation kept a part of rows.jsonl within the limit and the file was split whole
    record = pipeline.job(job["job_id"])
    assert record["status"] != "splitting" and record.get("error") is None
    assert (record["total"], record["rejected"]) == (20, 20)
    assert [r.id for r in pipeline.split_rows(job["job_id"])] == [f"r{i}" for i in range(20)]
