"""DeadLetterRecorderFunction: a task that reached the dead-letter queue - its invocations crashed or
timed out `TaskMaxReceiveCount` times, or it is a poison message - is settled by what its record says,
so its job still finishes and no row is lost, and nothing paid is thrown away:

- an outcome on record (the generator finished it, then crashed before the message was deleted): kept
  as it is - a failed one gets the message for `imagepipe redrive`;
- a prediction on record (asynchronous API, already paid): sent back to TasksQueue to be resumed, never
  submitted again - while it is younger than MaxGenerationSeconds, then recorded failed (timeout);
- a claim younger than the generator's Timeout and a minute (another delivery may be calling the API
  right now): left in the queue and looked at again after its VisibilityTimeout;
- anything else: recorded failed with its last error, the message kept for `imagepipe redrive`.

A message that is not a task at all is logged once with its body, counted (DeadLettersUnreadable, which
has an alarm) and let go: retrying it cannot make it readable. If its job and row id can be read, that row
is recorded failed so its job still finishes."""

from __future__ import annotations

import json
import time
from functools import cache
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ValidationError

from imagepipe import aws
from imagepipe.contract import ImageTask, safe_name
from imagepipe.jobstate import FAILED, FINISHED, SUBMITTING, JobState
from imagepipe.observability import logger, metrics, tracer
from imagepipe.providers import provider_class
from imagepipe.settings import DeadLetterSettings

# A batch whose every task waits on a live claim is answered item by item, not failed as a whole.
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
LOGGED_BODY_CHARS = 32 * 1024


class ClaimInFlight(Exception):
    """Another delivery of the task may be calling the API right now: look again later."""


@cache
def _clients(table: str, retention_days: int) -> tuple[Any, JobState]:
    return aws.client("sqs"), JobState(aws.table(table), retention_days=retention_days)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    settings = DeadLetterSettings.from_env()
    sqs, state = _clients(settings.jobs_table, settings.job_retention_days)
    jobs: set[str] = set()

    def record_dead_letter(record: SQSRecord) -> None:  # Powertools passes it as `record`
        try:
            task = ImageTask.model_validate_json(record.body)
        except ValidationError as exc:
            _unreadable(state, record, exc, jobs)
            return
        receives = int(record.attributes.approximate_receive_count or 0)
        job = settle(state, sqs, settings, task, receives, now=time.time())
        if job:
            jobs.add(job)

    response = process_partial_response(
        event=event, record_handler=record_dead_letter, processor=processor, context=context
    )
    state.hand_to_finisher(sqs, settings.finisher_queue_url, jobs)
    return response


def settle(
    state: JobState, sqs: Any, settings: DeadLetterSettings, task: ImageTask, receives: int, *, now: float
) -> str | None:
    """Settle one dead-lettered task by its record; returns its job id when the job may now be done."""
    name = task.image_name
    log = {"job_id": task.job_id, "row_id": task.row_id}
    record = state.task(task.job_id, name)
    if record is not None and record.status in FINISHED:
        logger.info("dead-lettered task already has an outcome: kept", extra={**log, "status": record.status})
        if record.status == FAILED:
            state.keep_dead_letter(task.job_id, name, task.model_dump_json())
        return task.job_id
    if record is not None and record.prediction_id:
        age = now - (record.submitted_at or now)
        if age < settings.max_generation_seconds:
            resumed = task.model_copy(
                update={
                    "prediction_id": record.prediction_id,
                    "submitted_at": record.submitted_at,
                    "handbacks": task.handbacks + 1,
                }
            )
            sqs.send_message(
                QueueUrl=settings.tasks_queue_url,
                MessageBody=resumed.model_dump_json(),
                DelaySeconds=settings.poll_delay_seconds,
            )
            metrics.add_metric(name="DeadLettersResumed", unit=MetricUnit.Count, value=1)
            logger.warning(
                "dead-lettered task has a paid prediction: sent back to be resumed",
                extra={**log, "prediction_id": record.prediction_id},
            )
            return None
        error = {
            "type": "timeout",
            "message": f"the prediction {record.prediction_id} was not finished {age:.0f} s after it was "
            "submitted, and its task reached the dead-letter queue",
        }
    elif (
        record is not None
        and record.status == SUBMITTING
        and now - record.claimed_at < settings.generator_timeout_seconds + 60
    ):
        logger.info("dead-lettered task is claimed by a live delivery: looked at again later", extra=log)
        raise ClaimInFlight(f"task {name} of job {task.job_id} is claimed by a live delivery")
    else:
        error = state.last_error(task.job_id, name) or {
            "type": "dead_letter",
            "message": f"the task was delivered {receives} time(s) without an outcome (its invocations "
            "crashed or timed out) and was moved to the dead-letter queue",
        }
    outcome = {
        "name": name,
        "id": task.row_id,
        "row": task.row_number,
        "images": [],
        "error": error,
        "provider": task.provider,
        "model": task.model or provider_class(task.provider).default_model,
        "request_id": (record.prediction_id if record else None) or task.prediction_id,
        "cost": 0.0,
        "attempt": receives,
        "handbacks": task.handbacks,
    }
    if state.finish(task.job_id, name, FAILED, outcome):
        metrics.add_metric(name="TasksDeadLettered", unit=MetricUnit.Count, value=1)
        logger.warning("task dead-lettered: recorded failed", extra={**log, "error": error})
    state.keep_dead_letter(task.job_id, name, task.model_dump_json())
    return task.job_id


def _unreadable(state: JobState, record: SQSRecord, exc: ValidationError, jobs: set[str]) -> None:
    """Logged once with its body, counted, let go. A row whose job and id are still readable ends failed."""
    body = record.body or ""
    metrics.add_metric(name="DeadLettersUnreadable", unit=MetricUnit.Count, value=1)
    logger.error(
        "unreadable message in the tasks' dead-letter queue: logged and deleted",
        extra={
            "message_id": record.message_id,
            "body": body[:LOGGED_BODY_CHARS],
            "body_chars": len(body),
            "errors": exc.errors(include_url=False, include_input=False)[:5],
        },
    )
    try:
        fields = json.loads(body)
        job_id, row_id = str(fields["job_id"]), str(fields["row_id"])
    except (ValueError, TypeError, KeyError):
        return
    if not row_id or state.job(job_id) is None:
        return
    known = state.task(job_id, safe_name(row_id))
    if known is not None and (known.status in FINISHED or known.prediction_id):
        return  # an outcome, or a paid prediction whose own message resumes it
    outcome = {
        "name": safe_name(row_id),
        "id": row_id,
        "row": fields.get("row_number") if isinstance(fields.get("row_number"), int) else None,
        "images": [],
        "error": {
            "type": "unreadable",
            "message": f"the row's task message could not be read: {exc.errors()[0]['msg']}",
        },
        "cost": 0.0,
    }
    if state.finish(job_id, safe_name(row_id), FAILED, outcome):
        jobs.add(job_id)
