"""Loopback emulator of a ComfyUI server (the user's own GPU on the hybrid route): /prompt, /history, /queue,
/view, /upload/image, /ws, /object_info, /models, /system_stats, /interrupt, /free, in ComfyUI's own shapes
(Comfy-Org/ComfyUI server.py, execution.py, main.py). Core image nodes run for real with Pillow; model nodes
draw a labelled placeholder. One background worker runs one prompt at a time, in queue order."""

from __future__ import annotations

import base64
import contextlib
import copy
import email.parser
import email.policy
import hashlib
import heapq
import io
import json
import os
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

from PIL import Image, ImageOps

from imagepipe_cli.emulators.base import (
    COUNT,
    FLAG,
    WORD,
    WORD_COUNT,
    BaseEmulator,
    EmulatorConfig,
    Fault,
    Reply,
    Request,
    Route,
    _Handler,
    _Server,
    render_png,
)

MAX_UPLOAD_BYTES = 64 << 20
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
COMFYUI_VERSION = "0.3.68"

# GET /models lists a real ComfyUI 0.3.64's folders (folder_paths.py), plus the IP-Adapter pack's "ipadapter".
DEFAULT_MODELS: dict[str, list[str]] = {
    "checkpoints": ["sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.safetensors"],
    "configs": [],
    "loras": [],
    "vae": ["sdxl_vae.safetensors"],
    "text_encoders": [],
    "diffusion_models": [],
    "clip_vision": ["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"],
    "style_models": [],
    "embeddings": [],
    "diffusers": [],
    "vae_approx": [],
    "controlnet": ["control_v11p_sd15_canny.pth", "diffusers_xl_canny_full.safetensors"],
    "gligen": [],
    "upscale_models": [],
    "custom_nodes": [],
    "hypernetworks": [],
    "photomaker": [],
    "classifiers": [],
    "model_patches": [],
    "audio_encoders": [],
    "ipadapter": ["ip-adapter_sdxl_vit-h.safetensors"],
}
# Which model folder a combo input lists (the rest of the combos are fixed lists).
MODEL_INPUTS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("ControlNetLoader", "control_net_name"): "controlnet",
}
UPLOAD_INPUTS = {("LoadImage", "image"), ("LoadImageMask", "image")}
# KSampler's lists as a real ComfyUI 0.3.64 gives them (comfy/samplers.py), so a workflow the real one takes is taken.
SAMPLERS = [
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
]
SCHEDULERS = [
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
]
MAX_RES = 16384


def _int(default: int, lo: int, hi: int, step: int | None = 1, **extra: Any) -> list[Any]:
    # Some nodes declare no step (batch_size, seed, steps): their object_info entry has none either.
    return [
        "INT",
        {"default": default, "min": lo, "max": hi, **({} if step is None else {"step": step}), **extra},
    ]


def _float(default: float, lo: float, hi: float, step: float, **extra: Any) -> list[Any]:
    return ["FLOAT", {"default": default, "min": lo, "max": hi, "step": step, **extra}]


def _node(
    name: str,
    display: str,
    category: str,
    required: dict[str, Any],
    outputs: list[str],
    *,
    optional: dict[str, Any] | None = None,
    hidden: dict[str, Any] | None = None,
    output_names: list[str] | None = None,
    output_node: bool = False,
    module: str = "nodes",
    description: str = "",
) -> dict[str, Any]:
    """One entry of /object_info, in the shape server.py's node_info() gives it."""
    inputs: dict[str, Any] = {"required": required}
    order: dict[str, list[str]] = {"required": list(required)}
    if optional:
        inputs["optional"] = optional
        order["optional"] = list(optional)
    if hidden:
        inputs["hidden"] = hidden
        order["hidden"] = list(hidden)
    return {
        "input": inputs,
        "input_order": order,
        "output": outputs,
        "output_is_list": [False] * len(outputs),
        "output_name": output_names or outputs,
        "name": name,
        "display_name": display,
        "description": description,
        "python_module": module,
        "category": category,
        "output_node": output_node,
    }


