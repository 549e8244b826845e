"""Atlas Cloud's predictions read when they are likely done, on the stack from template.yaml: the
generator learns a model's generation time from its polls, so once it has, each row costs one submit,
one poll and one download - and the invocations wait on nothing (PollBudgetSeconds 0: every wait is the
queue's)."""

from __future__ import annotations

import time

from imagepipe_cli.local.event_sources import lambda_sqs_event

# No wait inside an invocation; a model nobody has polled yet is first read 1 s after its submit.
QUEUE_WAITS = {"PollBudgetSeconds": "0", "PollDelaySeconds": "1"}


def rows(prefix: str, n: int = 3) -> bytes:
    return ("id,prompt\n" + "".join(f"{i},{prefix} number {i}\n" for i in range(n))).encode()


def calls(pipeline) -> dict[str, int]:
    stats = pipeline.emulator.stats()
    return {name: stats.get(name, 0) for name in ("submits", "polls", "downloads")}


def run_job(pipeline, job_id: str, prefix: str) -> tuple[dict[str, int], list]:
    """A job of three rows worked to its end: the HTTP calls it made and its rows' outcomes."""
    before = calls(pipeline)
    pipeline.split(f"{job_id}.csv", rows(prefix), job_id=job_id)
    pipeline.drain_all()
    after = calls(pipeline)
    outcomes = [pipeline.outcome(job_id, str(i)) for i in range(3)]
    return {name: after[name] - before[name] for name in after}, outcomes


def test_once_the_generation_time_is_learnt_each_row_is_polled_once(pipeline_factory):
    # Given 1.5 s generations, and a generator that has seen one job through (learning the model)
    pipeline = pipeline_factory(latency_ms=1500, parameters=QUEUE_WAITS)
    _, first = run_job(pipeline, "learning", "a red kite")
    assert {o["status"] for o in first} == {"succeeded"}

    # When the next job runs
    made, outcomes = run_job(pipeline, "learnt", "a blue kite")

    # Then each row was submitted, polled and downloaded once, after one hand-back, and succeeded
    assert made == {"submits": 3, "polls": 3, "downloads": 3}
    assert [(o["status"], o["handbacks"]) for o in outcomes] == [("succeeded", 1)] * 3


def test_a_prediction_still_running_at_its_poll_is_handed_back_again_never_resubmitted(pipeline_factory):
    # Given a generator that learnt 1.5 s generations, then the model slows down to 4 s
    pipeline = pipeline_factory(latency_ms=1500, parameters=QUEUE_WAITS)
    run_job(pipeline, "fast", "a quick fox")
    pipeline.emulator.config.latency_ms = 4000

    # When a job runs on the slower model
    made, outcomes = run_job(pipeline, "slow", "a slow snail")

    # Then its predictions were found running, handed back again and read later - each submitted once
    assert made["submits"] == 3 and made["downloads"] == 3 and made["polls"] > 3
    assert {o["status"] for o in outcomes} == {"succeeded"}
    assert all(o["handbacks"] >= 2 for o in outcomes)
    for i in range(3):
        assert pipeline.emulator.submits_for(f"a slow snail number {i}") == 1

    # and the learnt delay followed: the next job on the slow model is polled once per row again
    made, _ = run_job(pipeline, "slow-again", "a slow turtle")
    assert made == {"submits": 3, "polls": 3, "downloads": 3}


def test_a_batchs_predictions_come_back_after_their_learnt_delay_and_one_invocation_reads_them(
    pipeline_factory,
):
    # Given a generator that learnt the model, and a job of three rows delivered as one batch
    pipeline = pipeline_factory(latency_ms=1500, parameters=QUEUE_WAITS)
    run_job(pipeline, "learning", "a red kite")
    pipeline.split("b.csv", rows("a green kite"), job_id="together")
    arn = pipeline.mapping().queue_arn
    pipeline.generator.invoke(lambda_sqs_event(pipeline.queued_messages(), arn, "us-east-1"))

    # When the queue is read after their delay (a batch of up to 10)
    time.sleep(3)
    handed_back = pipeline.queued_messages()

    # Then all three came back, none resubmitted, and one invocation finishes them with one poll each
    assert len(handed_back) == 3
    before = calls(pipeline)
    assert pipeline.generator.invoke(lambda_sqs_event(handed_back, arn, "us-east-1")) == {
        "batchItemFailures": []
    }
    after = calls(pipeline)
    assert {k: after[k] - before[k] for k in after} == {"submits": 0, "polls": 3, "downloads": 3}
