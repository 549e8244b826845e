"""Atlas Cloud's asynchronous generation through ImageGeneratorFunction on the stack from template.yaml:
each row submitted exactly once, predictions that outlive an invocation handed back without nearing the
dead-letter queue, and the provider's terminal answers taken for what they are."""

from __future__ import annotations

import boto3
import pytest

from imagepipe.jobstate import JobState
from imagepipe_cli.local.event_sources import lambda_sqs_event

# The generator waits on no prediction (budget 0) and polls handed-back ones 1 s later: a generation
# of 1.5 s always outlives the invocation that submitted it.
HAND_BACK_AT_ONCE = {"PollBudgetSeconds": "0", "PollDelaySeconds": "1"}

CSV = (
    "id,prompt,width,height\n"
    "a,a lighthouse at dusk,1024,1024\n"
    "b,a fox in the snow,1024,1024\n"
    "c,a tram in the rain,1024,1024\n"
)


def outcome(pipeline, job_id: str, name: str, status: str) -> dict:
    record = pipeline.outcome(job_id, name)
    assert record["status"] == status
    return record


def dead_letters(pipeline) -> int:
    attrs = pipeline.client("sqs").get_queue_attributes(
        QueueUrl=pipeline.dead_letter_queue, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"])


def test_a_generation_longer_than_the_poll_budget_completes_without_nearing_the_dlq(pipeline_factory):
    # Given predictions that take longer than one invocation waits
    pipeline = pipeline_factory(latency_ms=1500, parameters=HAND_BACK_AT_ONCE)
    job = pipeline.split("slow.csv", CSV.encode(), job_id="slow")["job_id"]

    # When the queue is worked until empty
    pipeline.drain_all()

    # Then every row succeeded, each submitted once, each on its first receive, none dead-lettered
    results = pipeline.results(job)
    assert [r.status for r in results.rows] == ["succeeded"] * 3
    assert pipeline.emulator.stats()["submits"] == 3
    for name in "abc":
        record = outcome(pipeline, job, name, "succeeded")
        assert record["attempt"] == 1 and record["handbacks"] >= 1
        assert record["request_id"]
    assert dead_letters(pipeline) == 0


def test_a_redelivered_task_resumes_its_prediction_and_never_submits_again(pipeline_factory):
    # Given a task whose first delivery submitted and handed back its prediction
    pipeline = pipeline_factory(latency_ms=1500, parameters=HAND_BACK_AT_ONCE)
    pipeline.split("slow.csv", CSV.encode(), job_id="redelivered")
    messages = pipeline.queued_messages()

    event = lambda_sqs_event(messages, pipeline.mapping().queue_arn, "us-east-1")
    assert pipeline.generator.invoke(event) == {"batchItemFailures": []}
    assert pipeline.emulator.stats()["submits"] == 3

    # When SQS delivers the same messages again (at-least-once), then everything is worked off
    for record in event["Records"]:
        record["attributes"]["ApproximateReceiveCount"] = "2"
    assert pipeline.generator.invoke(event) == {"batchItemFailures": []}
    pipeline.drain_all()

    # Then no row was submitted twice, and every row has its image
    assert pipeline.emulator.stats()["submits"] == 3
    assert [r.status for r in pipeline.results("redelivered").rows] == ["succeeded"] * 3


def test_a_moderation_refusal_ends_the_row_failed_with_the_reason_and_is_not_retried(pipeline_factory):
    pipeline = pipeline_factory("refuse=forbidden")
    body = "id,prompt\nok,a calm lake\nbad,a forbidden scene\n"
    job = pipeline.split("mod.csv", body.encode(), job_id="moderated")["job_id"]

    pipeline.drain_all()

    ok, bad = pipeline.results(job).rows
    assert ok.status == "succeeded"
    assert bad.status == "failed" and bad.error["type"] == "moderation"
    assert "moderation" in bad.error["message"]
    assert outcome(pipeline, job, "bad", "failed")["attempt"] == 1  # final at once: no retries
    assert dead_letters(pipeline) == 0


def test_a_5xx_that_carries_a_terminal_payload_is_the_result(pipeline_factory):
    pipeline = pipeline_factory("terminal-5xx=cursed")
    job = pipeline.split("t.csv", b"id,prompt\nx,a cursed ring\n", job_id="terminal")["job_id"]

    pipeline.drain_all()

    (row,) = pipeline.results(job).rows
    assert row.status == "failed" and row.attempts == 1
    assert pipeline.emulator.stats()["submits"] == 1


def test_an_exhausted_balance_fails_the_jobs_remaining_rows_fast_without_more_submits(pipeline_factory):
    # Given an account whose balance runs out on the first row
    pipeline = pipeline_factory("stop=broke")
    body = "id,prompt\n1,a broke artist\n" + "".join(f"{i},a painting number {i}\n" for i in range(2, 8))
    job = pipeline.split("broke.csv", body.encode(), job_id="broke")["job_id"]
    first, *rest = pipeline.queued_messages()

    arn = pipeline.mapping().queue_arn
    pipeline.generator.invoke(lambda_sqs_event([first], arn, "us-east-1"))
    submits_before = pipeline.emulator.stats().get("submits", 0)

    # When the rest of the job is processed
    pipeline.generator.invoke(lambda_sqs_event(rest, arn, "us-east-1"))

    # Then every row failed with the provider's reason and nothing more was submitted
    rows = pipeline.results(job).rows
    assert {r.status for r in rows} == {"failed"}
    assert {r.error["type"] for r in rows} == {"quota"}
    assert pipeline.emulator.stats().get("submits", 0) == submits_before


@pytest.mark.parametrize("provider", ["qianfan", "openai", "baidu-oauth"])
def test_a_synchronous_provider_makes_the_rows_images(pipeline_factory, provider):
    pipeline = pipeline_factory(provider=provider)
    job = pipeline.split("s.csv", b"id,prompt,width,height\n1,a red kite,1024,1024\n", job_id="sync")[
        "job_id"
    ]

    pipeline.drain_all()

    (row,) = pipeline.results(job).rows
    assert row.status == "succeeded" and row.provider == provider
    assert row.cost > 0 and row.model
    assert pipeline.emulator.paid_for("a red kite") == 1


# The API accepts the request and its answer never arrives (the emulator's hang fault, a 0.5 s client).
LOST_ANSWERS = {"HTTP_TIMEOUT_SECONDS": "0.5"}


def test_a_submit_whose_answer_was_lost_is_never_resent_and_is_reported(pipeline_factory):
    # Given Atlas Cloud accepts a submit but its answer never reaches the generator
    pipeline = pipeline_factory("hang=silent", generator_env=LOST_ANSWERS)
    job = pipeline.split("l.csv", b"id,prompt\nx,a silent film\ny,a loud band\n", job_id="lost")["job_id"]

    # When the queue is worked off, redeliveries included
    pipeline.drain_all()

    # Then the row failed with a reason that says why it was not resent; it was submitted exactly once
    lost, ok = pipeline.results(job).rows
    assert lost.status == "failed" and lost.error["type"] == "answer_lost"
    assert "not resent" in lost.error["message"] and lost.answers_lost == 1
    assert pipeline.emulator.submits_for("a silent film") == 1
    assert ok.status == "succeeded" and ok.answers_lost == 0
    assert dead_letters(pipeline) == 0


def test_a_synchronous_answer_lost_is_asked_again_and_every_lost_answer_is_counted(pipeline_factory):
    # Given Qianfan answers a prompt too late for the generator every time (each call may be charged)
    pipeline = pipeline_factory(
        "hang=late",
        provider="qianfan",
        generator_env=LOST_ANSWERS,
        parameters={"TaskMaxAttempts": "3", "RetryBaseDelaySeconds": "0"},
    )
    job = pipeline.split("s.csv", b"id,prompt\nx,a late train\n", job_id="late")["job_id"]

    # When the queue is worked off
    pipeline.drain_all()

    # Then the call was made once per attempt, and the results count every possibly-charged call
    (row,) = pipeline.results(job).rows
    attempts = int(pipeline.stack.parameters["TaskMaxAttempts"])
    assert row.status == "failed" and row.error["type"] == "timeout"
    assert row.answers_lost == attempts
    assert pipeline.emulator.paid_for("a late train") == attempts


def test_a_task_another_delivery_is_working_on_is_not_called_twice(pipeline_factory):
    # Given a task whose API call another delivery has claimed a moment ago
    pipeline = pipeline_factory(provider="qianfan")
    pipeline.split("c.csv", b"id,prompt\nx,a busy bee\n", job_id="busy")
    table = boto3.resource("dynamodb", region_name="us-east-1").Table(pipeline.stack.outputs["JobsTableName"])
    assert JobState(table).claim("busy", "x", "qianfan") is not None

    # When this delivery arrives
    (message,) = pipeline.queued_messages()
    event = lambda_sqs_event([message], pipeline.mapping().queue_arn, "us-east-1")
    response = pipeline.generator.invoke(event)

    # Then the API was not called; the task comes back later as a new delayed message (the wait does not
    # count toward the dead-letter queue)
    assert response == {"batchItemFailures": []}
    assert pipeline.emulator.stats().get("requests", 0) == 0
    attrs = pipeline.client("sqs").get_queue_attributes(
        QueueUrl=pipeline.tasks_queue, AttributeNames=["ApproximateNumberOfMessagesDelayed"]
    )["Attributes"]
    assert attrs["ApproximateNumberOfMessagesDelayed"] == "1"


def test_a_cancel_never_lands_over_another_deliverys_paid_call(pipeline_factory):
    # Given a task whose API call another delivery has claimed a moment ago, and then the job is cancelled
    pipeline = pipeline_factory(provider="qianfan")
    pipeline.split("c.csv", b"id,prompt\nx,a busy bee\n", job_id="stopped")
    table = boto3.resource("dynamodb", region_name="us-east-1").Table(pipeline.stack.outputs["JobsTableName"])
    other = JobState(table)
    assert other.claim("stopped", "x", "qianfan") is not None
    assert other.request_cancel("stopped")

    # When a duplicate delivery of the task sees the cancel
    (message,) = pipeline.queued_messages()
    pipeline.generator.invoke(lambda_sqs_event([message], pipeline.mapping().queue_arn, "us-east-1"))

    # Then it does not record the row cancelled under the other delivery's call...
    assert other.task("stopped", "x").status == "submitting"
    # ...so the other delivery's paid image is the row's outcome, counted once at its cost
    assert other.finish("stopped", "x", "succeeded", {"cost": 0.02, "images": ["x.png"]})
    counts = other.counts("stopped")
    assert (counts.succeeded, counts.cancelled, counts.cost) == (1, 0, 0.02)