def _object_info() -> dict[str, dict[str, Any]]:
    """A subset of a real ComfyUI's /object_info (core nodes.py and comfy_extras/nodes_mask.py). Combo lists
    of models and uploaded images are filled in per request from the emulator's folders."""
    image_upload = [[], {"image_upload": True}]
    nodes = [
        _node(
            "CheckpointLoaderSimple",
            "Load Checkpoint",
            "loaders",
            {"ckpt_name": [[]]},
            ["MODEL", "CLIP", "VAE"],
            description="Loads a diffusion model checkpoint, diffusion models are used to denoise latents.",
        ),
        _node(
            "CLIPTextEncode",
            "CLIP Text Encode (Prompt)",
            "conditioning",
            {"text": ["STRING", {"multiline": True, "dynamicPrompts": True}], "clip": ["CLIP"]},
            ["CONDITIONING"],
        ),
        _node(
            "EmptyLatentImage",
            "Empty Latent Image",
            "latent",
            {
                "width": _int(512, 16, MAX_RES, 8),
                "height": _int(512, 16, MAX_RES, 8),
                "batch_size": _int(1, 1, 4096, None),
            },
            ["LATENT"],
        ),
        _node(
            "KSampler",
            "KSampler",
            "sampling",
            {
                "model": ["MODEL"],
                "seed": _int(0, 0, 0xFFFFFFFFFFFFFFFF, None, control_after_generate=True),
                "steps": _int(20, 1, 10000, None),
                "cfg": _float(8.0, 0.0, 100.0, 0.1, round=0.01),
                "sampler_name": [SAMPLERS],
                "scheduler": [SCHEDULERS],
                "positive": ["CONDITIONING"],
                "negative": ["CONDITIONING"],
                "latent_image": ["LATENT"],
                "denoise": _float(1.0, 0.0, 1.0, 0.01),
            },
            ["LATENT"],
        ),
        _node("VAEDecode", "VAE Decode", "latent", {"samples": ["LATENT"], "vae": ["VAE"]}, ["IMAGE"]),
        _node("VAEEncode", "VAE Encode", "latent", {"pixels": ["IMAGE"], "vae": ["VAE"]}, ["LATENT"]),
        _node(
            "VAEEncodeForInpaint",
            "VAE Encode (for Inpainting)",
            "latent/inpaint",
            {"pixels": ["IMAGE"], "vae": ["VAE"], "mask": ["MASK"], "grow_mask_by": _int(6, 0, 64)},
            ["LATENT"],
        ),
        _node(
            "InpaintModelConditioning",
            "InpaintModelConditioning",
            "conditioning/inpaint",
            {
                "positive": ["CONDITIONING"],
                "negative": ["CONDITIONING"],
                "vae": ["VAE"],
                "pixels": ["IMAGE"],
                "mask": ["MASK"],
                "noise_mask": ["BOOLEAN", {"default": True}],
            },
            ["CONDITIONING", "CONDITIONING", "LATENT"],
            output_names=["positive", "negative", "latent"],
        ),
        _node(
            "ControlNetLoader",
            "Load ControlNet Model",
            "loaders",
            {"control_net_name": [[]]},
            ["CONTROL_NET"],
        ),
        _node(
            "ControlNetApplyAdvanced",
            "Apply ControlNet",
            "conditioning/controlnet",
            {
                "positive": ["CONDITIONING"],
                "negative": ["CONDITIONING"],
                "control_net": ["CONTROL_NET"],
                "image": ["IMAGE"],
                "strength": _float(1.0, 0.0, 10.0, 0.01),
                "start_percent": _float(0.0, 0.0, 1.0, 0.001),
                "end_percent": _float(1.0, 0.0, 1.0, 0.001),
            },
            ["CONDITIONING", "CONDITIONING"],
            optional={"vae": ["VAE"]},
            output_names=["positive", "negative"],
        ),
        _node(
            "SaveImage",
            "Save Image",
            "image",
            {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
            [],
            hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
            output_node=True,
            description="Saves the input images to your ComfyUI output directory.",
        ),
        _node("LoadImage", "Load Image", "image", {"image": image_upload}, ["IMAGE", "MASK"]),
        _node(
            "LoadImageMask",
            "Load Image (as Mask)",
            "mask",
            {"image": image_upload, "channel": [["alpha", "red", "green", "blue"]]},
            ["MASK"],
        ),
        _node(
            "ImageScale",
            "Upscale Image",
            "image/upscaling",
            {
                "image": ["IMAGE"],
                "upscale_method": [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]],
                "width": _int(512, 0, MAX_RES),
                "height": _int(512, 0, MAX_RES),
                "crop": [["disabled", "center"]],
            },
            ["IMAGE"],
        ),
        _node("ImageInvert", "Invert Image", "image", {"image": ["IMAGE"]}, ["IMAGE"]),
        _node(
            "ImageCompositeMasked",
            "ImageCompositeMasked",
            "image",
            {
                "destination": ["IMAGE"],
                "source": ["IMAGE"],
                "x": _int(0, 0, MAX_RES),
                "y": _int(0, 0, MAX_RES),
                "resize_source": ["BOOLEAN", {"default": False}],
            },
            ["IMAGE"],
            optional={"mask": ["MASK"]},
            module="comfy_extras.nodes_mask",
        ),
        _node(
            "EmptyImage",
            "EmptyImage",
            "image",
            {
                "width": _int(512, 1, MAX_RES),
                "height": _int(512, 1, MAX_RES),
                "batch_size": _int(1, 1, 4096, None),
                "color": _int(0, 0, 0xFFFFFF, display="color"),
            },
            ["IMAGE"],
        ),
        *_ipadapter_nodes(),
    ]
    return {n["name"]: n for n in nodes}


IPADAPTER_PRESETS = [
    "LIGHT - SD1.5 only (low strength)",
    "STANDARD (medium strength)",
    "VIT-G (medium strength)",
    "PLUS (high strength)",
    "PLUS FACE (portraits)",
    "FULL FACE - SD1.5 only (portraits stronger)",
]
IPADAPTER_WEIGHT_TYPES = [
    "linear",
    "ease in",
    "ease out",
    "ease in-out",
    "reverse in-out",
    "weak input",
    "weak output",
    "weak middle",
    "strong middle",
    "style transfer",
    "composition",
    "strong style transfer",
]


def _ipadapter_nodes() -> list[dict[str, Any]]:
    """The two nodes of the custom node pack ComfyUI_IPAdapter_plus that the shipped ipadapter workflow uses:
    not core ComfyUI, but what a GPU machine for the hybrid route has installed. `--fault
    missing-node=IPAdapterAdvanced` plays a ComfyUI without the pack."""
    module = "custom_nodes.ComfyUI_IPAdapter_plus"
    return [
        _node(
            "IPAdapterUnifiedLoader",
            "IPAdapter Unified Loader",
            "ipadapter",
            {"model": ["MODEL"], "preset": [IPADAPTER_PRESETS]},
            ["MODEL", "IPADAPTER"],
            optional={"ipadapter": ["IPADAPTER"]},
            output_names=["model", "ipadapter"],
            module=module,
        ),
        _node(
            "IPAdapterAdvanced",
            "IPAdapter Advanced",
            "ipadapter",
            {
                "model": ["MODEL"],
                "ipadapter": ["IPADAPTER"],
                "image": ["IMAGE"],
                "weight": _float(1.0, -1.0, 5.0, 0.05),
                "weight_type": [IPADAPTER_WEIGHT_TYPES],
                "combine_embeds": [["concat", "add", "subtract", "average", "norm average"]],
                "start_at": _float(0.0, 0.0, 1.0, 0.001),
                "end_at": _float(1.0, 0.0, 1.0, 0.001),
                "embeds_scaling": [["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"]],
            },
            ["MODEL"],
            optional={"image_negative": ["IMAGE"], "attn_mask": ["MASK"], "clip_vision": ["CLIP_VISION"]},
            module=module,
        ),
    ]


OBJECT_INFO = _object_info()

OOM_TIPS = (
    "This error means you ran out of memory on your GPU.\n\n"
    "TIPS: If the workflow worked before you might have accidentally set the batch_size to a large number."
)


class _Interrupted(Exception):
    pass


class _ValidationException(Exception):
    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type, self.message = exception_type, message


class _NodeFailure(Exception):
    def __init__(self, exception_type: str, message: str, tips: str = "") -> None:
        super().__init__(message)
        # execution.py writes exception_message as f"{ex}\n{tips}" (tips only for out-of-memory errors)
        self.exception_type, self.message = exception_type, f"{message}\n{tips}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _error(
    type_: str, message: str, details: str = "", extra_info: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"type": type_, "message": message, "details": details, "extra_info": extra_info or {}}


# aiohttp's answer when a handler raises: server.py reads most bodies with `await request.json()` unguarded, so a
# body that is not JSON (or none, on POST /free) gets this, not a 400.
AIOHTTP_500 = b"500 Internal Server Error\n\nServer got itself in trouble"


def _json_or_500(request: Request) -> Any:
    try:
        return json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        raise Reply(500, raw=AIOHTTP_500, content_type="text/plain; charset=utf-8") from None


def _format_value(value: Any) -> Any:
    # execution.py format_value: what execution_error's current_inputs shows of each input
    return value if value is None or isinstance(value, int | float | bool | str) else str(value)


