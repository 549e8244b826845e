"""Making the images for one task through its provider and recording its outcome in JobsTable.

At most one paid request per task: the request is claimed in JobsTable before it is sent, an
asynchronous prediction id is kept before anyone waits on it, and a redelivered task resumes that
prediction instead of submitting again. A prediction still running when the invocation's poll budget
ends goes back to the queue as a new delayed message (so it never counts toward the dead-letter queue)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit

from imagepipe.contract import ImageTask, TaskRecord
from imagepipe.jobstate import CANCELLED, FAILED, FINISHED, SUCCEEDED, JobState, TaskState
from imagepipe.layout import JobLayout
from imagepipe.observability import logger, metrics
from imagepipe.providers import Action, Generation, Pending, Provider, ProviderError


class RetryLater(Exception):
    """Another delivery holds the task's claim: look again after `after_s` seconds (as a new delayed
    message, so the wait never counts toward the dead-letter queue)."""

    def __init__(self, message: str, after_s: float) -> None:
        super().__init__(message)
        self.after_s = after_s


@dataclass
class GeneratorOptions:
    bucket: str
    queue_url: str
    finisher_queue_url: str = ""
    max_attempts: int = 3
    poll_interval_s: float = 2.0
    poll_delay_s: int = 10
    max_generation_s: float = 1800.0
    claim_stale_s: float = 300.0
    prices: dict[str, float] = field(default_factory=dict)


@dataclass
class TaskProcessor:
    providers: Callable[[str], Provider]
    s3: Any
    sqs: Any
    state: JobState
    options: GeneratorOptions
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep

    def batch(self, poll_until: float) -> Batch:
        return Batch(self, poll_until)

    def process(self, task: ImageTask, attempt: int, poll_until: float, batch: Batch | None = None) -> None:
        run = _Run(self, task, attempt, poll_until, batch or Batch(self, poll_until))
        try:
            run.go()
        except ProviderError as exc:
            run.failed(exc)
        except RetryLater as exc:
            self.sqs.send_message(
                QueueUrl=self.options.queue_url,
                MessageBody=task.model_dump_json(),
                DelaySeconds=max(1, min(900, int(exc.after_s) + 1)),
            )
            logger.info(f"{exc}: looking again in {exc.after_s:.0f} s", extra=run.log)


class Batch:
    """One invocation's tasks: the job checks (cancelled? budget spent?) read once per job, and the
    completion check for every job the batch touched, once at its end."""

    def __init__(self, processor: TaskProcessor, poll_until: float) -> None:
        self.processor, self.poll_until = processor, poll_until
        self._lock = threading.Lock()
        self._stops: dict[str, dict[str, str] | None] = {}
        self.jobs: set[str] = set()

    def handle_record(self, record: TaskRecord) -> None:
        """Powertools' record handler: returning marks the message done, raising marks it for retry."""
        task = record.body
        with self._lock:
            self.jobs.add(task.job_id)
        self.processor.process(task, int(record.attributes.ApproximateReceiveCount), self.poll_until, self)

    def job_stop(self, job_id: str) -> dict[str, str] | None:
        """Why the job makes no more paid calls (cancelled, budget spent), read once per invocation."""
        with self._lock:
            if job_id in self._stops:
                return self._stops[job_id]
        state = self.processor.state
        job = state.job(job_id) or {}
        stop = None
        if job.get("cancel_requested"):
            stop = {"type": "cancelled", "message": "the job was cancelled before this row was made"}
        elif job.get("max_cost") is not None:
            spent, cap = state.counts(job_id).cost, float(job["max_cost"])
            if spent >= cap:
                stop = {
                    "type": "budget",
                    "message": f"the job's budget of ${cap:g} was spent (${spent:.4f}) before this row was made",
                }
        with self._lock:
            self._stops[job_id] = stop
        return stop

    def provider_stop(self, job_id: str, provider: str) -> dict[str, str] | None:
        """A provider that stopped the job's calls, read once per invocation (and known at once when a
        task of this batch is the one that stops it)."""
        key = f"{job_id}\0{provider}"
        with self._lock:
            if key in self._stops:
                return self._stops[key]
        stop = self.processor.state.provider_stop(job_id, provider)
        with self._lock:
            self._stops.setdefault(key, stop)
            return self._stops[key]

    def stopped(self, job_id: str, provider: str, error: dict[str, str]) -> None:
        with self._lock:
            self._stops[f"{job_id}\0{provider}"] = error

    def finish(self) -> None:
        """Hand each job whose last row just finished to the finisher, exactly once."""
        processor = self.processor
        for job_id in processor.state.hand_to_finisher(
            processor.sqs, processor.options.finisher_queue_url, self.jobs
        ):
            logger.info("job's last row finished: handed to the finisher", extra={"job_id": job_id})


