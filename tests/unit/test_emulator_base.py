"""What every API emulator shares (emulators/base.py), exercised over real loopback HTTP against all four:
the PNGs, the HTTP server (keep-alive, chunked and oversized bodies, malformed requests, errors in the
API's own shape), faults and rate limit, counters, expiring files, stopping, and `imagepipe emulator`.
Each API's own request and answer shapes are tested in test_provider_*.py."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException, HTTPMessage, HTTPResponse
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from imagepipe_cli import cli
from imagepipe_cli.emulators import EmulatorConfig, Fault, emulator_class
from imagepipe_cli.emulators import base as emulator_base
from imagepipe_cli.emulators.base import MAX_BODY_BYTES, parse_fault, render_png

APIS = ["atlascloud", "qianfan", "openai", "baidu-oauth"]
# Every fault shape (FLAG, WORD, WORD:N, P, N) is declared by the Baidu OAuth emulator.
ALL_SHAPES = emulator_class("baidu-oauth").FAULTS
PROMPT = "a lighthouse at dusk"

# One image generation in each API's own request shape, at a size every API takes.
GENERATE: dict[str, tuple[str, dict[str, Any]]] = {
    "atlascloud": (
        "/api/v1/model/generateImage",
        {"model": "baidu/ERNIE-Image-Turbo/text-to-image", "size": "1024*1024"},
    ),
    "qianfan": ("/v2/images/generations", {"model": "irag-1.0", "size": "1024x1024"}),
    "openai": ("/v1/images/generations", {"model": "gpt-image-1", "size": "1024x1024"}),
    "baidu-oauth": (
        "/v1/images/generations",
        {"model": "sd_xl", "size": "1024x1024", "response_format": "b64_json"},
    ),
}


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def auth(emulator, http: httpx.Client) -> dict[str, str]:
    """The Authorization header a client of this API sends (Baidu: a token from its OAuth endpoint first)."""
    if emulator.name == "baidu-oauth":
        params = {
            "grant_type": "client_credentials",
            "client_id": emulator.keys["BAIDU_API_KEY"],
            "client_secret": emulator.keys["BAIDU_SECRET_KEY"],
        }
        token = http.post(f"{emulator.base_url}/oauth/2.0/token", params=params).json()["access_token"]
    else:
        (token,) = emulator.keys.values()
    return {"Authorization": f"Bearer {token}"}


def request_body(name: str, prompt: str = PROMPT, n: int = 1) -> bytes:
    return json.dumps({**GENERATE[name][1], "prompt": prompt, "n": n}).encode()


def generate(emulator, http: httpx.Client, headers: dict[str, str], prompt: str = PROMPT, n: int = 1):
    """One paid request (Atlas Cloud: the submit) in the API's own shape."""
    path, body = GENERATE[emulator.name]
    return http.post(f"{emulator.base_url}{path}", json={**body, "prompt": prompt, "n": n}, headers=headers)


def outcome(resp) -> str:
    """What a client makes of an answer. Baidu v1 answers some errors as HTTP 200 with an error_code."""
    body = resp.json() if "json" in resp.headers.get("content-type", "") else None
    if resp.status_code == 200 and isinstance(body, dict) and "error_code" in body:
        return {18: "rate limited", 2: "unavailable"}.get(body["error_code"], f"error {body['error_code']}")
    return {200: "ok", 429: "rate limited", 500: "server error", 503: "unavailable"}.get(
        resp.status_code, f"HTTP {resp.status_code}"
    )


def error_message(name: str, resp) -> str:
    """The message of an error answer, after checking it has the API's own error shape."""
    body = resp.json()
    if name == "atlascloud":
        assert set(body) == {"code", "msg", "request_id", "data"}
        assert (body["code"], body["data"]) == (resp.status_code, None)
        assert resp.headers["x-request-id"] == body["request_id"]
        return body["msg"]
    if name == "qianfan":
        assert set(body) == {"error", "id"} and body["id"].startswith("as-")
        assert set(body["error"]) == {"code", "message", "type"}
        return body["error"]["message"]
    if name == "openai":
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        return body["error"]["message"]
    assert set(body) == {"error_code", "error_msg"}
    return body["error_msg"]


