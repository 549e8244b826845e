"""Job and task state in JobsTable: the job record and its counters, who may call the API for a task, the
prediction id it got, each task's outcome, and the flags that stop a job's calls. Every change is a
conditional write, so duplicate deliveries and concurrent invocations agree on one answer.

Layout (pk / sk), spread so that no key is hot at 1,000 images/s on one job:
  JOB#{job}               JOB             the job record (status, totals, budget, source)
  JOB#{job}               STOP#{provider} a provider that stopped the job's calls (balance, quota, keys)
  JOB#{job}#{shard}       TASK#{name}     one task: claim, prediction id, outcome
  JOB#{job}#{shard}       COUNT           that shard's finished tasks and cost (added in the same
                                          transaction that finishes a task: exact under duplicates)
  JOBS                    {created}#{job} the list of jobs, newest last
"""

from __future__ import annotations

import json
import random
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from boto3.dynamodb.conditions import Attr, Key
from botocore.exceptions import BotoCoreError, ClientError

SHARDS = 16
SUBMITTING, RELEASED, RUNNING, REDRIVEN = "submitting", "released", "running", "redriven"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
# Job statuses.
SPLITTING, FINISHING = "splitting", "finishing"
COMPLETED, COMPLETED_WITH_FAILURES = "completed", "completed_with_failures"
JOB_FINAL = (COMPLETED, COMPLETED_WITH_FAILURES, FAILED, CANCELLED)
# ":c1".. ":c4": the final statuses, for conditions written `#s IN (:c1, :c2, :c3, :c4)`.
_FINAL_VALUES = {f":c{i}": status for i, status in enumerate(JOB_FINAL, start=1)}
# Job records are kept as long as the job's files (template parameter JobRetentionDays, 0: forever), so
# `status` and `retry` work for as long as the results are there - and never less than MIN_RECORD_DAYS:
# longer than any job, so state outlives every redelivery (queues keep a message 14 days).
DEFAULT_RETENTION_DAYS = 90
MIN_RECORD_DAYS = 60


class SplitInProgress(Exception):
    """Another invocation is splitting this job right now (the invocation fails, Lambda retries it later)."""


def shard_of(name: str) -> int:
    return zlib.crc32(name.encode("utf-8", "surrogatepass")) % SHARDS


def _job_key(job_id: str) -> dict[str, str]:
    return {"pk": f"JOB#{job_id}", "sk": "JOB"}


def _stop_key(job_id: str, provider: str) -> dict[str, str]:
    return {"pk": f"JOB#{job_id}", "sk": f"STOP#{provider}"}


def _shard_pk(job_id: str, shard: int) -> str:
    return f"JOB#{job_id}#{shard:02d}"


def _task_key(job_id: str, name: str) -> dict[str, str]:
    return {"pk": _shard_pk(job_id, shard_of(name)), "sk": f"TASK#{name}"}


def _count_key(job_id: str, shard: int) -> dict[str, str]:
    return {"pk": _shard_pk(job_id, shard), "sk": "COUNT"}


def _conditional_failed(exc: ClientError) -> bool:
    """The write's condition did not hold (for a transaction: some item's condition) - a final answer."""
    error = exc.response.get("Error", {})
    if error.get("Code") == "ConditionalCheckFailedException":
        return True
    # A transaction reports the failed condition per item.
    reasons = exc.response.get("CancellationReasons") or []
    return error.get("Code") == "TransactionCanceledException" and any(
        (r or {}).get("Code") == "ConditionalCheckFailed" for r in reasons
    )


# Why DynamoDB cancels a transaction that is worth sending again: another transaction touched one of its
# items at the same moment, or throttling. botocore retries neither (a TransactionCanceledException is
# not a throttling error to it), and a cancelled transaction changed nothing, so it is safe to resend.
_RETRIED_REASONS = frozenset({"TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded"})
CONFLICT_TRIES = 10
CONFLICT_BASE_S, CONFLICT_MAX_S = 0.025, 1.0
_sleep: Callable[[float], None] = time.sleep  # replaced in tests


def _conflicted(exc: ClientError) -> bool:
    """A write that lost a race with a transaction (or was throttled inside one) and changed nothing."""
    error = exc.response.get("Error", {})
    if error.get("Code") == "TransactionConflictException":  # a single-item write meeting a transaction
        return True
    reasons = exc.response.get("CancellationReasons") or []
    codes = {(r or {}).get("Code") for r in reasons}
    return (
        error.get("Code") == "TransactionCanceledException"
        and "ConditionalCheckFailed" not in codes
        and bool(codes & _RETRIED_REASONS)
    )


def _write(write: Callable[..., Any], **request: Any) -> dict[str, Any] | None:
    """A conditional write (or transaction): its answer if it was made, None if its condition did not
    hold. A transaction conflict is sent again after a jittered, growing pause (CONFLICT_TRIES in all);
    any other error is raised."""
    for attempt in range(1, CONFLICT_TRIES + 1):
        try:
            answer = write(**request)
        except ClientError as exc:
            if _conditional_failed(exc):
                return None
            if not _conflicted(exc) or attempt == CONFLICT_TRIES:
                raise
            pause = min(CONFLICT_MAX_S, CONFLICT_BASE_S * 2**attempt)
            _sleep(random.uniform(pause / 2, pause))
            continue
        return answer if answer is not None else {}
    raise AssertionError("unreachable")


