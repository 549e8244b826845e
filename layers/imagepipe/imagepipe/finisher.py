"""Finishing a job once its last row is done: results.jsonl and results.csv in input order, the final
manifest.json and report.html under the job's prefix, then one "ImageJob Completed" event."""

from __future__ import annotations

import csv
import io
import json
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from imagepipe.jobstate import (
    CANCELLED,
    COMPLETED,
    COMPLETED_WITH_FAILURES,
    FAILED,
    FINISHING,
    JOB_FINAL,
    SUCCEEDED,
    JobState,
)
from imagepipe.layout import STATUS_REJECTED, JobLayout
from imagepipe.observability import logger
from imagepipe.records import get_json, now_iso, put_json
from imagepipe.report import render_report
from imagepipe.rows import split_lines

EVENT_COMPLETED = "ImageJob Completed"
RESULT_FIELDS = (
    "id",
    "row",
    "status",
    "images",
    "error",
    "provider",
    "model",
    "request_id",
    "cost",
    "attempts",
    "seconds",
    "answers_lost",
    "prompt",
    "backend",
    # Only a local row's (ComfyUI on the user's GPU): its workflow, ComfyUI's prompt id, the GPU time.
    "workflow",
    "prompt_id",
    "gpu_seconds",
)
LOST = {
    "type": "lost",
    "message": "no outcome was recorded for this row: it is in the dead-letter queue or was lost",
}
# A spreadsheet runs a cell that starts with one of these as a formula: such text gets a leading quote.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class EventNotPublished(Exception):
    """EventBridge refused the completion event: the finisher's message is retried."""


def finish_job(
    *, s3: Any, events: Any, state: JobState, bucket: str, job_id: str, bus: str, source: str
) -> dict | None:
    """Write the job's results and publish its completion, once. Safe to call again: a job that is already
    final only gets its owed event (if the last call stopped before publishing it)."""
    job = state.job(job_id)
    if job is None:
        logger.warning("no such job", extra={"job_id": job_id})
        return None
    if job["status"] in JOB_FINAL:
        if job.get("event_pending"):
            _publish(events, state, bus, source, job.get("summary") or {"job_id": job_id})
        return job.get("summary")
    if job["status"] != FINISHING:
        logger.info("job not ready to finish", extra={"job_id": job_id, "status": job["status"]})
        return None

    started = time.monotonic()
    layout = JobLayout(job_id)
    outcomes = {o["name"]: o for o in state.outcomes(job_id)}
    rows = list(_result_rows(s3, bucket, layout, job, outcomes))
    counts = Counter(r["status"] for r in rows)
    total_cost = round(sum(float(r.get("cost") or 0) for r in rows), 6)
    status = _final_status(job, counts, len(rows))
    finished_iso = now_iso()
    summary = {
        "job_id": job_id,
        "status": status,
        "counts": {
            "total": len(rows),
            "succeeded": counts[SUCCEEDED],
            "failed": counts[FAILED],
            "rejected": counts[STATUS_REJECTED],
            "cancelled": counts[CANCELLED],
        },
        "cost": total_cost,
        "answers_lost": sum(int(r.get("answers_lost") or 0) for r in rows),
        "created_at": job.get("created_iso"),
        "finished_at": finished_iso,
        "seconds": round(time.time() - float(job.get("created_at") or time.time()), 3),
        "source": job.get("source"),
        "provider": job.get("provider"),
        "model": job.get("model"),
        "max_cost": job.get("max_cost"),
        "parent_job": job.get("parent_job"),
        "error": job.get("error"),
        "results": {
            "bucket": bucket,
            "jsonl": layout.results_key,
            "csv": layout.results_csv_key,
            "report": layout.report_key,
            "manifest": layout.manifest_key,
        },
    }
    _upload_lines(
        s3,
        bucket,
        layout.results_key,
        (json.dumps(r, ensure_ascii=False) for r in rows),
        "application/x-ndjson",
    )
    _upload_csv(s3, bucket, layout.results_csv_key, rows)
    s3.put_object(
        Bucket=bucket,
        Key=layout.report_key,
        Body=render_report(summary, rows).encode("utf-8", "backslashreplace"),
        ContentType="text/html; charset=utf-8",
    )
    manifest = get_json(s3, bucket, layout.manifest_key) or {"job_id": job_id}
    manifest.update(summary)
    put_json(s3, bucket, layout.manifest_key, manifest)
    if state.complete(job_id, status, {"finished_iso": finished_iso, "summary": summary, "cost": total_cost}):
        _publish(events, state, bus, source, summary)
    logger.info(
        "job finished",
        extra={
            "job_id": job_id,
            "status": status,
            "rows": len(rows),
            "seconds": round(time.monotonic() - started, 3),
        },
    )
    return summary


def _final_status(job: dict[str, Any], counts: Counter, total: int) -> str:
    if job.get("error") or total == 0:
        return FAILED
    if job.get("cancel_requested") and counts[CANCELLED]:
        return CANCELLED
    if counts[SUCCEEDED] == total:
        return COMPLETED
    # Never plain success when anything failed: some succeeded, or none did.
    return COMPLETED_WITH_FAILURES if counts[SUCCEEDED] else FAILED


