"""Every HTTP call a provider makes fits the invocation (issue 10, defect 7): `providers.deadline`.

The client's own timeout here is 120 s, as a stack may configure it; the emulators' `hang` fault
accepts (and charges for) a request and answers it 10 s late."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from imagepipe.contract import ImageTask
from imagepipe.providers import (
    Action,
    Keys,
    Pending,
    ProviderConfig,
    ProviderError,
    deadline,
    provider_class,
    time_left,
)
from imagepipe.providers.baidu_oauth import clear_tokens

PROVIDERS = ["atlascloud", "qianfan", "openai", "baidu-oauth"]
PROMPT = "a lighthouse at dusk"
CONFIGURED_TIMEOUT_S = 120.0


@pytest.fixture(autouse=True)
def no_cached_tokens() -> None:
    clear_tokens()


def setup(emulator_factory, name: str, *faults: str) -> tuple[Any, Any, ImageTask]:
    emulator = emulator_factory(name, *faults)
    emulator.hang_s = 10.0
    provider = provider_class(name)(
        ProviderConfig(
            base_url=emulator.base_url,
            keys=Keys.fixed(dict(emulator.keys)),
            http=httpx.Client(timeout=CONFIGURED_TIMEOUT_S),
        )
    )
    return emulator, provider, ImageTask(job_id="d", row_id="1", row_number=1, prompt=PROMPT, provider=name)


def sent(emulator) -> int:
    stats = emulator.stats()
    return stats.get("requests", 0) + stats.get("token_requests", 0)


@pytest.mark.parametrize("name", PROVIDERS)
def test_a_request_the_api_sits_on_ends_before_the_deadline(emulator_factory, name):
    # Given an API that accepts the request and then says nothing for 10 s, and 2 s left
    emulator, provider, task = setup(emulator_factory, name, f"hang={PROMPT}")
    end = time.time() + 2.0

    # When the task is sent within that deadline
    with deadline(end), pytest.raises(ProviderError) as raised:
        provider.run(lambda: provider.start(task))

    # Then the call gave up before the deadline (not after the 120 s the client allows), and says the
    # request may have been accepted (it was sent: it is never resent blindly)
    assert time.time() < end
    error = raised.value
    assert (error.kind, error.action, error.maybe_accepted) == ("timeout", Action.RETRY, True)
    assert emulator.paid_for(PROMPT) == 1


@pytest.mark.parametrize("name", PROVIDERS)
def test_with_no_time_left_nothing_is_sent(emulator_factory, name):
    # Given less than a second left before the deadline
    emulator, provider, task = setup(emulator_factory, name)

    # When the task is to be sent
    with deadline(time.time() + 0.9), pytest.raises(ProviderError) as raised:
        provider.run(lambda: provider.start(task))

    # Then nothing reached the API (no token request either) and the task may simply be tried later
    error = raised.value
    assert (error.kind, error.action, error.maybe_accepted) == ("timeout", Action.RETRY, False)
    assert "not sent" in error.message
    assert (sent(emulator), emulator.stats().get("paid", 0)) == (0, 0)


def test_a_poll_with_no_time_left_is_not_sent_and_is_read_again_later(emulator_factory):
    # Given a submitted Atlas Cloud prediction
    emulator, provider, task = setup(emulator_factory, "atlascloud")
    pending = provider.start(task)
    assert isinstance(pending, Pending)

    # When it is to be read with no time left
    with deadline(time.time()), pytest.raises(ProviderError) as raised:
        provider.resume(pending.request_id)

    # Then no poll went out, and the read is simply tried again later
    assert (raised.value.kind, raised.value.action, raised.value.maybe_accepted) == (
        "timeout",
        Action.RETRY,
        False,
    )
    assert emulator.stats().get("polls", 0) == 0


def test_with_time_left_the_call_goes_through():
    # Given an API that answers at once, and 30 s left
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": [{"b64_json": "iVBORw0KGgo="}]})

    http = httpx.Client(transport=httpx.MockTransport(answer), timeout=CONFIGURED_TIMEOUT_S)
    provider = provider_class("openai")(
        ProviderConfig("https://api.example", Keys.fixed({"OPENAI_API_KEY": "k"}), http)
    )
    task = ImageTask(job_id="d", row_id="1", row_number=1, prompt=PROMPT, provider="openai")

    with deadline(time.time() + 30):
        generation = provider.start(task)

    assert [image.extension for image in generation.images] == ["png"]


def test_the_earlier_deadline_wins_and_ends_with_its_block():
    now = time.time()
    assert time_left() is None

    with deadline(now + 100):
        with deadline(now + 500):
            inner = time_left()
        with deadline(now + 10):
            earlier = time_left()
        outer = time_left()
    after = time_left()

    assert inner is not None and 90 < inner <= 100
    assert earlier is not None and earlier <= 10
    assert outer is not None and 90 < outer <= 100
    assert after is None


def test_a_deadline_belongs_to_the_thread_that_set_it():
    # The generator runs each task in a thread of its own, each with its own deadline.
    seen: list[float | None] = []
    with deadline(time.time() + 5):
        worker = threading.Thread(target=lambda: seen.append(time_left()))
        worker.start()
        worker.join()

    assert seen == [None]


def test_a_paid_answer_that_arrives_at_the_deadline_still_has_its_images_fetched(emulator_factory):
    # Given a synchronous API that answers (and charges) 1.2 s after the request, with links to its
    # images, and 2.2 s left before the deadline: under a second is left once the answer is in
    emulator = emulator_factory("qianfan", latency_ms=1200)
    provider = provider_class("qianfan")(
        ProviderConfig(
            base_url=emulator.base_url,
            keys=Keys.fixed(dict(emulator.keys)),
            http=httpx.Client(timeout=CONFIGURED_TIMEOUT_S),
        )
    )
    task = ImageTask(job_id="d", row_id="1", row_number=1, prompt=PROMPT, provider="qianfan")

    # When the task is sent within that deadline
    with deadline(time.time() + 2.2):
        generation = provider.run(lambda: provider.start(task))

    # Then the paid image is fetched all the same (downloads may use part of the time kept back after
    # the deadline), once
    assert len(generation.images) == 1 and generation.images[0].data
    assert emulator.paid_for(PROMPT) == 1
