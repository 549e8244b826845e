"""JobFinisherFunction: a job whose last row is done (a message on FinisherQueue) gets its results files,
report and final manifest, and its "ImageJob Completed" event - once."""

from functools import cache
from typing import Any

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.typing import LambdaContext

from imagepipe import aws
from imagepipe.contract import FinishRecord
from imagepipe.finisher import finish_job
from imagepipe.jobstate import JobState
from imagepipe.observability import logger, metrics, tracer
from imagepipe.settings import FinisherSettings

processor = BatchProcessor(event_type=EventType.SQS, model=FinishRecord)


@cache
def _clients(table: str, retention_days: int) -> tuple[Any, Any, JobState]:
    return aws.client("s3"), aws.client("events"), JobState(aws.table(table), retention_days=retention_days)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    settings = FinisherSettings.from_env()
    s3, events, state = _clients(settings.jobs_table, settings.job_retention_days)

    def finish(record: FinishRecord) -> None:
        finish_job(
            s3=s3,
            events=events,
            state=state,
            bucket=settings.output_bucket,
            job_id=record.body.job_id,
            bus=settings.event_bus_name,
            source=settings.event_source,
        )

    return process_partial_response(event=event, record_handler=finish, processor=processor, context=context)
