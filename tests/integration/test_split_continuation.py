"""A split that runs low on time hands the rest of its file to a continuation (issue 11): every row is
queued exactly once across the hand-overs - also when a checkpoint write fails after a batch was sent -,
duplicates are found across them, and a .json array splits like the same rows in .jsonl."""

from __future__ import annotations

import json
from typing import Any

import pytest
from botocore.exceptions import ClientError
from splitting import queued_row_ids, run_continuations, short_invocations

import imagepipe.splitter
from imagepipe.jobstate import JobState
from imagepipe.tasksender import TaskSender


def _csv(ids: list[str]) -> bytes:
    return ("id,prompt\n" + "".join(f"{i},a picture of {i}\n" for i in ids)).encode()


def _ids(n: int) -> list[str]:
    return [f"r{i}" for i in range(1, n + 1)]


def test_a_split_stopped_near_its_time_limit_goes_on_and_queues_every_row_exactly_once(pipeline, monkeypatch):
    # Given invocations with time for about 12 rows each, and a 95-row upload
    short_invocations(monkeypatch, rows=12)

    # When it is split, and Lambda delivers each continuation the splitter sends itself
    first = pipeline.split("inbox/long.csv", _csv(_ids(95)))
    continuations = run_continuations(pipeline)

    # Then the first invocation handed over, several continuations finished the file, and every row is on
    # the queue exactly once
    assert first["status"] == "continued" and continuations >= 6
    assert queued_row_ids(pipeline) == sorted(_ids(95))
    job = pipeline.job(first["job_id"])
    assert (job["status"], job["total"], job["queued"], job["rejected"]) == ("running", 95, 95, 0)
    # And rows.jsonl is one line per row, in order, as one invocation would have written it
    rows = pipeline.split_rows(first["job_id"])
    assert [(r.row, r.id, r.status) for r in rows] == [(n, f"r{n}", "queued") for n in range(1, 96)]


def _every_batch_answered(sender: TaskSender) -> None:
    while sender._batches:
        sender._reap_one()


