"""Making the images for one task through its provider and recording its outcome in JobsTable.

At most one paid request per task: the request is claimed in JobsTable before it is sent, an
asynchronous prediction id is kept before anyone waits on it, and a redelivered task resumes that
prediction instead of submitting again. A prediction is read when it is likely done (the generation time
learnt per model, polltiming.py); one not expected within the invocation's poll budget goes back to the
queue as a new message delayed until then (so it never counts toward the dead-letter queue, and no Lambda
time is spent waiting on it).

Retries run on the generator's own schedule, never on the queue's visibility timeout: a retryable
failure sends the task again as a new message delayed by an exponential backoff with jitter, carrying
its counters (`attempts` for transient failures, `throttles` for rate-limit answers, which never count
as attempts, and `first_failed_at`); the delivered message is then done. Out of attempts, or past the
retry window since the first failure, the row ends failed with its last error. The queue's
maxReceiveCount only guards against crashes and poison messages."""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit
from botocore.exceptions import BotoCoreError, ClientError

from imagepipe.contract import ImageTask, TaskRecord
from imagepipe.jobstate import CANCELLED, FAILED, FINISHED, SUCCEEDED, Claim, JobState, TaskState
from imagepipe.layout import JobLayout
from imagepipe.observability import logger
from imagepipe.outbox import Outbox
from imagepipe.polltiming import GenerationTimes
from imagepipe.providers import Action, Generation, Pending, Provider, ProviderError
from imagepipe.providers.base import deadline
from imagepipe.ratelimit import NoToken, RateLimiter, Token

SQS_MAX_DELAY_S = 900
# How long the other reads of a batch wait for its first read of a model (Batch.scout) at most.
SCOUT_WAIT_S = 5.0
# How long a hand-back waits for the batch's other tasks, to be sent with theirs (outbox.py), at most.
OUTBOX_WAIT_S = 2.0


class RetryLater(Exception):
    """Another delivery holds the task's claim: look again after `after_s` seconds (as a new delayed
    message, so the wait never counts toward the dead-letter queue)."""

    def __init__(self, message: str, after_s: float) -> None:
        super().__init__(message)
        self.after_s = after_s


class SendFailed(Exception):
    """The task could not be sent again (SQS refused it): the delivered message must come back instead,
    after `delay_s` (ChangeMessageVisibility)."""

    def __init__(self, message: str, delay_s: float) -> None:
        super().__init__(message)
        self.delay_s = delay_s


# A submit refused for its rate waits for another token in the invocation this many times before it is retried
# from the queue (only with the shared limiter on).
TOKEN_RETRIES = 3


def backoff(
    n: int, base_s: float, max_s: float, rand: Callable[[float, float], float] = random.uniform
) -> float:
    """The pause before retry n (1, 2, ...): exponential, with jitter over its upper half, at most max_s."""
    high = min(max_s, base_s * 2 ** (max(n, 1) - 1))
    return rand(high / 2, high)


@dataclass
class GeneratorOptions:
    bucket: str
    queue_url: str
    finisher_queue_url: str = ""
    max_attempts: int = 8  # TaskMaxAttempts: transient failures before the row fails
    retry_window_s: float = (
        3600.0  # TaskRetryWindowSeconds: no retry scheduled this long after the first failure
    )
    retry_base_s: float = 2.0  # RetryBaseDelaySeconds
    retry_max_s: float = 900.0  # RetryMaxDelaySeconds (SQS's DelaySeconds at most)
    max_receives: int = 5  # TaskMaxReceiveCount: the delivery that is the message's last before the DLQ
    poll_interval_s: float = 2.0  # between reads of a prediction still running inside one invocation
    poll_delay_s: int = 10  # PollDelaySeconds: a model's first wait, before its generation time is learnt
    max_generation_s: float = 1800.0
    claim_stale_s: float = 360.0
    prices: dict[str, float] = field(default_factory=dict)


