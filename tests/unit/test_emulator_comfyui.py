"""The ComfyUI emulator: ComfyUI's shapes over real loopback HTTP and a real WebSocket."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from imagepipe_cli.emulators.base import EmulatorConfig, parse_fault
from imagepipe_cli.emulators.comfyui import ComfyUIEmulator


def make(*faults: str) -> ComfyUIEmulator:
    kinds = ComfyUIEmulator.FAULTS
    return ComfyUIEmulator(EmulatorConfig(faults=tuple(parse_fault(f, kinds) for f in faults)))


@pytest.fixture
def comfy() -> Iterator[ComfyUIEmulator]:
    emulator = make().start()
    yield emulator
    emulator.stop()


class WS:
    """A minimal WebSocket client (RFC 6455): handshake, masked frames out, text frames in."""

    def __init__(self, base_url: str, client_id: str) -> None:
        url = urlsplit(base_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        self.sock.settimeout(timeout)
        head = self._read(2)
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        return json.loads(self._read(n))

    def until(self, kind: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        seen = []
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            msg = self.recv(max(0.1, end - time.monotonic()))
            seen.append(msg)
            if msg["type"] == kind:
                return seen
        raise AssertionError(f"no {kind} in {seen}")

    def close(self) -> None:
        self.sock.close()


def png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def upload(client: httpx.Client, name: str, data: bytes, **fields: str) -> dict[str, Any]:
    r = client.post("/upload/image", files={"image": (name, data, "image/png")}, data=fields)
    assert r.status_code == 200, r.text
    return r.json()


def invert_workflow(image: str, prefix: str = "inv") -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def txt2img(text: str, ckpt: str = "sd_xl_base_1.0.safetensors") -> dict[str, Any]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 128, "batch_size": 1}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0],
                "seed": 7,
                "steps": 4,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
                "denoise": 1.0,
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ComfyUI"}},
    }


def wait_history(client: httpx.Client, prompt_id: str, timeout: float = 10.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        body = client.get(f"/history/{prompt_id}").json()
        if body:
            return body[prompt_id]
        time.sleep(0.02)
    raise AssertionError(f"{prompt_id} never reached history")


def test_core_nodes_run_for_real_and_view_returns_the_inverted_image(comfy: ComfyUIEmulator) -> None:
    with httpx.Client(base_url=comfy.base_url) as client:
        up = upload(client, "in.png", png((40, 30), (10, 200, 60)))
        assert up == {"name": "in.png", "subfolder": "", "type": "input"}
        assert client.get("/history/nope").json() == {}
        ws = WS(comfy.base_url, "client-1")
        first = ws.recv()
        assert first["type"] == "status" and first["data"]["sid"] == "client-1"
        r = client.post("/prompt", json={"prompt": invert_workflow("in.png"), "client_id": "client-1"})
        assert r.status_code == 200
        body = r.json()
        assert set(body) == {"prompt_id", "number", "node_errors"} and body["node_errors"] == {}
        entry = wait_history(client, body["prompt_id"])
        assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
        assert [m[0] for m in entry["status"]["messages"]] == [
            "execution_start",
            "execution_cached",
            "execution_success",
        ]
        image = entry["outputs"]["3"]["images"][0]
        assert image == {"filename": "inv_00001_.png", "subfolder": "", "type": "output"}
        view = client.get("/view", params=image)
        assert view.status_code == 200 and view.headers["content-type"] == "image/png"
        out = Image.open(io.BytesIO(view.content))
        assert out.size == (40, 30) and out.convert("RGB").getpixel((5, 5)) == (245, 55, 195)
        seen = ws.until("executing")  # wait for the final executing {node: None}
        while not (seen[-1]["type"] == "executing" and seen[-1]["data"]["node"] is None):
            seen += ws.until("executing")
        kinds = [m["type"] for m in seen]
        assert "execution_start" in kinds and "executed" in kinds and "execution_success" in kinds
        executed = next(m for m in seen if m["type"] == "executed")["data"]
        assert executed["node"] == "3" and executed["output"] == {"images": [image]}
        ws.close()
        # a second run counts on: inv_00002_.png
        r = client.post("/prompt", json={"prompt": invert_workflow("in.png"), "client_id": "x"})
        entry = wait_history(client, r.json()["prompt_id"])
        assert entry["outputs"]["3"]["images"][0]["filename"] == "inv_00002_.png"
        assert client.get("/queue").json() == {"queue_running": [], "queue_pending": []}


def test_model_nodes_draw_a_placeholder_and_report_progress(comfy: ComfyUIEmulator) -> None:
    with httpx.Client(base_url=comfy.base_url) as client:
        ws = WS(comfy.base_url, "c2")
        ws.recv()
        r = client.post("/prompt", json={"prompt": txt2img("a red fox"), "client_id": "c2"})
        assert r.status_code == 200, r.text
        seen = ws.until("execution_success")
        assert any(m["type"] == "progress" and m["data"]["node"] == "3" for m in seen)
        entry = wait_history(client, r.json()["prompt_id"])
        image = entry["outputs"]["9"]["images"][0]
        out = Image.open(io.BytesIO(client.get("/view", params=image).content))
        assert out.size == (256, 128)
        assert client.get("/models/checkpoints").json() == comfy.models["checkpoints"]
        assert "checkpoints" in client.get("/models").json()
        info = client.get("/object_info").json()
        assert info["KSampler"]["input"]["required"]["sampler_name"][0][0] == "euler"
        assert (
            info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == comfy.models["checkpoints"]
        )
        # The IP-Adapter custom node pack, which the hybrid route's GPU machine is assumed to have installed
        assert info["IPAdapterAdvanced"]["python_module"] == "custom_nodes.ComfyUI_IPAdapter_plus"
        assert client.get("/system_stats").json()["devices"][0]["type"] == "cuda"


def test_an_unknown_node_is_refused_with_comfyuis_missing_node_type() -> None:
    workflow = invert_workflow("x.png")
    workflow["2"] = {
        "class_type": "IPAdapterAdvanced",
        "inputs": {},
        "_meta": {"title": "IPAdapter Advanced"},
    }
    # A ComfyUI without the ComfyUI_IPAdapter_plus pack
    with make("missing-node=IPAdapterAdvanced") as comfy, httpx.Client(base_url=comfy.base_url) as client:
        assert "IPAdapterAdvanced" not in client.get("/object_info").json()
        r = client.post("/prompt", json={"prompt": workflow})
    assert r.status_code == 400
    # execution.py: a missing class returns (False, error, [], {}): the node is named in the error, and
    # node_errors is empty.
    assert r.json() == {
        "error": {
            "type": "missing_node_type",
            "message": "Node 'IPAdapter Advanced' not found. The custom node may not be installed.",
            "details": "Node ID '#2'",
            "extra_info": {
                "node_id": "2",
                "class_type": "IPAdapterAdvanced",
                "node_title": "IPAdapter Advanced",
            },
        },
        "node_errors": {},
    }


def test_missing_inputs_bad_links_and_missing_models_give_node_errors() -> None:
    faults = ("missing-model=sd_xl_base_1.0.safetensors", "missing-node=ImageInvert")
    with make(*faults) as comfy, httpx.Client(base_url=comfy.base_url) as client:
        workflow = txt2img("a cat")
        del workflow["6"]["inputs"]["clip"]
        workflow["8"]["inputs"]["vae"] = ["4", 1]
        r = client.post("/prompt", json={"prompt": workflow})
        assert r.status_code == 400
        body = r.json()
        assert body["error"]["type"] == "prompt_outputs_failed_validation"
        assert body["error"]["message"] == "Prompt outputs failed validation"
        errors = body["node_errors"]
        assert errors["6"]["errors"][0] == {
            "type": "required_input_missing",
            "message": "Required input is missing",
            "details": "clip",
            "extra_info": {"input_name": "clip"},
        }
        assert errors["6"]["dependent_outputs"] == ["9"] and errors["6"]["class_type"] == "CLIPTextEncode"
        assert errors["4"]["errors"][0]["type"] == "value_not_in_list"
        assert errors["8"]["errors"][0]["type"] == "return_type_mismatch"
        assert "sd_xl_base_1.0.safetensors" not in client.get("/models/checkpoints").json()
        r = client.post("/prompt", json={"prompt": invert_workflow("x.png")})
        assert r.json()["error"]["type"] == "missing_node_type"
        r = client.post("/prompt", json={"client_id": "x"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "no_prompt"


@pytest.mark.parametrize(
    ("fault", "exception_type", "text"),
    [
        ("execution-error=BOOM", "RuntimeError", "emulated failure"),
        ("oom=HUGE", "torch.OutOfMemoryError", "CUDA out of memory"),
    ],
)
def test_execution_faults_end_in_execution_error(fault: str, exception_type: str, text: str) -> None:
    word = fault.split("=")[1]
    with make(fault) as comfy, httpx.Client(base_url=comfy.base_url) as client:
        ws = WS(comfy.base_url, "c3")
        ws.recv()
        r = client.post("/prompt", json={"prompt": txt2img(f"a {word} castle"), "client_id": "c3"})
        assert r.status_code == 200
        seen = ws.until("execution_error")
        error = seen[-1]["data"]
        assert error["exception_type"] == exception_type and text in error["exception_message"]
        assert error["node_type"] == "KSampler" and error["node_id"] == "3"
        assert {"prompt_id", "executed", "traceback", "current_inputs", "current_outputs"} <= set(error)
        final = ws.until("executing")[-1]
        assert final["data"] == {"node": None, "prompt_id": r.json()["prompt_id"]}
        entry = wait_history(client, r.json()["prompt_id"])
        assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
        assert entry["status"]["messages"][-1][0] == "execution_error"
        assert entry["outputs"] == {}
        ws.close()


def test_a_client_chosen_prompt_id_is_used_as_is_and_a_repost_runs_again(comfy: ComfyUIEmulator) -> None:
    # server.py takes json_data["prompt_id"] as is and queues it without looking for an earlier run: a second
    # POST with the same id runs again (and overwrites the history entry). A client that must run once
    # looks in /history/{prompt_id} first.
    with httpx.Client(base_url=comfy.base_url) as client:
        upload(client, "a.png", png((8, 8), (0, 0, 0)))
        r = client.post("/prompt", json={"prompt": invert_workflow("a.png"), "prompt_id": "task-42"})
        assert r.json()["prompt_id"] == "task-42"
        assert wait_history(client, "task-42")["status"]["status_str"] == "success"
        assert comfy.runs("task-42") == 1
        r = client.post("/prompt", json={"prompt": invert_workflow("a.png"), "prompt_id": "task-42"})
        assert r.status_code == 200 and r.json()["prompt_id"] == "task-42"
        end = time.monotonic() + 5
        while comfy.runs("task-42") < 2 and time.monotonic() < end:
            time.sleep(0.02)
        assert comfy.runs("task-42") == 2
        assert comfy.stats()["prompts_run"] == 2


def test_interrupt_ends_a_hung_prompt_with_execution_interrupted() -> None:
    with make("hang=FOREVER") as comfy, httpx.Client(base_url=comfy.base_url) as client:
        ws = WS(comfy.base_url, "c4")
        ws.recv()
        r = client.post("/prompt", json={"prompt": txt2img("FOREVER and ever"), "client_id": "c4"})
        prompt_id = r.json()["prompt_id"]
        end = time.monotonic() + 5
        while not client.get("/queue").json()["queue_running"] and time.monotonic() < end:
            time.sleep(0.02)
        running = client.get("/queue").json()["queue_running"]
        assert running[0][1] == prompt_id
        time.sleep(0.2)
        assert client.get(f"/history/{prompt_id}").json() == {}
        assert client.post("/interrupt").status_code == 200
        seen = ws.until("execution_interrupted")
        assert seen[-1]["data"]["prompt_id"] == prompt_id
        entry = wait_history(client, prompt_id)
        assert entry["status"]["status_str"] == "error"
        assert entry["status"]["messages"][-1][0] == "execution_interrupted"
        ws.close()


def test_silent_ws_sends_nothing_but_history_still_fills() -> None:
    with make("silent-ws") as comfy, httpx.Client(base_url=comfy.base_url) as client:
        ws = WS(comfy.base_url, "c5")
        r = client.post("/prompt", json={"prompt": txt2img("quiet"), "client_id": "c5"})
        assert wait_history(client, r.json()["prompt_id"])["status"]["status_str"] == "success"
        with pytest.raises((TimeoutError, socket.timeout)):
            ws.recv(timeout=0.3)
        ws.close()


def test_restart_loses_queue_and_history_and_refuses_connections_for_a_moment(comfy: ComfyUIEmulator) -> None:
    base = comfy.base_url
    with httpx.Client(base_url=base) as client:
        client.post("/prompt", json={"prompt": txt2img("before"), "prompt_id": "p1"})
        wait_history(client, "p1")
    comfy.restart_down_s = 0.5
    t = threading.Thread(target=comfy.restart)
    t.start()
    time.sleep(0.2)
    with pytest.raises(httpx.ConnectError):
        httpx.get(base + "/queue", timeout=1)
    t.join()
    with httpx.Client(base_url=comfy.base_url) as client:
        assert comfy.base_url == base
        assert client.get("/history/p1").json() == {}
        assert client.get("/history").json() == {}
        client.post("/prompt", json={"prompt": txt2img("after"), "prompt_id": "p1"})
        assert wait_history(client, "p1")["status"]["status_str"] == "success"
    assert comfy.stats()["restarts"] == 1


def test_a_restart_fault_restarts_mid_run_once() -> None:
    with make("restart=FLAKY:1") as comfy:
        comfy.restart_down_s = 0.1
        base = comfy.base_url
        with httpx.Client(base_url=base) as client:
            client.post("/prompt", json={"prompt": txt2img("FLAKY"), "prompt_id": "t1"})
        end = time.monotonic() + 5
        while comfy.stats().get("restarts", 0) < 1 and time.monotonic() < end:
            time.sleep(0.02)
        time.sleep(0.3)
        with httpx.Client(base_url=base) as client:
            assert client.get("/history/t1").json() == {}
            client.post("/prompt", json={"prompt": txt2img("FLAKY"), "prompt_id": "t1"})
            assert wait_history(client, "t1")["status"]["status_str"] == "success"


def test_upload_renames_unless_overwrite(comfy: ComfyUIEmulator) -> None:
    with httpx.Client(base_url=comfy.base_url) as client:
        assert upload(client, "p.png", png((4, 4), (1, 2, 3)))["name"] == "p.png"
        assert upload(client, "p.png", png((4, 4), (9, 9, 9)))["name"] == "p (1).png"
        assert upload(client, "p.png", png((4, 4), (9, 9, 9)), overwrite="true")["name"] == "p.png"
        assert upload(client, "q.png", png((4, 4), (0, 0, 0)), subfolder="sub")["subfolder"] == "sub"
        assert client.post("/upload/image", data={"x": "1"}).status_code == 400
        assert client.get("/view", params={"filename": "none.png"}).status_code == 404
        assert client.get("/view", params={"filename": "../etc"}).status_code == 400


def test_a_link_to_a_missing_node_fails_its_output_and_a_valid_output_still_runs(
    comfy: ComfyUIEmulator,
) -> None:
    with httpx.Client(base_url=comfy.base_url) as client:
        upload(client, "b.png", png((8, 8), (0, 0, 0)))
        workflow = invert_workflow("b.png")
        workflow["3"]["inputs"]["images"] = ["99", 0]
        r = client.post("/prompt", json={"prompt": workflow})
        assert r.status_code == 400
        errors = r.json()["node_errors"]
        assert errors["3"]["errors"][0]["type"] == "exception_during_validation"
        assert errors["3"]["errors"][0]["details"] == "'99'"
        # execution.py refuses a prompt only when no output is valid: one good output is queued, and the
        # bad one comes back in node_errors of the 200 answer.
        workflow["4"] = {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "ok"}}
        r = client.post("/prompt", json={"prompt": workflow})
        assert r.status_code == 200 and set(r.json()["node_errors"]) == {"3"}
        entry = wait_history(client, r.json()["prompt_id"])
        assert set(entry["outputs"]) == {"4"}


def test_composite_through_a_mask_and_scale(comfy: ComfyUIEmulator) -> None:
    mask = Image.new("RGBA", (20, 20), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 10, 20))  # left half transparent: LoadImageMask(alpha) = 1 there
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    workflow = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 20, "height": 20, "batch_size": 1, "color": 0xFF0000},
        },
        "2": {
            "class_type": "EmptyImage",
            "inputs": {"width": 20, "height": 20, "batch_size": 1, "color": 0x0000FF},
        },
        "3": {"class_type": "LoadImageMask", "inputs": {"image": "m.png", "channel": "alpha"}},
        "4": {
            "class_type": "ImageCompositeMasked",
            "inputs": {
                "destination": ["1", 0],
                "source": ["2", 0],
                "x": 0,
                "y": 0,
                "resize_source": False,
                "mask": ["3", 0],
            },
        },
        "5": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["4", 0],
                "upscale_method": "nearest-exact",
                "width": 40,
                "height": 0,
                "crop": "disabled",
            },
        },
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "sub/comp"}},
    }
    with httpx.Client(base_url=comfy.base_url) as client:
        upload(client, "m.png", buf.getvalue())
        r = client.post("/prompt", json={"prompt": workflow})
        assert r.status_code == 200, r.text
        image = wait_history(client, r.json()["prompt_id"])["outputs"]["6"]["images"][0]
        assert image == {"filename": "comp_00001_.png", "subfolder": "sub", "type": "output"}
        out = Image.open(io.BytesIO(client.get("/view", params=image).content)).convert("RGB")
        assert out.size == (40, 40)
        assert out.getpixel((2, 20)) == (0, 0, 255) and out.getpixel((38, 20)) == (255, 0, 0)


# The answers below were read off a real ComfyUI 0.3.64 (python main.py --cpu) and compared with the emulator's.


def test_a_node_that_raises_ends_the_prompt_in_execution_error(comfy: ComfyUIEmulator) -> None:
    # A real ComfyUI turns any exception in a node into execution_error (full type name, f"{ex}\n{tips}"); a
    # prompt must never vanish from queue and history, or the agent reads it as a restart and retries forever.
    with httpx.Client(base_url=comfy.base_url) as client:
        upload(client, "broken.png", b"not a png at all", overwrite="true")
        r = client.post("/prompt", json={"prompt": invert_workflow("broken.png")})
        assert r.status_code == 200  # LoadImage's validation only checks that the file exists
        entry = wait_history(client, r.json()["prompt_id"])
    assert entry["status"]["status_str"] == "error" and entry["outputs"] == {} and entry["meta"] == {}
    kind, error = entry["status"]["messages"][-1]
    assert kind == "execution_error"
    assert (error["node_id"], error["node_type"]) == ("1", "LoadImage")
    assert error["exception_type"] == "PIL.UnidentifiedImageError"
    assert error["exception_message"].startswith("cannot identify image file")
    assert error["exception_message"].endswith("\n")
    assert error["current_inputs"] == {"image": ["broken.png"]}


def test_refusals_read_as_a_real_comfyui_writes_them(comfy: ComfyUIEmulator) -> None:
    with httpx.Client(base_url=comfy.base_url) as client:
        upload(client, "a.png", png((8, 8), (0, 0, 0)))
        bad = {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 99999, "height": 8, "batch_size": 0, "color": 0},
            },
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
        }
        r = client.post("/prompt", json={"prompt": bad})
        deep = invert_workflow("a.png")
        deep["2"]["inputs"]["image"] = ["7", 0]
        r_deep = client.post("/prompt", json={"prompt": deep})
        free = client.post("/free")
    # The reasons are upstream of the output: the error's details are empty, node_errors says it all, and
    # input_config is (type, options) with only the options the node declares (batch_size has no step).
    assert r.status_code == 400
    assert r.json()["error"] == {
        "type": "prompt_outputs_failed_validation",
        "message": "Prompt outputs failed validation",
        "details": "",
        "extra_info": {},
    }
    errors = {e["type"]: e for e in r.json()["node_errors"]["1"]["errors"]}
    assert errors["value_smaller_than_min"]["extra_info"] == {
        "input_name": "batch_size",
        "input_config": ["INT", {"default": 1, "min": 1, "max": 4096}],
        "received_value": 0,
    }
    assert errors["value_bigger_than_max"]["message"] == "Value 99999 bigger than max of 16384"
    # A link to a node that does not exist, one node up from the output: recorded on the linked node.
    (inner,) = r_deep.json()["node_errors"]["2"]["errors"]
    assert (inner["type"], inner["details"]) == ("exception_during_inner_validation", "'7'")
    assert inner["extra_info"]["exception_type"] == "KeyError"
    assert inner["extra_info"]["linked_node"] == ["2", 0]
    # server.py reads /free's body with request.json(): none is aiohttp's 500
    assert free.status_code == 500


def test_not_found_answers_have_empty_bodies(comfy: ComfyUIEmulator) -> None:
    with httpx.Client(base_url=comfy.base_url) as client:
        answers = [
            client.get("/view", params={"filename": "none.png"}),
            client.get("/models/no_such_folder"),
            client.post("/upload/image", data={"subfolder": "x"}),
        ]
    assert [(a.status_code, a.content) for a in answers] == [(404, b""), (404, b""), (400, b"")]
