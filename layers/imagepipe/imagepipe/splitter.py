"""Turning one uploaded file into tasks on TasksQueue, and recording what became of every row.

A file of any size is split in segments, one invocation each:
- Reading: rows are streamed from S3 (CSV, JSONL, or a JSON array through ijson), never the whole file, and
  each row knows where it ends. Every read names the version the job started from (VersionId; IfMatch on
  the ETag in an unversioned bucket), from the segment's first byte on (Range; a CSV's header is read again).
- Sending: SendMessageBatch of 10 tasks, SEND_THREADS calls in flight on one (thread-safe) client: 0.1 SQS
  calls a row. The job's split_through - every row up to it is on the queue - moves over a run of finished
  batches and is written at most every CHECKPOINT_S: the split's checkpoint and its lease's heartbeat.
- Continuing: with less than TIME_MARGIN_S left in the invocation (or this segment's part of rows.jsonl at
  MAX_ROW_LOG_BYTES on /tmp) the splitter stops after a row whose end it knows, waits for its batches,
  saves the segment (imagepipe.splitstore: the id index, its lines of rows.jsonl, its counts), hands the
  split over in one conditional write (owner: a new token; the next segment starts at that byte and row)
  and sends itself a message on SplitContinuationQueue naming the token. The continuation takes the split
  with a conditional write and reads on from that byte: no row is sent twice, none is skipped.
- Crashes: a segment is re-run from its start (the index and counts the segment before it left) by
  whoever takes the split over - Lambda's retry of the event, SQS's redelivery of the continuation - and
  it sends only the rows after split_through. An exception after rows were sent (a checkpoint write that
  failed, SQS refusing a batch for good) hands the segment to a continuation with what this invocation
  knows it sent - the message carries it when the job record could not - up to MAX_SEGMENT_RETRIES times,
  then the split ends with what it queued. Only an invocation killed outright (its Timeout, out of memory)
  can leave rows sent after its last checkpoint (at most CHECKPOINT_S of sending plus the batches in
  flight): the retry sends them again, and the generator's claim on the task (one JobsTable item per row
  name) makes the second message a no-op.
- Limits (10 M rows on paper): MAX_ROWS is counted as rows are read (a file over it stops at that row; the
  rows before it go on); the job record holds a few numbers whatever the size; /tmp holds one segment's
  part of rows.jsonl (MAX_ROW_LOG_BYTES, then it hands over early); memory holds the id index (~20 bytes a
  row: ~200 MB at 10 M rows, hence the function's 1,024 MB); time: every invocation hands over before its
  Timeout, and the one that reaches the end of the file streams the parts into rows.jsonl (it hands over
  first when its time left would not do at ASSEMBLE_BYTES_PER_S).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from imagepipe.contract import JOB_ID_PATTERN, PROVIDER_NAMES, ImageTask, job_stem
from imagepipe.jobstate import JobState, SplitInProgress
from imagepipe.layout import STATUS_REJECTED, JobLayout
from imagepipe.localroute import LocalRoute, requested_backend
from imagepipe.observability import logger
from imagepipe.providers import Keys, provider_class
from imagepipe.records import get_json, now_iso, put_json
from imagepipe.rows import (
    FORMATS,
    KNOWN_COLUMNS,
    InputBroken,
    InputUnreadable,
    JsonRows,
    RawRow,
    ReadReport,
    RowDefaults,
    RowRejected,
    UnknownColumns,
    format_for_key,
    read_rows,
    row_id_of,
    text_lines_at,
    to_task,
    utf8_stream,
)
from imagepipe.splitstore import IdIndex, SegmentStore
from imagepipe.tasksender import SEND_THREADS, SQS_BATCH, SendFailed, TaskSender  # noqa: F401 - re-exported

READ_CHUNK = 256 * 1024
MAX_INPUT_BYTES = 10 * 2**30
MAX_ROWS = 10_000_000
# One segment's lines of rows.jsonl, spooled to /tmp (2,048 MB): past this the segment hands over.
MAX_ROW_LOG_BYTES = 1536 * 2**20
# A split hands over (or, with nowhere to hand over to, stops) this close to the function's Timeout.
TIME_MARGIN_S = 60.0
# How fast the last invocation is counted on to stream the parts into rows.jsonl (S3 to S3 through Lambda).
ASSEMBLE_BYTES_PER_S = 50 * 2**20
# split_through is written at most this often while rows are queued ...
CHECKPOINT_S = 0.5
# ... and the lease renewed at least this often whatever the rows are, so a duplicate trigger (S3
# notification + EventBridge) never takes over a live split (lease_s).
HEARTBEAT_S = 10.0
# Hand-overs after a failure, per segment, before the split ends with what it queued.
MAX_SEGMENT_RETRIES = 3
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
MANIFEST_CONTINUED = "continued"  # this invocation handed the rest of the file to a continuation
CONTINUATION_KEY = "split_continuation"  # a continuation message's body: {CONTINUATION_KEY: Continuation}


class SplitStopped(Exception):
    """The split cannot go on (a limit reached mid-file): it ends with the rows queued so far and this reason."""


class HandOverUnsent(Exception):
    """The split is the continuation's, but its message was not sent: the invocation fails, and whoever
    retries it (Lambda's retry of the event, SQS's redelivery) takes the split over once its lease is out."""


class Continuation(BaseModel):
    """A split handed to a later invocation of the splitter: the body of a SplitContinuationQueue message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    job_id: str
    bucket: str
    key: str
    version_id: str | None = None
    etag: str = ""
    size: int = Field(ge=0)
    segment: int = Field(ge=0)
    # Whose split it is as the message is sent: the token of a hand-over, or the sender's own id (a failure
    # hand-over, when the job record may not have been written).
    owner: str
    through: int = Field(ge=0)  # every row up to it is on the queue
    attempt: int = Field(0, ge=0)  # failure hand-overs of this segment so far
    trigger: str = "continuation"

    def body(self) -> str:
        return f'{{"{CONTINUATION_KEY}": {self.model_dump_json()}}}'


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
    # Seconds left in the invocation (Lambda's context); the split hands over TIME_MARGIN_S before the end.
    time_left: Callable[[], float] = lambda: float("inf")
    clock: Callable[[], float] = time.monotonic
    # SplitContinuationQueue; without it a split that runs low on time stops there (its rows go on).
    continuation_queue_url: str | None = None
    send_threads: int = SEND_THREADS
    # The local route (LocalTasksQueue, "" when the stack has none) and where its rows' images are.
    local_queue_url: str = ""
    input_bucket: str = ""


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


