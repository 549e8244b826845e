"""A job's results, read back from what the stack recorded: one result per input row, in input order."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from imagepipe.layout import (
    STATUS_FAILED,
    STATUS_REJECTED,
    STATUS_SUCCEEDED,
    JobLayout,
    parse_image_key,
    parse_outcome_key,
)
from imagepipe.records import get_json, list_keys
from imagepipe.rows import split_lines

STATUS_PENDING = "pending"
LOST = {
    "type": "lost",
    "message": "no outcome was recorded for this task: it is in the dead-letter queue or was lost",
}


@dataclass
class RowResult:
    row: int
    id: str | None
    status: str
    images: list[str] = field(default_factory=list)  # S3 keys in the output bucket
    error: dict[str, str] | None = None
    provider: str | None = None
    model: str | None = None
    request_id: str | None = None  # the provider's prediction or response id
    cost: float = 0.0  # USD: the provider's reported price, else the stack's price per image
    attempts: int = 0
    seconds: float | None = None
    answers_lost: int = 0  # requests whose answer never arrived (each may have been charged)


@dataclass
class JobResults:
    job_id: str
    manifest: dict[str, Any] | None
    rows: list[RowResult] = field(default_factory=list)

    @property
    def split_done(self) -> bool:
        return self.manifest is not None and self.manifest.get("status") != "splitting"

    @property
    def counts(self) -> Counter:
        return Counter(result.status for result in self.rows)

    @property
    def finished(self) -> bool:
        """Every row is accounted for: succeeded, failed or rejected."""
        return self.split_done and self.counts[STATUS_PENDING] == 0


def collect_results(s3: Any, bucket: str, job_id: str, *, drained: bool = False) -> JobResults:
    """Read the job's records. With drained=True (no task can still arrive: the queue is empty and
    nothing is in flight), a queued row with no outcome is reported failed as lost, never left out."""
    layout = JobLayout(job_id)
    manifest = get_json(s3, bucket, layout.manifest_key)
    results = JobResults(job_id, manifest)
    if not results.split_done:
        return results

    statuses: dict[str, set[str]] = {}
    for key in list_keys(s3, bucket, layout.outcomes_prefix):
        parsed = parse_outcome_key(layout, key)
        if parsed:
            statuses.setdefault(parsed[0], set()).add(parsed[1])
    images: dict[str, list[tuple[int, str]]] = {}
    for key in list_keys(s3, bucket, layout.images_prefix):
        parsed = parse_image_key(layout, key)
        if parsed:
            images.setdefault(parsed[0], []).append((parsed[1], key))

    def outcome(name: str) -> dict[str, Any]:
        status = STATUS_SUCCEEDED if STATUS_SUCCEEDED in statuses[name] else STATUS_FAILED
        return get_json(s3, bucket, layout.outcome_key(name, status)) or {}

    names = list(statuses)
    with ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = dict(zip(names, pool.map(outcome, names), strict=True))

    by_row: dict[int, dict[str, Any]] = {}
    body = s3.get_object(Bucket=bucket, Key=layout.rows_key)["Body"]
    for line in split_lines(body.iter_chunks(256 * 1024)):
        if line.strip():
            entry = json.loads(line)
            by_row[entry["row"]] = entry  # a later line for the same row wins (a task SQS refused)
    for number in sorted(by_row):
        entry = by_row[number]
        result = RowResult(
            row=number,
            id=entry.get("id"),
            status=entry["status"],
            error=entry.get("error"),
            provider=entry.get("provider"),
            model=entry.get("model"),
        )
        if result.status != STATUS_REJECTED:
            record = outcomes.get(entry["name"])
            if record is not None:
                result.status = record.get("status", STATUS_FAILED)
                result.error = record.get("error")
                if result.status == STATUS_FAILED and not result.error:
                    result.error = {"type": "unknown", "message": "the failure record has no reason"}
                if result.status == STATUS_SUCCEEDED:
                    result.images = [key for _, key in sorted(images.get(entry["name"], []))]
                result.model = record.get("model", result.model)
                result.request_id = record.get("request_id")
                result.cost = float(record.get("cost") or 0.0)
                result.attempts = int(record.get("attempt") or 0)
                result.seconds = record.get("seconds")
                result.answers_lost = int(record.get("answers_lost") or 0)
            elif drained:
                result.status, result.error = STATUS_FAILED, dict(LOST)
            else:
                result.status = STATUS_PENDING
        results.rows.append(result)
    return results
