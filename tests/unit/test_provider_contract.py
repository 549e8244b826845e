"""The same contract for every provider, each against its own emulator: what the generator relies on."""

from __future__ import annotations

import io
import time
from typing import Any

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


def task(provider: str, prompt: str = "a lighthouse at dusk", n: int = 1, **fields: Any) -> ImageTask:
    return ImageTask(
        job_id="contract",
        row_id="1",
        row_number=1,
        prompt=prompt,
        width=SIZE[0],
        height=SIZE[1],
        n=n,
        provider=provider,
        **fields,
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
    assert len({image.data for image in result.images}) == n  # n different images, not one n times
    assert emulator.paid_for("a lighthouse at dusk") == 1


@pytest.mark.parametrize("name", PROVIDERS)
def test_a_moderation_refusal_fails_the_row_with_the_reason(emulator_factory, name):
    emulator = emulator_factory(name, "refuse=forbidden")

    error = failure(make(emulator), task(name, "a forbidden scene"))

    assert (error.action, error.kind) == (Action.FAIL_ROW, "moderation")
    assert error.message
    assert emulator.paid_for("a forbidden scene") == 0


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        ("fail=doomed", "unavailable"),
        ("error-rate=1", "unavailable"),
        ("rate-limit=doomed:5", "rate_limited"),
    ],
)
def test_outages_and_rate_limits_are_retried_later(emulator_factory, name, fault, kind):
    emulator = emulator_factory(name, fault)

    error = failure(make(emulator), task(name, "a doomed ship"))

    assert (error.action, error.kind) == (Action.RETRY, kind)
    assert emulator.paid_for("a doomed ship") == 0


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize("fault", ["flaky=unlucky:1", "rate-limit=unlucky:1"])
def test_a_passing_outage_or_rate_limit_lets_the_next_try_through(emulator_factory, name, fault):
    emulator = emulator_factory(name, fault)
    provider = make(emulator)

    assert failure(provider, task(name, "an unlucky cat")).action is Action.RETRY
    assert len(generate(provider, task(name, "an unlucky cat")).images) == 1
    assert emulator.paid_for("an unlucky cat") == 1


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
    assert emulator.paid_for("a slow snail") == 1  # the API did accept it: a blind resend pays twice


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize("cached", [True, False], ids=["caching-loader", "uncached-loader"])
def test_a_rotated_key_is_read_again_once(emulator_factory, name, cached):
    emulator = emulator_factory(name)
    old = dict(emulator.keys)
    rotated = {k: v + "-rotated" for k, v in old.items()}
    reads = []

    def load(force: bool) -> dict[str, str]:
        # A caching loader (Secrets Manager through Powertools) keeps what a forced read fetched; an
        # uncached one gives the new keys to forced reads only.
        reads.append(force)
        return rotated if force or (cached and any(reads)) else old

    provider = make(emulator, keys=Keys(load))
    emulator.keys.update(rotated)  # the key was rotated after the function cached the old one

    result = generate(provider, task(name))

    assert len(result.images) == 1
    assert True in reads
    if cached:
        assert reads.count(True) == 1
    assert emulator.paid_for("a lighthouse at dusk") == 1


@pytest.mark.parametrize("name", PROVIDERS)
def test_keys_that_stay_wrong_stop_the_job(emulator_factory, name):
    emulator = emulator_factory(name)
    reads: list[bool] = []
    wrong = Keys(lambda force: reads.append(force) or {k: "wrong" for k in emulator.keys})

    error = failure(make(emulator, keys=wrong), task(name))

    assert (error.action, error.kind) == (Action.STOP_JOB, "auth")
    assert "wrong" not in error.message  # a key never appears in a reason
    assert reads.count(True) == 1  # re-read once, not on every try
    assert emulator.stats().get("paid", 0) == 0


@pytest.mark.parametrize("name", PROVIDERS)
def test_no_configured_key_stops_the_job_without_a_call(emulator_factory, name):
    emulator = emulator_factory(name)

    error = failure(make(emulator, keys=Keys.fixed({})), task(name))

    assert (error.action, error.kind) == (Action.STOP_JOB, "auth")
    for key_name in provider_class(name).key_names:
        assert key_name in error.message
    assert emulator.stats().get("requests", 0) == 0


@pytest.mark.parametrize("name", PROVIDERS)
def test_the_api_key_never_appears_in_an_error(emulator_factory, name):
    emulator = emulator_factory(name, "fail=doomed")

    error = failure(make(emulator), task(name, "a doomed ship"))

    for key in emulator.keys.values():
        assert key not in error.message


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"prompt": "other"}, "params cannot set prompt (use the row's own column)"),
        ({"n": 2, "model": "x"}, "params cannot set model, n (use the row's own columns)"),
        ({"style": "ink"}, None),
    ],
)
def test_params_cannot_set_what_the_rows_own_columns_set(name, params, reason):
    found = provider_class(name).check(task(name, params=params))

    assert found == (f"{name}: {reason}" if reason else None)


def test_one_re_read_after_a_refusal_gives_every_key_fresh():
    # Given a secret whose two keys were rotated, read through a cache only a forced read bypasses
    old, new = {"ID": "id-1", "SECRET": "s-1"}, {"ID": "id-2", "SECRET": "s-2"}
    reads: list[bool] = []
    keys = Keys(lambda force: reads.append(force) or (new if force else old))
    assert keys.get_many("ID", "SECRET") == ("id-1", "s-1")

    # When the provider refused them and both are read again
    keys.refresh()
    fresh = keys.get_many("ID", "SECRET")

    # Then one forced read gave both new keys (never a new one with an old one), and the next read is cached
    assert fresh == ("id-2", "s-2")
    assert keys.get("ID") == "id-1"
    assert reads == [False, True, False]
