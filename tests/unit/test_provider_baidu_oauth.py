"""The baidu-oauth provider against its emulator (legacy v1 and brief paths) and against mocked answers."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx
import pytest
from PIL import Image

from imagepipe.contract import ImageTask
from imagepipe.providers.baidu_oauth import (
    BRIEF_PATH,
    BaiduOAuthProvider,
    TokenCache,
    clear_tokens,
)
from imagepipe.providers.base import Action, Generation, Keys, ProviderConfig, ProviderError
from imagepipe_cli.emulators.baidu_oauth import BaiduOAuthEmulator
from imagepipe_cli.emulators.base import EmulatorConfig, parse_fault

LEGACY_PATH = "/rpc/2.0/ai_custom/v1/wenxinworkshop/text2image/sd_xl"
KEYS = dict(BaiduOAuthEmulator.DEFAULT_KEYS)


@pytest.fixture(autouse=True)
def fresh_tokens() -> Iterator[None]:
    # The token cache lives at module level (warm Lambdas): no test may see another's tokens.
    clear_tokens()
    yield
    clear_tokens()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


@pytest.fixture
def emulator_factory() -> Iterator[Callable[..., BaiduOAuthEmulator]]:
    started: list[BaiduOAuthEmulator] = []

    def start(*faults: str, **config: Any) -> BaiduOAuthEmulator:
        parsed = tuple(parse_fault(f, BaiduOAuthEmulator.FAULTS) for f in faults)
        emulator = BaiduOAuthEmulator(EmulatorConfig(faults=parsed, **config))
        emulator.start()
        started.append(emulator)
        return emulator

    yield start
    for emulator in started:
        emulator.stop()


def provider_for(
    base_url: str, http: httpx.Client, *, keys: Keys | None = None, path: str | None = None
) -> BaiduOAuthProvider:
    options = {"path": path} if path else {}
    return BaiduOAuthProvider(ProviderConfig(base_url, keys or Keys.fixed(KEYS), http, options=options))


def task(**fields: Any) -> ImageTask:
    values: dict[str, Any] = {
        "job_id": "job-1",
        "row_id": "r1",
        "row_number": 1,
        "prompt": "a red fox",
        "width": 64,
        "height": 64,
        "provider": "baidu-oauth",
    }
    return ImageTask(**{**values, **fields})


def generate(provider: BaiduOAuthProvider, t: ImageTask) -> Generation:
    result = provider.run(lambda: provider.start(t))
    assert isinstance(result, Generation)
    return result


def failure(provider: BaiduOAuthProvider, t: ImageTask) -> ProviderError:
    with pytest.raises(ProviderError) as raised:
        provider.run(lambda: provider.start(t))
    return raised.value


def sizes(generation: Generation) -> list[tuple[int, int]]:
    return [Image.open(io.BytesIO(image.data)).size for image in generation.images]


def rotating_keys(
    old: Mapping[str, str], new: Mapping[str, str], *, cached: bool = True
) -> tuple[Keys, list[bool]]:
    """Keys that read `old` until a forced re-read, then `new` (a secret rotated in Secrets Manager).
    cached=False: a loader with no cache of its own, which gives `new` only to forced reads."""
    reads: list[bool] = []

    def load(force: bool) -> Mapping[str, str]:
        reads.append(force)
        return new if (any(reads) if cached else force) else old

    return Keys(load), reads


def counted_keys() -> tuple[Keys, list[bool]]:
    """The demo keys, recording each read (True: a forced re-read after a refusal)."""
    reads: list[bool] = []
    return Keys(lambda force: reads.append(force) or KEYS), reads


# --------------------------------------------------------------------------- against the emulator


@pytest.mark.parametrize("path", [None, BRIEF_PATH], ids=["legacy-v1", "brief"])
@pytest.mark.parametrize("n", [1, 2])
def test_images_come_back_at_the_requested_size_on_both_paths(emulator_factory, http, path, n):
    # Given the emulator and a provider speaking the legacy path (default) or the brief's
    emulator = emulator_factory()
    provider = provider_for(emulator.base_url, http, path=path)

    # When a row asks for n images of 128x64
    result = generate(provider, task(prompt="a lighthouse", width=128, height=64, n=n))

    # Then it gets n different PNGs of that size from one paid request, and the API's id for it
    assert sizes(result) == [(128, 64)] * n
    assert [i.extension for i in result.images] == ["png"] * n
    assert len({i.data for i in result.images}) == n
    assert result.request_id and result.cost is None
    stats = emulator.stats()
    assert (stats["requests"], stats["paid"], stats["images"], stats["token_requests"]) == (1, 1, n, 1)
    assert emulator.paid_for("a lighthouse") == 1


def test_the_brief_path_can_answer_urls_which_are_downloaded_at_once(emulator_factory, http):
    emulator = emulator_factory()
    provider = provider_for(emulator.base_url, http, path=BRIEF_PATH)

    result = generate(provider, task(n=2, width=96, height=64, params={"response_format": "url"}))

    assert sizes(result) == [(96, 64)] * 2
    assert emulator.stats()["downloads"] == 2


def test_one_token_serves_many_images_and_a_second_provider_instance(emulator_factory, http):
    # Given two provider instances in one warm process (say, two invocations), each with its own client
    emulator = emulator_factory()
    first = provider_for(emulator.base_url, http)
    with httpx.Client(timeout=10) as other_http:
        second = provider_for(emulator.base_url, other_http)

        # When they make five images between them
        for i in range(3):
            generate(first, task(prompt=f"a bird number {i}"))
        for i in range(2):
            generate(second, task(prompt=f"a fish number {i}"))

    # Then one token was asked for: one HTTP call per image, not two
    stats = emulator.stats()
    assert (stats["token_requests"], stats["requests"], stats["paid"]) == (1, 5, 5)


def test_many_threads_on_a_cold_cache_share_one_token_request(emulator_factory, http):
    emulator = emulator_factory(latency_ms=20)
    provider = provider_for(emulator.base_url, http)
    results: list[Generation] = []

    threads = [
        threading.Thread(target=lambda i=i: results.append(generate(provider, task(prompt=f"cat {i}"))))
        for i in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(results) == 6
    assert emulator.stats()["token_requests"] == 1


def test_a_revoked_token_is_replaced_and_the_image_still_made(emulator_factory, http):
    # Given an API that revokes every token after each image
    emulator = emulator_factory("revoke-tokens-every=1")
    keys, reads = counted_keys()
    provider = provider_for(emulator.base_url, http, keys=keys)
    generate(provider, task(prompt="first"))

    # When the next image is asked for with the revoked token
    result = generate(provider, task(prompt="second"))

    # Then the 110 led to one new token (the keys were not re-read) and the caller just got the image
    assert sizes(result) == [(64, 64)]
    assert True not in reads
    stats = emulator.stats()
    assert stats["error_code:110"] == 1
    assert (stats["token_requests"], stats["requests"], stats["paid"]) == (2, 3, 2)


def test_an_expired_token_is_replaced_and_the_image_still_made(emulator_factory, http):
    # Given a cached token the API has since expired (the client's clock said it had time left)
    emulator = emulator_factory()
    keys, reads = counted_keys()
    provider = provider_for(emulator.base_url, http, keys=keys)
    generate(provider, task(prompt="first"))
    emulator.expire_tokens()

    # When the next image is asked for
    result = generate(provider, task(prompt="second"))

    # Then the 111 led to one new token (the keys were not re-read) and the image was made
    assert sizes(result) == [(64, 64)]
    assert True not in reads
    stats = emulator.stats()
    assert (stats["error_code:111"], stats["token_requests"], stats["paid"]) == (1, 2, 2)


def test_tokens_refused_even_when_fresh_stop_the_job_after_re_reading_the_keys(emulator_factory, http):
    # Given an API that answers 111 to every token, however new
    emulator = emulator_factory("expire-tokens")
    keys, reads = counted_keys()
    provider = provider_for(emulator.base_url, http, keys=keys)

    # When a row is tried
    error = failure(provider, task())

    # Then the provider got one new token inside the call, the keys were re-read once, and the job stops
    assert (error.kind, error.action) == ("auth", Action.STOP_JOB)
    assert "error_code 111" in error.message and "Access token expired" in error.message
    assert reads.count(True) == 1  # one re-read of the pair: both names from that one read
    stats = emulator.stats()
    assert (stats["error_code:111"], stats.get("paid", 0)) == (4, 0)


@pytest.mark.parametrize("cached", [True, False], ids=["caching-loader", "uncached-loader"])
@pytest.mark.parametrize("warm", [False, True], ids=["cold-cache", "warm-token"])
def test_rotated_keys_are_picked_up_after_one_refusal(emulator_factory, http, warm, cached):
    # Given both keys rotated at Baidu; the process still holds the old ones (maybe a token made with them)
    emulator = emulator_factory()
    if warm:
        generate(provider_for(emulator.base_url, http), task(prompt="before the rotation"))
    new = {name: value + "-rotated" for name, value in KEYS.items()}
    emulator.keys.update(new)
    keys, reads = rotating_keys(KEYS, new, cached=cached)
    provider = provider_for(emulator.base_url, http, keys=keys)

    # When a row is made
    result = generate(provider, task(prompt="after the rotation"))

    # Then the token endpoint refused the old keys, they were re-read (both names in one read), and the
    # image was made
    assert sizes(result) == [(64, 64)]
    assert reads.count(True) == 1
    assert emulator.stats()["responses"]["401"] == 1
    assert emulator.paid_for("after the rotation") == 1


def test_keys_the_token_endpoint_keeps_refusing_stop_the_job_without_a_paid_call(emulator_factory, http):
    emulator = emulator_factory()
    emulator.keys["BAIDU_SECRET_KEY"] = "a secret nobody told us"
    provider = provider_for(emulator.base_url, http)

    error = failure(provider, task())

    assert (error.kind, error.action, error.status) == ("auth", Action.STOP_JOB, 401)
    assert "token endpoint answered HTTP 401: Client authentication failed" in error.message
    assert "emulator-secret-key" not in error.message
    stats = emulator.stats()
    assert (stats["token_requests"], stats.get("requests", 0)) == (2, 0)


def test_missing_keys_stop_the_job_without_calling_the_api(emulator_factory, http):
    emulator = emulator_factory()
    provider = provider_for(emulator.base_url, http, keys=Keys.fixed({"BAIDU_API_KEY": "only-this"}))

    error = failure(provider, task())

    assert (error.kind, error.action) == ("auth", Action.STOP_JOB)
    assert "BAIDU_SECRET_KEY" in error.message
    assert emulator.stats().get("token_requests", 0) == 0


@pytest.mark.parametrize(
    ("fault", "kind", "action", "text"),
    [
        ("stop=budget", "quota", Action.STOP_JOB, "error_code 17"),
        ("rate-limit=budget:1", "rate_limited", Action.RETRY, "error_code 18"),
        ("refuse=budget", "moderation", Action.FAIL_ROW, "error_code 336003"),
        ("flaky=budget:1", "unavailable", Action.RETRY, "error_code 2 "),
        ("fail=budget", "unavailable", Action.RETRY, "HTTP 500"),
        ("malformed=budget", "bad_response", Action.RETRY, "without images"),
    ],
)
def test_each_fault_is_classified_and_nothing_is_paid(emulator_factory, http, fault, kind, action, text):
    # Given an API told to misbehave for prompts with "budget" in them
    emulator = emulator_factory(fault)
    provider = provider_for(emulator.base_url, http)

    # When such a row is tried
    error = failure(provider, task(prompt="a budget hotel"))

    # Then the error says what happened and what to do, and no generation was paid for
    assert (error.kind, error.action) == (kind, action)
    assert text in error.message
    assert error.maybe_accepted is False
    assert emulator.paid_for("a budget hotel") == 0


def test_after_a_rate_limit_the_next_try_succeeds(emulator_factory, http):
    emulator = emulator_factory("rate-limit=busy:1")
    provider = provider_for(emulator.base_url, http)

    error = failure(provider, task(prompt="a busy street"))
    result = generate(provider, task(prompt="a busy street"))

    assert error.kind == "rate_limited" and sizes(result) == [(64, 64)]
    assert emulator.paid_for("a busy street") == 1


def test_a_request_whose_answer_never_comes_may_have_been_paid(emulator_factory):
    # Given an API that accepts the request, then says nothing for longer than the client waits
    emulator = emulator_factory("hang=slow")
    emulator.hang_s = 2.0
    with httpx.Client(timeout=httpx.Timeout(10, read=0.5)) as http:
        provider = provider_for(emulator.base_url, http)

        error = failure(provider, task(prompt="a slow snail"))

    # Then the caller is told it may have been accepted (so not to resend blindly), and it was paid
    assert (error.kind, error.action, error.maybe_accepted) == ("timeout", Action.RETRY, True)
    assert emulator.paid_for("a slow snail") == 1


def test_a_model_the_legacy_api_does_not_serve_fails_the_row(emulator_factory, http):
    emulator = emulator_factory()
    provider = provider_for(emulator.base_url, http)

    error = failure(provider, task(model="no_such_model"))

    assert (error.kind, error.action) == ("refused", Action.FAIL_ROW)
    assert "error_code 3" in error.message and "Unsupported openapi method" in error.message


def test_a_configured_path_is_used_as_given(emulator_factory, http):
    emulator = emulator_factory()
    provider = provider_for(emulator.base_url, http, path=LEGACY_PATH)

    result = generate(provider, task(model="ignored_by_a_fixed_path"))

    assert sizes(result) == [(64, 64)]


# --------------------------------------------------------------------------- check()


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"n": 5}, "at most 4 image(s)"),
    ],
)
def test_check_rejects_what_the_api_cannot_serve(fields, reason):
    assert reason in (BaiduOAuthProvider.check(task(**fields)) or "")


def test_check_accepts_every_field_it_sends():
    full = task(
        width=2048,
        height=64,
        n=4,
        negative_prompt="blur",
        seed=7,
        steps=30,
        guidance=7.5,
        params={"sampler_index": "Euler a", "style": "Base"},
    )
    assert BaiduOAuthProvider.check(full) is None


# --------------------------------------------------------------------------- the API's shape, mocked


def png_b64() -> str:
    import base64

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


Answer = httpx.Response | Callable[[httpx.Request], httpx.Response]


class FakeBaidu:
    """Tokens tok-1, tok-2, ... from the token URL; `answers` in turn (the last repeats) for image calls."""

    def __init__(self, *answers: Answer, token: httpx.Response | None = None) -> None:
        self.answers = list(answers)
        self.token = token
        self.requests: list[httpx.Request] = []
        self.tokens_issued = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/oauth/2.0/token":
            if self.token is not None:
                return self.token
            self.tokens_issued += 1
            return httpx.Response(
                200, json={"access_token": f"tok-{self.tokens_issued}", "expires_in": 2592000}
            )
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return answer(request) if callable(answer) else answer

    def image_calls(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path != "/oauth/2.0/token"]


@pytest.fixture
def mocked() -> Iterator[Callable[..., tuple[BaiduOAuthProvider, FakeBaidu]]]:
    opened: list[httpx.Client] = []

    def make(
        *answers: Answer,
        path: str | None = None,
        token: httpx.Response | None = None,
        keys: Keys | None = None,
    ) -> tuple[BaiduOAuthProvider, FakeBaidu]:
        fake = FakeBaidu(*answers, token=token)
        opened.append(httpx.Client(transport=httpx.MockTransport(fake)))
        return provider_for("https://aip.example/", opened[-1], path=path, keys=keys), fake

    yield make
    for client in opened:
        client.close()


OK = httpx.Response(200, json={"id": "as-1", "log_id": 123456789, "data": [{"b64_image": png_b64()}]})


def test_the_legacy_request_carries_every_field_and_the_token_both_ways(mocked):
    provider, fake = mocked(OK)

    result = generate(
        provider,
        task(
            prompt="a cat",
            negative_prompt="blurry",
            width=512,
            height=768,
            n=2,
            seed=7,
            steps=30,
            guidance=7.5,
            params={"sampler_index": "Euler a"},
        ),
    )

    (call,) = fake.image_calls()
    assert call.url.path == LEGACY_PATH
    assert json.loads(call.content) == {
        "prompt": "a cat",
        "negative_prompt": "blurry",
        "size": "512x768",
        "n": 2,
        "steps": 30,
        "seed": 7,
        "cfg_scale": 7.5,
        "sampler_index": "Euler a",
    }
    assert (call.url.params["access_token"], call.headers["Authorization"]) == ("tok-1", "Bearer tok-1")
    (token_call,) = [r for r in fake.requests if r.url.path == "/oauth/2.0/token"]
    assert token_call.method == "POST"
    assert dict(token_call.url.params) == {
        "grant_type": "client_credentials",
        "client_id": KEYS["BAIDU_API_KEY"],
        "client_secret": KEYS["BAIDU_SECRET_KEY"],
    }
    assert result.request_id == "123456789"  # log_id, when the answer has one


def test_the_brief_request_names_the_model_in_the_body(mocked):
    provider, fake = mocked(
        httpx.Response(200, json={"id": "img-9", "data": [{"b64_json": png_b64()}]}), path=BRIEF_PATH
    )

    result = generate(provider, task(model="ernie-image-8b"))

    (call,) = fake.image_calls()
    assert call.url.path == BRIEF_PATH
    body = json.loads(call.content)
    assert (body["model"], body["response_format"], body["prompt"]) == (
        "ernie-image-8b",
        "b64_json",
        "a red fox",
    )
    assert result.request_id == "img-9"


@pytest.mark.parametrize(
    ("code", "kind", "action"),
    [
        (17, "quota", Action.STOP_JOB),
        ("17", "quota", Action.STOP_JOB),  # numbers may come as text
        (18, "rate_limited", Action.RETRY),
        ("336100", "rate_limited", Action.RETRY),
        (336501, "rate_limited", Action.RETRY),
        (336502, "rate_limited", Action.RETRY),
        (1, "unavailable", Action.RETRY),
        (2, "unavailable", Action.RETRY),
        ("4", "unavailable", Action.RETRY),
        (336001, "refused", Action.FAIL_ROW),
        (336003, "refused", Action.FAIL_ROW),
        (6, "not_permitted", Action.STOP_JOB),
        (282000, "refused", Action.FAIL_ROW),
    ],
)
def test_error_codes_in_a_200_answer_are_classified(mocked, code, kind, action):
    provider, fake = mocked(httpx.Response(200, json={"error_code": code, "error_msg": "the API's words"}))

    error = failure(provider, task())

    assert (error.kind, error.action, error.status) == (kind, action, 200)
    assert error.message == f"Baidu answered error_code {int(code)} (HTTP 200): the API's words"
    assert len(fake.image_calls()) == 1  # not a token problem: no second try


def test_a_content_refusal_is_moderation(mocked):
    provider, _ = mocked(
        httpx.Response(200, json={"error_code": "336003", "error_msg": "prompt is sensitive"})
    )

    error = failure(provider, task())

    assert (error.kind, error.action) == ("moderation", Action.FAIL_ROW)


@pytest.mark.parametrize("code", [110, "111"])
def test_a_token_error_sent_as_a_number_or_text_gets_one_new_token(mocked, code):
    # Given an API that calls the cached token invalid once
    keys, reads = counted_keys()
    expired = httpx.Response(200, json={"error_code": code, "error_msg": "Access token expired"})
    provider, fake = mocked(expired, OK, keys=keys)

    # When a row is made
    result = generate(provider, task())

    # Then the provider itself fetched a second token and retried, without re-reading the keys
    assert len(result.images) == 1
    assert [r.url.params["access_token"] for r in fake.image_calls()] == ["tok-1", "tok-2"]
    assert True not in reads


@pytest.mark.parametrize(
    ("status", "kind", "action"),
    [
        (500, "unavailable", Action.RETRY),
        (502, "unavailable", Action.RETRY),
        (429, "rate_limited", Action.RETRY),
        (404, "refused", Action.FAIL_ROW),
        (403, "not_permitted", Action.STOP_JOB),
    ],
)
def test_plain_http_errors_are_classified(mocked, status, kind, action):
    provider, _ = mocked(httpx.Response(status, text="<html>gateway says no</html>"))

    error = failure(provider, task())

    assert (error.kind, error.action, error.status) == (kind, action, status)
    assert f"HTTP {status}" in error.message


def test_a_401_re_reads_the_keys_with_a_new_token_then_succeeds(mocked):
    provider, fake = mocked(httpx.Response(401, json={"error_code": "x", "error_msg": "unauthorized"}), OK)

    result = generate(provider, task())

    assert len(result.images) == 1
    assert [r.url.params["access_token"] for r in fake.image_calls()] == ["tok-1", "tok-2"]


def test_a_timeout_may_have_been_accepted_but_a_refused_connection_was_not(mocked):
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    lost = failure(mocked(timeout)[0], task())
    never_sent = failure(mocked(refused)[0], task())

    assert (lost.kind, lost.action, lost.maybe_accepted) == ("timeout", Action.RETRY, True)
    assert (never_sent.kind, never_sent.maybe_accepted) == ("unavailable", False)


@pytest.mark.parametrize(
    ("token", "kind", "action"),
    [
        (httpx.Response(503, text="busy"), "unavailable", Action.RETRY),
        (httpx.Response(200, json={"expires_in": 5}), "bad_response", Action.RETRY),
        (httpx.Response(404, text="not here"), "config", Action.STOP_JOB),
    ],
)
def test_token_endpoint_trouble_is_retryable_or_stops_and_never_counts_as_accepted(
    mocked, token, kind, action
):
    provider, fake = mocked(OK, token=token)

    error = failure(provider, task())

    assert (error.kind, error.action, error.maybe_accepted) == (kind, action, False)
    assert fake.image_calls() == []


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (httpx.Response(200, json={"log_id": 1}), "without images"),
        (httpx.Response(200, json={"data": [{"index": 0}]}), "none of b64_image, b64_json or url"),
    ],
)
def test_a_200_without_a_usable_image_is_a_bad_response_worth_retrying(mocked, answer, message):
    provider, _ = mocked(answer)

    error = failure(provider, task())

    assert (error.kind, error.action) == ("bad_response", Action.RETRY)
    assert message in error.message


def test_a_paid_image_that_is_not_valid_base64_fails_the_row_and_is_not_asked_for_again(mocked):
    provider, _ = mocked(httpx.Response(200, json={"log_id": 7, "data": [{"b64_image": "%%% not base64"}]}))

    error = failure(provider, task())

    assert (error.kind, error.action, error.request_id) == ("download_failed", Action.FAIL_ROW, "7")
    assert "not valid base64" in error.message


def test_a_token_is_renewed_a_margin_before_it_expires():
    # Given a cache whose clock we move, and tokens that live 1000 s
    now = [0.0]
    cache = TokenCache(clock=lambda: now[0])
    fetched: list[int] = []

    def fetch() -> tuple[str, float]:
        fetched.append(1)
        return f"tok-{len(fetched)}", 1000.0

    # When it is asked at 0 s, 699 s and 701 s
    seen = []
    for t in (0.0, 699.0, 701.0):
        now[0] = t
        seen.append(cache.get(("url", "ak"), fetch))

    # Then the token was renewed 300 s before its end, not at it
    assert seen == ["tok-1", "tok-1", "tok-2"]
