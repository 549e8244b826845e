"""run_row against the ComfyUI emulator over real loopback HTTP and WebSocket: what becomes of a row."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from imagepipe.jobstate import FAILED, SUCCEEDED
from imagepipe_cli.agent.comfyui import ComfyClient, ComfyUnavailable
from imagepipe_cli.agent.events import Events
from imagepipe_cli.agent.outcomes import RETRY_LATER
from imagepipe_cli.agent.runner import RowRequest, RunSettings, prompt_id_for, run_row
from imagepipe_cli.agent.workflows import WorkflowSet, fill, row_values
from imagepipe_cli.emulators.base import EmulatorConfig, parse_fault
from imagepipe_cli.emulators.comfyui import ComfyUIEmulator
from imagepipe_cli.emulators.openai import OpenAIEmulator

FAST = RunSettings(timeout_s=60, poll_s=0.1, ready_s=10)
WORKFLOWS = WorkflowSet()


def make(*faults: str) -> ComfyUIEmulator:
    kinds = ComfyUIEmulator.FAULTS
    return ComfyUIEmulator(EmulatorConfig(faults=tuple(parse_fault(f, kinds) for f in faults))).start()


class Recorder:
    """The requests the agent sent, as 'METHOD /path'."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> None:
        self.calls.append(f"{request.method} {request.url.path}")


@pytest.fixture
def comfy() -> Iterator[ComfyUIEmulator]:
    emulator = make()
    yield emulator
    emulator.stop()


def client_for(emulator: ComfyUIEmulator, recorder: Recorder | None = None) -> ComfyClient:
    hooks = {"request": [recorder]} if recorder else {}
    return ComfyClient(emulator.base_url, http=httpx.Client(base_url=emulator.base_url, event_hooks=hooks))


def row(
    row_id: str = "r1", job_id: str = "job-1", images: dict | None = None, **fields: object
) -> RowRequest:
    return RowRequest(
        job_id,
        row_id,
        {"prompt": "a red fox", "width": 256, "height": 128, "steps": 4, **fields},
        images or {},
    )


def png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def wait_until(check, what: str) -> None:
    end = time.monotonic() + 20
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"never: {what}")
        time.sleep(0.02)


def test_a_txt2img_row_comes_back_as_its_image(comfy: ComfyUIEmulator) -> None:
    outcome = run_row(client_for(comfy), WORKFLOWS, row(seed=9), FAST)
    assert (outcome.status, outcome.reason, outcome.workflow, outcome.runs) == (SUCCEEDED, "", "txt2img", 1)
    assert outcome.error() is None
    assert len(outcome.images) == 1
    assert Image.open(io.BytesIO(outcome.images[0])).size == (256, 128)
    assert outcome.prompt_id == prompt_id_for("job-1", "r1") and comfy.runs(outcome.prompt_id) == 1
    assert outcome.gpu_seconds is not None and outcome.gpu_seconds >= 0
    # The image was saved under the row's own prefix, so no two rows' files mix.
    assert comfy.files[("output", "imagepipe/job-1", "r1_00001_.png")] == outcome.images[0]


def test_an_inpaint_row_uploads_its_images_and_the_workflow_loads_them(comfy: ComfyUIEmulator) -> None:
    images = {"init_image": png((96, 64), (200, 10, 10)), "mask_image": png((96, 64), (255, 255, 255))}
    fields = {"init_image": "s3://in/a.png", "mask_image": "s3://in/m.png"}
    client = client_for(comfy)
    outcome = run_row(client, WORKFLOWS, row("r2", images=images, **fields), FAST)
    assert (outcome.status, outcome.workflow) == (SUCCEEDED, "inpaint"), outcome.reason
    assert Image.open(io.BytesIO(outcome.images[0])).size == (96, 64)  # the init image's size
    assert comfy.files[("input", "imagepipe/job-1", "r2-init_image.png")] == images["init_image"]
    assert comfy.files[("input", "imagepipe/job-1", "r2-mask_image.png")] == images["mask_image"]
    ran = client.history(outcome.prompt_id)["prompt"][2]
    assert ran["10"]["inputs"]["image"] == "imagepipe/job-1/r2-init_image.png"
    assert ran["11"]["inputs"]["image"] == "imagepipe/job-1/r2-mask_image.png"


