"""Baidu Qianfan v2 image generation (synchronous, OpenAI-like): one POST answers image URLs, fetched at once."""

from __future__ import annotations

from typing import Any, ClassVar

import httpx

from imagepipe.contract import ImageTask
from imagepipe.providers.base import (
    Action,
    GeneratedImage,
    Generation,
    Limits,
    Provider,
    ProviderError,
    decode_b64,
    download,
    images_of,
    json_object,
    send,
    status_kind,
)

GENERATIONS_PATH = "/v2/images/generations"
IRAG, FLUX = "irag-1.0", "flux.1-schnell"
FLUX_FIELDS = ("steps", "seed", "guidance")

# providers.md section 2. Sides 512..2048 are documented; "a multiple of 8" is [NF] (a safe guess that
# every diffusion backend takes). seed/steps/guidance are documented for flux.1-schnell only.
MODEL_LIMITS: dict[str, Limits] = {
    IRAG: Limits(min_side=512, max_side=2048, side_step=8, max_n=4, max_prompt_chars=220),
    FLUX: Limits(
        min_side=512, max_side=2048, side_step=8, max_n=4, max_prompt_chars=512, fields=frozenset(FLUX_FIELDS)
    ),
}
# A model this module does not know (the user's own deployed service): the endpoint's documented limits.
# Its prompt limit is [NF]; 512 is the largest any documented model takes. It gets no seed/steps/guidance
# columns (those are documented for flux only): a user who needs them sets them in `params`.
GENERIC_LIMITS = Limits(min_side=512, max_side=2048, side_step=8, max_n=4, max_prompt_chars=512)

MODERATION_CODES = frozenset(
    {
        "invalid_image_genration_prompt",  # sic: the API's own spelling
        "invalid_image_generation_prompt",  # in case Baidu ever fixes the spelling
        "image_url_unsafe",
    }
)
# Qianfan v2's quota/arrears answer is [NF]: any error code that reads like one stops the job's calls.
QUOTA_WORDS = ("quota", "arrear", "balance", "overdue", "billing", "payment")
MAX_MESSAGE_CHARS = 300


class QianfanProvider(Provider):
    name: ClassVar[str] = "qianfan"
    default_model: ClassVar[str] = IRAG
    asynchronous: ClassVar[bool] = False
    key_names: ClassVar[tuple[str, ...]] = ("QIANFAN_API_KEY",)
    public_url: ClassVar[str] = "https://qianfan.baidubce.com"
    limits: ClassVar[Limits] = GENERIC_LIMITS

    @classmethod
    def limits_for(cls, model: str) -> Limits:
        return MODEL_LIMITS.get(model, GENERIC_LIMITS)

    def request_body(self, task: ImageTask, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "prompt": task.prompt,
            "n": task.n,
            "size": f"{task.width}x{task.height}",
        }
        # Set only on rows the check let through for a model that takes them (flux.1-schnell).
        body.update({k: getattr(task, k) for k in FLUX_FIELDS if getattr(task, k) is not None})
        body.update(task.params)  # last: a user may set any API field the columns do not cover
        return body

    def start(self, task: ImageTask) -> Generation:
        return self.run(lambda: self._generate(task))

    def _generate(self, task: ImageTask) -> Generation:
        model = self.checked_model(task)
        key = self.api_key()
        headers = {"Authorization": f"Bearer {key}"}
        if self.config.options.get("appid"):
            headers["appid"] = self.config.options["appid"]
        response = send(
            self.http,
            "POST",
            self.base_url + GENERATIONS_PATH,
            what="the image request",
            json=self.request_body(task, model),
            headers=headers,
        )
        payload = json_object(response)
        request_id = payload.get("id") if isinstance(payload.get("id"), str) else None
        if not response.is_success:
            raise self._error(response, payload, request_id, key)
        images = images_of(self.name, payload.get("data"), self._image, response, request_id)
        return Generation(images=images, request_id=request_id, cost=None)  # Qianfan reports no price

    def _image(self, item: Any) -> GeneratedImage:
        if isinstance(item, dict) and isinstance(item.get("url"), str) and item["url"]:
            return download(self.http, item["url"])  # the URLs expire: fetch now
        if isinstance(item, dict) and isinstance(item.get("b64_json"), str):
            return decode_b64(item["b64_json"])  # not documented for v2, accepted in case it is sent
        raise ProviderError(
            "bad_response", f"{self.name} sent an image entry without a url", action=Action.RETRY
        )

    def _error(
        self, response: httpx.Response, payload: dict[str, Any], request_id: str | None, key: str
    ) -> ProviderError:
        status = response.status_code
        error = payload.get("error") if isinstance(payload.get("error"), dict) else {}
        code = str(error.get("code") or "")
        text = str(error.get("message") or response.reason_phrase or "no message")
        text = text.replace(key, "***")[:MAX_MESSAGE_CHARS]  # never echo the key into results or logs
        message = f"{self.name} answered HTTP {status}" + (f" {code}" if code else "") + f": {text}"

        def fail(kind: str, action: Action) -> ProviderError:
            return ProviderError(kind, message, action=action, status=status, request_id=request_id)

        lowered = code.lower()
        if code in MODERATION_CODES:
            return fail("moderation", Action.FAIL_ROW)
        # A code that reads like quota stops the job, unless the status is 401 or a plain rate limit.
        rate_limited = status == 429 and "rate_limit" in lowered
        if status != 401 and not rate_limited and any(word in lowered for word in QUOTA_WORDS):
            return fail("quota", Action.STOP_JOB)
        return fail(*status_kind(status))
