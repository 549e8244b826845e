"""The same contract for every provider, each against its own emulator: what the generator relies on."""

from __future__ import annotations

import io
import time

import httpx
import pytest
from PIL import Image

from imagepipe.contract import ImageTask
from imagepipe.providers import (
    Action,
    Generation,
    Keys,
    Pending,
    ProviderConfig,
    ProviderError,
    provider_class,
)

PROVIDERS = ["atlascloud", "qianfan", "openai", "baidu-oauth"]
# A size and n every provider takes (OpenAI has a fixed size list; Qianfan starts at 512).
SIZE = (1024, 1024)


def task(provider: str, prompt: str = "a lighthouse at dusk", n: int = 1) -> ImageTask:
    return ImageTask(
        job_id="contract",
        row_id="1",
        row_number=1,
        prompt=prompt,
        width=SIZE[0],
        height=SIZE[1],
        n=n,
        provider=provider,
    )


def make(emulator, timeout: float = 10.0, keys: Keys | None = None):
    cls = provider_class(emulator.name)
    config = ProviderConfig(
        base_url=emulator.base_url,
        keys=keys or Keys.fixed(dict(emulator.keys)),
        http=httpx.Client(timeout=timeout),
    )
    return cls(config)


def generate(provider, t: ImageTask, wait_s: float = 10.0) -> Generation:
    """What the generator does: start, then (asynchronous APIs) resume until done."""
    outcome = provider.run(lambda: provider.start(t))
    deadline = time.monotonic() + wait_s
    while isinstance(outcome, Pending):
        assert time.monotonic() < deadline, "the prediction never finished"
        time.sleep(0.05)
        outcome = provider.run(lambda rid=outcome.request_id: provider.resume(rid))
    return outcome


def failure(provider, t: ImageTask) -> ProviderError:
    with pytest.raises(ProviderError) as raised:
        generate(provider, t)
    return raised.value


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize("n", [1, 2])
def test_a_task_becomes_n_images_of_the_requested_size(emulator_factory, name, n):
    emulator = emulator_factory(name)

    result = generate(make(emulator), task(name, n=n))

    assert len(result.images) == n
    for image in result.images:
        with Image.open(io.BytesIO(image.data)) as decoded:
            assert (decoded.format, decoded.size) == ("PNG", SIZE)
    assert emulator.paid_for("a lighthouse at dusk") == 1


@pytest.mark.parametrize("name", PROVIDERS)
def test_a_moderation_refusal_fails_the_row_with_the_reason(emulator_factory, name):
    emulator = emulator_factory(name, "refuse=forbidden")

    error = failure(make(emulator), task(name, "a forbidden scene"))

    assert (error.action, error.kind) == (Action.FAIL_ROW, "moderation")
    assert error.message


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize(
    ("fault", "kind"), [("fail=doomed", "unavailable"), ("rate-limit=doomed:5", "rate_limited")]
)
def test_outages_and_rate_limits_are_retried_later(emulator_factory, name, fault, kind):
    emulator = emulator_factory(name, fault)

    error = failure(make(emulator), task(name, "a doomed ship"))

    assert (error.action, error.kind) == (Action.RETRY, kind)
    assert emulator.paid_for("a doomed ship") == 0


@pytest.mark.parametrize("name", PROVIDERS)
def test_a_flaky_api_succeeds_on_the_next_try(emulator_factory, name):
    emulator = emulator_factory(name, "flaky=unlucky:1")
    provider = make(emulator)

    assert failure(provider, task(name, "an unlucky cat")).action is Action.RETRY
    assert len(generate(provider, task(name, "an unlucky cat")).images) == 1


@pytest.mark.parametrize("name", PROVIDERS)
def test_an_exhausted_account_stops_the_job(emulator_factory, name):
    emulator = emulator_factory(name, "stop=broke")

    error = failure(make(emulator), task(name, "a broke artist"))

    assert (error.action, error.kind) == (Action.STOP_JOB, "quota")


@pytest.mark.parametrize("name", PROVIDERS)
def test_a_malformed_answer_is_retried(emulator_factory, name):
    emulator = emulator_factory(name, "malformed=garbled")

    error = failure(make(emulator), task(name, "a garbled message"))

    assert (error.action, error.kind) == (Action.RETRY, "bad_response")


@pytest.mark.parametrize("name", PROVIDERS)
def test_a_request_without_an_answer_in_time_may_have_been_accepted(emulator_factory, name):
    emulator = emulator_factory(name, "hang=slow")

    error = failure(make(emulator, timeout=0.5), task(name, "a slow snail"))

    assert error.kind == "timeout" and error.maybe_accepted
    assert error.action is Action.RETRY


@pytest.mark.parametrize("name", PROVIDERS)
def test_a_rotated_key_is_read_again_once(emulator_factory, name):
    emulator = emulator_factory(name)
    old = dict(emulator.keys)
    rotated = {k: v + "-rotated" for k, v in old.items()}
    reads = []

    def load(force: bool) -> dict[str, str]:
        reads.append(force)
        return rotated if force else old

    provider = make(emulator, keys=Keys(load))
    emulator.keys.update(rotated)  # the key was rotated after the function cached the old one

    result = generate(provider, task(name))

    assert len(result.images) == 1
    assert True in reads


@pytest.mark.parametrize("name", PROVIDERS)
def test_keys_that_stay_wrong_stop_the_job(emulator_factory, name):
    emulator = emulator_factory(name)
    wrong = Keys.fixed({k: "wrong" for k in emulator.keys})

    error = failure(make(emulator, keys=wrong), task(name))

    assert (error.action, error.kind) == (Action.STOP_JOB, "auth")
    assert "wrong" not in error.message  # a key never appears in a reason


@pytest.mark.parametrize("name", PROVIDERS)
def test_the_api_key_never_appears_in_an_error(emulator_factory, name):
    emulator = emulator_factory(name, "fail=doomed")

    error = failure(make(emulator), task(name, "a doomed ship"))

    for key in emulator.keys.values():
        assert key not in error.message
