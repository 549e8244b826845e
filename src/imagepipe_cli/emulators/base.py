"""What every API emulator shares: a real loopback HTTP server with keep-alive, a route table,
injected faults, a token-bucket rate limit, expiring output files, request counters, and the
labelled PNGs it draws. Each API's own shape lives in its own module beside this one."""

from __future__ import annotations

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
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, TextIO
from urllib.parse import parse_qs, urlsplit

from PIL import Image, ImageDraw, ImageFont

MAX_BODY_BYTES = 1 << 20
# Output files are kept in memory; bound them so a long local run cannot grow without limit.
MAX_STORED_FILES = 10_000
FILES_PREFIX = "/files/"


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour, parsed from ``KIND``, ``KIND=WORD``, ``KIND=WORD:N``, ``KIND=P``
    or ``KIND=N`` (which of these a kind takes is declared by each emulator's FAULTS)."""

    kind: str
    word: str = ""  # matched case-insensitively inside the prompt
    count: int = 0
    probability: float = 0.0

    def matches(self, prompt: str) -> bool:
        return bool(self.word) and self.word.casefold() in prompt.casefold()

    def __str__(self) -> str:
        if self.word and self.count:
            return f"{self.kind}={self.word}:{self.count}"
        if self.word:
            return f"{self.kind}={self.word}"
        if self.probability:
            return f"{self.kind}={self.probability:g}"
        if self.count:
            return f"{self.kind}={self.count}"
        return self.kind


# Argument shapes a fault kind can take.
FLAG, WORD, WORD_COUNT, PROBABILITY, COUNT = "", "WORD", "WORD:N", "P", "N"
# The faults every emulator takes (each answers them in its API's own shape).
COMMON_FAULTS: dict[str, str] = {
    "refuse": WORD,  # a content-moderation refusal
    "fail": WORD,  # a server error
    "flaky": WORD_COUNT,  # the first N matching requests get "service unavailable"
    "rate-limit": WORD_COUNT,  # the first N matching requests are rate limited
    "stop": WORD,  # the account is out of quota / balance
    "hang": WORD,  # accepted and paid, then the answer comes hang_s late
    "malformed": WORD,  # a 200 that is not the API's answer
    "error-rate": PROBABILITY,  # random server errors (seeded)
}
# Probability twins of WORD faults, for fault mixes over many rows ("5% of requests are rate limited").
RATE_TWINS: dict[str, str] = {"rate-limit-rate": "rate-limit", "malformed-rate": "malformed"}
RATE_FAULTS: dict[str, str] = {**dict.fromkeys(RATE_TWINS, PROBABILITY), "hang-rate": PROBABILITY}
COMMON_FAULTS.update(RATE_FAULTS)
# Faults of the output files a paid answer links to (the request itself went through and was paid).
DOWNLOAD_FAULTS: dict[str, str] = {
    "download-error": WORD,  # every download of a matching prompt's files answers 500
    "download-flaky": WORD_COUNT,  # the first N downloads of a matching prompt's files answer 503
    "download-expired": WORD,  # a matching prompt's files answer 403 "Request has expired" at once
    "download-garbage": WORD,  # a matching prompt's files answer 200 with an HTML page, not an image
}
COMMON_FAULTS.update(DOWNLOAD_FAULTS)


def parse_fault(text: str, kinds: dict[str, str]) -> Fault:
    """Parse one fault string against {kind: shape}; ValueError with a one-line message if wrong."""
    help_text = ", ".join(f"{k}={shape}" if shape else k for k, shape in kinds.items())
    spec = text.strip()
    kind, has_arg, arg = spec.partition("=")
    kind = kind.strip().lower()
    if kind not in kinds:
        raise ValueError(f"unknown fault {spec!r}: expected one of {help_text}")
    shape, arg = kinds[kind], arg.strip()
    usage = f"{kind}={shape}" if shape else kind
    if shape == FLAG:
        if has_arg:
            raise ValueError(f"fault {spec!r}: {kind} takes no argument")
        return Fault(kind)
    if not arg:
        raise ValueError(f"fault {spec!r} needs an argument: {usage}")
    if shape == WORD:
        return Fault(kind, word=arg)
    if shape == WORD_COUNT:
        word, colon, n = arg.rpartition(":")  # a WORD may itself contain ':'
        if not colon or not word.strip():
            raise ValueError(f"fault {spec!r} needs a word and a count: {usage}")
        return Fault(kind, word=word.strip(), count=_whole_number(n, spec, usage))
    if shape == PROBABILITY:
        try:
            p = float(arg)
        except ValueError:
            p = -1.0
        if not 0.0 <= p <= 1.0:  # also rejects nan
            raise ValueError(f"fault {spec!r}: P must be a number between 0 and 1 (usage: {usage})")
        return Fault(kind, probability=p)
    return Fault(kind, count=_whole_number(arg, spec, usage))


def _whole_number(text: str, spec: str, usage: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"fault {spec!r}: N must be a whole number >= 1 (usage: {usage})")
    return value


# --------------------------------------------------------------------------- config


@dataclass
class EmulatorConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = ephemeral port
    latency_ms: float = 0.0  # time to make one request's images (asynchronous APIs: the generation time)
    rate_limit: float | None = None  # paid requests per second; token bucket, burst = max(1, rate)
    faults: tuple[Fault, ...] = ()
    keys: dict[str, str] = field(default_factory=dict)  # empty: the emulator's own demo keys
    url_ttl_s: float = 3600.0  # how long an output URL can be fetched
    seed: int = 0  # seeds probabilistic faults so runs are reproducible


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


# --------------------------------------------------------------------------- HTTP


class Reply(Exception):
    """Ends request handling with an answer (JSON unless `raw` is given)."""

    def __init__(
        self,
        status: int,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}
        self.raw, self.content_type = raw, content_type


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: Any  # email.message.Message: case-insensitive .get()
    body: bytes
    match: re.Match[str] | None = None

    def bearer(self) -> str:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""

    def form(self) -> dict[str, str]:
        values = dict(self.query)
        ctype = self.headers.get("Content-Type", "")
        if self.body and ("x-www-form-urlencoded" in ctype or not ctype):
            with contextlib.suppress(UnicodeDecodeError):
                values.update({k: v[-1] for k, v in parse_qs(self.body.decode("utf-8")).items()})
        return values


Route = tuple[str, str, Callable[[Request], Any]]  # method(s) "GET,POST", path regex, handler


class BaseEmulator:
    """A loopback HTTP server for one API. Subclasses declare `routes()`, `error_body()` (their
    API's error shape), `FAULTS` and `DEFAULT_KEYS`; handlers return a JSON-able answer or raise Reply."""

    name: ClassVar[str] = "emulator"  # the provider name, e.g. "atlascloud"
    title: ClassVar[str] = "API"  # for people: "Atlas Cloud", "OpenAI Images"
    FAULTS: ClassVar[dict[str, str]] = {}
    DEFAULT_KEYS: ClassVar[dict[str, str]] = {}
    # The injected faults that refuse a request before it is paid, in the order the API decides them (a
    # prompt matching two gets the first); apply_common_faults() answers each in the API's own shape.
    REFUSALS: ClassVar[tuple[str, ...]] = (
        "stop",
        "refuse",
        "fail",
        "flaky",
        "rate-limit",
        "error-rate",
        "malformed",
    )
    hang_s: float = 30.0  # how late a `hang` fault's answer comes (tests may shorten it per emulator)

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        if self.config.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")
        if self.config.rate_limit is not None and not self.config.rate_limit > 0:
            raise ValueError("rate_limit must be > 0 (or None for no limit)")
        for fault in self.config.faults:
            if fault.kind not in self.FAULTS:
                raise ValueError(f"the {self.title} emulator has no fault {fault.kind!r}")
        self.keys = {**self.DEFAULT_KEYS, **self.config.keys}
        self.lock = threading.RLock()
        self.rng = random.Random(self.config.seed)
        self.counters: Counter[str] = Counter()
        self.responses: Counter[str] = Counter()
        self.flaky_used: Counter[Fault] = Counter()
        # Paid requests and rate-limit refusals per second since start, for `make bench` (bounded by run time).
        self._per_second: dict[str, Counter[int]] = {"paid": Counter(), "rate_limited": Counter()}
        self._first_last: dict[str, tuple[float, float]] = {}
        self._born = time.monotonic()
        self._files: OrderedDict[str, tuple[bytes, str, float]] = OrderedDict()
        rate = self.config.rate_limit
        self._bucket_size = max(1.0, rate) if rate else 0.0
        self._bucket, self._bucket_at = self._bucket_size, time.monotonic()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()  # ends a `hang` early when the emulator stops
        self._routes = [(set(m.split(",")), re.compile(p), h) for m, p, h in self.routes()]

    # ---- what subclasses provide

    def routes(self) -> list[Route]:
        raise NotImplementedError

    def error_body(self, status: int, code: str, message: str) -> Any:
        return {"error": {"code": code, "message": message}}

    # ---- shared machinery for subclasses

    def error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Reply:
        return Reply(status, self.error_body(status, code, message), headers)

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counters[name] += n

    def faults(self, kind: str) -> list[Fault]:
        return [f for f in self.config.faults if f.kind == kind]

    def prompt_fault(self, kind: str, prompt: str) -> Fault | None:
        return next((f for f in self.faults(kind) if f.matches(prompt)), None)

    def flaky(self, prompt: str, kind: str = "flaky") -> Fault | None:
        """A WORD:N fault that fires for the first N matching requests."""
        with self.lock:
            for fault in self.faults(kind):
                if fault.matches(prompt) and self.flaky_used[fault] < fault.count:
                    self.flaky_used[fault] += 1
                    return fault
        return None

    def chance(self, kind: str) -> Fault | None:
        """A probability fault that fires on this request (seeded, reproducible)."""
        with self.lock:
            return next((f for f in self.faults(kind) if self.rng.random() < f.probability), None)

    def take_rate_token(self) -> bool:
        rate = self.config.rate_limit
        if not rate:
            return True
        with self.lock:
            now = time.monotonic()
            self._bucket = min(self._bucket_size, self._bucket + (now - self._bucket_at) * rate)
            self._bucket_at = now
            if self._bucket >= 1.0:
                self._bucket -= 1.0
                return True
            self.counters["rate_limited"] += 1
            self._mark("rate_limited", now)
            return False

    def store_file(
        self, data: bytes, content_type: str = "image/png", extension: str = "png", prompt: str = ""
    ) -> str:
        """An output URL for `data`, fetchable for config.url_ttl_s (then 403, as an expired signed URL).
        `prompt` is the request's, for the download faults."""
        file_id = secrets.token_hex(12)
        with self.lock:
            self._files[file_id] = (data, content_type, time.monotonic() + self.config.url_ttl_s, prompt)
            while len(self._files) > MAX_STORED_FILES:
                self._files.popitem(last=False)
        return f"{self.base_url}{FILES_PREFIX}{file_id}.{extension}"

    def apply_common_faults(self, prompt: str, answer: Callable[[str, Fault], Reply]) -> None:
        """Raise `answer(kind, fault)` for the first of REFUSALS that fires on this request: a WORD:N fault
        for its first N matching requests, a P fault by (seeded) chance, a WORD fault whenever the prompt
        holds its word. Nothing refused here is paid."""
        for kind in self.REFUSALS:
            shape = self.FAULTS.get(kind)
            if shape == WORD_COUNT:
                fault = self.flaky(prompt, kind)
            elif shape == PROBABILITY:
                fault = self.chance(kind)
            else:
                fault = self.prompt_fault(kind, prompt)
            if fault is not None:
                raise answer(kind, fault)
        for twin, kind in RATE_TWINS.items():
            fault = self.chance(twin) if twin in self.FAULTS and kind in self.REFUSALS else None
            if fault is not None:
                raise answer(kind, fault)

    def charge(self, prompt: str, images: int = 0) -> None:
        """Count a request as paid: the API bills it from here on, even if its answer never arrives."""
        with self.lock:
            self.counters["paid"] += 1
            self.counters["paid:" + prompt] += 1
            self._mark("paid", time.monotonic())
            if images:
                self.counters["images"] += images

    def _mark(self, kind: str, now: float) -> None:  # under self.lock
        self._per_second[kind][int(now - self._born)] += 1
        first, _ = self._first_last.get(kind, (now, now))
        self._first_last[kind] = (first, now)

    def per_second(self) -> dict[str, Any]:
        """Paid requests and rate-limit refusals second by second (second 0 holds the first of either),
        with the first and last of each in seconds from that first one; second i starts at i - offset."""
        with self.lock:
            marks = dict(self._first_last)
            if not marks:
                return {"paid": [], "rate_limited": [], "first": {}, "last": {}, "offset": 0.0}
            start = min(first for first, _ in marks.values())
            origin = int(start - self._born)
            end = max(int(last - self._born) for _, last in marks.values())
            return {
                **{k: [c[s] for s in range(origin, end + 1)] for k, c in self._per_second.items()},
                "first": {k: first - start for k, (first, _) in marks.items()},
                "last": {k: last - start for k, (_, last) in marks.items()},
                "offset": start - self._born - origin,
            }

    def paid_for(self, prompt: str) -> int:
        with self.lock:
            return self.counters["paid:" + prompt]

    def hang(self, prompt: str) -> None:
        """The `hang` fault: an accepted request's answer comes hang_s late, or never when the emulator
        stops meanwhile (its client is cut off quietly)."""
        hung = self.prompt_fault("hang", prompt) or ("hang-rate" in self.FAULTS and self.chance("hang-rate"))
        if hung and self._stopping.wait(self.hang_s):
            raise ConnectionAbortedError("emulator stopped during a hang")

    def accept(self, prompt: str, n: int) -> None:
        """A synchronous request every refusal let through: paid for its n images, then held by a `hang`
        and by the configured latency (outside the lock: requests overlap as on the API)."""
        self.charge(prompt, n)
        self.hang(prompt)
        if self.config.latency_ms > 0:
            time.sleep(self.config.latency_ms / 1000.0)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "emulator": self.name,
                **dict(sorted(self.counters.items())),
                "responses": dict(sorted(self.responses.items())),
            }

    def reset(self) -> None:
        with self.lock:
            self.counters.clear()
            self.responses.clear()
            self._per_second = {"paid": Counter(), "rate_limited": Counter()}
            self._first_last.clear()

    # ---- lifecycle

    def start(self) -> BaseEmulator:
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server((self.config.host, self.config.port), self)
        host, port = server.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else str(host)
        server.base_url = f"http://{host}:{port}"
        self._server = server
        # Short poll interval: stop() waits up to one interval, and tests start/stop many emulators.
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name=f"{self.name}:{port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        self._server = self._thread = None
        server.shutdown()
        server.drop_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> BaseEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("emulator is not running: call start() first")
        return self._server.base_url

    # ---- dispatch (called by the handler thread)

    def _handle(self, request: Request) -> Reply:
        if request.path == "/_emulator/stats" and request.method == "GET":
            return Reply(200, self.stats())
        if request.path == "/_emulator/reset" and request.method == "POST":
            self.reset()
            return Reply(200, self.stats())
        if request.path.startswith(FILES_PREFIX) and request.method in ("GET", "HEAD"):
            return self._file(request.path[len(FILES_PREFIX) :])
        allowed: set[str] = set()
        for methods, pattern, handler in self._routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            if request.method not in methods:
                allowed |= methods
                continue
            request.match = match
            answer = handler(request)
            return answer if isinstance(answer, Reply) else Reply(200, answer)
        if allowed:
            return self.error(
                405,
                "method_not_allowed",
                f"{request.method} not allowed on {request.path}",
                {"Allow": ", ".join(sorted(allowed))},
            )
        return self.error(404, "not_found", f"no such endpoint: {request.path}")

    def _file(self, name: str) -> Reply:
        self.count("downloads")
        file_id = name.rsplit(".", 1)[0]
        with self.lock:
            found = self._files.get(file_id)
        if found is None:
            return Reply(404, raw=b"<Error><Code>NoSuchKey</Code></Error>", content_type="application/xml")
        data, content_type, expires_at, prompt = found
        if time.monotonic() >= expires_at or self.prompt_fault("download-expired", prompt):
            return Reply(
                403,
                raw=b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
                content_type="application/xml",
            )
        if self.prompt_fault("download-error", prompt):
            return Reply(
                500, raw=b"<Error><Code>InternalError</Code></Error>", content_type="application/xml"
            )
        if self.flaky(prompt, "download-flaky"):
            return Reply(503, raw=b"<Error><Code>SlowDown</Code></Error>", content_type="application/xml")
        if self.prompt_fault("download-garbage", prompt):
            return Reply(200, raw=b"<html><body>a CDN error page</body></html>", content_type="image/png")
        return Reply(200, raw=data, content_type=content_type)


