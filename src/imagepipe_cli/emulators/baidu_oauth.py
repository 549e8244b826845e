"""Loopback emulator of Baidu's legacy v1 image API (OAuth token endpoint, sd_xl) and of the brief's shape."""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from imagepipe_cli.emulators.base import (
    COUNT,
    DOWNLOAD_FAULTS,
    FLAG,
    PROBABILITY,
    RATE_FAULTS,
    WORD,
    WORD_COUNT,
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

TOKEN_PATH = r"/oauth/2\.0/token"
LEGACY_PATH = r"/rpc/2\.0/ai_custom/v1/wenxinworkshop/text2image/(?P<model>[^/]+)"
BRIEF_PATH = r"/v1/images/generations"
MIN_SIDE, MAX_SIDE, MAX_N = 64, 2048, 4  # the brief's; the real sd_xl takes a fixed size list [3P]

# Baidu v1 answers these as HTTP 200 with {"error_code", "error_msg"} (providers.md section 2).
TOKEN_INVALID, TOKEN_EXPIRED = 110, 111
DAILY_LIMIT, QPS_LIMIT, UNAVAILABLE, UNSUPPORTED_METHOD = 17, 18, 2, 3
INTERNAL, INVALID_JSON, INVALID_PARAM = 336000, 336002, 336003


@dataclass
class _Issued:
    expires_at: float  # time.monotonic() deadline
    epoch: int  # revocation epoch it was issued in
    api_key: str
    secret_key: str


class BaiduOAuthEmulator(BaseEmulator):
    """Token endpoint + the legacy sd_xl path + the brief's /v1/images/generations, one token store.

    Test hooks: `keys` (replace a value to rotate a key: tokens made with the old one answer 110),
    `expire_tokens()` (every token issued so far answers 111), `token_ttl_s`, `hang_s`."""

    name: ClassVar[str] = "baidu-oauth"
    title: ClassVar[str] = "Baidu OAuth (legacy v1 / brief)"
    FAULTS: ClassVar[dict[str, str]] = {
        "refuse": WORD,  # error_code 336003, a message about sensitive content
        "fail": WORD,  # HTTP 500
        "flaky": WORD_COUNT,  # error_code 2 (service unavailable), first N matching requests
        "rate-limit": WORD_COUNT,  # error_code 18 (QPS limit), first N matching requests
        "stop": WORD,  # error_code 17 (daily limit reached)
        "hang": WORD,  # paid, then 30 s of silence
        "malformed": WORD,  # HTTP 200 with an HTML page
        "error-rate": PROBABILITY,  # random HTTP 500s
        "revoke-tokens-every": COUNT,  # every N successes all tokens are revoked (then 110)
        "expire-tokens": FLAG,  # every token answers 111
        **RATE_FAULTS,  # rate-limit-rate=P, malformed-rate=P, hang-rate=P
        **DOWNLOAD_FAULTS,  # download-error=WORD, download-flaky=WORD:N, download-expired, download-garbage
    }
    DEFAULT_KEYS: ClassVar[dict[str, str]] = {
        "BAIDU_API_KEY": "emulator-api-key",
        "BAIDU_SECRET_KEY": "emulator-secret-key",
    }
    MODELS: ClassVar[frozenset[str]] = frozenset({"sd_xl"})  # legacy endpoints served
    REFUSALS: ClassVar[tuple[str, ...]] = (
        "refuse",
        "stop",
        "rate-limit",
        "flaky",
        "fail",
        "error-rate",
        "malformed",
    )

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        super().__init__(config)
        self.token_ttl_s = 2592000  # Baidu's: 30 days
        self._issued: dict[str, _Issued] = {}
        self._epoch = 0
        self._successes = 0

    def routes(self) -> list[Route]:
        return [
            ("GET,POST", TOKEN_PATH, self._token),
            ("POST", LEGACY_PATH, self._legacy),
            ("POST", BRIEF_PATH, self._brief),
        ]

    def error_body(self, status: int, code: str, message: str) -> Any:
        return {"error_code": int(code) if str(code).isdigit() else code, "error_msg": message}

    def baidu_error(self, code: int, message: str, status: int = 200) -> Reply:
        self.count(f"error_code:{code}")
        return Reply(status, {"error_code": code, "error_msg": message})

    def expire_tokens(self) -> None:
        """Every token issued so far answers 111 from now on (new ones are fine)."""
        with self.lock:
            for issued in self._issued.values():
                issued.expires_at = 0.0

    # ---- endpoints

    def _token(self, request: Request) -> Any:
        self.count("token_requests")
        params = request.form()
        if params.get("grant_type") != "client_credentials":
            raise Reply(
                400,
                {
                    "error": "unsupported_grant_type",
                    "error_description": "The authorization grant type is not supported",
                },
            )
        api_key, secret_key = self.keys.get("BAIDU_API_KEY", ""), self.keys.get("BAIDU_SECRET_KEY", "")
        if params.get("client_id") != api_key:
            raise Reply(401, {"error": "invalid_client", "error_description": "unknown client id"})
        if params.get("client_secret") != secret_key:
            raise Reply(401, {"error": "invalid_client", "error_description": "Client authentication failed"})
        token = f"24.{secrets.token_hex(16)}.{self.token_ttl_s}.{int(time.time())}.emulator"
        with self.lock:
            self._issued[token] = _Issued(
                time.monotonic() + self.token_ttl_s, self._epoch, api_key, secret_key
            )
        return {
            "access_token": token,
            "expires_in": self.token_ttl_s,
            "refresh_token": f"25.{secrets.token_hex(16)}.emulator",
            "scope": "emulator",
            "session_key": secrets.token_hex(16),
            "session_secret": secrets.token_hex(16),
        }

    def _legacy(self, request: Request) -> Any:
        self.count("requests")
        self._check_token(request)
        model = request.match["model"] if request.match else ""
        if model not in self.MODELS:
            raise self.baidu_error(UNSUPPORTED_METHOD, "Unsupported openapi method")
        prompt, width, height, n, _ = self._validate(request, brief=False)
        pngs = self._make(prompt, width, height, n)
        return {
            "id": f"as-{secrets.token_hex(6)}",
            "object": "image",
            "created": int(time.time()),
            "data": [
                {"object": "image", "b64_image": base64.b64encode(png).decode("ascii"), "index": i}
                for i, png in enumerate(pngs)
            ],
        }

    def _brief(self, request: Request) -> Any:
        self.count("requests")
        self._check_token(request)
        prompt, width, height, n, req = self._validate(request, brief=True)
        pngs = self._make(prompt, width, height, n)
        if req.get("response_format", "url") == "url":
            data = [{"url": self.store_file(png, prompt=prompt)} for png in pngs]
        else:
            data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in pngs]
        return {
            "id": f"img-{secrets.token_hex(12)}",
            "created": int(time.time()),
            "model": req["model"],
            "data": data,
        }

    # ---- steps of a generation

    def _check_token(self, request: Request) -> None:
        # The legacy API reads ?access_token=, the brief's shape a Bearer header: either will do.
        token = request.query.get("access_token") or request.bearer()
        with self.lock:
            issued = self._issued.get(token) if token else None
            invalid = (
                issued is None
                or issued.epoch < self._epoch
                or (issued.api_key, issued.secret_key)
                != (self.keys.get("BAIDU_API_KEY"), self.keys.get("BAIDU_SECRET_KEY"))
            )
            expired = not invalid and (
                bool(self.faults("expire-tokens")) or time.monotonic() >= issued.expires_at
            )
        if invalid:
            raise self.baidu_error(TOKEN_INVALID, "Access token invalid or no longer valid")
        if expired:
            raise self.baidu_error(TOKEN_EXPIRED, "Access token expired")

    def _validate(self, request: Request, *, brief: bool) -> tuple[str, int, int, int, dict[str, Any]]:
        if not self.take_rate_token():
            raise self.baidu_error(QPS_LIMIT, "Open api qps request limit reached")

        def bad(message: str) -> Reply:
            return self.baidu_error(INVALID_PARAM, f"param invalid: {message}")

        req = json_body(request, lambda message: self.baidu_error(INVALID_JSON, message))
        prompt = req.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise bad("prompt is required and must be a non-empty string")
        size = parse_size(req.get("size", "1024x1024"))
        if size is None or not all(MIN_SIDE <= side <= MAX_SIDE for side in size):
            raise bad(f"size must be 'WxH' with {MIN_SIDE} <= W,H <= {MAX_SIDE}, got {req.get('size')!r}")
        n = req.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise bad(f"n must be an integer from 1 to {MAX_N}, got {n!r}")
        if not isinstance(req.get("negative_prompt", ""), str):
            raise bad("negative_prompt must be a string")
        for name in ("steps", "seed"):
            value = req.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise bad(f"{name} must be an integer")
        cfg = req.get("cfg_scale")
        if cfg is not None and (isinstance(cfg, bool) or not isinstance(cfg, (int, float))):
            raise bad("cfg_scale must be a number")
        if brief:
            if not isinstance(req.get("model"), str) or not req["model"]:
                raise bad("model is required and must be a non-empty string")
            if req.get("response_format", "url") not in ("url", "b64_json"):
                raise bad("response_format must be 'url' or 'b64_json'")
        self.apply_common_faults(prompt, self._fault_answer)
        return prompt, size[0], size[1], n, req

    def _fault_answer(self, kind: str, fault: Fault) -> Reply:
        """An injected refusal or error in Baidu v1's own shape (mostly HTTP 200 with an error_code)."""
        if kind == "refuse":
            return self.baidu_error(
                INVALID_PARAM, f"prompt contains sensitive content and was refused (emulator fault {fault})"
            )
        if kind == "stop":
            return self.baidu_error(
                DAILY_LIMIT, f"Open api daily request limit reached (emulator fault {fault})"
            )
        if kind == "rate-limit":
            return self.baidu_error(QPS_LIMIT, f"Open api qps request limit reached (emulator fault {fault})")
        if kind == "flaky":
            return self.baidu_error(UNAVAILABLE, f"Service temporarily unavailable (emulator fault {fault})")
        if kind == "malformed":
            return Reply(200, raw=b"<html><body>upstream says hello</body></html>", content_type="text/html")
        # fail, error-rate
        return self.baidu_error(INTERNAL, f"Internal error (emulator fault {fault})", status=500)

    def _make(self, prompt: str, width: int, height: int, n: int) -> list[bytes]:
        self.accept(prompt, n)
        pngs = [render_png(prompt, width, height, i) for i in range(n)]
        every = [f.count for f in self.faults("revoke-tokens-every")]
        with self.lock:
            self._successes += 1
            if any(self._successes % k == 0 for k in every):
                self._epoch += 1  # every token issued so far is revoked: the next call gets 110
                self.counters["revocations"] += 1
        return pngs
