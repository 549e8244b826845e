"""Baidu's legacy v1 image API (OAuth token, then one POST per task), which also speaks the brief's shape."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote

import httpx

from imagepipe.contract import ImageTask
from imagepipe.providers.base import (
    Action,
    GeneratedImage,
    Generation,
    Limits,
    Provider,
    ProviderConfig,
    ProviderError,
    as_int,
    decode_b64,
    download,
    json_object,
    paid_images,
    send,
    status_kind,
)

TOKEN_PATH = "/oauth/2.0/token"
# Legacy v1 endpoints are one path per model (providers.md section 2); "{model}" is filled with the
# row's model, else the stack's, else sd_xl. A configured path without it is used as it is.
DEFAULT_PATH = "/rpc/2.0/ai_custom/v1/wenxinworkshop/text2image/{model}"
BRIEF_PATH = "/v1/images/generations"  # the brief's (non-existent) shape: model goes in the body

# Renew a token this long before the expires_in it came with (capped at half its lifetime).
TOKEN_REFRESH_MARGIN_S = 300.0
DEFAULT_TOKEN_LIFETIME_S = 3600.0  # when the answer has no usable expires_in

# Baidu v1 error codes (providers.md section 2; names from the vendor's qianfan SDK APIErrorCode [V]).
TOKEN_CODES = {110, 111}  # access token invalid / expired: get a new one
QUOTA_CODES = {17, 19}  # daily / total request limit reached: no more calls today
RATE_CODES = {18, 336100, 336501, 336502}  # QPS, high load, RPM, TPM
UNAVAILABLE_CODES = {1, 2, 4, 336000}  # unknown error, service unavailable, cluster over capacity, internal
NOT_PERMITTED_CODES = {6, 336004}  # no permission: the same for every row
# 336003 is the generic "invalid parameter" code [V]; a content refusal code for v1 image models was
# not found [NF], so a 336001-336003 answer whose message talks about content counts as moderation.
MODERATION_WORDS = re.compile(r"sensitive|unsafe|moderat|content polic|敏感|违规|违禁|审核", re.IGNORECASE)


# --------------------------------------------------------------------------- the token cache


@dataclass
class _Token:
    value: str
    renew_at: float


class TokenCache:
    """Access tokens by (token URL, API key), kept at module level so a warm Lambda reuses one token for
    every image; thread-safe, and one fetch per key at a time (concurrent callers wait for it)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._fetching: dict[tuple[str, str], threading.Lock] = {}

    def get(self, key: tuple[str, str], fetch: Callable[[], tuple[str, float]]) -> str:
        with self._lock:
            token = self._tokens.get(key)
            if token is not None and token.renew_at > self._clock():
                return token.value
            fetch_lock = self._fetching.setdefault(key, threading.Lock())
        with fetch_lock:
            with self._lock:  # another thread may have fetched it while this one waited
                token = self._tokens.get(key)
                if token is not None and token.renew_at > self._clock():
                    return token.value
            value, lifetime = fetch()
            margin = min(TOKEN_REFRESH_MARGIN_S, lifetime / 2)
            with self._lock:
                self._tokens[key] = _Token(value, self._clock() + lifetime - margin)
            return value

    def invalidate(self, key: tuple[str, str], value: str) -> None:
        """Forget `value` (the API said it is invalid or expired), unless a newer token replaced it."""
        with self._lock:
            token = self._tokens.get(key)
            if token is not None and token.value == value:
                del self._tokens[key]

    def clear(self) -> None:
        with self._lock:
            self._tokens.clear()


TOKENS = TokenCache()


def clear_tokens() -> None:
    """Forget every cached token (tests call this so one test's tokens never reach the next)."""
    TOKENS.clear()


# --------------------------------------------------------------------------- the provider


