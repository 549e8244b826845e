"""The Atlas client (imagepipe.atlas): against the loopback emulator, and against malformed answers of the
API's shape served by httpx.MockTransport."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from PIL import Image

from imagepipe.atlas import AtlasClient, Credentials, GeneratedImage, ImageApiError, TokenCache
from imagepipe_cli.emulator import AtlasEmulator

ACCESS_KEY, SECRET_KEY = "emulator-access-key", "emulator-secret-key"
MODEL = "ernie-image"


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def client_for(
    emulator: AtlasEmulator,
    http: httpx.Client,
    *,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    tokens: TokenCache | None = None,
) -> AtlasClient:
    return AtlasClient(
        base_url=emulator.base_url,
        token_url=emulator.token_url,
        model=MODEL,
        credentials=lambda: Credentials(access_key, secret_key),
        http=http,
        tokens=tokens or TokenCache(),
    )


def picture(image: GeneratedImage) -> Image.Image:
    return Image.open(io.BytesIO(image.data))


def api_error(call: Callable[[], object]) -> ImageApiError:
    with pytest.raises(ImageApiError) as raised:
        call()
    return raised.value


# --------------------------------------------------------------------------- against the emulator


def test_an_image_decodes_at_the_requested_size(emulator_factory, http):
    client = client_for(emulator_factory(), http)

    (image,) = client.generate(prompt="a cat on a table", width=512, height=768)

    assert (image.extension, image.content_type) == ("png", "image/png")
    assert picture(image).format == "PNG" and picture(image).size == (512, 768)


def test_n_images_come_from_one_request_and_differ(emulator_factory, http):
    emulator = emulator_factory()
    client = client_for(emulator, http)

    images = client.generate(prompt="a dog", width=64, height=128, n=3)

    assert [picture(i).size for i in images] == [(64, 128)] * 3
    assert len({i.data for i in images}) == 3
    assert emulator.stats()["generation_requests"] == 1


def test_many_images_need_one_token_request(emulator_factory, http):
    # Given one client (one warm Lambda)
    emulator = emulator_factory()
    client = client_for(emulator, http)

    # When it makes five images
    for i in range(5):
        client.generate(prompt=f"a bird number {i}", width=64, height=64)

    # Then it asked for a token once: one HTTP call per image, not two
    stats = emulator.stats()
    assert (stats["token_requests"], stats["generation_requests"]) == (1, 5)


def test_a_revoked_token_is_replaced_and_the_call_still_succeeds(emulator_factory, http):
    # Given an API that revokes every token after each image
    emulator = emulator_factory("revoke-tokens-every=1")
    client = client_for(emulator, http)
    client.generate(prompt="first", width=64, height=64)

    # When the next image is asked for with the revoked token
    (image,) = client.generate(prompt="second", width=64, height=64)

    # Then the caller just gets the image; the client fetched one new token after the 110
    assert picture(image).size == (64, 64)
    stats = emulator.stats()
    assert stats["error_codes"] == {"110": 1}
    assert (stats["token_requests"], stats["generation_requests"]) == (2, 3)


def test_an_expired_token_is_replaced_and_the_call_still_succeeds(emulator_factory, http):
    # Given a token the API expires after 1 s, and a client whose clock never sees it age
    emulator = emulator_factory(token_ttl_s=1)
    client = client_for(emulator, http, tokens=TokenCache(clock=lambda: 0.0))
    client.generate(prompt="first", width=64, height=64)

    # When the API has expired it
    time.sleep(1.2)
    (image,) = client.generate(prompt="second", width=64, height=64)

    # Then the answer 111 made the client fetch a new token and the image was made
    assert picture(image).size == (64, 64)
    stats = emulator.stats()
    assert stats["error_codes"] == {"111": 1}
    assert stats["token_requests"] == 2


def test_a_token_the_api_does_not_know_is_replaced(emulator_factory, http):
    # Given a warm cache holding a token from an earlier API instance
    emulator = emulator_factory()
    tokens = TokenCache()
    tokens.get((emulator.token_url, ACCESS_KEY), lambda: ("24.from-an-earlier-life.emulator", 3600.0))
    client = client_for(emulator, http, tokens=tokens)

    # When an image is asked for
    (image,) = client.generate(prompt="a cat", width=64, height=64)

    # Then the 401 led to one new token and the image was made
    assert picture(image).size == (64, 64)
    stats = emulator.stats()
    assert stats["responses"].get("401") == 1
    assert stats["token_requests"] == 1


def test_a_token_refused_even_when_fresh_fails_retryably_after_one_refresh(emulator_factory, http):
    # Given an API whose tokens are expired as soon as they are issued
    emulator = emulator_factory(token_ttl_s=0)
    client = client_for(emulator, http)

    # When an image is asked for
    error = api_error(lambda: client.generate(prompt="a cat", width=64, height=64))

    # Then the client gives up after one refresh, with an auth error worth retrying later
    assert (error.kind, error.retryable) == ("auth", True)
    assert "Access token expired" in error.message
    stats = emulator.stats()
    assert (stats["token_requests"], stats["generation_requests"]) == (2, 2)


def test_a_refused_prompt_is_final_and_says_why(emulator_factory, http):
    emulator = emulator_factory("refuse=forbidden")
    client = client_for(emulator, http)

    error = api_error(lambda: client.generate(prompt="a Forbidden scene", width=64, height=64))

    assert (error.kind, error.retryable, error.status) == ("refused", False, 400)
    assert "prompt refused by content policy" in error.message
    assert error.as_record() == {"type": "refused", "message": error.message}
    assert emulator.stats()["generation_requests"] == 1


def test_a_server_failure_is_worth_retrying(emulator_factory, http):
    client = client_for(emulator_factory("fail=doomed"), http)

    error = api_error(lambda: client.generate(prompt="a doomed bird", width=64, height=64))

    assert (error.kind, error.retryable, error.status) == ("unavailable", True, 500)
    assert "image generation failed" in error.message


def test_after_a_brief_outage_the_next_try_succeeds(emulator_factory, http):
    # Given an API that answers 503 once for this prompt
    client = client_for(emulator_factory("flaky=unlucky:1"), http)

    # When the caller tries, then tries again as told
    error = api_error(lambda: client.generate(prompt="an unlucky dog", width=64, height=64))
    (image,) = client.generate(prompt="an unlucky dog", width=64, height=64)

    # Then the first failure said so, and the second try gave the image
    assert (error.kind, error.retryable, error.status) == ("unavailable", True, 503)
    assert picture(image).size == (64, 64)


def test_a_rate_limited_request_is_reported_as_such_and_worth_retrying(emulator_factory, http):
    # Given an API that allows one image now and the next in 100 s
    client = client_for(emulator_factory(rate_limit=0.01), http)
    client.generate(prompt="first", width=64, height=64)

    # When a second image is asked for at once
    error = api_error(lambda: client.generate(prompt="second", width=64, height=64))

    # Then the caller is told to slow down and try again
    assert (error.kind, error.retryable, error.status) == ("rate_limited", True, 429)
    assert "too many requests" in error.message


def test_a_wrong_secret_key_is_a_final_auth_error_that_says_it_was_refused(emulator_factory, http):
    emulator = emulator_factory()
    client = client_for(emulator, http, secret_key="not-the-secret")

    error = api_error(lambda: client.generate(prompt="a cat", width=64, height=64))

    assert (error.kind, error.retryable, error.status) == ("auth", False, 401)
    assert "the token endpoint refused the credentials: Client authentication failed" in error.message
    assert emulator.stats()["generation_requests"] == 0


def test_missing_keys_are_a_final_auth_error_without_calling_the_api(emulator_factory, http):
    emulator = emulator_factory()
    client = client_for(emulator, http, access_key="", secret_key="")

    error = api_error(lambda: client.generate(prompt="a cat", width=64, height=64))

    assert (error.kind, error.retryable) == ("auth", False)
    assert "no API access key/secret key configured" in error.message
    assert emulator.stats()["token_requests"] == 0


def test_an_answer_with_image_urls_is_downloaded(emulator_factory, http):
    client = client_for(emulator_factory("url-only"), http)

    images = client.generate(prompt="a teapot", width=128, height=64, n=2)

    assert [(i.extension, picture(i).size) for i in images] == [("png", (128, 64))] * 2


# --------------------------------------------------------------------------- the API's shape, mocked


def png_bytes(width: int = 8, height: int = 8, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


Answer = httpx.Response | Callable[[httpx.Request], httpx.Response]


class FakeAtlas:
    """A token for any request to the token URL; `answer` for each image request. Records requests."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/oauth/2.0/token":
            return httpx.Response(200, json={"access_token": "tok-1", "expires_in": 2592000})
        return self.answer(request) if callable(self.answer) else self.answer

    def generation_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path == "/v1/images/generations"]


