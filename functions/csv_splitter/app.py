"""CsvSplitterFunction: an uploaded CSV/JSONL/JSON (an S3 event, directly or through EventBridge, SQS or SNS)
or an "ImageJob Requested" event becomes a job: one task per row on TasksQueue. A split that runs low on
time goes on in a later invocation (a message on SplitContinuationQueue, delivered here)."""

import hashlib
import json
from dataclasses import asdict
from functools import cache
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError
from pydantic import Field

from imagepipe import aws
from imagepipe.contract import job_stem
from imagepipe.jobstate import JobState
from imagepipe.observability import logger, metrics, tracer
from imagepipe.rows import RowDefaults
from imagepipe.settings import SplitterSettings
from imagepipe.splitter import (
    Continuation,
    SplitResult,
    SplitTarget,
    continue_split,
    provider_check,
    split_object,
)
from imagepipe.triggers import DEFAULT_REQUEST_SOURCE, InlineRequest, TriggerError, job_requests

REJECTED = "rejected"  # an ImageJob Requested event refused without a job (the log says why)


class Settings(SplitterSettings):
    # Who may start jobs by event: the "ImageJob Requested" source the stack's rule takes (JobRequestSource)
    # and its own account; the function checks both again, whatever rule or wrapper delivered the event.
    job_request_source: str = Field(DEFAULT_REQUEST_SOURCE, min_length=1)
    job_request_account: str | None = None


@cache
def _clients() -> tuple[Any, Any]:
    return aws.client("s3"), aws.client("sqs")


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    settings = Settings.from_env()
    try:
        requests = job_requests(
            event,
            default_bucket=settings.input_bucket,
            request_source=settings.job_request_source,
            account=settings.job_request_account,
        )
    except TriggerError as exc:
        # Nothing a retry can fix: say why once, in the log, and do not fail the invocation.
        logger.error("event ignored", extra={"reason": str(exc)})
        metrics.add_metric(name="EventsIgnored", unit=MetricUnit.Count, value=1)
        return {"jobs": [], "ignored": str(exc)}
    if not requests:
        return {"jobs": []}
    s3, sqs = _clients()
    target = SplitTarget(
        queue_url=settings.tasks_queue_url,
        output_bucket=settings.output_bucket,
        state=JobState(aws.table(settings.jobs_table), retention_days=settings.job_retention_days),
        finisher_queue_url=settings.finisher_queue_url,
        check=provider_check(settings.keys()),
        defaults=RowDefaults(provider=settings.default_provider, model=settings.default_model),
        default_max_cost=settings.default_max_cost,
        time_left=lambda: context.get_remaining_time_in_millis() / 1000,
        continuation_queue_url=settings.split_continuation_queue_url,
        local_queue_url=settings.local_tasks_queue_url,
        input_bucket=settings.input_bucket or "",
    )
    jobs = []
    for request in requests:
        version_id = None
        if isinstance(request, Continuation):
            result = continue_split(s3=s3, sqs=sqs, target=target, request=request)
            _count(result)
            logger.info("split continued", extra={"key": request.key, **asdict(result)})
            jobs.append(asdict(result))
            continue
        if isinstance(request, InlineRequest):
            stored = _store_inline(s3, target.state, settings.output_bucket, request)
            if isinstance(stored, SplitResult):
                jobs.append(asdict(stored))
                continue
            bucket, key, job_id = stored
        else:
            bucket, key, job_id = request.bucket, request.key, request.job_id
            version_id = request.version_id
        result = split_object(
            s3=s3,
            sqs=sqs,
            target=target,
            bucket=bucket,
            key=key,
            job_id=job_id,
            max_cost=request.max_cost,
            trigger=request.source,
            version_id=version_id,
        )
        _count(result)
        logger.info("file split", extra={"key": key, **asdict(result)})
        jobs.append(asdict(result))
    return {"jobs": jobs}


def _count(result: SplitResult) -> None:
    # A split handed over counts its rows when it ends (its result then holds the whole file's counts).
    if result.status != "continued":
        metrics.add_metric(name="RowsQueued", unit=MetricUnit.Count, value=result.queued)
        metrics.add_metric(name="RowsRejected", unit=MetricUnit.Count, value=result.rejected)


def _store_inline(
    s3: Any, state: JobState, bucket: str, request: InlineRequest
) -> tuple[str, str, str] | SplitResult:
    """Rows carried in the event become a JSONL file under the job's prefix, split like any upload.
    Without a job id the rows name the job, so the same event delivered twice is one job.

    The file is written only if it does not exist (If-None-Match): a request naming the job id of another
    job never overwrites that job's input. The same request again (a redelivery, a retry after a crash)
    finds the same bytes and goes on; different rows under an existing id are refused (logged, no job)."""
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in request.rows).encode()
    job_id = request.job_id or f"{job_stem(request.name)}-{hashlib.sha256(body).hexdigest()[:10]}"
    key = f"jobs/{job_id}/input.jsonl"
    job = state.job(job_id)
    if job is not None and (job.get("source") or {}).get("key") != key:
        return _refused(
            job_id,
            f"job {job_id} exists already (from {job.get('source', {}).get('key')!r}): choose a new job_id",
        )
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/x-ndjson", IfNoneMatch="*")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in (
            "PreconditionFailed",
            "ConditionalRequestConflict",
        ):
            raise
        existing = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        if existing != body:
            return _refused(job_id, f"job {job_id} exists already with other rows: choose a new job_id")
    return bucket, key, job_id


def _refused(job_id: str, message: str) -> SplitResult:
    logger.error("ImageJob Requested refused: no job started", extra={"job_id": job_id, "reason": message})
    return SplitResult(job_id=job_id, status=REJECTED, error={"type": "job_exists", "message": message})
