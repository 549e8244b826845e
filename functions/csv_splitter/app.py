"""CsvSplitterFunction: an uploaded CSV/JSONL (an S3 event, directly or through EventBridge, SQS or SNS) or
an "ImageJob Requested" event becomes a job: one task per row on TasksQueue."""

import hashlib
import json
from dataclasses import asdict
from functools import cache
from typing import Any

import boto3
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from imagepipe.contract import job_stem
from imagepipe.jobstate import JobState
from imagepipe.observability import logger, metrics, tracer
from imagepipe.rows import RowDefaults
from imagepipe.settings import SplitterSettings
from imagepipe.splitter import SplitTarget, provider_check, split_object
from imagepipe.triggers import InlineRequest, TriggerError, job_requests


@cache
def _clients() -> tuple[Any, Any, Any]:
    return boto3.client("s3"), boto3.client("sqs"), boto3.resource("dynamodb")


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    settings = SplitterSettings.from_env()
    try:
        requests = job_requests(event, default_bucket=settings.input_bucket)
    except TriggerError as exc:
        # Nothing a retry can fix: say why once, in the log, and do not fail the invocation.
        logger.error("event ignored", extra={"reason": str(exc)})
        return {"jobs": [], "ignored": str(exc)}
    if not requests:
        return {"jobs": []}
    s3, sqs, dynamodb = _clients()
    target = SplitTarget(
        queue_url=settings.tasks_queue_url,
        output_bucket=settings.output_bucket,
        state=JobState(dynamodb.Table(settings.jobs_table)),
        finisher_queue_url=settings.finisher_queue_url,
        check=provider_check(settings.keys()),
        defaults=RowDefaults(provider=settings.default_provider, model=settings.default_model),
        default_max_cost=settings.default_max_cost,
    )
    jobs = []
    for request in requests:
        if isinstance(request, InlineRequest):
            bucket, key, job_id = _store_inline(s3, settings.output_bucket, request)
        else:
            bucket, key, job_id = request.bucket, request.key, request.job_id
        result = split_object(
            s3=s3,
            sqs=sqs,
            target=target,
            bucket=bucket,
            key=key,
            job_id=job_id,
            max_cost=request.max_cost,
            trigger=request.source,
        )
        metrics.add_metric(name="RowsQueued", unit=MetricUnit.Count, value=result.queued)
        metrics.add_metric(name="RowsRejected", unit=MetricUnit.Count, value=result.rejected)
        logger.info("file split", extra={"key": key, **asdict(result)})
        jobs.append(asdict(result))
    return {"jobs": jobs}


def _store_inline(s3: Any, bucket: str, request: InlineRequest) -> tuple[str, str, str]:
    """Rows carried in the event become a JSONL file under the job's prefix, split like any upload.
    Without a job id the rows name the job, so the same event delivered twice is one job."""
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in request.rows).encode()
    job_id = request.job_id or f"{job_stem(request.name)}-{hashlib.sha256(body).hexdigest()[:10]}"
    key = f"jobs/{job_id}/input.jsonl"
    s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/x-ndjson")
    return bucket, key, job_id