def images_served(emulator, http: httpx.Client, headers: dict[str, str], prompt: str, n: int) -> list[bytes]:
    """The image files one generation gives, fetched the way a client of that API fetches them."""
    answer = generate(emulator, http, headers, prompt, n)
    assert outcome(answer) == "ok", answer.text
    if emulator.name == "atlascloud":
        prediction = answer.json()["data"]["id"]
        poll = http.get(f"{emulator.base_url}/api/v1/model/prediction/{prediction}", headers=headers)
        return [http.get(url).content for url in poll.json()["data"]["outputs"]]
    items = answer.json()["data"]
    return [http.get(i["url"]).content if "url" in i else base64.b64decode(i["b64_json"]) for i in items]


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        image.load()  # the whole file decodes, not just its header
        return image.size


@dataclass
class Answer:
    status_code: int
    headers: HTTPMessage
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


class RawConnection:
    """One TCP connection to an emulator, for requests an HTTP client would not send as written."""

    def __init__(self, emulator) -> None:
        url = urlsplit(emulator.base_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=5)

    def send(self, data: bytes) -> Answer:
        self.sock.sendall(data)
        resp = HTTPResponse(self.sock)
        resp.begin()
        return Answer(resp.status, resp.headers, resp.read())

    def closed_by_server(self) -> bool:
        return self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw() -> Iterator[list[RawConnection]]:
    opened: list[RawConnection] = []
    yield opened
    for conn in opened:
        conn.close()


def connect(raw: list[RawConnection], emulator) -> RawConnection:
    conn = RawConnection(emulator)
    raw.append(conn)
    return conn


