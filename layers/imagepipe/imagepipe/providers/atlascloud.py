"""Atlas Cloud (the default provider): one submit per task, then polls of the prediction until it ends."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar
from urllib.parse import quote

import httpx

from imagepipe.contract import RESERVED_PARAMS, ImageTask
from imagepipe.providers.base import (
    Action,
    GeneratedImage,
    Generation,
    Limits,
    Pending,
    Provider,
    ProviderError,
    decode_b64,
    download,
    json_object,
    paid_images,
    send,
)

KEY_NAME = "ATLASCLOUD_API_KEY"
SUBMIT_PATH = "/api/v1/model/generateImage"
PREDICTION_PATH = "/api/v1/model/prediction/{id}"
ERNIE_TURBO = "baidu/ERNIE-Image-Turbo/text-to-image"

# Prediction statuses (providers.md section 1); anything else is read as still running.
RUNNING = frozenset({"created", "starting", "queued", "processing"})
DONE = frozenset({"completed", "succeeded"})
FAILED = frozenset({"failed", "error", "timeout", "canceled", "cancelled"})
MODERATION_ERROR_CODE = 1039  # "input rejected by content moderation"

# Row columns -> this API's field names. seed/num_inference_steps/guidance_scale are the ERNIE-Image-Turbo
# schema's names [3P: a capture of Atlas Cloud's live model schemas]; negative_prompt is [NF] (other models).
FIELD_NAMES = {
    "negative_prompt": "negative_prompt",
    "seed": "seed",
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
}
# Sides divisible by 16 (ERNIE-Image's VAE/patch size); the 256..2048 range and n <= 4 are [NF] for
# models without limits of their own below.
LIMITS = Limits(min_side=256, max_side=2048, side_step=16, max_n=4, fields=frozenset(FIELD_NAMES))
# ERNIE-Image-Turbo on Atlas Cloud: size is "WxH" from a fixed list (ERNIE-Image's resolution presets), and
# the schema has seed / num_inference_steps / guidance_scale / use_pe but no negative_prompt
# [3P: captured Atlas Cloud model schema, matching the presets on the Hugging Face model card].
MODEL_LIMITS: dict[str, Limits] = {
    ERNIE_TURBO: replace(
        LIMITS,
        sizes=frozenset(
            {(1024, 1024), (1376, 768), (1264, 848), (1200, 896), (896, 1200), (848, 1264), (768, 1376)}
        ),
        fields=frozenset({"seed", "steps", "guidance"}),
    ),
}
# How a model's size is written: Atlas Cloud writes most models' sizes "W*H".
SIZE_SEPARATORS = {ERNIE_TURBO: "x"}


class AtlasCloudProvider(Provider):
    """POST {base}/api/v1/model/generateImage, then GET {base}/api/v1/model/prediction/{id}."""

    name: ClassVar[str] = "atlascloud"
    default_model: ClassVar[str] = ERNIE_TURBO
    asynchronous: ClassVar[bool] = True
    key_names: ClassVar[tuple[str, ...]] = (KEY_NAME,)
    public_url: ClassVar[str] = "https://api.atlascloud.ai"
    limits: ClassVar[Limits] = LIMITS

    @classmethod
    def limits_for(cls, model: str) -> Limits:
        return MODEL_LIMITS.get(model, LIMITS)

    # ------------------------------------------------------------------ the two calls

    def start(self, task: ImageTask) -> Generation | Pending:
        body = self._body(task)
        # run() repeats the call only after a 401, which created no prediction; nothing else resends it.
        return self.run(lambda: self._submit(body))

    def resume(self, request_id: str) -> Generation | Pending:
        return self.run(lambda: self._poll(request_id))

    # ------------------------------------------------------------------ submit

    def _body(self, task: ImageTask) -> dict[str, Any]:
        model = self.model_for(task)
        separator = SIZE_SEPARATORS.get(model, "*")
        body: dict[str, Any] = {
            "model": model,
            "prompt": task.prompt,
            "n": task.n,
            "size": f"{task.width}{separator}{task.height}",
        }
        for column, field_name in FIELD_NAMES.items():
            value = getattr(task, column)
            if value not in (None, ""):
                body[field_name] = value
        webhook = self.config.options.get("webhook_url")
        if webhook:
            # One POST on the terminal state; a hint only (no documented signature), the poll stays the truth.
            body["webhook_url"] = webhook
        body.update({k: v for k, v in task.params.items() if k not in RESERVED_PARAMS})
        return body

    def _submit(self, body: dict[str, Any]) -> Generation | Pending:
        response = send(
            self.http,
            "POST",
            self.base_url + SUBMIT_PATH,
            what="the submit",
            json=body,
            headers=self._auth_headers(),
        )
        payload = json_object(response)
        data = _terminal_data(response, payload)
        if data is None:
            if not response.is_success or _body_code(payload) not in (None, 200):
                raise _http_error(response, payload, submit=True)
            data = payload.get("data")
        prediction_id = str(data.get("id") or "") if isinstance(data, dict) else ""
        if not isinstance(data, dict) or not prediction_id:
            # Accepted by its status, yet nothing names the prediction: it may be running (and charged),
            # and cannot be read. Never resent: the row fails answer_lost, counted.
            raise ProviderError(
                "bad_response",
                f"Atlas Cloud answered the submit with HTTP {response.status_code} but no prediction id",
                action=Action.RETRY,
                status=response.status_code,
                request_id=_request_id(response, payload),
                maybe_accepted=True,
            )
        try:
            return self._outcome(prediction_id, data, response, payload)
        except ProviderError as exc:
            if not exc.retryable:
                raise
            # The prediction exists (a model in sync mode answered it finished) but reading its result
            # failed for now (an output download, an answer without outputs): it is read again by polls,
            # never submitted again.
            return Pending(prediction_id, str(data.get("status") or "completed"))

    # ------------------------------------------------------------------ poll

    def _poll(self, prediction_id: str) -> Generation | Pending:
        url = self.base_url + PREDICTION_PATH.format(id=quote(prediction_id, safe=""))
        try:
            response = send(self.http, "GET", url, what="the poll", headers=self._auth_headers())
        except ProviderError as exc:
            # A read has no side effect: nothing was "maybe accepted", the caller just polls again later.
            raise ProviderError(
                exc.kind, f"reading prediction {prediction_id}: {exc.message}", action=Action.RETRY
            ) from exc
        payload = json_object(response)
        data = _terminal_data(response, payload)
        if data is None:
            if not response.is_success or _body_code(payload) not in (None, 200):
                raise _http_error(response, payload, submit=False, prediction_id=prediction_id)
            data = payload.get("data")
        if not isinstance(data, dict):
            raise ProviderError(
                "bad_response",
                f"Atlas Cloud answered HTTP {response.status_code} for prediction {prediction_id} "
                "without its data",
                action=Action.RETRY,
                status=response.status_code,
                request_id=_request_id(response, payload),
            )
        return self._outcome(prediction_id, data, response, payload)

    # ------------------------------------------------------------------ shared

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key()}"}

    def _outcome(
        self, prediction_id: str, data: dict[str, Any], response: httpx.Response, payload: dict[str, Any]
    ) -> Generation | Pending:
        status = str(data.get("status") or "").strip().lower()
        if status in FAILED:
            raise _failed(prediction_id, status, data, response.status_code)
        if status not in DONE:
            return Pending(prediction_id, status or "processing")
        outputs = _outputs(data)
        if not outputs:
            flags = data.get("has_nsfw_contents")
            flagged = any(flags) if isinstance(flags, list) else bool(flags)
            if flagged:
                raise ProviderError(
                    "moderation",
                    f"Atlas Cloud prediction {prediction_id}: the image was blocked by the safety checker "
                    "(finished with no output and has_nsfw_contents set)",
                    action=Action.FAIL_ROW,
                    status=response.status_code,
                    request_id=prediction_id,
                )
            raise ProviderError(
                "bad_response",
                f"Atlas Cloud prediction {prediction_id} is {status} but lists no output",
                action=Action.RETRY,
                status=response.status_code,
                request_id=_request_id(response, payload),
            )
        # Output URLs expire (some within a day): fetch every one now. The prediction is paid: a download
        # that fails for now is retried by reading the prediction again (RETRY), one that cannot succeed
        # (an expired URL, not an image) fails the row with its price - never a second submit.
        cost = _price(data.get("price"))
        images = paid_images(
            lambda: [self._image(output) for output in outputs], prediction_id, cost, can_read_again=True
        )
        return Generation(images, request_id=prediction_id, cost=cost)

    def _image(self, output: str) -> GeneratedImage:
        if output.startswith(("http://", "https://")):
            return download(self.http, output)
        # enable_base64_output (settable through params) answers base64 or a data: URI instead of a URL.
        return decode_b64(output.split(",", 1)[1] if output.startswith("data:") else output)


# ---------------------------------------------------------------------- answer reading


def _body_code(payload: dict[str, Any]) -> int | None:
    code = payload.get("code")
    return code if isinstance(code, int) and not isinstance(code, bool) else None


def _terminal_data(response: httpx.Response, payload: dict[str, Any]) -> dict[str, Any] | None:
    """The prediction in a 5xx answer that carries a terminal status: the vendor's client notes a failed
    prediction can come back that way, and it is the task's result, not an outage."""
    data = payload.get("data")
    if response.status_code >= 500 and isinstance(data, dict):
        status = str(data.get("status") or "").strip().lower()
        if status in FAILED or status in DONE:
            return data
    return None


