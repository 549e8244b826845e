"""Local HTTP emulator of Baidu's Atlas ERNIE-Image API, used by the local runtime and tests instead of it."""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import io
import json
import random
import re
import secrets
import socket
import sys
import textwrap
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

from PIL import Image, ImageDraw, ImageFont

__all__ = ["AtlasEmulator", "EmulatorConfig", "Fault", "parse_fault", "serve"]

SERVER_NAME = "imagepipe-atlas-emulator"
TOKEN_PATH = "/oauth/2.0/token"
GENERATIONS_PATH = "/v1/images/generations"
FILES_PREFIX = "/files/"
DEFAULT_MODEL = "ernie-image"
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_N = 4
MAX_BODY_BYTES = 1 << 20
# url answers keep PNGs in memory; bound it so a long local run cannot grow without limit (oldest go first).
MAX_STORED_FILES = 10_000

# Baidu reports token problems as HTTP 200 with these codes in the body.
BAIDU_TOKEN_INVALID = 110
BAIDU_TOKEN_EXPIRED = 111

_FAULT_HELP = "refuse=WORD, fail=WORD, flaky=WORD:N, error-rate=P, revoke-tokens-every=N, url-only"
_SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour, parsed from a ``--fault KIND=ARG`` string."""

    kind: str  # "refuse" | "fail" | "flaky" | "error-rate" | "revoke-tokens-every" | "url-only"
    word: str = ""  # refuse / fail / flaky: matched case-insensitively inside the prompt
    count: int = 0  # flaky: failures before success; revoke-tokens-every: successes between revocations
    probability: float = 0.0  # error-rate

    def matches(self, prompt: str) -> bool:
        return bool(self.word) and self.word.casefold() in prompt.casefold()

    def __str__(self) -> str:
        if self.kind in ("refuse", "fail"):
            return f"{self.kind}={self.word}"
        if self.kind == "flaky":
            return f"flaky={self.word}:{self.count}"
        if self.kind == "error-rate":
            return f"error-rate={self.probability:g}"
        if self.kind == "revoke-tokens-every":
            return f"revoke-tokens-every={self.count}"
        return self.kind


def _whole_number(text: str, spec: str, usage: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"fault '{spec}': N must be a whole number >= 1 (usage: {usage})")
    return value


def parse_fault(text: str) -> Fault:
    """Parse one ``--fault`` string; raises ValueError with a one-line message on bad syntax."""
    spec = text.strip()
    if not spec:
        raise ValueError(f"empty fault: expected one of {_FAULT_HELP}")
    kind, has_arg, arg = spec.partition("=")
    kind = kind.strip().lower()
    usages = {
        "refuse": "refuse=WORD",
        "fail": "fail=WORD",
        "flaky": "flaky=WORD:N",
        "error-rate": "error-rate=P",
        "revoke-tokens-every": "revoke-tokens-every=N",
        "url-only": "url-only",
    }
    if kind not in usages:
        raise ValueError(f"unknown fault '{spec}': expected one of {_FAULT_HELP}")
    usage = usages[kind]
    if kind == "url-only":
        if has_arg:
            raise ValueError(f"fault '{spec}': url-only takes no argument")
        return Fault(kind)
    if not has_arg or not arg.strip():
        raise ValueError(f"fault '{spec}' needs an argument: {usage}")
    if kind in ("refuse", "fail"):
        return Fault(kind, word=arg.strip())
    if kind == "flaky":
        # rpartition so a WORD may itself contain ':'
        word, colon, n = arg.rpartition(":")
        if not colon or not word.strip():
            raise ValueError(f"fault '{spec}' needs a word and a count: {usage}")
        return Fault(kind, word=word.strip(), count=_whole_number(n, spec, usage))
    if kind == "error-rate":
        try:
            p = float(arg.strip())
        except ValueError:
            p = -1.0
        if not 0.0 <= p <= 1.0:  # also rejects nan
            raise ValueError(f"fault '{spec}': P must be a number between 0 and 1 (usage: {usage})")
        return Fault(kind, probability=p)
    return Fault(kind, count=_whole_number(arg, spec, usage))  # revoke-tokens-every


# --------------------------------------------------------------------------- config


@dataclass
class EmulatorConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = ephemeral port
    latency_ms: float = 0.0  # slept inside each generation request that gets past validation
    rate_limit: float | None = None  # generation requests per second; token bucket, burst = max(1, rate)
    faults: tuple[Fault, ...] = ()
    access_key: str = "emulator-access-key"
    secret_key: str = "emulator-secret-key"
    token_ttl_s: int = 2592000  # Baidu's default: 30 days
    seed: int = 0  # seeds error-rate faults so runs are reproducible


# --------------------------------------------------------------------------- images


@functools.lru_cache(maxsize=64)
def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


@functools.lru_cache(maxsize=64)
def _char_width(size: int) -> float:
    font = _font(size)
    sample = "the quick brown fox jumps over a lazy dog"
    try:
        return max(1.0, font.getlength(sample) / len(sample))
    except AttributeError:
        return size * 0.55


def render_png(prompt: str, width: int, height: int, index: int = 0) -> bytes:
    """A real PNG of exactly width x height, deterministic for (prompt, size, index)."""
    digest = hashlib.sha256(f"{prompt}\0{width}x{height}".encode()).digest()
    bg = tuple(digest[0:3])
    dark_bg = sum(bg) < 384
    fg = (255, 255, 255) if dark_bg else (0, 0, 0)
    panel = tuple(c // 3 for c in bg) if dark_bg else tuple(c + (255 - c) * 2 // 3 for c in bg)
    shapes = [tuple(digest[3 + 3 * i : 6 + 3 * i]) for i in range(4)]
    marker = ((index * 97 + digest[15]) % 256, (index * 53 + digest[16]) % 256, (index * 29 + 128) % 256)
    # Drawing on a palette image keeps encode cost ~1 byte/pixel: 3-5x faster than RGB for the same look.
    palette = [bg, fg, panel, marker, *shapes]
    img = Image.new("P", (width, height), 0)
    img.putpalette([c for colour in palette for c in colour])
    draw = ImageDraw.Draw(img)

    for i in range(4):
        b = digest[16 + 4 * i : 20 + 4 * i]
        x0, y0 = b[0] * width // 256, b[1] * height // 256
        x1, y1 = x0 + 8 + b[2] * width // 384, y0 + 8 + b[3] * height // 384
        (draw.ellipse if i % 2 else draw.rectangle)((x0, y0, x1, y1), fill=4 + i)

    size = max(8, min(width, height) // 22)
    font = _font(size)
    line_h = int(size * 1.3)
    margin = max(2, size // 2)

    # The index marker: the only thing that changes between images of one request.
    label = f"EMULATOR #{index + 1}"
    try:
        label_w = int(font.getlength(label)) + 2 * margin
    except AttributeError:  # bitmap fallback font
        label_w = int(_char_width(size) * (len(label) + 2)) + 2 * margin
    draw.rectangle((0, 0, min(width, label_w), line_h + margin), fill=3)
    draw.text((margin, margin // 2), label, fill=1, font=font)

    chars = max(4, int((width - 2 * margin) / _char_width(size)))
    max_lines = max(1, (height // 2) // line_h)
    lines = textwrap.wrap(prompt, chars, max_lines=max_lines, placeholder="...") or [""]
    top = height - len(lines) * line_h - margin
    draw.rectangle((0, top - margin // 2, width, height), fill=2)
    for n, line in enumerate(lines):
        draw.text((margin, top + n * line_h), line, fill=1, font=font)

    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


# --------------------------------------------------------------------------- state


class _Reply(Exception):
    """Short-circuits request handling with a JSON answer."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