def post_bytes(emulator, headers: dict[str, str], extra: str, body: bytes = b"") -> bytes:
    path = GENERATE[emulator.name][0]
    lines = [f"POST {path} HTTP/1.1", "Host: emulator", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode() + body


def stats_request() -> bytes:
    return b"GET /_emulator/stats HTTP/1.1\r\nHost: emulator\r\n\r\n"


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("size", [(64, 64), (320, 192), (192, 320), (768, 1376), (2048, 64)])
def test_images_are_real_pngs_of_exactly_the_requested_size(size):
    # When an image is drawn at a square, a wide, a tall or an extreme size
    data = render_png("a red fox in the snow at night, very detailed", *size)

    # Then it is a PNG that decodes in full at exactly that size
    assert png_size(data) == size


def test_the_same_prompt_size_and_index_always_give_the_same_image():
    # When an image is drawn twice, and once more with only one thing changed
    first = render_png(PROMPT, 320, 192)
    again = render_png(PROMPT, 320, 192)
    others = [
        render_png("a castle at noon", 320, 192),
        render_png(PROMPT, 192, 320),
        render_png(PROMPT, 320, 192, index=1),
    ]

    # Then the repeat is byte for byte the same and each change gives a different image
    assert first == again
    assert all(other != first for other in others)


@pytest.mark.parametrize("name", APIS)
def test_every_api_serves_the_same_drawing_for_the_same_prompt(emulator_factory, http, name):
    # Given an emulator and a client of its API
    emulator = emulator_factory(name)
    headers = auth(emulator, http)

    # When the same prompt is generated twice, two images each time
    first = images_served(emulator, http, headers, PROMPT, n=2)
    again = images_served(emulator, http, headers, PROMPT, n=2)

    # Then both times give the shared drawing: two different 1024x1024 PNGs, the same each time
    expected = [render_png(PROMPT, 1024, 1024, i) for i in range(2)]
    assert first == again == expected
    assert [png_size(image) for image in first] == [(1024, 1024)] * 2
    assert first[0] != first[1]


# --------------------------------------------------------------------------- HTTP


def test_a_hundred_clients_connecting_at_once_are_all_taken_in():
    # Given an emulator's server that has not accepted any connection yet (busy, as under a burst)
    emulator = emulator_class("atlascloud")(EmulatorConfig())
    server = emulator_base._Server(("127.0.0.1", 0), emulator)
    clients: list[socket.socket] = []
    try:
        # When a hundred clients connect - ten generator invocations of ten tasks each
        for _ in range(100):
            clients.append(socket.create_connection(server.server_address[:2], timeout=2))
    except TimeoutError:
        pass
    finally:
        for client in clients:
            client.close()
        server.server_close()

    # Then the kernel completed every handshake: none waits for TCP's SYN retry (a second of billed Lambda
    # time each) because the listen backlog was full - socketserver's default of 5 held 6
    assert len(clients) == 100


@pytest.mark.parametrize("name", APIS)
def test_one_kept_alive_connection_serves_request_after_request(emulator_factory, http, name):
    # Given an emulator and one HTTP/1.1 connection to it
    emulator = emulator_factory(name)
    headers = {"Content-Type": "application/json", **auth(emulator, http)}
    url = urlsplit(emulator.base_url)
    conn = HTTPConnection(url.hostname, url.port, timeout=5)
    path = GENERATE[name][0]

    # When stats, a generation, an unknown path, a wrong method and stats again are sent on it
    answers, sockets = [], []
    for method, target, body in [
        ("GET", "/_emulator/stats", None),
        ("POST", path, request_body(name)),
        ("GET", "/v9/nothing", None),
        ("GET", path, None),
        ("GET", "/_emulator/stats", None),
    ]:
        conn.request(method, target, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        answers.append(resp)
        sockets.append(conn.sock)
    conn.close()

    # Then every request is answered on the same socket, each answer naming the emulator
    assert [a.status for a in answers] == [200, 200, 404, 405, 200]
    assert sockets[0] is not None and all(s is sockets[0] for s in sockets)
    assert {a.headers["Server"] for a in answers} == {f"imagepipe-{name}-emulator"}


@pytest.mark.parametrize("name", APIS)
def test_a_chunked_body_is_read_like_a_sized_one(emulator_factory, http, raw, name):
    # Given a generation request sent in chunks, with a chunk extension and a trailer
    emulator = emulator_factory(name)
    body = request_body(name)
    third = len(body) // 3
    chunks = [body[:third], body[third : 2 * third], body[2 * third :]]
    encoded = b"".join(b"%x;note=1\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\nX-Trailer: 1\r\n\r\n"
    headers = {"Content-Type": "application/json", "Transfer-Encoding": "chunked", **auth(emulator, http)}
    conn = connect(raw, emulator)

    # When it is sent, and then another request on the same connection
    answer = conn.send(post_bytes(emulator, headers, "", encoded))
    after = conn.send(stats_request())

    # Then the generation succeeds and the connection is still in step for the next request
    assert outcome(answer) == "ok", answer.content
    assert after.status_code == 200 and after.json()["paid"] == 1


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("name", APIS)
def test_a_body_over_the_limit_is_refused_with_413_in_the_apis_shape(emulator_factory, http, name, framing):
    # Given a request body one byte over the limit, sent with a length or in chunks
    emulator = emulator_factory(name)
    oversized = b"x" * (MAX_BODY_BYTES + 1)
    content = oversized if framing == "content-length" else iter([oversized[:65536], oversized[65536:]])
    path = GENERATE[name][0]

    # When it is posted
    resp = http.post(f"{emulator.base_url}{path}", content=content, headers=auth(emulator, http))

    # Then it is a 413 in the API's own error shape, the connection is closed, nothing is paid
    assert resp.status_code == 413
    assert str(MAX_BODY_BYTES) in error_message(name, resp)
    assert resp.headers["connection"] == "close"
    assert "paid" not in emulator.stats()
    # And the emulator goes on serving
    assert outcome(generate(emulator, http, auth(emulator, http))) == "ok"


@pytest.mark.parametrize("name", APIS)
def test_unknown_paths_are_404_and_wrong_methods_405_in_the_apis_shape(emulator_factory, http, name):
    # Given an emulator
    emulator = emulator_factory(name)
    path = GENERATE[name][0]

    # When an unknown path and a wrong method on a real endpoint are called
    missing = http.get(f"{emulator.base_url}/v9/nothing")
    wrong_method = http.delete(f"{emulator.base_url}{path}")

    # Then both are errors in the API's own shape naming what was wrong, the 405 saying what is allowed
    assert missing.status_code == 404
    assert "/v9/nothing" in error_message(name, missing)
    assert wrong_method.status_code == 405
    assert f"DELETE not allowed on {path}" in error_message(name, wrong_method)
    assert wrong_method.headers["allow"] == "POST"
    assert missing.headers["server"] == wrong_method.headers["server"] == f"imagepipe-{name}-emulator"


MALFORMED = {
    "too-many-words": (b"GET /a b HTTP/1.1\r\nHost: e\r\n\r\n", 400, "Bad request syntax"),
    "unknown-method": (b"BREW /pot HTTP/1.1\r\nHost: e\r\n\r\n", 501, "Unsupported method ('BREW')"),
    "header-too-long": (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, "Line too long"),
    "too-many-headers": (
        b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n",
        431,
        "Too many headers",
    ),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
@pytest.mark.parametrize("name", APIS)
def test_a_malformed_request_gets_an_error_in_the_apis_shape_and_a_closed_connection(
    emulator_factory, raw, name, case
):
    # Given an emulator
    emulator = emulator_factory(name)
    data, status, reason = MALFORMED[case]
    conn = connect(raw, emulator)

    # When a request the HTTP parser rejects is sent
    answer = conn.send(data)

    # Then the answer says why, in the API's own error shape, and the connection is closed
    assert answer.status_code == status
    assert reason in error_message(name, answer)
    assert answer.headers["Connection"] == "close" and conn.closed_by_server()


BAD_BODIES = {
    "bad-content-length": ("Content-Length: ten\r\n", b"", "bad Content-Length header"),
    "chunk-size-not-hex": (
        "Transfer-Encoding: chunked\r\n",
        b"zz\r\nab\r\n0\r\n\r\n",
        "malformed chunked body",
    ),
    "negative-chunk-size": (
        "Transfer-Encoding: chunked\r\n",
        b"-1\r\nab\r\n0\r\n\r\n",
        "malformed chunked body",
    ),
}


@pytest.mark.parametrize("case", BAD_BODIES, ids=list(BAD_BODIES))
@pytest.mark.parametrize("name", APIS)
def test_a_badly_framed_body_is_400_in_the_apis_shape_and_closes_the_connection(
    emulator_factory, http, raw, name, case
):
    # Given a request whose body length cannot be known
    emulator = emulator_factory(name)
    header, body, reason = BAD_BODIES[case]
    conn = connect(raw, emulator)

    # When it is sent
    answer = conn.send(post_bytes(emulator, auth(emulator, http), header, body))

    # Then it is a 400 in the API's own shape, at once, and the connection is closed; nothing is paid
    assert answer.status_code == 400
    assert error_message(name, answer) == reason
    assert answer.headers["Connection"] == "close" and conn.closed_by_server()
    assert "paid" not in emulator.stats()


@pytest.mark.parametrize("content", [b"not json", b"[1, 2]"], ids=["not-json", "not-an-object"])
@pytest.mark.parametrize("name", APIS)
def test_a_body_that_is_not_a_json_object_is_refused_in_the_apis_shape(emulator_factory, http, name, content):
    # Given a client with valid credentials
    emulator = emulator_factory(name)
    headers = {"Content-Type": "application/json", **auth(emulator, http)}

    # When the body is not a JSON object
    resp = http.post(f"{emulator.base_url}{GENERATE[name][0]}", content=content, headers=headers)

    # Then it is refused in the API's own shape (Baidu v1: HTTP 200 with an error_code), and not paid
    assert resp.status_code == (200 if name == "baidu-oauth" else 400)
    assert "JSON" in error_message(name, resp)
    assert "paid" not in emulator.stats()


# --------------------------------------------------------------------------- fault strings and config


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ("refuse=weapon", Fault("refuse", word="weapon")),
        ("Refuse=Weapon", Fault("refuse", word="Weapon")),
        ("fail=boom", Fault("fail", word="boom")),
        ("flaky=storm:3", Fault("flaky", word="storm", count=3)),
        ("flaky=a:b:2", Fault("flaky", word="a:b", count=2)),
        ("error-rate=0.25", Fault("error-rate", probability=0.25)),
        ("revoke-tokens-every=10", Fault("revoke-tokens-every", count=10)),
        ("expire-tokens", Fault("expire-tokens")),
        (" EXPIRE-TOKENS ", Fault("expire-tokens")),
    ],
)
def test_parse_fault_accepts_the_documented_syntax(text, fault):
    # When a valid --fault string is parsed
    parsed = parse_fault(text, ALL_SHAPES)

    # Then it gives the matching Fault, which prints back as the same syntax
    assert parsed == fault
    assert parse_fault(str(parsed), ALL_SHAPES) == fault


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("explode=1", "unknown fault 'explode=1': expected one of refuse=WORD, fail=WORD, flaky=WORD:N"),
        ("", "unknown fault ''"),
        ("refuse", "needs an argument: refuse=WORD"),
        ("fail=", "needs an argument: fail=WORD"),
        ("flaky=storm", "needs a word and a count: flaky=WORD:N"),
        ("flaky=:3", "needs a word and a count: flaky=WORD:N"),
        ("flaky=storm:0", "N must be a whole number >= 1"),
        ("flaky=storm:x", "N must be a whole number >= 1"),
        ("error-rate=1.5", "P must be a number between 0 and 1"),
        ("error-rate=lots", "P must be a number between 0 and 1"),
        ("error-rate=nan", "P must be a number between 0 and 1"),
        ("revoke-tokens-every=-2", "N must be a whole number >= 1"),
        ("revoke-tokens-every=1.5", "N must be a whole number >= 1"),
        ("expire-tokens=yes", "expire-tokens takes no argument"),
    ],
)
def test_parse_fault_rejects_bad_syntax_with_a_one_line_message(text, needle):
    # When a malformed --fault string is parsed
    with pytest.raises(ValueError) as excinfo:
        parse_fault(text, ALL_SHAPES)

    # Then the message is one line naming the problem and the right syntax
    message = str(excinfo.value)
    assert needle in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("name", "config", "needle"),
    [
        ("openai", {"latency_ms": -1}, "latency_ms must be >= 0"),
        ("qianfan", {"rate_limit": 0}, "rate_limit must be > 0"),
        (
            "qianfan",
            {"faults": (Fault("url-only"),)},
            "the Baidu Qianfan v2 emulator has no fault 'url-only'",
        ),
    ],
    ids=["negative-latency", "zero-rate-limit", "fault-of-another-api"],
)
def test_an_impossible_config_is_refused_before_serving(name, config, needle):
    # When an emulator is made with a setting it cannot honour
    with pytest.raises(ValueError) as excinfo:
        emulator_class(name)(EmulatorConfig(**config))

    # Then it says which, in one line
    assert needle in str(excinfo.value) and "\n" not in str(excinfo.value)