@pytest.fixture
def mocked() -> Iterator[Callable[[Answer], tuple[AtlasClient, FakeAtlas]]]:
    """A client whose HTTP goes to a FakeAtlas answering `answer`."""
    opened: list[httpx.Client] = []

    def make(answer: Answer) -> tuple[AtlasClient, FakeAtlas]:
        fake = FakeAtlas(answer)
        opened.append(httpx.Client(transport=httpx.MockTransport(fake)))
        client = AtlasClient(
            base_url="https://atlas.example/",
            token_url="https://atlas.example/oauth/2.0/token",
            model=MODEL,
            credentials=lambda: Credentials("ak", "sk"),
            http=opened[-1],
            tokens=TokenCache(),
        )
        return client, fake

    yield make
    for http in opened:
        http.close()


def test_the_request_carries_the_prompt_size_count_and_bearer_token(mocked):
    # Given an API that answers every request with one image
    client, fake = mocked(httpx.Response(200, json={"data": [{"b64_json": b64(png_bytes())}]}))

    # When one call has no negative prompt, and another has one and its own model
    client.generate(prompt="a cat", width=512, height=768, n=2)
    client.generate(prompt="a dog", negative_prompt="blurry", width=64, height=64, model="ernie-image-turbo")

    # Then the bodies say exactly what was asked, negative_prompt only when there is one
    first, second = fake.generation_requests()
    assert json.loads(first.content) == {
        "model": MODEL,
        "prompt": "a cat",
        "n": 2,
        "size": "512x768",
        "response_format": "b64_json",
    }
    assert json.loads(second.content) == {
        "model": "ernie-image-turbo",
        "prompt": "a dog",
        "n": 1,
        "size": "64x64",
        "response_format": "b64_json",
        "negative_prompt": "blurry",
    }
    # And both carry the one token, fetched with the client credentials grant
    assert [r.headers["Authorization"] for r in (first, second)] == ["Bearer tok-1"] * 2
    (token_request,) = [r for r in fake.requests if r.url.path == "/oauth/2.0/token"]
    assert dict(token_request.url.params) == {
        "grant_type": "client_credentials",
        "client_id": "ak",
        "client_secret": "sk",
    }


