"""A paid generation is never made again because its download failed (issue 10, defect 2).

The generator on the stack from template.yaml, each provider against its emulator with a download
fault; the task goes through the queue and is worked until nothing is left (every retry the code
schedules included). The emulator counts the generations the API charged for: exactly one."""

from __future__ import annotations

import pytest

from imagepipe.contract import ImageTask
from imagepipe.providers import base

PROMPT = "a lighthouse at dusk"


@pytest.fixture(autouse=True)
def quick_download_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "DOWNLOAD_PAUSES_S", (0.01, 0.01), raising=False)


def run_one_row(pipeline_factory, provider: str, *faults: str):
    """A stack for `provider` whose answers link to files, one row of PROMPT sent and worked to its end."""
    extra = ("url-only",) if provider == "openai" else ()
    parameters = {"BaiduText2ImagePath": "/v1/images/generations"} if provider == "baidu-oauth" else {}
    pipeline = pipeline_factory(*extra, *faults, provider=provider, parameters=parameters)
    params = {"response_format": "url"} if provider == "baidu-oauth" else {}
    task = ImageTask(
        job_id="paid-once", row_id="row 1", row_number=1, prompt=PROMPT, provider=provider, params=params
    )
    pipeline.client("sqs").send_message(QueueUrl=pipeline.tasks_queue, MessageBody=task.model_dump_json())
    pipeline.drain_all(max_seconds=60)
    return pipeline, pipeline.emulators[provider], pipeline.outcome("paid-once", task.image_name)


@pytest.mark.parametrize("provider", ["qianfan", "openai", "baidu-oauth"])
@pytest.mark.parametrize("fault", ["download-error", "download-expired", "download-garbage"])
def test_a_synchronous_row_whose_image_cannot_be_fetched_is_paid_once_and_fails(
    pipeline_factory, provider, fault
):
    pipeline, emulator, outcome = run_one_row(pipeline_factory, provider, f"{fault}={PROMPT}")

    assert emulator.stats()["paid"] == 1
    assert outcome["status"] == "failed"
    assert outcome["error"]["type"] == "download_failed" and outcome["request_id"]
    # and its cost is counted: these APIs report no price, so the stack's PricePerImage for one image
    assert outcome["cost"] == {"qianfan": 0.02, "openai": 0.04, "baidu-oauth": 0.02}[provider]


def test_an_atlas_row_whose_output_url_expired_is_paid_once_and_fails_with_its_price(pipeline_factory):
    pipeline, emulator, outcome = run_one_row(pipeline_factory, "atlascloud", f"download-expired={PROMPT}")

    assert (emulator.stats()["paid"], emulator.submits_for(PROMPT)) == (1, 1)
    assert (outcome["status"], outcome["error"]["type"]) == ("failed", "download_failed")
    assert outcome["request_id"] in emulator.predictions and outcome["cost"] == 0.003


@pytest.mark.parametrize("sync", [False, True], ids=["polled", "sync-mode"])
def test_an_atlas_output_the_cdn_fails_for_a_while_is_fetched_by_reading_the_prediction_again(
    pipeline_factory, sync
):
    # Given a CDN that fails more downloads than one read of the prediction tries (3), and a model that
    # answers the submit already finished (sync-mode) or is polled
    faults = (f"download-flaky={PROMPT}:4",) + ((f"sync={PROMPT}",) if sync else ())

    pipeline, emulator, outcome = run_one_row(pipeline_factory, "atlascloud", *faults)

    # Then the image came from the one prediction, read again - never a second submit
    assert (emulator.stats()["paid"], emulator.submits_for(PROMPT)) == (1, 1)
    assert outcome["status"] == "succeeded" and len(outcome["images"]) == 1
    assert emulator.stats()["downloads"] == 5


def test_an_atlas_submit_answered_without_a_prediction_id_is_never_resent(pipeline_factory):
    # Given an API that answers the submit 200 without naming the prediction (it may be running, paid)
    pipeline, emulator, outcome = run_one_row(pipeline_factory, "atlascloud", f"malformed={PROMPT}")

    # Then the row fails as an answer lost, counted, after one submit
    assert emulator.submits_for(PROMPT) == 1
    assert (outcome["status"], outcome["error"]["type"], outcome["answers_lost"]) == (
        "failed",
        "answer_lost",
        1,
    )
