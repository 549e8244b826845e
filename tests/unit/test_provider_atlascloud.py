"""The Atlas Cloud provider against its loopback emulator, and against answers of the API's shape the
emulator does not make, served by httpx.MockTransport."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from imagepipe.contract import ImageTask
from imagepipe.providers.atlascloud import AtlasCloudProvider
from imagepipe.providers.base import Action, Generation, Keys, Pending, ProviderConfig, ProviderError
from imagepipe_cli.emulators.atlascloud import AtlasCloudEmulator
from imagepipe_cli.emulators.base import EmulatorConfig, parse_fault, render_png

KEY = "ATLASCLOUD_API_KEY"
ERNIE = "baidu/ERNIE-Image-Turbo/text-to-image"


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as client:
        yield client


@pytest.fixture
def emulator_factory() -> Iterator[Callable[..., AtlasCloudEmulator]]:
    started: list[AtlasCloudEmulator] = []

    def start(*faults: str, **config: Any) -> AtlasCloudEmulator:
        parsed = tuple(parse_fault(f, AtlasCloudEmulator.FAULTS) for f in faults)
        emulator = AtlasCloudEmulator(EmulatorConfig(faults=parsed, **config)).start()
        started.append(emulator)
        return emulator

    yield start
    for emulator in started:
        emulator.stop()


def provider_for(
    emulator: AtlasCloudEmulator, http: httpx.Client, keys: Keys | None = None, **options: str
) -> AtlasCloudProvider:
    config = ProviderConfig(
        base_url=emulator.base_url, keys=keys or Keys.fixed(dict(emulator.keys)), http=http, options=options
    )
    return AtlasCloudProvider(config)


def task(prompt: str = "a cat on a table", **fields: Any) -> ImageTask:
    return ImageTask(job_id="job1", row_id="row-1", row_number=1, prompt=prompt, **fields)


def finished(provider: AtlasCloudProvider, outcome: Generation | Pending, wait_s: float = 5.0) -> Generation:
    deadline = time.monotonic() + wait_s
    while isinstance(outcome, Pending):
        assert time.monotonic() < deadline, "the prediction never finished"
        time.sleep(0.02)
        outcome = provider.resume(outcome.request_id)
    return outcome


def provider_error(call: Callable[[], object]) -> ProviderError:
    with pytest.raises(ProviderError) as raised:
        call()
    return raised.value


def picture_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


# --------------------------------------------------------------------------- success


def test_one_image_is_fetched_at_the_requested_size_with_the_reported_price(emulator_factory, http):
    emulator = emulator_factory()
    provider = provider_for(emulator, http)

    pending = provider.start(task())
    generation = finished(provider, pending)

    assert isinstance(pending, Pending) and pending.status == "created"
    assert [picture_size(image.data) for image in generation.images] == [(1024, 1024)]
    assert generation.request_id == pending.request_id
    assert generation.cost == pytest.approx(0.003)  # the emulator's figure, as the API reports it


def test_three_images_come_from_one_paid_prediction(emulator_factory, http):
    emulator = emulator_factory()
    provider = provider_for(emulator, http)

    generation = finished(provider, provider.start(task("three dogs", width=768, height=1376, n=3)))

    assert [picture_size(image.data) for image in generation.images] == [(768, 1376)] * 3
    assert len({image.data for image in generation.images}) == 3
    assert (emulator.submits_for("three dogs"), emulator.paid_for("three dogs")) == (1, 1)
    assert emulator.stats()["downloads"] == 3


def test_a_prediction_stays_pending_until_its_generation_time_has_passed(emulator_factory, http):
    emulator = emulator_factory(latency_ms=300)
    provider = provider_for(emulator, http)

    pending = provider.start(task())
    early = provider.resume(pending.request_id)
    time.sleep(0.35)
    late = provider.resume(pending.request_id)

    assert isinstance(early, Pending) and early.status == "processing"
    assert isinstance(late, Generation) and len(late.images) == 1
    assert emulator.stats()["submits"] == 1


def test_a_model_that_finishes_at_once_gives_images_from_the_submit(emulator_factory, http):
    emulator = emulator_factory("sync=quick")
    provider = provider_for(emulator, http)

    outcome = provider.start(task("a quick sketch"))

    assert isinstance(outcome, Generation) and len(outcome.images) == 1
    assert emulator.stats().get("polls", 0) == 0


def test_the_submit_body_uses_the_models_own_field_names():
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"code": 200, "data": {"id": "p1", "status": "created"}})

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        config = ProviderConfig(
            base_url="https://atlas.test/",
            keys=Keys.fixed({KEY: "sk-1"}),
            http=client,
            options={"webhook_url": "https://hooks.test/atlas"},
        )
        provider = AtlasCloudProvider(config)
        provider.start(task(seed=7, steps=8, guidance=1.5, params={"use_pe": False}))
        provider.start(task(model="baidu/other-model", width=512, height=256, negative_prompt="blur"))

    ernie, other = (json.loads(request.content) for request in sent)
    assert str(sent[0].url) == "https://atlas.test/api/v1/model/generateImage"
    assert sent[0].headers["Authorization"] == "Bearer sk-1"
    assert ernie == {
        "model": ERNIE,
        "prompt": "a cat on a table",
        "n": 1,
        "size": "1024x1024",
        "seed": 7,
        "num_inference_steps": 8,
        "guidance_scale": 1.5,
        "use_pe": False,
        "webhook_url": "https://hooks.test/atlas",
    }
    assert (other["model"], other["size"], other["negative_prompt"]) == (
        "baidu/other-model",
        "512*256",
        "blur",
    )


# --------------------------------------------------------------------------- predictions that end badly


def test_a_prompt_rejected_by_moderation_fails_the_row_unbilled(emulator_factory, http):
    emulator = emulator_factory("refuse=forbidden-thing")
    provider = provider_for(emulator, http)

    pending = provider.start(task("a forbidden-thing"))
    error = provider_error(lambda: provider.resume(pending.request_id))

    assert (error.kind, error.action) == ("moderation", Action.FAIL_ROW)
    assert "content moderation" in error.message and "1039" in error.message
    assert emulator.paid_for("a forbidden-thing") == 0


def test_an_image_blocked_by_the_safety_checker_fails_the_row(emulator_factory, http):
    emulator = emulator_factory("nsfw=beach")
    provider = provider_for(emulator, http)

    pending = provider.start(task("a beach"))
    error = provider_error(lambda: provider.resume(pending.request_id))

    assert (error.kind, error.action) == ("moderation", Action.FAIL_ROW)
    assert "safety checker" in error.message


@pytest.mark.parametrize(
    ("faults", "kind", "words"),
    [
        (("terminal-5xx=worker",), "refused", "model worker failed"),
        (("terminal-5xx=worker", "refuse=worker"), "moderation", "content moderation"),
    ],
)
def test_a_5xx_carrying_a_failed_prediction_is_its_result_not_an_outage(
    emulator_factory, http, faults, kind, words
):
    emulator = emulator_factory(*faults)
    provider = provider_for(emulator, http)

    pending = provider.start(task("a worker"))
    error = provider_error(lambda: provider.resume(pending.request_id))

    assert (error.kind, error.action, error.status) == (kind, Action.FAIL_ROW, 500)
    assert words in error.message


# --------------------------------------------------------------------------- submits that are refused


@pytest.mark.parametrize(
    ("fault", "status", "kind", "action"),
    [
        ("stop=broke", 402, "quota", Action.STOP_JOB),
        ("forbidden=broke", 403, "not_permitted", Action.STOP_JOB),
        ("region=broke", 451, "not_permitted", Action.STOP_JOB),
        ("rate-limit=broke:5", 429, "rate_limited", Action.RETRY),
        ("fail=broke", 500, "unavailable", Action.RETRY),
        ("flaky=broke:5", 503, "unavailable", Action.RETRY),
        ("error-rate=1", 500, "unavailable", Action.RETRY),
    ],
)
def test_a_refused_submit_is_classified_and_never_resent(emulator_factory, http, fault, status, kind, action):
    emulator = emulator_factory(fault)
    provider = provider_for(emulator, http)

    error = provider_error(lambda: provider.start(task("a broke thing")))

    assert (error.status, error.kind, error.action, error.maybe_accepted) == (status, kind, action, False)
    assert error.request_id  # the X-Request-ID of the answer
    assert f"HTTP {status}" in error.message
    assert (emulator.submits_for("a broke thing"), emulator.paid_for("a broke thing")) == (1, 0)


def test_an_unknown_model_or_a_malformed_request_fails_the_row(emulator_factory, http):
    provider = provider_for(emulator_factory(), http)

    missing = provider_error(lambda: provider.start(task(model="nobody/no-model")))
    malformed = provider_error(lambda: provider.start(task(model="baidu/other", n=5)))

    assert (missing.status, missing.kind, missing.action) == (404, "refused", Action.FAIL_ROW)
    assert "model not found" in missing.message.lower()
    assert (malformed.status, malformed.kind, malformed.action) == (400, "refused", Action.FAIL_ROW)
    assert "n must be" in malformed.message


def test_a_submit_answer_without_a_prediction_id_may_have_been_accepted(emulator_factory, http):
    # A 200 that names no prediction: it may be running (and charged) and cannot be read, so it is an
    # answer lost, never a reason to submit again.
    provider = provider_for(emulator_factory("malformed=odd"), http)

    error = provider_error(lambda: provider.start(task("an odd one")))

    assert (error.kind, error.action, error.maybe_accepted) == ("bad_response", Action.RETRY, True)


def test_a_submit_whose_answer_is_lost_is_marked_maybe_accepted_and_sent_once(emulator_factory):
    emulator = emulator_factory("hang=slow")
    with httpx.Client(timeout=0.3) as client:
        provider = provider_for(emulator, client)

        error = provider_error(lambda: provider.start(task("a slow one")))

    assert (error.kind, error.action, error.maybe_accepted) == ("timeout", Action.RETRY, True)
    assert (emulator.submits_for("a slow one"), emulator.paid_for("a slow one")) == (1, 1)


# --------------------------------------------------------------------------- polls that fail


def test_failed_polls_are_retried_without_resubmitting(emulator_factory, http):
    emulator = emulator_factory("poll-flaky=shaky:2")
    provider = provider_for(emulator, http)

    pending = provider.start(task("a shaky poll"))
    errors = [provider_error(lambda: provider.resume(pending.request_id)) for _ in range(2)]
    generation = provider.resume(pending.request_id)

    assert [(e.status, e.action, e.maybe_accepted) for e in errors] == [(503, Action.RETRY, False)] * 2
    assert isinstance(generation, Generation) and len(generation.images) == 1
    assert (emulator.submits_for("a shaky poll"), emulator.stats()["polls"]) == (1, 3)


def test_an_expired_output_url_fails_the_row_with_the_price_paid(emulator_factory, http):
    emulator = emulator_factory(url_ttl_s=0)
    provider = provider_for(emulator, http)

    pending = provider.start(task())
    error = provider_error(lambda: provider.resume(pending.request_id))

    assert (error.kind, error.action, error.status) == ("download_failed", Action.FAIL_ROW, 403)
    assert (error.request_id, error.cost) == (pending.request_id, 0.003)
    assert (emulator.stats()["submits"], emulator.stats()["paid"]) == (1, 1)


# --------------------------------------------------------------------------- keys


class RotatedSecret:
    """A key store read through a cache that only a forced read refreshes (as the Lambda's is)."""

    def __init__(self, cached: str, stored: str) -> None:
        self.cached, self.stored = cached, stored

    def load(self, force: bool) -> dict[str, str]:
        if force:
            self.cached = self.stored
        return {KEY: self.cached}


def test_a_rotated_key_is_read_again_once_and_the_task_goes_through(emulator_factory, http):
    emulator = emulator_factory()
    emulator.keys[KEY] = "rotated-key"
    secret = RotatedSecret(cached="old-key", stored="rotated-key")
    provider = provider_for(emulator, http, keys=Keys(secret.load))

    generation = finished(provider, provider.start(task()))

    assert len(generation.images) == 1
    assert (emulator.stats()["submits"], emulator.paid_for("a cat on a table")) == (2, 1)


def test_a_key_still_wrong_after_reading_it_again_stops_the_job(emulator_factory, http):
    emulator = emulator_factory()
    secret = RotatedSecret(cached="old-key", stored="still-wrong")
    provider = provider_for(emulator, http, keys=Keys(secret.load))

    error = provider_error(lambda: provider.start(task()))

    assert (error.kind, error.action, error.status) == ("auth", Action.STOP_JOB, 401)
    assert "old-key" not in error.message and "still-wrong" not in error.message
    assert (emulator.stats()["submits"], emulator.paid_for("a cat on a table")) == (2, 0)


def test_no_key_at_all_stops_the_job_without_a_call(emulator_factory, http):
    emulator = emulator_factory()
    provider = provider_for(emulator, http, keys=Keys.fixed({}))

    error = provider_error(lambda: provider.start(task()))

    assert (error.kind, error.action) == ("auth", Action.STOP_JOB)
    assert emulator.stats().get("submits", 0) == 0


# --------------------------------------------------------------------------- answers only a mock can give


def mocked(answer: Callable[[httpx.Request], httpx.Response]) -> AtlasCloudProvider:
    client = httpx.Client(transport=httpx.MockTransport(answer))
    return AtlasCloudProvider(
        ProviderConfig(base_url="https://atlas.test", keys=Keys.fixed({KEY: "k"}), http=client)
    )


PNG = render_png("mock", 64, 64)


def poll_answer(data: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None):
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/files/"):
            return httpx.Response(200, content=PNG)
        return httpx.Response(status, json={"code": status, "data": {"id": "p1", **data}}, headers=headers)

    return answer


def test_a_single_output_string_and_a_price_sent_as_text_are_read():
    provider = mocked(
        poll_answer({"status": "succeeded", "output": "https://atlas.test/files/a.png", "price": "0.02"})
    )

    generation = provider.resume("p1")

    assert [picture_size(image.data) for image in generation.images] == [(64, 64)]
    assert (generation.request_id, generation.cost) == ("p1", pytest.approx(0.02))


def test_an_error_sent_as_an_object_is_reported_in_words():
    provider = mocked(
        poll_answer({"status": "error", "error": {"message": "GPU fell over"}, "error_code": 5000})
    )

    error = provider_error(lambda: provider.resume("p1"))

    assert (error.kind, error.action) == ("refused", Action.FAIL_ROW)
    assert "GPU fell over" in error.message and "5000" in error.message


def test_completed_without_outputs_or_a_safety_flag_is_retried():
    provider = mocked(poll_answer({"status": "completed", "outputs": [], "has_nsfw_contents": [False]}))

    error = provider_error(lambda: provider.resume("p1"))

    assert (error.kind, error.action) == ("bad_response", Action.RETRY)


def test_a_poll_5xx_without_a_finished_prediction_is_an_outage_with_its_request_id():
    provider = mocked(poll_answer({"status": "processing"}, status=502, headers={"X-Request-ID": "req-9"}))

    error = provider_error(lambda: provider.resume("p1"))

    assert (error.kind, error.action, error.status, error.request_id) == (
        "unavailable",
        Action.RETRY,
        502,
        "req-9",
    )


def test_a_poll_that_times_out_is_retried_as_a_plain_read():
    def answer(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    error = provider_error(lambda: mocked(answer).resume("p1"))

    assert (error.kind, error.action, error.maybe_accepted) == ("timeout", Action.RETRY, False)


def test_a_gateway_timeout_on_submit_is_never_resent_blindly():
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            504, json={"code": 504, "msg": "Gateway Timeout", "request_id": "r5", "data": None}
        )

    error = provider_error(lambda: mocked(answer).start(task()))

    assert (error.kind, error.action, error.maybe_accepted, error.request_id) == (
        "unavailable",
        Action.RETRY,
        True,
        "r5",
    )


# --------------------------------------------------------------------------- check() at split time


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"width": 512, "height": 512}, "takes only these sizes"),
        ({"model": "baidu/other", "width": 520, "height": 512}, "multiple of 16"),
        ({"model": "baidu/other", "width": 128, "height": 256}, "from 256 to 2048"),
        ({"n": 5}, "at most 4"),
        ({"negative_prompt": "blur"}, "does not take negative_prompt"),
    ],
)
def test_check_rejects_what_atlas_cloud_cannot_serve(fields, words):
    reason = AtlasCloudProvider.check(task(**fields))

    assert reason is not None and words in reason


def test_check_accepts_a_preset_size_and_the_fields_the_model_takes():
    assert AtlasCloudProvider.check(task(width=1376, height=768, n=4, seed=1, steps=8, guidance=1.0)) is None
    assert (
        AtlasCloudProvider.check(task(model="baidu/other", width=512, height=256, negative_prompt="x"))
        is None
    )