def full_type_name(exc: BaseException) -> str:
    # execution.py full_type_name: PIL.UnidentifiedImageError, torch.OutOfMemoryError, RuntimeError
    module = type(exc).__module__
    return type(exc).__qualname__ if module == "builtins" else f"{module}.{type(exc).__qualname__}"


def _is_link(value: Any) -> bool:
    return isinstance(value, list)


class ComfyUIEmulator(BaseEmulator):
    """A ComfyUI server. Counters: prompts_queued, prompts_run, run:<prompt_id>, uploads, views."""

    name: ClassVar[str] = "comfyui"
    title: ClassVar[str] = "ComfyUI"
    FAULTS: ClassVar[dict[str, str]] = {
        "missing-node": WORD,  # CLASS: object_info lacks it, /prompt answers 400 missing_node_type
        "missing-model": WORD,  # NAME: not in /models, a prompt naming it fails validation (value_not_in_list)
        "execution-error": WORD,  # a prompt whose text inputs hold WORD ends in execution_error
        "oom": WORD,  # the same, with torch's out-of-memory error
        "silent-ws": FLAG,  # the WebSocket accepts clients and never sends them anything
        "slow": COUNT,  # every prompt takes N seconds more
        "hang": WORD,  # a matching prompt never finishes until /interrupt
        "restart": WORD_COUNT,  # the first N matching prompts restart the server mid-run (queue, history lost)
    }
    DEFAULT_KEYS: ClassVar[dict[str, str]] = {}
    restart_down_s: float = 0.5  # how long a restart refuses connections

    def __init__(
        self, config: EmulatorConfig | None = None, models: dict[str, list[str]] | None = None
    ) -> None:
        super().__init__(config)
        self.models = copy.deepcopy(models if models is not None else DEFAULT_MODELS)
        # (type, subfolder, filename) -> PNG bytes; kept across restarts as files on disk are.
        self.files: dict[tuple[str, str, str], bytes] = {}
        self._cond = threading.Condition(self.lock)
        self._queue: list[tuple[Any, ...]] = []  # heap of (number, seq, item)
        self._seq = 0
        self._number = 0
        self._running: tuple[Any, ...] | None = None
        self._last_node: str | None = None
        self._history: dict[str, dict[str, Any]] = {}
        self._clients: dict[str, _WebSocket] = {}
        self._interrupt = threading.Event()
        self._epoch = 0
        self._worker: threading.Thread | None = None
        self._worker_stop = threading.Event()
        self._restarting = threading.Lock()
        self._closed = False

    # ---- API surface

    def routes(self) -> list[Route]:
        return [
            ("POST", r"/(?:api/)?prompt", self._post_prompt),
            (
                "GET",
                r"/(?:api/)?prompt",
                lambda r: {"exec_info": {"queue_remaining": self._queue_remaining()}},
            ),
            ("GET", r"/(?:api/)?history", self._get_history),
            ("GET", r"/(?:api/)?history/(?P<id>[^/]+)", self._get_history),
            ("POST", r"/(?:api/)?history", self._post_history),
            ("GET", r"/(?:api/)?queue", self._get_queue),
            ("POST", r"/(?:api/)?queue", self._post_queue),
            ("GET", r"/(?:api/)?view", self._view),
            ("POST", r"/(?:api/)?upload/image", self._upload),
            ("GET", r"/(?:api/)?object_info", lambda r: self.object_info()),
            ("GET", r"/(?:api/)?object_info/(?P<cls>[^/]+)", self._object_info_one),
            ("GET", r"/(?:api/)?models", lambda r: list(self.models)),
            ("GET", r"/(?:api/)?models/(?P<folder>[^/]+)", self._models),
            ("GET", r"/(?:api/)?system_stats", self._system_stats),
            ("POST", r"/(?:api/)?interrupt", self._post_interrupt),
            ("POST", r"/(?:api/)?free", self._post_free),
        ]

    def error_body(self, status: int, code: str, message: str) -> Any:
        return {"error": _error(code, message, message), "node_errors": {}}

    # ---- object_info and models

    def model_files(self, folder: str) -> list[str]:
        missing = {f.word for f in self.faults("missing-model")}
        return [m for m in self.models.get(folder, []) if m not in missing]

    def object_info(self) -> dict[str, Any]:
        missing = {f.word for f in self.faults("missing-node")}
        info = copy.deepcopy({k: v for k, v in OBJECT_INFO.items() if k not in missing})
        with self.lock:
            inputs = sorted(name for (kind, sub, name) in self.files if kind == "input" and not sub)
        for (cls, field), folder in MODEL_INPUTS.items():
            if cls in info:
                info[cls]["input"]["required"][field][0] = self.model_files(folder)
        for cls, field in UPLOAD_INPUTS:
            if cls in info:
                info[cls]["input"]["required"][field][0] = inputs
        return info

    def _object_info_one(self, request: Request) -> Any:
        cls = request.match["cls"] if request.match else ""
        info = self.object_info()
        return {cls: info[cls]} if cls in info else {}

    def _models(self, request: Request) -> Any:
        folder = request.match["folder"] if request.match else ""
        if folder not in self.models:
            return Reply(404, raw=b"", content_type="text/plain")
        return self.model_files(folder)

    def _system_stats(self, request: Request) -> Any:
        gib = 1 << 30
        return {
            "system": {
                "os": os.name,
                "ram_total": 32 * gib,
                "ram_free": 24 * gib,
                "comfyui_version": COMFYUI_VERSION,
                "required_frontend_version": "1.28.8",
                "installed_templates_version": "0.2.4",
                "required_templates_version": "0.2.4",
                "python_version": sys.version,
                "pytorch_version": "2.8.0+cu128 (imagepipe emulator: no torch)",
                "embedded_python": False,
                "argv": [
                    "main.py",
                    "--port",
                    str(self._server.server_address[1]) if self._server else "8188",
                ],
            },
            "devices": [
                {
                    "name": "cuda:0 EMULATOR GPU : cudaMallocAsync",
                    "type": "cuda",
                    "index": 0,
                    "vram_total": 12 * gib,
                    "vram_free": 11 * gib,
                    "torch_vram_total": 0,
                    "torch_vram_free": 0,
                }
            ],
        }

    # ---- /prompt and validation (execution.py validate_prompt / validate_inputs)

    def _post_prompt(self, request: Request) -> Any:
        data = _json_or_500(request)
        if not isinstance(data, dict):
            data = {}
        with self.lock:
            if "number" in data:
                number: Any = float(data["number"])
            else:
                number = -self._number if data.get("front") else self._number
                self._number += 1
        if "prompt" not in data:
            err = _error("no_prompt", "No prompt provided", "No prompt provided")
            return Reply(400, {"error": err, "node_errors": {}})
        prompt = data["prompt"]
        prompt_id = str(data.get("prompt_id", uuid.uuid4()))  # used as is, even when it ran before
        ok, error, outputs, node_errors = self.validate_prompt(prompt)
        if not ok:
            return Reply(400, {"error": error, "node_errors": node_errors})
        extra_data = dict(data.get("extra_data") or {})
        if "client_id" in data:
            extra_data["client_id"] = data["client_id"]
        extra_data["create_time"] = _now_ms()
        item = (number, prompt_id, prompt, extra_data, outputs)
        with self._cond:
            heapq.heappush(self._queue, (number, self._seq, item))
            self._seq += 1
            self.counters["prompts_queued"] += 1
            self._cond.notify_all()
        self._queue_updated()
        return {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}

    def validate_prompt(self, prompt: Any) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
        info = self.object_info()
        if not isinstance(prompt, dict):
            return False, _error("invalid_prompt", "Invalid prompt", "prompt must be an object"), [], {}
        outputs: list[str] = []
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or "class_type" not in node:
                err = _error(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'",
                )
                return False, err, [], {}
            class_type = node["class_type"]
            if class_type not in info:
                # As newer ComfyUIs answer; 0.3.64 (checked) said invalid_prompt "Cannot execute because node
                # X does not exist." with empty extra_info. The agent reads both.
                title = (node.get("_meta") or {}).get("title", class_type)
                err = _error(
                    "missing_node_type",
                    f"Node '{title}' not found. The custom node may not be installed.",
                    f"Node ID '#{node_id}'",
                    {"node_id": node_id, "class_type": class_type, "node_title": title},
                )
                return False, err, [], {}
            if info[class_type]["output_node"]:
                outputs.append(node_id)
        if not outputs:
            return False, _error("prompt_no_outputs", "Prompt has no outputs"), [], {}
        node_errors: dict[str, Any] = {}
        good: list[str] = []
        own: list[str] = []  # the failed outputs' own reasons: all that the refusal's details holds
        validated: dict[str, tuple[bool, list[dict[str, Any]]]] = {}
        for out in outputs:
            try:
                valid, reasons = self._validate_node(prompt, info, out, validated, set())
            except _ValidationException as ex:
                valid, reasons = (
                    False,
                    [
                        _error(
                            "exception_during_validation",
                            "Exception when validating node",
                            ex.message,
                            {"exception_type": ex.exception_type, "traceback": []},
                        )
                    ],
                )
                validated[out] = (False, reasons)
            if valid:
                good.append(out)
                continue
            own += [f"{e['message']}: {e['details']}" for e in reasons]
            # execution.py lists every node validated so far that has reasons of its own under each failed
            # output; a node that failed only because of one upstream is left out.
            for node_id, (ok, node_reasons) in validated.items():
                if ok or not node_reasons:
                    continue
                entry = node_errors.setdefault(
                    node_id,
                    {
                        "errors": node_reasons,
                        "dependent_outputs": [],
                        "class_type": prompt[node_id]["class_type"],
                    },
                )
                entry["dependent_outputs"].append(out)
        if not good:  # execution.py: refused only when no output is left; else queued with node_errors
            # A real ComfyUI's details are empty when the reasons are upstream of the outputs (the usual case).
            err = _error(
                "prompt_outputs_failed_validation", "Prompt outputs failed validation", "\n".join(own)
            )
            return False, err, good, node_errors
        return True, None, good, node_errors

    def _validate_node(
        self,
        prompt: dict[str, Any],
        info: dict[str, Any],
        node_id: str,
        validated: dict[str, tuple[bool, list[dict[str, Any]]]],
        path: set[str],
    ) -> tuple[bool, list[dict[str, Any]]]:
        """execution.py validate_inputs: (valid, this node's own reasons); a node is invalid when it has reasons
        or anything upstream is invalid. A link to a missing node or slot raises _ValidationException, which
        the caller records (on the linked node, or on the output when the link is the output's own)."""
        if node_id in validated:
            return validated[node_id]
        node = prompt[node_id]
        spec = info[node["class_type"]]
        inputs = node.get("inputs") or {}
        errors: list[dict[str, Any]] = []
        valid = True
        required = spec["input"]["required"]
        optional = spec["input"].get("optional", {})
        for name, conf in {**required, **optional}.items():
            config = [conf[0], conf[1] if len(conf) > 1 else {}]  # execution.py's input_config: (type, extra)
            kind = conf[0]
            if name not in inputs:
                if name in required:
                    errors.append(
                        _error(
                            "required_input_missing", "Required input is missing", name, {"input_name": name}
                        )
                    )
                continue
            value = inputs[name]
            if not _is_link(value):
                errors += self._check_value(node["class_type"], name, config, value)
                continue
            if len(value) != 2:
                errors.append(
                    _error(
                        "bad_linked_input",
                        "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        name,
                        {"input_name": name, "input_config": config, "received_value": value},
                    )
                )
                continue
            src, slot = value
            if src not in prompt:
                raise _ValidationException("KeyError", repr(src))
            src_outputs = info[prompt[src]["class_type"]]["output"]
            if not isinstance(slot, int):
                raise _ValidationException(
                    "TypeError", f"tuple indices must be integers or slices, not {type(slot).__name__}"
                )
            if not -len(src_outputs) <= slot < len(src_outputs):
                raise _ValidationException("IndexError", "tuple index out of range")
            received = src_outputs[slot]
            if received != kind:
                errors.append(
                    _error(
                        "return_type_mismatch",
                        "Return type mismatch between linked nodes",
                        f"{name}, received_type({received}) mismatch input_type({kind})",
                        {
                            "input_name": name,
                            "input_config": config,
                            "received_type": received,
                            "linked_node": value,
                        },
                    )
                )
                continue
            if src in path:
                errors.append(_error("dependency_cycle", "Dependency cycle detected", src))
                continue
            try:
                if not self._validate_node(prompt, info, src, validated, path | {node_id})[0]:
                    valid = False
            except _ValidationException as ex:
                valid = False
                validated[src] = (
                    False,
                    [
                        _error(
                            "exception_during_inner_validation",
                            "Exception when validating inner node",
                            ex.message,
                            {
                                "input_name": name,
                                "input_config": config,
                                "exception_message": ex.message,
                                "exception_type": ex.exception_type,
                                "traceback": [],
                                "linked_node": value,
                            },
                        )
                    ],
                )
        result = (valid and not errors, errors)
        validated[node_id] = result
        return result

    def _check_value(self, class_type: str, name: str, config: list[Any], value: Any) -> list[dict[str, Any]]:
        kind, opts = config
        if (class_type, name) in UPLOAD_INPUTS:  # LoadImage's VALIDATE_INPUTS: the file must exist
            sub, _, fname = str(value).rpartition("/")
            if ("input", sub, fname) not in self.files:
                return [
                    _error(
                        "custom_validation_failed",
                        "Custom validation failed for node",
                        f"{name} - Invalid image file: {value}",
                        {"input_name": name},
                    )
                ]
            return []
        if kind in ("INT", "FLOAT"):
            try:
                num = int(value) if kind == "INT" else float(value)
            except (TypeError, ValueError) as ex:
                return [
                    _error(
                        "invalid_input_type",
                        f"Failed to convert an input value to a {kind} value",
                        f"{name}, {value}, {ex}",
                        {
                            "input_name": name,
                            "input_config": config,
                            "received_value": value,
                            "exception_message": str(ex),
                        },
                    )
                ]
            # received_value is the converted number, as execution.py reports it
            extra = {"input_name": name, "input_config": config, "received_value": num}
            if "min" in opts and num < opts["min"]:
                message = f"Value {num} smaller than min of {opts['min']}"
                return [_error("value_smaller_than_min", message, name, extra)]
            if "max" in opts and num > opts["max"]:
                message = f"Value {num} bigger than max of {opts['max']}"
                return [_error("value_bigger_than_max", message, name, extra)]
        if isinstance(kind, list) and value not in kind:
            # execution.py: long lists (scanned model files) are not sent back
            listed = f"(list of length {len(kind)})" if len(kind) > 20 else str(kind)
            extra = {
                "input_name": name,
                "input_config": None if len(kind) > 20 else config,
                "received_value": value,
            }
            return [
                _error("value_not_in_list", "Value not in list", f"{name}: '{value}' not in {listed}", extra)
            ]
        return []

    # ---- history and queue

    def _get_history(self, request: Request) -> Any:
        prompt_id = request.match["id"] if request.match and "id" in request.match.groupdict() else None
        with self.lock:
            if prompt_id is not None:
                return (
                    {prompt_id: copy.deepcopy(self._history[prompt_id])} if prompt_id in self._history else {}
                )
            items = list(self._history.items())
        max_items = request.query.get("max_items")
        if max_items and max_items.isdigit():
            items = items[-int(max_items) :]
        return copy.deepcopy(dict(items))

    def _post_history(self, request: Request) -> Any:
        data = _json_or_500(request)
        with self.lock:
            if data.get("clear"):
                self._history.clear()
            for prompt_id in data.get("delete", []):
                self._history.pop(prompt_id, None)
        return Reply(200, raw=b"", content_type="text/plain")

    def _get_queue(self, request: Request) -> Any:
        with self.lock:
            running = [list(self._running)] if self._running else []
            pending = [list(item) for _, _, item in sorted(self._queue)]
        return copy.deepcopy({"queue_running": running, "queue_pending": pending})

    def _post_queue(self, request: Request) -> Any:
        data = _json_or_500(request)
        with self.lock:
            if data.get("clear"):
                self._queue.clear()
            if "delete" in data:
                drop = set(data["delete"])
                self._queue = [e for e in self._queue if e[2][1] not in drop]
                heapq.heapify(self._queue)
        self._queue_updated()
        return Reply(200, raw=b"", content_type="text/plain")

    def _queue_remaining(self) -> int:
        with self.lock:
            return len(self._queue) + (1 if self._running else 0)

    def _post_free(self, request: Request) -> Any:
        _json_or_500(request)  # server.py: an empty body is a 500, {"unload_models": true, ...} sets flags
        return Reply(200, raw=b"", content_type="text/plain")

    def _post_interrupt(self, request: Request) -> Any:
        # server.py: a prompt_id that is not the running one is ignored; no body interrupts whatever runs.
        prompt_id = None
        with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError):
            prompt_id = (json.loads(request.body) or {}).get("prompt_id") if request.body else None
        with self.lock:
            running = self._running[1] if self._running else None
        if prompt_id is None or prompt_id == running:
            self._interrupt.set()
        return Reply(200, raw=b"", content_type="text/plain")

    # ---- files

    def _view(self, request: Request) -> Any:
        self.count("views")
        filename = request.query.get("filename")
        if not filename:
            return Reply(404, raw=b"", content_type="text/plain")
        if filename.startswith("/") or ".." in filename:
            return Reply(400, raw=b"", content_type="text/plain")
        kind = request.query.get("type", "output")
        sub = request.query.get("subfolder", "")
        with self.lock:
            data = self.files.get((kind, sub, filename))
        if data is None:
            return Reply(404, raw=b"", content_type="text/plain")
        return Reply(
            200, raw=data, content_type="image/png", headers={"Content-Disposition": f'filename="{filename}"'}
        )

    def _upload(self, request: Request) -> Any:
        self.count("uploads")
        fields, files = _multipart(request)
        if "image" not in files:
            return Reply(400, raw=b"", content_type="text/plain")
        filename, data = files["image"]
        kind = fields.get("type") or "input"
        sub = fields.get("subfolder", "")
        if not filename or kind not in ("input", "temp", "output") or ".." in sub or ".." in filename:
            return Reply(400, raw=b"", content_type="text/plain")
        filename = os.path.basename(filename)
        with self.lock:
            if fields.get("overwrite") not in ("true", "1"):
                stem, ext = os.path.splitext(filename)
                i = 1
                while (kind, sub, filename) in self.files and self.files[(kind, sub, filename)] != data:
                    filename = f"{stem} ({i}){ext}"
                    i += 1
            self.files[(kind, sub, filename)] = data
        return {"name": filename, "subfolder": sub, "type": kind}

    def add_input_image(self, filename: str, data: bytes, subfolder: str = "") -> None:
        """Place a file in the input folder directly (as copying it into ComfyUI/input would)."""
        with self.lock:
            self.files[("input", subfolder, filename)] = data

    # ---- WebSocket (server.py websocket_handler and send_sync)

    def _ws_connect(self, sid: str, ws: _WebSocket) -> None:
        with self.lock:
            self._clients[sid] = ws
            running = self._running
            last_node = self._last_node
        self._send(
            ws, "status", {"status": {"exec_info": {"queue_remaining": self._queue_remaining()}}, "sid": sid}
        )
        if running and running[3].get("client_id") == sid and last_node is not None:
            self._send(ws, "executing", {"node": last_node})

    def _ws_disconnect(self, sid: str, ws: _WebSocket) -> None:
        with self.lock:
            if self._clients.get(sid) is ws:
                del self._clients[sid]

    def _send(self, ws: _WebSocket, event: str, data: dict[str, Any]) -> None:
        if self.faults("silent-ws"):
            return
        ws.send_text(json.dumps({"type": event, "data": data}))
        self.count("ws_messages")

    def send_sync(self, event: str, data: dict[str, Any], sid: str | None) -> None:
        """To one client (sid) or, with sid None, to all, as PromptServer.send_sync does."""
        with self.lock:
            targets = (
                list(self._clients.values())
                if sid is None
                else [self._clients[sid]]
                if sid in self._clients
                else []
            )
        for ws in targets:
            self._send(ws, event, data)

    def _queue_updated(self) -> None:
        self.send_sync(
            "status", {"status": {"exec_info": {"queue_remaining": self._queue_remaining()}}}, None
        )

    # ---- the worker (main.py prompt_worker + execution.py PromptExecutor.execute)

    def _work(self, stop: threading.Event, epoch: int) -> None:
        while True:
            with self._cond:
                while not self._queue and not stop.is_set():
                    self._cond.wait(0.2)
                if stop.is_set():
                    return
                _, _, item = heapq.heappop(self._queue)
                self._running = item
                self._interrupt.clear()
            self._queue_updated()
            try:
                self._execute(item, stop, epoch)
            except Exception as exc:  # a bug in the emulator: record it, keep serving
                print(f"comfyui emulator: internal error running {item[1]}: {exc!r}", file=sys.stderr)
            with self.lock:
                if self._epoch == epoch:
                    self._running = None
                    self._last_node = None
            if stop.is_set():
                return
            self._queue_updated()

    def _execute(self, item: tuple[Any, ...], stop: threading.Event, epoch: int) -> None:
        number, prompt_id, prompt, extra_data, outputs = item
        sid = extra_data.get("client_id")
        messages: list[list[Any]] = []

        def add_message(event: str, data: dict[str, Any], broadcast: bool) -> None:
            data = {**data, "timestamp": _now_ms()}
            messages.append([event, data])
            if sid is not None or broadcast:
                self.send_sync(event, data, sid)

        with self.lock:
            self.counters["prompts_run"] += 1
            self.counters[f"run:{prompt_id}"] += 1
        add_message("execution_start", {"prompt_id": prompt_id}, False)
        add_message("execution_cached", {"nodes": [], "prompt_id": prompt_id}, False)
        text = _prompt_text(prompt)
        ui_outputs: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        values: dict[str, tuple[Any, ...]] = {}
        executed: list[str] = []
        order = _execution_order(prompt, outputs)
        status_str, completed = "success", True
        current: str | None = None
        current_inputs: dict[str, list[Any]] = {}
        try:
            restart = self.flaky(text, "restart")
            for node_id in order:
                current = node_id
                self._check(stop, epoch)
                node = prompt[node_id]
                inputs = {
                    k: (values[str(v[0])][v[1]] if _is_link(v) else v)
                    for k, v in (node.get("inputs") or {}).items()
                }
                current_inputs = {k: [_format_value(v)] for k, v in inputs.items()}
                with self.lock:
                    self._last_node = node_id
                self.send_sync(
                    "executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id}, sid
                )
                if node is prompt[order[-1]] or node["class_type"] in ("KSampler", "VAEDecode"):
                    self._model_time(text, node_id == order[-1], stop, epoch)
                    self._faults_at(
                        text, node["class_type"], node_id == order[-1] or node["class_type"] == "KSampler"
                    )
                if restart and node_id == order[-1]:
                    threading.Thread(target=self.restart, name="comfyui-restart", daemon=True).start()
                    stop.wait(5)
                    raise _Interrupted

                def progress(v, m, nid=node_id):
                    return self.send_sync(
                        "progress", {"value": v, "max": m, "prompt_id": prompt_id, "node": nid}, sid
                    )

                try:
                    result, ui = self._run_node(node["class_type"], inputs, progress)
                except (_Interrupted, _NodeFailure):
                    raise
                except Exception as exc:  # any exception in a node is the prompt's execution_error
                    raise _NodeFailure(full_type_name(exc), str(exc)) from exc
                values[node_id] = result
                executed.append(node_id)
                if ui is not None:  # history's meta lists only the nodes with UI output
                    ui_outputs[node_id] = ui
                    meta[node_id] = {
                        "node_id": node_id,
                        "display_node": node_id,
                        "parent_node": None,
                        "real_node_id": node_id,
                    }
                    self.send_sync(
                        "executed",
                        {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": prompt_id},
                        sid,
                    )
        except _Interrupted:
            if self._epoch != epoch or stop.is_set():
                return  # the process went away: nothing is recorded
            status_str, completed = "error", False
            node = prompt[current] if current else {}
            add_message(
                "execution_interrupted",
                {
                    "prompt_id": prompt_id,
                    "node_id": current,
                    "node_type": node.get("class_type"),
                    "executed": list(executed),
                },
                True,
            )
        except _NodeFailure as failure:
            status_str, completed = "error", False
            node = prompt[current] if current else {}
            add_message(
                "execution_error",
                {
                    "prompt_id": prompt_id,
                    "node_id": current,
                    "node_type": node.get("class_type"),
                    "executed": list(executed),
                    "exception_message": failure.message,
                    "exception_type": failure.exception_type,
                    "traceback": [
                        '  File "execution.py", line 496, in execute\n',
                        f"{failure.exception_type}: {failure.message}\n",
                    ],
                    "current_inputs": current_inputs,
                    "current_outputs": list(executed),
                },
                False,
            )
        else:
            add_message("execution_success", {"prompt_id": prompt_id}, False)
        with self.lock:
            if self._epoch != epoch:
                return
            self._history[prompt_id] = {
                "prompt": [number, prompt_id, prompt, extra_data, outputs],
                "outputs": ui_outputs,
                "status": {"status_str": status_str, "completed": completed, "messages": messages},
                "meta": meta,
            }
        if sid is not None:  # main.py prompt_worker: only to the prompt's own client
            self.send_sync("executing", {"node": None, "prompt_id": prompt_id}, sid)

    def _check(self, stop: threading.Event, epoch: int) -> None:
        if stop.is_set() or self._epoch != epoch or self._interrupt.is_set():
            raise _Interrupted

    def _wait(self, seconds: float | None, stop: threading.Event, epoch: int) -> None:
        end = None if seconds is None else time.monotonic() + seconds
        while end is None or time.monotonic() < end:
            self._check(stop, epoch)
            self._interrupt.wait(0.02 if end is None else max(0.0, min(0.02, end - time.monotonic())))
        self._check(stop, epoch)

    def _model_time(self, text: str, last: bool, stop: threading.Event, epoch: int) -> None:
        if not last:
            return
        slow = sum(f.count for f in self.faults("slow")) + self.config.latency_ms / 1000.0
        if slow:
            self._wait(slow, stop, epoch)
        if self.prompt_fault("hang", text):
            self._wait(None, stop, epoch)

    def _faults_at(self, text: str, class_type: str, here: bool) -> None:
        if not here:
            return
        if fault := self.prompt_fault("oom", text):
            raise _NodeFailure(
                "torch.OutOfMemoryError",
                "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 11.99 GiB of which "
                f"1.02 GiB is free. (emulator fault {fault})",
                OOM_TIPS,
            )
        if fault := self.prompt_fault("execution-error", text):
            raise _NodeFailure(
                "RuntimeError", f"Error while running {class_type}: emulated failure (fault {fault})"
            )

    # ---- nodes

    def _run_node(
        self, class_type: str, inp: dict[str, Any], progress: Callable[[int, int], None]
    ) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
        if class_type == "LoadImage":
            img = self._load_input(inp["image"])
            rgb = ImageOps.exif_transpose(img).convert("RGB")
            if "A" in img.getbands():
                mask = ImageOps.invert(img.getchannel("A"))  # ComfyUI: mask = 1 - alpha
            else:
                mask = Image.new("L", (64, 64), 0)
            return ([rgb], [mask]), None
        if class_type == "LoadImageMask":  # nodes.LoadImageMask: always RGBA, alpha inverted
            img = ImageOps.exif_transpose(self._load_input(inp["image"]))
            if img.getbands() != ("R", "G", "B", "A"):
                img = img.convert("RGBA")
            band = str(inp["channel"])[0].upper()
            mask = img.getchannel(band)
            return ([ImageOps.invert(mask) if band == "A" else mask],), None
        if class_type == "ImageInvert":
            return ([ImageOps.invert(i) for i in inp["image"]],), None
        if class_type == "ImageScale":
            return (
                [
                    _scale(i, inp["upscale_method"], int(inp["width"]), int(inp["height"]), inp["crop"])
                    for i in inp["image"]
                ],
            ), None
        if class_type == "EmptyImage":
            c = int(inp["color"])
            colour = ((c >> 16) & 0xFF, (c >> 8) & 0xFF, c & 0xFF)
            return (
                [
                    Image.new("RGB", (int(inp["width"]), int(inp["height"])), colour)
                    for _ in range(int(inp["batch_size"]))
                ],
            ), None
        if class_type == "ImageCompositeMasked":
            return (_composite(inp),), None
        if class_type == "SaveImage":
            return (), {"images": self._save(inp["images"], str(inp.get("filename_prefix", "ComfyUI")))}
        # model nodes: opaque values, a placeholder picture at the end
        if class_type == "CheckpointLoaderSimple":
            ckpt = inp["ckpt_name"]
            return ({"model": ckpt}, {"clip": ckpt}, {"vae": ckpt}), None
        if class_type == "CLIPTextEncode":
            return ([{"text": str(inp["text"])}],), None
        if class_type == "EmptyLatentImage":
            return (
                {"width": int(inp["width"]), "height": int(inp["height"]), "batch": int(inp["batch_size"])},
            ), None
        if class_type in ("VAEEncode", "VAEEncodeForInpaint"):
            img = inp["pixels"]
            return ({"width": img[0].width, "height": img[0].height, "batch": len(img)},), None
        if class_type == "InpaintModelConditioning":
            img = inp["pixels"]
            latent = {"width": img[0].width, "height": img[0].height, "batch": len(img)}
            return (inp["positive"], inp["negative"], latent), None
        if class_type == "ControlNetLoader":
            return ({"control_net": inp["control_net_name"]},), None
        if class_type == "ControlNetApplyAdvanced":
            tag = {"text": f"+controlnet {inp['control_net']['control_net']}"}
            return ([*inp["positive"], tag], inp["negative"]), None
        if class_type == "IPAdapterUnifiedLoader":
            return ({"model": f"{inp['model']['model']} +ipadapter"}, {"ipadapter": inp["preset"]}), None
        if class_type == "IPAdapterAdvanced":
            return ({"model": inp["model"]["model"]},), None
        if class_type == "KSampler":
            steps = int(inp["steps"])
            shown = min(steps, 5)
            for i in range(1, shown + 1):
                progress(i * steps // shown, steps)
            text = " ".join(c["text"] for c in inp["positive"])
            return (
                {**inp["latent_image"], "text": text, "seed": inp["seed"], "model": inp["model"]["model"]},
            ), None
        if class_type == "VAEDecode":
            lat = inp["samples"]
            label = (
                f"EMULATOR ComfyUI {lat.get('model', '')}: {lat.get('text', '')} (seed {lat.get('seed', 0)})"
            )
            imgs = [
                Image.open(io.BytesIO(render_png(label, lat["width"], lat["height"], i))).convert("RGB")
                for i in range(lat["batch"])
            ]
            return (imgs,), None
        raise _NodeFailure("NotImplementedError", f"the emulator cannot run {class_type}")

    def _load_input(self, name: str) -> Image.Image:
        sub, _, fname = str(name).rpartition("/")
        with self.lock:
            data = self.files.get(("input", sub, fname))
        if data is None:
            raise _NodeFailure("FileNotFoundError", f"[Errno 2] No such file or directory: 'input/{name}'")
        img = Image.open(io.BytesIO(data))
        img.load()
        return img

    def _save(self, images: list[Image.Image], prefix: str) -> list[dict[str, str]]:
        # folder_paths.get_save_image_path: the subfolder is the prefix's directory, the counter follows the
        # highest existing one for that prefix; SaveImage names files f"{filename}_{counter:05}_.png".
        sub, _, base = prefix.replace("\\", "/").rpartition("/")
        results = []
        with self.lock:
            counter = 1
            for kind, s, name in self.files:
                if kind == "output" and s == sub and name.startswith(base + "_") and name.endswith("_.png"):
                    digits = name[len(base) + 1 : -5]
                    if digits.isdigit():
                        counter = max(counter, int(digits) + 1)
            for img in images:
                name = f"{base}_{counter:05}_.png"
                self.files[("output", sub, name)] = _png(img)
                results.append({"filename": name, "subfolder": sub, "type": "output"})
                counter += 1
        return results

    # ---- stats and lifecycle

    def runs(self, prompt_id: str) -> int:
        with self.lock:
            return self.counters[f"run:{prompt_id}"]

    def start(self) -> ComfyUIEmulator:
        if self._server is not None:
            return self
        self._closed = False
        self._stopping.clear()
        server = _ComfyServer((self.config.host, self.config.port), self)
        host, port = server.server_address[:2]
        server.base_url = f"http://{host}:{port}"
        self.config.port = port  # a restart comes back on the same port
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, name=f"comfyui:{port}", daemon=True
        )
        self._thread.start()
        with self.lock:
            self._epoch += 1
            epoch = self._epoch
        self._worker_stop = stop = threading.Event()
        self._worker = threading.Thread(
            target=self._work, args=(stop, epoch), name="comfyui-worker", daemon=True
        )
        self._worker.start()
        return self

    def stop(self) -> None:
        self._closed = True  # a restart under way does not come back
        self._shutdown()

    def _shutdown(self) -> None:
        self._worker_stop.set()
        with self._cond:
            self._cond.notify_all()
        worker = self._worker
        super().stop()
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=5)
        self._worker = None

    def restart(self, down_s: float | None = None) -> None:
        """A ComfyUI process restart: the running prompt is lost, the queue and history are dropped, WebSocket
        clients are cut off and connections are refused for down_s; files in input/output stay (they are on disk)."""
        with self._restarting:
            if self._server is None:
                return
            self._shutdown()
            with self.lock:
                self._queue.clear()
                self._history.clear()
                self._running = None
                self._last_node = None
                self._clients.clear()
                self._number = 0
                self.counters["restarts"] += 1
            time.sleep(self.restart_down_s if down_s is None else down_s)
            if not self._closed:
                self.start()


