"""The one interface every image API sits behind: a task in; images, the provider's request id and
cost out - or a ProviderError that says what to do next. Nothing outside providers/ knows an API's
field names."""

from __future__ import annotations

import base64
import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import httpx

from imagepipe.contract import RESERVED_PARAMS, ImageTask


class Action(StrEnum):
    """What the caller does with a failure (providers.md section 5)."""

    RETRY = "retry"  # back off, then try again (SQS retry; DLQ after the last attempt)
    REAUTH = "reauth"  # re-read the credentials once and try again, else stop
    FAIL_ROW = "fail_row"  # record the row failed with the provider's reason, now
    STOP_JOB = "stop_job"  # no more calls to this provider for the job: its remaining rows fail fast


class ProviderError(Exception):
    """A call that gave no images.

    kind: a short word for results (refused, moderation, rate_limited, unavailable, timeout, auth,
    quota, not_permitted, bad_response, config, answer_lost, download_failed).
    maybe_accepted: the request was sent and its answer never arrived, so the provider may have
    accepted (and charged for) it. A submit in that state is never resent blindly.
    cost: what the provider charged for the request when it says (a paid answer whose images could not
    be fetched: kind download_failed); None when unknown."""

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        action: Action,
        status: int | None = None,
        request_id: str | None = None,
        maybe_accepted: bool = False,
        cost: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind, self.message, self.action = kind, message, action
        self.status, self.request_id, self.maybe_accepted = status, request_id, maybe_accepted
        self.cost = cost

    @property
    def retryable(self) -> bool:
        return self.action in (Action.RETRY, Action.REAUTH)

    def as_record(self) -> dict[str, str]:
        return {"type": self.kind, "message": self.message}


@dataclass(frozen=True)
class GeneratedImage:
    data: bytes
    extension: str
    content_type: str


@dataclass(frozen=True)
class Generation:
    """A finished request: its images, the provider's id for it and the price it reported (if any)."""

    images: list[GeneratedImage]
    request_id: str | None = None
    cost: float | None = None


@dataclass(frozen=True)
class Pending:
    """An accepted asynchronous request that is still running: poll it again with resume(request_id)."""

    request_id: str
    status: str = "processing"


@dataclass(frozen=True)
class Limits:
    """What a provider accepts, checked at split time so a row it cannot serve is rejected before any
    paid call. `fields` are the optional per-row fields it takes (seed, steps, guidance, negative_prompt)."""

    min_side: int = 64
    max_side: int = 2048
    side_step: int = 8
    max_n: int = 4
    max_prompt_chars: int = 4000
    fields: frozenset[str] = frozenset()
    sizes: frozenset[tuple[int, int]] | None = None  # only these sizes, when the API has a fixed list


class Keys:
    """The API keys of the configured providers, read through `load(force)`; `refresh()` makes the
    next read bypass any cache (a key rotated in Secrets Manager is picked up after one 401)."""

    def __init__(self, load: Callable[[bool], Mapping[str, str]]) -> None:
        self._load = load
        self._force = False
        self._lock = threading.Lock()
        # One read at a time: threads asking together on a cold start wait for the first read and get
        # its answer from the cache, instead of each reading the secret.
        self._reading = threading.Lock()

    def get(self, name: str) -> str:
        return self.get_many(name)[0]

    def get_many(self, *names: str) -> tuple[str, ...]:
        """Several keys from one read, so a re-read after refresh() gives them all fresh (a provider
        with an API key and a secret never pairs a new one with an old one)."""
        with self._reading:
            with self._lock:
                force, self._force = self._force, False
            values = self._load(force)
        return tuple(str(values.get(name) or "") for name in names)

    def refresh(self) -> None:
        with self._lock:
            self._force = True

    @classmethod
    def fixed(cls, values: Mapping[str, str]) -> Keys:
        return cls(lambda _force: values)


@dataclass
class ProviderConfig:
    """One provider as a stack configures it."""

    base_url: str
    keys: Keys
    http: httpx.Client
    model: str | None = None  # the stack's default model for this provider (None: the provider's own)
    options: dict[str, str] = field(default_factory=dict)  # provider-specific (e.g. baidu-oauth's path)


