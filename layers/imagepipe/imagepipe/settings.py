"""Each function's settings, read from its environment once per invocation and validated."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Self

from aws_lambda_powertools.utilities import parameters
from pydantic import BaseModel, ConfigDict, Field

from imagepipe.atlas import Credentials, ImageApiError

SECRET_MAX_AGE_S = 300


class _EnvSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        environ = os.environ if environ is None else environ
        return cls.model_validate({name.lower(): value for name, value in environ.items() if value != ""})


class SplitterSettings(_EnvSettings):
    tasks_queue_url: str
    output_bucket: str


class GeneratorSettings(_EnvSettings):
    output_bucket: str
    atlas_base_url: str
    atlas_token_url: str
    atlas_model: str = "ernie-image-8b"
    atlas_secret_name: str | None = None
    # Local use: keys straight from the environment instead of Secrets Manager.
    atlas_access_key: str | None = None
    atlas_secret_key: str | None = None
    atlas_timeout_seconds: float = Field(120.0, gt=0)
    task_max_receive_count: int = Field(3, ge=1)

    def credentials_provider(self) -> Callable[[], Credentials]:
        if self.atlas_access_key and self.atlas_secret_key:
            fixed = Credentials(self.atlas_access_key, self.atlas_secret_key)
            return lambda: fixed
        if self.atlas_secret_name:
            return lambda: _secret_credentials(self.atlas_secret_name or "")
        raise ValueError("set ATLAS_SECRET_NAME, or both ATLAS_ACCESS_KEY and ATLAS_SECRET_KEY")


def _secret_credentials(name: str) -> Credentials:
    try:
        # Powertools caches the value for SECRET_MAX_AGE_S across warm invocations.
        secret: Any = parameters.get_secret(name, transform="json", max_age=SECRET_MAX_AGE_S)
    except parameters.exceptions.GetParameterError as exc:
        raise ImageApiError(
            "config", f"cannot read the API keys from secret {name!r}: {exc}", retryable=True
        ) from exc
    except parameters.exceptions.TransformParameterError as exc:
        raise ImageApiError(
            "config", f"secret {name!r} is not JSON with access_key and secret_key", retryable=False
        ) from exc
    if not isinstance(secret, dict) or not secret.get("access_key") or not secret.get("secret_key"):
        raise ImageApiError(
            "config", f"secret {name!r} needs both access_key and secret_key", retryable=False
        )
    return Credentials(str(secret["access_key"]), str(secret["secret_key"]))