# --------------------------------------------------------------------------- faults, rate limit, concurrency


@pytest.mark.parametrize(("rate", "expected"), [("1", "server error"), ("0", "ok")])
@pytest.mark.parametrize("name", APIS)
def test_an_error_rate_of_one_always_fails_and_of_zero_never(emulator_factory, http, name, rate, expected):
    # Given an error rate of 100% or 0%
    emulator = emulator_factory(name, f"error-rate={rate}")
    headers = auth(emulator, http)

    # When several requests are sent
    outcomes = {outcome(generate(emulator, http, headers)) for _ in range(4)}

    # Then all of them get the same outcome
    assert outcomes == {expected}


@pytest.mark.parametrize("name", APIS)
def test_the_seeded_error_rate_fails_the_same_requests_every_run(emulator_factory, http, name):
    # Given emulators with a 50% error rate, two with seed 7 and one with seed 8
    runs = []
    for seed in (7, 7, 8):
        emulator = emulator_factory(name, "error-rate=0.5", seed=seed)
        headers = auth(emulator, http)
        # When the same 12 requests are sent to each
        runs.append([outcome(generate(emulator, http, headers)) for _ in range(12)])

    # Then the same seed fails at the same places, some but not all, and another seed elsewhere
    assert runs[0] == runs[1]
    assert set(runs[0]) == {"ok", "server error"}
    assert runs[2] != runs[0]


