"""Loopback emulator of Atlas Cloud's asynchronous image API: submit, poll a prediction, fetch its outputs."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from imagepipe_cli.emulators.base import (
    DOWNLOAD_FAULTS,
    PROBABILITY,
    RATE_FAULTS,
    WORD,
    WORD_COUNT,
    BaseEmulator,
    Fault,
    Reply,
    Request,
    Route,
    json_body,
    parse_size,
    render_png,
)

SUBMIT_PATH = "/api/v1/model/generateImage"
PREDICTION_PATH = "/api/v1/model/prediction/"
DEFAULT_MODEL = "baidu/ERNIE-Image-Turbo/text-to-image"
# ERNIE-Image-Turbo takes only these sizes on Atlas Cloud (see the provider module for the source).
ERNIE_TURBO_SIZES = frozenset(
    {(1024, 1024), (1376, 768), (1264, 848), (1200, 896), (896, 1200), (848, 1264), (768, 1376)}
)
MAX_N = 4
MIN_SIDE, MAX_SIDE = 64, 2048
# An emulator figure for `price`, not Atlas Cloud's: real prices are per model and change.
PRICE_PER_IMAGE = 0.003
MODERATION_ERROR_CODE = 1039
# Predictions are kept in memory; bound them so a long local run cannot grow without limit.
MAX_PREDICTIONS = 10_000


@dataclass
class Prediction:
    id: str
    model: str
    prompt: str
    width: int
    height: int
    n: int
    created_at: float  # time.monotonic() of the accepted submit
    created_iso: str
    error: str = ""  # set: the prediction ends failed with this error
    error_code: int | None = None
    nsfw: bool = False  # finishes completed with no outputs and has_nsfw_contents set
    answer_5xx: bool = False  # a failed prediction is answered with HTTP 500 carrying the payload
    poll_failures_left: int = 0  # poll-flaky: this many more polls answer 503
    outputs: list[str] | None = None  # made once, when first seen completed
    pngs: list[bytes] | None = None  # the images, drawn while it runs (see AtlasCloudEmulator._draw)
    lock: threading.Lock = field(default_factory=threading.Lock)


class AtlasCloudEmulator(BaseEmulator):
    """Atlas Cloud's prediction API. A prediction is `created`, then `processing` until config.latency_ms
    after its submit (computed from the clock at poll time), then ends: `completed` with expiring output
    URLs, or `failed` as its faults say."""

    name: ClassVar[str] = "atlascloud"
    title: ClassVar[str] = "Atlas Cloud"
    FAULTS: ClassVar[dict[str, str]] = {
        "refuse": WORD,  # accepted, then failed with error_code 1039 (content moderation); not billed
        "fail": WORD,  # 500 on submit
        "flaky": WORD_COUNT,  # the first N matching submits get 503
        "rate-limit": WORD_COUNT,  # the first N matching submits get 429
        "stop": WORD,  # 402 insufficient balance on submit
        "hang": WORD,  # accepted and billed, then the submit answer comes 30 s late
        "malformed": WORD,  # 200 submit answer without data.id
        "error-rate": PROBABILITY,  # random 500s on submit (seeded)
        "nsfw": WORD,  # completed with no outputs and has_nsfw_contents [true]
        "terminal-5xx": WORD,  # the prediction fails and is answered with HTTP 500 carrying that payload
        "forbidden": WORD,  # 403 on submit
        "region": WORD,  # 451 on submit
        "poll-flaky": WORD_COUNT,  # the first N polls of a matching prediction get 503
        "sync": WORD,  # the submit answer already carries the outputs, status completed
        **RATE_FAULTS,  # rate-limit-rate=P, malformed-rate=P, hang-rate=P
        **DOWNLOAD_FAULTS,  # download-error=WORD, download-flaky=WORD:N, download-expired, download-garbage
    }
    DEFAULT_KEYS: ClassVar[dict[str, str]] = {"ATLASCLOUD_API_KEY": "emulator-atlascloud-key"}
    # `refuse` is not among them: a refused prompt's submit is accepted and the prediction fails.
    REFUSALS: ClassVar[tuple[str, ...]] = (
        "stop",
        "forbidden",
        "region",
        "rate-limit",
        "fail",
        "error-rate",
        "flaky",
        "malformed",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.predictions: OrderedDict[str, Prediction] = OrderedDict()
        # The images are drawn while the prediction runs, one at a time on a thread of their own, as the
        # provider's GPUs work during the generation: not all at once when a burst of polls finds a burst
        # of predictions done (tens of ms of CPU each, which a real provider does not charge the poll), nor
        # as a burst of submits comes in: each halfway through its generation, when the client is waiting.
        # The thread starts with the first prediction to draw and ends with stop().
        self._to_draw: queue.SimpleQueue[Prediction | None] = queue.SimpleQueue()
        self._drawer: threading.Thread | None = None
        self._stopping = threading.Event()

    def _draw_later(self, prediction: Prediction) -> None:
        with self.lock:
            if self._drawer is None:
                self._stopping.clear()
                self._drawer = threading.Thread(target=self._draw, name="atlascloud-draw", daemon=True)
                self._drawer.start()
        self._to_draw.put(prediction)

    def _draw(self) -> None:
        while (prediction := self._to_draw.get()) is not None:
            # FIFO is the order they are due in: every prediction runs for the same latency.
            halfway = prediction.created_at + self.config.latency_ms / 2000.0
            if self._stopping.wait(max(0.0, halfway - time.monotonic())):
                return
            if prediction.outputs is None:
                pngs = [self._png(prediction, i) for i in range(prediction.n)]
                with prediction.lock:
                    if prediction.outputs is None:  # not already made by a poll that came first
                        prediction.pngs = pngs

    def stop(self) -> None:
        with self.lock:
            drawer, self._drawer = self._drawer, None
        if drawer is not None:
            self._stopping.set()
            self._to_draw.put(None)
            drawer.join(timeout=5)
        super().stop()

    @staticmethod
    def _png(prediction: Prediction, index: int) -> bytes:
        return render_png(prediction.prompt, prediction.width, prediction.height, index)

    def routes(self) -> list[Route]:
        return [
            ("POST", SUBMIT_PATH, self._submit),
            ("GET", PREDICTION_PATH + r"(?P<id>[^/]+)", self._poll),
        ]

    # ---- the API's answer shapes

    def error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Reply:
        request_id = _request_id()
        body = {"code": status, "msg": message, "request_id": request_id, "data": None}
        return Reply(status, body, {**(headers or {}), "X-Request-ID": request_id})

    def error_body(self, status: int, code: str, message: str) -> Any:
        return {"code": status, "msg": message, "request_id": _request_id(), "data": None}

    def _answer(self, data: dict[str, Any], status: int = 200) -> Reply:
        return Reply(status, {"code": status, "data": data}, {"X-Request-ID": _request_id()})

    # ---- counters for tests

    def submits_for(self, prompt: str) -> int:
        with self.lock:
            return self.counters["submits:" + prompt]

    # ---- handlers

    def _check_key(self, request: Request) -> None:
        if request.bearer() not in self.keys.values():
            raise self.error(401, "unauthorized", "Unauthorized: invalid or expired API key")

    def _submit(self, request: Request) -> Reply:
        self.count("requests")
        self.count("submits")
        # Per prompt: every submit that carried it, whatever its answer (so tests can see a resend).
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            peek = json.loads(request.body)
            if isinstance(peek, dict) and isinstance(peek.get("prompt"), str):
                self.count("submits:" + peek["prompt"])
        self._check_key(request)
        body = json_body(request, lambda message: self.error(400, "bad_request", message))
        model, prompt, n, (width, height) = self._validate(body)

        # Every refusal is decided before anything counts as paid.
        if not self.take_rate_token():
            raise self.error(429, "rate_limited", "Too many requests: rate limit exceeded, retry later")
        self.apply_common_faults(prompt, self._fault_answer)

        prediction = Prediction(
            id=uuid.uuid4().hex,
            model=model,
            prompt=prompt,
            width=width,
            height=height,
            n=n,
            created_at=time.monotonic(),
            created_iso=_now_iso(),
        )
        poll_flaky = self.prompt_fault("poll-flaky", prompt)
        prediction.poll_failures_left = poll_flaky.count if poll_flaky else 0
        if self.prompt_fault("refuse", prompt):
            prediction.error = "Input rejected by content moderation: the prompt violates the usage policy"
            prediction.error_code = MODERATION_ERROR_CODE
        elif self.prompt_fault("terminal-5xx", prompt):
            prediction.error = "Internal error: the model worker failed while generating"
        prediction.answer_5xx = bool(self.prompt_fault("terminal-5xx", prompt))
        prediction.nsfw = bool(self.prompt_fault("nsfw", prompt))
        with self.lock:
            self.predictions[prediction.id] = prediction
            while len(self.predictions) > MAX_PREDICTIONS:
                self.predictions.popitem(last=False)
        if not prediction.error:  # failed predictions are not billed
            self.charge(prompt)
            if not prediction.nsfw:
                self._draw_later(prediction)
        self.hang(prompt)  # accepted (and billed); the answer comes too late for the client
        if self.prompt_fault("sync", prompt):
            # A model in sync mode answers when it has finished, with the poll's shape.
            time.sleep(self.config.latency_ms / 1000.0)
            prediction.created_at -= self.config.latency_ms / 1000.0
            return self._view(prediction)
        return self._answer(
            {
                "id": prediction.id,
                "model": model,
                "status": "created",
                "urls": {"get": self._get_url(prediction)},
                "outputs": [],
                "has_nsfw_contents": [],
                "error": "",
                "created_at": prediction.created_iso,
            }
        )

    def _fault_answer(self, kind: str, fault: Fault) -> Reply:
        """An injected refusal or error in Atlas Cloud's own error shape."""
        if kind == "stop":
            return self.error(402, "insufficient_balance", "Insufficient balance: please top up your account")
        if kind == "forbidden":
            return self.error(403, "forbidden", "Forbidden: this account is not permitted to use this model")
        if kind == "region":
            return self.error(451, "unavailable_for_legal_reasons", "Service is not available in your region")
        if kind == "rate-limit":
            return self.error(429, "rate_limited", "Too many requests: rate limit exceeded, retry later")
        if kind == "flaky":
            return self.error(503, "service_unavailable", "Service temporarily unavailable")
        if kind == "malformed":
            return self._answer({"status": "created"})  # a 200 that names no prediction
        return self.error(500, "internal_error", "Internal server error")  # fail, error-rate

    def _validate(self, body: dict[str, Any]) -> tuple[str, str, int, tuple[int, int]]:
        def bad(message: str) -> Reply:
            return self.error(400, "bad_request", message)

        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            raise bad("model is required")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise bad("prompt is required")
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
            raise bad(f"n must be an integer from 1 to {MAX_N}")
        size = parse_size(body.get("size", "1024*1024"))
        if size is None or not all(MIN_SIDE <= side <= MAX_SIDE for side in size):
            raise bad(f"size must be written WIDTH*HEIGHT with sides from {MIN_SIDE} to {MAX_SIDE}")
        for name in ("seed", "num_inference_steps"):
            if name in body and (not isinstance(body[name], int) or isinstance(body[name], bool)):
                raise bad(f"{name} must be an integer")
        guidance = body.get("guidance_scale", 0)
        if not isinstance(guidance, int | float) or isinstance(guidance, bool):
            raise bad("guidance_scale must be a number")
        if model != DEFAULT_MODEL and not model.startswith("baidu/"):
            raise self.error(404, "model_not_found", f"Model not found: {model}")
        if model == DEFAULT_MODEL and size not in ERNIE_TURBO_SIZES:
            sizes = ", ".join(f"{w}x{h}" for w, h in sorted(ERNIE_TURBO_SIZES))
            raise bad(f"size {size[0]}x{size[1]} is not supported by {model}: use one of {sizes}")
        return model, prompt, n, size

    def _poll(self, request: Request) -> Reply:
        self.count("requests")
        self.count("polls")
        self._check_key(request)
        assert request.match is not None
        with self.lock:
            prediction = self.predictions.get(request.match["id"])
        if prediction is None:
            raise self.error(404, "not_found", f"Prediction not found: {request.match['id']}")
        with self.lock:
            failing = prediction.poll_failures_left > 0
            prediction.poll_failures_left -= failing
        if failing:
            raise self.error(503, "service_unavailable", "Service temporarily unavailable")
        return self._view(prediction)

    # ---- a prediction as the poll shows it

    def _get_url(self, prediction: Prediction) -> str:
        return f"{self.base_url}{PREDICTION_PATH}{prediction.id}"

    def _view(self, prediction: Prediction) -> Reply:
        running = time.monotonic() - prediction.created_at < self.config.latency_ms / 1000.0
        data: dict[str, Any] = {
            "id": prediction.id,
            "model": prediction.model,
            "status": "processing",
            "urls": {"get": self._get_url(prediction)},
            "outputs": [],
            "has_nsfw_contents": [],
            "error": "",
            "created_at": prediction.created_iso,
        }
        if running:
            return self._answer(data)
        if prediction.error:
            data.update(status="failed", error=prediction.error)
            if prediction.error_code is not None:
                data["error_code"] = prediction.error_code
            return self._answer(data, 500 if prediction.answer_5xx else 200)
        price = round(PRICE_PER_IMAGE * prediction.n, 6)
        if prediction.nsfw:
            data.update(status="completed", has_nsfw_contents=[True] * prediction.n, price=price)
            return self._answer(data)
        data.update(
            status="completed",
            outputs=self._outputs(prediction),
            has_nsfw_contents=[False] * prediction.n,
            price=price,
        )
        return self._answer(data)

    def _outputs(self, prediction: Prediction) -> list[str]:
        with prediction.lock:  # two concurrent polls make the images once
            if prediction.outputs is None:
                pngs = prediction.pngs or [self._png(prediction, i) for i in range(prediction.n)]
                prediction.outputs = [self.store_file(png, prompt=prediction.prompt) for png in pngs]
                prediction.pngs = None
                self.count("images", prediction.n)
            return prediction.outputs


def _request_id() -> str:
    return uuid.uuid4().hex


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
