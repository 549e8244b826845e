"""CsvSplitterFunction: an uploaded CSV/JSONL (S3 event) becomes one task per row on TasksQueue."""

from dataclasses import asdict
from functools import cache
from typing import Any
from urllib.parse import unquote_plus

import boto3
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import S3Model
from aws_lambda_powertools.utilities.typing import LambdaContext

from imagepipe.observability import logger, metrics, tracer
from imagepipe.rows import RowDefaults
from imagepipe.settings import SplitterSettings
from imagepipe.splitter import provider_check, split_object


@cache
def _clients() -> tuple[Any, Any]:
    return boto3.client("s3"), boto3.client("sqs")


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    if event.get("Event") == "s3:TestEvent":
        # S3 sends this once when a notification is configured; there is no file to split.
        logger.info("skipping s3:TestEvent")
        return {"jobs": []}
    settings = SplitterSettings.from_env()
    s3, sqs = _clients()
    check = provider_check(settings.keys())
    defaults = RowDefaults(provider=settings.default_provider, model=settings.default_model)
    jobs = []
    for record in parse(event=event, model=S3Model).Records:
        key = unquote_plus(record.s3.object.key)  # S3 events carry URL-encoded keys ('+' for spaces)
        result = split_object(
            s3=s3,
            sqs=sqs,
            bucket=record.s3.bucket.name,
            key=key,
            queue_url=settings.tasks_queue_url,
            output_bucket=settings.output_bucket,
            check=check,
            defaults=defaults,
        )
        metrics.add_metric(name="RowsQueued", unit=MetricUnit.Count, value=result.queued)
        metrics.add_metric(name="RowsRejected", unit=MetricUnit.Count, value=result.rejected)
        logger.info("file split", extra={"key": key, **asdict(result)})
        jobs.append(asdict(result))
    return {"jobs": jobs}