class Provider(ABC):
    name: ClassVar[str]
    default_model: ClassVar[str]
    asynchronous: ClassVar[bool] = False
    key_names: ClassVar[tuple[str, ...]]  # names in the keys secret / local environment
    public_url: ClassVar[str]
    limits: ClassVar[Limits]  # provider-wide; limits_for(model) may say more for a model it knows

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self.http = config.http
        self.keys = config.keys

    def model_for(self, task: ImageTask) -> str:
        return task.model or self.config.model or self.default_model

    @classmethod
    def limits_for(cls, model: str) -> Limits:
        """What `model` takes on this provider: the provider-wide limits unless a provider knows better."""
        return cls.limits

    @classmethod
    def check(cls, task: ImageTask, model: str | None = None) -> str | None:
        """Why this provider cannot serve the task on `model`, as a reason for the user, or None. No
        network. Without a model: the row's, else the provider's default (the stack's model is not known
        at split time)."""
        reserved = [key for key in RESERVED_PARAMS if key in task.params]
        if reserved:
            columns = "column" if len(reserved) == 1 else "columns"
            return f"{cls.name}: params cannot set {', '.join(reserved)} (use the row's own {columns})"
        model = model or task.model or cls.default_model
        limits = cls.limits_for(model)
        who = f"{cls.name} {model}"
        # A fixed size list says more than "a multiple of 512 from 1024 to 1536": it is named first.
        if limits.sizes is not None and (task.width, task.height) not in limits.sizes:
            sizes = ", ".join(f"{w}x{h}" for w, h in sorted(limits.sizes))
            return f"{who} takes only these sizes: {sizes} (not {task.width}x{task.height})"
        for side, value in (("width", task.width), ("height", task.height)):
            if not limits.min_side <= value <= limits.max_side or value % limits.side_step:
                return (
                    f"{who} takes a {side} that is a multiple of {limits.side_step} from "
                    f"{limits.min_side} to {limits.max_side}, not {value}"
                )
        if task.n > limits.max_n:
            return f"{who} makes at most {limits.max_n} image(s) per request, not n={task.n}"
        if len(task.prompt) > limits.max_prompt_chars:
            return (
                f"{who} takes prompts of at most {limits.max_prompt_chars} characters, not {len(task.prompt)}"
            )
        for name in ("seed", "steps", "guidance", "negative_prompt"):
            if getattr(task, name) not in (None, "") and name not in limits.fields:
                return f"{who} does not take {name}"
        return None

    def checked_model(self, task: ImageTask) -> str:
        """The model the task runs on, checked again: the split-time check assumed the provider's default
        model for a row without one, and the stack's may take less. A row it cannot serve fails unsent."""
        model = self.model_for(task)
        reason = self.check(task, model)
        if reason:
            raise ProviderError("refused", reason, action=Action.FAIL_ROW)
        return model

    def api_key(self) -> str:
        """The provider's one API key. None configured: REAUTH, so run() re-reads the keys once and then
        stops the job's calls to this provider if there is still none."""
        name = self.key_names[0]
        key = self.keys.get(name)
        if not key:
            raise ProviderError("auth", f"no {name} is configured", action=Action.REAUTH)
        return key

    def run(self, call: Callable[[], Any]) -> Any:
        """`call`, re-reading the keys once if the provider says they are wrong; a second refusal
        stops the job's calls to this provider (the keys are wrong, not the row)."""
        try:
            return call()
        except ProviderError as exc:
            if exc.action is not Action.REAUTH:
                raise
            self.keys.refresh()
        try:
            return call()
        except ProviderError as exc:
            if exc.action is Action.REAUTH:
                raise ProviderError(
                    "auth",
                    exc.message + " (again after re-reading the keys)",
                    action=Action.STOP_JOB,
                    status=exc.status,
                    request_id=exc.request_id,
                ) from exc
            raise

    @abstractmethod
    def start(self, task: ImageTask) -> Generation | Pending:
        """Send the task. A synchronous API answers a Generation; an asynchronous one a Pending
        (or a Generation when the model finished at once)."""

    def resume(self, request_id: str) -> Generation | Pending:
        """Read an accepted asynchronous request again. Raises ProviderError(RETRY) when the read
        itself failed (the request is still the provider's: poll again later)."""
        raise NotImplementedError(f"{self.name} is synchronous")


# ---------------------------------------------------------------- the deadline every HTTP call keeps

# Time kept back from the deadline for the call's own end (closing the connection, raising).
DEADLINE_MARGIN_S = 0.5
# A call that would have less than this to get its answer is not sent at all.
MIN_CALL_S = 1.0
_DEADLINE: ContextVar[float | None] = ContextVar("imagepipe_provider_deadline", default=None)