@pytest.mark.parametrize("name", APIS)
def test_the_rate_limit_refuses_a_burst_unpaid_and_lets_requests_through_again(emulator_factory, http, name):
    # Given a limit of two paid requests per second
    emulator = emulator_factory(name, rate_limit=2)
    headers = auth(emulator, http)

    # When four requests are sent back to back, then one more after half a second
    burst = [outcome(generate(emulator, http, headers)) for _ in range(4)]
    time.sleep(0.55)
    later = outcome(generate(emulator, http, headers))

    # Then the first two pass and the rest get the API's rate-limit answer, unpaid; later one passes again
    assert burst == ["ok", "ok", "rate limited", "rate limited"]
    assert later == "ok"
    assert emulator.stats()["paid"] == 3


@pytest.mark.parametrize("name", APIS)
def test_paid_calls_and_rate_limit_refusals_are_counted_second_by_second(emulator_factory, http, name):
    # Given a limit of two paid requests per second (what `make bench` reads its rates from)
    emulator = emulator_factory(name, rate_limit=2)
    headers = auth(emulator, http)

    # When five requests are sent back to back
    outcomes = [outcome(generate(emulator, http, headers)) for _ in range(5)]

    # Then every answer is in the timeline under what it was: two paid, three refused, the first paid first
    timeline = emulator.per_second()
    assert sum(timeline["paid"]) == outcomes.count("ok") == 2
    assert sum(timeline["rate_limited"]) == outcomes.count("rate limited") == 3
    assert emulator.stats()["rate_limited"] == 3
    assert timeline["first"]["paid"] == 0.0
    assert timeline["last"]["rate_limited"] >= timeline["first"]["rate_limited"] >= 0.0
    assert 0.0 <= timeline["offset"] < 1.0
    emulator.reset()
    assert emulator.per_second() == {"paid": [], "rate_limited": [], "first": {}, "last": {}, "offset": 0.0}


