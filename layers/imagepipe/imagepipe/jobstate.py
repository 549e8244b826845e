"""Task and job state in JobsTable: who is calling the API for a task, the prediction id it got, whether
the task is finished, and the per-job flags that stop calls to a provider. Written with conditional
writes, so duplicate deliveries and concurrent invocations agree on one answer."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from botocore.exceptions import ClientError

SUBMITTING, RELEASED, RUNNING = "submitting", "released", "running"
SUCCEEDED, FAILED = "succeeded", "failed"
FINISHED = (SUCCEEDED, FAILED)
RECORD_TTL_S = 60 * 24 * 3600  # longer than any job: state outlives every redelivery


@dataclass(frozen=True)
class TaskState:
    status: str
    claimed_at: float
    prediction_id: str | None = None
    submitted_at: float | None = None
    answers_lost: int = 0

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> TaskState:
        return cls(
            status=str(item["status"]),
            claimed_at=float(item.get("claimed_at", 0)),
            prediction_id=item.get("prediction_id"),
            submitted_at=float(item["submitted_at"]) if item.get("submitted_at") is not None else None,
            answers_lost=int(item.get("answers_lost", 0)),
        )


def _task_key(job_id: str, name: str) -> dict[str, str]:
    # One partition key per task: a busy job spreads over many partitions instead of one hot key.
    return {"pk": f"TASK#{job_id}#{name}", "sk": "STATE"}


def _stop_key(job_id: str, provider: str) -> dict[str, str]:
    return {"pk": f"JOB#{job_id}", "sk": f"STOP#{provider}"}


def _conditional_failed(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


class JobState:
    def __init__(self, table: Any, clock: Callable[[], float] = time.time) -> None:
        self._table, self._clock = table, clock

    def _ttl(self) -> int:
        return int(self._clock()) + RECORD_TTL_S

    def task(self, job_id: str, name: str) -> TaskState | None:
        item = self._table.get_item(Key=_task_key(job_id, name), ConsistentRead=True).get("Item")
        return TaskState.from_item(item) if item else None

    def claim(self, job_id: str, name: str, provider: str, *, stale: TaskState | None = None) -> bool:
        """Take the right to send this task's paid request; only one caller gets it. Free to take: no
        record yet, or one whose last request was answered without being accepted (released). `stale`
        retakes a claim whose holder is gone (it sent a request and never recorded the answer): that
        possible second charge is counted on the record."""
        names = {"#s": "status"}
        values: dict[str, Any] = {
            ":submitting": SUBMITTING,
            ":released": RELEASED,
            ":now": Decimal(str(round(self._clock(), 3))),
            ":provider": provider,
            ":ttl": self._ttl(),
        }
        update = "SET #s = :submitting, claimed_at = :now, provider = :provider, expires_at = :ttl"
        condition = "attribute_not_exists(pk) OR #s = :released"
        if stale is not None:
            condition += " OR (#s = :submitting AND claimed_at = :claimed)"
            values[":claimed"] = Decimal(str(round(stale.claimed_at, 3)))
            update += " ADD answers_lost :one"
            values[":one"] = 1
        try:
            self._table.update_item(
                Key=_task_key(job_id, name),
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True

    def release(self, job_id: str, name: str, *, answer_lost: bool = False) -> None:
        """The request was answered without being accepted - or, for a synchronous API whose answer was
        lost, will be sent again (counted): the next attempt may claim the task again."""
        update = "SET #s = :released" + (" ADD answers_lost :one" if answer_lost else "")
        values: dict[str, Any] = {":released": RELEASED, ":submitting": SUBMITTING}
        if answer_lost:
            values[":one"] = 1
        try:
            self._table.update_item(
                Key=_task_key(job_id, name),
                UpdateExpression=update,
                ConditionExpression="#s = :submitting",
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if not _conditional_failed(exc):
                raise

    def record_prediction(self, job_id: str, name: str, prediction_id: str, submitted_at: float) -> None:
        """Kept before anyone waits on the prediction: a redelivered task resumes it instead of submitting."""
        self._table.update_item(
            Key=_task_key(job_id, name),
            UpdateExpression="SET #s = :running, prediction_id = :id, submitted_at = :at",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={
                ":running": RUNNING,
                ":id": prediction_id,
                ":at": Decimal(str(round(submitted_at, 3))),
            },
        )

    def finish(self, job_id: str, name: str, status: str) -> bool:
        """Mark the task finished; True for the one caller that did it (a duplicate gets False)."""
        try:
            self._table.update_item(
                Key=_task_key(job_id, name),
                UpdateExpression="SET #s = :status, finished_at = :now, expires_at = :ttl",
                ConditionExpression="attribute_not_exists(#s) OR NOT #s IN (:succeeded, :failed)",
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues={
                    ":status": status,
                    ":now": Decimal(str(round(self._clock(), 3))),
                    ":ttl": self._ttl(),
                    ":succeeded": SUCCEEDED,
                    ":failed": FAILED,
                },
            )
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True

    def stop_provider(self, job_id: str, provider: str, error: dict[str, str]) -> None:
        """No more calls to `provider` for this job (its balance ran out, its keys are refused...)."""
        self._table.put_item(
            Item={
                **_stop_key(job_id, provider),
                "error_type": error["type"],
                "message": error["message"],
                "stopped_at": Decimal(str(round(self._clock(), 3))),
                "expires_at": self._ttl(),
            }
        )

    def provider_stop(self, job_id: str, provider: str) -> dict[str, str] | None:
        item = self._table.get_item(Key=_stop_key(job_id, provider), ConsistentRead=True).get("Item")
        if not item:
            return None
        return {"type": str(item["error_type"]), "message": str(item["message"])}
