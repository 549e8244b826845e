"""A batch's hand-backs sent together: one SendMessageBatch instead of a SendMessage per task.

Predictions submitted in one invocation are likely done at the same time; sent together with the same
delay, their messages come back together - one invocation reads them all, instead of one invocation per
message as they trickle back. Each task's thread waits until every task of the batch still running has
handed back too (or a short while at most), then one of them sends for all; each learns whether its own
message was accepted, so a refused one still makes its task's delivery fail (and come back)."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

SQS_BATCH = 10  # entries per SendMessageBatch
_ids = itertools.count()


@dataclass
class _Entry:
    body: str
    delay_s: int
    id: str = ""
    taken: bool = False
    sent: bool = False
    error: str | None = None


class Outbox:
    def __init__(self, sqs: Any, queue_url: str, tasks: int, max_wait_s: float) -> None:
        self.sqs, self.queue_url, self.max_wait_s = sqs, queue_url, max_wait_s
        self._active = tasks  # the batch's tasks still running (waiting here counts as running)
        self._waiting: list[_Entry] = []
        self._cond = threading.Condition()

    def task_ended(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def send(self, body: str, delay_s: int) -> str | None:
        """Queue one message (delayed by delay_s) with the batch's others; None once SQS accepted it,
        else why not."""
        entry = _Entry(body, delay_s, id=str(next(_ids)))
        with self._cond:
            self._waiting.append(entry)
            self._cond.notify_all()
            self._cond.wait_for(
                lambda: entry.taken or len(self._waiting) >= self._active, timeout=self.max_wait_s
            )
            if not entry.taken:  # this thread sends for everyone waiting
                entries, self._waiting = self._waiting, []
                for each in entries:
                    each.taken = True
            else:
                entries = []
        if entries:
            self._send(entries)
        with self._cond:
            self._cond.wait_for(lambda: entry.sent)
        return entry.error

    def _send(self, entries: list[_Entry]) -> None:
        for e in entries:
            e.error = "not sent"  # until SQS says otherwise (a crash here fails every waiting task)
        try:
            for start in range(0, len(entries), SQS_BATCH):
                chunk = entries[start : start + SQS_BATCH]
                try:
                    answer = self.sqs.send_message_batch(
                        QueueUrl=self.queue_url,
                        Entries=[
                            {"Id": e.id, "MessageBody": e.body, "DelaySeconds": e.delay_s} for e in chunk
                        ],
                    )
                    failed = {f["Id"]: f.get("Message") or f["Code"] for f in answer.get("Failed", [])}
                except (ClientError, BotoCoreError) as exc:
                    failed = {e.id: str(exc) for e in chunk}
                for e in chunk:
                    e.error = failed.get(e.id)
        finally:
            with self._cond:
                for e in entries:
                    e.sent = True
                self._cond.notify_all()