class _Lease:
    """This splitter's hold on the job's split: the checkpoint (at most every CHECKPOINT_S while rows are
    queued) and a heartbeat on time (HEARTBEAT_S), so a long run of rejected rows never lets a duplicate
    trigger take over."""

    def __init__(self, state: JobState, job_id: str, owner: str, through: int, clock: Callable[[], float]):
        self._state, self._job_id, self._owner, self._clock = state, job_id, owner, clock
        self.through, self._beaten = through, clock()

    def progress(self, through_row: int) -> None:
        self._state.split_progress(self._job_id, self._owner, through_row)
        self.through, self._beaten = through_row, self._clock()

    def tick(self, through_row: int) -> None:
        since = self._clock() - self._beaten
        if (through_row > self.through and since >= CHECKPOINT_S) or since >= HEARTBEAT_S:
            self.progress(max(through_row, self.through))

    def last_word(self, through_row: int) -> None:
        """The invocation is being ended (an exception it cannot handle): record how far it got, if it can."""
        if through_row > self.through:
            try:
                self.progress(through_row)
            except Exception:  # noqa: BLE001
                logger.warning("could not record the split's checkpoint", extra={"job_id": self._job_id})

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
    None. Decided here, before any paid call, so such a row is rejected rather than failed. The keys are
    a cached read (5 minutes): before the first row that seems to have no key, the secret is read again,
    so a key stored a minute ago does not get a whole upload rejected."""

    def with_keys() -> set[str]:
        return {name for name in PROVIDER_NAMES if all(keys.get_many(*provider_class(name).key_names))}

    configured, fresh = with_keys(), False

    def check(task: ImageTask) -> str | None:
        nonlocal configured, fresh
        if task.backend == "local":
            return None  # the user's own ComfyUI: no key, no API limits
        if task.provider not in configured and not fresh:
            keys.refresh()
            configured, fresh = with_keys(), True
        if task.provider not in configured:
            names = " and ".join(provider_class(task.provider).key_names)
            return f"no API key is configured for {task.provider}: store {names} in the stack's keys secret"
        return provider_class(task.provider).check(task)

    return check


class RowLog:
    """One segment's lines of rows.jsonl (one per input row), spooled to disk past a few MB so memory stays flat."""

    def __init__(self) -> None:
        self.file = tempfile.SpooledTemporaryFile(max_size=4 * 1024 * 1024)  # noqa: SIM115 - closed by the split
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
            local = task.backend == "local"
            model = task.model or (None if local else provider_class(task.provider).default_model)
            line.update(
                provider=task.provider, model=model, n=task.n, prompt=task.prompt, backend=task.backend
            )
            if task.workflow:
                line["workflow"] = task.workflow
        elif raw is not None and raw.values is not None:
            line["backend"] = requested_backend(raw.values)
        if raw is not None and raw.values is not None:
            # The row's own extra columns, echoed back in the results so users can join on them.
            extra = {k: v for k, v in raw.values.items() if k not in KNOWN_COLUMNS}
            if extra:
                line["extra"] = extra
            if task is None and isinstance(raw.values.get("prompt"), str):
                line["prompt"] = raw.values["prompt"][:4000]
        # backslashreplace: an id with bytes that are not UTF-8 is still recorded, never a crash.
        data = _json_line(line)
        self.file.write(data)
        self.bytes += len(data)
        if status == STATUS_REJECTED:
            self.rejected += 1
        else:
            self.queued += 1


