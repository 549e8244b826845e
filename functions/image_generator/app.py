"""ImageGeneratorFunction: a batch of tasks from TasksQueue becomes images in the output bucket. The
batch's tasks run concurrently; only the failed messages go back to SQS (partial batch response)."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import httpx
from aws_lambda_powertools.utilities.batch import (
    AsyncBatchProcessor,
    EventType,
    async_process_partial_response,
)
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ValidationError

from imagepipe import aws
from imagepipe.contract import TaskRecord
from imagepipe.generator import GeneratorOptions, TaskProcessor
from imagepipe.jobstate import JobState
from imagepipe.observability import logger, metrics, tracer
from imagepipe.providers import ProviderConfig, provider_class
from imagepipe.ratelimit import RateLimiter
from imagepipe.settings import GeneratorSettings

# A batch in which every task failed is still an ordinary partial response (every message
# listed), not a function error: the failures are the tasks', already logged and recorded.
processor = AsyncBatchProcessor(
    event_type=EventType.SQS, model=TaskRecord, raise_on_entire_batch_failure=False
)
# The tasks of one batch (at most 10) wait on the network side by side.
THREADS = 10
_threads = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="task")
# Time kept back from the function's Timeout for recording outcomes after the last poll or call: no
# provider call runs into it (every HTTP call's timeout is cut to the time left before it).
_RESERVE_S = 20.0


def _per_thread(table_name: str, retention_days: int, threads: int):
    """A JobState per thread: boto3 resources (the Table) are not thread-safe, so each task thread gets
    its own - made here for the pool's `threads`, on one shared client (`aws.tables`: a client per thread
    would load botocore's service model once per thread, a quarter of a second of init for eleven). Made at
    init, a cold batch's threads start on them at once."""
    local = threading.local()
    lock = threading.Lock()
    spare = [JobState(table, retention_days=retention_days) for table in aws.tables(table_name, threads)]

    def state() -> JobState:
        if getattr(local, "state", None) is None:
            with lock:
                ready = spare.pop() if spare else None
            local.state = ready or JobState(aws.table(table_name), retention_days=retention_days)
        return local.state

    return state


@cache
def _task_processor(settings: GeneratorSettings) -> TaskProcessor:
    # Built once per execution environment: HTTP connection pools, tokens and keys outlive invocations.
    http = httpx.Client(timeout=settings.http_timeout_seconds, limits=httpx.Limits(max_connections=20))
    keys = settings.keys()

    @cache
    def provider(name: str):
        options = {"path": settings.baidu_text2image_path} if name == "baidu-oauth" else {}
        model = settings.default_model if name == settings.default_provider else None
        return provider_class(name)(
            ProviderConfig(
                base_url=settings.base_url(name), keys=keys, http=http, model=model, options=options
            )
        )

    return TaskProcessor(
        providers=provider,
        s3=aws.client("s3"),
        sqs=aws.client("sqs"),
        # THREADS task threads and the main thread
        states=_per_thread(settings.jobs_table, settings.job_retention_days, THREADS + 1),
        limiter=(
            RateLimiter(aws.client("dynamodb"), settings.jobs_table, settings.rate_limits())
            if settings.shared_rate_limiter
            else None
        ),
        options=GeneratorOptions(
            bucket=settings.output_bucket,
            queue_url=settings.tasks_queue_url,
            finisher_queue_url=settings.finisher_queue_url,
            max_attempts=settings.task_max_attempts,
            retry_window_s=settings.task_retry_window_seconds,
            retry_base_s=settings.retry_base_delay_seconds,
            retry_max_s=settings.retry_max_delay_seconds,
            max_receives=settings.task_max_receive_count,
            poll_interval_s=settings.poll_interval_seconds,
            poll_delay_s=settings.poll_delay_seconds,
            max_generation_s=settings.max_generation_seconds,
            claim_stale_s=settings.claim_stale_seconds,
            prices=settings.prices(),
        ),
    )


def _init() -> None:
    """Lambda's init phase: the clients, the connection pool and the keys' provider are made once per
    execution environment before its first invocation (AWS: "initialize SDK clients outside the function
    handler"), on one thread - not by ten task threads at once inside the first invocation, where ten
    environments starting together spent seconds. Init is billed too (since August 2025): the saving is
    the contention. Settings this environment does not have (a test importing the module): the first
    invocation makes them."""
    try:
        settings = GeneratorSettings.from_env()
    except ValidationError:
        return
    _task_processor(settings)


_init()


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    settings = GeneratorSettings.from_env()
    tasks = _task_processor(settings)
    remaining_s = context.get_remaining_time_in_millis() / 1000 - _RESERVE_S
    now = time.time()
    poll_until = now + max(0.0, min(settings.poll_budget_seconds, remaining_s))

    batch = tasks.batch(poll_until, until=now + max(0.0, remaining_s), tasks=len(event.get("Records", [])))

    async def record_handler(record: TaskRecord) -> None:
        await asyncio.get_running_loop().run_in_executor(_threads, batch.handle_record, record)

    response = async_process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
    try:
        batch.finish()  # after the rows are recorded: a job whose last row this was goes to the finisher
    finally:
        batch.flush_metrics()
    return response
