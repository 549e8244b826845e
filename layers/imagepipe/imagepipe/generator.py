"""Making the images for one task and recording its outcome under the job's prefix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from aws_lambda_powertools.metrics import MetricUnit

from imagepipe.atlas import GeneratedImage, ImageApiError
from imagepipe.contract import ImageTask, TaskRecord
from imagepipe.layout import STATUS_FAILED, STATUS_SUCCEEDED, JobLayout
from imagepipe.observability import logger, metrics
from imagepipe.records import now_iso, put_json


class ImageApi(Protocol):
    def generate(
        self, *, prompt: str, negative_prompt: str, width: int, height: int, n: int, model: str | None
    ) -> list[GeneratedImage]: ...


@dataclass
class TaskProcessor:
    api: ImageApi
    s3: Any
    bucket: str
    max_attempts: int

    def handle_record(self, record: TaskRecord) -> None:
        """Powertools' record handler: returning marks the message done, raising marks it for retry."""
        self.process(record.body, attempt=int(record.attributes.ApproximateReceiveCount))

    def process(self, task: ImageTask, attempt: int) -> None:
        layout = JobLayout(task.job_id)
        log = {"job_id": task.job_id, "row_id": task.row_id, "attempt": attempt}
        last_attempt = attempt >= self.max_attempts
        try:
            images = self.api.generate(
                prompt=task.prompt,
                negative_prompt=task.negative_prompt,
                width=task.width,
                height=task.height,
                n=task.n,
                model=task.model,
            )
            keys = []
            for index, image in enumerate(images):
                key = layout.image_key(task.image_name, index, image.extension)
                self.s3.put_object(
                    Bucket=self.bucket, Key=key, Body=image.data, ContentType=image.content_type
                )
                keys.append(key)
        except ImageApiError as exc:
            if exc.retryable and not last_attempt:
                logger.warning("image request failed, will retry", extra={**log, "error": exc.as_record()})
                raise
            self._record_failure(task, layout, exc.as_record(), attempt)
            if exc.retryable:
                raise  # out of attempts: SQS moves the message to the dead-letter queue
            return  # a final refusal: the message is done, the row is failed
        except Exception as exc:
            if last_attempt:
                self._record_failure(
                    task, layout, {"type": "internal", "message": f"{type(exc).__name__}: {exc}"}, attempt
                )
            raise
        put_json(
            self.s3,
            self.bucket,
            layout.outcome_key(task.image_name, STATUS_SUCCEEDED),
            {
                "id": task.row_id,
                "row": task.row_number,
                "status": STATUS_SUCCEEDED,
                "images": keys,
                "attempt": attempt,
                "finished_at": now_iso(),
            },
        )
        metrics.add_metric(name="ImagesGenerated", unit=MetricUnit.Count, value=len(keys))
        logger.info("task succeeded", extra={**log, "images": keys})

    def _record_failure(
        self, task: ImageTask, layout: JobLayout, error: dict[str, str], attempt: int
    ) -> None:
        put_json(
            self.s3,
            self.bucket,
            layout.outcome_key(task.image_name, STATUS_FAILED),
            {
                "id": task.row_id,
                "row": task.row_number,
                "status": STATUS_FAILED,
                "error": error,
                "attempt": attempt,
                "finished_at": now_iso(),
            },
        )
        metrics.add_metric(name="TasksFailed", unit=MetricUnit.Count, value=1)
        logger.error(
            "task failed",
            extra={"job_id": task.job_id, "row_id": task.row_id, "attempt": attempt, "error": error},
        )
