"""The row's controlnet word becomes a ControlNet model file only for a workflow that asks for one."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.contract import ImageTask
from imagepipe_cli.agent.comfyui import ComfyClient
from imagepipe_cli.agent.inputs import row_request
from imagepipe_cli.agent.outcomes import Outcome
from imagepipe_cli.agent.runner import RowRequest
from imagepipe_cli.agent.workflows import WorkflowSet
from imagepipe_cli.emulators.comfyui import DEFAULT_MODELS, ComfyUIEmulator

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class OneObjectS3:
    """The input bucket holding one control image."""

    def head_object(self, Bucket: str, Key: str) -> dict:  # noqa: N803 - boto3's names
        return {"ContentLength": 4}

    def get_object(self, Bucket: str, Key: str) -> dict:  # noqa: N803
        return {"Body": io.BytesIO(b"\x89PNG")}


@pytest.fixture
def comfy() -> Iterator[ComfyClient]:
    # A ComfyUI with no ControlNet model at all (a fresh install)
    emulator = ComfyUIEmulator(models={**DEFAULT_MODELS, "controlnet": []}).start()
    client = ComfyClient(emulator.base_url)
    yield client
    client.close()
    emulator.stop()


def task() -> ImageTask:
    return ImageTask(
        job_id="job-1",
        row_id="edges",
        row_number=1,
        prompt="a skyline",
        backend="local",
        provider="comfyui",
        control_image="s3://input/edges.png",
        controlnet="canny",
    )


def test_a_workflow_with_a_controlnet_model_placeholder_needs_the_model(comfy: ComfyClient) -> None:
    outcome = row_request(task(), OneObjectS3(), "input", comfy, WorkflowSet())
    assert isinstance(outcome, Outcome) and outcome.error_type == "missing_model"
    assert "controlnet='canny'" in outcome.reason


def test_a_workflow_without_one_runs_without_a_model_file(comfy: ComfyClient, tmp_path: Path) -> None:
    # examples/core-workflows/controlnet.json uses no model (a stand-in made of core nodes)
    graph = json.loads((EXAMPLES / "core-workflows" / "controlnet.json").read_text())
    assert "controlnet_model" not in json.dumps(graph)
    (tmp_path / "controlnet.json").write_text(json.dumps(graph))
    request = row_request(task(), OneObjectS3(), "input", comfy, WorkflowSet(tmp_path))
    assert isinstance(request, RowRequest)
    assert "controlnet_model" not in request.fields and request.images == {"control_image": b"\x89PNG"}
