"""Client for the Atlas (Baidu ERNIE-Image) API: an OAuth token cached for its lifetime, then one
POST per image request; every failure is classified as retryable or final."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import httpx

# Baidu reports token problems as HTTP 200 with error_code 110 (invalid) or 111 (expired).
TOKEN_ERROR_CODES = {110, 111}
# 1 unknown error, 2 service unavailable, 4 cluster over capacity, 18 QPS limit: worth another try.
RETRYABLE_ERROR_CODES = {1, 2, 4, 18}
RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
TOKEN_REFRESH_MARGIN_S = 300


class Credentials(NamedTuple):
    access_key: str
    secret_key: str


class ImageApiError(Exception):
    """A request that did not give images. `retryable` says whether trying again later can help."""

    def __init__(self, kind: str, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retryable = retryable
        self.status = status

    def as_record(self) -> dict[str, str]:
        return {"type": self.kind, "message": self.message}


@dataclass(frozen=True)
class GeneratedImage:
    data: bytes
    extension: str
    content_type: str


@dataclass
class _Token:
    value: str
    expires_at: float


class TokenCache:
    """Tokens by (token URL, access key), kept across invocations of a warm Lambda; thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str], _Token] = {}

    def get(self, key: tuple[str, str], fetch: Callable[[], tuple[str, float]]) -> str:
        with self._lock:
            token = self._tokens.get(key)
            if token is None or token.expires_at <= self._clock():
                value, lifetime = fetch()
                # Renew a little early (the margin is capped at half the lifetime for short-lived tokens).
                margin = min(TOKEN_REFRESH_MARGIN_S, lifetime / 2)
                token = _Token(value, self._clock() + lifetime - margin)
                self._tokens[key] = token
            return token.value

    def invalidate(self, key: tuple[str, str], value: str) -> None:
        with self._lock:
            token = self._tokens.get(key)
            if token is not None and token.value == value:
                del self._tokens[key]

    def clear(self) -> None:
        with self._lock:
            self._tokens.clear()


TOKENS = TokenCache()


