"""The retry policy on the stack from template.yaml (in-process moto): retries run on the generator's own
backoff as new delayed messages - never by waiting out the queue's visibility timeout - rate-limit
answers never use up a row's attempts, and a row out of attempts or past the retry window ends failed
with its last error, without a trip through the dead-letter queue. And the budget sees the calls in flight."""

from __future__ import annotations

import boto3
import pytest
from botocore.exceptions import ClientError

from imagepipe_cli.local.event_sources import lambda_sqs_event

# Retries at once (the backoff's base at 0): the tests wait on no clock.
FAST = {"RetryBaseDelaySeconds": "0"}


def dead_letters(pipeline) -> int:
    attrs = pipeline.client("sqs").get_queue_attributes(
        QueueUrl=pipeline.dead_letter_queue, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"])


def test_rate_limit_answers_never_use_up_a_rows_attempts(pipeline_factory):
    # Given an API that rate-limits a prompt more times than a row has attempts
    pipeline = pipeline_factory("rate-limit=busy:5", parameters={**FAST, "TaskMaxAttempts": "2"})
    job = pipeline.split("r.csv", b"id,prompt\nx,a busy street\ny,a calm sea\n", job_id="limited")["job_id"]

    # When the queue is worked off
    results = pipeline.results(job)

    # Then every row succeeded: the 429s were waited out, none counted as an attempt
    assert [r.status for r in results.rows] == ["succeeded", "succeeded"]
    record = pipeline.outcome(job, "x")
    assert record["attempt"] == 1 and record["throttles"] == 5
    assert dead_letters(pipeline) == 0


def test_transient_failures_are_retried_past_the_queues_receive_count(pipeline_factory):
    # Given an API that fails a prompt 6 times in a row (more than TaskMaxReceiveCount, 5)
    pipeline = pipeline_factory("flaky=shaky:6", parameters=FAST)
    job = pipeline.split("f.csv", b"id,prompt\nx,a shaky bridge\n", job_id="flaky")["job_id"]

    results = pipeline.results(job)

    # Then the row succeeded on its 7th attempt (TaskMaxAttempts 8), each retry a new message
    (row,) = results.rows
    assert row.status == "succeeded"
    assert pipeline.outcome(job, "x")["attempt"] == 7
    assert dead_letters(pipeline) == 0


def test_a_row_out_of_attempts_ends_failed_with_its_last_error_and_its_job_completes(pipeline_factory):
    pipeline = pipeline_factory("fail=doomed", parameters={**FAST, "TaskMaxAttempts": "3"})
    job = pipeline.split("d.csv", b"id,prompt\nx,a doomed ship\ny,a fine day\n", job_id="doomed")["job_id"]

    results = pipeline.results(job)

    doomed, fine = results.rows
    assert doomed.status == "failed" and doomed.error["type"] == "unavailable"
    assert "HTTP 500" in doomed.error["message"] and "gave up after 3 attempt(s)" in doomed.error["message"]
    assert fine.status == "succeeded"
    assert results.status == "completed_with_failures"
    assert pipeline.emulator.submits_for("a doomed ship") == 3
    assert dead_letters(pipeline) == 0  # no trip through the dead-letter queue


def test_a_row_rate_limited_past_the_retry_window_ends_failed(pipeline_factory):
    # Given an API that rate-limits a prompt for ever, and a retry window of 1 s
    pipeline = pipeline_factory(
        "rate-limit=busy:1000", parameters={"TaskRetryWindowSeconds": "1", "RetryBaseDelaySeconds": "1"}
    )
    job = pipeline.split("w.csv", b"id,prompt\nx,a busy port\n", job_id="window")["job_id"]

    (row,) = pipeline.results(job).rows

    # Then the row ends failed with the rate limit, after the window - not retried for ever
    assert row.status == "failed" and row.error["type"] == "rate_limited"
    assert "rate-limit answer(s)" in row.error["message"]
    assert pipeline.outcome(job, "x")["attempt"] == 1


@pytest.fixture
def failing_sends(pipeline_factory):
    """SQS SendMessage fails (an SQS outage) while `on` is set, for every client made from now on (after
    moto's mock is up: it starts a new default session)."""
    switch = {"on": False}

    def fail(model, **kwargs):
        if switch["on"] and model.name == "SendMessage":
            raise ClientError({"Error": {"Code": "InternalError", "Message": "SQS is down"}}, "SendMessage")

    events = boto3._get_default_session().events
    events.register("before-call.sqs.SendMessage", fail, unique_id="test-failing-sends")
    yield switch
    events.unregister("before-call.sqs.SendMessage", unique_id="test-failing-sends")


def test_when_a_retry_cannot_be_sent_the_message_itself_comes_back_after_the_backoff(
    failing_sends, pipeline_factory
):
    # Given a task whose call fails once, and SQS refusing new messages at that moment
    pipeline = pipeline_factory("flaky=unlucky:1", parameters=FAST)
    pipeline.split("s.csv", b"id,prompt\nx,an unlucky cat\n", job_id="nosend")
    (message,) = pipeline.queued_messages()
    event = lambda_sqs_event([message], pipeline.mapping().queue_arn, "us-east-1")

    failing_sends["on"] = True
    response = pipeline.generator.invoke(event)
    failing_sends["on"] = False

    # Then the delivered message is reported failed and visible again after the backoff (0 s here), not
    # after the queue's visibility timeout; the task record says why
    assert response == {"batchItemFailures": [{"itemIdentifier": message["MessageId"]}]}
    (again,) = pipeline.queued_messages()
    assert again["Body"] == message["Body"] and again["Attributes"]["ApproximateReceiveCount"] == "2"
    assert pipeline.state.last_error("nosend", "x")["type"] == "unavailable"

    # And the row still gets made
    pipeline.generator.invoke(lambda_sqs_event([again], pipeline.mapping().queue_arn, "us-east-1"))
    assert pipeline.outcome("nosend", "x")["status"] == "succeeded"


def test_a_retried_task_keeps_its_prediction_and_is_never_submitted_again(pipeline_factory):
    # Given an Atlas prediction handed back to the queue, whose poll then meets a failure
    pipeline = pipeline_factory(
        latency_ms=1500, parameters={**FAST, "PollBudgetSeconds": "0", "PollDelaySeconds": "1"}
    )
    job = pipeline.split("p.csv", b"id,prompt\nx,a slow glacier\n", job_id="kept")["job_id"]

    results = pipeline.results(job)

    (row,) = results.rows
    assert row.status == "succeeded"
    assert pipeline.emulator.submits_for("a slow glacier") == 1


# ---------------------------------------------------------------- defect 6: the budget sees calls in flight


def test_the_budget_counts_predictions_in_flight_and_overshoots_by_at_most_one_batch(pipeline_factory):
    # Given a job capped at $0.01 whose predictions (at $0.003) run longer than an invocation waits, so
    # none has finished when the next batches are checked against the budget
    pipeline = pipeline_factory(
        latency_ms=3000,
        parameters={**FAST, "DefaultMaxCost": "0.01", "PollBudgetSeconds": "0", "PollDelaySeconds": "1"},
    )
    body = "id,prompt\n" + "".join(f"{i},a lantern number {i}\n" for i in range(30))
    job = pipeline.split("b.csv", body.encode(), job_id="capped")["job_id"]

    results = pipeline.results(job)

    # Then the rows beyond the budget were cancelled, and what was paid passes the cap by at most one
    # batch's rows (the budget is read once per invocation; here one invocation at a time)
    price, batch = 0.003, int(pipeline.stack.parameters["GeneratorBatchSize"])
    paid = sum(r.cost for r in results.rows)
    submits = pipeline.emulator.stats()["submits"]
    assert paid <= 0.01 + batch * price + 1e-9
    assert submits <= batch + 0.01 / price
    statuses = [r.status for r in results.rows]
    assert statuses.count("succeeded") == submits and statuses.count("cancelled") == 30 - submits
    assert {r.error["type"] for r in results.rows if r.status == "cancelled"} == {"budget"}
    # and nothing stays reserved once every row is done
    assert pipeline.state.counts(job).reserved == pytest.approx(0.0)
