"""A client of one ComfyUI server's HTTP API (Comfy-Org/ComfyUI server.py): readiness, what it has installed,
uploads, /prompt, /history, /queue, /view, /free, /interrupt. Its WebSocket is in events.py."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

# Which model folder (GET /models/{folder}) a loader's file input names; a custom loader not listed here is
# still checked by ComfyUI itself when the prompt is queued (value_not_in_list).
MODEL_INPUTS: dict[tuple[str, str], str] = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("CheckpointLoader", "ckpt_name"): "checkpoints",
    ("ControlNetLoader", "control_net_name"): "controlnet",
    ("DiffControlNetLoader", "control_net_name"): "controlnet",
    ("VAELoader", "vae_name"): "vae",
    ("LoraLoader", "lora_name"): "loras",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("UpscaleModelLoader", "model_name"): "upscale_models",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("IPAdapterModelLoader", "ipadapter_file"): "ipadapter",
}


OLD_MISSING_NODE = re.compile(r"^Cannot execute because node (.+) does not exist\.$")


class ComfyUnavailable(Exception):
    """ComfyUI did not answer (refused, cut off, timed out) or answered 5xx: try again when it is back."""


class OutputMissing(Exception):
    """A finished prompt's saved image cannot be read back (deleted from ComfyUI's output folder)."""


class PromptRejected(Exception):
    """POST /prompt answered 400: ComfyUI refused the workflow. `reason` names the node and what is wrong."""

    def __init__(self, error_type: str, reason: str) -> None:
        super().__init__(reason)
        self.error_type, self.reason = error_type, reason


def _node_errors(node_errors: dict[str, Any]) -> str:
    parts = []
    for node_id, entry in node_errors.items():
        for err in entry.get("errors") or []:
            details = f": {err['details']}" if err.get("details") else ""
            parts.append(
                f"node {node_id} ({entry.get('class_type', '?')}): {err.get('message', '')}{details}"
            )
    return "; ".join(parts)


def rejection(body: Any) -> PromptRejected:
    """A /prompt 400 answer as one readable reason: the node and message ComfyUI gave."""
    body = body if isinstance(body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    kind = str(error.get("type") or "invalid_prompt")
    listed = _node_errors(body.get("node_errors") or {})
    if kind == "missing_node_type":
        info = error.get("extra_info") or {}
        cls = info.get("class_type", "?")
        return PromptRejected(
            "missing_node",
            f"ComfyUI has no node {cls} (node {info.get('node_id', '?')}): {error.get('message')}",
        )
    # ComfyUI up to 0.3.64 says it as invalid_prompt: "Cannot execute because node X does not exist."
    if old := OLD_MISSING_NODE.match(str(error.get("message") or "")):
        node = str(error.get("details") or "").removeprefix("Node ID '#").removesuffix("'") or "?"
        return PromptRejected(
            "missing_node", f"ComfyUI has no node {old.group(1)} (node {node}): {error.get('message')}"
        )
    if listed:
        return PromptRejected(
            "node_errors", f"{error.get('message') or 'Prompt outputs failed validation'}: {listed}"
        )
    details = f": {error['details']}" if error.get("details") else ""
    return PromptRejected(kind, f"{error.get('message') or 'ComfyUI refused the prompt'}{details}")


class ComfyClient:
    """One ComfyUI server. object_info and model lists are cached (a real object_info is megabytes) and
    fetched again before a check reports something missing, so a node or model installed since is found."""

    def __init__(
        self, base_url: str, *, http: httpx.Client | None = None, client_id: str | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id or f"imagepipe-agent-{uuid.uuid4().hex[:12]}"
        self.http = http or httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(30.0, connect=5.0))
        self._object_info: dict[str, Any] | None = None
        self._models: dict[str, list[str] | None] = {}

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ComfyUnavailable(
                f"ComfyUI at {self.base_url} did not answer {path}: {exc or type(exc).__name__}"
            ) from None
        if response.status_code >= 500:
            raise ComfyUnavailable(
                f"ComfyUI at {self.base_url} answered {path} with HTTP {response.status_code}"
            )
        return response

    def _json(self, method: str, path: str, want: type = dict, **kwargs: Any) -> Any:
        response = self._call(method, path, **kwargs)
        if response.status_code != 200:
            raise ComfyUnavailable(
                f"ComfyUI at {self.base_url} answered {path} with HTTP {response.status_code}"
            )
        return self._parse(response, path, want)

    def _parse(self, response: httpx.Response, path: str, want: type = dict) -> Any:
        # Something else answering on ComfyUI's port (or a broken proxy) is "not ComfyUI now", not a crash.
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, want):
            raise ComfyUnavailable(f"ComfyUI at {self.base_url} answered {path} with something not ComfyUI's")
        return body

    # ---- readiness and what is installed

    def wait_ready(
        self,
        budget_s: float,
        *,
        first_delay: float = 0.25,
        max_delay: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> dict[str, Any]:
        """GET /system_stats until it answers, backing off from first_delay (doubling, capped at max_delay), for at
        most budget_s; then ComfyUnavailable with the last error."""
        end = clock() + budget_s
        delay = first_delay
        while True:
            try:
                return self._json("GET", "/system_stats")
            except ComfyUnavailable as exc:
                error = exc
            left = end - clock()
            if left <= 0:
                raise ComfyUnavailable(f"{error} (waited {budget_s:g} s)")
            sleep(min(delay, left))
            delay = min(delay * 2, max_delay)

    def object_info(self, fresh: bool = False) -> dict[str, Any]:
        if fresh or self._object_info is None:
            self._object_info = self._json("GET", "/object_info")
        return self._object_info or {}

    def model_files(self, folder: str, fresh: bool = False) -> list[str] | None:
        """The files in a model folder, or None when ComfyUI has no such folder."""
        if fresh or folder not in self._models:
            response = self._call("GET", f"/models/{folder}")
            path = f"/models/{folder}"
            self._models[folder] = self._parse(response, path, list) if response.status_code == 200 else None
        return self._models[folder]

    def missing(self, graph: dict[str, Any]) -> tuple[str, str] | None:
        """(missing_node | missing_model, why) when ComfyUI lacks a node class or model file the workflow uses."""
        reason = self._missing(graph, fresh=False)
        return self._missing(graph, fresh=True) if reason else None

    def _missing(self, graph: dict[str, Any], fresh: bool) -> tuple[str, str] | None:
        info = self.object_info(fresh)
        for node_id, node in graph.items():
            if node["class_type"] not in info:
                title = (node.get("_meta") or {}).get("title")
                named = f", {title!r}" if title and title != node["class_type"] else ""
                why = f"ComfyUI has no node {node['class_type']} (node {node_id}{named}): install the custom node pack that provides it"
                return "missing_node", why
        for node_id, node in graph.items():
            for name, value in node["inputs"].items():
                folder = MODEL_INPUTS.get((node["class_type"], name))
                if folder is None or not isinstance(value, str):
                    continue
                files = self.model_files(folder, fresh)
                if files is None:
                    return (
                        "missing_model",
                        f"ComfyUI has no model folder {folder} (node {node_id}, {node['class_type']})",
                    )
                if value not in files:
                    why = f"ComfyUI has no model {value!r} in models/{folder} (node {node_id}, {node['class_type']}.{name})"
                    return "missing_model", why
        return None

    # ---- running a prompt

    def upload_image(self, data: bytes, filename: str, subfolder: str) -> str:
        """Upload into input/<subfolder>/ (overwriting: the name is the row's own) and return the name LoadImage takes."""
        response = self._call(
            "POST",
            "/upload/image",
            files={"image": (filename, data, "application/octet-stream")},
            data={"subfolder": subfolder, "type": "input", "overwrite": "true"},
        )
        if response.status_code != 200:
            raise PromptRejected(
                "upload_failed", f"ComfyUI refused the upload of {filename}: HTTP {response.status_code}"
            )
        body = self._parse(response, "/upload/image")
        if not body.get("name"):
            raise ComfyUnavailable(f"ComfyUI at {self.base_url} answered /upload/image without a name")
        return f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else str(body["name"])

    def submit(self, graph: dict[str, Any], prompt_id: str) -> dict[str, Any]:
        """POST /prompt with our client_id and the prompt_id we chose (ComfyUI takes it as is)."""
        response = self._call(
            "POST", "/prompt", json={"prompt": graph, "client_id": self.client_id, "prompt_id": prompt_id}
        )
        if response.status_code != 200:
            try:
                body = response.json()
            except ValueError:
                body = {"error": {"type": "invalid_prompt", "message": f"HTTP {response.status_code}"}}
            raise rejection(body)
        return self._parse(response, "/prompt")

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        entry = self._json("GET", f"/history/{prompt_id}").get(prompt_id)
        return entry if isinstance(entry, dict) else None

    def queued(self, prompt_id: str) -> bool:
        """Whether the prompt is running or waiting in ComfyUI's queue (items are [number, prompt_id, ...])."""
        body = self._json("GET", "/queue")
        items = [*(body.get("queue_running") or []), *(body.get("queue_pending") or [])]
        return any(isinstance(item, list) and len(item) > 1 and item[1] == prompt_id for item in items)

    def view(self, image: dict[str, Any]) -> bytes:
        """A saved output image's bytes. Only type=output: temp files are previews ComfyUI deletes."""
        if image.get("type") != "output":
            raise ValueError(f"not an output image: {image}")
        params = {"filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": "output"}
        response = self._call("GET", "/view", params=params)
        if response.status_code != 200:
            raise OutputMissing(
                f"ComfyUI lists output {image['filename']} but /view answers HTTP {response.status_code}"
            )
        return response.content

    def free(self) -> None:
        """Ask ComfyUI to unload models and free memory (done between prompts)."""
        self._call("POST", "/free", json={"unload_models": True, "free_memory": True})

    def interrupt(self, prompt_id: str) -> None:
        """Stop the prompt if it is the one running (ComfyUI ignores a prompt_id that is not)."""
        self._call("POST", "/interrupt", json={"prompt_id": prompt_id})

    def unqueue(self, prompt_id: str) -> None:
        self._call("POST", "/queue", json={"delete": [prompt_id]})

    def forget(self, prompt_id: str) -> None:
        """Drop the prompt's history entry, so a fresh run under the same id is not mistaken for the old one."""
        self._call("POST", "/history", json={"delete": [prompt_id]})
