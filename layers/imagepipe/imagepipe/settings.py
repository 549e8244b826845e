"""Each function's settings, read from its environment once per invocation and validated; the API keys
come from the stack's secret (cached by Powertools), never from the environment."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any, Self

from aws_lambda_powertools.utilities import parameters
from pydantic import BaseModel, ConfigDict, Field, field_validator

from imagepipe import aws
from imagepipe.contract import DEFAULT_PROVIDER, PROVIDER_NAMES
from imagepipe.jobstate import DEFAULT_RETENTION_DAYS
from imagepipe.providers import Action, Keys, ProviderError
from imagepipe.ratelimit import parse_rate_limits

SECRET_MAX_AGE_S = 300


class _EnvSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    # JobRetentionDays: how long job records are kept, like the job's files (imagepipe.jobstate).
    job_retention_days: int = Field(DEFAULT_RETENTION_DAYS, ge=0)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        environ = os.environ if environ is None else environ
        return cls.model_validate({name.lower(): value for name, value in environ.items() if value != ""})


class _Common(_EnvSettings):
    output_bucket: str
    tasks_queue_url: str
    provider_keys_secret: str
    default_provider: str = Field(DEFAULT_PROVIDER, pattern="^(" + "|".join(PROVIDER_NAMES) + ")$")
    default_model: str | None = None

    def keys(self) -> Keys:
        """The keys, read from the secret when first asked for; its client is made now, on this thread."""
        _secrets()
        return Keys(lambda force: read_keys(self.provider_keys_secret, force=force))


class SplitterSettings(_Common):
    input_bucket: str | None = None
    jobs_table: str
    finisher_queue_url: str
    default_max_cost: float | None = Field(None, ge=0)
    # Where a split that runs low on time hands the rest of the file to a later invocation of itself.
    split_continuation_queue_url: str | None = None
    # LocalTasksQueue: "" when the stack is deployed with HybridMode=disabled (local rows are rejected).
    local_tasks_queue_url: str = ""


class GeneratorSettings(_Common):
    jobs_table: str
    finisher_queue_url: str
    atlascloud_base_url: str = "https://api.atlascloud.ai"
    qianfan_base_url: str = "https://qianfan.baidubce.com"
    openai_base_url: str = "https://api.openai.com"
    baidu_base_url: str = "https://aip.baidubce.com"
    baidu_text2image_path: str = "/rpc/2.0/ai_custom/v1/wenxinworkshop/text2image/{model}"
    price_per_image: str = ""
    # One HTTP call's limit (each call is also cut to the time the invocation has left).
    http_timeout_seconds: float = Field(60.0, gt=0)
    # PollBudgetSeconds: the longest an invocation waits (billed) for a prediction expected within it.
    poll_budget_seconds: float = Field(2.0, ge=0)
    # Between reads of a prediction still running inside one invocation (lab and tests only).
    poll_interval_seconds: float = Field(2.0, gt=0)
    # PollDelaySeconds: the first wait on a model not learnt yet (polltiming.py), and after a failed poll.
    poll_delay_seconds: int = Field(8, ge=0, le=900)
    max_generation_seconds: float = Field(1800.0, gt=0)
    # The function's Timeout (GeneratorTimeoutSeconds).
    generator_timeout_seconds: float = Field(300.0, gt=0)
    # The retry policy (template parameters TaskMaxAttempts, TaskRetryWindowSeconds, RetryBaseDelaySeconds,
    # RetryMaxDelaySeconds): transient failures are retried on the generator's own backoff schedule.
    task_max_attempts: int = Field(8, ge=1)
    task_retry_window_seconds: float = Field(3600.0, ge=0)
    retry_base_delay_seconds: float = Field(2.0, ge=0)
    retry_max_delay_seconds: float = Field(900.0, ge=0, le=900)
    # Only the guard against crashes and poison messages (the queue's maxReceiveCount).
    task_max_receive_count: int = Field(5, ge=1)
    # Rate governance (SharedRateLimiter, ProviderRateLimits): paid submits paced on a shared schedule.
    shared_rate_limiter: bool = False
    provider_rate_limits: str = ""
    # Lab only (not set by the template): a shorter claim lifetime for runs that crash on purpose.
    claim_stale_override_seconds: float | None = Field(None, gt=0, alias="claim_stale_seconds")

    @field_validator("provider_rate_limits")
    @classmethod
    def _check_rate_limits(cls, value: str) -> str:
        parse_rate_limits(value)  # a bad entry is refused here, saying which and why
        return value

    def rate_limits(self) -> dict[str, float]:
        """PROVIDER_RATE_LIMITS as {"provider" or "provider/model": requests per second}."""
        return parse_rate_limits(self.provider_rate_limits)

    @property
    def claim_stale_seconds(self) -> float:
        """A claim older than this belongs to an invocation that is surely gone: Lambda has killed it
        (its Timeout) and a minute more for clocks and the last write."""
        if self.claim_stale_override_seconds is not None:
            return self.claim_stale_override_seconds
        return self.generator_timeout_seconds + 60.0

    def base_url(self, provider: str) -> str:
        return getattr(self, f"{provider.replace('-oauth', '')}_base_url")

    def prices(self) -> dict[str, float]:
        """PRICE_PER_IMAGE as {provider: USD}, e.g. "atlascloud=0.003,openai=0.04"."""
        prices: dict[str, float] = {}
        for part in self.price_per_image.split(","):
            name, _, value = part.partition("=")
            try:
                prices[name.strip()] = float(value)
            except ValueError:
                continue
        return prices


class DeadLetterSettings(_EnvSettings):
    jobs_table: str
    finisher_queue_url: str
    # A dead-lettered task whose prediction is on record goes back to TasksQueue to be resumed (after
    # POLL_DELAY_SECONDS), while it is younger than MAX_GENERATION_SECONDS.
    tasks_queue_url: str
    poll_delay_seconds: int = Field(8, ge=0, le=900)
    max_generation_seconds: float = Field(1800.0, gt=0)
    # A claim younger than the generator's Timeout and a minute may belong to a live invocation.
    generator_timeout_seconds: float = Field(300.0, gt=0)


class LocalOutcomeSettings(_EnvSettings):
    jobs_table: str
    finisher_queue_url: str
    local_tasks_dead_letter_queue_arn: str = ""


class FinisherSettings(_EnvSettings):
    output_bucket: str
    jobs_table: str
    event_bus_name: str = "default"
    event_source: str = "imagepipe"


_SECRETS_LOCK = threading.Lock()


def _secrets() -> parameters.SecretsProvider:
    """Powertools' default Secrets Manager provider (the one parameters.get_secret uses and
    clear_caches clears), made with the stack's botocore retry policy - once: a batch's ten task threads
    asking at once on a cold start would otherwise each make a client (seconds of CPU, billed)."""
    from aws_lambda_powertools.utilities.parameters.base import DEFAULT_PROVIDERS

    with _SECRETS_LOCK:
        provider = DEFAULT_PROVIDERS.get("secrets")
        if provider is None:
            # its client from the default session, as the function's others: a session of its own would
            # parse botocore's endpoint data once more (init time, billed)
            provider = DEFAULT_PROVIDERS["secrets"] = parameters.SecretsProvider(
                boto3_client=aws.client("secretsmanager")
            )
        return provider


def read_keys(secret_name: str, *, force: bool = False) -> dict[str, str]:
    """The keys secret as {KEY_NAME: value}. Powertools caches it for SECRET_MAX_AGE_S across warm
    invocations; `force` re-reads it (after the provider refused a key, which may have been rotated)."""
    try:
        secret: Any = _secrets().get(
            secret_name, transform="json", max_age=SECRET_MAX_AGE_S, force_fetch=force
        )
    except parameters.exceptions.TransformParameterError as exc:
        raise ProviderError(
            "config", f"secret {secret_name!r} is not a JSON object of API keys", action=Action.RETRY
        ) from exc
    except parameters.exceptions.GetParameterError as exc:
        raise ProviderError(
            "config", f"cannot read the API keys from secret {secret_name!r}: {exc}", action=Action.RETRY
        ) from exc
    if not isinstance(secret, dict):
        raise ProviderError(
            "config", f"secret {secret_name!r} is not a JSON object of API keys", action=Action.RETRY
        )
    return {str(k): str(v) for k, v in secret.items() if isinstance(v, (str, int)) and str(v)}
