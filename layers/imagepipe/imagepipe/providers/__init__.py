"""The image APIs imagepipe can call, by name, each behind the one interface in `base`."""

from __future__ import annotations

from imagepipe.providers.base import (
    Action,
    GeneratedImage,
    Generation,
    Keys,
    Limits,
    Pending,
    Provider,
    ProviderConfig,
    ProviderError,
    deadline,
    time_left,
)

__all__ = [
    "PROVIDERS",
    "Action",
    "GeneratedImage",
    "Generation",
    "Keys",
    "Limits",
    "Pending",
    "Provider",
    "ProviderConfig",
    "ProviderError",
    "deadline",
    "provider_class",
    "time_left",
]


def _registry() -> dict[str, type[Provider]]:
    from imagepipe.providers.atlascloud import AtlasCloudProvider
    from imagepipe.providers.baidu_oauth import BaiduOAuthProvider
    from imagepipe.providers.openai import OpenAIProvider
    from imagepipe.providers.qianfan import QianfanProvider

    return {p.name: p for p in (AtlasCloudProvider, QianfanProvider, OpenAIProvider, BaiduOAuthProvider)}


PROVIDERS: dict[str, type[Provider]] = {}


def provider_class(name: str) -> type[Provider]:
    if not PROVIDERS:
        PROVIDERS.update(_registry())
    try:
        return PROVIDERS[name]
    except KeyError:
        raise KeyError(f"unknown provider {name!r}: use one of {', '.join(sorted(PROVIDERS))}") from None