def _api_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(status, {"error": {"code": code, "message": message}}, headers)


@dataclass
class _Token:
    expires_at: float  # time.monotonic() deadline
    epoch: int  # revocation epoch the token was issued in


class _State:
    """Everything shared between handler threads; every mutation happens under self.lock."""

    def __init__(self, config: EmulatorConfig):
        self.config = config
        self.lock = threading.Lock()
        self.tokens: dict[str, _Token] = {}
        self.epoch = 0
        self.successes = 0
        self.files: OrderedDict[str, bytes] = OrderedDict()
        self.flaky_used = [0] * len(config.faults)
        self.rng = random.Random(config.seed)
        rate = config.rate_limit
        self.bucket_size = max(1.0, rate) if rate else 0.0
        self.bucket = self.bucket_size
        self.bucket_at = time.monotonic()
        self.reset_counters()

    def reset_counters(self) -> None:
        self.token_requests = 0
        self.generation_requests = 0
        self.images = 0
        self.responses: dict[str, int] = {}
        self.error_codes: dict[str, int] = {}

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "token_requests": self.token_requests,
                "generation_requests": self.generation_requests,
                "images": self.images,
                "responses": dict(sorted(self.responses.items())),
                "error_codes": dict(sorted(self.error_codes.items())),  # Baidu 200-with-error_code answers
                "emulator": True,
            }

    def take_rate_token(self) -> bool:
        rate = self.config.rate_limit
        if not rate:
            return True
        now = time.monotonic()
        self.bucket = min(self.bucket_size, self.bucket + (now - self.bucket_at) * rate)
        self.bucket_at = now
        if self.bucket >= 1.0:
            self.bucket -= 1.0
            return True
        return False