@dataclass
class TaskProcessor:
    providers: Callable[[str], Provider]
    s3: Any
    sqs: Any
    # A JobState for the calling thread (boto3 resources are not thread-safe: one Table per thread).
    states: Callable[[], JobState]
    options: GeneratorOptions
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    rand: Callable[[float, float], float] = random.uniform
    # The shared rate limiter (SharedRateLimiter): each paid submit waits for its token. None: unpaced.
    limiter: RateLimiter | None = None
    # When asynchronous predictions are likely done, learnt per provider and model (this environment's).
    times: GenerationTimes | None = None

    def __post_init__(self) -> None:
        if self.times is None:
            options = self.options
            self.times = GenerationTimes(options.poll_delay_s, options.max_generation_s, self.clock)

    @property
    def state(self) -> JobState:
        return self.states()

    def batch(self, poll_until: float, until: float | None = None, tasks: int = 1) -> Batch:
        return Batch(self, poll_until, until, tasks)

    def process(
        self,
        task: ImageTask,
        receives: int,
        poll_until: float,
        batch: Batch | None = None,
        receipt_handle: str | None = None,
    ) -> None:
        """One delivery of a task. Returning marks its message done; raising sends it back to the queue
        (after the backoff when the new message could not be sent)."""
        batch = batch or Batch(self, poll_until)
        run = _Run(self, task, receives, poll_until, batch)
        try:
            try:
                run.go()
            except ProviderError as exc:
                run.failed(exc)
            except RetryLater as exc:
                self.send_again(task, exc.after_s)
                logger.info(f"{exc}: looking again in {exc.after_s:.0f} s", extra=run.log)
        except SendFailed as exc:
            # The delivered message comes back after the backoff instead (its receive count grows).
            self.come_back(receipt_handle, exc.delay_s)
            logger.warning(f"{exc}: the message comes back in {exc.delay_s:.0f} s", extra=run.log)
            raise
        except Exception as exc:
            if receives < self.options.max_receives:
                # Not the API's failure (AWS after botocore's retries, a bug): the message comes back after
                # a backoff rather than the queue's 30-minute visibility timeout.
                logger.exception("task failed; its message comes back after a backoff", extra=run.log)
                run.abandon()
                options = self.options
                self.come_back(
                    receipt_handle, backoff(receives + 3, options.retry_base_s, options.retry_max_s)
                )
                raise
            # The message's last delivery before the dead-letter queue (a crash or a poison task that
            # keeps failing): the row ends failed with what went wrong, so it is not lost.
            run.last_delivery_failed(exc)

    def come_back(self, receipt_handle: str | None, delay_s: float) -> None:
        """Best effort: the delivered message comes back after delay_s (else after the queue's timeout)."""
        if receipt_handle is None:
            return
        try:
            self.sqs.change_message_visibility(
                QueueUrl=self.options.queue_url,
                ReceiptHandle=receipt_handle,
                VisibilityTimeout=_sqs_delay(delay_s),
            )
        except (ClientError, BotoCoreError) as exc:
            logger.warning(f"could not shorten the message's visibility: {exc}")

    def send_again(self, task: ImageTask, delay_s: float) -> None:
        """The task as a new message, delayed by delay_s (at most SQS's 900 s)."""
        try:
            self.sqs.send_message(
                QueueUrl=self.options.queue_url,
                MessageBody=task.body(),
                DelaySeconds=_sqs_delay(delay_s),
            )
        except (ClientError, BotoCoreError) as exc:
            raise SendFailed(f"the task could not be sent again ({exc})", delay_s) from exc


def _sqs_delay(delay_s: float) -> int:
    return max(0, min(SQS_MAX_DELAY_S, round(delay_s)))


def _provider_key(job_id: str, provider: str | None) -> str:
    """Where a batch keeps a provider's stop for a job, beside the job's own stops (keyed by job id)."""
    return f"{job_id}\0{provider}"