def test_a_controlnet_row_runs_with_its_control_image_and_typed_strength(comfy: ComfyUIEmulator) -> None:
    images = {"control_image": png((64, 64), (255, 255, 255))}
    client = client_for(comfy)
    outcome = run_row(
        client, WORKFLOWS, row("r3", images=images, control_image="edges.png", control_strength="0.6"), FAST
    )
    assert (outcome.status, outcome.workflow) == (SUCCEEDED, "controlnet"), outcome.reason
    assert Image.open(io.BytesIO(outcome.images[0])).size == (256, 128)
    ran = client.history(outcome.prompt_id)["prompt"][2]
    assert ran["12"]["inputs"]["strength"] == 0.6
    assert ran["10"]["inputs"]["image"] == "imagepipe/job-1/r3-control_image.png"


def test_something_else_on_comfyuis_port_is_retry_later_not_a_crash() -> None:
    other = OpenAIEmulator().start()
    try:
        client = ComfyClient(other.base_url)
        outcome = run_row(client, WORKFLOWS, row(), FAST)
        assert (outcome.status, outcome.error_type) == (RETRY_LATER, "comfyui_unavailable")
        assert "answered /history/" in outcome.reason
        with pytest.raises(ComfyUnavailable, match="answered /system_stats with HTTP 404"):
            client.wait_ready(0)
    finally:
        other.stop()


def test_a_row_that_needs_an_image_it_was_not_given_fails_naming_the_placeholder(
    comfy: ComfyUIEmulator,
) -> None:
    outcome = run_row(client_for(comfy), WORKFLOWS, row(workflow="inpaint"), FAST)
    assert (outcome.status, outcome.error_type) == (FAILED, "bad_row")
    assert "{{init_image}}" in outcome.reason and outcome.runs == 0


@pytest.mark.parametrize(
    ("faults", "fields", "named"),
    [
        (("missing-node=KSampler",), {}, "ComfyUI has no node KSampler (node 3)"),
        (
            ("missing-node=IPAdapterUnifiedLoader",),
            {"reference_image": "style.png"},
            "ComfyUI has no node IPAdapterUnifiedLoader (node 11",
        ),
    ],
)
def test_a_missing_node_is_reported_by_name_and_nothing_is_queued(faults, fields, named) -> None:
    comfy = make(*faults)
    try:
        images = {"reference_image": png((32, 32), (0, 0, 255))} if fields else {}
        outcome = run_row(client_for(comfy), WORKFLOWS, row(images=images, **fields), FAST)
        assert (outcome.status, outcome.error_type) == (FAILED, "missing_node")
        assert outcome.reason.startswith(named), outcome.reason
        assert comfy.stats().get("prompts_queued", 0) == 0
        assert comfy.stats().get("uploads", 0) == 0  # found before the row's images were sent
    finally:
        comfy.stop()


def test_a_missing_model_is_reported_by_file_and_folder() -> None:
    comfy = make("missing-model=sd_xl_base_1.0.safetensors")
    try:
        outcome = run_row(client_for(comfy), WORKFLOWS, row(), FAST)
        assert (outcome.status, outcome.error_type) == (FAILED, "missing_model")
        assert "'sd_xl_base_1.0.safetensors' in models/checkpoints (node 4" in outcome.reason
        # A model the row names itself is checked the same way.
        named = run_row(
            client_for(comfy), WORKFLOWS, row("r2", model="v1-5-pruned-emaonly.safetensors"), FAST
        )
        assert named.status == SUCCEEDED
    finally:
        comfy.stop()


def test_node_errors_from_prompt_fail_the_row_with_the_node_and_message(comfy: ComfyUIEmulator) -> None:
    outcome = run_row(client_for(comfy), WORKFLOWS, row(steps=0), FAST)
    assert (outcome.status, outcome.error_type) == (FAILED, "node_errors")
    assert "node 3 (KSampler): Value 0 smaller than min of 1: steps" in outcome.reason
    assert outcome.error() == {"type": "node_errors", "message": outcome.reason}


def test_an_execution_error_fails_the_row_with_comfyuis_exception() -> None:
    comfy = make("execution-error=BROKEN")
    try:
        outcome = run_row(client_for(comfy), WORKFLOWS, row(prompt="a BROKEN vase"), FAST)
        assert (outcome.status, outcome.error_type, outcome.runs) == (FAILED, "execution_error", 1)
        assert "RuntimeError: Error while running" in outcome.reason and "(KSampler)" in outcome.reason
    finally:
        comfy.stop()