# --------------------------------------------------------------------------- HTTP


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], state: _State):
        self.state = state
        self.base_url = ""
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-request are normal under load; anything else gets one line, not a traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        print(f"{SERVER_NAME}: error serving {client_address}: {exc!r}", file=sys.stderr)

    def drop_connections(self) -> None:
        # Keep-alive handler threads would otherwise sit on idle sockets after stop().
        with self.connections_lock:
            conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: the local runtime makes thousands of calls
    timeout = 120  # idle keep-alive connections are closed after this
    disable_nagle_algorithm = True  # else Nagle + delayed ACK add ~40 ms to every keep-alive response

    # ---- plumbing

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def version_string(self) -> str:
        return SERVER_NAME

    def log_message(self, format: str, *args: Any) -> None:
        pass  # per-request logging would drown the runtime's own output

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Used by the stdlib for malformed requests / unsupported methods: answer JSON like everything else.
        self.close_connection = True
        codes = {400: "invalid_request", 404: "not_found", 501: "not_implemented", 505: "unsupported_version"}
        self._send_json(code, {"error": {"code": codes.get(code, "error"), "message": message or str(code)}})

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        path = urlsplit(self.path or "").path if hasattr(self, "path") else ""
        if not path.startswith("/_emulator/"):  # stats describe API traffic, not the stats calls themselves
            state = self.server.state
            with state.lock:
                state.responses[str(status)] = state.responses.get(str(status), 0) + 1
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024).strip():  # trailers
                        pass
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY_BYTES:
                    raise _api_error(413, "invalid_request", f"request body over {MAX_BODY_BYTES} bytes")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise _api_error(400, "invalid_request", "bad Content-Length header") from None
        if length > MAX_BODY_BYTES:
            raise _api_error(413, "invalid_request", f"request body over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        try:
            try:
                body = self._read_body()
            except _Reply:
                self.close_connection = True  # the unread body would corrupt the next request
                raise
            except ValueError:
                self.close_connection = True
                raise _api_error(400, "invalid_request", "malformed chunked body") from None
            url = urlsplit(self.path)
            route = {
                TOKEN_PATH: (("GET", "POST"), self._token),
                GENERATIONS_PATH: (("POST",), self._generate),
                "/_emulator/stats": (("GET",), self._stats),
                "/_emulator/reset": (("POST",), self._reset),
            }.get(url.path)
            if route is None and url.path.startswith(FILES_PREFIX):
                route = (("GET", "HEAD"), self._file)
            if route is None:
                raise _api_error(404, "not_found", f"no such endpoint: {url.path}")
            methods, handler = route
            if self.command not in methods:
                raise _api_error(
                    405,
                    "method_not_allowed",
                    f"{self.command} not allowed on {url.path}",
                    {"Allow": ", ".join(methods)},
                )
            handler(url, body)
        except _Reply as reply:
            self._send_json(reply.status, reply.body, reply.headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as exc:  # a bug in the emulator: answer 500 rather than drop the connection
            self.close_connection = True
            print(f"{SERVER_NAME}: internal error on {self.command} {self.path}: {exc!r}", file=sys.stderr)
            self._send_json(500, {"error": {"code": "internal_error", "message": f"emulator bug: {exc!r}"}})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch

    # ---- endpoints

    def _token(self, url: Any, body: bytes) -> None:
        state = self.server.state
        cfg = state.config
        with state.lock:
            state.token_requests += 1
        params = {k: v[-1] for k, v in parse_qs(url.query).items()}
        ctype = self.headers.get("Content-Type", "")
        if body and ("x-www-form-urlencoded" in ctype or not ctype):
            try:
                form = parse_qs(body.decode("utf-8"), strict_parsing=False)
            except UnicodeDecodeError:
                form = {}
            params.update({k: v[-1] for k, v in form.items()})
        if params.get("grant_type") != "client_credentials":
            raise _Reply(
                400,
                {
                    "error": "unsupported_grant_type",
                    "error_description": "The authorization grant type is not supported",
                },
            )
        if params.get("client_id") != cfg.access_key:
            raise _Reply(401, {"error": "invalid_client", "error_description": "unknown client id"})
        if params.get("client_secret") != cfg.secret_key:
            raise _Reply(
                401, {"error": "invalid_client", "error_description": "Client authentication failed"}
            )
        token = f"24.{secrets.token_hex(16)}.{cfg.token_ttl_s}.{int(time.time())}.emulator"
        with state.lock:
            state.tokens[token] = _Token(time.monotonic() + cfg.token_ttl_s, state.epoch)
        self._send_json(
            200,
            {
                "access_token": token,
                "expires_in": cfg.token_ttl_s,
                "refresh_token": f"25.{secrets.token_hex(16)}.emulator",
                "scope": "emulator",
                "session_key": secrets.token_hex(16),
                "session_secret": secrets.token_hex(16),
            },
        )

    def _check_token(self) -> None:
        state = self.server.state
        auth = self.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        with state.lock:
            known = state.tokens.get(token) if scheme.lower() == "bearer" and token else None
            if known is None:
                raise _api_error(
                    401,
                    "invalid_token",
                    "missing or unknown access token (send 'Authorization: Bearer <token>')",
                )
            code = None
            if known.epoch < state.epoch:
                code, msg = BAIDU_TOKEN_INVALID, "Access token invalid or no longer valid"
            elif time.monotonic() >= known.expires_at:
                code, msg = BAIDU_TOKEN_EXPIRED, "Access token expired"
            if code is not None:
                state.error_codes[str(code)] = state.error_codes.get(str(code), 0) + 1
                raise _Reply(200, {"error_code": code, "error_msg": msg})

    @staticmethod
    def _validate(body: bytes) -> tuple[str, str, int, int, int, str]:
        def bad(message: str) -> _Reply:
            return _api_error(400, "invalid_request", message)

        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise bad("request body is not valid JSON") from None
        if not isinstance(req, dict):
            raise bad("request body must be a JSON object")
        prompt = req.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise bad("prompt is required and must be a non-empty string")
        model = req.get("model", DEFAULT_MODEL)
        if not isinstance(model, str) or not model:
            raise bad("model must be a non-empty string")
        n = req.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise bad(f"n must be an integer from 1 to {MAX_N}, got {n!r}")
        size = req.get("size", "1024x1024")
        m = _SIZE_RE.match(size) if isinstance(size, str) else None
        width, height = (int(m[1]), int(m[2])) if m else (0, 0)
        if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
            raise bad(f"size must be 'WxH' with {MIN_SIDE} <= W,H <= {MAX_SIDE}, got {size!r}")
        fmt = req.get("response_format", "url")
        if fmt not in ("b64_json", "url"):
            raise bad(f"response_format must be 'b64_json' or 'url', got {fmt!r}")
        negative = req.get("negative_prompt")
        if negative is not None and not isinstance(negative, str):
            raise bad("negative_prompt must be a string")
        return prompt, model, n, width, height, fmt

    def _apply_faults(self, prompt: str) -> None:
        state = self.server.state
        faults = state.config.faults
        for fault in faults:
            if fault.kind == "refuse" and fault.matches(prompt):
                raise _api_error(
                    400,
                    "content_policy_violation",
                    f"prompt refused by content policy (emulator fault {fault})",
                )
        for fault in faults:
            if fault.kind == "fail" and fault.matches(prompt):
                raise _api_error(500, "internal_error", f"image generation failed (emulator fault {fault})")
        with state.lock:
            for i, fault in enumerate(faults):
                if fault.kind == "flaky" and fault.matches(prompt) and state.flaky_used[i] < fault.count:
                    state.flaky_used[i] += 1
                    raise _api_error(
                        503,
                        "unavailable",
                        f"service temporarily unavailable (emulator fault {fault}, "
                        f"failure {state.flaky_used[i]} of {fault.count})",
                    )
            for fault in faults:
                if fault.kind == "error-rate" and state.rng.random() < fault.probability:
                    raise _api_error(500, "internal_error", f"random server error (emulator fault {fault})")

    def _generate(self, url: Any, body: bytes) -> None:
        state = self.server.state
        cfg = state.config
        with state.lock:
            state.generation_requests += 1
        self._check_token()
        with state.lock:
            allowed = state.take_rate_token()
        if not allowed:
            raise _api_error(
                429,
                "rate_limited",
                f"too many requests: the emulator allows {cfg.rate_limit:g} generations/s",
                {"Retry-After": "1"},
            )
        prompt, model, n, width, height, fmt = self._validate(body)
        if cfg.latency_ms > 0:
            # outside the lock: concurrent requests overlap like they do on the real API
            time.sleep(cfg.latency_ms / 1000.0)
        self._apply_faults(prompt)
        if any(f.kind == "url-only" for f in cfg.faults):
            fmt = "url"

        pngs = [render_png(prompt, width, height, i) for i in range(n)]
        data: list[dict[str, str]] = []
        with state.lock:
            for png in pngs:
                if fmt == "url":
                    file_id = secrets.token_hex(12)
                    state.files[file_id] = png
                    while len(state.files) > MAX_STORED_FILES:
                        state.files.popitem(last=False)
                    data.append({"url": f"{self.server.base_url}{FILES_PREFIX}{file_id}.png"})
                else:
                    data.append({"b64_json": base64.b64encode(png).decode("ascii")})
            state.images += n
            state.successes += 1
            every = [f.count for f in cfg.faults if f.kind == "revoke-tokens-every"]
            if any(state.successes % k == 0 for k in every):
                state.epoch += 1  # every token issued so far is now revoked
        self._send_json(
            200,
            {"id": f"img-{secrets.token_hex(12)}", "created": int(time.time()), "model": model, "data": data},
        )

    def _file(self, url: Any, body: bytes) -> None:
        name = url.path[len(FILES_PREFIX) :]
        file_id = name[:-4] if name.endswith(".png") else ""
        with self.server.state.lock:
            png = self.server.state.files.get(file_id) if file_id else None
        if png is None:
            raise _api_error(404, "not_found", f"no such file: {name}")
        self._send(200, png, "image/png")

    def _stats(self, url: Any, body: bytes) -> None:
        self._send_json(200, self.server.state.stats())

    def _reset(self, url: Any, body: bytes) -> None:
        with self.server.state.lock:
            self.server.state.reset_counters()
        self._send_json(200, self.server.state.stats())


# --------------------------------------------------------------------------- public API


class AtlasEmulator:
    """A real loopback HTTP server speaking the Atlas token + image-generation API."""

    def __init__(self, config: EmulatorConfig | None = None):
        self.config = config or EmulatorConfig()
        if self.config.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")
        if self.config.rate_limit is not None and not self.config.rate_limit > 0:
            raise ValueError("rate_limit must be > 0 (or None for no limit)")
        self._state = _State(self.config)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> AtlasEmulator:
        if self._server is not None:
            return self
        server = _Server((self.config.host, self.config.port), self._state)
        host, port = server.server_address[:2]
        host = str(host)
        if ":" in host:
            host = f"[{host}]"
        server.base_url = f"http://{host}:{port}"
        self._server = server
        # Short poll interval: stop() waits up to one interval, and tests start/stop many emulators.
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name=f"{SERVER_NAME}:{port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.drop_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> AtlasEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("emulator is not running: call start() first")
        return self._server.base_url

    @property
    def token_url(self) -> str:
        return self.base_url + TOKEN_PATH

    def stats(self) -> dict:
        return self._state.stats()


def serve(config: EmulatorConfig, out: TextIO = sys.stdout) -> None:
    """Run the emulator in the foreground until Ctrl-C."""
    emulator = AtlasEmulator(config).start()
    try:
        faults = ", ".join(str(f) for f in config.faults) or "none"
        print(
            f"imagepipe Atlas EMULATOR (not the real Baidu API) listening on {emulator.base_url} "
            f"-- access key {config.access_key!r}, secret key {config.secret_key!r}, faults: {faults} "
            f"-- Ctrl-C to stop",
            file=out,
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()
    print("imagepipe Atlas EMULATOR stopped", file=out, flush=True)
