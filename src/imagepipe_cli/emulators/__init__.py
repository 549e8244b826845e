"""Loopback HTTP emulators of the image APIs, one module per API, for the local runtime and the tests.
They are test and demo infrastructure: the shared package never imports them."""

from __future__ import annotations

from imagepipe_cli.emulators.base import BaseEmulator, EmulatorConfig, Fault


def emulator_class(provider: str) -> type[BaseEmulator]:
    """The emulator of a provider, by the provider's name."""
    from imagepipe_cli.emulators.atlascloud import AtlasCloudEmulator
    from imagepipe_cli.emulators.baidu_oauth import BaiduOAuthEmulator
    from imagepipe_cli.emulators.comfyui import ComfyUIEmulator
    from imagepipe_cli.emulators.openai import OpenAIEmulator
    from imagepipe_cli.emulators.qianfan import QianfanEmulator

    classes = {
        c.name: c
        for c in (AtlasCloudEmulator, QianfanEmulator, OpenAIEmulator, BaiduOAuthEmulator, ComfyUIEmulator)
    }
    try:
        return classes[provider]
    except KeyError:
        raise ValueError(f"no emulator for provider {provider!r}: use one of {', '.join(classes)}") from None


__all__ = ["BaseEmulator", "EmulatorConfig", "Fault", "emulator_class"]
