"""The hybrid route end to end, as a user runs it: `imagepipe run` on a mixed file (plain rows for the cloud API,
inpainting, ControlNet and IP-Adapter rows for ComfyUI, and a row whose workflow needs a node ComfyUI lacks),
with the agent beside the generator - on a ComfyUI at --comfyui (here `imagepipe emulator --provider comfyui`,
a separate process) or on the built-in ComfyUI emulator."""

import json
import signal
import subprocess
import sys

import httpx
from PIL import Image

from conftest import EXAMPLES, ROOT

LOCAL_ROWS = {"inpaint-door": "inpaint", "controlnet-skyline": "controlnet", "ipadapter-cat": "ipadapter"}


def imagepipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imagepipe_cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def results(out) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_a_mixed_file_runs_plain_rows_in_the_cloud_and_the_others_on_comfyui(tmp_path):
    # Given a ComfyUI (the emulator, as its own process) that lacks the Impact Pack's FaceDetailer node
    comfyui = subprocess.Popen(
        [sys.executable, "-m", "imagepipe_cli", "emulator", "--provider", "comfyui", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        banner = comfyui.stdout.readline()
        url = banner.split("listening on ")[1].split()[0]
        # When the mixed file runs against it, with a workflows folder that adds facedetailer
        run = imagepipe(
            "run",
            str(EXAMPLES / "hybrid.csv"),
            "--comfyui",
            url,
            "--workflows",
            str(EXAMPLES / "workflows"),
            "--out",
            str(tmp_path),
            "--no-progress",
        )
        history = httpx.get(f"{url}/history").json()
    finally:
        comfyui.send_signal(signal.SIGINT)
        comfyui.wait(timeout=30)

    # Then the run says where the local rows went, and exits 1 (one row failed)
    assert f"agent on ComfyUI at {url} (--comfyui)" in run.stdout, run.stdout + run.stderr
    assert run.returncode == 1, run.stdout + run.stderr
    rows = results(tmp_path)
    assert len(rows) == 6
    # the plain rows went to the cloud API (its emulator)
    for name in ("plain-lighthouse", "plain-fox"):
        assert (rows[name]["backend"], rows[name]["provider"], rows[name]["status"]) == (
            "cloud",
            "atlascloud",
            "succeeded",
        )
    # the inpainting, ControlNet and IP-Adapter rows to ComfyUI, each with its workflow, prompt id and image
    for name, workflow in LOCAL_ROWS.items():
        row = rows[name]
        assert (row["backend"], row["workflow"], row["status"], row["cost"]) == (
            "local",
            workflow,
            "succeeded",
            0,
        )
        assert row["prompt_id"] in history
        (image,) = row["images"]
        with Image.open(tmp_path / image) as picture:
            assert (picture.format, picture.size) == ("PNG", (256, 256)), name
    # one ComfyUI run per row that could run
    assert len(history) == len(LOCAL_ROWS)
    # and the row whose workflow needs a missing node failed, naming it
    failed = rows["facedetailer-portrait"]
    assert (failed["backend"], failed["status"], failed["workflow"]) == ("local", "failed", "facedetailer")
    assert "ComfyUI has no node FaceDetailer" in failed["error"]["message"]


def test_without_comfyui_a_file_with_local_rows_runs_them_on_the_built_in_emulator(tmp_path):
    run = imagepipe("run", str(EXAMPLES / "hybrid.csv"), "--out", str(tmp_path), "--no-progress")
    assert "agent on the built-in ComfyUI EMULATOR" in run.stdout, run.stdout + run.stderr
    rows = results(tmp_path)
    assert {name: rows[name]["status"] for name in LOCAL_ROWS} == dict.fromkeys(LOCAL_ROWS, "succeeded")
    # No --workflows: the row names a workflow the agent does not have
    failed = rows["facedetailer-portrait"]
    assert failed["status"] == "failed"
    assert "no workflow named 'facedetailer'" in failed["error"]["message"]