@pytest.mark.parametrize("name", APIS)
def test_flaky_fails_exactly_n_times_under_concurrency(emulator_factory, http, name):
    # Given prompts with "storm" fail exactly 5 times
    emulator = emulator_factory(name, "flaky=storm:5")
    headers = auth(emulator, http)

    # When 12 matching requests arrive concurrently
    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(pool.map(lambda _: outcome(generate(emulator, http, headers, "a storm")), range(12)))

    # Then exactly 5 were answered "unavailable" and the other 7 went through
    assert sorted(outcomes) == ["ok"] * 7 + ["unavailable"] * 5


@pytest.mark.parametrize("name", APIS)
def test_slow_requests_overlap_instead_of_queueing(emulator_factory, http, name):
    # Given an emulator that takes 300 ms per request (Atlas Cloud's `sync` fault makes its submit
    # take the generation time, which otherwise only polls see)
    faults = ("sync=slow",) if name == "atlascloud" else ()
    emulator = emulator_factory(name, *faults, latency_ms=300)
    headers = auth(emulator, http)

    # When six clients generate at the same time
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(pool.map(lambda _: outcome(generate(emulator, http, headers, "slow")), range(6)))
    elapsed = time.monotonic() - started

    # Then all succeed, every image is counted, and together they take about one request's time, not six
    assert outcomes == ["ok"] * 6
    assert emulator.stats()["images"] == 6
    assert elapsed < 0.9, f"6 requests of 300 ms took {elapsed:.2f} s: they were serialised"


# --------------------------------------------------------------------------- stats and reset


@pytest.mark.parametrize("name", APIS)
def test_stats_count_api_traffic_and_reset_zeroes_them(emulator_factory, http, name):
    # Given an emulator with fresh counters (Baidu's token already issued)
    emulator = emulator_factory(name)
    headers = auth(emulator, http)
    assert http.post(f"{emulator.base_url}/_emulator/reset").status_code == 200

    # When it serves one generation and one unknown path, and the stats are read twice over HTTP
    generate(emulator, http, headers)
    http.get(f"{emulator.base_url}/v9/nothing")
    http.get(f"{emulator.base_url}/_emulator/stats")
    over_http = http.get(f"{emulator.base_url}/_emulator/stats").json()

    # Then they name the emulator and count the paid request and the answers, not the stats calls
    assert over_http == emulator.stats()
    assert over_http["emulator"] == name
    assert (over_http["requests"], over_http["paid"]) == (1, 1)
    assert over_http["responses"] == {"200": 1, "404": 1}

    # And reset answers with every counter gone
    reset = http.post(f"{emulator.base_url}/_emulator/reset")
    assert reset.status_code == 200
    assert reset.json() == emulator.stats() == {"emulator": name, "responses": {}}