def test_out_of_memory_is_retried_once_after_free_then_fails() -> None:
    comfy = make("oom=HUGE")
    recorder = Recorder()
    try:
        outcome = run_row(client_for(comfy, recorder), WORKFLOWS, row(prompt="a HUGE mural"), FAST)
        assert (outcome.status, outcome.error_type, outcome.runs) == (FAILED, "out_of_memory", 2)
        assert "CUDA out of memory" in outcome.reason
        assert comfy.runs(outcome.prompt_id) == 2
        posts = [c for c in recorder.calls if c in ("POST /prompt", "POST /free")]
        assert posts == ["POST /prompt", "POST /free", "POST /prompt"]
    finally:
        comfy.stop()


def test_out_of_memory_that_free_cures_succeeds_on_the_retry() -> None:
    comfy = make("oom=HUGE")

    def free_cures(request: httpx.Request) -> None:
        if request.url.path == "/free":
            comfy.config.faults = ()  # the memory ComfyUI held is released

    client = ComfyClient(
        comfy.base_url, http=httpx.Client(base_url=comfy.base_url, event_hooks={"request": [free_cures]})
    )
    try:
        outcome = run_row(client, WORKFLOWS, row(prompt="a HUGE mural"), FAST)
        assert (outcome.status, outcome.runs, len(outcome.images)) == (SUCCEEDED, 2, 1)
    finally:
        comfy.stop()


def test_the_websocket_says_when_our_prompt_ended_and_ignores_others(comfy: ComfyUIEmulator) -> None:
    client = client_for(comfy)
    graph = fill(
        WORKFLOWS.get("txt2img"),
        row_values("j", "r", {"prompt": "a fox", "width": 64, "height": 64}, {}),
        "p",
    )
    with Events(comfy.base_url, client.client_id) as events:
        client.submit(graph, "ours")
        assert events.wait("ours", 20) is True  # True only when ComfyUI's message came (False on timeout)
        client.submit(graph, "theirs")
        assert events.wait("not-this-one", 0.5) is False


def test_a_silent_websocket_still_completes_through_history() -> None:
    comfy = make("silent-ws")
    try:
        outcome = run_row(client_for(comfy), WORKFLOWS, row(), FAST)
        assert (outcome.status, len(outcome.images)) == (SUCCEEDED, 1)
        assert comfy.stats().get("ws_messages", 0) == 0
    finally:
        comfy.stop()


def test_a_hung_prompt_hits_the_hard_timeout_and_is_interrupted() -> None:
    comfy = make("hang=FOREVER")
    try:
        client = client_for(comfy)
        settings = RunSettings(timeout_s=1.0, poll_s=0.1, ready_s=5)
        outcome = run_row(client, WORKFLOWS, row(prompt="FOREVER young"), settings)
        assert (outcome.status, outcome.error_type) == (FAILED, "timeout")
        assert "did not finish the row in 1 s" in outcome.reason
        # ComfyUI is not left busy with it: the prompt ends interrupted and the queue empties.
        wait_until(lambda: client.history(outcome.prompt_id) is not None, "the hung prompt ended")
        assert client.history(outcome.prompt_id)["status"]["status_str"] == "error"
        assert not client.queued(outcome.prompt_id)
    finally:
        comfy.stop()


def test_a_restart_mid_prompt_is_retry_later_and_the_redelivery_runs_it() -> None:
    comfy = make("restart=FLAKY:1")
    comfy.restart_down_s = 0.3
    try:
        client = client_for(comfy)  # the same client throughout, as the agent keeps one
        outcome = run_row(client, WORKFLOWS, row(prompt="a FLAKY lamp"), FAST)
        assert (outcome.status, outcome.error_type) == (RETRY_LATER, "comfyui_lost")
        assert outcome.retry_later and "restarted" in outcome.reason
        # The agent loop puts the task back and waits for ComfyUI; the redelivery runs the row once more.
        wait_until(lambda: comfy.stats().get("restarts") == 1, "the emulated restart happened")
        client.wait_ready(10)
        again = run_row(client, WORKFLOWS, row(prompt="a FLAKY lamp"), FAST)
        assert (again.status, again.runs, again.prompt_id) == (SUCCEEDED, 1, outcome.prompt_id)
    finally:
        comfy.stop()


