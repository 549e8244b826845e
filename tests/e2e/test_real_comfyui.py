"""Opt-in: the agent against a real ComfyUI, not our emulator. Never runs in CI.

A ComfyUI on CPU runs workflows made of core image nodes without any model weights, so
examples/core-workflows stands in for the shipped inpaint/controlnet/txt2img workflows; the shipped ipadapter
workflow needs the custom node pack ComfyUI_IPAdapter_plus, which a fresh ComfyUI lacks. Start one with
(README: running the agent next to a real ComfyUI):

    python main.py --cpu --port 8188
    IMAGEPIPE_COMFYUI_URL=http://127.0.0.1:8188 .venv/bin/pytest tests/e2e/test_real_comfyui.py -v
"""

import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from PIL import Image

from imagepipe.jobstate import FAILED, SUCCEEDED
from imagepipe_cli.agent.comfyui import ComfyClient
from imagepipe_cli.agent.runner import RowRequest, RunSettings, run_row
from imagepipe_cli.agent.workflows import WorkflowSet

from conftest import EXAMPLES, ROOT

URL = os.environ.get("IMAGEPIPE_COMFYUI_URL")
pytestmark = pytest.mark.skipif(not URL, reason="set IMAGEPIPE_COMFYUI_URL to run against a real ComfyUI")

CORE_WORKFLOWS = EXAMPLES / "core-workflows"
SETTINGS = RunSettings(timeout_s=300, poll_s=1.0, ready_s=60)
RED, BLUE = (200, 40, 40), (20, 60, 220)


def png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def right_half_white(size: tuple[int, int]) -> bytes:
    """An inpainting mask: white (repaint) on the right half, black (keep) on the left."""
    mask = Image.new("RGB", size, (0, 0, 0))
    mask.paste((255, 255, 255), (size[0] // 2, 0, size[0], size[1]))
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    return buf.getvalue()


def near(pixel: tuple[int, ...], colour: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 3 for a, b in zip(pixel, colour, strict=False))


def inverted(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return (255 - colour[0], 255 - colour[1], 255 - colour[2])


def picture(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.fixture(scope="module")
def comfy() -> ComfyClient:
    client = ComfyClient(URL)
    stats = client.wait_ready(60)
    print(f"\nreal ComfyUI {stats['system']['comfyui_version']} at {URL}: {stats['devices'][0]['name']}")
    yield client
    client.close()


def test_rows_run_through_run_row_on_the_real_comfyui(comfy: ComfyClient) -> None:
    """The agent's core (run_row) against the real server: /upload/image, /prompt with our prompt_id, the
    WebSocket, /history and /view, and ComfyUI's own refusals and failures read as row outcomes."""
    workflows = WorkflowSet(CORE_WORKFLOWS)
    job = f"real-{uuid.uuid4().hex[:8]}"
    init, mask = png((128, 128), RED), right_half_white((64, 64))
    rows = {
        "inpaint": RowRequest(
            job,
            "inpaint",
            {"prompt": "repaint the right half", "width": 96, "height": 64, "init_image": "i.png", "mask_image": "m.png"},
            {"init_image": init, "mask_image": mask},
        ),
        "controlnet": RowRequest(
            job,
            "controlnet",
            {"prompt": "edges", "width": 80, "height": 40, "control_image": "c.png", "controlnet": "canny"},
            {"control_image": png((50, 50), BLUE)},
        ),
        "plain": RowRequest(job, "plain", {"prompt": "a plain one", "width": 32, "height": 24, "backend": "local"}),
        "ipadapter": RowRequest(
            job, "ipadapter", {"prompt": "in this style", "reference_image": "r.png"}, {"reference_image": init}
        ),
        "too_wide": RowRequest(job, "too_wide", {"prompt": "x", "width": 99999, "height": 24, "backend": "local"}),
        "not_an_image": RowRequest(
            job, "not_an_image", {"prompt": "x", "width": 16, "height": 16, "control_image": "c.png"},
            {"control_image": b"not a png at all"},
        ),
    }  # fmt: skip
    out = {name: run_row(comfy, workflows, row, SETTINGS) for name, row in rows.items()}
    for name, outcome in out.items():
        print(f"{name:13} {outcome.status:9} {outcome.workflow:10} runs={outcome.runs} {outcome.reason}")

    # Inpainting: the row's size, the masked (right) half repainted, the rest kept
    assert out["inpaint"].status == SUCCEEDED and out["inpaint"].runs == 1
    (image,) = out["inpaint"].images
    inpainted = picture(image)
    assert inpainted.size == (96, 64)
    assert near(inpainted.getpixel((10, 32)), RED)
    assert near(inpainted.getpixel((85, 32)), inverted(RED))
    # ControlNet stand-in and a plain row forced to the local route
    (image,) = out["controlnet"].images
    assert picture(image).size == (80, 40) and near(picture(image).getpixel((40, 20)), inverted(BLUE))
    (image,) = out["plain"].images
    assert picture(image).size == (32, 24)
    # The shipped ipadapter workflow: ComfyUI lacks its custom nodes, found before anything is uploaded or run
    assert (out["ipadapter"].status, out["ipadapter"].error_type, out["ipadapter"].runs) == (
        FAILED,
        "missing_node",
        0,
    )
    assert "IPAdapterUnifiedLoader" in out["ipadapter"].reason
    # ComfyUI's validation refusal (/prompt 400 node_errors), naming the node and input
    assert (out["too_wide"].status, out["too_wide"].error_type) == (FAILED, "node_errors")
    assert "(EmptyImage): Value 99999 bigger than max of 16384: width" in out["too_wide"].reason
    # A node that raises while running: execution_error with ComfyUI's exception
    assert (out["not_an_image"].status, out["not_an_image"].error_type) == (FAILED, "execution_error")
    assert "(LoadImage): PIL.UnidentifiedImageError: cannot identify image file" in out["not_an_image"].reason

    # A redelivered task finds its earlier run in /history: the same image, no second run
    again = run_row(comfy, workflows, rows["inpaint"], SETTINGS)
    assert (again.status, again.runs, again.prompt_id) == (SUCCEEDED, 0, out["inpaint"].prompt_id)
    assert again.images == out["inpaint"].images


def test_a_row_over_its_hard_limit_is_interrupted_on_the_real_comfyui(comfy: ComfyClient, tmp_path) -> None:
    # A chain of large lanczos scales takes a CPU ComfyUI several seconds; the row may take 1 s.
    slow = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 2048, "height": 2048, "batch_size": 1, "color": 255},
        }
    }
    for i in range(2, 40):
        scale = {"image": [str(i - 1), 0], "upscale_method": "lanczos", "crop": "disabled"}
        slow[str(i)] = {
            "class_type": "ImageScale",
            "inputs": {**scale, "width": 2048 + i % 2, "height": 2048 + i % 3},
        }
    slow["99"] = {"class_type": "SaveImage", "inputs": {"images": ["39", 0], "filename_prefix": "x"}}
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    row = RowRequest(f"real-{uuid.uuid4().hex[:8]}", "slow", {"prompt": "x", "workflow": "slow"})

    outcome = run_row(comfy, WorkflowSet(tmp_path), row, RunSettings(timeout_s=1, poll_s=0.2))

    assert (outcome.status, outcome.error_type) == (FAILED, "timeout")
    # ComfyUI stopped it (history says interrupted) and nothing of it is left queued
    entry = None
    for _ in range(300):  # the interrupt lands when the running node ends
        if (entry := comfy.history(outcome.prompt_id)) is not None:
            break
        time.sleep(0.1)
    assert entry is not None and entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert not comfy.queued(outcome.prompt_id)


# A workflow of a custom node pack (ComfyUI-Impact-Pack) that a fresh ComfyUI does not have
FACE_DETAILER = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "{{init_image}}"}},
    "2": {
        "class_type": "FaceDetailer",
        "inputs": {"image": ["1", 0], "guide_size": 512},
        "_meta": {"title": "Face"},
    },
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "imagepipe"}},
}