class BaiduOAuthProvider(Provider):
    name: ClassVar[str] = "baidu-oauth"
    default_model: ClassVar[str] = "sd_xl"
    key_names: ClassVar[tuple[str, ...]] = ("BAIDU_API_KEY", "BAIDU_SECRET_KEY")
    public_url: ClassVar[str] = "https://aip.baidubce.com"
    # The brief's limits. sd_xl itself takes only a fixed list of sizes [3P] (not verified, so not
    # enforced: a size it refuses comes back as error_code 336003 and fails the row at no cost).
    # Prompt length limit for v1 models: [NF], so the contract's own limit applies.
    limits: ClassVar[Limits] = Limits(
        min_side=64,
        max_side=2048,
        side_step=8,
        max_n=4,
        fields=frozenset({"negative_prompt", "steps", "seed", "guidance"}),
    )

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        self.path = "/" + (config.options.get("path") or DEFAULT_PATH).lstrip("/")
        self.token_url = self.base_url + TOKEN_PATH

    # ---- one task

    def start(self, task: ImageTask) -> Generation:
        api_key, secret_key = self.keys.get_many(*self.key_names)
        if not api_key or not secret_key:
            raise ProviderError(
                "auth", "no BAIDU_API_KEY / BAIDU_SECRET_KEY configured for baidu-oauth", action=Action.REAUTH
            )
        url, body = self._request(task)
        cache_key = (self.token_url, api_key)

        def token() -> str:
            return TOKENS.get(cache_key, lambda: self._fetch_token(api_key, secret_key))

        used = token()
        response = self._post(url, body, used)
        payload = json_object(response)
        if _token_error(payload) is not None:
            # Revoked or expired before its time: one new token and one more try (neither was paid).
            TOKENS.invalidate(cache_key, used)
            used = token()
            response = self._post(url, body, used)
            payload = json_object(response)
        if _token_error(payload) is not None or response.status_code == 401:
            # So the caller's one retry after re-reading the keys starts with a fresh token.
            TOKENS.invalidate(cache_key, used)
        return self._generation(response, payload)

    def _request(self, task: ImageTask) -> tuple[str, dict[str, Any]]:
        model = self.model_for(task)
        body: dict[str, Any] = {"prompt": task.prompt}
        if task.negative_prompt:
            body["negative_prompt"] = task.negative_prompt
        body["size"] = f"{task.width}x{task.height}"
        body["n"] = task.n
        if task.steps is not None:
            body["steps"] = task.steps
        if task.seed is not None:
            body["seed"] = task.seed
        if task.guidance is not None:
            body["cfg_scale"] = task.guidance
        path = self.path
        if "{model}" in path:
            path = path.replace("{model}", quote(model, safe=""))
        elif path.rstrip("/").endswith("/images/generations"):
            # The brief's shape names the model in the body; ask for base64 as the old client did.
            body["model"] = model
            body["response_format"] = "b64_json"
        body.update(task.params)
        return self.base_url + path, body

    def _fetch_token(self, api_key: str, secret_key: str) -> tuple[str, float]:
        params = {"grant_type": "client_credentials", "client_id": api_key, "client_secret": secret_key}
        try:
            response = send(self.http, "POST", self.token_url, what="the token request", params=params)
        except ProviderError as exc:
            # A lost token request costs nothing: plainly retryable, never "maybe accepted".
            raise ProviderError(exc.kind, "token request: " + exc.message, action=Action.RETRY) from exc
        payload = json_object(response)
        status = response.status_code
        token = payload.get("access_token")
        if status == 200 and isinstance(token, str) and token:
            lifetime = as_int(payload.get("expires_in"))
            return token, float(lifetime) if lifetime and lifetime > 0 else DEFAULT_TOKEN_LIFETIME_S
        reason = str(payload.get("error_description") or payload.get("error") or response.reason_phrase or "")
        message = f"the Baidu token endpoint answered HTTP {status}: {reason}".rstrip(": ")
        if status in (400, 401, 403) or (status == 200 and payload.get("error")):
            raise ProviderError(
                "auth",
                message + " (check BAIDU_API_KEY / BAIDU_SECRET_KEY)",
                action=Action.REAUTH,
                status=status,
            )
        if status == 429:
            raise ProviderError("rate_limited", message, action=Action.RETRY, status=status)
        if status == 408 or status >= 500:
            raise ProviderError("unavailable", message, action=Action.RETRY, status=status)
        if status == 200:
            raise ProviderError(
                "bad_response",
                "the Baidu token endpoint answered 200 without an access_token",
                action=Action.RETRY,
                status=status,
            )
        # 404 and the like: the base URL is wrong, for every row alike.
        raise ProviderError(
            "config",
            message + f" (is the base URL {self.base_url} right?)",
            action=Action.STOP_JOB,
            status=status,
        )

    def _post(self, url: str, body: dict[str, Any], token: str) -> httpx.Response:
        # The legacy API reads the access_token query parameter, the brief's shape a Bearer header: send both.
        return send(
            self.http,
            "POST",
            url,
            what="the image request",
            params={"access_token": token},
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        )

    # ---- the answer

    def _generation(self, response: httpx.Response, payload: dict[str, Any]) -> Generation:
        status = response.status_code
        request_id = _request_id(payload)
        code = as_int(payload.get("error_code"))
        if code:
            raise _code_error(code, status, _message(payload), request_id)
        if status != 200:
            raise _status_error(status, _message(payload) or response.reason_phrase, request_id)
        data = payload.get("data")
        if not isinstance(data, list) or not data:
            raise ProviderError(
                "bad_response",
                "Baidu answered HTTP 200 without images",
                action=Action.RETRY,
                status=status,
                request_id=request_id,
            )
        # Paid from here: an image that cannot be fetched or decoded fails the row, never a second request.
        images = paid_images(lambda: [self._image(item, request_id) for item in data], request_id)
        return Generation(images, request_id=request_id)

    def _image(self, item: Any, request_id: str | None) -> GeneratedImage:
        if isinstance(item, dict):
            for field in ("b64_image", "b64_json"):  # legacy v1, the brief's shape
                if isinstance(item.get(field), str) and item[field]:
                    return decode_b64(item[field])
            if isinstance(item.get("url"), str) and item["url"]:
                return download(self.http, item["url"])  # such URLs expire: fetch now
        raise ProviderError(
            "bad_response",
            "an image entry has none of b64_image, b64_json or url",
            action=Action.RETRY,
            request_id=request_id,
        )