def test_a_prompt_interrupted_at_comfyui_is_retry_later_and_the_redelivery_runs_it_again() -> None:
    comfy = make("hang=FOREVER")
    client = client_for(comfy)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(o=run_row(client, WORKFLOWS, row(prompt="FOREVER"), FAST))
    )
    worker.start()
    try:
        wait_until(lambda: comfy.stats().get("prompts_run", 0) == 1, "the prompt started")
        httpx.post(comfy.base_url + "/interrupt")  # someone pressed Cancel in ComfyUI's window
        worker.join(30)
        outcome = result["o"]
        assert (outcome.status, outcome.error_type) == (RETRY_LATER, "interrupted")
        assert "interrupted the prompt at node 9 (SaveImage)" in outcome.reason
        # The interrupted run is not taken as the row's answer: the redelivery runs it again.
        comfy.config.faults = ()
        again = run_row(client, WORKFLOWS, row(prompt="FOREVER"), FAST)
        assert (again.status, again.runs, len(again.images)) == (SUCCEEDED, 1, 1)
        assert comfy.runs(outcome.prompt_id) == 2
    finally:
        comfy.stop()


def test_comfyui_gone_mid_prompt_is_retry_later() -> None:
    comfy = make("hang=FOREVER")
    client = client_for(comfy)
    settings = RunSettings(timeout_s=60, poll_s=0.1, ready_s=0.5)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(o=run_row(client, WORKFLOWS, row(prompt="FOREVER"), settings))
    )
    worker.start()
    wait_until(lambda: comfy.stats().get("prompts_run", 0) == 1, "the prompt started")
    comfy.stop()
    worker.join(30)
    outcome = result["o"]
    assert (outcome.status, outcome.error_type) == (RETRY_LATER, "comfyui_lost")
    # A server going down may still answer a last /history without the prompt: that reads as a restart
    assert "stopped answering" in outcome.reason or "(it restarted)" in outcome.reason


def test_comfyui_down_before_the_row_is_retry_later_without_a_traceback() -> None:
    comfy = make()
    client = client_for(comfy)
    comfy.stop()
    outcome = run_row(client, WORKFLOWS, row(), FAST)
    assert (outcome.status, outcome.error_type, outcome.runs) == (RETRY_LATER, "comfyui_unavailable", 0)
    assert "did not answer" in outcome.reason and "\n" not in outcome.reason


def test_a_redelivered_row_uses_the_earlier_run_instead_of_running_twice(comfy: ComfyUIEmulator) -> None:
    first = run_row(client_for(comfy), WORKFLOWS, row(), FAST)
    again = run_row(client_for(comfy), WORKFLOWS, row(), FAST)
    assert (first.status, again.status) == (SUCCEEDED, SUCCEEDED)
    assert (first.runs, again.runs) == (1, 0)
    assert again.images == first.images
    assert comfy.runs(first.prompt_id) == 1 and comfy.stats()["prompts_queued"] == 1
    other = run_row(client_for(comfy), WORKFLOWS, row("r2"), FAST)
    assert other.prompt_id != first.prompt_id and other.runs == 1


def test_a_row_redelivered_while_its_prompt_still_runs_waits_for_that_run() -> None:
    comfy = make("slow=1")
    try:
        result = {}
        worker = threading.Thread(
            target=lambda: result.update(o=run_row(client_for(comfy), WORKFLOWS, row(), FAST))
        )
        worker.start()
        prompt_id = prompt_id_for("job-1", "r1")
        wait_until(lambda: client_for(comfy).queued(prompt_id), "the first delivery queued its prompt")
        second = run_row(client_for(comfy), WORKFLOWS, row(), FAST)
        worker.join(30)
        assert (result["o"].status, result["o"].runs) == (SUCCEEDED, 1)
        assert (second.status, second.runs) == (SUCCEEDED, 0)
        assert second.images == result["o"].images
        assert comfy.runs(prompt_id) == 1
    finally:
        comfy.stop()


def test_wait_ready_backs_off_within_its_budget() -> None:
    comfy = make()
    client = client_for(comfy)
    comfy.stop()
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    with pytest.raises(ComfyUnavailable, match=r"did not answer /system_stats.*\(waited 10 s\)"):
        client.wait_ready(10, first_delay=0.5, max_delay=4, sleep=sleep, clock=lambda: now[0])
    assert slept == [0.5, 1, 2, 4, 2.5]
    assert sum(slept) == 10
