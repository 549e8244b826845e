"""Loopback emulator of OpenAI Images: POST /v1/images/generations answers base64 images and token usage."""

from __future__ import annotations

import base64
import io
import secrets
import time
from typing import Any, ClassVar

from PIL import Image

from imagepipe_cli.emulators.base import (
    COMMON_FAULTS,
    FLAG,
    BaseEmulator,
    EmulatorConfig,
    Fault,
    Reply,
    Request,
    Route,
    json_body,
    render_png,
)

# Exactly what OpenAIProvider.check lets through for gpt-image models (providers.md section 3), so a
# checked row is never refused for its shape.
MODELS = ("gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
SIZES = {
    "1024x1024": (1024, 1024),
    "1536x1024": (1536, 1024),
    "1024x1536": (1024, 1536),
    "auto": (1024, 1024),
}
MAX_N, MAX_PROMPT_CHARS = 10, 32000
CHOICES = {
    "quality": ("low", "medium", "high", "auto"),
    "background": ("transparent", "opaque", "auto"),
    "output_format": ("png", "jpeg", "webp"),
    "moderation": ("low", "auto"),
}
# The body fields gpt-image takes; the API answers any other one with 400 unknown_parameter.
KNOWN_FIELDS = {
    "model",
    "prompt",
    "n",
    "size",
    "output_compression",
    "user",
    "stream",
    "partial_images",
    *CHOICES,
}
# Output tokens per image at 1024x1024 by quality (OpenAI's published figures; enough for a usage block).
OUTPUT_TOKENS = {"low": 272, "medium": 1056, "high": 4160, "auto": 1056}
ERROR_TYPES = {
    "moderation_blocked": "image_generation_user_error",
    "insufficient_quota": "insufficient_quota",
    "rate_limit_exceeded": "requests",
}


class OpenAIEmulator(BaseEmulator):
    """OpenAI's image API. Counters: requests, paid, images, paid:<prompt>, downloads (url-only)."""

    name: ClassVar[str] = "openai"
    title: ClassVar[str] = "OpenAI Images"
    FAULTS: ClassVar[dict[str, str]] = {
        **COMMON_FAULTS,
        "url-only": FLAG,  # answer URLs instead of b64_json, as some OpenAI-compatible servers do
    }
    DEFAULT_KEYS: ClassVar[dict[str, str]] = {"OPENAI_API_KEY": "sk-emulator-0000000000000000"}

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        super().__init__(config)
        self.last_body: dict[str, Any] | None = None  # the last generation request, for tests

    def routes(self) -> list[Route]:
        return [("POST", r"/v1/images/generations", self._generate)]

    def error_body(self, status: int, code: str | None, message: str, param: str | None = None) -> Any:
        error_type = ERROR_TYPES.get(code or "") or (
            "server_error" if status >= 500 else "invalid_request_error"
        )
        return {"error": {"message": message, "type": error_type, "param": param, "code": code}}

    def api_error(self, status: int, code: str | None, message: str, param: str | None = None) -> Reply:
        return Reply(status, self.error_body(status, code, message, param))

    # ---- the endpoint

    def _generate(self, request: Request) -> Reply:
        # Every answer, errors included, carries the request id that OpenAI support asks for.
        request_id = "req_" + secrets.token_hex(16)
        try:
            answer = self._answer(request)
        except Reply as reply:
            reply.headers.setdefault("x-request-id", request_id)
            raise
        return Reply(200, answer, {"x-request-id": request_id})

    def _answer(self, request: Request) -> dict[str, Any]:
        self.count("requests")
        self._authenticate(request.bearer())
        body = json_body(request, lambda msg: self.api_error(400, "invalid_json", msg))
        with self.lock:
            self.last_body = body
        model, prompt, n, width, height = self._validate(body)
        if not self.take_rate_token():
            raise self._rate_limited(model)
        self.apply_common_faults(prompt, lambda kind, fault: self._fault_answer(kind, fault, prompt, model))
        self.accept(prompt, n)  # everything that can refuse has been decided: from here the request is paid
        fmt = body.get("output_format", "png")
        images = [_encode(render_png(prompt, width, height, i), fmt) for i in range(n)]
        if self.faults("url-only"):
            data = [{"url": self.store_file(img, f"image/{fmt}", fmt, prompt)} for img in images]
        else:
            data = [{"b64_json": base64.b64encode(img).decode("ascii")} for img in images]
        quality = body.get("quality", "auto")
        input_tokens = max(1, len(prompt) // 4)
        output_tokens = n * OUTPUT_TOKENS[quality] * width * height // (1024 * 1024)
        return {
            "created": int(time.time()),
            "background": body.get("background", "opaque"),
            "data": data,
            "output_format": fmt,
            "quality": "medium" if quality == "auto" else quality,
            "size": f"{width}x{height}",
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"image_tokens": 0, "text_tokens": input_tokens},
                "output_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            },
        }

    def _authenticate(self, key: str) -> None:
        if not key:
            raise self.api_error(
                401,
                None,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        if key not in self.keys.values():
            masked = "*" * max(0, len(key) - 4) + key[-4:]  # OpenAI shows only the end of a wrong key
            raise self.api_error(
                401,
                "invalid_api_key",
                f"Incorrect API key provided: {masked}. You can find your API key "
                "at https://platform.openai.com/account/api-keys.",
            )

    def _validate(self, body: dict[str, Any]) -> tuple[str, str, int, int, int]:
        for field in body:
            if field not in KNOWN_FIELDS:
                raise self.api_error(400, "unknown_parameter", f"Unknown parameter: '{field}'.", field)
        model = body.get("model", MODELS[0])
        if model not in MODELS:
            raise self.api_error(
                404, "model_not_found", f"The model `{model}` does not exist or you do not have access to it."
            )
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise self.api_error(
                400, "missing_required_parameter", "Missing required parameter: 'prompt'.", "prompt"
            )
        if len(prompt) > MAX_PROMPT_CHARS:
            raise self.api_error(
                400,
                "string_above_max_length",
                f"Invalid 'prompt': string too long. Expected a string with maximum length {MAX_PROMPT_CHARS}, "
                f"but got a string with length {len(prompt)} instead.",
                "prompt",
            )
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int):
            raise self.api_error(400, "invalid_type", "Invalid type for 'n': expected an integer.", "n")
        if n < 1:
            raise self.api_error(
                400,
                "integer_below_min_value",
                f"Invalid 'n': integer below minimum value. Expected a value >= 1, but got {n} instead.",
                "n",
            )
        if n > MAX_N:
            raise self.api_error(
                400,
                "integer_above_max_value",
                f"Invalid 'n': integer above maximum value. Expected a value "
                f"<= {MAX_N}, but got {n} instead.",
                "n",
            )
        size = body.get("size", "auto")
        if size not in SIZES:
            raise self.api_error(
                400,
                "invalid_value",
                f"Invalid value: '{size}'. Supported values are: "
                "'1024x1024', '1024x1536', '1536x1024', and 'auto'.",
                "size",
            )
        for field, choices in CHOICES.items():
            if field in body and body[field] not in choices:
                supported = ", ".join(f"'{c}'" for c in choices)
                raise self.api_error(
                    400,
                    "invalid_value",
                    f"Invalid value: '{body[field]}'. Supported values are: {supported}.",
                    field,
                )
        width, height = SIZES[size]
        return model, prompt, n, width, height

    def _rate_limited(self, model: str, why: str = "") -> Reply:
        return self.api_error(
            429,
            "rate_limit_exceeded",
            f"Rate limit reached for {model} in organization org-emulator on images "
            f"per minute (IPM): Limit 5, Used 5, Requested 1. Please try again in 12s.{why}",
        )

    def _fault_answer(self, kind: str, fault: Fault, prompt: str, model: str) -> Reply:
        """An injected refusal or error in OpenAI's own error shape."""
        if kind == "stop":
            return self.api_error(
                429,
                "insufficient_quota",
                "You exceeded your current quota, please check your plan and billing "
                f"details. (fault {fault})",
            )
        if kind == "refuse":
            return self.api_error(
                400,
                "moderation_blocked",
                "Your request was rejected by the safety system. If you believe "
                f"this is an error, contact us at help.openai.com. (fault {fault})",
            )
        if kind == "flaky":
            return self.api_error(
                503, None, f"The engine is currently overloaded, please try again later. (fault {fault})"
            )
        if kind == "rate-limit":
            return self._rate_limited(model, f" (fault {fault})")
        if kind == "malformed":
            # A 200 that is not the API's answer: image entries with neither b64_json nor url.
            return Reply(200, {"created": int(time.time()), "data": [{"revised_prompt": prompt}]})
        return self.api_error(  # fail, error-rate
            500,
            None,
            f"The server had an error while processing your request. Sorry about that! (fault {fault})",
        )


def _encode(png: bytes, fmt: str) -> bytes:
    """The PNG as the requested output_format (same pixels, same size)."""
    if fmt == "png":
        return png
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(out, "JPEG" if fmt == "jpeg" else "WEBP", quality=80)
    return out.getvalue()
