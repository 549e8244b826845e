"""JobSweeperFunction (an EventBridge schedule): finds jobs left splitting, running or finishing with all
their rows done - or owing their completion event - hands them to the finisher again, and reports how
many it found as the metric JobsStuck (see imagepipe.sweeper)."""

from functools import cache
from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from imagepipe import aws
from imagepipe.jobstate import JobState
from imagepipe.observability import logger, metrics, tracer
from imagepipe.sweeper import SweeperSettings, sweep


@cache
def _clients(table: str, retention_days: int) -> tuple[Any, JobState]:
    return aws.client("sqs"), JobState(aws.table(table), retention_days=retention_days)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    settings = SweeperSettings.from_env()
    sqs, state = _clients(settings.jobs_table, settings.job_retention_days)
    stuck = sweep(
        state, sqs, settings.options(), time_left_s=lambda: context.get_remaining_time_in_millis() / 1000
    )
    return {
        "stuck": [
            {"job_id": s.job_id, "status": s.status, "reason": s.reason, "action": s.action} for s in stuck
        ]
    }