# --------------------------------------------------------------------------- output files


@pytest.mark.parametrize("name", APIS)
def test_an_output_url_serves_its_file_until_url_ttl_then_403(emulator_factory, http, name):
    # Given an emulator whose output URLs live 0.3 s, and an image stored by it
    emulator = emulator_factory(name, url_ttl_s=0.3)
    url = emulator.store_file(render_png(PROMPT, 128, 96))

    # When it is downloaded at once (and its headers read), and again after the lifetime
    fresh = http.get(url)
    head = http.head(url)
    time.sleep(0.35)
    expired = http.get(url)

    # Then the first is the PNG under the emulator's /files/, and the last the storage's "expired" answer
    assert url.startswith(f"{emulator.base_url}/files/") and url.endswith(".png")
    assert (fresh.status_code, fresh.headers["content-type"]) == (200, "image/png")
    assert png_size(fresh.content) == (128, 96)
    assert (head.status_code, head.headers["content-length"], head.content) == (
        200,
        str(len(fresh.content)),
        b"",
    )
    assert expired.status_code == 403
    assert b"<Code>AccessDenied</Code>" in expired.content and b"expired" in expired.content
    assert emulator.stats()["downloads"] == 3


@pytest.mark.parametrize("name", APIS)
def test_a_file_never_stored_is_404(emulator_factory, http, name):
    # When a file the emulator never made is downloaded
    resp = http.get(f"{emulator_factory(name).base_url}/files/0123456789abcdef01234567.png")

    # Then it is the storage's 404
    assert resp.status_code == 404
    assert b"<Code>NoSuchKey</Code>" in resp.content


def test_only_the_newest_files_are_kept(emulator_factory, http, monkeypatch):
    # Given an emulator that keeps at most two files
    monkeypatch.setattr(emulator_base, "MAX_STORED_FILES", 2)
    emulator = emulator_factory("qianfan")

    # When three are stored
    urls = [emulator.store_file(render_png(PROMPT, 64, 64, i)) for i in range(3)]

    # Then the oldest is gone and the other two are served
    assert [http.get(url).status_code for url in urls] == [404, 200, 200]


# --------------------------------------------------------------------------- lifecycle


@pytest.mark.parametrize("name", APIS)
def test_the_context_manager_serves_on_a_loopback_port_and_frees_it(http, name):
    # Given an emulator used as a context manager
    with emulator_class(name)() as emulator:
        url = emulator.base_url
        # Then it serves inside the block, on loopback with an ephemeral port
        assert url.startswith("http://127.0.0.1:") and not url.endswith("/")
        assert http.get(f"{url}/_emulator/stats").json()["emulator"] == name

    # And after the block it has no URL and the port no longer answers
    with pytest.raises(RuntimeError, match="not running"):
        _ = emulator.base_url
    with pytest.raises(httpx.ConnectError), httpx.Client(timeout=5) as fresh:
        fresh.get(f"{url}/_emulator/stats")


@pytest.mark.parametrize("name", APIS)
def test_stop_returns_at_once_and_closes_idle_kept_alive_connections(emulator_factory, name):
    # Given a client whose kept-alive connection sits idle after one answer
    emulator = emulator_factory(name)
    url = urlsplit(emulator.base_url)
    conn = HTTPConnection(url.hostname, url.port, timeout=5)
    conn.request("GET", "/_emulator/stats")
    assert conn.getresponse().read()

    # When the emulator is stopped
    started = time.monotonic()
    emulator.stop()
    elapsed = time.monotonic() - started

    # Then stop() does not wait for the idle connection, and that connection gets no more answers
    assert elapsed < 1.0
    with pytest.raises((ConnectionError, HTTPException)):
        conn.request("GET", "/_emulator/stats")
        conn.getresponse()
    conn.close()