class Batch:
    """One invocation's tasks: the job checks (cancelled? budget spent?) read once per job, the
    completion check for every job the batch touched, once at its end, and the per-provider metrics."""

    def __init__(
        self, processor: TaskProcessor, poll_until: float, until: float | None = None, tasks: int = 1
    ) -> None:
        self.processor, self.poll_until, self.until = processor, poll_until, until
        # The batch's hand-backs, sent together (`tasks`: how many records the batch has).
        self.outbox = Outbox(processor.sqs, processor.options.queue_url, tasks, OUTBOX_WAIT_S)
        self._lock = threading.Lock()
        self._stops: dict[str, dict[str, str] | None] = {}
        self._jobs: dict[str, dict[str, Any]] = {}
        self._job_reads: dict[str, threading.RLock] = {}
        self._metrics: dict[str, Counter[str]] = {}
        self._scouts: dict[tuple[str, str], threading.Event] = {}
        self.jobs: set[str] = set()
        # Deliveries per job, and those that only handed a prediction back (they finished no row).
        self._deliveries: Counter[str] = Counter()
        self._handed_back: Counter[str] = Counter()

    def handle_record(self, record: TaskRecord) -> None:
        """Powertools' record handler: returning marks the message done, raising marks it for retry.
        Every provider call in it ends by the invocation's deadline (`until`)."""
        task = record.body
        with self._lock:
            self.jobs.add(task.job_id)
            self._deliveries[task.job_id] += 1
        try:
            with deadline(self.until):
                self.processor.process(
                    task,
                    int(record.attributes.ApproximateReceiveCount),
                    self.poll_until,
                    self,
                    receipt_handle=record.receiptHandle,
                )
        finally:
            self.outbox.task_ended()

    def job(self, job_id: str, provider: str | None = None) -> dict[str, Any]:
        """The job record, read once per invocation (with `provider`'s stop for the job, in the same
        request, when that is not known yet either): the batch's other tasks wait for its first read."""
        with self._reading(job_id):
            return self._read_job(job_id, provider)

    def _reading(self, job_id: str) -> threading.RLock:
        """The job's reads in this batch go one at a time: the first reads, the others find its answer."""
        with self._lock:
            return self._job_reads.setdefault(job_id, threading.RLock())

    def _read_job(self, job_id: str, provider: str | None) -> dict[str, Any]:
        key = _provider_key(job_id, provider)
        with self._lock:
            if job_id in self._jobs:
                return self._jobs[job_id]
            with_stop = provider is not None and key not in self._stops
        if with_stop:
            assert provider is not None
            job, stop = self.processor.state.job_and_stop(job_id, provider)
            with self._lock:
                self._stops.setdefault(key, stop)
        else:
            job = self.processor.state.job(job_id)
        with self._lock:
            return self._jobs.setdefault(job_id, job or {})

    def job_stop(self, job_id: str, provider: str | None = None) -> dict[str, str] | None:
        """Why the job makes no more paid calls (cancelled, budget spent), read once per invocation.
        The budget counts what was spent and what the paid calls in flight are expected to cost."""
        with self._reading(job_id):
            return self._job_stop(job_id, provider)

    def _job_stop(self, job_id: str, provider: str | None) -> dict[str, str] | None:
        with self._lock:
            if job_id in self._stops:
                return self._stops[job_id]
        job = self.job(job_id, provider)
        stop = None
        if job.get("cancel_requested"):
            stop = {"type": "cancelled", "message": "the job was cancelled before this row was made"}
        elif job.get("max_cost") is not None:
            counts = self.processor.state.counts(job_id)
            cap = float(job["max_cost"])
            if counts.cost + counts.reserved >= cap:
                in_flight = f", ${counts.reserved:.4f} more in flight" if counts.reserved else ""
                stop = {
                    "type": "budget",
                    "message": f"the job's budget of ${cap:g} was spent (${counts.cost:.4f}{in_flight}) "
                    "before this row was made",
                }
        with self._lock:
            self._stops[job_id] = stop
        return stop

    def provider_stop(self, job_id: str, provider: str) -> dict[str, str] | None:
        """A provider that stopped the job's calls, read once per invocation (and known at once when a
        task of this batch is the one that stops it)."""
        key = _provider_key(job_id, provider)
        with self._lock:
            if key in self._stops:
                return self._stops[key]
        stop = self.processor.state.provider_stop(job_id, provider)
        with self._lock:
            self._stops.setdefault(key, stop)
            return self._stops[key]

    def stopped(self, job_id: str, provider: str, error: dict[str, str]) -> None:
        with self._lock:
            self._stops[_provider_key(job_id, provider)] = error

    def scout(self, provider: str, model: str) -> threading.Event | None:
        """The batch's first read of a model's predictions goes alone (None: this one is it; it calls
        scouted() with its answer learnt); the others wait for it on the event returned: predictions
        submitted about as long ago are likely in the same state, so if it is still running they go
        back to the queue unread."""
        with self._lock:
            event = self._scouts.get((provider, model))
            if event is None:
                self._scouts[(provider, model)] = threading.Event()
                return None
            return None if event.is_set() else event

    def handed_back(self, job_id: str) -> None:
        with self._lock:
            self._handed_back[job_id] += 1

    def scouted(self, provider: str, model: str) -> None:
        with self._lock:
            event = self._scouts.get((provider, model))
        if event is not None:
            event.set()

    def count(self, provider: str, name: str, value: float = 1) -> None:
        """A metric with the dimension provider, sent at the end of the batch (flush_metrics)."""
        if value:
            with self._lock:
                self._metrics.setdefault(provider, Counter())[name] += value

    def flush_metrics(self) -> None:
        """The batch's metrics, one EMF record per provider (Powertools: a metric set has one set of
        dimensions, so each provider gets its own)."""
        with self._lock:
            collected, self._metrics = self._metrics, {}
        for provider, values in sorted(collected.items()):
            emf = EphemeralMetrics()
            emf.add_dimension(name="provider", value=provider)
            for name, value in sorted(values.items()):
                emf.add_metric(name=name, unit=METRIC_UNITS.get(name, MetricUnit.Count), value=value)
            emf.flush_metrics()

    def finish(self) -> None:
        """Hand each job whose last row just finished to the finisher, exactly once."""
        processor = self.processor
        with self._lock:  # a batch that only handed predictions back finished no row: nothing to check
            jobs = {job for job in self.jobs if self._deliveries[job] > self._handed_back[job]}
        for job_id in processor.state.hand_to_finisher(
            processor.sqs, processor.options.finisher_queue_url, jobs
        ):
            logger.info("job's last row finished: handed to the finisher", extra={"job_id": job_id})


