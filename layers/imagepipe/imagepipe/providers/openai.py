"""OpenAI Images and any OpenAI-compatible endpoint (synchronous): one POST answers base64 images (or URLs)."""

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

GENERATIONS_PATH = "/v1/images/generations"
GPT_IMAGE_PREFIX = "gpt-image"

# providers.md section 3: gpt-image models take three sizes (or "auto", which a user may set in params),
# 1..10 images, prompts up to 32000 characters, and none of seed/steps/guidance/negative_prompt.
GPT_IMAGE_LIMITS = Limits(
    min_side=1024,
    max_side=1536,
    side_step=512,
    max_n=10,
    max_prompt_chars=32000,
    sizes=frozenset({(1024, 1024), (1536, 1024), (1024, 1536)}),
)
# Another model behind an OpenAI-compatible endpoint: its limits are [NF], so only the task's own bounds
# apply (the endpoint refuses what it cannot do, unpaid); the request body has no field for
# seed/steps/guidance/negative_prompt, so those columns are still rejected (set them in params instead).
COMPATIBLE_LIMITS = Limits(min_side=64, max_side=2048, side_step=8, max_n=10, max_prompt_chars=4000)

MODERATION_CODES = frozenset({"moderation_blocked", "content_policy_violation"})
QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "billing_not_active"})
MAX_MESSAGE_CHARS = 300


class OpenAIProvider(Provider):
    name: ClassVar[str] = "openai"
    default_model: ClassVar[str] = "gpt-image-1"
    asynchronous: ClassVar[bool] = False
    key_names: ClassVar[tuple[str, ...]] = ("OPENAI_API_KEY",)
    public_url: ClassVar[str] = "https://api.openai.com"
    limits: ClassVar[Limits] = GPT_IMAGE_LIMITS

    @classmethod
    def limits_for(cls, model: str) -> Limits:
        return GPT_IMAGE_LIMITS if model.startswith(GPT_IMAGE_PREFIX) else COMPATIBLE_LIMITS

    def request_body(self, task: ImageTask, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "prompt": task.prompt,
            "n": task.n,
            "size": f"{task.width}x{task.height}",
        }
        body.update(task.params)  # last: output_format, quality, background... per row
        return body

    def start(self, task: ImageTask) -> Generation:
        return self.run(lambda: self._generate(task))

    def _generate(self, task: ImageTask) -> Generation:
        model = self.checked_model(task)
        key = self.api_key()
        headers = {"Authorization": f"Bearer {key}"}
        # Optional: which organisation/project a multi-org key bills to.
        if self.config.options.get("organization"):
            headers["OpenAI-Organization"] = self.config.options["organization"]
        if self.config.options.get("project"):
            headers["OpenAI-Project"] = self.config.options["project"]
        response = send(
            self.http,
            "POST",
            self.base_url + GENERATIONS_PATH,
            what="the image request",
            json=self.request_body(task, model),
            headers=headers,
        )
        request_id = response.headers.get("x-request-id") or None
        payload = json_object(response)
        if not response.is_success:
            raise self._error(response, payload, request_id, key)
        images = images_of(self.name, payload.get("data"), self._image, response, request_id)
        # OpenAI reports token usage, not a price: turning tokens into money needs a price list that
        # changes, so the cost is left unknown.
        return Generation(images=images, request_id=request_id, cost=None)

    def _image(self, item: Any) -> GeneratedImage:
        if isinstance(item, dict) and isinstance(item.get("b64_json"), str) and item["b64_json"]:
            return decode_b64(item["b64_json"])
        if isinstance(item, dict) and isinstance(item.get("url"), str) and item["url"]:
            return download(self.http, item["url"])  # compatible endpoints' URLs expire: fetch now
        raise ProviderError(
            "bad_response",
            f"{self.name} sent an image entry with neither b64_json nor url",
            action=Action.RETRY,
        )

    def _error(
        self, response: httpx.Response, payload: dict[str, Any], request_id: str | None, key: str
    ) -> ProviderError:
        status = response.status_code
        error = payload.get("error") if isinstance(payload.get("error"), dict) else {}
        code = str(error.get("code") or "")
        error_type = str(error.get("type") or "")
        text = str(error.get("message") or response.reason_phrase or "no message")
        text = text.replace(key, "***")[:MAX_MESSAGE_CHARS]  # never echo the key into results or logs
        message = f"{self.name} answered HTTP {status}" + (f" {code}" if code else "") + f": {text}"

        def fail(kind: str, action: Action) -> ProviderError:
            return ProviderError(kind, message, action=action, status=status, request_id=request_id)

        if code in MODERATION_CODES or error_type in MODERATION_CODES:
            return fail("moderation", Action.FAIL_ROW)
        # insufficient_quota comes as a 429 too: retrying it only burns the job's attempts.
        if status != 401 and (code in QUOTA_CODES or error_type in QUOTA_CODES):
            return fail("quota", Action.STOP_JOB)
        return fail(*status_kind(status))
