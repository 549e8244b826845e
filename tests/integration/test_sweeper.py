"""The scheduled sweeper (JobSweeperFunction) on the stack from template.yaml: a job never stays running or
finishing with all its rows done, nor owes its completion event for ever - whatever message was lost on the
way - and every job it had to rescue is counted (JobsStuck)."""

from __future__ import annotations

import json
import time

import pytest
from botocore.exceptions import ClientError
from test_jobs import capture_events

from imagepipe.jobstate import JobState
from imagepipe.sweeper import HANDED, REPORTED, RESENT, SweepOptions, sweep
from imagepipe_cli.local.event_sources import lambda_sqs_event
from imagepipe_cli.local.lambda_runtime import InlineFunction

from conftest import REGION

CSV = b"id,prompt\nlake,a calm lake\nfox,a fox in the snow\n"
LATER = 10_000.0  # seconds: long past every threshold


class FailingSends:
    """An SQS client whose every send fails (after botocore's own retries), as AWS can."""

    def send_message(self, **kwargs):
        raise ClientError(
            {"Error": {"Code": "InternalError", "Message": "We encountered an internal error"}}, "SendMessage"
        )


def options(pipeline) -> SweepOptions:
    return SweepOptions(finisher_queue_url=pipeline.stack.outputs["FinisherQueueUrl"])


def sweep_at(pipeline, offset_s: float = 0.0):
    """One sweep as the schedule would run it, `offset_s` from now."""
    return sweep(
        pipeline.state, pipeline.client("sqs"), options(pipeline), clock=lambda: time.time() + offset_s
    )


def rows_done_but_never_handed_off(pipeline, monkeypatch, job_id: str) -> None:
    """Every row of the job made, and the hand-off to the finisher lost (the invocation that finished the
    last row died before it)."""
    pipeline.split(f"inbox/{job_id}.csv", CSV, job_id=job_id)
    with monkeypatch.context() as patch:
        patch.setattr(JobState, "hand_to_finisher", lambda self, *args, **kwargs: [])
        event = lambda_sqs_event(pipeline.queued_messages(), pipeline.mapping().queue_arn, REGION)
        assert pipeline.generator.invoke(event) == {"batchItemFailures": []}
    assert pipeline.job(job_id)["status"] == "running"


def test_a_job_whose_rows_are_all_done_but_was_never_handed_off_is_finished_by_the_sweeper(
    pipeline_factory, monkeypatch
):
    pipeline = pipeline_factory(provider="qianfan")
    completed = capture_events(pipeline)
    rows_done_but_never_handed_off(pipeline, monkeypatch, "orphan")

    # A sweep right away lets a batch that is still running hand it off itself: nothing stuck yet
    assert sweep_at(pipeline) == []
    # A sweep long after finds it stuck and hands it to the finisher
    (stuck,) = sweep_at(pipeline, LATER)
    assert (stuck.job_id, stuck.status, stuck.action) == ("orphan", "running", HANDED)

    results = pipeline.results("orphan")
    assert results.status == "completed"
    assert [r.status for r in results.rows] == ["succeeded", "succeeded"]
    assert [e["detail"]["job_id"] for e in completed()] == ["orphan"]
    assert sweep_at(pipeline, 2 * LATER) == []  # over: nothing more to find


def test_a_hand_off_whose_send_fails_leaves_the_job_to_the_sweeper_not_finishing_for_ever(
    pipeline_factory, monkeypatch
):
    # Given a job whose rows are done, and a hand-off whose message cannot be sent
    pipeline = pipeline_factory(provider="qianfan")
    completed = capture_events(pipeline)
    rows_done_but_never_handed_off(pipeline, monkeypatch, "unsent")
    url = pipeline.stack.outputs["FinisherQueueUrl"]

    # When the hand-off is tried, it fails without raising (the batch that finished the row is not retried)
    assert pipeline.state.hand_to_finisher(FailingSends(), url, ["unsent"]) == []
    assert pipeline.job("unsent")["status"] == "finishing"

    # Then the sweeper sends the finisher's message again, and the job finishes once
    (stuck,) = sweep_at(pipeline, LATER)
    assert (stuck.job_id, stuck.status, stuck.action) == ("unsent", "finishing", RESENT)
    results = pipeline.results("unsent")
    assert results.status == "completed"
    assert [e["detail"]["job_id"] for e in completed()] == ["unsent"]