class AtlasClient:
    def __init__(
        self,
        *,
        base_url: str,
        token_url: str,
        model: str,
        credentials: Callable[[], Credentials],
        http: httpx.Client,
        tokens: TokenCache = TOKENS,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._token_url = token_url
        self._model = model
        self._credentials = credentials
        self._http = http
        self._tokens = tokens

    def generate(
        self,
        *,
        prompt: str,
        negative_prompt: str = "",
        width: int,
        height: int,
        n: int = 1,
        model: str | None = None,
    ) -> list[GeneratedImage]:
        body: dict[str, Any] = {
            "model": model or self._model,
            "prompt": prompt,
            "n": n,
            "size": f"{width}x{height}",
            "response_format": "b64_json",
        }
        if negative_prompt:
            body["negative_prompt"] = negative_prompt
        creds = self._credentials()
        cache_key = (self._token_url, creds.access_key)
        token = self._tokens.get(cache_key, lambda: self._fetch_token(creds))
        response = self._post(body, token)
        payload = _json(response)
        if _is_token_error(response.status_code, payload):
            # The token was revoked or expired early: drop it and try once more with a new one
            # (a second token error is reported by _images as a retryable auth error).
            self._tokens.invalidate(cache_key, token)
            token = self._tokens.get(cache_key, lambda: self._fetch_token(creds))
            response = self._post(body, token)
            payload = _json(response)
        return self._images(response, payload)

    def _fetch_token(self, creds: Credentials) -> tuple[str, float]:
        if not creds.access_key or not creds.secret_key:
            raise ImageApiError("auth", "no API access key/secret key configured", retryable=False)
        params = {
            "grant_type": "client_credentials",
            "client_id": creds.access_key,
            "client_secret": creds.secret_key,
        }
        try:
            response = self._http.post(self._token_url, params=params)
        except httpx.HTTPError as exc:
            raise ImageApiError(
                "unavailable", f"token request failed: {_describe(exc)}", retryable=True
            ) from exc
        payload = _json(response)
        if response.status_code in RETRYABLE_STATUS:
            raise ImageApiError(
                "unavailable",
                f"token endpoint answered HTTP {response.status_code}",
                retryable=True,
                status=response.status_code,
            )
        if response.status_code != 200 or "access_token" not in payload:
            reason = (
                payload.get("error_description") or payload.get("error") or f"HTTP {response.status_code}"
            )
            raise ImageApiError(
                "auth",
                f"the token endpoint refused the credentials: {reason}",
                retryable=False,
                status=response.status_code,
            )
        return str(payload["access_token"]), float(_int(payload.get("expires_in")) or 3600)

    def _post(self, body: dict[str, Any], token: str) -> httpx.Response:
        try:
            return self._http.post(
                f"{self._base_url}/v1/images/generations",
                json=body,
                headers={"Authorization": f"Bearer {token}"},
            )
        except httpx.TimeoutException as exc:
            raise ImageApiError(
                "timeout", f"the image API did not answer in time: {_describe(exc)}", retryable=True
            ) from exc
        except httpx.HTTPError as exc:
            raise ImageApiError(
                "unavailable", f"the image API could not be reached: {_describe(exc)}", retryable=True
            ) from exc

    def _images(self, response: httpx.Response, payload: dict[str, Any]) -> list[GeneratedImage]:
        status = response.status_code
        if status == 200 and "error_code" in payload:
            code = _int(payload.get("error_code")) or 0
            message = f"error_code {code}: {payload.get('error_msg', 'no message')}"
            if code in TOKEN_ERROR_CODES:
                raise ImageApiError("auth", message, retryable=True, status=status)
            kind = (
                "rate_limited"
                if code in (4, 18)
                else "unavailable"
                if code in RETRYABLE_ERROR_CODES
                else "refused"
            )
            raise ImageApiError(kind, message, retryable=code in RETRYABLE_ERROR_CODES, status=status)
        if status != 200:
            message = f"HTTP {status}: {_error_message(payload) or response.reason_phrase}"
            if status == 429:
                raise ImageApiError("rate_limited", message, retryable=True, status=status)
            if status == 401:
                raise ImageApiError("auth", message, retryable=True, status=status)
            if status in RETRYABLE_STATUS:
                raise ImageApiError("unavailable", message, retryable=True, status=status)
            raise ImageApiError("refused", message, retryable=False, status=status)
        data = payload.get("data")
        if not isinstance(data, list) or not data:
            raise ImageApiError(
                "bad_response", "the image API answered 200 without images", retryable=True, status=status
            )
        return [self._image(item) for item in data]

    def _image(self, item: Any) -> GeneratedImage:
        if isinstance(item, dict) and item.get("b64_json"):
            try:
                raw = base64.b64decode(item["b64_json"], validate=True)
            except ValueError as exc:
                raise ImageApiError("bad_response", "b64_json is not valid base64", retryable=True) from exc
        elif isinstance(item, dict) and item.get("url"):
            try:
                download = self._http.get(item["url"])
            except httpx.HTTPError as exc:
                raise ImageApiError(
                    "unavailable", f"image download failed: {_describe(exc)}", retryable=True
                ) from exc
            if download.status_code != 200:
                raise ImageApiError(
                    "unavailable", f"image download answered HTTP {download.status_code}", retryable=True
                )
            raw = download.content
        else:
            raise ImageApiError("bad_response", "an image entry has neither b64_json nor url", retryable=True)
        return sniff_image(raw)


def sniff_image(raw: bytes) -> GeneratedImage:
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return GeneratedImage(raw, "png", "image/png")
    if raw.startswith(b"\xff\xd8\xff"):
        return GeneratedImage(raw, "jpg", "image/jpeg")
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return GeneratedImage(raw, "webp", "image/webp")
    raise ImageApiError(
        "bad_response", "the image API returned data that is not a PNG, JPEG or WebP image", retryable=True
    )


def _is_token_error(status: int, payload: dict[str, Any]) -> bool:
    return status == 401 or (status == 200 and _int(payload.get("error_code")) in TOKEN_ERROR_CODES)


def _int(value: Any) -> int | None:
    """A number the API may send as a number or as text; None when it is neither."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        value = response.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _error_message(payload: dict[str, Any]) -> str:
    error = payload.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or "")
    return str(payload.get("error_msg") or payload.get("message") or error or "")


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
