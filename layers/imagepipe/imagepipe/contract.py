"""The task message that crosses TasksQueue (one per input row), and the names derived from it."""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any, Literal

from aws_lambda_powertools.utilities.parser.models import SqsRecordModel
from pydantic import BaseModel, ConfigDict, Field, Json, model_validator

TASK_VERSION = 2
MAX_PROMPT_CHARS = 4000
MAX_ROW_ID_CHARS = 256
MIN_SIDE, MAX_SIDE, SIDE_STEP = 64, 2048, 8
DEFAULT_SIDE = 1024
MAX_IMAGES_PER_ROW = 10
PROVIDER_NAMES = ("atlascloud", "qianfan", "openai", "baidu-oauth")
# Request fields a row sets through its own columns: its `params` may not set them too.
RESERVED_PARAMS = ("prompt", "model", "n")
DEFAULT_PROVIDER = "atlascloud"
# A local row's provider: the user's own ComfyUI, reached by the agent (never by the generator).
LOCAL_PROVIDER = "comfyui"
BACKENDS = ("cloud", "local")
# The columns that name an input image; each is a full s3:// URI in the input bucket once split.
IMAGE_COLUMNS = ("init_image", "mask_image", "control_image", "reference_image")
# A workflow is a file name on the agent's machine (<name>.json): never a path.
WORKFLOW_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$"
# The fields only a local task sets (see ImageTask.body).
LOCAL_FIELDS = ("backend", "workflow", *IMAGE_COLUMNS, "controlnet", "columns")
S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.+$"
MAX_REASON_CHARS = 2000

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,79}$"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
# A changed id's name ends in "-" and 26 base32 letters: 128 bits of SHA-256 of the id (see safe_name).
_HASHED = re.compile(r"-[a-z2-7]{26}$")


