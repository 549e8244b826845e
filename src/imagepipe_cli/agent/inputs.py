"""A local task as run_row's RowRequest: the row's values for the workflow's placeholders and its input
images, read from the stack's input bucket only (the splitter made every image an s3:// URI there)."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from imagepipe.contract import ImageTask
from imagepipe_cli.agent.comfyui import ComfyClient, ComfyUnavailable
from imagepipe_cli.agent.outcomes import Outcome, failed, retry_later
from imagepipe_cli.agent.runner import RowRequest
from imagepipe_cli.agent.workflows import DEFAULTS, WorkflowError, WorkflowSet, choose_workflow

MAX_IMAGE_BYTES = 50 << 20  # an input image; ComfyUI's own upload limit is about this size
MODEL_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


def row_request(
    task: ImageTask, s3: Any, input_bucket: str, client: ComfyClient, workflows: WorkflowSet | None = None
) -> RowRequest | Outcome:
    """The request for run_row, or the outcome of a row that cannot run: a missing image fails it naming the
    file; ComfyUI away while its ControlNet model is looked up hands it back. The model is looked up only when
    the row's workflow (in workflows, when given) has a {{controlnet_model}} placeholder."""
    images: dict[str, bytes] = {}
    for column, uri in task.images.items():
        data = _read_image(s3, input_bucket, column, uri)
        if isinstance(data, Outcome):
            return data
        images[column] = data
    fields: dict[str, Any] = {
        **task.columns,
        "prompt": task.prompt,
        "negative_prompt": task.negative_prompt,
        "width": task.width,
        "height": task.height,
        "n": task.n,
        "seed": task.seed,
        "steps": task.steps,
        "guidance": task.guidance,
        "model": task.model,
        "workflow": task.workflow,
        "controlnet": task.controlnet,
        **task.images,  # they choose the workflow; each placeholder gets the name ComfyUI gave its upload
    }
    if (
        task.controlnet
        and not task.columns.get("controlnet_model")
        and _uses(workflows, fields, "controlnet_model")
    ):
        try:
            model = controlnet_model(client, task.controlnet)
        except ComfyUnavailable as exc:
            return retry_later("comfyui_unavailable", str(exc))
        if isinstance(model, Outcome):
            return model
        fields["controlnet_model"] = model
    return RowRequest(task.job_id, task.row_id, fields, images)


def _uses(workflows: WorkflowSet | None, fields: dict[str, Any], placeholder: str) -> bool:
    # A workflow that names its ControlNet model itself (or uses none, like a stand-in made of core nodes)
    # must not fail for want of a model file matching the row's controlnet word.
    if workflows is None:
        return True
    try:
        return placeholder in workflows.get(choose_workflow(fields)).placeholders()
    except WorkflowError:
        return False  # run_row fails the row saying why


def _read_image(s3: Any, input_bucket: str, column: str, uri: str) -> bytes | Outcome:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if bucket != input_bucket:  # the splitter allows no other; the agent's role can read no other either
        return failed("bad_image", f"the {column} {uri} is not in the stack's input bucket {input_bucket}")
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
        if head["ContentLength"] > MAX_IMAGE_BYTES:
            size = head["ContentLength"] >> 20
            return failed(
                "bad_image", f"the {column} {key} is {size} MiB; the limit is {MAX_IMAGE_BYTES >> 20} MiB"
            )
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code"))
        # Without s3:ListBucket (the agent's policy has none) S3 answers a missing key with 403.
        if code in ("404", "NoSuchKey", "NotFound", "403", "AccessDenied"):
            return failed(
                "missing_image",
                f"the {column} {key} is not in the input bucket {bucket}: upload it next to the input "
                "file (imagepipe run and submit do) or fix the path",
            )
        raise


def controlnet_model(client: ComfyClient, name: str) -> str | Outcome:
    """The ControlNet model file for the row's `controlnet` column: a file name as it is, else the file in
    ComfyUI's models/controlnet whose name holds the word (canny, depth, openpose), the default one first."""
    if name.lower().endswith(MODEL_SUFFIXES):
        return name
    files = client.model_files("controlnet", fresh=True) or []
    found = sorted(f for f in files if name.lower() in f.lower())
    if not found:
        have = ", ".join(files) or "none"
        return failed(
            "missing_model",
            f"ComfyUI has no ControlNet model for controlnet={name!r} in models/controlnet (it has: {have})",
        )
    default = DEFAULTS["controlnet_model"]
    return default if default in found else found[0]
