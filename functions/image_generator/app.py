"""ImageGeneratorFunction: a batch of tasks from TasksQueue becomes images in the output bucket,
reporting only the failed messages back to SQS (partial batch response)."""

from functools import cache

import boto3
import httpx
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.typing import LambdaContext

from imagepipe.atlas import AtlasClient
from imagepipe.contract import TaskRecord
from imagepipe.generator import TaskProcessor
from imagepipe.observability import logger, metrics, tracer
from imagepipe.settings import GeneratorSettings

# A batch in which every task failed is still an ordinary partial response (every message
# listed), not a function error: the failures are the tasks', already logged and recorded.
processor = BatchProcessor(event_type=EventType.SQS, model=TaskRecord, raise_on_entire_batch_failure=False)


@cache
def _task_processor(settings: GeneratorSettings) -> TaskProcessor:
    # Built once per execution environment: the HTTP connection pool and the token outlive invocations.
    api = AtlasClient(
        base_url=settings.atlas_base_url,
        token_url=settings.atlas_token_url,
        model=settings.atlas_model,
        credentials=settings.credentials_provider(),
        http=httpx.Client(timeout=settings.atlas_timeout_seconds),
    )
    return TaskProcessor(
        api=api,
        s3=boto3.client("s3"),
        bucket=settings.output_bucket,
        max_attempts=settings.task_max_receive_count,
    )


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    tasks = _task_processor(GeneratorSettings.from_env())
    return process_partial_response(
        event=event, record_handler=tasks.handle_record, processor=processor, context=context
    )
