"""LocalOutcomeRecorderFunction (HybridMode=enabled): the agent beside the user's ComfyUI reports each local
row's outcome on LocalOutcomesQueue; it is recorded with the generator's job bookkeeping (first outcome
wins, counters), and a job whose last row it was goes to the finisher. A message that is not an outcome
fails its record (Powertools' BatchProcessor) and ends in LocalOutcomesDeadLetterQueue.

Its second event source is LocalTasksDeadLetterQueue: a local task no agent finished is recorded failed
(the first outcome still wins: a row the agent did finish keeps its outcome), so its job finishes."""

from functools import cache
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.typing import LambdaContext

from imagepipe import aws
from imagepipe.contract import LocalOutcome, LocalOutcomeRecord, TaskRecord
from imagepipe.jobstate import JobState
from imagepipe.localoutcomes import dead_task_outcome, record_outcome
from imagepipe.observability import logger, metrics, tracer
from imagepipe.settings import LocalOutcomeSettings

outcomes = BatchProcessor(
    event_type=EventType.SQS, model=LocalOutcomeRecord, raise_on_entire_batch_failure=False
)
dead_tasks = BatchProcessor(event_type=EventType.SQS, model=TaskRecord, raise_on_entire_batch_failure=False)


@cache
def _clients(table: str, retention_days: int) -> tuple[Any, JobState]:
    return aws.client("sqs"), JobState(aws.table(table), retention_days=retention_days)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    settings = LocalOutcomeSettings.from_env()
    sqs, state = _clients(settings.jobs_table, settings.job_retention_days)
    jobs: set[str] = set()

    def keep(outcome: LocalOutcome) -> None:
        jobs.add(
            outcome.job_id
        )  # a duplicate too: the delivery that recorded it may have died before the hand-off
        if record_outcome(state, outcome):
            name = "LocalRowsSucceeded" if outcome.status == "succeeded" else "LocalRowsFailed"
            metrics.add_metric(name=name, unit=MetricUnit.Count, value=1)
            metrics.add_metric(name="LocalGpuSeconds", unit=MetricUnit.Seconds, value=outcome.gpu_seconds)

    def keep_outcome(record: LocalOutcomeRecord) -> None:  # Powertools passes it as `record`
        keep(record.body)

    def keep_dead_task(record: TaskRecord) -> None:
        logger.warning(
            "local task dead-lettered", extra={"job_id": record.body.job_id, "row_id": record.body.row_id}
        )
        keep(dead_task_outcome(record.body, int(record.attributes.ApproximateReceiveCount)))

    source = (event.get("Records") or [{}])[0].get("eventSourceARN")
    if source == settings.local_tasks_dead_letter_queue_arn:
        response = process_partial_response(
            event=event, record_handler=keep_dead_task, processor=dead_tasks, context=context
        )
    else:
        response = process_partial_response(
            event=event, record_handler=keep_outcome, processor=outcomes, context=context
        )
    for job_id in state.hand_to_finisher(sqs, settings.finisher_queue_url, jobs):
        logger.info("job's last row finished: handed to the finisher", extra={"job_id": job_id})
    return response