@pytest.mark.parametrize("name", APIS)
def test_stop_during_a_slow_request_cuts_its_client_off_quietly(emulator_factory, http, capfd, name):
    # Given a request that takes 400 ms to make its image (Atlas Cloud: in its submit, by `sync`)
    faults = ("sync=slow",) if name == "atlascloud" else ()
    emulator = emulator_factory(name, *faults, latency_ms=400)
    headers = auth(emulator, http)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(generate, emulator, http, headers, "a slow snail")
        deadline = time.monotonic() + 5
        while emulator.paid_for("a slow snail") == 0:
            assert time.monotonic() < deadline, "the request never arrived"
            time.sleep(0.01)

        # When the emulator is stopped while the image is still being made
        started = time.monotonic()
        emulator.stop()
        elapsed = time.monotonic() - started

        # Then stop() returns at once and the waiting client is disconnected, not left hanging
        assert elapsed < 0.3
        assert isinstance(pending.exception(timeout=2), httpx.TransportError)

    # And when the abandoned request finishes, the emulator reports no error of its own
    time.sleep(0.5)
    assert capfd.readouterr().err == ""


# --------------------------------------------------------------------------- `imagepipe emulator`


def imagepipe_command() -> list[str]:
    script = Path(sys.executable).with_name("imagepipe")
    return [str(script)] if script.exists() else [sys.executable, "-m", "imagepipe_cli.cli"]


@pytest.mark.parametrize("name", [*APIS, "comfyui"])
def test_the_emulator_command_announces_itself_and_stops_cleanly_on_ctrl_c(name):
    # Given `imagepipe emulator --provider NAME` running in its own process on a free port
    proc = subprocess.Popen(
        [*imagepipe_command(), "emulator", "--provider", name, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        # When it has printed its banner
        banner = proc.stdout.readline()

        # Then the banner says it is an emulator, not the real API, and where it listens
        assert "EMULATOR" in banner and "not the real API" in banner, banner
        # and which keys it takes (or that it takes none), never an empty "keys:"
        assert banner.split("-- keys:")[1].split(" -- ")[0].strip(), banner
        url = next(word for word in banner.split() if word.startswith("http://127.0.0.1:"))
        assert httpx.get(f"{url}/_emulator/stats", timeout=5).json()["emulator"] == name

        # And Ctrl-C stops it with exit code 0, saying so, and nothing on stderr
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0
        assert "stopped" in out
        assert err == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--fault", "explode=1"], "imagepipe: error: --fault: unknown fault 'explode=1'"),
        (["--fault", "flaky=storm:0"], "N must be a whole number >= 1"),
        (["--provider", "qianfan", "--fault", "url-only"], "unknown fault 'url-only'"),
        (["--rate-limit", "0"], "--rate-limit must be more than 0"),
    ],
    ids=["unknown-fault", "bad-count", "fault-of-another-api", "zero-rate-limit"],
)
def test_a_bad_emulator_flag_exits_2_with_one_line(capsys, args, needle):
    # When the emulator command is given a flag it cannot use
    code = cli.main(["emulator", "--port", "0", *args])

    # Then it exits 2 with one line saying why, and serves nothing
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and err.count("\n") == 1


@pytest.mark.parametrize("name", APIS)
def test_a_port_already_in_use_exits_2_with_one_line(capsys, name):
    # Given a port another program is listening on
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        # When the emulator is asked to serve on it
        code = cli.main(["emulator", "--provider", name, "--port", str(port)])

    # Then it exits 2 with one line naming the port, no traceback
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"imagepipe: error: cannot serve on port {port}:") and err.count("\n") == 1


def test_a_port_out_of_range_exits_2_without_a_traceback(capsys):
    # When the emulator command is given a port number that cannot exist
    with pytest.raises(SystemExit) as exited:
        cli.main(["emulator", "--port", "70000"])

    # Then it exits 2 with argparse's usage and an error line naming the port, no traceback
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.splitlines()[-1].endswith("argument --port: 70000 is not a port number (0-65535)")
    assert "Traceback" not in err