def _json_line(line: dict[str, Any]) -> bytes:
    return json.dumps(line, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n"


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
    job = (target.state.job(job_id) or {}) if resume_after else {}  # a takeover: from its segment's start
    request = Continuation(
        job_id=job_id,
        bucket=bucket,
        key=key,
        version_id=version,
        etag=obj.get("ETag", ""),
        size=size,
        segment=int(job.get("split_segment", 0)),
        owner=owner,
        through=resume_after,
        trigger=trigger,
    )
    manifest: dict[str, Any] = {
        "job_id": job_id,
        "source": source,
        "status": MANIFEST_SPLITTING,
        "started_at": started,
        "max_cost": max_cost,
    }
    split = _Split(s3, sqs, target, request, owner, warnings)
    if request.segment or resume_after:
        obj["Body"].close()
        return split.run(job.get("split_start") or {}, manifest=manifest, attempt=0)
    return split.run({}, manifest=manifest, attempt=0, body=obj["Body"], size_checked=size)


def continue_split(*, s3: Any, sqs: Any, target: SplitTarget, request: Continuation) -> SplitResult:
    """Go on with a split another invocation handed over (a SplitContinuationQueue message). A message for a
    split that is done, or that a live splitter holds, is let go: that splitter's own trigger covers it."""
    owner = uuid.uuid4().hex
    job = target.state.continue_split(
        request.job_id,
        handed_to=request.owner,
        segment=request.segment,
        through=request.through,
        owner=owner,
        lease_s=target.lease_s,
    )
    if job is None:
        logger.info("continuation not needed: the split is done or live", extra={"job_id": request.job_id})
        return SplitResult(job_id=request.job_id, status=MANIFEST_DUPLICATE)
    segment = int(job.get("split_segment", 0))
    attempt = request.attempt if segment == request.segment else 0
    manifest = get_json(s3, target.output_bucket, JobLayout(request.job_id).manifest_key) or {
        "job_id": request.job_id
    }
    current = request.model_copy(update={"segment": segment, "through": int(job.get("split_through", 0))})
    return _Split(s3, sqs, target, current, owner, []).run(
        job.get("split_start") or {}, manifest=manifest, attempt=attempt
    )


class _Split:
    """One invocation's part of a split: the segment the job record says, from its start."""

    def __init__(
        self, s3: Any, sqs: Any, target: SplitTarget, request: Continuation, owner: str, warnings: list[str]
    ) -> None:
        self.s3, self.sqs, self.target, self.request, self.owner = s3, sqs, target, request, owner
        self.job_id, self.segment, self.warnings = request.job_id, request.segment, warnings
        self.fmt = format_for_key(request.key) if request.key.lower().endswith(tuple(FORMATS)) else ""
        self.store = SegmentStore(s3, target.output_bucket, request.job_id)
        self.lease = _Lease(target.state, self.job_id, owner, request.through, target.clock)
        self.unknown = UnknownColumns()  # JSON/JSONL keys that are not columns, over the whole file
        self.last_row, self.attempt = request.through, 0
        self.route = LocalRoute(bool(target.local_queue_url), target.input_bucket).for_file(
            request.bucket, request.key
        )

    def run(
        self,
        start: dict[str, Any],
        *,
        manifest: dict[str, Any],
        attempt: int,
        body: Any = None,
        size_checked: int | None = None,
    ) -> SplitResult:
        start = {"offset": 0, "row": 0, "header_end": 0, "encoding": None, "eof": False, **start}
        target, through = self.target, self.request.through
        self.attempt = attempt
        log = RowLog()
        report = ReadReport(format=self.fmt)
        sender = TaskSender(
            self.sqs,
            target.queue_url,
            on_rejected=lambda task, reason: _unqueue(log, task, reason),
            skip_through=through,
            threads=target.send_threads,
            local_queue_url=target.local_queue_url,
        )
        result = SplitResult(job_id=self.job_id, status=MANIFEST_SPLIT, warnings=self.warnings)
        last_row = int(start["row"])
        saved: dict[str, Any] = {}
        try:
            if self.segment == 0:
                put_json(self.s3, target.output_bucket, JobLayout(self.job_id).manifest_key, manifest)
            if not self.fmt:
                format_for_key(self.request.key)  # InputUnreadable with the formats that work
            if size_checked is not None and size_checked > MAX_INPUT_BYTES:
                raise InputUnreadable(
                    f"the file is {size_checked:,} bytes; the limit is {MAX_INPUT_BYTES:,} bytes: "
                    "split it into smaller files"
                )
            index, saved = self.store.load(self.segment - 1)
            report.blank_rows, report.notes = saved.get("blank_rows", 0), list(saved.get("notes", []))
            self.unknown = UnknownColumns(saved.get("unknown_named", []), saved.get("unknown_seen", b""))
            rows, precise, locate = self._reader(start, report, self.unknown, body)
            stop: dict[str, Any] | None = None
            for raw in rows:
                if raw.number > MAX_ROWS:
                    raise SplitStopped(f"the file has more than {MAX_ROWS:,} rows, the limit a file")
                last_row = self.last_row = raw.number
                _split_row(raw, self.job_id, index, log, sender, target, self.route)
                self.lease.tick(sender.through)
                if stop is None and self._should_stop(log, saved):
                    stop = {}
                    precise()
                if stop is not None and raw.end is not None:
                    stop = {**start, "offset": locate(raw.end), "row": raw.number}
                    break
            sender.finish()
            state = self._state(log, report, saved)
            short = target.time_left() < TIME_MARGIN_S + self._assembly_s(state)
            if stop is None and self.segment and not start["eof"] and short:
                stop = {**start, "eof": True, "row": last_row}  # a fresh invocation writes rows.jsonl
            if stop:
                return self._hand_over(stop, log, index, state, result)
        except InputBroken as exc:
            return self._stopped(str(exc), last_row, sender, log, report, saved, manifest, result)
        except InputUnreadable as exc:
            sender.abandon(f"not queued: {exc}")
            result.status = MANIFEST_UNREADABLE
            result.error = {"type": "unreadable", "message": _clip(str(exc))}
        except SplitInProgress:
            return self._taken_over(log, sender)
        except SplitStopped as exc:
            return self._stopped(str(exc), last_row, sender, log, report, saved, manifest, result)
        except Exception as exc:
            if isinstance(exc, HandOverUnsent):
                sender.close()
                raise
            handed = self._retry_segment(exc, attempt, last_row, sender, log)
            if handed is not None:
                return handed
            # Rows are on the queue and being paid for: the split ends here rather than leave the job
            # `splitting` for ever - the rows queued so far go on, the job says where and why it stopped.
            logger.exception(
                "the split failed after rows were queued: it ends here", extra={"job_id": self.job_id}
            )
            reason = f"the split failed at row {last_row:,} ({type(exc).__name__}: {exc}): the rows after it were not read"
            sender.abandon(f"not queued: {reason}")
            result.error = {"type": "split_failed", "message": _clip(reason)}
        except BaseException:
            self.lease.last_word(sender.through)
            sender.close()
            log.file.close()
            raise
        sender.close()
        return self._finish(log, report, saved, manifest, result)

    def _reader(
        self, start: dict[str, Any], report: ReadReport, unknown: UnknownColumns, body: Any
    ) -> tuple[Iterable[RawRow], Callable[[], None], Callable[[int], int]]:
        """The segment's rows, how to ask for rows that know their end (JSON), and a row end's file offset."""
        offset, first = int(start["offset"]), int(start["row"])
        if start["eof"]:
            return (), lambda: None, lambda end: end
        gap_from = int(start["header_end"]) if self.fmt == "csv" else 0  # a CSV's header is read again
        encoding, stream = self._bytes(offset, gap_from, start["encoding"], body)
        start["encoding"] = encoding

        def locate(end: int) -> int:
            return end if offset == 0 else end - gap_from + offset

        if self.fmt == "json":
            reader = JsonRows(
                stream, report, first_number=first, unknown=unknown, resume=offset > 0, base=offset
            )
            return reader, reader.precise, locate
        rows = read_rows(text_lines_at(stream), self.fmt, report, first_number=first, unknown=unknown)
        return _noting_header(rows, report, start), lambda: None, locate

    def _bytes(
        self, offset: int, gap_from: int, encoding: str | None, body: Any
    ) -> tuple[str, Iterator[bytes]]:
        """The file as UTF-8 without bytes gap_from..offset (what earlier segments read)."""
        if offset == 0:
            chunks = body.iter_chunks(READ_CHUNK) if body is not None else self._get()
            return utf8_stream(chunks, self.fmt, encoding)
        if encoding == "utf-8":
            head = self._get(f"bytes=0-{gap_from - 1}") if gap_from else iter(())
            rest = self._get(f"bytes={offset}-") if offset < self.request.size else iter(())
            return "utf-8", itertools.chain(head, rest)
        # UTF-16/32, recoded as it is read: offsets count UTF-8 bytes, so the file is read from its start.
        encoding, whole = utf8_stream(self._get(), self.fmt, encoding)
        return encoding, _without(whole, gap_from, offset)

    def _get(self, byte_range: str | None = None) -> Iterator[bytes]:
        request = self.request
        pin = {"VersionId": request.version_id} if request.version_id else {"IfMatch": request.etag}
        extra = {"Range": byte_range} if byte_range else {}
        body = self.s3.get_object(Bucket=request.bucket, Key=request.key, **pin, **extra)["Body"]
        try:
            yield from body.iter_chunks(READ_CHUNK)
        finally:
            body.close()

    def _should_stop(self, log: RowLog, saved: dict[str, Any]) -> bool:
        low_on_time = self.target.time_left() < TIME_MARGIN_S
        disk_full = log.bytes > MAX_ROW_LOG_BYTES
        if not (low_on_time or disk_full):
            return False
        if self.target.continuation_queue_url:
            return True
        if low_on_time:
            raise SplitStopped("the splitter ran out of time: split the file into smaller files")
        raise SplitStopped(
            f"the rows' record (rows.jsonl) reached {MAX_ROW_LOG_BYTES:,} bytes, all the splitter's disk "
            "allows: split the file into smaller files"
        )

    @staticmethod
    def _assembly_s(state: dict[str, Any]) -> float:
        return state["log_bytes"] / ASSEMBLE_BYTES_PER_S

    def _state(self, log: RowLog, report: ReadReport, saved: dict[str, Any]) -> dict[str, Any]:
        """The counts after this segment, for the next one (or the end of the split)."""
        named, seen = self.unknown.dump()
        return {
            "queued": saved.get("queued", 0) + log.queued,
            "rejected": saved.get("rejected", 0) + log.rejected,
            "blank_rows": report.blank_rows,
            "notes": report.notes,
            "unknown_named": named,
            "unknown_seen": seen,
            "log_bytes": saved.get("log_bytes", 0) + log.bytes,
            "csv_columns": [report.ignored_columns, report.ignored_column_count],
        }

    def _hand_over(
        self, start: dict[str, Any], log: RowLog, index: IdIndex, state: dict[str, Any], result: SplitResult
    ) -> SplitResult:
        """Save this segment and give the rest of the file to a continuation (see the module's docstring)."""
        self.store.save(self.segment, log.file, index, state)
        log.file.close()
        token = uuid.uuid4().hex
        through = int(start["row"])
        self.target.state.hand_split_over(
            self.job_id, self.owner, to=token, segment=self.segment + 1, start=start, through=through
        )
        message = self.request.model_copy(
            update={"segment": self.segment + 1, "owner": token, "through": through, "attempt": 0}
        )
        try:
            self.sqs.send_message(QueueUrl=self.target.continuation_queue_url, MessageBody=message.body())
        except Exception as exc:
            raise HandOverUnsent(f"the split was handed over but its continuation not sent: {exc}") from exc
        logger.info(
            "split handed over to a continuation",
            extra={
                "job_id": self.job_id,
                "segment": self.segment + 1,
                "row": through,
                "offset": start["offset"],
            },
        )
        result.status = MANIFEST_CONTINUED
        result.queued, result.rejected = state["queued"], state["rejected"]
        result.rows = result.queued + result.rejected
        return result

    def _retry_segment(
        self, exc: Exception, attempt: int, last_row: int, sender: TaskSender, log: RowLog
    ) -> SplitResult | None:
        """After an unexpected failure: a continuation re-runs this segment, told what is surely queued
        (None when the split must end here instead). Nothing of the job queued yet, or a takeover that has
        not caught up with its checkpoint: the split is released and the error raised, for the trigger's retry."""
        through = sender.settle()
        nothing_sent = not self.segment and not self.request.through and not sender.sent
        if nothing_sent or last_row < self.request.through:
            sender.close()
            log.file.close()
            self.lease.through = max(self.lease.through, through)
            self.lease.release()
            raise exc
        handed = self._send_retry(exc, attempt, max(through, self.request.through))
        if handed is not None:
            sender.close()
            log.file.close()
        return handed

    def _send_retry(self, exc: Exception, attempt: int, through: int) -> SplitResult | None:
        """A continuation runs this segment again, told that every row through `through` is queued (None
        when there is no continuation to send, the segment failed too often, or the message failed too)."""
        if not self.target.continuation_queue_url or attempt + 1 > MAX_SEGMENT_RETRIES:
            return None
        message = self.request.model_copy(
            update={"owner": self.owner, "through": through, "attempt": attempt + 1}
        )
        try:
            self.sqs.send_message(QueueUrl=self.target.continuation_queue_url, MessageBody=message.body())
        except Exception:  # noqa: BLE001 - then the split ends here with what it queued
            logger.exception("could not hand the segment over after a failure", extra={"job_id": self.job_id})
            return None
        logger.warning(
            "the split failed: a continuation runs the segment again",
            extra={"job_id": self.job_id, "segment": self.segment, "through": through, "error": str(exc)},
        )
        return SplitResult(
            job_id=self.job_id,
            status=MANIFEST_CONTINUED,
            error={"type": "retried", "message": _clip(str(exc))},
        )

    def _taken_over(self, log: RowLog, sender: TaskSender | None) -> SplitResult:
        if sender is not None:
            sender.close()
        log.file.close()
        logger.warning(
            "the split was taken over by another invocation: it splits the file",
            extra={"job_id": self.job_id},
        )
        return SplitResult(job_id=self.job_id, status=MANIFEST_TAKEN_OVER)

    def _stopped(
        self,
        why: str,
        last_row: int,
        sender: TaskSender,
        log: RowLog,
        report: ReadReport,
        saved: dict[str, Any],
        manifest: dict[str, Any],
        result: SplitResult,
    ) -> SplitResult:
        """A limit (or a file broken past some row): the split ends with the rows read so far."""
        reason = f"the split stopped after row {last_row:,}: {why}; the rows after it were not read"
        try:
            sender.finish()
        except Exception:  # noqa: BLE001
            sender.abandon(f"not queued: {reason}")
        sender.close()
        result.error = {"type": "split_stopped", "message": _clip(reason)}
        return self._finish(log, report, saved, manifest, result)

    def _finish(
        self,
        log: RowLog,
        report: ReadReport,
        saved: dict[str, Any],
        manifest: dict[str, Any],
        result: SplitResult,
    ) -> SplitResult:
        """rows.jsonl, the manifest and the job's counts, written by the splitter that still owns the split."""
        target, job_id = self.target, self.job_id
        try:
            self.lease.progress(self.lease.through)  # still ours? (SplitInProgress if taken over)
            self.store.assemble(self.segment, log.file)
        except SplitInProgress:
            return self._taken_over(log, None)
        except Exception as exc:
            # Every row read is queued or rejected: a continuation ends the split (or Lambda's retry of the
            # event takes it over at once, from its checkpoint).
            handed = self._send_retry(exc, self.attempt, max(self.lease.through, self.last_row))
            if handed is not None:
                return handed
            self.lease.release()
            raise
        finally:
            log.file.close()
        self.store.clean(self.segment)
        result.queued = saved.get("queued", 0) + log.queued
        result.rejected = saved.get("rejected", 0) + log.rejected
        result.rows = result.queued + result.rejected
        if self.fmt != "csv":
            self.unknown.report(report)
        elif not report.ignored_column_count:  # a segment that read no header (only the file's end)
            report.ignored_columns, report.ignored_column_count = saved.get("csv_columns", ([], 0))
        columns = report.columns_warning()
        result.warnings = [
            _clip(w) for w in [*result.warnings, *report.notes, *([columns] if columns else [])]
        ]
        counts = {
            "total": result.rows,
            "queued": result.queued,
            "rejected": result.rejected,
            "format": report.format,
            "blank_rows": report.blank_rows,
            "warnings": result.warnings,
            "error": result.error,
            "split_iso": now_iso(),
            "segments": self.segment + 1,
        }
        manifest.update(status=result.status, **counts)
        put_json(self.s3, target.output_bucket, JobLayout(job_id).manifest_key, manifest)
        if not target.state.split_done(job_id, counts, owner=self.owner):
            logger.warning("the split was ended by another invocation", extra={"job_id": job_id})
            return SplitResult(job_id=job_id, status=MANIFEST_TAKEN_OVER)
        # Every row may already be done (all rejected, or the generators were quick): then finish here.
        target.state.hand_to_finisher(self.sqs, target.finisher_queue_url, [job_id])
        return result


def _noting_header(rows: Iterator[RawRow], report: ReadReport, start: dict[str, Any]) -> Iterator[RawRow]:
    """A CSV's rows, noting where its header ends for the segments after this one."""
    for raw in rows:
        if report.header_end:
            start["header_end"] = report.header_end
        yield raw


def _without(chunks: Iterable[bytes], start: int, end: int) -> Iterator[bytes]:
    """The stream without its bytes start..end."""
    at = 0
    for chunk in chunks:
        lo, hi = at, at + len(chunk)
        at = hi
        if hi <= start or lo >= end:
            yield chunk
            continue
        if lo < start:
            yield chunk[: start - lo]
        if hi > end:
            yield chunk[end - lo :]


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
    raw: RawRow,
    job_id: str,
    index: IdIndex,
    log: RowLog,
    sender: TaskSender,
    target: SplitTarget,
    route: LocalRoute | None = None,
) -> None:
    def reject(row_id: str | None, reason: str, task: ImageTask | None = None) -> None:
        log.write(
            raw.number, row_id, None, STATUS_REJECTED, {"type": "rejected", "message": reason}, task, raw
        )

    try:
        task = to_task(job_id, raw, target.defaults, route)
    except RowRejected as exc:
        reject(row_id_of(raw), str(exc))
        return
    first = index.add(task.row_id, raw.number)
    if first is not None and first != raw.number:
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