def _assignments(fields: dict[str, Any]) -> tuple[str, dict[str, str], dict[str, Any]]:
    """`#f0 = :v0, #f1 = :v1 ...` for an update's fields (None left out), with their names and values."""
    fields = _dynamo(fields)
    names = {f"#f{i}": name for i, name in enumerate(fields)}
    values = {f":v{i}": value for i, value in enumerate(fields.values())}
    return ", ".join(f"#f{i} = :v{i}" for i in range(len(fields))), names, values


def _conditionally(write: Callable[..., Any], **request: Any) -> bool:
    """A conditional write: True if it was made, False if its condition did not hold (transaction
    conflicts are retried; any other error is raised)."""
    return _write(write, **request) is not None


def _num(value: float) -> Decimal:
    return Decimal(str(round(value, 6)))


def plain(value: Any) -> Any:
    """A DynamoDB item as plain JSON-able Python (Decimal -> int or float)."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


@dataclass(frozen=True)
class TaskState:
    status: str
    claimed_at: float
    prediction_id: str | None = None
    submitted_at: float | None = None
    answers_lost: int = 0
    reserved: float = 0.0  # the job's budget its claim holds (USD), released when the task finishes

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> TaskState:
        return cls(
            status=str(item["status"]),
            claimed_at=float(item.get("claimed_at", 0)),
            prediction_id=item.get("prediction_id"),
            submitted_at=float(item["submitted_at"]) if item.get("submitted_at") is not None else None,
            answers_lost=int(item.get("answers_lost", 0)),
            reserved=float(item.get("reserved", 0)),
        )


@dataclass(frozen=True)
class Claim:
    """The right to send a task's paid request, held by one delivery: its lost answers so far, and the
    claim's time, which the delivery's later writes name so a duplicate can never make them."""

    answers_lost: int
    claimed_at: float
    reserved: float = 0.0


@dataclass(frozen=True)
class Counts:
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    cost: float = 0.0
    answers_lost: int = 0
    reserved: float = 0.0  # the expected cost of the paid calls in flight (budget reservations)

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.cancelled


class JobState:
    def __init__(
        self,
        table: Any,
        clock: Callable[[], float] = time.time,
        *,
        retention_days: int = DEFAULT_RETENTION_DAYS,
    ) -> None:
        self._table, self._clock = table, clock
        self._client = table.meta.client
        self._keep_s = max(retention_days, MIN_RECORD_DAYS) * 24 * 3600 if retention_days else None

    def _ttl(self) -> int | None:
        """When a record written now expires (DynamoDB TTL on expires_at). None when the job's files are
        kept forever: stored as NULL, which TTL never expires (it only reads numbers)."""
        return None if self._keep_s is None else int(self._clock()) + self._keep_s

    def _now(self) -> Decimal:
        return Decimal(str(round(self._clock(), 3)))

    # ------------------------------------------------------------------ the job record

    def create_job(self, job_id: str, fields: dict[str, Any], *, owner: str, lease_s: float) -> int | None:
        """Take the job's split. A new job: its record (status splitting), returns 0. A split whose
        splitter is gone (no progress for lease_s - a crash, a timeout): taken over, returns the last row
        it had queued, so no row is queued twice. None when the job exists already and is split - a second
        delivery of the same upload. SplitInProgress while another splitter is live on it."""
        now = self._now()
        item = {**_job_key(job_id), **_dynamo(fields), "job_id": job_id, "status": SPLITTING}
        item.update(
            created_at=now, split_owner=owner, split_heartbeat=now, split_through=0, expires_at=self._ttl()
        )
        try:
            self._table.put_item(Item=item, ConditionExpression="attribute_not_exists(pk)")
        except ClientError as exc:
            if not _conditional_failed(exc):
                raise
        else:
            self._table.put_item(
                Item={
                    "pk": "JOBS",
                    "sk": f"{fields.get('created_iso', '')}#{job_id}",
                    "job_id": job_id,
                    "expires_at": self._ttl(),
                }
            )
            return 0
        job = self.job(job_id) or {}
        if job.get("status") != SPLITTING:
            return None
        if float(job.get("split_heartbeat", 0)) >= float(now) - lease_s:
            raise SplitInProgress(f"job {job_id} is being split by another invocation")
        if not _conditionally(
            self._table.update_item,
            Key=_job_key(job_id),
            UpdateExpression="SET split_owner = :me, split_heartbeat = :now",
            ConditionExpression="#s = :splitting AND split_heartbeat = :seen",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={
                ":me": owner,
                ":now": now,
                ":splitting": SPLITTING,
                ":seen": _num(float(job.get("split_heartbeat", 0))),
            },
        ):
            raise SplitInProgress(f"job {job_id} was taken over by another invocation")
        return int(job.get("split_through", 0))

    def split_progress(self, job_id: str, owner: str, through_row: int, *, release: bool = False) -> None:
        """Every row up to through_row is on the queue, and this splitter is alive (its heartbeat, renewed
        on time by the splitter, not only when rows are queued). `release`: this splitter gives the split up
        (its heartbeat set to 0) so Lambda's retry takes it over at once. SplitInProgress when the split is
        no longer this splitter's (taken over, or already done)."""
        if not _conditionally(
            self._table.update_item,
            Key=_job_key(job_id),
            UpdateExpression="SET split_through = :row, split_heartbeat = :now",
            ConditionExpression="#s = :splitting AND split_owner = :me",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={
                ":row": through_row,
                ":now": Decimal(0) if release else self._now(),
                ":me": owner,
                ":splitting": SPLITTING,
            },
        ):
            raise SplitInProgress(f"job {job_id} was taken over by another invocation")

    def hand_split_over(
        self, job_id: str, owner: str, *, to: str, segment: int, start: dict[str, Any], through: int
    ) -> None:
        """This splitter stops here and hands the split to a continuation (imagepipe.splitter): the split
        is `to`'s from now, at `segment`, which starts at `start` (offset, row ...) with every row through
        `through` queued. SplitInProgress when the split is no longer this splitter's."""
        if not _conditionally(
            self._table.update_item,
            Key=_job_key(job_id),
            UpdateExpression="SET split_owner = :to, split_heartbeat = :now, split_through = :row, "
            "split_segment = :segment, split_start = :start",
            ConditionExpression="#s = :splitting AND split_owner = :me",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={
                ":to": to,
                ":now": self._now(),
                ":row": through,
                ":segment": segment,
                ":start": _dynamo(start),
                ":me": owner,
                ":splitting": SPLITTING,
            },
        ):
            raise SplitInProgress(f"job {job_id} was taken over by another invocation")

    def continue_split(
        self, job_id: str, *, handed_to: str, segment: int, through: int, owner: str, lease_s: float
    ) -> dict[str, Any] | None:
        """A continuation takes the split: the job's record once it is `owner`'s, or None (the split is
        done, or another splitter is live on it: nothing to do). Taken when it was handed to `handed_to`
        at `segment` - split_through raised to `through`, what the hand-over knew was queued - or, like
        create_job, when its splitter is gone (no heartbeat for lease_s)."""
        now = self._now()
        same_segment = "split_segment = :segment" + (
            " OR attribute_not_exists(split_segment)" if segment == 0 else ""
        )
        answer = _write(
            self._table.update_item,
            Key=_job_key(job_id),
            UpdateExpression="SET split_owner = :me, split_heartbeat = :now, split_through = :through",
            ConditionExpression=f"#s = :splitting AND split_owner = :handed AND ({same_segment}) "
            "AND split_through <= :through",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={
                ":me": owner,
                ":now": now,
                ":through": through,
                ":handed": handed_to,
                ":segment": segment,
                ":splitting": SPLITTING,
            },
            ReturnValues="ALL_NEW",
        )
        if answer is not None:
            return plain(answer["Attributes"])
        job = self.job(job_id)
        if job is None or job.get("status") != SPLITTING:
            return None
        seen = float(job.get("split_heartbeat", 0))
        if seen >= float(now) - lease_s or not _conditionally(
            self._table.update_item,
            Key=_job_key(job_id),
            UpdateExpression="SET split_owner = :me, split_heartbeat = :now",
            ConditionExpression="#s = :splitting AND split_heartbeat = :seen",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={
                ":me": owner,
                ":now": now,
                ":splitting": SPLITTING,
                ":seen": _num(seen),
            },
        ):
            return None
        return {**job, "split_owner": owner}

    def split_done(self, job_id: str, fields: dict[str, Any], *, owner: str) -> bool:
        """The file is split: how many rows, how many queued and rejected (a file that could not be read
        at all has an error and no rows: the finisher then ends the job failed). Only by the splitter that
        owns the split, while the job is splitting: False (nothing written) for a splitter whose split was
        taken over, or a second finish of a job already split - which never sets it back to running."""
        sets, names, values = _assignments(fields)
        return _conditionally(
            self._table.update_item,
            Key=_job_key(job_id),
            UpdateExpression="SET #s = :status, split_at = :now, " + sets,
            ConditionExpression="#s = :splitting AND split_owner = :me",
            ExpressionAttributeNames={**names, "#s": "status"},
            ExpressionAttributeValues={
                **values,
                ":status": RUNNING,
                ":now": self._now(),
                ":splitting": SPLITTING,
                ":me": owner,
            },
        )

    def job(self, job_id: str) -> dict[str, Any] | None:
        item = self._table.get_item(Key=_job_key(job_id), ConsistentRead=True).get("Item")
        return plain(item) if item else None

    def counts(self, job_id: str) -> Counts:
        """The job's finished tasks and cost so far: the sum of its shard counters (one batch read)."""
        return _counts(self._read([_count_key(job_id, shard) for shard in range(SHARDS)]).values())

    def job_and_counts(self, job_id: str) -> tuple[dict[str, Any] | None, Counts]:
        """The job record and its counts in one request (read side by side: neither before the other)."""
        items = self._read([_job_key(job_id), *(_count_key(job_id, shard) for shard in range(SHARDS))])
        job = items.pop(_pair(_job_key(job_id)), None)
        return (plain(job) if job else None), _counts(items.values())

    def job_and_stop(self, job_id: str, provider: str) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
        """The job record and the provider's stop for the job (see provider_stop), in one request."""
        items = self._read([_job_key(job_id), _stop_key(job_id, provider)])
        job, stop = items.get(_pair(_job_key(job_id))), items.get(_pair(_stop_key(job_id, provider)))
        return (plain(job) if job else None), (_stop_of(stop) if stop else None)

    def _read(self, keys: list[dict[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
        """The items at `keys` that exist, by (pk, sk): strongly consistent, one BatchGetItem (another
        only for keys DynamoDB left unprocessed). The resource's client speaks plain Python values."""
        found: dict[tuple[str, str], dict[str, Any]] = {}
        request = {self._table.name: {"Keys": keys, "ConsistentRead": True}}
        while request:
            answer = self._client.batch_get_item(RequestItems=request)
            for item in answer.get("Responses", {}).get(self._table.name, []):
                found[(item["pk"], item["sk"])] = item
            request = answer.get("UnprocessedKeys") or {}
        return found

    def request_cancel(self, job_id: str) -> bool:
        """Ask the job to stop: no more paid calls; its rows not yet made end cancelled."""
        return _conditionally(
            self._table.update_item,
            Key=_job_key(job_id),
            UpdateExpression="SET cancel_requested = :true, cancel_requested_at = :now",
            ConditionExpression="attribute_exists(pk) AND NOT #s IN (:c1, :c2, :c3, :c4)",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={
                ":true": True,
                ":now": self._now(),
                **_FINAL_VALUES,
            },
        )

    def recent_jobs(self, limit: int = 20) -> list[str]:
        answer = self._table.query(
            KeyConditionExpression=Key("pk").eq("JOBS"), ScanIndexForward=False, Limit=limit
        )
        return [item["job_id"] for item in answer.get("Items", [])]

    def hand_to_finisher(self, sqs: Any, finisher_queue_url: str, job_ids: Iterable[str]) -> list[str]:
        """Each job whose last row is done goes to the finisher; returns the jobs handed over. Callable from
        anyone who may have finished a job's last row (generator, dead-letter recorder, splitter, sweeper):
        one caller wins `start_finishing`, then sends. The hand-off is recoverable: a send that fails, or
        an invocation that dies between the two, leaves the job `finishing` without `finish_sent_at`, and
        the sweeper sends it again (a second message is harmless: the finisher's writes are conditional)."""
        handed = []
        for job_id in sorted(set(job_ids)):
            if self.start_finishing(job_id) and self.send_finish(sqs, finisher_queue_url, job_id):
                handed.append(job_id)
        return handed

    def start_finishing(self, job_id: str) -> bool:
        """True for the one caller that sees the job's last row finish (running -> finishing). A redrive
        that reopened rows after the counts were read makes the write fail (the job's `redrives` moved).
        One request for a job that is not done (the common case: every batch asks), two for one that is."""
        job, counts = self.job_and_counts(job_id)
        if not job or job.get("status") != RUNNING or counts.finished < int(job.get("queued", 0)):
            return False
        # Those counts were read beside the record, maybe before it: read them again, after it, so that a
        # redrive the record missed shows in them (one it saw moved `redrives`: the write below fails).
        if self.counts(job_id).finished < int(job.get("queued", 0)):
            return False
        return _conditionally(
            self._table.update_item,
            Key=_job_key(job_id),
            UpdateExpression="SET #s = :finishing, finishing_at = :now "
            "REMOVE finish_sent_at, finish_sends, stuck_seen_at",
            ConditionExpression="#s = :running AND (attribute_not_exists(redrives) OR redrives = :redrives)",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={
                ":finishing": FINISHING,
                ":running": RUNNING,
                ":now": self._now(),
                ":redrives": int(job.get("redrives") or 0),
            },
        )

    def send_finish(self, sqs: Any, finisher_queue_url: str, job_id: str) -> bool:
        """The finisher's message for a job that is finishing (or owes its completion event), then the
        send on record (`finish_sent_at`, `finish_sends`). False when the send failed: the job stays as it
        is and the sweeper sends it again; never raised, so a batch that finished a job is not retried."""
        try:
            sqs.send_message(QueueUrl=finisher_queue_url, MessageBody=json.dumps({"job_id": job_id}))
        except (ClientError, BotoCoreError) as exc:
            from imagepipe.observability import logger  # not at import: Powertools reads its settings then

            logger.warning(
                "could not hand the job to the finisher: the sweeper will",
                extra={"job_id": job_id, "error": str(exc)},
            )
            return False
        try:
            _conditionally(
                self._table.update_item,
                Key=_job_key(job_id),
                UpdateExpression="SET finish_sent_at = :now ADD finish_sends :one",
                ConditionExpression="attribute_exists(pk)",
                ExpressionAttributeValues={":now": self._now(), ":one": 1},
            )
        except (ClientError, BotoCoreError) as exc:  # sent all the same: at worst the sweeper sends it twice
            from imagepipe.observability import logger

            logger.warning("finisher message sent but not noted", extra={"job_id": job_id, "error": str(exc)})
        return True

    def complete(self, job_id: str, status: str, fields: dict[str, Any]) -> bool:
        """finishing -> the final status, once; the completion event is then owed (event_pending)."""
        sets, names, values = _assignments({**fields, "event_pending": True, "completed_at": self._clock()})
        return _conditionally(
            self._table.update_item,
            Key=_job_key(job_id),
            UpdateExpression="SET #s = :status, " + sets,
            ConditionExpression="#s = :finishing",
            ExpressionAttributeNames={**names, "#s": "status"},
            ExpressionAttributeValues={**values, ":status": status, ":finishing": FINISHING},
        )

    def event_sent(self, job_id: str) -> None:
        self._table.update_item(Key=_job_key(job_id), UpdateExpression="REMOVE event_pending")

    def stop_provider(self, job_id: str, provider: str, error: dict[str, str]) -> None:
        """No more calls to `provider` for this job (its balance ran out, its keys are refused...)."""
        self._table.put_item(
            Item={
                **_stop_key(job_id, provider),
                "error_type": error["type"],
                "message": error["message"],
                "stopped_at": self._now(),
                "expires_at": self._ttl(),
            }
        )

    def provider_stop(self, job_id: str, provider: str) -> dict[str, str] | None:
        item = self._table.get_item(Key=_stop_key(job_id, provider), ConsistentRead=True).get("Item")
        return _stop_of(item) if item else None

    # ------------------------------------------------------------------ tasks

    def task(self, job_id: str, name: str) -> TaskState | None:
        item = self._table.get_item(Key=_task_key(job_id, name), ConsistentRead=True).get("Item")
        return TaskState.from_item(item) if item else None

    def claim(
        self,
        job_id: str,
        name: str,
        provider: str,
        *,
        stale: TaskState | None = None,
        reserve: float = 0.0,
    ) -> Claim | None:
        """Take the right to send this task's paid request; only one caller gets it. Free to take: no
        record yet, or one whose last request was answered without being accepted (released). `stale`
        retakes a claim whose holder is gone (it sent a request and never recorded the answer): that
        possible second charge is counted on the record. `reserve` (USD, the call's expected cost) is
        added to the job's budget reservations before the claim and taken back if it is refused; the task
        keeps it until it finishes (a crash between the two leaves a reservation: the budget errs on the
        safe side). Returns the claim, or None when it was refused."""
        now = self._now()
        values: dict[str, Any] = {
            ":submitting": SUBMITTING,
            ":released": RELEASED,
            ":redriven": REDRIVEN,
            ":now": now,
            ":provider": provider,
            ":ttl": self._ttl(),
            ":reserved": _num(reserve),
        }
        update = (
            "SET #s = :submitting, claimed_at = :now, provider = :provider, expires_at = :ttl, "
            "reserved = :reserved"
        )
        condition = "attribute_not_exists(pk) OR #s IN (:released, :redriven)"
        if stale is not None:
            condition += " OR (#s = :submitting AND claimed_at = :claimed)"
            values[":claimed"] = Decimal(str(round(stale.claimed_at, 3)))
            update += " ADD answers_lost :one"
            values[":one"] = 1
        # A released or redriven task holds no reservation; a stale claim's is taken over.
        change = reserve - (stale.reserved if stale is not None else 0.0)
        if change:
            self._reserve(job_id, name, change)
        answer = _write(
            self._table.update_item,
            Key=_task_key(job_id, name),
            UpdateExpression=update,
            ConditionExpression=condition,
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues=values,
            ReturnValues="ALL_NEW",
        )
        if answer is None:
            if change:
                self._reserve(job_id, name, -change)
            return None
        return Claim(int(answer.get("Attributes", {}).get("answers_lost", 0)), float(now), reserve)

    def _reserve(self, job_id: str, name: str, amount: float) -> None:
        """Add `amount` (USD, negative to give back) to the budget reserved on the task's shard counter."""
        _write(
            self._table.update_item,
            Key=_count_key(job_id, shard_of(name)),
            UpdateExpression="ADD reserved :amount SET expires_at = :ttl",
            ExpressionAttributeValues={":amount": _num(amount), ":ttl": self._ttl()},
        )

    def release(
        self,
        job_id: str,
        name: str,
        *,
        answer_lost: bool = False,
        claimed_at: float | None = None,
        reserved: float = 0.0,
    ) -> bool:
        """The request was answered without being accepted - or, for a synchronous API whose answer was
        lost, will be sent again (counted): the next attempt may claim the task again. Only the claim's
        holder (`claimed_at`) may release it; its reservation goes back to the job's budget in the same
        transaction. False when the claim was no longer this holder's."""
        update = "SET #s = :released REMOVE reserved" + (" ADD answers_lost :one" if answer_lost else "")
        values: dict[str, Any] = {":released": RELEASED, ":submitting": SUBMITTING}
        condition = "#s = :submitting"
        if answer_lost:
            values[":one"] = 1
        if claimed_at is not None:
            condition += " AND claimed_at = :claimed"
            values[":claimed"] = Decimal(str(round(claimed_at, 3)))
        task_update = {
            "Key": _task_key(job_id, name),
            "UpdateExpression": update,
            "ConditionExpression": condition,
            "ExpressionAttributeNames": {"#s": "status"},
            "ExpressionAttributeValues": values,
        }
        if not reserved:
            return _conditionally(self._table.update_item, **task_update)
        return _conditionally(
            self._client.transact_write_items,
            TransactItems=[
                {"Update": {"TableName": self._table.name, **task_update}},
                {
                    "Update": {
                        "TableName": self._table.name,
                        "Key": _count_key(job_id, shard_of(name)),
                        "UpdateExpression": "ADD reserved :minus",
                        "ExpressionAttributeValues": {":minus": _num(-reserved)},
                    }
                },
            ],
        )

    def record_prediction(
        self, job_id: str, name: str, prediction_id: str, submitted_at: float, *, claimed_at: float
    ) -> bool:
        """Kept before anyone waits on the prediction: a redelivered task resumes it instead of
        submitting. Only by the claim's holder, and only while the task is still being submitted (never
        over a finished task, which would count it twice). False when it could not be kept."""
        return _conditionally(
            self._table.update_item,
            Key=_task_key(job_id, name),
            UpdateExpression="SET #s = :running, prediction_id = :id, submitted_at = :at",
            ConditionExpression="#s = :submitting AND claimed_at = :claimed",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={
                ":running": RUNNING,
                ":submitting": SUBMITTING,
                ":id": prediction_id,
                ":at": _num(submitted_at),
                ":claimed": Decimal(str(round(claimed_at, 3))),
            },
        )

    def finish(
        self,
        job_id: str,
        name: str,
        status: str,
        outcome: dict[str, Any],
        *,
        reserved: float | None = None,
        claimed_at: float | None = None,
    ) -> bool:
        """Record the task's outcome and count it in its shard, in one transaction: True for the one
        caller that did it; a duplicate delivery gets False and changes nothing. The task's budget
        reservation goes back in the same transaction: `reserved` is what the caller knows it to be
        (None: read from the task). With `claimed_at`, only the holder of that claim may finish it (an
        outcome decided without a paid call - cancelled, stopped - never lands over another delivery's
        call)."""
        task_key, shard = _task_key(job_id, name), shard_of(name)
        sets, names, values = _assignments({**outcome, "status": status, "finished_at": self._clock()})
        values.update({":done1": SUCCEEDED, ":done2": FAILED, ":done3": CANCELLED, ":ttl": self._ttl()})
        names["#s"] = "status"
        update = "SET " + sets + ", expires_at = :ttl REMOVE reserved"
        condition = "(attribute_not_exists(#s) OR NOT #s IN (:done1, :done2, :done3))"
        if claimed_at is not None:
            condition = "#s = :submitting AND claimed_at = :claimed"
            values.update({":submitting": SUBMITTING, ":claimed": Decimal(str(round(claimed_at, 3)))})
        counter_update = "ADD #n :one, cost :cost, answers_lost :lost"
        counter = {
            ":one": 1,
            ":cost": _num(float(outcome.get("cost") or 0.0)),
            ":lost": int(outcome.get("answers_lost") or 0),
            ":ttl": self._ttl(),
        }
        for _ in range(3):
            if reserved is None:
                state = self.task(job_id, name)
                if state is not None and (
                    state.status in FINISHED
                    or (claimed_at is not None and abs(state.claimed_at - claimed_at) > 0.0005)
                ):
                    return False
                reserved = state.reserved if state is not None else 0.0
            if reserved:
                matches = " AND reserved = :reserved"
                values[":reserved"] = _num(reserved)
                values.pop(":zero", None)
                counter[":minus"] = _num(-reserved)
            else:
                matches = " AND (attribute_not_exists(reserved) OR reserved = :zero)"
                values.pop(":reserved", None)
                values[":zero"] = 0
                counter.pop(":minus", None)
            if _conditionally(
                self._client.transact_write_items,
                TransactItems=[
                    {
                        "Update": {
                            "TableName": self._table.name,
                            "Key": task_key,
                            "UpdateExpression": update,
                            "ConditionExpression": condition + matches,
                            "ExpressionAttributeNames": names,
                            "ExpressionAttributeValues": values,
                        }
                    },
                    {
                        "Update": {
                            "TableName": self._table.name,
                            "Key": _count_key(job_id, shard),
                            "UpdateExpression": counter_update
                            + (", reserved :minus" if reserved else "")
                            + " SET expires_at = :ttl",
                            "ExpressionAttributeNames": {"#n": status},
                            "ExpressionAttributeValues": counter,
                        }
                    },
                ],
            ):
                return True
            reserved = None  # finished by another, or its reservation is not what the caller knew: look
        return False

    def note_error(self, job_id: str, name: str, error: dict[str, str]) -> None:
        """The last retryable failure, kept so a task that then dies in the dead-letter queue says why."""
        _conditionally(
            self._table.update_item,
            Key=_task_key(job_id, name),
            UpdateExpression="SET last_error = :error",
            ConditionExpression="attribute_exists(pk)",  # never a record without a status
            ExpressionAttributeValues={":error": error},
        )

    def last_error(self, job_id: str, name: str) -> dict[str, str] | None:
        item = self._table.get_item(Key=_task_key(job_id, name), ConsistentRead=True).get("Item") or {}
        return plain(item.get("last_error")) if item.get("last_error") else None

    def keep_dead_letter(self, job_id: str, name: str, body: str) -> None:
        """The task's message, kept with its failed record, so `redrive` can send it again."""
        _conditionally(
            self._table.update_item,
            Key=_task_key(job_id, name),
            UpdateExpression="SET dead_letter = :body",
            ConditionExpression="attribute_exists(pk)",
            ExpressionAttributeValues={":body": body},
        )

    def dead_letters(self, job_id: str) -> list[tuple[str, str]]:
        """(name, message) of the job's failed tasks whose message ended in the dead-letter queue."""
        return [
            (str(t["sk"]).removeprefix("TASK#"), str(t["dead_letter"]))
            for t in self._tasks(job_id, Attr("dead_letter").exists())
            if t.get("status") == FAILED
        ]

    def redrive(self, job_id: str, name: str, body: str) -> bool:
        """A failed task goes back to work, in one transaction: uncounted as failed, its job reopened (a
        final job is running again, so it finishes - and is announced - anew), and the task claimable
        again - or, when it has a prediction on record, `running` with it, so it is resumed and never
        submitted twice. `body` is the message that will be sent (kept as `redrive_body` until
        `redrive_sent`): the reopen is on record before any row is sent. True for the one caller that did
        it; False when the task is not failed any more. JobFinishing while the finisher is writing the
        job's results (try again once it is finished)."""
        task = self.task(job_id, name)
        if task is None or task.status != FAILED:
            return False
        for _ in range(5):
            job = self.job(job_id)
            if job is None:
                return False
            if job["status"] == FINISHING:
                raise JobFinishing(f"job {job_id} is finishing: redrive it once it is finished")
            if job["status"] in JOB_FINAL:
                # reopened with its first redriven row: what the last finish left is cleared
                job_update = (
                    "SET #s = :running, reopened_at = :now ADD redrives :one "
                    "REMOVE event_pending, stuck_seen_at, finish_sent_at, finish_sends"
                )
                job_condition = "#s IN (:c1, :c2, :c3, :c4)"
                job_values: dict[str, Any] = {
                    ":running": RUNNING,
                    ":now": self._now(),
                    ":one": 1,
                    **_FINAL_VALUES,
                }
            else:  # splitting or running: it will finish when this row does
                job_update, job_condition = "ADD redrives :one", "#s = :seen"
                job_values = {":one": 1, ":seen": job["status"]}
            made = _conditionally(
                self._client.transact_write_items,
                TransactItems=[
                    {
                        "Update": {
                            "TableName": self._table.name,
                            "Key": _task_key(job_id, name),
                            "UpdateExpression": "SET #s = :again, redrive_body = :body "
                            "REMOVE dead_letter, #e, finished_at",
                            "ConditionExpression": "#s = :failed",
                            "ExpressionAttributeNames": {"#s": "status", "#e": "error"},
                            "ExpressionAttributeValues": {
                                ":again": RUNNING if task.prediction_id else REDRIVEN,
                                ":failed": FAILED,
                                ":body": body,
                            },
                        }
                    },
                    {
                        "Update": {
                            "TableName": self._table.name,
                            "Key": _count_key(job_id, shard_of(name)),
                            "UpdateExpression": "ADD failed :minus",
                            "ExpressionAttributeValues": {":minus": -1},
                        }
                    },
                    {
                        "Update": {
                            "TableName": self._table.name,
                            "Key": _job_key(job_id),
                            "UpdateExpression": job_update,
                            "ConditionExpression": job_condition,
                            "ExpressionAttributeNames": {"#s": "status"},
                            "ExpressionAttributeValues": job_values,
                        }
                    },
                ],
            )
            if made:
                return True
            if (self.task(job_id, name) or task).status != FAILED:
                return False  # another redrive took it
            # the job moved on between the read and the write: read it again
        raise JobFinishing(f"job {job_id} keeps changing state: redrive it again in a moment")

    def redrive_sent(self, job_id: str, name: str) -> None:
        """The redriven task's message is on the queue."""
        _conditionally(
            self._table.update_item,
            Key=_task_key(job_id, name),
            UpdateExpression="REMOVE redrive_body",
            ConditionExpression="attribute_exists(pk)",
        )

    def unsent_redrives(self, job_id: str) -> list[tuple[str, str]]:
        """(name, message) of redriven tasks whose message may never have been sent (a redrive that
        stopped between its transaction and its send): sending it again is harmless, the claim or the
        prediction on record keeps a row from being paid twice."""
        return [
            (str(t["sk"]).removeprefix("TASK#"), str(t["redrive_body"]))
            for t in self._tasks(job_id, Attr("redrive_body").exists())
            if t.get("status") not in FINISHED
        ]

    def reopen(self, job_id: str) -> bool:
        """A finished job gets work again: running, so it finishes - and is announced - anew. (`redrive`
        reopens the job in the transaction that takes its first row back.)"""
        return _conditionally(
            self._table.update_item,
            Key=_job_key(job_id),
            UpdateExpression="SET #s = :running, reopened_at = :now ADD redrives :one "
            "REMOVE event_pending, stuck_seen_at, finish_sent_at, finish_sends",
            ConditionExpression="#s IN (:c1, :c2, :c3, :c4)",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={
                ":running": RUNNING,
                ":now": self._now(),
                ":one": 1,
                **_FINAL_VALUES,
            },
        )

    def outcomes(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Every finished task of the job (the shards read side by side), as plain dicts. Strongly
        consistent: an outcome written just before is always seen (an eventually consistent read could
        miss the last rows and a final result would call them lost)."""
        return iter(t for t in self._tasks(job_id) if t.get("status") in FINISHED)

    def _tasks(self, job_id: str, where: Any = None) -> list[dict[str, Any]]:
        """The job's task records (those matching `where`, a filter condition), consistent reads of its
        shards side by side through the thread-safe client (a boto3 Table is not thread-safe)."""

        def shard_items(shard: int) -> list[dict[str, Any]]:
            items: list[dict[str, Any]] = []
            query: dict[str, Any] = {
                "TableName": self._table.name,
                "KeyConditionExpression": Key("pk").eq(_shard_pk(job_id, shard))
                & Key("sk").begins_with("TASK#"),
                "ConsistentRead": True,
            }
            if where is not None:
                query["FilterExpression"] = where
            while True:
                answer = self._client.query(**query)
                items.extend(plain(i) for i in answer.get("Items", []))
                if "LastEvaluatedKey" not in answer:
                    return items
                query["ExclusiveStartKey"] = answer["LastEvaluatedKey"]

        with ThreadPoolExecutor(max_workers=8) as pool:
            return [item for items in pool.map(shard_items, range(SHARDS)) for item in items]

    # ------------------------------------------------------------------ the sweeper

    def sweep_cursor(self) -> str:
        """The JOBS sort key up to which every job is known to be over (final, its event sent)."""
        item = self._table.get_item(Key=_SWEEP_KEY, ConsistentRead=True).get("Item") or {}
        return str(item.get("after") or "")

    def set_sweep_cursor(self, after: str) -> None:
        self._table.put_item(Item={**_SWEEP_KEY, "after": after, "swept_at": self._now()})

    def jobs_after(self, after: str) -> Iterator[tuple[str, str]]:
        """(JOBS sort key, job id) of every job listed after `after`, oldest first."""
        condition = Key("pk").eq("JOBS") & Key("sk").gt(after) if after else Key("pk").eq("JOBS")
        query: dict[str, Any] = {"KeyConditionExpression": condition, "ProjectionExpression": "sk, job_id"}
        while True:
            answer = self._table.query(**query)
            for item in answer.get("Items", []):
                yield str(item["sk"]), str(item["job_id"])
            if "LastEvaluatedKey" not in answer:
                return
            query["ExclusiveStartKey"] = answer["LastEvaluatedKey"]

    def jobs(self, job_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Many job records at once (consistent; 100 a request), by job id; missing ones left out."""
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(job_ids), 100):
            keys = [_job_key(j) for j in dict.fromkeys(job_ids[start : start + 100])]
            request: dict[str, Any] = {self._table.name: {"Keys": keys, "ConsistentRead": True}}
            while request:
                answer = self._client.batch_get_item(RequestItems=request)
                for item in answer.get("Responses", {}).get(self._table.name, []):
                    found[str(item["job_id"])] = plain(item)
                request = answer.get("UnprocessedKeys") or {}
        return found

    def note_stuck_seen(self, job_id: str) -> bool:
        """The sweeper saw this running job with every row done: noted, so that the next sweep knows how
        long it has stayed so (a batch that finished its last row hands it off when the batch ends)."""
        return _conditionally(
            self._table.update_item,
            Key=_job_key(job_id),
            UpdateExpression="SET stuck_seen_at = :now",
            ConditionExpression="#s = :running AND attribute_not_exists(stuck_seen_at)",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={":running": RUNNING, ":now": self._now()},
        )


_SWEEP_KEY = {"pk": "SWEEP", "sk": "CURSOR"}


def _pair(key: dict[str, str]) -> tuple[str, str]:
    return key["pk"], key["sk"]


def _stop_of(item: dict[str, Any]) -> dict[str, str]:
    return {"type": str(item["error_type"]), "message": str(item["message"])}


def _counts(items: Iterable[dict[str, Any]]) -> Counts:
    """The sum of a job's shard counters."""
    total = {"succeeded": 0, "failed": 0, "cancelled": 0, "cost": 0.0, "answers_lost": 0, "reserved": 0.0}
    for item in items:
        for name in total:
            value = item.get(name, 0)
            total[name] += float(value) if name in ("cost", "reserved") else int(value)
    total["reserved"] = max(0.0, round(total["reserved"], 6))
    return Counts(**total)


class JobFinishing(Exception):
    """The job's results are being written right now: a redrive must wait until it is finished."""


def _dynamo(fields: dict[str, Any]) -> dict[str, Any]:
    """Values DynamoDB takes: floats as Decimal, None left out."""

    def convert(value: Any) -> Any:
        if isinstance(value, bool):
            return value
        if isinstance(value, float):
            return _num(value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items() if v is not None}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return {k: convert(v) for k, v in fields.items() if v is not None}