def test_a_finish_message_that_died_is_sent_again_a_few_times_then_only_reported(
    pipeline_factory, monkeypatch
):
    # Given a job handed to the finisher whose message then died (the finisher's dead-letter queue)
    pipeline = pipeline_factory(provider="qianfan")
    rows_done_but_never_handed_off(pipeline, monkeypatch, "died")
    sqs, url = pipeline.client("sqs"), pipeline.stack.outputs["FinisherQueueUrl"]
    assert pipeline.state.hand_to_finisher(sqs, url, ["died"]) == ["died"]

    def lose_finisher_messages() -> int:
        lost = pipeline.queued_messages(url)
        for message in lost:
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        return len(lost)

    assert lose_finisher_messages() == 1

    # A sweep soon after leaves the finisher its time
    assert sweep_at(pipeline, 60) == []
    # Later sweeps send it again - the first send and two more - then only report it (JobsStuck stays up)
    actions = []
    for n in range(1, 5):
        (stuck,) = sweep_at(pipeline, n * LATER)
        actions.append(stuck.action)
        lose_finisher_messages()
    assert actions == [RESENT, RESENT, REPORTED, REPORTED]
    assert pipeline.job("died")["status"] == "finishing"


def test_a_completion_event_still_owed_is_published_by_a_later_finisher_run(pipeline_factory, monkeypatch):
    # Given a job that finished, but whose completion event EventBridge kept refusing
    pipeline = pipeline_factory(provider="qianfan")
    completed = capture_events(pipeline)
    pipeline.split("inbox/owed.csv", CSV, job_id="owed")
    from imagepipe import finisher

    with monkeypatch.context() as patch:
        patch.setattr(finisher, "_publish", lambda *args, **kwargs: None)
        pipeline.drain_all()
    job = pipeline.job("owed")
    assert job["status"] == "completed" and job.get("event_pending")
    assert completed() == []

    # When the sweeper comes by later, the finisher publishes the owed event - once
    (stuck,) = sweep_at(pipeline, LATER)
    assert (stuck.job_id, stuck.status, stuck.action) == ("owed", "completed", RESENT)
    pipeline.drain_all()
    assert [e["detail"]["job_id"] for e in completed()] == ["owed"]
    assert not pipeline.job("owed").get("event_pending")
    assert sweep_at(pipeline, 2 * LATER) == []


def test_the_sweep_reads_only_jobs_since_the_oldest_one_not_over(pipeline_factory, monkeypatch):
    # Given an old job that is over, then one left with its rows done and never handed off
    pipeline = pipeline_factory(provider="qianfan")
    pipeline.split("inbox/done.csv", CSV, job_id="done")
    pipeline.drain_all()
    rows_done_but_never_handed_off(pipeline, monkeypatch, "left")

    # When sweeps long after find it and hand it off, and it finishes
    assert sweep_at(pipeline, LATER) == []  # first seen with every row done
    (stuck,) = sweep_at(pipeline, 2 * LATER)
    assert stuck.job_id == "left"
    pipeline.drain_all()
    assert pipeline.job("left")["status"] == "completed"

    # Then a sweep no longer reads the job that was over before, and once both are over, none
    read = []
    original = JobState.jobs

    def jobs(self, job_ids):
        read.extend(job_ids)
        return original(self, job_ids)

    monkeypatch.setattr(JobState, "jobs", jobs)
    assert sweep_at(pipeline, 3 * LATER) == [] and read == ["left"]
    read.clear()
    assert sweep_at(pipeline, 4 * LATER) == [] and read == []


def test_the_scheduled_function_reports_a_split_that_stopped_and_emits_jobs_stuck(pipeline, capsys):
    # Given a job whose split stopped long ago (its splitter and Lambda's retries are over)
    pipeline.split("inbox/split.csv", CSV, job_id="split")
    pipeline.state._table.update_item(
        Key={"pk": "JOB#split", "sk": "JOB"},
        UpdateExpression="SET #s = :splitting, split_heartbeat = :old",
        ExpressionAttributeNames={"#s": "status"},
        ExpressionAttributeValues={":splitting": "splitting", ":old": int(time.time()) - 7200},
    )
    sweeper = InlineFunction(pipeline.stack.functions["JobSweeperFunction"], REGION)
    capsys.readouterr()

    # When EventBridge's schedule invokes the sweeper
    answer = sweeper.invoke(
        {"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}, "resources": []}
    )

    # Then it names the job, and the metric JobsStuck says 1 (what the alarm watches)
    assert [(s["job_id"], s["status"], s["action"]) for s in answer["stuck"]] == [
        ("split", "splitting", REPORTED)
    ]
    emitted = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    (record,) = [r for r in emitted if "JobsStuck" in r]
    assert record["JobsStuck"] in ([1.0], 1.0)


@pytest.mark.parametrize("missing", ["never sent", "sent"])
def test_a_sweep_soon_after_a_hand_off_leaves_the_finisher_its_time(pipeline_factory, monkeypatch, missing):
    pipeline = pipeline_factory(provider="qianfan")
    rows_done_but_never_handed_off(pipeline, monkeypatch, "fresh")
    sqs = FailingSends() if missing == "never sent" else pipeline.client("sqs")
    pipeline.state.hand_to_finisher(sqs, pipeline.stack.outputs["FinisherQueueUrl"], ["fresh"])

    assert sweep_at(pipeline, 30) == []