def _result_rows(
    s3: Any, bucket: str, layout: JobLayout, job: dict[str, Any], outcomes: dict[str, dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    """One result per input row, in input order: rows.jsonl (what the splitter made of each row) joined
    with each task's outcome."""
    by_row: dict[int, dict[str, Any]] = {}
    body = s3.get_object(Bucket=bucket, Key=job.get("rows_key") or layout.rows_key)["Body"]
    for line in split_lines(body.iter_chunks(256 * 1024)):
        if line.strip():
            entry = json.loads(line)
            by_row[entry["row"]] = entry  # a later line for the same row wins (a task SQS refused)
    for number in sorted(by_row):
        entry = by_row[number]
        result: dict[str, Any] = {
            "id": entry.get("id"),
            "row": number,
            "status": entry["status"],
            "images": [],
            "error": entry.get("error"),
            "provider": entry.get("provider"),
            "model": entry.get("model"),
            "request_id": None,
            "cost": 0.0,
            "attempts": 0,
            "seconds": None,
            "answers_lost": 0,
            "prompt": entry.get("prompt"),
            "backend": entry.get("backend") or "cloud",  # rows split before the local route were cloud
        }
        if result["backend"] == "local":
            result.update(workflow=entry.get("workflow"), prompt_id=None, gpu_seconds=0.0)
        if entry["status"] != STATUS_REJECTED:
            outcome = outcomes.get(entry.get("name") or "")
            if outcome is None:
                result.update(status=FAILED, error=dict(LOST))
            else:
                result.update(
                    status=outcome["status"],
                    images=[key.removeprefix(layout.prefix) for key in outcome.get("images") or []],
                    error=outcome.get("error"),
                    model=outcome.get("model") or result["model"],
                    request_id=outcome.get("request_id"),
                    cost=float(outcome.get("cost") or 0.0),
                    attempts=int(outcome.get("attempt") or 0),
                    seconds=outcome.get("seconds"),
                    answers_lost=int(outcome.get("answers_lost") or 0),
                )
                if result["backend"] == "local":
                    result.update(
                        workflow=outcome.get("workflow") or result["workflow"],
                        prompt_id=outcome.get("prompt_id"),
                        gpu_seconds=float(outcome.get("gpu_seconds") or 0.0),
                    )
        if entry.get("extra"):
            result["extra"] = entry["extra"]
        yield result


def _upload_lines(s3: Any, bucket: str, key: str, lines: Iterator[str], content_type: str) -> None:
    # Spooled: a 100,000-row result stays in memory up to 16 MB, then goes to /tmp, never whole in a string.
    with tempfile.SpooledTemporaryFile(max_size=16 * 2**20) as spool:
        for line in lines:
            spool.write(line.encode("utf-8", "backslashreplace") + b"\n")
        spool.seek(0)
        s3.upload_fileobj(spool, bucket, key, ExtraArgs={"ContentType": content_type})


def _upload_csv(s3: Any, bucket: str, key: str, rows: list[dict[str, Any]]) -> None:
    extra_columns: list[str] = []
    seen: set[str] = set()
    for row in rows:
        for name in row.get("extra") or {}:
            if name not in seen:
                seen.add(name)
                extra_columns.append(name)
    header = [f for f in RESULT_FIELDS if f != "error"] + ["error_type", "error_message"] + extra_columns

    def lines() -> Iterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="")
        writer.writerow([csv_cell(name) for name in header])
        yield buffer.getvalue()
        for row in rows:
            buffer.seek(0)
            buffer.truncate()
            error = row.get("error") or {}
            values = [row.get(f) for f in RESULT_FIELDS if f != "error"]
            values[RESULT_FIELDS.index("images")] = " ".join(row.get("images") or [])
            values += [error.get("type"), error.get("message")]
            values += [(row.get("extra") or {}).get(name) for name in extra_columns]
            writer.writerow([csv_cell(v) for v in values])
            yield buffer.getvalue()

    _upload_lines(s3, bucket, key, lines(), "text/csv; charset=utf-8")


def csv_cell(value: Any) -> str:
    """Text for one CSV cell, never a formula a spreadsheet would run (`=cmd|...` stays text)."""
    if value is None:
        return ""
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value)
        if isinstance(value, (dict, list))
        else str(value)
    )
    return "'" + text if text.startswith(_FORMULA_START) else text


def _publish(events: Any, state: JobState, bus: str, source: str, summary: dict[str, Any]) -> None:
    answer = events.put_events(
        Entries=[
            {
                "EventBusName": bus,
                "Source": source,
                "DetailType": EVENT_COMPLETED,
                "Detail": json.dumps(summary, default=str),
                "Resources": [],
            }
        ]
    )
    if answer.get("FailedEntryCount"):
        raise EventNotPublished(f"EventBridge refused the completion event: {answer.get('Entries')}")
    state.event_sent(summary["job_id"])
