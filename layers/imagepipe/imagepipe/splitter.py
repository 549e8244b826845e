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
from imagepipe.jobstate import JobState, SplitInProgress
from imagepipe.layout import STATUS_REJECTED, JobLayout
from imagepipe.observability import logger
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
# The splitter's limits, one set that its function can do (CsvSplitterFunction: 512 MB of memory, 2,048 MB
# of /tmp, 900 s). A file over either fails its job up front - before any row is queued - with the reason:
# - MAX_INPUT_BYTES: checked before a byte is read. rows.jsonl (spooled to /tmp) holds each row's prompt and
#   extra columns again, JSON-escaped: at most a few times the input, inside /tmp with MAX_ROW_LOG_BYTES.
# - MAX_ROWS: the file is read once to count its rows before any is queued (the count pass also finds a file
#   that cannot be read at all). 100,000 rows are ~10,000 SendMessageBatch calls and checkpoints: a few
#   minutes, well inside one invocation, so a split never depends on Lambda's retries to get through a file.
#   The duplicate-id index holds a 16-byte digest per row (a few MB at the limit), never the ids.
MAX_INPUT_BYTES = 256 * 2**20
MAX_ROWS = 100_000
MAX_ROW_LOG_BYTES = 1536 * 2**20
# A split still going this close to the function's Timeout stops and ends itself (never expected within the
# limits above): the rows queued so far go on, the job says where the split stopped and why.
TIME_MARGIN_S = 60.0
# The split's lease is renewed at least this often while the splitter is alive - on time, whatever the rows
# are - so a duplicate trigger (S3 notification + EventBridge) never takes over a live split (lease_s).
HEARTBEAT_S = 10.0
# Text that goes into the job record (an error, a warning) is cut to this many characters: the record stays
# far below DynamoDB's 400 KB item limit whatever the file holds.
MAX_RECORD_TEXT = 2000
MANIFEST_SPLITTING, MANIFEST_SPLIT, MANIFEST_UNREADABLE = "splitting", "split", "unreadable"
MANIFEST_DUPLICATE = "duplicate"  # the same upload again: its job exists already
MANIFEST_SUPERSEDED = (
    "superseded"  # the event's object was overwritten (no version to read): its own event splits it
)
MANIFEST_TAKEN_OVER = (
    "taken_over"  # this splitter lost the job's lease to another invocation, which splits it
)


class SendFailed(Exception):
    """SQS kept refusing some tasks for reasons on its side."""


class SplitStopped(Exception):
    """The split cannot go on (a limit reached mid-file): it ends with the rows queued so far and this reason."""


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
    # Seconds left in the invocation (Lambda's context); the split ends itself TIME_MARGIN_S before the end.
    time_left: Callable[[], float] = lambda: float("inf")
    clock: Callable[[], float] = time.monotonic


def _clip(text: str, limit: int = MAX_RECORD_TEXT) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit:,} more characters)"


@dataclass
class SplitResult:
    job_id: str
    status: str
    rows: int = 0
    queued: int = 0
    rejected: int = 0
    error: dict[str, str] | None = None
    warnings: list[str] = field(default_factory=list)


def job_id_for(
    bucket: str, key: str, etag: str, metadata: dict[str, str], version_id: str | None = None
) -> str:
    """The uploader may name the job (object metadata job-id); otherwise the same object version always
    gives the same job id, so a redelivered S3 event, or the same upload seen as an S3 notification and
    through EventBridge, does not start a second job - and an overwrite (a new version) is a new job."""
    given = metadata.get("job-id", "")
    if re.match(JOB_ID_PATTERN, given):
        return given
    stem = job_stem(PurePosixPath(key).stem)
    identity = f"{bucket}/{key}/{etag}"
    if version_id and version_id != "null":  # "null": an object written while the bucket was unversioned
        identity += f"/{version_id}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:10]
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
        self._in_flight: dict[str, ImageTask] = {}  # the batch being sent, until SQS has answered for it
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
        self._in_flight = entries
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
            entries = self._in_flight = retry
            if entries and attempt < self._max_attempts:
                self._sleep(min(0.1 * 2**attempt, 2.0))
        if entries:
            raise SendFailed(f"SQS did not accept {len(entries)} task(s) after {self._max_attempts} attempts")
        self._in_flight = {}
        if through:
            self._on_sent(through)  # a checkpoint: a takeover queues only the rows after it

    def abandon(self, reason: str) -> None:
        """The split stops: the tasks not (known to be) on the queue are rejected with `reason`, so the job
        never waits for a row that was not queued."""
        for task in [*self._in_flight.values(), *self._pending]:
            self._on_rejected(task, reason)
        self._in_flight, self._pending = {}, []