@contextlib.contextmanager
def deadline(epoch_s: float | None) -> Iterator[None]:
    """Every HTTP call a provider makes inside the block ends by `epoch_s` (epoch seconds): its
    timeouts are the client's own, cut to the time left; a call with under MIN_CALL_S left is not sent
    (ProviderError "timeout", RETRY, never maybe_accepted). Nested blocks keep the earlier deadline.
    The deadline is per thread (a context variable): set it in the thread that makes the calls."""
    current = _DEADLINE.get()
    if epoch_s is None or (current is not None and current < epoch_s):
        epoch_s = current
    token = _DEADLINE.set(epoch_s)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


# The images of a paid answer may use this much of the time the generator keeps back after the deadline
# (20 s, for writing images and outcomes): fetching what was paid for is worth more than the margin, and
# a download cut short by the deadline fails the row (it is never asked for again).
PAID_DOWNLOAD_GRACE_S = 12.0


@contextlib.contextmanager
def _paid_download_time() -> Iterator[None]:
    """The current deadline moved PAID_DOWNLOAD_GRACE_S later, for fetching a paid answer's images."""
    current = _DEADLINE.get()
    token = _DEADLINE.set(None if current is None else current + PAID_DOWNLOAD_GRACE_S)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def time_left() -> float | None:
    """Seconds an HTTP call started now may take (the deadline less the margin), None without a deadline."""
    end = _DEADLINE.get()
    return None if end is None else end - time.time() - DEADLINE_MARGIN_S


def call_timeout(http: httpx.Client, what: str) -> httpx.Timeout | None:
    """The timeouts for one call under the current deadline (None: the client's own), or a
    ProviderError("timeout", RETRY) when too little time is left to send it at all."""
    left = time_left()
    if left is None:
        return None
    if left < MIN_CALL_S:
        raise ProviderError(
            "timeout",
            f"{what} was not sent: {max(left, 0.0):.1f} s left before the invocation's deadline",
            action=Action.RETRY,
        )
    configured = http.timeout

    def cap(value: float | None) -> float:
        return left if value is None else min(value, left)

    return httpx.Timeout(
        connect=cap(configured.connect),
        read=cap(configured.read),
        write=cap(configured.write),
        pool=cap(configured.pool),
    )


# ---------------------------------------------------------------- helpers the provider modules share

# A failed image download is tried this many times in all, with these pauses between (within the deadline).
DOWNLOAD_TRIES = 3
DOWNLOAD_PAUSES_S = (0.5, 1.5)


def sniff_image(raw: bytes) -> GeneratedImage:
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return GeneratedImage(raw, "png", "image/png")
    if raw.startswith(b"\xff\xd8\xff"):
        return GeneratedImage(raw, "jpg", "image/jpeg")
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return GeneratedImage(raw, "webp", "image/webp")
    # Part of a paid answer: asking again would pay again, so the row fails with what was paid.
    raise ProviderError(
        "download_failed",
        "the image API returned data that is not a PNG, JPEG or WebP image",
        action=Action.FAIL_ROW,
    )


def decode_b64(value: str) -> GeneratedImage:
    try:
        return sniff_image(base64.b64decode(value, validate=True))
    except ValueError as exc:
        raise ProviderError(
            "download_failed", "an image in the answer is not valid base64", action=Action.FAIL_ROW
        ) from exc


def download(http: httpx.Client, url: str, *, sleep: Callable[[float], None] = time.sleep) -> GeneratedImage:
    """An output URL of a paid answer, fetched at once (such URLs expire). No auth header: they are
    presigned. A passing failure (no connection, no answer in time, 408, 429, 5xx) is tried again
    DOWNLOAD_TRIES times in all, within the deadline. Raises ProviderError "download_failed": FAIL_ROW
    when the file is gone for good (an expired URL, 403/404/410) or not an image; RETRY when it may
    come back later (only an API that can read the answer again - Atlas Cloud's prediction - may
    act on that; a synchronous provider turns it into FAIL_ROW, see `paid_images`)."""
    with _paid_download_time():
        return _download(http, url, sleep)