class ImageTask(BaseModel):
    """One row of an input file, ready for its image API. Version 2.

    The splitter resolves `provider` (the row's, else the stack's default) so the generator never
    guesses. `prediction_id`, `handbacks` and `reserved` are set only on a task handed back to the
    queue while its asynchronous generation is still running; `attempts`, `throttles` and
    `first_failed_at` on a task sent again after a retryable failure (older messages parse too).

    A local task (`backend="local"`, for the agent beside the user's ComfyUI) has the provider
    "comfyui", and may carry a `workflow`, input images (s3:// URIs in the input bucket) and the
    row's other `columns` for the workflow's placeholders. A cloud task has none of those, so a
    cloud message looks the same to the generator as before they existed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[2] = TASK_VERSION
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    row_id: str = Field(min_length=1, max_length=MAX_ROW_ID_CHARS)
    row_number: int = Field(ge=1, description="1-based data row in the input file (header excluded)")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    width: int = Field(DEFAULT_SIDE, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_STEP)
    height: int = Field(DEFAULT_SIDE, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_STEP)
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_ROW, description="images to make for this row")
    provider: Literal["atlascloud", "qianfan", "openai", "baidu-oauth", "comfyui"] = DEFAULT_PROVIDER
    model: str | None = Field(None, max_length=200, description="overrides the stack's model for this row")
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    steps: int | None = Field(None, ge=1, le=200)
    guidance: float | None = Field(None, ge=0, le=50)
    params: dict[str, Any] = Field(default_factory=dict, description="merged into the provider's request")
    # Set when an asynchronous generation outlived an invocation and the task came back to the queue.
    prediction_id: str | None = Field(None, max_length=200)
    handbacks: int = Field(0, ge=0)
    submitted_at: float | None = Field(None, description="epoch seconds of the accepted submit")
    # Set on a task sent again after a retryable failure (the generator's own backoff schedule).
    attempts: int = Field(0, ge=0, description="transient failures so far (rate limits not counted)")
    throttles: int = Field(0, ge=0, description="rate-limit answers so far")
    first_failed_at: float | None = Field(None, description="epoch seconds of the first failure")
    # The job's budget reservation its claim holds (USD), carried by a handed-back prediction.
    reserved: float = Field(0.0, ge=0)
    # The local route (issue 12): only on a task for LocalTasksQueue.
    backend: Literal["cloud", "local"] = "cloud"
    workflow: str | None = Field(None, pattern=WORKFLOW_PATTERN)
    init_image: str | None = Field(None, pattern=S3_URI_PATTERN, max_length=1100)
    mask_image: str | None = Field(None, pattern=S3_URI_PATTERN, max_length=1100)
    control_image: str | None = Field(None, pattern=S3_URI_PATTERN, max_length=1100)
    reference_image: str | None = Field(None, pattern=S3_URI_PATTERN, max_length=1100)
    controlnet: str | None = Field(None, min_length=1, max_length=200)
    columns: dict[str, str] = Field(default_factory=dict, description="extra columns for placeholders")

    @model_validator(mode="after")
    def _route_fits(self) -> ImageTask:
        # The generator must never get a ComfyUI row, nor the agent a cloud one.
        if (self.backend == "local") != (self.provider == LOCAL_PROVIDER):
            raise ValueError(f"backend {self.backend!r} does not fit provider {self.provider!r}")
        local_only = [*IMAGE_COLUMNS, "workflow", "controlnet"]
        if self.backend == "cloud" and (self.columns or any(getattr(self, f) for f in local_only)):
            raise ValueError("a cloud task has no workflow, input images, controlnet or columns")
        if self.mask_image and not self.init_image:
            raise ValueError("mask_image needs init_image")
        if bool(self.control_image) != bool(self.controlnet):
            raise ValueError("control_image and controlnet come together")
        return self

    @property
    def image_name(self) -> str:
        return safe_name(self.row_id)

    def body(self) -> str:
        """The task as an SQS message body. A cloud task leaves the local route's fields out (they are at
        their defaults), so a generator deployed before them still parses it during a rolling deploy."""
        return self.model_dump_json(exclude=set(LOCAL_FIELDS) if self.backend == "cloud" else None)

    @property
    def images(self) -> dict[str, str]:
        """The input images this row names: {column: s3 URI}."""
        return {name: uri for name in IMAGE_COLUMNS if (uri := getattr(self, name))}


class TaskRecord(SqsRecordModel):
    """An SQS record whose body is an ImageTask (Powertools parses and validates it)."""

    body: Json[ImageTask]  # type: ignore[assignment]


class LocalOutcome(BaseModel):
    """The message on LocalOutcomesQueue: what the agent made of one local task.

    Sent once the row is done for good; a task to retry later sends nothing (the agent hands the
    task back to its queue). `images` are the output-bucket keys the agent wrote, each
    JobLayout(job_id).image_key(task.image_name, i, "png"). Unknown fields are ignored, so an agent
    newer than the stack still gets its outcomes recorded."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    row_id: str = Field(min_length=1, max_length=MAX_ROW_ID_CHARS)
    row_number: int = Field(ge=1)
    status: Literal["succeeded", "failed"]
    images: list[str] = Field(default_factory=list, max_length=MAX_IMAGES_PER_ROW)
    reason: str | None = Field(None, max_length=MAX_REASON_CHARS)
    error_type: str | None = Field(None, max_length=200)
    prompt_id: str | None = Field(None, max_length=200)
    workflow: str | None = Field(None, max_length=200)
    gpu_seconds: float = Field(0, ge=0)

    @model_validator(mode="after")
    def _complete(self) -> LocalOutcome:
        if self.status == "succeeded" and not self.images:
            raise ValueError("a succeeded outcome names the images it wrote")
        if self.status == "failed" and not self.reason:
            raise ValueError("a failed outcome says why")
        return self


class LocalOutcomeRecord(SqsRecordModel):
    """An SQS record whose body is a LocalOutcome (Powertools parses and validates it)."""

    body: Json[LocalOutcome]  # type: ignore[assignment]


class FinishRequest(BaseModel):
    """The message on FinisherQueue: this job's last row is done."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: str = Field(pattern=JOB_ID_PATTERN)


class FinishRecord(SqsRecordModel):
    body: Json[FinishRequest]  # type: ignore[assignment]


def safe_name(row_id: str) -> str:
    """A file name made from a row id: only [A-Za-z0-9_-], never empty, never a path.

    An id that is already such a name (at most 80 characters, no leading or trailing '_' or '-')
    is its own name. Any other id - and any id that ends like a changed one - gets a readable start
    (its first 80 safe characters, else "row") and 128 bits of SHA-256 of the whole id, in base32:
    `a b` -> `a_b-<26 letters>`. Two different ids share a name only if SHA-256 collides in its first
    128 bits (about 1 in 10^19 for a billion ids): an unchanged name never ends like a changed one,
    and two changed names are equal only when their hashes are.
    """
    slug = _UNSAFE.sub("_", row_id).strip("_-")[:80] or "row"
    if slug != row_id or _HASHED.search(row_id):
        digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).digest()[:16]
        slug = f"{slug}-{base64.b32encode(digest).decode('ascii').rstrip('=').lower()}"
    return slug


def job_stem(file_stem: str) -> str:
    """The readable start of a job id made from a file name."""
    return safe_name(file_stem).split("-")[0][:40] or "job"
