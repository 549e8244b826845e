"""DeadLetterRecorderFunction: a task that reached the dead-letter queue - its tries used up, or its
invocations crashed or timed out - ends failed with a reason, so its job still finishes and no row is
ever lost. The message is kept with the row's record for `imagepipe redrive`."""

from functools import cache
from typing import Any

import boto3
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.typing import LambdaContext

from imagepipe.contract import TaskRecord
from imagepipe.jobstate import FAILED, JobState
from imagepipe.observability import logger, metrics, tracer
from imagepipe.providers import provider_class
from imagepipe.settings import DeadLetterSettings

processor = BatchProcessor(event_type=EventType.SQS, model=TaskRecord)


@cache
def _clients(table: str) -> tuple[Any, JobState]:
    return boto3.client("sqs"), JobState(boto3.resource("dynamodb").Table(table))


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    settings = DeadLetterSettings.from_env()
    sqs, state = _clients(settings.jobs_table)
    jobs: set[str] = set()

    def record_dead_letter(record: TaskRecord) -> None:  # Powertools passes it as `record`
        task, name = record.body, record.body.image_name
        receives = int(record.attributes.ApproximateReceiveCount)
        error = state.last_error(task.job_id, name) or {
            "type": "dead_letter",
            "message": f"the task was delivered {receives} time(s) without an outcome (its invocations crashed "
            "or timed out) and was moved to the dead-letter queue",
        }
        outcome = {
            "name": name,
            "id": task.row_id,
            "row": task.row_number,
            "images": [],
            "error": error,
            "provider": task.provider,
            "model": task.model or provider_class(task.provider).default_model,
            "request_id": task.prediction_id,
            "cost": 0.0,
            "attempt": receives,
            "handbacks": task.handbacks,
        }
        # A no-op when the generator recorded the failure on its last attempt (the usual way here).
        if state.finish(task.job_id, name, FAILED, outcome):
            metrics.add_metric(name="TasksDeadLettered", unit=MetricUnit.Count, value=1)
            logger.warning(
                "task dead-lettered: recorded failed", extra={"job_id": task.job_id, "error": error}
            )
        state.keep_dead_letter(task.job_id, name, record.body.model_dump_json())
        jobs.add(task.job_id)

    response = process_partial_response(
        event=event, record_handler=record_dead_letter, processor=processor, context=context
    )
    state.hand_to_finisher(sqs, settings.finisher_queue_url, jobs)
    return response
