"""QianfanProvider against QianfanEmulator over loopback HTTP: images, errors as actions, split-time checks."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from imagepipe.contract import ImageTask
from imagepipe.providers.base import Action, Keys, ProviderConfig, ProviderError
from imagepipe.providers.qianfan import FLUX, IRAG, QianfanProvider
from imagepipe_cli.emulators.base import EmulatorConfig, parse_fault
from imagepipe_cli.emulators.qianfan import QianfanEmulator

KEY_NAME = "QIANFAN_API_KEY"


def task(**fields: Any) -> ImageTask:
    values: dict[str, Any] = {
        "job_id": "job",
        "row_id": "row-1",
        "row_number": 1,
        "provider": "qianfan",
        "prompt": "a red fox in snow",
        "width": 512,
        "height": 512,
    }
    return ImageTask(**{**values, **fields})


def sizes(generation: Any) -> list[tuple[int, int]]:
    return [Image.open(io.BytesIO(image.data)).size for image in generation.images]


@pytest.fixture
def make_emulator() -> Iterator[Callable[..., QianfanEmulator]]:
    started: list[QianfanEmulator] = []

    def make(*faults: str, **config: Any) -> QianfanEmulator:
        parsed = tuple(parse_fault(f, QianfanEmulator.FAULTS) for f in faults)
        emulator = QianfanEmulator(EmulatorConfig(faults=parsed, **config)).start()
        started.append(emulator)
        return emulator

    yield make
    for emulator in started:
        emulator.stop()


@pytest.fixture
def make_provider() -> Iterator[Callable[..., QianfanProvider]]:
    clients: list[httpx.Client] = []

    def make(emulator: QianfanEmulator, *, model: str | None = None) -> QianfanProvider:
        http = httpx.Client(timeout=10.0)
        clients.append(http)
        return QianfanProvider(
            ProviderConfig(emulator.base_url, Keys.fixed(dict(emulator.keys)), http, model=model)
        )

    yield make
    for http in clients:
        http.close()


def failure(provider: QianfanProvider, row: ImageTask) -> ProviderError:
    with pytest.raises(ProviderError) as raised:
        provider.start(row)
    return raised.value


# --------------------------------------------------------------------------- success


def test_one_image_is_fetched_from_its_url_at_once(make_emulator, make_provider):
    # Given the Qianfan emulator
    emulator = make_emulator()
    provider = make_provider(emulator)

    # When one 768x512 image is asked for
    generation = provider.start(task(width=768, height=512))

    # Then it is a PNG of that size, downloaded from the answer's URL, with Qianfan's answer id and no price
    assert [image.extension for image in generation.images] == ["png"]
    assert sizes(generation) == [(768, 512)]
    assert generation.request_id.startswith("as-")
    assert generation.cost is None
    assert emulator.stats()["downloads"] == 1
    assert emulator.paid_for("a red fox in snow") == 1


def test_flux_gets_seed_steps_and_guidance_and_irag_gets_neither(make_emulator, make_provider):
    # Given the emulator
    emulator = make_emulator()
    provider = make_provider(emulator)

    # When a flux row with seed/steps/guidance and a plain irag row are sent
    provider.start(task(model=FLUX, seed=7, steps=4, guidance=3.5))
    flux_body = emulator.last_body
    provider.start(task(model=IRAG))
    irag_body = emulator.last_body

    # Then flux's request carries them; irag's carries only the documented fields
    assert flux_body == {
        "model": FLUX,
        "prompt": "a red fox in snow",
        "n": 1,
        "size": "512x512",
        "seed": 7,
        "steps": 4,
        "guidance": 3.5,
    }
    assert irag_body == {"model": IRAG, "prompt": "a red fox in snow", "n": 1, "size": "512x512"}


def test_params_are_merged_last_into_the_request(make_emulator, make_provider):
    # Given a row whose params set an extra field and override the size column
    emulator = make_emulator()
    provider = make_provider(emulator)

    # When it is sent
    generation = provider.start(task(params={"size": "640x512", "style": "watercolour"}))

    # Then the API saw both, and the params' size won
    assert emulator.last_body["style"] == "watercolour"
    assert sizes(generation) == [(640, 512)]


def test_the_stack_model_is_used_when_the_row_names_none(make_emulator, make_provider):
    # Given a stack configured for flux
    emulator = make_emulator()
    provider = make_provider(emulator, model=FLUX)

    # When a row without a model but with a seed is sent
    provider.start(task(seed=42))

    # Then it ran on flux, seed included
    assert emulator.last_body["model"] == FLUX
    assert emulator.last_body["seed"] == 42


def test_a_row_the_real_model_cannot_serve_fails_before_any_call(make_emulator, make_provider):
    # Given a stack on irag and a row that only flux could serve (the split-time check assumed flux)
    emulator = make_emulator()
    provider = make_provider(emulator, model=IRAG)
    row = task(prompt="p" * 300)

    # When it is sent
    error = failure(provider, row)

    # Then the row fails with the reason, and nothing was sent
    assert (error.action, error.kind) == (Action.FAIL_ROW, "refused")
    assert "220" in error.message
    assert emulator.stats().get("requests", 0) == 0


# --------------------------------------------------------------------------- errors


def test_a_moderation_refusal_fails_the_row_unpaid(make_emulator, make_provider):
    # Given an emulator that refuses prompts with "forbidden"
    emulator = make_emulator("refuse=forbidden")
    provider = make_provider(emulator)

    # When such a row is sent
    error = failure(provider, task(prompt="a forbidden scene"))

    # Then the row fails for moderation with Qianfan's code, status and answer id, and nothing was paid
    assert (error.action, error.kind, error.status) == (Action.FAIL_ROW, "moderation", 400)
    assert "invalid_image_genration_prompt" in error.message
    assert error.request_id.startswith("as-")
    assert emulator.paid_for("a forbidden scene") == 0


@pytest.mark.parametrize(
    ("fault", "kind", "status", "then_succeeds"),
    [
        ("fail=boom", "unavailable", 500, False),
        ("flaky=boom:1", "unavailable", 503, True),
        ("rate-limit=boom:1", "rate_limited", 429, True),
        ("error-rate=1", "unavailable", 500, False),
        ("malformed=boom", "bad_response", 200, False),
    ],
    ids=["500", "503", "429", "random-500", "malformed"],
)
def test_passing_errors_are_retried(make_emulator, make_provider, fault, kind, status, then_succeeds):
    # Given an emulator with a passing fault for "boom"
    emulator = make_emulator(fault)
    provider = make_provider(emulator)
    row = task(prompt="boom town")

    # When the row is sent
    error = failure(provider, row)

    # Then the caller is told to retry, and nothing was paid
    assert (error.action, error.kind, error.status) == (Action.RETRY, kind, status)
    assert f"HTTP {status}" in error.message
    assert emulator.paid_for("boom town") == 0
    # And a fault that passes lets the retry through, paid once
    if then_succeeds:
        assert sizes(provider.start(row)) == [(512, 512)]
        assert emulator.paid_for("boom town") == 1


def test_an_expired_image_url_fails_the_paid_row_with_the_answer_id(make_emulator, make_provider):
    # Given an emulator whose output URLs expire at once
    emulator = make_emulator(url_ttl_s=0)
    provider = make_provider(emulator)

    # When a row is sent
    error = failure(provider, task())

    # Then the paid answer is not asked for again: the row fails, naming Qianfan's answer
    assert (error.action, error.kind, error.status) == (Action.FAIL_ROW, "download_failed", 403)
    assert error.request_id.startswith("as-")
    assert (emulator.stats()["paid"], emulator.stats()["downloads"]) == (1, 1)


def test_a_model_qianfan_does_not_have_fails_the_row(make_emulator, make_provider):
    # Given a row naming a model the account has not deployed (the check lets unknown models through)
    emulator = make_emulator()
    provider = make_provider(emulator)
    row = task(model="my-own-service")
    assert QianfanProvider.check(row) is None

    # When it is sent
    error = failure(provider, row)

    # Then the row fails with the API's reason, unpaid
    assert (error.action, error.kind, error.status) == (Action.FAIL_ROW, "refused", 400)
    assert "my-own-service" in error.message
    assert emulator.stats().get("paid", 0) == 0


# --------------------------------------------------------------------------- split-time check


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"width": 504}, "width"),
        ({"height": 256}, "height"),
        ({"n": 5}, "at most 4"),
        ({"prompt": "p" * 221}, "220"),
        ({"model": FLUX, "prompt": "p" * 513}, "512"),
        ({"seed": 1}, "seed"),
        ({"steps": 4}, "steps"),
        ({"guidance": 2.0}, "guidance"),
        ({"model": FLUX, "negative_prompt": "blur"}, "negative_prompt"),
        ({"model": "my-own-service", "seed": 1}, "seed"),
    ],
)
def test_check_rejects_what_qianfan_cannot_serve(fields, reason):
    # Given a row Qianfan cannot serve
    row = task(**fields)

    # When it is checked at split time
    found = QianfanProvider.check(row)

    # Then it is rejected with a reason naming the problem
    assert found is not None
    assert reason in found


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"width": 2048, "height": 2048, "n": 4},
        {"prompt": "p" * 220},
        {"model": FLUX, "prompt": "p" * 512, "seed": 3, "steps": 4, "guidance": 1.5},
        {"model": "my-own-service", "prompt": "p" * 512},
        {"params": {"style": "ink"}},
    ],
)
def test_check_accepts_what_qianfan_serves(fields):
    assert QianfanProvider.check(task(**fields)) is None


@pytest.mark.parametrize(
    "fields",
    [
        {"width": 512, "height": 2048},
        {"width": 504},
        {"n": 4},
        {"n": 5},
        {"prompt": "p" * 220},
        {"prompt": "p" * 221},
        {"model": FLUX, "prompt": "p" * 512, "seed": 9, "steps": 2, "guidance": 0.5},
        {"model": FLUX, "prompt": "p" * 513},
        {"seed": 9},
    ],
)
def test_the_emulator_refuses_a_shape_exactly_when_the_check_does(make_emulator, make_provider, fields):
    # Given a row at one of the limits, and the body the provider would send for it
    emulator = make_emulator()
    provider = make_provider(emulator)
    row = task(**fields)
    body = provider.request_body(row, row.model or IRAG)

    # When the check judges it and the emulator is sent it directly
    reason = QianfanProvider.check(row)
    answer = provider.http.post(
        f"{emulator.base_url}/v2/images/generations",
        json=body,
        headers={"Authorization": f"Bearer {emulator.keys[KEY_NAME]}"},
    )

    # Then they agree: a checked row is never refused for its shape
    assert (reason is None, answer.status_code) in ((True, 200), (False, 400)), (reason, answer.text)
