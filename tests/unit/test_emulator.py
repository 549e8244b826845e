"""The Atlas emulator, exercised over real loopback HTTP the way the local runtime uses it."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from imagepipe_cli.emulator import AtlasEmulator, EmulatorConfig, Fault, parse_fault

SRC = Path(__file__).resolve().parents[2] / "src"
KEYS = {"client_id": "emulator-access-key", "client_secret": "emulator-secret-key"}


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture
def make_emulator() -> Iterator[Callable[..., AtlasEmulator]]:
    """Start an emulator with the given EmulatorConfig fields (faults as --fault strings)."""
    started: list[AtlasEmulator] = []

    def make(*faults: str, **config) -> AtlasEmulator:
        emu = AtlasEmulator(EmulatorConfig(faults=tuple(parse_fault(f) for f in faults), **config)).start()
        started.append(emu)
        return emu

    yield make
    for emu in started:
        emu.stop()


@pytest.fixture
def emulator(make_emulator) -> AtlasEmulator:
    return make_emulator()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def get_token(http: httpx.Client, emu: AtlasEmulator) -> str:
    resp = http.post(emu.token_url, params={"grant_type": "client_credentials", **KEYS})
    assert resp.status_code == 200, resp.text
    return resp.json()["access_token"]


def generate(http: httpx.Client, emu: AtlasEmulator, token: str | None, **body) -> httpx.Response:
    payload = {
        "model": "ernie-image",
        "prompt": "a red fox",
        "n": 1,
        "size": "256x256",
        "response_format": "b64_json",
        **body,
    }
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return http.post(f"{emu.base_url}/v1/images/generations", json=payload, headers=headers)


def png_of(item: dict) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
    assert img.format == "PNG"
    return img


# --------------------------------------------------------------------------- tokens


def test_token_is_issued_for_the_right_keys_by_get_and_by_form_post(emulator, http):
    # Given the emulator's default keys
    params = {"grant_type": "client_credentials", **KEYS}

    # When a token is asked for in the query string and in a form body
    by_get = http.get(emulator.token_url, params=params)
    by_form = http.post(emulator.token_url, data=params)

    # Then both answer 200 with a Baidu-shaped token document, each token different
    for resp in (by_get, by_form):
        assert resp.status_code == 200
        body = resp.json()
        assert body["expires_in"] == 2592000
        assert body["scope"] == "emulator"
        assert {"access_token", "refresh_token", "session_key", "session_secret"} <= body.keys()
    assert by_get.json()["access_token"] != by_form.json()["access_token"]


def test_token_reports_the_configured_ttl(make_emulator, http):
    # Given an emulator with a one-hour token lifetime
    emu = make_emulator(token_ttl_s=3600)

    # When a token is issued
    resp = http.post(emu.token_url, params={"grant_type": "client_credentials", **KEYS})

    # Then expires_in says so
    assert resp.json()["expires_in"] == 3600


@pytest.mark.parametrize(
    ("params", "status", "error", "description"),
    [
        ({**KEYS, "client_secret": "wrong"}, 401, "invalid_client", "Client authentication failed"),
        ({**KEYS, "client_id": "nobody"}, 401, "invalid_client", "unknown client id"),
        ({"client_secret": KEYS["client_secret"]}, 401, "invalid_client", "unknown client id"),
        ({**KEYS, "grant_type": "password"}, 400, "unsupported_grant_type", None),
    ],
    ids=["wrong-secret", "unknown-client", "missing-client", "wrong-grant"],
)
def test_token_is_refused_for_bad_credentials(emulator, http, params, status, error, description):
    # Given credentials that are wrong in one way
    query = {"grant_type": "client_credentials", **params}

    # When a token is requested
    resp = http.post(emulator.token_url, params=query)

    # Then the OAuth-style error tells which
    assert resp.status_code == status
    assert resp.json()["error"] == error
    if description:
        assert resp.json()["error_description"] == description


# --------------------------------------------------------------------------- generation


def test_b64_generation_returns_real_pngs_of_the_requested_size(emulator, http):
    # Given a valid token
    token = get_token(http, emulator)

    # When two non-square images are generated as base64
    resp = generate(http, emulator, token, n=2, size="320x192", model="ernie-image-turbo")

    # Then both decode to PNGs of exactly that size, differing from each other
    assert resp.status_code == 200
    body = resp.json()
    assert body["id"].startswith("img-")
    assert body["model"] == "ernie-image-turbo"
    assert isinstance(body["created"], int)
    images = [png_of(item) for item in body["data"]]
    assert [img.size for img in images] == [(320, 192), (320, 192)]
    assert body["data"][0]["b64_json"] != body["data"][1]["b64_json"]


def test_same_prompt_and_size_give_the_same_image(emulator, http):
    # Given a valid token
    token = get_token(http, emulator)

    # When the same prompt is generated twice, and a different prompt once
    first = generate(http, emulator, token, prompt="a lighthouse at dusk").json()["data"][0]
    again = generate(http, emulator, token, prompt="a lighthouse at dusk").json()["data"][0]
    other = generate(http, emulator, token, prompt="a castle at noon").json()["data"][0]

    # Then the images are deterministic per prompt
    assert first == again
    assert first != other


def test_url_answer_is_downloadable(emulator, http):
    # Given a valid token
    token = get_token(http, emulator)

    # When an image is generated with response_format=url
    resp = generate(http, emulator, token, response_format="url", size="128x96")

    # Then the url serves a PNG of that size from the emulator
    url = resp.json()["data"][0]["url"]
    assert url.startswith(f"{emulator.base_url}/files/") and url.endswith(".png")
    download = http.get(url)
    assert download.status_code == 200
    assert download.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(download.content)).size == (128, 96)


def test_unknown_file_is_404(emulator, http):
    # When a file that was never generated is downloaded
    resp = http.get(f"{emulator.base_url}/files/nope.png")

    # Then it is a 404
    assert resp.status_code == 404


def test_url_only_fault_answers_url_even_when_b64_is_asked(make_emulator, http):
    # Given an emulator that only answers with urls
    emu = make_emulator("url-only")
    token = get_token(http, emu)

    # When base64 is requested
    resp = generate(http, emu, token, response_format="b64_json")

    # Then a url comes back anyway
    (item,) = resp.json()["data"]
    assert set(item) == {"url"}
    assert http.get(item["url"]).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic abc"}],
    ids=["missing", "unknown", "wrong-scheme"],
)
def test_generation_without_a_valid_token_is_401(emulator, http, headers):
    # When generating without a token the emulator issued
    resp = http.post(f"{emulator.base_url}/v1/images/generations", json={"prompt": "x"}, headers=headers)

    # Then it is rejected with invalid_token
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_token"


def test_expired_token_is_reported_baidu_style(make_emulator, http):
    # Given tokens that expire immediately
    emu = make_emulator(token_ttl_s=0)
    token = get_token(http, emu)

    # When one is used
    resp = generate(http, emu, token)

    # Then Baidu's odd "HTTP 200 with error_code 111" comes back, and no image
    assert resp.status_code == 200
    assert resp.json() == {"error_code": 111, "error_msg": "Access token expired"}
    assert emu.stats()["images"] == 0


def test_revoke_tokens_every_revokes_then_a_new_token_works(make_emulator, http):
    # Given tokens that are revoked after every 2 successful generations
    emu = make_emulator("revoke-tokens-every=2")
    token = get_token(http, emu)

    # When the same token is used three times
    results = [generate(http, emu, token) for _ in range(3)]

    # Then the first two work and the third gets error_code 110
    assert [r.status_code for r in results] == [200, 200, 200]
    assert "data" in results[0].json() and "data" in results[1].json()
    assert results[2].json() == {"error_code": 110, "error_msg": "Access token invalid or no longer valid"}

    # And a freshly issued token works again
    assert "data" in generate(http, emu, get_token(http, emu)).json()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"not json", "JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"n": 1}', "prompt"),
        (b'{"prompt": "   "}', "prompt"),
        (b'{"prompt": "x", "n": 0}', "n must be"),
        (b'{"prompt": "x", "n": 5}', "n must be"),
        (b'{"prompt": "x", "n": "2"}', "n must be"),
        (b'{"prompt": "x", "size": "1024"}', "size"),
        (b'{"prompt": "x", "size": "32x32"}', "size"),
        (b'{"prompt": "x", "size": "4096x1024"}', "size"),
        (b'{"prompt": "x", "response_format": "jpeg"}', "response_format"),
    ],
)
def test_invalid_request_body_is_400_with_a_reason(emulator, http, content, needle):
    # Given a valid token
    token = get_token(http, emulator)

    # When the body is malformed
    resp = http.post(
        f"{emulator.base_url}/v1/images/generations",
        content=content,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )

    # Then it is a 400 invalid_request whose message names the problem
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "invalid_request"
    assert needle in error["message"]


# --------------------------------------------------------------------------- faults


def test_refuse_fault_blocks_matching_prompts_case_insensitively(make_emulator, http):
    # Given an emulator refusing prompts that mention "weapon"
    emu = make_emulator("refuse=weapon")
    token = get_token(http, emu)

    # When a matching and a harmless prompt are sent
    refused = generate(http, emu, token, prompt="A shiny WEAPON on a table")
    fine = generate(http, emu, token, prompt="a bowl of fruit")

    # Then only the matching one is refused, with a content-policy error
    assert refused.status_code == 400
    assert refused.json()["error"] == {
        "code": "content_policy_violation",
        "message": "prompt refused by content policy (emulator fault refuse=weapon)",
    }
    assert fine.status_code == 200


def test_fail_fault_always_500s(make_emulator, http):
    # Given an emulator that always fails prompts containing "boom"
    emu = make_emulator("fail=boom")
    token = get_token(http, emu)

    # When a matching prompt is retried
    codes = [generate(http, emu, token, prompt="a boom box").status_code for _ in range(3)]

    # Then every attempt is a 500 internal_error, while other prompts work
    assert codes == [500, 500, 500]
    assert generate(http, emu, token, prompt="boo").status_code == 200
    assert generate(http, emu, token, prompt="a boom box").json()["error"]["code"] == "internal_error"


def test_flaky_fault_fails_n_times_then_succeeds(make_emulator, http):
    # Given prompts with "storm" fail twice before succeeding
    emu = make_emulator("flaky=storm:2")
    token = get_token(http, emu)

    # When a matching prompt is retried, with an unrelated prompt in between
    first = generate(http, emu, token, prompt="a storm at sea")
    other = generate(http, emu, token, prompt="calm lake")
    second = generate(http, emu, token, prompt="Storm clouds")
    third = generate(http, emu, token, prompt="a storm at sea")

    # Then the first two matching requests are 503 unavailable and the third works
    assert [first.status_code, second.status_code, third.status_code] == [503, 503, 200]
    assert first.json()["error"]["code"] == "unavailable"
    assert other.status_code == 200


def test_flaky_fault_counts_are_exact_under_concurrency(make_emulator, http):
    # Given prompts with "storm" fail exactly 5 times
    emu = make_emulator("flaky=storm:5")
    token = get_token(http, emu)

    # When 12 matching requests arrive concurrently
    with ThreadPoolExecutor(max_workers=6) as pool:
        codes = list(
            pool.map(
                lambda _: generate(http, emu, token, prompt="storm", size="64x64").status_code, range(12)
            )
        )

    # Then exactly 5 got 503
    assert sorted(codes) == [200] * 7 + [503] * 5


@pytest.mark.parametrize(("rate", "expected"), [("1", 500), ("0", 200)])
def test_error_rate_fault(make_emulator, http, rate, expected):
    # Given an error rate of 100% or 0%
    emu = make_emulator(f"error-rate={rate}")
    token = get_token(http, emu)

    # When several requests are sent
    codes = {generate(http, emu, token, size="64x64").status_code for _ in range(4)}

    # Then all of them get the same outcome
    assert codes == {expected}


def test_error_rate_is_reproducible_with_the_same_seed(make_emulator, http):
    # Given two emulators with a 50% error rate and the same seed
    outcomes = []
    for _ in range(2):
        emu = make_emulator("error-rate=0.5", seed=7)
        token = get_token(http, emu)
        # When the same sequence of requests is sent to each
        outcomes.append([generate(http, emu, token, size="64x64").status_code for _ in range(12)])

    # Then they fail at the same places, and some but not all fail
    assert outcomes[0] == outcomes[1]
    assert {200, 500} == set(outcomes[0])


def test_rate_limit_gives_429_with_retry_after_under_a_burst(make_emulator, http):
    # Given a limit of one generation request per second
    emu = make_emulator(rate_limit=1)
    token = get_token(http, emu)

    # When a burst of requests is sent back to back
    responses = [generate(http, emu, token, size="64x64") for _ in range(15)]

    # Then some pass and the rest get 429 rate_limited with Retry-After: 1
    codes = [r.status_code for r in responses]
    assert 200 in codes and 429 in codes
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["retry-after"] == "1"
    assert limited.json()["error"]["code"] == "rate_limited"


def test_latency_setting_still_answers_concurrent_clients(make_emulator, http):
    # Given an emulator that sleeps 50 ms per generation
    emu = make_emulator(latency_ms=50)
    token = get_token(http, emu)

    # When 8 clients generate at the same time
    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(lambda _: generate(http, emu, token, size="64x64").status_code, range(8)))

    # Then every one succeeds and every image is counted
    assert codes == [200] * 8
    assert emu.stats()["images"] == 8


# --------------------------------------------------------------------------- stats and misc


def test_stats_count_traffic_and_reset_zeroes_them(emulator, http):
    # Given some traffic: one token, two generations (one good, one bad), one unauthorised
    token = get_token(http, emulator)
    generate(http, emulator, token, n=3, size="64x64")
    generate(http, emulator, token, n=9)
    generate(http, emulator, None)

    # When stats are read over HTTP and through the Python API
    over_http = http.get(f"{emulator.base_url}/_emulator/stats").json()

    # Then they count requests, images and response codes
    assert over_http == emulator.stats()
    assert over_http["emulator"] is True
    assert over_http["token_requests"] == 1
    assert over_http["generation_requests"] == 3
    assert over_http["images"] == 3
    assert over_http["responses"] == {"200": 2, "400": 1, "401": 1}

    # And reset brings every counter back to zero
    assert http.post(f"{emulator.base_url}/_emulator/reset").status_code == 200
    after = emulator.stats()
    assert (after["token_requests"], after["generation_requests"], after["images"]) == (0, 0, 0)
    assert after["responses"] == {}


def test_every_response_names_the_emulator_and_unknown_paths_are_json_404(emulator, http):
    # When an unknown path, a wrong method and a real endpoint are called
    missing = http.get(f"{emulator.base_url}/v2/whatever")
    wrong_method = http.get(f"{emulator.base_url}/v1/images/generations")
    token = http.get(emulator.token_url, params={"grant_type": "client_credentials", **KEYS})

    # Then all carry the emulator's Server header, and errors are JSON
    for resp in (missing, wrong_method, token):
        assert resp.headers["server"] == "imagepipe-atlas-emulator"
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405


def test_context_manager_starts_and_stops_the_server(http):
    # Given an emulator used as a context manager
    with AtlasEmulator() as emu:
        url = emu.base_url
        # Then it serves while inside the block, on loopback with an ephemeral port
        assert url.startswith("http://127.0.0.1:") and not url.endswith("/")
        assert emu.token_url == f"{url}/oauth/2.0/token"
        assert http.get(f"{url}/_emulator/stats").status_code == 200

    # And after the block the port no longer answers
    with pytest.raises(httpx.TransportError), httpx.Client(timeout=5) as fresh:
        fresh.get(f"{url}/_emulator/stats")


def test_serve_announces_itself_and_stops_cleanly_on_ctrl_c(tmp_path):
    # Given `serve` running in its own process
    code = (
        "from imagepipe_cli.emulator import EmulatorConfig, serve\n"
        "serve(EmulatorConfig(access_key='AK1', secret_key='SK1'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        # When it has printed its banner
        banner = proc.stdout.readline()

        # Then the banner says it is the emulator, where it listens and which keys to use
        assert "EMULATOR" in banner and "not the real" in banner
        assert "AK1" in banner and "SK1" in banner
        url = next(word for word in banner.split() if word.startswith("http://127.0.0.1:"))
        params = {"grant_type": "client_credentials", "client_id": "AK1", "client_secret": "SK1"}
        resp = httpx.get(f"{url}/oauth/2.0/token", params=params)
        assert resp.status_code == 200

        # And Ctrl-C stops it with exit code 0 and nothing on stderr
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert err == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- parse_fault


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ("refuse=weapon", Fault("refuse", word="weapon")),
        ("fail=boom", Fault("fail", word="boom")),
        ("flaky=storm:3", Fault("flaky", word="storm", count=3)),
        ("flaky=a:b:2", Fault("flaky", word="a:b", count=2)),
        ("error-rate=0.25", Fault("error-rate", probability=0.25)),
        ("revoke-tokens-every=10", Fault("revoke-tokens-every", count=10)),
        ("url-only", Fault("url-only")),
        (" URL-ONLY ", Fault("url-only")),
    ],
)
def test_parse_fault_accepts_the_documented_syntax(text, fault):
    # When a valid --fault string is parsed, Then it gives the matching Fault, printable back as syntax
    assert parse_fault(text) == fault
    assert parse_fault(str(fault)) == fault


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("explode=1", "unknown fault 'explode=1': expected one of refuse=WORD"),
        ("", "empty fault"),
        ("refuse", "needs an argument: refuse=WORD"),
        ("fail=", "needs an argument: fail=WORD"),
        ("flaky=storm", "flaky=WORD:N"),
        ("flaky=storm:0", "N must be a whole number >= 1"),
        ("flaky=storm:x", "N must be a whole number >= 1"),
        ("error-rate=1.5", "P must be a number between 0 and 1"),
        ("error-rate=lots", "P must be a number between 0 and 1"),
        ("revoke-tokens-every=-2", "N must be a whole number >= 1"),
        ("url-only=yes", "takes no argument"),
    ],
)
def test_parse_fault_rejects_bad_syntax_with_a_one_line_message(text, needle):
    # When a malformed --fault string is parsed
    with pytest.raises(ValueError) as excinfo:
        parse_fault(text)

    # Then the message is one line naming the problem
    message = str(excinfo.value)
    assert needle in message
    assert "\n" not in message