@dataclass
class _Run:
    """One task in one invocation."""

    p: TaskProcessor
    task: ImageTask
    attempt: int
    poll_until: float
    batch: Batch
    started: float = 0.0
    claimed: bool = False

    def __post_init__(self) -> None:
        self.started = self.p.clock()
        self.name = self.task.image_name
        self.layout = JobLayout(self.task.job_id)
        self.log = {"job_id": self.task.job_id, "row_id": self.task.row_id, "attempt": self.attempt}
        self.provider = self.p.providers(self.task.provider)
        self.model = self.provider.model_for(self.task)
        self.answers_lost = 0

    def go(self) -> None:
        task = self.task
        if task.prediction_id:
            # A handed-back prediction: paid for already, so it is seen through whatever happens. No read
            # first: if a duplicate already finished it, recording the outcome again changes nothing.
            outcome: Generation | Pending = Pending(task.prediction_id)
            submitted_at, resumed = task.submitted_at or self.started, True
        else:
            stop = self.batch.job_stop(task.job_id) or self.batch.provider_stop(task.job_id, task.provider)
            if stop is not None:
                self.record(CANCELLED if stop["type"] in ("cancelled", "budget") else FAILED, error=stop)
                return
            # The common case - a task nobody has touched - costs one conditional write, no read.
            lost = self.p.state.claim(task.job_id, self.name, task.provider)
            state = None if lost is not None else self.claim_again()
            self.answers_lost = lost if lost is not None else self.answers_lost
            if state is not None and state.status in FINISHED:
                logger.info("task already finished: duplicate delivery ignored", extra=self.log)
                return
            if state is not None and state.prediction_id:
                # Redelivered after its prediction was submitted: resume it, never submit again.
                outcome = Pending(state.prediction_id)
                submitted_at, resumed = state.submitted_at or self.started, True
            else:
                self.claimed = True
                outcome = self.provider.run(lambda: self.provider.start(task))
                submitted_at, resumed = self.p.clock(), False
                if isinstance(outcome, Pending):
                    self.p.state.record_prediction(task.job_id, self.name, outcome.request_id, submitted_at)
                    self.claimed = (
                        False  # the prediction is on record: from here on it is resumed, never resent
                    )
        if isinstance(outcome, Pending):
            outcome = self.poll(outcome, at_once=resumed)
        if isinstance(outcome, Pending):
            self.hand_back(outcome, submitted_at)
            return
        self.succeeded(outcome)

    def claim_again(self) -> TaskState | None:
        """The claim was refused: the task has a record. Read it and decide - finished (a duplicate),
        a prediction on record (resume), a claim held by a live delivery (come back later), or one whose
        holder is gone (claim it again: counted as a lost answer, or refused for asynchronous APIs).
        Returns the state when there is nothing to claim, None once claimed."""
        state = self.p.state.task(self.task.job_id, self.name)
        if state is None or state.status in FINISHED or state.prediction_id:
            return state
        if state.status == "submitting":
            if self.p.clock() - state.claimed_at < self.p.options.claim_stale_s:
                # Another delivery of this task is calling the API right now: come back later, when it is done.
                age = self.p.clock() - state.claimed_at
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
            lost = self.p.state.claim(self.task.job_id, self.name, self.task.provider, stale=state)
        else:  # released: answered without being accepted; the earlier lost answers stay counted
            lost = self.p.state.claim(self.task.job_id, self.name, self.task.provider)
        if lost is None:
            raise RetryLater("another delivery of this task claimed it first", self.p.options.claim_stale_s)
        self.answers_lost = lost
        return None

    def poll(self, pending: Pending, *, at_once: bool) -> Generation | Pending:
        """Read the prediction until it is done or the invocation's poll budget is spent. A handed-back
        prediction is read at once (its delay has passed); a fresh one after one poll interval."""
        while True:
            if not at_once:
                if self.p.clock() + self.p.options.poll_interval_s > self.poll_until:
                    return pending
                self.p.sleep(self.p.options.poll_interval_s)
            at_once = False
            try:
                outcome = self.provider.run(lambda rid=pending.request_id: self.provider.resume(rid))
            except ProviderError as exc:
                if exc.action is not Action.RETRY:
                    raise
                logger.warning("poll failed; will poll again", extra={**self.log, "error": exc.as_record()})
                continue
            if isinstance(outcome, Generation):
                return outcome
            pending = outcome

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
            }
        )
        self.p.sqs.send_message(
            QueueUrl=self.p.options.queue_url,
            MessageBody=later.model_dump_json(),
            DelaySeconds=self.p.options.poll_delay_s,
        )
        metrics.add_metric(name="PredictionsHandedBack", unit=MetricUnit.Count, value=1)
        logger.info(
            "prediction still running: handed back to the queue",
            extra={**self.log, "prediction_id": pending.request_id, "handbacks": later.handbacks},
        )

    def succeeded(self, generation: Generation) -> None:
        keys = []
        for index, image in enumerate(generation.images):
            key = self.layout.image_key(self.name, index, image.extension)
            self.p.s3.put_object(
                Bucket=self.p.options.bucket, Key=key, Body=image.data, ContentType=image.content_type
            )
            keys.append(key)
        cost = generation.cost
        if cost is None:
            cost = self.p.options.prices.get(self.task.provider, 0.0) * len(keys)
        self.record(SUCCEEDED, images=keys, request_id=generation.request_id, cost=cost)
        metrics.add_metric(name="ImagesGenerated", unit=MetricUnit.Count, value=len(keys))

    def failed(self, exc: ProviderError) -> None:
        task = self.task
        if exc.action is Action.STOP_JOB:
            # The provider will refuse every row of this job (balance, quota, keys, region): stop calling it.
            self.p.state.stop_provider(task.job_id, task.provider, exc.as_record())
            self.batch.stopped(task.job_id, task.provider, exc.as_record())
        if self.claimed and exc.retryable:
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
                self.p.state.release(task.job_id, self.name, answer_lost=lost)
                self.answers_lost += int(lost)
        if exc.retryable and self.attempt < self.p.options.max_attempts:
            logger.warning("image request failed, will retry", extra={**self.log, "error": exc.as_record()})
            self.p.state.note_error(task.job_id, self.name, exc.as_record())
            raise exc
        self.record(FAILED, error=exc.as_record(), request_id=exc.request_id)
        if exc.retryable:
            raise exc  # out of attempts: SQS moves the message to the dead-letter queue

    def record(
        self,
        status: str,
        *,
        images: list[str] | None = None,
        error: dict[str, str] | None = None,
        request_id: str | None = None,
        cost: float = 0.0,
    ) -> None:
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
            "attempt": self.attempt,
            "handbacks": task.handbacks,
            "answers_lost": self.answers_lost,
            "seconds": round(self.p.clock() - (task.submitted_at or self.started), 3),
        }
        if not self.p.state.finish(task.job_id, self.name, status, outcome):
            logger.info("task finished by another delivery", extra=self.log)
            return
        if status == SUCCEEDED:
            logger.info("task succeeded", extra={**self.log, "images": images, "request_id": request_id})
        else:
            metrics.add_metric(
                name="TasksFailed" if status == FAILED else "TasksCancelled", unit=MetricUnit.Count, value=1
            )
            logger.warning(f"task {status}", extra={**self.log, "error": error})
        if self.answers_lost:
            metrics.add_metric(name="AnswersLost", unit=MetricUnit.Count, value=self.answers_lost)
