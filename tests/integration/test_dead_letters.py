"""DeadLetterRecorderFunction on the stack from template.yaml: a task in the dead-letter queue is settled by
what its record says - a paid prediction is resumed, a live delivery is left alone, an outcome stands - and a
message that is no task at all is logged once and let go instead of coming back for 14 days."""

from __future__ import annotations

import io
import json

from imagepipe.contract import safe_name
from imagepipe.observability import logger
from imagepipe_cli.local.event_sources import lambda_sqs_event

from conftest import REGION

# Atlas Cloud predictions of 1.5 s outlive an invocation that waits on none (handed back, polled 1 s later).
HAND_BACK_AT_ONCE = {"PollBudgetSeconds": "0", "PollDelaySeconds": "1"}


def dead_lettered(pipeline, *bodies: str) -> dict:
    """The recorder's event for these message bodies, as they would arrive from TasksDeadLetterQueue."""
    sqs = pipeline.client("sqs")
    for body in bodies:
        sqs.send_message(QueueUrl=pipeline.dead_letter_queue, MessageBody=body)
    messages = pipeline.queued_messages(pipeline.dead_letter_queue)
    for message in messages:
        message["Attributes"]["ApproximateReceiveCount"] = "5"
    return lambda_sqs_event(messages, pipeline.mapping("DeadLetterRecorderFunction").queue_arn, REGION)


def test_a_dead_lettered_task_with_a_paid_prediction_is_resumed_not_failed(pipeline_factory):
    # Given an Atlas row whose prediction was submitted (and paid), after which its deliveries kept crashing
    pipeline = pipeline_factory(latency_ms=1500, parameters=HAND_BACK_AT_ONCE)
    pipeline.split("inbox/paid.csv", b"id,prompt\np,a lighthouse at dusk\n", job_id="paid")
    (message,) = pipeline.queued_messages()
    event = lambda_sqs_event([message], pipeline.mapping().queue_arn, REGION)
    assert pipeline.generator.invoke(event) == {"batchItemFailures": []}
    assert pipeline.emulator.stats()["submits"] == 1

    # When its first message reaches the dead-letter recorder
    answer = pipeline.recorder.invoke(dead_lettered(pipeline, message["Body"]))

    # Then the row is not failed: its prediction is resumed and the row has its image, paid once
    assert answer == {"batchItemFailures": []}
    assert pipeline.state.task("paid", "p").status == "running"
    results = pipeline.results("paid")
    assert results.status == "completed"
    assert [r.status for r in results.rows] == ["succeeded"]
    assert pipeline.emulator.stats()["submits"] == 1


def test_a_dead_lettered_task_claimed_by_a_live_delivery_is_left_for_later(pipeline_factory):
    # Given a row another delivery is calling the API for right now (its claim is fresh)
    pipeline = pipeline_factory(provider="qianfan")
    pipeline.split("inbox/live.csv", b"id,prompt\nl,a calm lake\n", job_id="live")
    (message,) = pipeline.queued_messages()
    assert pipeline.state.claim("live", "l", "qianfan") is not None

    # When a copy of its message reaches the dead-letter recorder
    event = dead_lettered(pipeline, message["Body"])
    answer = pipeline.recorder.invoke(event)

    # Then the row is not recorded failed (the live delivery's image would be thrown away): the message
    # stays in the queue, to be looked at again
    assert answer == {"batchItemFailures": [{"itemIdentifier": event["Records"][0]["messageId"]}]}
    assert pipeline.state.task("live", "l").status == "submitting"
    assert pipeline.state.counts("live").finished == 0


def test_a_dead_lettered_task_without_outcome_or_live_work_ends_failed_and_its_job_finishes(pipeline_factory):
    pipeline = pipeline_factory(provider="qianfan")
    pipeline.split("inbox/gone.csv", b"id,prompt\ng,a crashing wave\n", job_id="gone")
    (message,) = pipeline.queued_messages()

    assert pipeline.recorder.invoke(dead_lettered(pipeline, message["Body"])) == {"batchItemFailures": []}

    (row,) = pipeline.results("gone").rows
    assert row.status == "failed" and row.error["type"] == "dead_letter"
    assert [name for name, _ in pipeline.state.dead_letters("gone")] == ["g"]


def test_an_unreadable_dead_letter_is_logged_once_counted_and_let_go(pipeline_factory, capsys, monkeypatch):
    # Given a two-row job: one row made, the other's message mangled, and a message that is no task at all
    pipeline = pipeline_factory(provider="qianfan")
    pipeline.split(
        "inbox/mangled.csv", b"id,prompt\nok,a calm lake\nbad,a broken message\n", job_id="mangled"
    )
    messages = {json.loads(m["Body"])["row_id"]: m for m in pipeline.queued_messages()}
    pipeline.generator.invoke(lambda_sqs_event([messages["ok"]], pipeline.mapping().queue_arn, REGION))
    mangled = json.loads(messages["bad"]["Body"])
    mangled["width"] = "wide"
    log = io.StringIO()
    monkeypatch.setattr(logger.registered_handler, "stream", log)
    capsys.readouterr()

    # When both reach the dead-letter recorder
    answer = pipeline.recorder.invoke(dead_lettered(pipeline, "not a task {", json.dumps(mangled)))

    # Then neither comes back (no batch item failure): each is logged with its body and counted
    assert answer == {"batchItemFailures": []}
    logged = [json.loads(line) for line in log.getvalue().splitlines()]
    unreadable = [
        e for e in logged if e["message"].startswith("unreadable message in the tasks' dead-letter")
    ]
    assert sorted(e["body"] for e in unreadable) == sorted(["not a task {", json.dumps(mangled)])
    metrics = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    assert sum(sum(_listed(m.get("DeadLettersUnreadable", 0))) for m in metrics) == 2

    # And the row whose job and id could still be read ends failed, so its job finishes
    results = pipeline.results("mangled")
    assert results.status == "completed_with_failures"
    bad = next(r for r in results.rows if r.id == "bad")
    assert bad.status == "failed" and bad.error["type"] == "unreadable"
    assert pipeline.state.task("mangled", safe_name("bad")).status == "failed"


def _listed(value):
    return value if isinstance(value, list) else [value]