def test_a_checkpoint_that_fails_after_a_batch_was_sent_queues_no_row_twice(pipeline, monkeypatch):
    # Given a checkpoint after every batch, and DynamoDB refusing the second checkpoint write - after its
    # batch is on the queue - for good (what botocore's retries could not get through)
    short_invocations(monkeypatch, rows=25)
    monkeypatch.setattr(imagepipe.splitter, "CHECKPOINT_S", 0.0)
    real = JobState.split_progress
    calls = {"n": 0}

    def flaky(self: JobState, job_id: str, owner: str, through_row: int, **options: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise ClientError(
                {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow down"}},
                "UpdateItem",
            )
        real(self, job_id, owner, through_row, **options)

    monkeypatch.setattr(JobState, "split_progress", flaky)
    # SQS answering each batch before the next row is read, so checkpoints follow the rows (with sends in
    # flight, a busy machine may see no batch done before the hand-over, and no second checkpoint to fail)
    monkeypatch.setattr(TaskSender, "reap", _every_batch_answered)

    # When a 60-row upload is split, through its continuations
    first = pipeline.split("inbox/flaky.csv", _csv(_ids(60)))
    run_continuations(pipeline)

    # Then the failure was handed over with what was surely sent, and every row is queued exactly once
    assert calls["n"] > 2 and first["status"] == "continued"
    assert queued_row_ids(pipeline) == sorted(_ids(60))
    job = pipeline.job(first["job_id"])
    assert (job["status"], job["total"], job["queued"]) == ("running", 60, 60)
    assert job.get("error") is None


def test_a_duplicate_id_is_rejected_across_a_continuation(pipeline, monkeypatch):
    # Given invocations with time for about 10 rows, and a file whose row 41 reuses the id of row 3
    short_invocations(monkeypatch, rows=10)
    ids = [*_ids(40), "r3", "r41"]

    # When it is split through its continuations
    first = pipeline.split("inbox/dup.csv", _csv(ids))
    assert run_continuations(pipeline) >= 3

    # Then the second r3, read by a later invocation than the first, is rejected, and r3 is queued once
    assert queued_row_ids(pipeline) == sorted([*_ids(40), "r41"])
    rows = {r.row: r for r in pipeline.split_rows(first["job_id"])}
    assert rows[41].status == "rejected"
    assert rows[41].error["message"] == "duplicate id 'r3': row 3 already uses it"
    job = pipeline.job(first["job_id"])
    assert (job["total"], job["queued"], job["rejected"]) == (42, 41, 1)


def _json_rows(n: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"id": f"j{i}", "prompt": f"a lighthouse number {i}", "width": 896, "height": 1200, "tag": f"t{i}"}
        for i in range(1, n + 1)
    ]
    rows[4] = {"id": "j5", "prompt": ""}  # rejected: no prompt
    rows[7] = {"id": "j3", "prompt": "again"}  # rejected: a duplicate
    return rows


def test_a_json_array_splits_like_the_same_rows_in_jsonl_even_across_continuations(pipeline, monkeypatch):
    # Given the same 30 rows as a pretty-printed JSON array and as JSONL, read in small pieces by
    # invocations with time for about 8 rows each (the JSON one stops inside an element)
    short_invocations(monkeypatch, rows=8)
    monkeypatch.setattr(imagepipe.splitter, "READ_CHUNK", 64)
    rows = _json_rows(30)
    as_json = json.dumps(rows, indent=2).encode()
    as_jsonl = "".join(json.dumps(row) + "\n" for row in rows).encode()

    # When both are split
    from_json = pipeline.split("inbox/rows.json", as_json)
    assert run_continuations(pipeline) >= 3
    json_tasks = {json.loads(m["Body"])["row_id"]: json.loads(m["Body"]) for m in pipeline.queued_messages()}
    from_jsonl = pipeline.split("inbox/rows.jsonl", as_jsonl)
    run_continuations(pipeline)
    jsonl_tasks = {json.loads(m["Body"])["row_id"]: json.loads(m["Body"]) for m in pipeline.queued_messages()}

    # Then the same tasks are queued, once each, with the same rows rejected for the same reasons
    def comparable(tasks: dict[str, dict]) -> dict[str, tuple]:
        return {k: (t["row_number"], t["prompt"], t["width"], t["height"]) for k, t in tasks.items()}

    assert len(json_tasks) == 28 and comparable(json_tasks) == comparable(jsonl_tasks)

    def outcomes(job: dict) -> list[tuple]:
        lines = pipeline.split_rows(job["job_id"])
        return [
            (r.row, r.id, r.status, (r.error or {}).get("message"), getattr(r, "extra", None)) for r in lines
        ]

    assert outcomes(from_json) == outcomes(from_jsonl)
    assert outcomes(from_json)[7][3] == "duplicate id 'j3': row 3 already uses it"
    for job in (from_json, from_jsonl):
        record = pipeline.job(job["job_id"])
        assert (record["total"], record["queued"], record["rejected"]) == (30, 28, 2)
    assert pipeline.job(from_json["job_id"])["format"] == "json"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"id": "1", "prompt": "a cat"}', "the file is one JSON object, not an array of rows"),
        (b'"a cat"', "the file is not a JSON array of rows"),
        (b"", "the file is empty: expected a JSON array of rows"),
        (b'[{"id": "1", "prompt": "a cat"', "the file ends before the JSON array is closed"),
        (b'[{"id": "1" "prompt": "a cat"}]', "the JSON is not valid before byte"),
    ],
)
def test_a_json_file_that_is_not_an_array_of_rows_fails_its_job_with_the_reason(pipeline, body, reason):
    job = pipeline.split("inbox/bad.json", body)

    assert job["status"] == "unreadable" and job["error"]["message"].startswith(reason)
    assert pipeline.queued_messages() == []
    assert pipeline.results(job["job_id"]).status == "failed"


def test_a_json_array_cut_short_queues_its_whole_rows_and_says_where_it_stopped(pipeline):
    # Given a JSON array cut in the middle of its third element
    whole = json.dumps([{"id": f"c{i}", "prompt": f"a cloud {i}"} for i in range(1, 5)]).encode()
    body = whole[: whole.index(b'"c3"') + 6]

    # When it is split
    job = pipeline.split("inbox/cut.json", body)

    # Then the two whole rows are queued, and the job says the file was cut short after row 2
    assert queued_row_ids(pipeline) == ["c1", "c2"]
    record = pipeline.job(job["job_id"])
    assert record["error"]["type"] == "split_stopped" and record["queued"] == 2
    assert (
        "the file ends before the JSON array is closed (after row 2): it was cut short"
        in (record["error"]["message"])
    )


def test_data_after_the_json_array_is_a_warning_not_a_failure(pipeline):
    job = pipeline.split("inbox/trail.json", b'[{"id": "1", "prompt": "a cat"}]\n{"id": "2"}\n')

    assert (job["status"], job["queued"]) == ("split", 1)
    assert "the file has data after the JSON array's closing ]: it was not read" in job["warnings"]