# Metrics per provider: ImagesGenerated, RateLimited (answers), Retries (scheduled), AnswersLost, Cost (USD),
# ProviderStopped (a provider stopped a job's calls), TasksFailed, TasksCancelled, PredictionsHandedBack.
METRIC_UNITS = {"Cost": MetricUnit.NoUnit}


@dataclass
class _Run:
    """One task in one invocation."""

    p: TaskProcessor
    task: ImageTask
    receives: int
    poll_until: float
    batch: Batch
    started: float = 0.0

    def __post_init__(self) -> None:
        self.started = self.p.clock()
        self.name = self.task.image_name
        self.layout = JobLayout(self.task.job_id)
        self.log = {
            "job_id": self.task.job_id,
            "row_id": self.task.row_id,
            "attempt": self.task.attempts + 1,
            "receives": self.receives,
        }
        self.provider = self.p.providers(self.task.provider)
        self.model = self.provider.model_for(self.task)
        self.answers_lost = 0
        self.paid = 0.0  # what the generation cost, once it is known
        self.state = self.p.state  # this thread's
        # The claim this delivery holds while it may send the paid request (None: not ours, or done with).
        self.claim: Claim | None = None
        # The budget reservation the task holds (USD), released by whoever finishes it.
        self.reserved: float | None = self.task.reserved if self.task.prediction_id else None

    def go(self) -> None:
        task = self.task
        if task.prediction_id:
            # A handed-back prediction: paid for already, so it is seen through whatever happens. No read
            # first: if a duplicate already finished it, recording the outcome again changes nothing.
            outcome: Generation | Pending = Pending(task.prediction_id)
            submitted_at = task.submitted_at or self.started
        else:
            # One request reads the job record and the provider's stop (Batch.job).
            stop = self.batch.job_stop(task.job_id, task.provider) or self.batch.provider_stop(
                task.job_id, task.provider
            )
            # The rate-limit token first, while this delivery holds nothing a crash could leave claimed.
            token = None if stop else self.rate_token()
            # The common case - a task nobody has touched - costs one conditional write, no read (and one
            # more for the budget reservation of a job with a cap).
            state = self.take_claim(0.0 if stop else self.expected_cost())
            if state is not None and state.status in FINISHED:
                logger.info("task already finished: duplicate delivery ignored", extra=self.log)
                return
            if state is not None and state.prediction_id:
                # Redelivered after its prediction was submitted: resume it, never submit again.
                outcome = Pending(state.prediction_id)
                submitted_at = state.submitted_at or self.started
            elif stop is not None:
                # This delivery holds the claim, so no other one is calling the API for the row: it may
                # record the stop as the row's outcome (only while the claim is still its own).
                self.record(CANCELLED if stop["type"] in ("cancelled", "budget") else FAILED, error=stop)
                return
            else:
                outcome = self.start_on_tokens(token)
                submitted_at = self.p.clock()
                if isinstance(outcome, Pending):
                    assert self.claim is not None
                    if not self.state.record_prediction(
                        task.job_id,
                        self.name,
                        outcome.request_id,
                        submitted_at,
                        claimed_at=self.claim.claimed_at,
                    ):
                        # The claim was taken over (or the row finished) while the submit was in flight:
                        # the row's outcome is the other delivery's; this prediction is a lost answer.
                        self.batch.count(task.provider, "AnswersLost")
                        logger.warning(
                            "prediction accepted after this delivery's claim was taken over: not followed",
                            extra={**self.log, "prediction_id": outcome.request_id},
                        )
                        return
                    # the prediction is on record: from here on it is resumed, never resent
                    self.claim = None
        if isinstance(outcome, Pending):
            outcome = self.poll(outcome, submitted_at)
        if isinstance(outcome, Pending):
            self.hand_back(outcome, submitted_at)
            return
        self.succeeded(outcome)

    def rate_token(self) -> Token | None:
        """Wait for the provider's rate-limit token (None: the shared limiter is off). None in time for the
        invocation's deadline: the task comes back as a new delayed message - a wait, not an attempt."""
        if self.p.limiter is None:
            return None
        try:
            return self.p.limiter.acquire(self.task.provider, self.model)
        except NoToken as exc:
            raise RetryLater(str(exc), exc.after_s) from exc

    def start_on_tokens(self, token: Token | None) -> Generation | Pending:
        """The paid submit. With the shared limiter on, a refusal for the rate (which the limiter has heard
        and slowed down for) waits here for the next token, up to TOKEN_RETRIES times, instead of going back
        to the queue for a backoff: a throttled task waits for a token, not for a retry. No token in time
        for the invocation: the refusal takes the ordinary retry path, which releases the claim."""
        for _ in range(TOKEN_RETRIES):
            try:
                return self.paced_start(token)
            except ProviderError as exc:
                if token is None or exc.kind != "rate_limited" or exc.maybe_accepted:
                    raise
                self.batch.count(self.task.provider, "RateLimited")
                try:
                    token = self.rate_token()
                except RetryLater:
                    raise exc from None
        return self.paced_start(token)

    def paced_start(self, token: Token | None) -> Generation | Pending:
        """The paid submit; the limiter hears whether the provider took it or refused it for its rate."""
        limiter = self.p.limiter
        try:
            outcome = self.provider.run(lambda: self.provider.start(self.task))
        except ProviderError as exc:
            if limiter is not None:
                limiter.heard(token, refused=exc.kind == "rate_limited")
            raise
        if limiter is not None:
            limiter.heard(token, refused=False)
        return outcome

    def expected_cost(self) -> float:
        """What the call is expected to cost, reserved on the job's budget while it is in flight (only for
        a job with a budget: without one nothing is reserved)."""
        if self.batch.job(self.task.job_id).get("max_cost") is None:
            return 0.0
        return round(self.p.options.prices.get(self.task.provider, 0.0) * self.task.n, 6)

    def take_claim(self, reserve: float) -> TaskState | None:
        """Claim the task for this delivery. Returns None once claimed, else the task's state when there
        is nothing to claim (finished: a duplicate; a prediction on record: resume it)."""
        claim = self.state.claim(self.task.job_id, self.name, self.task.provider, reserve=reserve)
        if claim is None:
            return self.claim_again(reserve)
        self.hold(claim)
        return None

    def hold(self, claim: Claim) -> None:
        self.claim, self.reserved, self.answers_lost = claim, claim.reserved, claim.answers_lost

    def claim_again(self, reserve: float) -> TaskState | None:
        """The claim was refused: the task has a record. Read it and decide - finished (a duplicate),
        a prediction on record (resume), a claim held by a live delivery (come back later), or one whose
        holder is gone (claim it again: counted as a lost answer, or refused for asynchronous APIs).
        Returns the state when there is nothing to claim, None once claimed."""
        state = self.state.task(self.task.job_id, self.name)
        if state is not None:
            self.reserved = state.reserved
        if state is None or state.status in FINISHED or state.prediction_id:
            return state
        if state.status == "submitting":
            age = self.p.clock() - state.claimed_at
            if age < self.p.options.claim_stale_s:
                # Another delivery of this task is calling the API right now: come back later, when it is done.
                raise RetryLater(
                    "another delivery of this task is in flight", self.p.options.claim_stale_s - age
                )
            if self.provider.asynchronous:
                # An earlier attempt submitted and never recorded the answer: the provider may have accepted
                # (and will charge for) it, and a resend could be a second paid prediction.
                self.answers_lost = state.answers_lost + 1
                raise ProviderError(
                    "answer_lost",
                    "an earlier attempt submitted this row and its answer never arrived; it is not resent "
                    "because the provider may have accepted it (a resend could be charged twice)",
                    action=Action.FAIL_ROW,
                )
            # synchronous: the lost answer is counted (by the claim), and the request sent once more
            claim = self.state.claim(
                self.task.job_id, self.name, self.task.provider, stale=state, reserve=reserve
            )
        else:  # released: answered without being accepted; the earlier lost answers stay counted
            claim = self.state.claim(self.task.job_id, self.name, self.task.provider, reserve=reserve)
        if claim is None:
            raise RetryLater("another delivery of this task claimed it first", self.p.options.claim_stale_s)
        self.hold(claim)
        return None

    def poll(self, pending: Pending, submitted_at: float) -> Generation | Pending:
        """Read the prediction once it is likely done: the learnt delay after its submit (GenerationTimes).
        A wait that fits in the invocation's poll budget is waited out here (billed idle time); a longer
        one is the queue's: the prediction goes back unread (hand_back) and is read on its redelivery.
        While the estimate is unsure, the batch's first read of a model goes alone (Batch.scout)."""
        provider, model, times = self.task.provider, self.model, self.p.times
        assert times is not None
        pause = 0.0  # after a read that found it running or failed: a poll interval at least
        while True:
            wait = max(pause, submitted_at + times.delay(provider, model) - self.p.clock())
            if wait > 0:
                if self.p.clock() + wait > self.poll_until:
                    return pending
                self.p.sleep(wait)
            ahead = None if times.sure(provider, model) else self.batch.scout(provider, model)
            if ahead is not None:
                ahead.wait(SCOUT_WAIT_S)
                if submitted_at + times.delay(provider, model) > self.p.clock():
                    continue  # the first read found its prediction running: this one likely is too
            try:
                outcome = self.read(pending, submitted_at)
            finally:
                if ahead is None:
                    self.batch.scouted(provider, model)
            if isinstance(outcome, Generation):
                return outcome
            pending, pause = outcome or pending, self.p.options.poll_interval_s

    def read(self, pending: Pending, submitted_at: float) -> Generation | Pending | None:
        """One read of the prediction, its answer taught to the estimate; None when the read failed (the
        prediction is still the provider's: it is read again later)."""
        elapsed = self.p.clock() - submitted_at
        try:
            outcome = self.provider.run(lambda rid=pending.request_id: self.provider.resume(rid))
        except ProviderError as exc:
            if exc.action is not Action.RETRY:
                raise
            if exc.kind == "rate_limited":
                self.batch.count(self.task.provider, "RateLimited")
            logger.warning("poll failed; will poll again", extra={**self.log, "error": exc.as_record()})
            return None
        assert self.p.times is not None
        if isinstance(outcome, Generation):
            self.p.times.done(self.task.provider, self.model, elapsed)
        else:
            self.p.times.running(self.task.provider, self.model, elapsed)
        return outcome

    def hand_back(self, pending: Pending, submitted_at: float) -> None:
        running_for = self.p.clock() - submitted_at
        if running_for > self.p.options.max_generation_s:
            raise ProviderError(
                "timeout",
                f"the prediction {pending.request_id} was still {pending.status} {running_for:.0f} s after "
                "it was submitted",
                action=Action.FAIL_ROW,
                request_id=pending.request_id,
            )
        later = self.task.model_copy(
            update={
                "prediction_id": pending.request_id,
                "handbacks": self.task.handbacks + 1,
                "submitted_at": submitted_at,
                "reserved": self.reserved or 0.0,
            }
        )
        # Read again when it is likely done; due already (its read failed): after PollDelaySeconds.
        assert self.p.times is not None
        due_in = submitted_at + self.p.times.delay(self.task.provider, self.model) - self.p.clock()
        delay = math.ceil(due_in) if due_in > 0 else self.p.options.poll_delay_s
        error = self.batch.outbox.send(later.body(), _sqs_delay(delay))
        if error is not None:
            raise SendFailed(f"the prediction could not be handed back ({error})", delay)
        self.batch.handed_back(self.task.job_id)
        self.batch.count(self.task.provider, "PredictionsHandedBack")
        logger.info(
            f"prediction not done yet: handed back to the queue, read again in {delay} s",
            extra={**self.log, "prediction_id": pending.request_id, "handbacks": later.handbacks},
        )

    def succeeded(self, generation: Generation) -> None:
        cost = generation.cost
        if cost is None:
            cost = self.p.options.prices.get(self.task.provider, 0.0) * len(generation.images)
        self.paid = cost  # counted even if the images cannot be stored
        keys = []
        for index, image in enumerate(generation.images):
            key = self.layout.image_key(self.name, index, image.extension)
            self.p.s3.put_object(
                Bucket=self.p.options.bucket, Key=key, Body=image.data, ContentType=image.content_type
            )
            keys.append(key)
        if self.record(SUCCEEDED, images=keys, request_id=generation.request_id, cost=cost):
            self.batch.count(self.task.provider, "ImagesGenerated", len(keys))

    def failed(self, exc: ProviderError) -> None:
        task = self.task
        if exc.action is Action.STOP_JOB:
            # The provider will refuse every row of this job (balance, quota, keys, region): stop calling it.
            self.state.stop_provider(task.job_id, task.provider, exc.as_record())
            self.batch.stopped(task.job_id, task.provider, exc.as_record())
            self.batch.count(task.provider, "ProviderStopped")
            logger.error(
                f"{task.provider} stopped the job's calls", extra={**self.log, "error": exc.as_record()}
            )
        if exc.kind == "rate_limited":
            self.batch.count(task.provider, "RateLimited")
        if self.claim is not None and exc.retryable:
            lost = exc.maybe_accepted
            if lost and self.provider.asynchronous:
                self.answers_lost += 1
                exc = ProviderError(
                    "answer_lost",
                    f"the submit's answer never arrived ({exc.message}); it is not resent because the "
                    "provider may have accepted it (a resend could be charged twice)",
                    action=Action.FAIL_ROW,
                )
            else:
                # Answered without being accepted (or a synchronous answer lost, counted): may be sent again.
                self.state.release(
                    task.job_id,
                    self.name,
                    answer_lost=lost,
                    claimed_at=self.claim.claimed_at,
                    reserved=self.claim.reserved,
                )
                self.claim, self.reserved = None, 0.0
                self.answers_lost += int(lost)
        if exc.retryable:
            self.retry(exc)
            return
        self.record(FAILED, error=exc.as_record(), request_id=exc.request_id, cost=self.failed_cost(exc))

    def retry(self, exc: ProviderError) -> None:
        """Send the task again after its backoff - or, out of attempts or past the retry window since its
        first failure, end the row failed with this error. Rate-limit answers are not attempts: they have
        their own backoff (on `throttles`) and only the window ends them."""
        task, options, now = self.task, self.p.options, self.p.clock()
        first_failed_at = task.first_failed_at or now
        throttled = exc.kind == "rate_limited"
        attempts = task.attempts + (0 if throttled else 1)
        throttles = task.throttles + (1 if throttled else 0)
        elapsed = now - first_failed_at
        if attempts >= options.max_attempts or elapsed >= options.retry_window_s:
            tries = [f"{attempts} attempt(s)"] if attempts else []
            tries += [f"{throttles} rate-limit answer(s)"] if throttles else []
            why = f"{' and '.join(tries)} over {elapsed:.0f} s"
            logger.warning(
                f"image request failed: giving up after {why}", extra={**self.log, "error": exc.as_record()}
            )
            error = {"type": exc.kind, "message": f"{exc.message} (gave up after {why})"}
            self.record(FAILED, error=error, request_id=exc.request_id, cost=self.failed_cost(exc))
            return
        delay = backoff(
            throttles if throttled else attempts, options.retry_base_s, options.retry_max_s, self.p.rand
        )
        later = task.model_copy(
            update={"attempts": attempts, "throttles": throttles, "first_failed_at": first_failed_at}
        )
        self.state.note_error(task.job_id, self.name, exc.as_record())
        self.p.send_again(later, delay)
        if not throttled:
            self.batch.count(task.provider, "Retries")
        logger.warning(
            f"image request failed: trying again in {delay:.0f} s",
            extra={**self.log, "error": exc.as_record(), "attempts": attempts, "throttles": throttles},
        )

    def abandon(self) -> None:
        """This delivery failed on something other than the API while it held the claim. A synchronous
        call may have been made (and charged): the claim is released with that possible answer counted
        lost, so the next delivery asks again at once instead of waiting for the claim to go stale. An
        asynchronous submit whose answer was not kept is left claimed: it is never resent blindly."""
        if self.claim is None or self.provider.asynchronous:
            return
        try:
            self.state.release(
                self.task.job_id,
                self.name,
                answer_lost=True,
                claimed_at=self.claim.claimed_at,
                reserved=self.claim.reserved,
            )
            self.claim = None
        except (ClientError, BotoCoreError) as exc:
            logger.warning(f"could not release the task's claim: {exc}", extra=self.log)

    def last_delivery_failed(self, exc: Exception) -> None:
        """The message's last delivery failed on something other than the API (no retry is left to it):
        the row ends failed with the error (and what its generation cost, if it got that far) - unless
        another delivery holds a live claim on it, which will record it."""
        if self.claim is None:
            state = self.state.task(self.task.job_id, self.name)
            if state is not None and (
                state.status in FINISHED
                or (
                    state.status == "submitting"
                    and self.p.clock() - state.claimed_at < self.p.options.claim_stale_s
                )
            ):
                raise exc
        message = f"this row failed on its last delivery ({self.receives}): {type(exc).__name__}: {exc}"
        logger.exception("task failed on its last delivery", extra=self.log)
        if not self.record(FAILED, error={"type": "internal", "message": message[:1000]}, cost=self.paid):
            raise exc

    def failed_cost(self, exc: ProviderError) -> float:
        """What a failed request was charged: the provider's price, or - for a paid answer whose images
        could not be fetched from a provider that reports none - the stack's price for its images."""
        if exc.cost is None and exc.kind == "download_failed":
            return self.p.options.prices.get(self.task.provider, 0.0) * self.task.n
        return exc_cost(exc)

    def record(
        self,
        status: str,
        *,
        images: list[str] | None = None,
        error: dict[str, str] | None = None,
        request_id: str | None = None,
        cost: float = 0.0,
    ) -> bool:
        task = self.task
        outcome = {
            "name": self.name,
            "id": task.row_id,
            "row": task.row_number,
            "images": images or [],
            "error": error,
            "provider": task.provider,
            "model": self.model,
            "request_id": request_id or task.prediction_id,
            "cost": round(cost, 6),
            "attempt": task.attempts + 1,
            "throttles": task.throttles,
            "handbacks": task.handbacks,
            "answers_lost": self.answers_lost,
            "seconds": round(self.p.clock() - (task.submitted_at or self.started), 3),
        }
        # An outcome decided without a paid call (cancelled, stopped) lands only under this delivery's
        # own claim; a paid one (or a failure) lands unless the row already has an outcome.
        claimed_at = self.claim.claimed_at if self.claim is not None and not images and not cost else None
        if not self.state.finish(
            task.job_id, self.name, status, outcome, reserved=self.reserved, claimed_at=claimed_at
        ):
            logger.info("task finished by another delivery", extra=self.log)
            return False
        self.claim = None
        if status == SUCCEEDED:
            logger.info("task succeeded", extra={**self.log, "images": images, "request_id": request_id})
        else:
            self.batch.count(task.provider, "TasksFailed" if status == FAILED else "TasksCancelled")
            logger.warning(f"task {status}", extra={**self.log, "error": error})
        self.batch.count(task.provider, "Cost", round(cost, 6))
        self.batch.count(task.provider, "AnswersLost", self.answers_lost)
        return True


def exc_cost(exc: ProviderError) -> float:
    """What a failed request was charged as the provider reported it, else 0."""
    return float(getattr(exc, "cost", None) or 0.0)