class _Lease:
    """This splitter's hold on the job's split: the checkpoint after every batch, and a heartbeat on time
    (HEARTBEAT_S) in between, so a long run of rejected rows never lets a duplicate trigger take over."""

    def __init__(self, state: JobState, job_id: str, owner: str, through: int, clock: Callable[[], float]):
        self._state, self._job_id, self._owner, self._clock = state, job_id, owner, clock
        self.through, self._beaten = through, clock()

    def progress(self, through_row: int) -> None:
        self._state.split_progress(self._job_id, self._owner, through_row)
        self.through, self._beaten = through_row, self._clock()

    def beat(self) -> None:
        if self._clock() - self._beaten >= HEARTBEAT_S:
            self.progress(self.through)

    def release(self) -> None:
        """Give the split up at once (a failure before any row was queued): Lambda's retry takes it over
        without waiting for the lease to run out. Never raises: the original error is what matters."""
        try:
            self._state.split_progress(self._job_id, self._owner, self.through, release=True)
        except Exception:  # noqa: BLE001
            logger.warning("could not release the split's lease", extra={"job_id": self._job_id})


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
        self.bytes = 0

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
        data = json.dumps(line, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n"
        self.file.write(data)
        self.bytes += len(data)
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
    version_id: str | None = None,
) -> SplitResult:
    """Split one object into tasks, once per job: a second delivery of the same upload (same job id)
    finds the job record and does nothing (but hand the job to the finisher, should every row be done).

    `version_id` (from the S3 event) is the version read: an object overwritten since the upload is still
    split as it was uploaded, and the job id comes from that version. Without one (an "ImageJob Requested"
    event, an unversioned bucket) the object is read as it is now, and the job id comes from what was read:
    an event of an overwritten upload then names the job of its replacement, a duplicate."""
    get: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if version_id:
        get["VersionId"] = version_id
    obj = s3.get_object(**get)
    found_etag = obj.get("ETag", "").strip('"')
    version = obj.get("VersionId") or None
    metadata = obj.get("Metadata", {})
    job_id = job_id or job_id_for(bucket, key, found_etag, metadata, version)
    layout = JobLayout(job_id)
    size = obj.get("ContentLength") or 0
    source = {
        "bucket": bucket,
        "key": key,
        "etag": found_etag,
        "version_id": version,
        "size": size,
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
        obj["Body"].close()
        # A retry after the split was done: every row may be done by now, and the hand-off lost with the
        # invocation that split the file (harmless otherwise: only the one caller that sees the job done
        # and running hands it over).
        target.state.hand_to_finisher(sqs, target.finisher_queue_url, [job_id])
        return SplitResult(job_id=job_id, status=MANIFEST_DUPLICATE)
    manifest: dict[str, Any] = {
        "job_id": job_id,
        "source": source,
        "status": MANIFEST_SPLITTING,
        "started_at": started,
        "max_cost": max_cost,
    }
    lease = _Lease(target.state, job_id, owner, resume_after, target.clock)
    log = RowLog()
    result = SplitResult(job_id=job_id, status=MANIFEST_SPLIT, warnings=warnings)
    report = ReadReport()
    sender = TaskSender(
        sqs,
        target.queue_url,
        on_rejected=lambda task, reason: _unqueue(log, task, reason),
        on_sent=lease.progress,
        skip_through=resume_after,
    )
    seen: dict[bytes, int] = {}
    last_row = 0
    try:
        put_json(s3, target.output_bucket, layout.manifest_key, manifest)
        fmt = format_for_key(key)
        if size > MAX_INPUT_BYTES:
            raise InputUnreadable(
                f"the file is {size:,} bytes; the limit is {MAX_INPUT_BYTES:,} bytes: "
                "split it into smaller files"
            )
        # The count pass: a file over MAX_ROWS, or one that cannot be read at all, fails before any row is
        # queued. The split pass then reads the same version again (or the same ETag: an overwrite fails it).
        _count_rows(obj["Body"], fmt, lease, target)
        again = {"VersionId": version} if version else {"IfMatch": obj.get("ETag", "")}
        body = s3.get_object(Bucket=bucket, Key=key, **again)["Body"]
        for raw in read_rows(text_lines(body.iter_chunks(READ_CHUNK), fmt), fmt, report):
            if raw.number > MAX_ROWS:
                raise SplitStopped(f"the file has more than {MAX_ROWS:,} rows")  # it changed under us
            last_row = raw.number
            _split_row(raw, job_id, seen, log, sender, target)
            lease.beat()
            if log.bytes > MAX_ROW_LOG_BYTES:
                raise SplitStopped(
                    f"the rows' record (rows.jsonl) reached {MAX_ROW_LOG_BYTES:,} bytes, all the splitter's "
                    "disk allows: split the file into smaller files"
                )
            if target.time_left() < TIME_MARGIN_S:
                raise SplitStopped("the splitter ran out of time: split the file into smaller files")
        sender.flush()
    except InputUnreadable as exc:
        result.status = MANIFEST_UNREADABLE
        result.error = {"type": "unreadable", "message": _clip(str(exc))}
    except SplitInProgress:
        log.file.close()
        logger.warning(
            "the split was taken over by another invocation: it splits the file", extra={"job_id": job_id}
        )
        return SplitResult(job_id=job_id, status=MANIFEST_TAKEN_OVER)
    except Exception as exc:
        stopped = isinstance(exc, SplitStopped)  # a limit: a retry would stop there again
        if last_row < resume_after or (not stopped and not resume_after and not sender.sent):
            # Nothing of this job is on the queue - or what is (a split taken over) is not all in this
            # splitter's record yet: Lambda's retry splits the file anew, at once, from the checkpoint.
            log.file.close()
            lease.release()
            raise
        if stopped:
            reason = f"the split stopped after row {last_row:,}: {exc}; the rows after it were not read"
            sender.abandon(f"not queued: {reason}")
            result.error = {"type": "split_stopped", "message": _clip(reason)}
            return _end_split(s3, sqs, target, layout, lease, log, report, manifest, result, owner)
        # Rows are on the queue and being paid for: the split ends here rather than leave the job
        # `splitting` for ever - the rows queued so far go on, the job says where and why it stopped.
        logger.exception("the split failed after rows were queued: it ends here", extra={"job_id": job_id})
        reason = f"the split failed at row {last_row:,} ({type(exc).__name__}: {exc}): the rows after it were not read"
        sender.abandon(f"not queued: {reason}")
        result.error = {"type": "split_failed", "message": _clip(reason)}
    return _end_split(s3, sqs, target, layout, lease, log, report, manifest, result, owner)


def _count_rows(body: Any, fmt: str, lease: _Lease, target: SplitTarget) -> int:
    """The file's data rows (blank lines not counted), or InputUnreadable: over MAX_ROWS, or unreadable."""
    rows = 0
    try:
        for _ in read_rows(text_lines(body.iter_chunks(READ_CHUNK), fmt), fmt, ReadReport()):
            rows += 1
            if rows > MAX_ROWS:
                raise InputUnreadable(
                    f"the file has more than {MAX_ROWS:,} rows; the limit is {MAX_ROWS:,} rows a file: "
                    "split it into smaller files"
                )
            lease.beat()
            if target.time_left() < TIME_MARGIN_S:
                raise InputUnreadable(
                    "the file could not be read in the splitter's time: split it into smaller files"
                )
    finally:
        body.close()
    return rows


def _end_split(
    s3: Any,
    sqs: Any,
    target: SplitTarget,
    layout: JobLayout,
    lease: _Lease,
    log: RowLog,
    report: ReadReport,
    manifest: dict[str, Any],
    result: SplitResult,
    owner: str,
) -> SplitResult:
    """rows.jsonl, the manifest and the job's counts, written by the splitter that still owns the split."""
    job_id = result.job_id
    try:
        lease.progress(lease.through)  # still ours? (SplitInProgress if another invocation took it over)
        log.file.seek(0)
        s3.upload_fileobj(
            log.file, target.output_bucket, layout.rows_key, ExtraArgs={"ContentType": "application/x-ndjson"}
        )
    except SplitInProgress:
        logger.warning(
            "the split was taken over by another invocation: it splits the file", extra={"job_id": job_id}
        )
        return SplitResult(job_id=job_id, status=MANIFEST_TAKEN_OVER)
    except Exception:
        lease.release()  # Lambda's retry takes the split over at once, from its checkpoint
        raise
    finally:
        log.file.close()
    result.rows, result.queued, result.rejected = log.queued + log.rejected, log.queued, log.rejected
    columns = report.columns_warning()
    if columns:
        result.warnings.append(columns)
    result.warnings = [_clip(warning) for warning in result.warnings]
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
    if not target.state.split_done(job_id, counts, owner=owner):
        logger.warning("the split was ended by another invocation", extra={"job_id": job_id})
        return SplitResult(job_id=job_id, status=MANIFEST_TAKEN_OVER)
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
    raw: RawRow, job_id: str, seen: dict[bytes, int], log: RowLog, sender: TaskSender, target: SplitTarget
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
    # The index holds a 16-byte digest per id, not the id: its memory is bounded by MAX_ROWS.
    digest = hashlib.blake2b(task.row_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    first = seen.setdefault(digest, raw.number)
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