def serve(emulator: BaseEmulator, out: TextIO = sys.stdout) -> None:
    """Run an emulator in the foreground until Ctrl-C."""
    emulator.start()
    try:
        faults = ", ".join(str(f) for f in emulator.config.faults) or "none"
        keys = ", ".join(f"{k}={v}" for k, v in emulator.keys.items()) or "none (this API takes no key)"
        print(
            f"imagepipe {emulator.title} EMULATOR (not the real API) listening on {emulator.base_url} "
            f"-- keys: {keys} -- faults: {faults} -- Ctrl-C to stop",
            file=out,
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()
    print(f"imagepipe {emulator.title} EMULATOR stopped", file=out, flush=True)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's listen backlog is 5: a batch of generators connecting at once overflowed it, and each
    # dropped connection waited for TCP's 1 s SYN retry - a second of billed Lambda time that a real API,
    # behind its load balancer, never costs. The kernel caps it at net.core.somaxconn.
    request_queue_size = 1024

    def __init__(self, addr: tuple[str, int], emulator: BaseEmulator) -> None:
        self.emulator = emulator
        self.base_url = ""
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-request are normal under load; anything else gets one line, not a traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        print(f"{self.emulator.name} emulator: error serving {client_address}: {exc!r}", file=sys.stderr)

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
        return f"imagepipe-{self.server.emulator.name}-emulator"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # per-request logging would drown the runtime's own output

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The stdlib's answer to malformed requests: in the API's own error shape, like everything else.
        self.close_connection = True
        self._send(self.server.emulator.error(code, "invalid_request", message or str(code)))

    def _send(self, reply: Reply) -> None:
        emulator = self.server.emulator
        path = urlsplit(getattr(self, "path", "") or "").path
        if not path.startswith("/_emulator/"):  # stats describe API traffic, not the stats calls
            with emulator.lock:
                emulator.responses[str(reply.status)] += 1
        body = reply.raw if reply.raw is not None else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self) -> bytes:
        emulator = self.server.emulator
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size < 0:  # int("-1", 16) parses; rfile.read(-1) would then wait for the client to hang up
                    raise ValueError("negative chunk size")
                if size == 0:
                    while self.rfile.readline(1024).strip():  # trailers
                        pass
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY_BYTES:
                    raise emulator.error(
                        413, "request_too_large", f"request body over {MAX_BODY_BYTES} bytes"
                    )
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise emulator.error(400, "invalid_request", "bad Content-Length header") from None
        if length > MAX_BODY_BYTES:
            raise emulator.error(413, "request_too_large", f"request body over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        emulator = self.server.emulator
        try:
            try:
                body = self._read_body()
            except Reply:
                self.close_connection = True  # the unread body would corrupt the next request
                raise
            except ValueError:
                self.close_connection = True
                raise emulator.error(400, "invalid_request", "malformed chunked body") from None
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            reply = emulator._handle(Request(self.command, url.path, query, self.headers, body))
        except Reply as raised:
            reply = raised
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            return
        except Exception as exc:  # a bug in the emulator: answer 500 rather than drop the connection
            self.close_connection = True
            if emulator._server is not self.server:  # stopped mid-request (base_url is gone): client cut off
                return
            print(
                f"{emulator.name} emulator: internal error on {self.command} {self.path}: {exc!r}",
                file=sys.stderr,
            )
            reply = emulator.error(500, "internal_error", f"emulator bug: {exc!r}")
        with contextlib.suppress(ConnectionError, TimeoutError):
            self._send(reply)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch


def json_body(request: Request, bad: Callable[[str], Reply]) -> dict[str, Any]:
    """The request's JSON object, or `bad(message)` raised."""
    try:
        value = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        raise bad("request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise bad("request body must be a JSON object")
    return value


SIZE_RE = re.compile(r"^(\d{1,5})[x*](\d{1,5})$")


def parse_size(value: Any) -> tuple[int, int] | None:
    match = SIZE_RE.match(value) if isinstance(value, str) else None
    return (int(match[1]), int(match[2])) if match else None


def digest_id(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]