def _request_id(response: httpx.Response, payload: dict[str, Any]) -> str | None:
    value = response.headers.get("X-Request-ID") or payload.get("request_id")
    return str(value) if value else None


def _error_text(error: Any) -> str:
    """The API sends `error` as a string on some models and an object on others."""
    if error is None:
        return ""
    if isinstance(error, str):
        return error.strip()
    if isinstance(error, dict):
        for key in ("message", "msg", "error", "detail", "reason"):
            value = error.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
    return str(error)


def _outputs(data: dict[str, Any]) -> list[str]:
    raw = data.get("outputs")
    if raw in (None, "", []):
        raw = data.get("output")
    items = raw if isinstance(raw, list) else [raw] if raw else []
    found: list[str] = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("url")
        if isinstance(item, str) and item.strip():
            found.append(item.strip())
    return found


def _price(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _failed(prediction_id: str, status: str, data: dict[str, Any], http_status: int) -> ProviderError:
    text = _error_text(data.get("error")) or "no reason given"
    code = data.get("error_code")
    if str(code).strip() == str(MODERATION_ERROR_CODE):
        return ProviderError(
            "moderation",
            f"Atlas Cloud prediction {prediction_id}: the input was rejected by content moderation "
            f"(error_code {MODERATION_ERROR_CODE}: {text})",
            action=Action.FAIL_ROW,
            status=http_status,
            request_id=prediction_id,
        )
    coded = f"error_code {code}: " if code not in (None, "") else ""
    return ProviderError(
        "refused",
        f"Atlas Cloud prediction {prediction_id} ended {status} ({coded}{text})",
        action=Action.FAIL_ROW,
        status=http_status,
        request_id=prediction_id,
    )


def _http_error(
    response: httpx.Response, payload: dict[str, Any], *, submit: bool, prediction_id: str = ""
) -> ProviderError:
    """An error answer `{"code", "msg", "request_id", "data": null}`, classified (providers.md sections 1, 5).
    An HTTP 2xx whose body code is an error is read as that code [I]."""
    status = response.status_code
    code = status if not response.is_success else (_body_code(payload) or status)
    message = _error_text(payload.get("msg") or payload.get("message") or payload.get("error"))
    what = "the submit" if submit else f"prediction {prediction_id}"
    text = f"Atlas Cloud answered HTTP {code} for {what}: {message or response.reason_phrase or 'no message'}"
    request_id = _request_id(response, payload)

    def error(kind: str, action: Action, note: str = "", maybe_accepted: bool = False) -> ProviderError:
        return ProviderError(
            kind,
            text + note,
            action=action,
            status=code,
            request_id=request_id,
            maybe_accepted=maybe_accepted,
        )

    if code == 401:
        return error("auth", Action.REAUTH, " (the API key was refused)")
    if code == 402:
        return error("quota", Action.STOP_JOB, " (insufficient balance: top up the Atlas Cloud account)")
    if code == 403:
        return error("not_permitted", Action.STOP_JOB, " (the account is not permitted to do this)")
    if code == 451:
        return error("not_permitted", Action.STOP_JOB, " (the service is blocked in this region)")
    if code == 404:
        return error("refused", Action.FAIL_ROW, " (model not found)" if submit else " (no such prediction)")
    if code == 429:
        return error("rate_limited", Action.RETRY)
    if code == 408 or code >= 500:
        # A gateway timeout may come after the backend accepted the prediction: never resend it blindly.
        return error("unavailable", Action.RETRY, maybe_accepted=submit and code == 504)
    if 400 <= code < 500:
        return error("refused", Action.FAIL_ROW)
    return error("bad_response", Action.RETRY)
