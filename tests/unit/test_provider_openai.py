"""OpenAIProvider against OpenAIEmulator over loopback HTTP: images, errors as actions, split-time checks."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from imagepipe.contract import ImageTask
from imagepipe.providers.base import Action, Keys, ProviderConfig, ProviderError
from imagepipe.providers.openai import OpenAIProvider
from imagepipe_cli.emulators.base import EmulatorConfig, parse_fault
from imagepipe_cli.emulators.openai import OpenAIEmulator

KEY_NAME = "OPENAI_API_KEY"


def task(**fields: Any) -> ImageTask:
    values: dict[str, Any] = {
        "job_id": "job",
        "row_id": "row-1",
        "row_number": 1,
        "provider": "openai",
        "prompt": "a lighthouse at dusk",
        "width": 1024,
        "height": 1024,
    }
    return ImageTask(**{**values, **fields})


def decoded(generation: Any) -> list[Image.Image]:
    return [Image.open(io.BytesIO(image.data)) for image in generation.images]


@pytest.fixture
def make_emulator() -> Iterator[Callable[..., OpenAIEmulator]]:
    started: list[OpenAIEmulator] = []

    def make(*faults: str, **config: Any) -> OpenAIEmulator:
        parsed = tuple(parse_fault(f, OpenAIEmulator.FAULTS) for f in faults)
        emulator = OpenAIEmulator(EmulatorConfig(faults=parsed, **config)).start()
        started.append(emulator)
        return emulator

    yield make
    for emulator in started:
        emulator.stop()


@pytest.fixture
def make_provider() -> Iterator[Callable[..., OpenAIProvider]]:
    clients: list[httpx.Client] = []

    def make(emulator: OpenAIEmulator, *, model: str | None = None) -> OpenAIProvider:
        http = httpx.Client(timeout=10.0)
        clients.append(http)
        return OpenAIProvider(
            ProviderConfig(emulator.base_url, Keys.fixed(dict(emulator.keys)), http, model=model)
        )

    yield make
    for http in clients:
        http.close()


def failure(provider: OpenAIProvider, row: ImageTask) -> ProviderError:
    with pytest.raises(ProviderError) as raised:
        provider.start(row)
    return raised.value


# --------------------------------------------------------------------------- success


def test_one_image_comes_back_as_a_png_with_the_request_id(make_emulator, make_provider):
    # Given the OpenAI emulator
    emulator = make_emulator()
    provider = make_provider(emulator)

    # When one square image is asked for
    generation = provider.start(task())

    # Then it is a 1024x1024 PNG, named by OpenAI's x-request-id, with no price (OpenAI reports tokens)
    assert [(img.format, img.size) for img in decoded(generation)] == [("PNG", (1024, 1024))]
    assert generation.request_id.startswith("req_")
    assert generation.cost is None
    assert emulator.last_body == {
        "model": "gpt-image-1",
        "prompt": "a lighthouse at dusk",
        "n": 1,
        "size": "1024x1024",
    }
    assert emulator.paid_for("a lighthouse at dusk") == 1


def test_url_answers_are_downloaded_at_once(make_emulator, make_provider):
    # Given an OpenAI-compatible server that answers URLs instead of base64
    emulator = make_emulator("url-only")
    provider = make_provider(emulator)

    # When two images are asked for
    generation = provider.start(task(n=2, width=1024, height=1536))

    # Then both were fetched and are the right size
    assert [img.size for img in decoded(generation)] == [(1024, 1536)] * 2
    assert emulator.stats()["downloads"] == 2


def test_params_set_per_row_reach_the_api(make_emulator, make_provider):
    # Given a row whose params ask for low-quality JPEGs
    emulator = make_emulator()
    provider = make_provider(emulator)

    # When it is sent
    generation = provider.start(task(params={"output_format": "jpeg", "quality": "low"}))

    # Then the API got both fields and the image is a JPEG
    assert emulator.last_body["quality"] == "low"
    assert [(image.extension, image.content_type) for image in generation.images] == [("jpg", "image/jpeg")]
    assert decoded(generation)[0].size == (1024, 1024)


# --------------------------------------------------------------------------- errors


def test_a_moderation_refusal_fails_the_row_unpaid(make_emulator, make_provider):
    # Given an emulator that blocks prompts with "forbidden"
    emulator = make_emulator("refuse=forbidden")
    provider = make_provider(emulator)

    # When such a row is sent
    error = failure(provider, task(prompt="a forbidden scene"))

    # Then the row fails for moderation with the API's code and request id, and nothing was paid
    assert (error.action, error.kind, error.status) == (Action.FAIL_ROW, "moderation", 400)
    assert "moderation_blocked" in error.message
    assert error.request_id.startswith("req_")
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

    # Then the caller is told to retry, the answer is named, and nothing was paid
    assert (error.action, error.kind, error.status) == (Action.RETRY, kind, status)
    assert error.request_id.startswith("req_")
    assert emulator.paid_for("boom town") == 0
    # And a fault that passes lets the retry through, paid once
    if then_succeeds:
        assert [img.size for img in decoded(provider.start(row))] == [(1024, 1024)]
        assert emulator.paid_for("boom town") == 1


def test_insufficient_quota_stops_the_job_and_is_never_retried(make_emulator, make_provider):
    # Given an account out of quota for "broke"
    emulator = make_emulator("stop=broke")
    provider = make_provider(emulator)

    # When such a row is sent
    error = failure(provider, task(prompt="broke again"))

    # Then the job's calls stop after one request, although the answer was a 429
    assert (error.action, error.kind, error.status) == (Action.STOP_JOB, "quota", 429)
    assert "insufficient_quota" in error.message
    assert emulator.stats()["requests"] == 1


def test_an_unknown_model_fails_the_row(make_emulator, make_provider):
    # Given a row naming a gpt-image model the API does not have
    emulator = make_emulator()
    provider = make_provider(emulator)

    # When it is sent
    error = failure(provider, task(model="gpt-image-9"))

    # Then the row fails with the API's model_not_found, unpaid
    assert (error.action, error.kind, error.status) == (Action.FAIL_ROW, "refused", 404)
    assert "model_not_found" in error.message
    assert emulator.stats().get("paid", 0) == 0


def test_a_param_the_api_does_not_take_fails_the_row(make_emulator, make_provider):
    # Given a row whose params carry a field gpt-image does not know
    provider = make_provider(make_emulator())

    # When it is sent
    error = failure(provider, task(params={"style": "vivid"}))

    # Then the row fails with the API's own words
    assert (error.action, error.kind, error.status) == (Action.FAIL_ROW, "refused", 400)
    assert "Unknown parameter: 'style'" in error.message


# --------------------------------------------------------------------------- split-time check


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"width": 512, "height": 512}, "1024x1536"),
        ({"width": 1024, "height": 768}, "only these sizes"),
        ({"width": 1536, "height": 1536}, "only these sizes"),
        ({"width": 2048, "height": 2048}, "only these sizes"),
        ({"seed": 1}, "seed"),
        ({"steps": 4}, "steps"),
        ({"guidance": 2.0}, "guidance"),
        ({"negative_prompt": "blur"}, "negative_prompt"),
        ({"model": "my-sdxl", "seed": 1}, "seed"),
    ],
)
def test_check_rejects_what_openai_cannot_serve(fields, reason):
    # Given a row gpt-image cannot serve
    row = task(**fields)

    # When it is checked at split time
    found = OpenAIProvider.check(row)

    # Then it is rejected with a reason naming the problem
    assert found is not None
    assert reason in found


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"width": 1536, "height": 1024, "n": 10},
        {"model": "gpt-image-1-mini", "width": 1024, "height": 1536},
        {"model": "my-sdxl", "width": 768, "height": 768},  # another model on an OpenAI-compatible server
        {"params": {"quality": "high", "background": "transparent"}},
    ],
)
def test_check_accepts_what_openai_serves(fields):
    assert OpenAIProvider.check(task(**fields)) is None


@pytest.mark.parametrize(
    "fields",
    [
        {"width": 1536, "height": 1024, "n": 10},
        {"width": 1024, "height": 1536},
        {"width": 1024, "height": 768},
        {"width": 1536, "height": 1536},
        {"model": "gpt-image-1.5"},
        {"prompt": "p" * 4000},
    ],
)
def test_the_emulator_refuses_a_shape_exactly_when_the_check_does(make_emulator, make_provider, fields):
    # Given a row at one of the limits, and the body the provider would send for it
    emulator = make_emulator()
    provider = make_provider(emulator)
    row = task(**fields)
    body = provider.request_body(row, row.model or "gpt-image-1")

    # When the check judges it and the emulator is sent it directly
    reason = OpenAIProvider.check(row)
    answer = provider.http.post(
        f"{emulator.base_url}/v1/images/generations",
        json=body,
        headers={"Authorization": f"Bearer {emulator.keys[KEY_NAME]}"},
    )

    # Then they agree: a checked row is never refused for its shape
    assert (reason is None, answer.status_code) in ((True, 200), (False, 400)), (reason, answer.text)
