"""The scheduled sweeper (JobSweeperFunction, every few minutes): a job must never stay `splitting`,
`running` or `finishing` with all its rows done, nor owe its completion event for ever. Each hand-off
is at-least-once already; the sweeper is the net under the cases where the one message was never sent
or died: it finds such jobs, hands them to the finisher again (harmless twice: the finisher's writes are
conditional) and reports how many it found as the metric JobsStuck.

Finding the jobs that are not over, cheaply: the JOBS list (pk JOBS, sk {created}#{job}, oldest first)
read from a cursor (pk SWEEP, sk CURSOR) that marks where every earlier job is known to be over. Each sweep
reads the jobs listed after the cursor (one Query, keys only) and their records (BatchGetItem, consistent,
100 a request), examines the open ones, and moves the cursor past the leading run of jobs that are over
(never past a job created within `settle_s`). So a sweep reads about the jobs since the oldest open one,
not the table, and no index or extra write on the jobs' own path is needed.

What counts as stuck (thresholds from the functions' timeouts):
- running, every row done, still running `stuck_after_s` after a sweep first saw it so (a generator batch
  hands its jobs off when the batch ends, at most its Timeout later): handed to the finisher.
- finishing, and the finisher's message never sent (`finish_sent_at` unset) `stuck_after_s` after the
  hand-off, or sent `finisher_stale_s` ago (the finisher's Timeout and a minute: it died, or its message
  went to FinisherDeadLetterQueue): the message is sent again, at most `max_finish_sends` times in all,
  then only reported (the FinisherDeadLetterQueue alarm says why).
- final but its completion event still owed `finisher_stale_s` after it completed: the message is sent
  again (the finisher publishes the owed event), with the same limit.
- splitting with no split progress for `split_stale_s` (its splitter and Lambda's retries are over; the
  event is in SplitterDeadLetterQueue): reported only - what was split is not known to be the whole file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from pydantic import Field

from imagepipe.jobstate import FINISHING, JOB_FINAL, RUNNING, SPLITTING, JobState
from imagepipe.observability import logger, metrics
from imagepipe.settings import _EnvSettings

HANDED, RESENT, REPORTED = "handed to the finisher", "finisher message sent again", "reported"


class SweeperSettings(_EnvSettings):
    jobs_table: str
    finisher_queue_url: str
    # The functions' Timeouts: how long a live invocation may hold a job before it is surely gone.
    generator_timeout_seconds: float = Field(300.0, gt=0)
    finisher_timeout_seconds: float = Field(900.0, gt=0)
    split_stale_seconds: float = Field(3600.0, gt=0)
    max_finish_sends: int = Field(3, ge=1)

    def options(self) -> SweepOptions:
        return SweepOptions(
            finisher_queue_url=self.finisher_queue_url,
            stuck_after_s=self.generator_timeout_seconds + 60.0,
            finisher_stale_s=self.finisher_timeout_seconds + 60.0,
            split_stale_s=self.split_stale_seconds,
            max_finish_sends=self.max_finish_sends,
        )


@dataclass(frozen=True)
class SweepOptions:
    finisher_queue_url: str
    stuck_after_s: float = 360.0
    finisher_stale_s: float = 960.0
    split_stale_s: float = 3600.0
    max_finish_sends: int = 3
    settle_s: float = 3600.0


@dataclass(frozen=True)
class Stuck:
    job_id: str
    status: str
    reason: str
    action: str


def sweep(
    state: JobState,
    sqs: Any,
    options: SweepOptions,
    *,
    clock: Callable[[], float] = time.time,
    time_left_s: Callable[[], float] = lambda: float("inf"),
) -> list[Stuck]:
    """One sweep: the stuck jobs found (and what was done about each). Emits JobsStuck."""
    cursor = state.sweep_cursor()
    listed = list(state.jobs_after(cursor))
    records = state.jobs([job_id for _, job_id in listed])
    now, advancing, after = clock(), True, cursor
    stuck: list[Stuck] = []
    for sort_key, job_id in listed:
        if time_left_s() < 30:
            logger.warning("sweep cut short by the function's Timeout", extra={"at_job": job_id})
            break
        job = records.get(job_id)
        is_open = job is not None and (job.get("status") not in JOB_FINAL or bool(job.get("event_pending")))
        if advancing:
            young = job is not None and now - float(job.get("created_at") or now) < options.settle_s
            if is_open or young:
                advancing = False
            else:
                after = sort_key
        if is_open and job is not None:
            found = _examine(state, sqs, options, job, now)
            if found is not None:
                stuck.append(found)
                logger.warning(
                    "stuck job found",
                    extra={
                        "job_id": found.job_id,
                        "status": found.status,
                        "reason": found.reason,
                        "action": found.action,
                    },
                )
    if after != cursor:
        state.set_sweep_cursor(after)
    metrics.add_metric(name="JobsStuck", unit=MetricUnit.Count, value=len(stuck))
    logger.info("sweep done", extra={"jobs_read": len(listed), "stuck": len(stuck), "cursor": after})
    return stuck


def _examine(
    state: JobState, sqs: Any, options: SweepOptions, job: dict[str, Any], now: float
) -> Stuck | None:
    job_id, status = str(job["job_id"]), str(job["status"])
    if status == SPLITTING:
        beat = float(job.get("split_heartbeat") or job.get("created_at") or now)
        if now - beat < options.split_stale_s:
            return None
        return Stuck(
            job_id,
            status,
            f"no split progress for {now - beat:.0f} s: its splitter is gone (see SplitterDeadLetterQueue)",
            REPORTED,
        )
    if status == RUNNING:
        if state.counts(job_id).finished < int(job.get("queued") or 0):
            return None  # rows still to make: working, not stuck
        seen = job.get("stuck_seen_at")
        if seen is None:
            state.note_stuck_seen(job_id)
            return None
        if now - float(seen) < options.stuck_after_s:
            return None
        handed = state.hand_to_finisher(sqs, options.finisher_queue_url, [job_id])
        reason = f"every row done for {now - float(seen):.0f} s and the job never handed to the finisher"
        # Not handed: it was handed by someone else in between, or the send failed (the next sweep resends).
        return Stuck(job_id, status, reason, HANDED if handed else REPORTED)
    sent = job.get("finish_sent_at")
    if status == FINISHING:
        if sent is None:
            since = float(job.get("finishing_at") or job.get("created_at") or now)
            limit = options.stuck_after_s
            reason = "its finisher message was never sent"
        else:
            since, limit = float(sent), options.finisher_stale_s
            reason = "its finisher message was sent and the job did not finish (FinisherDeadLetterQueue?)"
    else:  # final, its completion event still owed
        since = max(float(job.get("completed_at") or 0), float(sent or 0)) or float(
            job.get("created_at") or now
        )
        limit, reason = options.finisher_stale_s, "its completion event was never published"
    if now - since < limit:
        return None
    reason = f"{status} for {now - since:.0f} s: {reason}"
    if int(job.get("finish_sends") or 0) >= options.max_finish_sends:
        return Stuck(job_id, status, reason + f"; sent {options.max_finish_sends} times already", REPORTED)
    resent = state.send_finish(sqs, options.finisher_queue_url, job_id)
    return Stuck(job_id, status, reason, RESENT if resent else REPORTED)