@pytest.mark.parametrize(
    ("fmt", "extension", "content_type"),
    [("PNG", "png", "image/png"), ("JPEG", "jpg", "image/jpeg"), ("WEBP", "webp", "image/webp")],
)
def test_each_image_format_is_saved_with_its_own_extension(mocked, fmt, extension, content_type):
    data = png_bytes(24, 16, fmt)
    client, _ = mocked(httpx.Response(200, json={"data": [{"b64_json": b64(data)}]}))

    (image,) = client.generate(prompt="a cat", width=24, height=16)

    assert (image.extension, image.content_type, image.data) == (extension, content_type, data)
    assert picture(image).format == fmt


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            httpx.Response(200, json={"id": "img-1", "created": 1}),
            "the image API answered 200 without images",
        ),
        (httpx.Response(200, json={"data": []}), "the image API answered 200 without images"),
        (
            httpx.Response(200, text="<html>upstream hiccup</html>"),
            "the image API answered 200 without images",
        ),
        (
            httpx.Response(200, json={"data": [{"b64_json": b64(b"sorry, no image today")}]}),
            "the image API returned data that is not a PNG, JPEG or WebP image",
        ),
        (
            httpx.Response(200, json={"data": [{"b64_json": "%%% not base64"}]}),
            "b64_json is not valid base64",
        ),
        (httpx.Response(200, json={"data": [{"revised_prompt": "x"}]}), "neither b64_json nor url"),
    ],
    ids=["no-data", "empty-data", "html", "not-an-image", "not-base64", "no-image-field"],
)
def test_a_200_answer_without_a_usable_image_is_a_bad_response_worth_retrying(mocked, answer, message):
    client, _ = mocked(answer)

    error = api_error(lambda: client.generate(prompt="a cat", width=64, height=64))

    assert (error.kind, error.retryable) == ("bad_response", True)
    assert message in error.message


@pytest.mark.parametrize(
    ("code", "error_msg", "kind", "retryable"),
    [
        (18, "Open api qps request limit reached", "rate_limited", True),
        (2, "Service temporarily unavailable", "unavailable", True),
        (6, "No permission to access data", "refused", False),
    ],
)
def test_baidu_error_codes_in_a_200_answer_are_classified(mocked, code, error_msg, kind, retryable):
    client, fake = mocked(httpx.Response(200, json={"error_code": code, "error_msg": error_msg}))

    error = api_error(lambda: client.generate(prompt="a cat", width=64, height=64))

    assert (error.kind, error.retryable) == (kind, retryable)
    assert error.message == f"error_code {code}: {error_msg}"
    assert len(fake.generation_requests()) == 1  # not a token problem: no second try


def raise_(exc_type: type[httpx.TransportError], text: str) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        raise exc_type(text, request=request)

    return answer


@pytest.mark.parametrize(
    ("answer", "kind", "message"),
    [
        (
            raise_(httpx.ConnectError, "connection refused"),
            "unavailable",
            "the image API could not be reached",
        ),
        (raise_(httpx.ReadTimeout, "timed out"), "timeout", "the image API did not answer in time"),
    ],
    ids=["connect-error", "read-timeout"],
)
def test_a_network_failure_is_worth_retrying(mocked, answer, kind, message):
    client, _ = mocked(answer)

    error = api_error(lambda: client.generate(prompt="a cat", width=64, height=64))

    assert (error.kind, error.retryable) == (kind, True)
    assert message in error.message