# --------------------------------------------------------------------------- helpers


def _prompt_text(prompt: dict[str, Any]) -> str:
    return (
        "\n".join(
            v for node in prompt.values() for v in (node.get("inputs") or {}).values() if isinstance(v, str)
        )
        + "\n"
        + " ".join(str(node.get("class_type")) for node in prompt.values())
    )


def _execution_order(prompt: dict[str, Any], outputs: list[str]) -> list[str]:
    order: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in seen:
            return
        seen.add(node_id)
        for value in (prompt[node_id].get("inputs") or {}).values():
            if _is_link(value):
                visit(str(value[0]))
        order.append(node_id)

    for out in sorted(outputs, key=lambda x: (len(x), x)):
        visit(out)
    return order


RESAMPLE = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _scale(img: Image.Image, method: str, width: int, height: int, crop: str) -> Image.Image:
    # nodes.ImageScale: a zero side keeps the aspect ratio; crop "center" crops to the new aspect first.
    if width == 0 and height == 0:
        return img.copy()
    if width == 0:
        width = max(1, round(img.width * height / img.height))
    elif height == 0:
        height = max(1, round(img.height * width / img.width))
    if crop == "center":
        old_aspect, new_aspect = img.width / img.height, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((img.width - img.width * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((img.height - img.height * (old_aspect / new_aspect)) / 2)
        img = img.crop((x, y, img.width - x, img.height - y))
    return img.resize((width, height), RESAMPLE[method])


def _composite(inp: dict[str, Any]) -> list[Image.Image]:
    # comfy_extras/nodes_mask.py composite(): the source pasted at (x, y) through the mask (all ones without one).
    dests, sources = inp["destination"], inp["source"]
    masks = inp.get("mask")
    out = []
    for i in range(max(len(dests), len(sources))):
        dest = dests[min(i, len(dests) - 1)].copy()
        src = sources[min(i, len(sources) - 1)]
        if inp.get("resize_source"):
            src = src.resize(dest.size, Image.Resampling.BILINEAR)
        mask = masks[min(i, len(masks) - 1)].resize(src.size, Image.Resampling.BILINEAR) if masks else None
        dest.paste(src.convert(dest.mode), (int(inp["x"]), int(inp["y"])), mask)
        out.append(dest)
    return out


def _multipart(request: Request) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    ctype = request.headers.get("Content-Type", "")
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    if "multipart/form-data" not in ctype:
        return fields, files
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + request.body
    )
    if not msg.is_multipart():
        return fields, files
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            files[str(name)] = (filename, payload)
        else:
            fields[str(name)] = payload.decode("utf-8", "replace")
    return fields, files


# --------------------------------------------------------------------------- HTTP + WebSocket


class _WebSocket:
    """The server side of one RFC 6455 connection: unmasked text frames out, masked frames in."""

    def __init__(self, sock: socket.socket, rfile: Any) -> None:
        self.sock, self.rfile = sock, rfile
        self.lock = threading.Lock()
        self.closed = False

    def _frame(self, opcode: int, payload: bytes) -> bytes:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
        return head + payload

    def send_raw(self, opcode: int, payload: bytes) -> None:
        with self.lock:
            if self.closed:
                return
            try:
                self.sock.sendall(self._frame(opcode, payload))
            except OSError:
                self.closed = True

    def send_text(self, text: str) -> None:
        self.send_raw(0x1, text.encode())

    def recv(self) -> tuple[int, bytes] | None:
        head = self.rfile.read(2)
        if len(head) < 2:
            return None
        opcode, n = head[0] & 0x0F, head[1] & 0x7F
        masked = head[1] & 0x80
        if n == 126:
            n = struct.unpack("!H", self.rfile.read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self.rfile.read(8))[0]
        if n > MAX_UPLOAD_BYTES:
            return None
        key = self.rfile.read(4) if masked else b"\0\0\0\0"
        data = self.rfile.read(n)
        if len(data) < n:
            return None
        return opcode, bytes(b ^ key[i % 4] for i, b in enumerate(data))


class _ComfyHandler(_Handler):
    server: _ComfyServer

    def version_string(self) -> str:
        return "imagepipe-comfyui-emulator (Python/aiohttp shape)"

    def do_GET(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's naming
        url = urlsplit(self.path)
        if url.path in ("/ws", "/api/ws") and "websocket" in self.headers.get("Upgrade", "").lower():
            self._websocket(parse_qs(url.query))
        else:
            self._dispatch()

    def _read_body(self) -> bytes:  # uploads are bigger than the JSON APIs' 1 MiB
        emulator = self.server.emulator
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise emulator.error(400, "invalid_request", "bad Content-Length header") from None
        if length > MAX_UPLOAD_BYTES:
            raise emulator.error(413, "request_too_large", f"request body over {MAX_UPLOAD_BYTES} bytes")
        return self.rfile.read(length) if length > 0 else b""

    def _websocket(self, query: dict[str, list[str]]) -> None:
        emulator = self.server.emulator
        assert isinstance(emulator, ComfyUIEmulator)
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        sid = (query.get("clientId") or [""])[-1] or uuid.uuid4().hex
        ws = _WebSocket(self.connection, self.rfile)
        self.connection.settimeout(None)
        emulator._ws_connect(sid, ws)
        try:
            while True:
                frame = ws.recv()
                if frame is None:
                    break
                opcode, payload = frame
                if opcode == 0x8:
                    ws.send_raw(0x8, payload[:2])
                    break
                if opcode == 0x9:
                    ws.send_raw(0xA, payload)
        except (OSError, struct.error):
            pass
        finally:
            ws.closed = True
            emulator._ws_disconnect(sid, ws)


class _ComfyServer(_Server):
    def __init__(self, addr: tuple[str, int], emulator: BaseEmulator) -> None:
        self.emulator = emulator
        self.base_url = ""
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super(_Server, self).__init__(addr, _ComfyHandler)


__all__ = ["OBJECT_INFO", "ComfyUIEmulator", "Fault"]
