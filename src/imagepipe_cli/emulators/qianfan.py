"""Loopback emulator of Baidu Qianfan v2 image generation: POST /v2/images/generations answers expiring URLs."""

from __future__ import annotations

import secrets
import time
from typing import Any, ClassVar

from imagepipe_cli.emulators.base import (
    COMMON_FAULTS,
    BaseEmulator,
    EmulatorConfig,
    Fault,
    Reply,
    Request,
    Route,
    json_body,
    parse_size,
    render_png,
)

IRAG, FLUX = "irag-1.0", "flux.1-schnell"
# Exactly what QianfanProvider.check lets through for these models, so a checked row is never refused
# for its shape (providers.md section 2; "a multiple of 8" is the provider's [NF] guess, mirrored here).
MODELS: dict[str, dict[str, Any]] = {
    IRAG: {"max_prompt": 220, "fields": ()},
    FLUX: {"max_prompt": 512, "fields": ("steps", "seed", "guidance")},
}
MIN_SIDE, MAX_SIDE, SIDE_STEP, MAX_N = 512, 2048, 8, 4


def _answer_id() -> str:
    return "as-" + secrets.token_hex(5)


class QianfanEmulator(BaseEmulator):
    """Qianfan v2's image API. Counters: requests, paid, images, paid:<prompt>, downloads."""

    name: ClassVar[str] = "qianfan"
    title: ClassVar[str] = "Baidu Qianfan v2"
    FAULTS: ClassVar[dict[str, str]] = COMMON_FAULTS
    DEFAULT_KEYS: ClassVar[dict[str, str]] = {"QIANFAN_API_KEY": "bce-v3/ALTAK-emulator/emulator-secret-key"}

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        super().__init__(config)
        self.last_body: dict[str, Any] | None = None  # the last generation request, for tests

    def routes(self) -> list[Route]:
        return [("POST", r"/v2/images/generations", self._generate)]

    def error_body(self, status: int, code: str, message: str) -> Any:
        # The `type` values other than rate_limit_exceeded (seen in a captured 429) are [NF].
        if status == 429:
            error_type = "rate_limit_exceeded"
        elif status >= 500:
            error_type = "server_error"
        else:
            error_type = "invalid_request_error"
        return {"error": {"code": code, "message": message, "type": error_type}, "id": _answer_id()}

    # ---- the endpoint

    def _generate(self, request: Request) -> Any:
        self.count("requests")
        if not request.bearer() or request.bearer() not in self.keys.values():
            raise self.error(401, "invalid_iam_token", "IAM Certification failed")
        body = json_body(request, lambda msg: self.error(400, "invalid_argument", msg))
        with self.lock:
            self.last_body = body
        model, prompt, n, width, height = self._validate(body)
        if not self.take_rate_token():
            raise self.error(429, "rpm_rate_limit_exceeded", "Rate limit reached for RPM")
        self.apply_common_faults(prompt, self._fault_answer)
        self.accept(prompt, n)  # everything that can refuse has been decided: from here the request is paid
        urls = [self.store_file(render_png(prompt, width, height, i), prompt=prompt) for i in range(n)]
        return {"id": _answer_id(), "created": int(time.time()), "data": [{"url": url} for url in urls]}

    def _validate(self, body: dict[str, Any]) -> tuple[str, str, int, int, int]:
        def bad(message: str) -> Reply:
            return self.error(400, "invalid_argument", message)

        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad("model is required")
        if model not in MODELS:
            # The real answer for an unknown model is [NF]: a 400 naming the model.
            raise self.error(400, "invalid_model", f"model {model!r} does not exist or is not deployed")
        spec = MODELS[model]
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise bad("prompt is required")
        if len(prompt) > spec["max_prompt"]:
            raise bad(f"prompt is longer than {spec['max_prompt']} characters for {model}")
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise bad(f"n must be an integer from 1 to {MAX_N}")
        size = parse_size(body.get("size", "1024x1024"))
        if size is None or "*" in str(body.get("size", "")):
            raise bad("size must be written WxH")
        width, height = size
        for side in size:
            if not MIN_SIDE <= side <= MAX_SIDE or side % SIDE_STEP:
                raise bad(f"size sides must be multiples of {SIDE_STEP} from {MIN_SIDE} to {MAX_SIDE}")
        for field in ("steps", "seed", "guidance"):
            if field in body and field not in spec["fields"]:
                raise bad(f"{field} is not supported by {model}")
        for field in ("steps", "seed"):
            value = body.get(field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise bad(f"{field} must be an integer")
        guidance = body.get("guidance")
        if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))):
            raise bad("guidance must be a number")
        return model, prompt, n, width, height

    def _fault_answer(self, kind: str, fault: Fault) -> Reply:
        """An injected refusal or error in Qianfan's own error shape."""
        if kind == "stop":
            # Qianfan v2's arrears answer is [NF]: the provider stops on a 402/403 or a code naming
            # arrears/quota, and this is the shape chosen for it.
            return self.error(
                403, "account_arrears", f"the account is in arrears: recharge it (fault {fault})"
            )
        if kind == "refuse":
            return self.error(
                400, "invalid_image_genration_prompt", f"the prompt failed content review (fault {fault})"
            )
        if kind == "flaky":
            return self.error(503, "service_unavailable", f"Service temporarily unavailable (fault {fault})")
        if kind == "rate-limit":
            return self.error(429, "rpm_rate_limit_exceeded", f"Rate limit reached for RPM (fault {fault})")
        if kind == "malformed":
            # A 200 that is not the API's answer, as a misbehaving gateway sends.
            return Reply(
                200, raw=b"<html><body>upstream answered nothing</body></html>", content_type="text/html"
            )
        return self.error(500, "internal_error", f"Internal error (fault {fault})")  # fail, error-rate
