"""A paid answer whose images cannot be fetched or decoded is never asked for again (issue 10, defect 2).

Every provider against its own emulator, with the emulator's download faults: the CDN failing for a
while, failing for good, an expired URL, a file that is not an image. The emulator counts what the API
charged for: one request, never two."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from imagepipe.contract import ImageTask
from imagepipe.providers import (
    Action,
    Generation,
    Keys,
    Pending,
    ProviderConfig,
    ProviderError,
    base,
    provider_class,
)
from imagepipe.providers.baidu_oauth import BRIEF_PATH, clear_tokens

PROVIDERS = ["atlascloud", "qianfan", "openai", "baidu-oauth"]
PROMPT = "a lighthouse at dusk"


@pytest.fixture(autouse=True)
def quick_download_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    # The pauses between download tries are real time; the tries themselves are what is tested.
    monkeypatch.setattr(base, "DOWNLOAD_PAUSES_S", (0.01, 0.01), raising=False)
    clear_tokens()


def url_answers(emulator_factory, name: str, *faults: str, **config: Any):
    """An emulator of `name` whose answers link to output files, a provider for it and a task."""
    extra = ("url-only",) if name == "openai" else ()  # OpenAI answers base64 unless told otherwise
    emulator = emulator_factory(name, *extra, *faults, **config)
    options = {"path": BRIEF_PATH} if name == "baidu-oauth" else {}
    params = {"response_format": "url"} if name == "baidu-oauth" else {}
    provider = provider_class(name)(
        ProviderConfig(
            base_url=emulator.base_url,
            keys=Keys.fixed(dict(emulator.keys)),
            http=httpx.Client(timeout=10),
            options=options,
        )
    )
    task = ImageTask(job_id="paid", row_id="1", row_number=1, prompt=PROMPT, provider=name, params=params)
    return emulator, provider, task


def first_answer(provider, task: ImageTask) -> Generation | Pending:
    """The answer to the one request the generator sends: a Generation, or (Atlas Cloud) the
    prediction read once after it finished."""
    outcome = provider.run(lambda: provider.start(task))
    for _ in range(200):
        if not isinstance(outcome, Pending):
            return outcome
        outcome = provider.run(lambda rid=outcome.request_id: provider.resume(rid))
    raise AssertionError("the prediction never finished")


def error_of(provider, task: ImageTask) -> ProviderError:
    with pytest.raises(ProviderError) as raised:
        first_answer(provider, task)
    return raised.value


def paid(emulator) -> int:
    return emulator.stats().get("paid", 0)


def requests_sent(emulator) -> int:
    stats = emulator.stats()
    return stats.get("submits", stats.get("requests", 0))


@pytest.mark.parametrize("name", PROVIDERS)
def test_a_download_failing_for_a_moment_is_tried_again_and_the_image_kept(emulator_factory, name):
    # Given a CDN that answers 503 to the first two downloads of the row's image
    emulator, provider, task = url_answers(emulator_factory, name, f"download-flaky={PROMPT}:2")

    # When the row is made
    generation = first_answer(provider, task)

    # Then its image arrives on the third try, from the one paid request
    assert isinstance(generation, Generation) and len(generation.images) == 1
    assert (paid(emulator), requests_sent(emulator), emulator.stats()["downloads"]) == (1, 1, 3)


@pytest.mark.parametrize("name", ["qianfan", "openai", "baidu-oauth"])
def test_a_synchronous_answer_whose_image_cannot_be_fetched_fails_the_row_paid_once(emulator_factory, name):
    # Given a CDN that answers 500 to every download of the row's image
    emulator, provider, task = url_answers(emulator_factory, name, f"download-error={PROMPT}")

    # When the row is made
    error = error_of(provider, task)

    # Then the row fails download_failed with the answer's id, after a few tries of the download and
    # without a second request (it would be paid again: the generator never resends a FAIL_ROW)
    assert (error.kind, error.action, error.status) == ("download_failed", Action.FAIL_ROW, 500)
    assert error.request_id and "paid" in error.message
    assert (paid(emulator), requests_sent(emulator), emulator.stats()["downloads"]) == (1, 1, 3)


def test_an_atlas_prediction_whose_outputs_cannot_be_fetched_yet_is_read_again_not_resubmitted(
    emulator_factory,
):
    # Given a CDN that answers 500 to every download of the prediction's output
    emulator, provider, task = url_answers(emulator_factory, "atlascloud", f"download-error={PROMPT}")

    # When the finished prediction is read
    error = error_of(provider, task)

    # Then the failure says "read the prediction again later" (RETRY: the generator polls again, a
    # redelivered task resumes the stored prediction) and names the prediction and its price
    pending_id = next(iter(emulator.predictions))
    assert (error.kind, error.action, error.maybe_accepted) == ("download_failed", Action.RETRY, False)
    assert (error.request_id, error.cost) == (pending_id, 0.003)
    assert (paid(emulator), emulator.submits_for(PROMPT), emulator.stats()["downloads"]) == (1, 1, 3)


def test_a_sync_mode_atlas_answer_whose_outputs_cannot_be_fetched_is_pending_not_an_error(emulator_factory):
    # Given a model that answers the submit finished (sync mode), and a CDN failing for now
    emulator, provider, task = url_answers(
        emulator_factory, "atlascloud", f"sync={PROMPT}", f"download-flaky={PROMPT}:3"
    )

    # When the task is submitted
    outcome = provider.run(lambda: provider.start(task))

    # Then the answer is the prediction to read again (the generator stores it and polls it): an error
    # here would release the claim and submit a second, paid prediction
    assert isinstance(outcome, Pending) and outcome.request_id in emulator.predictions
    generation = provider.resume(outcome.request_id)
    assert isinstance(generation, Generation) and len(generation.images) == 1
    assert (paid(emulator), emulator.submits_for(PROMPT)) == (1, 1)


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize(
    ("fault", "status", "words"),
    [
        ("download-expired", 403, "expired"),
        ("download-garbage", None, "not a PNG, JPEG or WebP"),
    ],
)
def test_an_expired_url_or_a_file_that_is_no_image_fails_the_row_at_once_paid_once(
    emulator_factory, name, fault, status, words
):
    # Given output files that are gone (an expired signed URL) or are not images
    emulator, provider, task = url_answers(emulator_factory, name, f"{fault}={PROMPT}")

    # When the row is made
    error = error_of(provider, task)

    # Then it fails for good (asking again cannot bring the file back, and would pay again), with what
    # was paid when the API says (Atlas Cloud's price)
    assert (error.kind, error.action) == ("download_failed", Action.FAIL_ROW)
    assert error.status == status or (status is None and error.status == 200)
    assert words in error.message and error.request_id
    assert error.cost == (0.003 if name == "atlascloud" else None)
    assert (paid(emulator), requests_sent(emulator), emulator.stats()["downloads"]) == (1, 1, 1)


def test_a_redirected_output_url_is_followed():
    # Given a CDN that redirects the signed URL to where the file is
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 32

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/signed":
            return httpx.Response(302, headers={"Location": "https://cdn.example/file.png"})
        return httpx.Response(200, content=png)

    with httpx.Client(transport=httpx.MockTransport(answer)) as http:
        image = base.download(http, "https://api.example/signed")

    assert (image.extension, image.data) == ("png", png)


def test_an_image_that_is_not_valid_base64_fails_the_paid_row():
    # Given an OpenAI answer (paid) whose image is not valid base64
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, json={"data": [{"b64_json": "%%% not base64"}]}, headers={"x-request-id": "req_1"}
        )

    provider = provider_class("openai")(
        ProviderConfig(
            "https://api.example",
            Keys.fixed({"OPENAI_API_KEY": "k"}),
            httpx.Client(transport=httpx.MockTransport(answer)),
        )
    )
    task = ImageTask(job_id="paid", row_id="1", row_number=1, prompt=PROMPT, provider="openai")

    error = error_of(provider, task)

    assert (error.kind, error.action, error.request_id) == ("download_failed", Action.FAIL_ROW, "req_1")
