"""The whole path in-process: upload -> splitter -> TasksQueue -> Lambda's poller -> generator ->
results read back from the stack, including the generator's own retries (RetryBaseDelaySeconds 0 here:
a retry is a new message due at once)."""

AT_ONCE = {"RetryBaseDelaySeconds": "0"}


def test_every_row_ends_succeeded_failed_or_rejected_with_a_reason(pipeline_factory):
    # Given one refused prompt, one that always errors, one bad row and two good rows
    pipeline = pipeline_factory("refuse=forbidden", "fail=doomed", parameters=AT_ONCE)
    body = (
        b"id,prompt,negative_prompt,width,height\n"
        b"ok1,a calm lake,,1024,1024\n"
        b"nope,a forbidden thing,,1024,1024\n"
        b"bad,a huge image,,4096,512\n"
        b"dlq,a doomed ship,,1024,1024\n"
        b"ok2,a quiet forest,,1024,1024\n"
    )
    job = pipeline.split("inbox/five.csv", body)

    # When Lambda's poller drains the queue (the retries the generator schedules included)
    pipeline.drain_all()

    # Then every row is accounted for, in input order
    results = pipeline.results(job["job_id"])
    assert [(r.id, r.status) for r in results.rows] == [
        ("ok1", "succeeded"),
        ("nope", "failed"),
        ("bad", "rejected"),
        ("dlq", "failed"),
        ("ok2", "succeeded"),
    ]
    assert results.status == "completed_with_failures"
    by_id = {r.id: r for r in results.rows}
    assert by_id["ok1"].images == ["images/ok1.png"]
    assert "HTTP 500" in by_id["dlq"].error["message"]


def test_a_task_that_keeps_failing_ends_failed_after_its_attempts_without_the_dead_letter_queue(
    pipeline_factory,
):
    pipeline = pipeline_factory("fail=doomed", parameters={**AT_ONCE, "TaskMaxAttempts": "3"})
    job = pipeline.split("inbox/one.csv", b"id,prompt\nx,a doomed ship\n")

    pipeline.drain_all()

    # Then the API was tried TaskMaxAttempts (3) times and the row is reported failed with the API's last
    # answer; no dead-letter trip (the DLQ is for crashes and poison messages), nothing left queued
    assert pipeline.emulator.stats()["requests"] == 3
    (row,) = pipeline.results(job["job_id"]).rows
    assert row.status == "failed" and row.error["type"] == "unavailable"
    assert "HTTP 500" in row.error["message"] and "gave up after 3 attempt(s)" in row.error["message"]
    assert pipeline.state.dead_letters(job["job_id"]) == []
    assert pipeline.queued_messages() == [] and pipeline.queued_messages(pipeline.dead_letter_queue) == []


def test_a_partial_batch_failure_retries_only_the_failed_message(pipeline_factory):
    # Given three tasks in one batch, one of which meets a transient 503 once
    pipeline = pipeline_factory("flaky=unlucky:1", parameters=AT_ONCE)
    job = pipeline.split("inbox/three.csv", b"id,prompt\n1,a happy cat\n2,an unlucky dog\n3,a happy bird\n")

    pipeline.drain_all()

    # Then the two good tasks were generated once each and the flaky one twice; all succeeded
    assert pipeline.emulator.stats()["submits"] == 4
    assert [r.status for r in pipeline.results(job["job_id"]).rows] == ["succeeded"] * 3