# --------------------------------------------------------------------------- classification


def _token_error(payload: dict[str, Any]) -> int | None:
    code = as_int(payload.get("error_code"))
    return code if code in TOKEN_CODES else None


def _code_error(code: int, status: int, text: str, request_id: str | None) -> ProviderError:
    message = f"Baidu answered error_code {code} (HTTP {status}): {text or 'no message'}"

    def error(kind: str, action: Action) -> ProviderError:
        return ProviderError(kind, message, action=action, status=status, request_id=request_id)

    if code in TOKEN_CODES:  # still refused after one new token
        return error("auth", Action.REAUTH)
    if code in QUOTA_CODES:
        return error("quota", Action.STOP_JOB)
    if code in RATE_CODES:
        return error("rate_limited", Action.RETRY)
    if code in UNAVAILABLE_CODES:
        return error("unavailable", Action.RETRY)
    if code in NOT_PERMITTED_CODES:
        return error("not_permitted", Action.STOP_JOB)
    if code in (336001, 336002, 336003) and MODERATION_WORDS.search(text):
        return error("moderation", Action.FAIL_ROW)
    if status != 200:  # a code we do not know on an HTTP error: the status says more
        return _status_error(status, f"error_code {code}: {text}", request_id)
    return error("refused", Action.FAIL_ROW)


def _status_error(status: int, text: str, request_id: str | None) -> ProviderError:
    kind, action = status_kind(status)
    message = f"Baidu answered HTTP {status}: {text or 'no message'}"
    return ProviderError(kind, message, action=action, status=status, request_id=request_id)


def _message(payload: dict[str, Any]) -> str:
    error = payload.get("error")
    if isinstance(error, dict):  # the brief's shape
        return str(error.get("message") or error.get("code") or "")
    return str(
        payload.get("error_msg") or payload.get("error_description") or payload.get("message") or error or ""
    )


def _request_id(payload: dict[str, Any]) -> str | None:
    for field in ("log_id", "id"):
        value = payload.get(field)
        if value not in (None, ""):
            return str(value)
    return None
