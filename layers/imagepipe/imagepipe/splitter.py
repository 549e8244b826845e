"""Turning one uploaded file into tasks on TasksQueue, and recording what became of every row."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from imagepipe.contract import JOB_ID_PATTERN, PROVIDER_NAMES, ImageTask, job_stem
from imagepipe.jobstate import JobState
from imagepipe.layout import STATUS_REJECTED, JobLayout
from imagepipe.providers import Keys, provider_class
from imagepipe.records import now_iso, put_json
from imagepipe.rows import (
    KNOWN_COLUMNS,
    InputUnreadable,
    RawRow,
    ReadReport,
    RowDefaults,
    RowRejected,
    format_for_key,
    read_rows,
    row_id_of,
    text_lines,
    to_task,
)

SQS_BATCH = 10
READ_CHUNK = 256 * 1024
# An input file larger than this fails its job before a byte of it is read (the splitter's 15 minutes and
# /tmp would not hold the rows of a bigger one).
MAX_INPUT_BYTES = 2 * 2**30
MANIFEST_SPLITTING, MANIFEST_SPLIT, MANIFEST_UNREADABLE = "splitting", "split", "unreadable"
MANIFEST_DUPLICATE = "duplicate"  # the same upload again: its job exists already


class SendFailed(Exception):
    """SQS kept refusing some tasks for reasons on its side; the invocation fails and is retried."""


@dataclass
class SplitTarget:
    """Where a split goes, as the stack configures it."""

    queue_url: str
    output_bucket: str
    state: JobState
    finisher_queue_url: str
    check: Callable[[ImageTask], str | None] = lambda task: None
    defaults: RowDefaults = field(default_factory=RowDefaults)
    default_max_cost: float | None = None
    # A split that made no progress for this long was abandoned (a crash): a retry takes it over.
    lease_s: float = 60.0


@dataclass
class SplitResult:
    job_id: str
    status: str
    rows: int = 0
    queued: int = 0
    rejected: int = 0
    error: dict[str, str] | None = None
    warnings: list[str] = field(default_factory=list)


def job_id_for(bucket: str, key: str, etag: str, metadata: dict[str, str]) -> str:
    """The uploader may name the job (object metadata job-id); otherwise the same object
    always gives the same job id, so a redelivered S3 event does not start a second job."""
    given = metadata.get("job-id", "")
    if re.match(JOB_ID_PATTERN, given):
        return given
    stem = job_stem(PurePosixPath(key).stem)
    digest = hashlib.sha256(f"{bucket}/{key}/{etag}".encode()).hexdigest()[:10]
    return f"{stem}-{digest}"


class TaskSender:
    """Sends tasks ten at a time with SendMessageBatch, resending the entries SQS reports as Failed."""

    def __init__(
        self,
        sqs: Any,
        queue_url: str,
        on_rejected: Callable[[ImageTask, str], None],
        max_attempts: int = 5,
        sleep: Callable[[float], None] = time.sleep,
        on_sent: Callable[[int], None] = lambda through_row: None,
        skip_through: int = 0,
    ) -> None:
        self._sqs, self._queue_url, self._on_rejected = sqs, queue_url, on_rejected
        self._max_attempts, self._sleep = max_attempts, sleep
        self._pending: list[ImageTask] = []
        self.sent = 0
        # A split taken over from a splitter that died: the rows it queued are not queued again.
        self._on_sent, self._skip_through = on_sent, skip_through

    def add(self, task: ImageTask) -> None:
        if task.row_number <= self._skip_through:
            return
        self._pending.append(task)
        if len(self._pending) == SQS_BATCH:
            self.flush()

    def flush(self) -> None:
        entries = {str(i): task for i, task in enumerate(self._pending)}
        through = max((task.row_number for task in self._pending), default=0)
        self._pending = []
        for attempt in range(1, self._max_attempts + 1):
            if not entries:
                break
            response = self._sqs.send_message_batch(
                QueueUrl=self._queue_url,
                Entries=[{"Id": i, "MessageBody": t.model_dump_json()} for i, t in entries.items()],
            )
            self.sent += len(response.get("Successful", []))
            retry: dict[str, ImageTask] = {}
            for failure in response.get("Failed", []):
                task = entries[failure["Id"]]
                if failure.get("SenderFault"):
                    # Resending cannot help: the row is rejected with SQS's reason.
                    self._on_rejected(
                        task, f"the task could not be queued: {failure.get('Message') or failure['Code']}"
                    )
                else:
                    retry[failure["Id"]] = task
            entries = retry
            if entries and attempt < self._max_attempts:
                self._sleep(min(0.1 * 2**attempt, 2.0))
        if entries:
            raise SendFailed(f"SQS did not accept {len(entries)} task(s) after {self._max_attempts} attempts")
        if through:
            self._on_sent(through)  # a checkpoint: a takeover queues only the rows after it


RowCheck = Callable[[ImageTask], "str | None"]


def provider_check(keys: Keys) -> RowCheck:
    """Why the row's provider cannot serve it - no key configured, or outside what its API takes - or
    None. Decided here, before any paid call, so such a row is rejected rather than failed."""
    configured = {
        name for name in PROVIDER_NAMES if all(keys.get(key) for key in provider_class(name).key_names)
    }

    def check(task: ImageTask) -> str | None:
        if task.provider not in configured:
            names = " and ".join(provider_class(task.provider).key_names)
            return f"no API key is configured for {task.provider}: store {names} in the stack's keys secret"
        return provider_class(task.provider).check(task)

    return check


class RowLog:
    """rows.jsonl: one line per input row, spooled to disk past a few MB so memory stays flat."""

    def __init__(self) -> None:
        self.file = tempfile.SpooledTemporaryFile(max_size=4 * 1024 * 1024)  # noqa: SIM115 - closed by split_object
        self.queued = 0
        self.rejected = 0

    def write(
        self,
        row: int,
        row_id: str | None,
        name: str | None,
        status: str,
        error: dict | None = None,
        task: ImageTask | None = None,
        raw: RawRow | None = None,
    ) -> None:
        line: dict[str, Any] = {"row": row, "id": row_id, "name": name, "status": status, "error": error}
        if task is not None:
            model = task.model or provider_class(task.provider).default_model
            line.update(provider=task.provider, model=model, n=task.n, prompt=task.prompt)
        if raw is not None and raw.values is not None:
            # The row's own extra columns, echoed back in the results so users can join on them.
            extra = {k: v for k, v in raw.values.items() if k not in KNOWN_COLUMNS}
            if extra:
                line["extra"] = extra
            if task is None and isinstance(raw.values.get("prompt"), str):
                line["prompt"] = raw.values["prompt"][:4000]
        # backslashreplace: an id with bytes that are not UTF-8 is still recorded, never a crash.
        self.file.write(json.dumps(line, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n")
        if status == STATUS_REJECTED:
            self.rejected += 1
        else:
            self.queued += 1


def split_object(
    *,
    s3: Any,
    sqs: Any,
    target: SplitTarget,
    bucket: str,
    key: str,
    job_id: str | None = None,
    max_cost: float | None = None,
    trigger: str = "s3",
) -> SplitResult:
    """Split one object into tasks, once per job: a second delivery of the same upload (same job id)
    finds the job record and does nothing."""
    obj = s3.get_object(Bucket=bucket, Key=key)
    etag = obj.get("ETag", "").strip('"')
    metadata = obj.get("Metadata", {})
    job_id = job_id or job_id_for(bucket, key, etag, metadata)
    layout = JobLayout(job_id)
    source = {
        "bucket": bucket,
        "key": key,
        "etag": etag,
        "size": obj.get("ContentLength"),
        "trigger": trigger,
    }
    warnings: list[str] = []
    if max_cost is None:
        max_cost = _max_cost(metadata.get("max-cost"), warnings)
    if max_cost is None:
        max_cost = target.default_max_cost
    started = now_iso()
    record = {
        "source": source,
        "provider": target.defaults.provider,
        "model": target.defaults.model,
        "max_cost": max_cost,
        "parent_job": metadata.get("parent-job") or None,
        "created_iso": started,
        "rows_key": layout.rows_key,
    }
    owner = uuid.uuid4().hex
    resume_after = target.state.create_job(job_id, record, owner=owner, lease_s=target.lease_s)
    if resume_after is None:
        return SplitResult(job_id=job_id, status=MANIFEST_DUPLICATE)
    manifest: dict[str, Any] = {
        "job_id": job_id,
        "source": source,
        "status": MANIFEST_SPLITTING,
        "started_at": started,
        "max_cost": max_cost,
    }
    put_json(s3, target.output_bucket, layout.manifest_key, manifest)

    log = RowLog()
    result = SplitResult(job_id=job_id, status=MANIFEST_SPLIT, warnings=warnings)
    report = ReadReport()
    sender = TaskSender(
        sqs,
        target.queue_url,
        on_rejected=lambda task, reason: _unqueue(log, task, reason),
        on_sent=lambda through_row: target.state.split_progress(job_id, owner, through_row),
        skip_through=resume_after,
    )
    seen: dict[str, int] = {}
    try:
        fmt = format_for_key(key)
        size = obj.get("ContentLength") or 0
        if size > MAX_INPUT_BYTES:
            raise InputUnreadable(
                f"the file is {size:,} bytes; the limit is {MAX_INPUT_BYTES:,} bytes: "
                "split it into smaller files"
            )
        for raw in read_rows(text_lines(obj["Body"].iter_chunks(READ_CHUNK), fmt), fmt, report):
            _split_row(raw, job_id, seen, log, sender, target)
        sender.flush()
    except InputUnreadable as exc:
        result.status = MANIFEST_UNREADABLE
        result.error = {"type": "unreadable", "message": str(exc)}

    log.file.seek(0)
    s3.upload_fileobj(
        log.file, target.output_bucket, layout.rows_key, ExtraArgs={"ContentType": "application/x-ndjson"}
    )
    log.file.close()
    result.rows, result.queued, result.rejected = log.queued + log.rejected, log.queued, log.rejected
    if report.ignored_columns:
        result.warnings.append(
            f"extra column(s) echoed back in the results: {', '.join(report.ignored_columns)}"
        )
    counts = {
        "total": result.rows,
        "queued": result.queued,
        "rejected": result.rejected,
        "format": report.format,
        "blank_rows": report.blank_rows,
        "warnings": result.warnings,
        "error": result.error,
        "split_iso": now_iso(),
    }
    manifest.update(status=result.status, **counts)
    put_json(s3, target.output_bucket, layout.manifest_key, manifest)
    target.state.split_done(job_id, counts)
    # Every row may already be done (all rejected, or the generators were quick): then finish here.
    target.state.hand_to_finisher(sqs, target.finisher_queue_url, [job_id])
    return result


def _max_cost(text: str | None, warnings: list[str]) -> float | None:
    if text is None or not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        warnings.append(f"max-cost {text!r} is not a number of dollars: the stack's default applies")
        return None
    return value


def _split_row(
    raw: RawRow, job_id: str, seen: dict[str, int], log: RowLog, sender: TaskSender, target: SplitTarget
) -> None:
    def reject(row_id: str | None, reason: str, task: ImageTask | None = None) -> None:
        log.write(
            raw.number, row_id, None, STATUS_REJECTED, {"type": "rejected", "message": reason}, task, raw
        )

    try:
        task = to_task(job_id, raw, target.defaults)
    except RowRejected as exc:
        reject(row_id_of(raw), str(exc))
        return
    first = seen.setdefault(task.row_id, raw.number)
    if first != raw.number:
        reject(task.row_id, f"duplicate id {task.row_id!r}: row {first} already uses it")
        return
    reason = target.check(task)
    if reason:
        reject(task.row_id, reason, task)
        return
    log.write(raw.number, task.row_id, task.image_name, "queued", task=task, raw=raw)
    sender.add(task)


def _unqueue(log: RowLog, task: ImageTask, reason: str) -> None:
    # The row was logged as queued before SQS refused it: log the rejection, which wins when read back.
    log.queued -= 1
    log.write(
        task.row_number, task.row_id, None, STATUS_REJECTED, {"type": "rejected", "message": reason}, task
    )