def _download(http: httpx.Client, url: str, sleep: Callable[[float], None]) -> GeneratedImage:
    tries = 0
    while True:
        tries += 1
        try:
            # CDNs may redirect a signed URL to where the file is.
            response = send(http, "GET", url, what="the image download", follow_redirects=True)
        except ProviderError as exc:
            problem, status = exc.message, exc.status
        else:
            status = response.status_code
            if status == 200:
                return sniff_image(response.content)
            problem = f"image download answered HTTP {status}"
            if 400 <= status < 500 and status not in (408, 429):  # an expired signed URL is a 403
                raise ProviderError(
                    "download_failed",
                    f"{problem}: the image URL expired or is gone (the image was paid for)",
                    action=Action.FAIL_ROW,
                    status=status,
                )
        left = time_left()
        pause = DOWNLOAD_PAUSES_S[min(tries, len(DOWNLOAD_PAUSES_S)) - 1]
        if tries >= DOWNLOAD_TRIES or (left is not None and left < pause + MIN_CALL_S):
            raise ProviderError(
                "download_failed",
                f"{problem} (after {tries} tries; the image was paid for)",
                action=Action.RETRY,
                status=status,
            )
        sleep(pause)


def images_of(
    who: str,
    items: Any,
    read: Callable[[Any], GeneratedImage],
    response: httpx.Response,
    request_id: str | None,
    cost: float | None = None,
) -> list[GeneratedImage]:
    """The images of a successful answer's list of image entries, each read by `read`. An answer with
    none is a bad response; an entry that cannot be read names the answer, and a paid image that could
    not be fetched or decoded fails the row (see `paid_images`)."""
    if not isinstance(items, list) or not items:
        raise ProviderError(
            "bad_response",
            f"{who} answered HTTP {response.status_code} without images",
            action=Action.RETRY,
            status=response.status_code,
            request_id=request_id,
        )
    try:
        return paid_images(lambda: [read(item) for item in items], request_id, cost)
    except ProviderError as exc:
        exc.status = exc.status or response.status_code
        raise


def paid_images(
    read: Callable[[], list[GeneratedImage]],
    request_id: str | None,
    cost: float | None = None,
    *,
    can_read_again: bool = False,
) -> list[GeneratedImage]:
    """The images of an answer the provider has already charged for. Its request is never sent again
    because of them: a download or decode failure ("download_failed") fails the row with the request
    id and the cost, unless the answer can be read again later (`can_read_again`, an asynchronous
    prediction) and the failure may pass - then it stays RETRY, so the caller reads the prediction again."""
    try:
        return read()
    except ProviderError as exc:
        exc.request_id = exc.request_id or request_id
        if exc.kind == "download_failed":
            exc.cost = cost if exc.cost is None else exc.cost
            if exc.action is Action.RETRY and not can_read_again:
                exc.action = Action.FAIL_ROW
        raise


def status_kind(status: int) -> tuple[str, Action]:
    """What an HTTP error status means when nothing more precise in the answer says otherwise."""
    if status == 401:
        return "auth", Action.REAUTH
    if status == 402:
        return "quota", Action.STOP_JOB
    if status in (403, 451):  # e.g. an account not verified for a model, an unsupported region
        return "not_permitted", Action.STOP_JOB
    if status == 429:
        return "rate_limited", Action.RETRY
    if status == 408 or status >= 500:
        return "unavailable", Action.RETRY
    return "refused", Action.FAIL_ROW


def send(
    http: httpx.Client, method: str, url: str, *, what: str = "the request", **kwargs: Any
) -> httpx.Response:
    """One HTTP request, within the current deadline (a call with too little time left is not sent).
    A failure before the request left (cannot connect) is plainly retryable; a failure after it left
    (no answer in time, connection dropped) may have been accepted."""
    timeout = call_timeout(http, what)
    if timeout is not None:
        kwargs["timeout"] = timeout
    try:
        return http.request(method, url, **kwargs)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise ProviderError(
            "unavailable", f"the image API could not be reached: {describe(exc)}", action=Action.RETRY
        ) from exc
    except httpx.TimeoutException as exc:
        raise ProviderError(
            "timeout",
            f"the image API did not answer in time: {describe(exc)}",
            action=Action.RETRY,
            maybe_accepted=True,
        ) from exc
    except httpx.HTTPError as exc:
        raise ProviderError(
            "unavailable",
            f"the connection to the image API failed: {describe(exc)}",
            action=Action.RETRY,
            maybe_accepted=True,
        ) from exc


def json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        value = response.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def as_int(value: Any) -> int | None:
    """A number the API may send as a number or as text; None when it is neither."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