def test_a_mixed_file_through_imagepipe_run_with_the_real_comfyui(tmp_path) -> None:
    """`imagepipe run FILE --comfyui URL --workflows DIR`, as a user runs it: plain rows to the cloud API's
    emulator, the others through the agent to the real ComfyUI, each in results.jsonl with its backend."""
    workflows = tmp_path / "workflows"
    shutil.copytree(CORE_WORKFLOWS, workflows)
    (workflows / "facedetailer.json").write_text(json.dumps(FACE_DETAILER))
    Image.new("RGB", (128, 128), RED).save(tmp_path / "house.png")
    Image.open(io.BytesIO(right_half_white((64, 64)))).save(tmp_path / "door-mask.png")
    Image.new("RGB", (50, 50), BLUE).save(tmp_path / "edges.png")
    (tmp_path / "mixed.csv").write_text(
        "id,prompt,width,height,init_image,mask_image,control_image,controlnet,reference_image,workflow,backend\n"
        "plain-1,a lighthouse at dawn,,,,,,,,,\n"
        "plain-2,a red fox in the snow,,,,,,,,,\n"
        "inpaint,a green door,256,128,house.png,door-mask.png,,,,,\n"
        "controlnet,a skyline at night,128,64,,,edges.png,canny,,,\n"
        "local,a plain local one,64,64,,,,,,,local\n"
        "ipadapter,a cat in this style,256,256,,,,,house.png,,\n"
        "faces,a portrait,256,256,house.png,,,,,facedetailer,\n"
    )
    out = tmp_path / "out"

    run = subprocess.run(
        [sys.executable, "-m", "imagepipe_cli", "run", str(tmp_path / "mixed.csv"), "--comfyui", URL,
         "--workflows", str(workflows), "--out", str(out), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    print(run.stdout)

    # Exit 1: the job completed with failures (the two rows ComfyUI cannot run)
    assert run.returncode == 1, run.stderr
    assert f"agent on ComfyUI at {URL}" in run.stdout
    results = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert {i: (r["status"], r["backend"]) for i, r in results.items()} == {
        "plain-1": ("succeeded", "cloud"),
        "plain-2": ("succeeded", "cloud"),
        "inpaint": ("succeeded", "local"),
        "controlnet": ("succeeded", "local"),
        "local": ("succeeded", "local"),
        "ipadapter": ("failed", "local"),
        "faces": ("failed", "local"),
    }
    assert results["plain-1"]["provider"] == "atlascloud"
    inpaint = results["inpaint"]
    assert (inpaint["workflow"], inpaint["cost"]) == ("inpaint", 0.0) and inpaint["prompt_id"]
    with Image.open(out / inpaint["images"][0]) as image:
        image = image.convert("RGB")
        assert image.size == (256, 128)
        assert near(image.getpixel((20, 64)), RED) and near(image.getpixel((236, 64)), inverted(RED))
    with Image.open(out / results["controlnet"]["images"][0]) as image:
        assert image.size == (128, 64) and near(image.convert("RGB").getpixel((64, 32)), inverted(BLUE))
    # The rows whose workflow needs a node this ComfyUI lacks fail naming it
    assert results["ipadapter"]["error"]["type"] == "missing_node"
    assert "IPAdapterUnifiedLoader" in results["ipadapter"]["error"]["message"]
    assert results["faces"]["error"]["type"] == "missing_node"
    assert "ComfyUI has no node FaceDetailer (node 2, 'Face')" in results["faces"]["error"]["message"]
