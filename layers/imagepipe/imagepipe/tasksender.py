"""Putting tasks on TasksQueue (a local row's on LocalTasksQueue): SendMessageBatch of ten, a few calls in
flight on one (thread-safe) client."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from imagepipe.contract import ImageTask

SQS_BATCH = 10
SEND_THREADS = 4


class SendFailed(Exception):
    """SQS kept refusing some tasks for reasons on its side."""


@dataclass
class _Sent:
    """What SQS made of one batch: how many it took, those it refused for good, those never taken."""

    sent: int
    rejected: list[tuple[ImageTask, str]]
    unsent: list[ImageTask]


class TaskSender:
    """Sends tasks ten at a time with SendMessageBatch, `threads` batches in flight, resending the entries SQS
    reports as Failed. `through`: every task up to that row is on the queue (batches finish in any order;
    it moves over a run of finished ones). What SQS refused is handed to on_rejected on the caller's thread.

    A local task goes to `local_queue_url` (the agent's queue). Batches are made in row order whatever
    the route, and a batch's local and cloud tasks are sent as one call each, so `through` still means
    every row up to it is queued."""

    def __init__(
        self,
        sqs: Any,
        queue_url: str,
        on_rejected: Callable[[ImageTask, str], None],
        max_attempts: int = 5,
        sleep: Callable[[float], None] = time.sleep,
        skip_through: int = 0,
        threads: int = SEND_THREADS,
        local_queue_url: str = "",
    ) -> None:
        self._sqs, self._on_rejected = sqs, on_rejected
        self._queue_urls = {"cloud": queue_url, "local": local_queue_url}
        self._max_attempts, self._sleep = max_attempts, sleep
        self._pending: list[ImageTask] = []
        self._batches: deque[tuple[list[ImageTask], Future[_Sent]]] = deque()
        self._unsent: list[ImageTask] = []
        self._pool = ThreadPoolExecutor(max(threads, 1), thread_name_prefix="send")
        self._in_flight = 2 * max(threads, 1)
        self.sent = 0
        # A split taken over from a splitter that died: the rows it queued are not queued again.
        self._skip_through = self.through = skip_through

    def add(self, task: ImageTask) -> None:
        if task.row_number <= self._skip_through:
            return
        self._pending.append(task)
        if len(self._pending) == SQS_BATCH:
            self._submit()
        self.reap()

    def _submit(self) -> None:
        batch, self._pending = self._pending, []
        self._batches.append((batch, self._pool.submit(self._send, batch)))
        while len(self._batches) > self._in_flight:
            self._reap_one()

    def reap(self) -> None:
        """Take in the batches that have finished, in order (SendFailed when SQS never took one)."""
        while self._batches and self._batches[0][1].done():
            self._reap_one()

    def _reap_one(self) -> None:
        batch, future = self._batches[0]
        outcome = future.result()  # an error of the call itself is raised here: the batch stays in flight
        self._batches.popleft()
        self.sent += outcome.sent
        for task, reason in outcome.rejected:
            self._on_rejected(task, reason)
        if outcome.unsent:
            self._unsent += outcome.unsent
            raise SendFailed(
                f"SQS did not accept {len(outcome.unsent)} task(s) after {self._max_attempts} attempts"
            )
        if not self._unsent:
            self.through = max(self.through, batch[-1].row_number)

    def finish(self) -> None:
        """Every task added is on the queue (or rejected), or SendFailed."""
        if self._pending:
            self._submit()
        while self._batches:
            self._reap_one()

    def settle(self) -> int:
        """After a failure: wait for the batches in flight and return `through` (what is surely queued)."""
        while self._batches:
            try:
                self._reap_one()
            except Exception:  # noqa: BLE001 - it is a failure being handled; `through` stops before it
                break
        return self.through

    def _send(self, batch: list[ImageTask]) -> _Sent:
        entries = {str(i): task for i, task in enumerate(batch)}
        outcome = _Sent(0, [], [])
        for attempt in range(1, self._max_attempts + 1):
            failures: list[dict[str, Any]] = []
            for backend, queue_url in self._queue_urls.items():
                routed = [
                    {"Id": i, "MessageBody": t.body()} for i, t in entries.items() if t.backend == backend
                ]
                if routed:
                    response = self._sqs.send_message_batch(QueueUrl=queue_url, Entries=routed)
                    outcome.sent += len(response.get("Successful", []))
                    failures += response.get("Failed", [])
            retry: dict[str, ImageTask] = {}
            for failure in failures:
                task = entries[failure["Id"]]
                if failure.get("SenderFault"):
                    # Resending cannot help: the row is rejected with SQS's reason.
                    reason = f"the task could not be queued: {failure.get('Message') or failure['Code']}"
                    outcome.rejected.append((task, reason))
                else:
                    retry[failure["Id"]] = task
            entries = retry
            if not entries:
                break
            if attempt < self._max_attempts:
                self._sleep(min(0.1 * 2**attempt, 2.0))
        outcome.unsent = list(entries.values())
        return outcome

    def abandon(self, reason: str) -> None:
        """The split stops: the tasks not (known to be) on the queue are rejected with `reason`, so the job
        never waits for a row that was not queued."""
        lost = list(self._unsent)
        for batch, future in self._batches:
            future.cancel()
            try:
                outcome = future.result()
            except BaseException:  # noqa: BLE001 - the call failed or was cancelled: not known to be queued
                lost += batch
                continue
            self.sent += outcome.sent
            for task, why in outcome.rejected:
                self._on_rejected(task, why)
            lost += outcome.unsent
        for task in [*lost, *self._pending]:
            self._on_rejected(task, reason)
        self._batches.clear()
        self._unsent, self._pending = [], []

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
