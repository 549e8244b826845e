"""The agent's loop (`imagepipe agent`) against the stack from template.yaml (HybridMode=enabled) on moto server
and the ComfyUI emulator over loopback: what becomes of a local task when ComfyUI is away, restarts, fails, hangs,
or the same task arrives twice, and what a stop leaves behind."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from imagepipe.contract import ImageTask, LocalOutcome
from imagepipe.layout import JobLayout
from imagepipe_cli.agent.command import endpoints
from imagepipe_cli.agent.loop import Agent, AgentSettings
from imagepipe_cli.agent.runner import RunSettings, prompt_id_for
from imagepipe_cli.agent.workflows import WorkflowSet
from imagepipe_cli.emulators.base import EmulatorConfig, parse_fault
from imagepipe_cli.emulators.comfyui import ComfyUIEmulator
from imagepipe_cli.local.moto_server import MotoServer
from imagepipe_cli.local.runtime import REGION, STACK_NAME, StackOptions, _client_factory, stack_parameters
from imagepipe_cli.local.stack import deploy_stack
from imagepipe_cli.local.template import load_template

from conftest import ROOT, TEMPLATE

JOB = "agent-loop"
FAST = RunSettings(timeout_s=60, poll_s=0.1, ready_s=10)
HANG_GUARD_S = 90  # only so that a broken agent fails the test instead of hanging it


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """One moto server and one stack for the module; each test starts with empty queues."""
    logs = tmp_path_factory.mktemp("agent-loop")
    with MotoServer(log_path=logs / "moto.log") as moto:
        client = _client_factory(moto.url)
        template = load_template(TEMPLATE)
        parameters = {**stack_parameters(template, StackOptions(template=TEMPLATE)), "HybridMode": "enabled"}
        deployed = deploy_stack(client, template, stack_name=STACK_NAME, parameters=parameters, region=REGION)
        yield SimpleNamespace(
            url=moto.url,
            sqs=client("sqs"),
            s3=client("s3"),
            endpoints=endpoints(STACK_NAME, deployed.outputs),
        )


@pytest.fixture
def aws(stack: SimpleNamespace) -> SimpleNamespace:
    for url in (stack.endpoints.tasks_queue_url, stack.endpoints.outcomes_queue_url):
        while messages := stack.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages"):
            for message in messages:
                stack.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return stack


def comfyui(*faults: str, port: int = 0) -> ComfyUIEmulator:
    kinds = ComfyUIEmulator.FAULTS
    config = EmulatorConfig(port=port, faults=tuple(parse_fault(f, kinds) for f in faults))
    return ComfyUIEmulator(config)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, "PNG")
    return buffer.getvalue()


def task(row_id: str, prompt: str = "a lighthouse", **fields: Any) -> ImageTask:
    return ImageTask(
        job_id=JOB,
        row_id=row_id,
        row_number=1,
        prompt=prompt,
        width=64,
        height=64,
        backend="local",
        provider="comfyui",
        **fields,
    )


def send(aws: SimpleNamespace, *tasks: ImageTask) -> None:
    for item in tasks:
        aws.sqs.send_message(QueueUrl=aws.endpoints.tasks_queue_url, MessageBody=item.model_dump_json())


def outcomes(aws: SimpleNamespace, count: int) -> list[LocalOutcome]:
    """The first `count` outcomes the agent sent (their messages left in the queue for the next call)."""
    found: dict[str, LocalOutcome] = {}
    deadline = time.monotonic() + HANG_GUARD_S
    while len(found) < count and time.monotonic() < deadline:
        for message in aws.sqs.receive_message(
            QueueUrl=aws.endpoints.outcomes_queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
        ).get("Messages", []):
            found[message["MessageId"]] = LocalOutcome.model_validate_json(message["Body"])
            aws.sqs.delete_message(
                QueueUrl=aws.endpoints.outcomes_queue_url, ReceiptHandle=message["ReceiptHandle"]
            )
    assert len(found) >= count, f"the agent sent {len(found)} outcome(s), not {count}"
    return list(found.values())


def tasks_left(aws: SimpleNamespace) -> int:
    attributes = aws.sqs.get_queue_attributes(
        QueueUrl=aws.endpoints.tasks_queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return sum(int(v) for v in attributes.values())


def wait_until(check: Any) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not check():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.05)


@contextmanager
def agent(
    aws: SimpleNamespace, url: str, workflows: WorkflowSet | None = None, **settings: Any
) -> Iterator[Agent]:
    out = io.StringIO()
    options = {"receive_wait_s": 1, "grace_s": 5.0, "run": FAST, **settings}
    running = Agent(
        aws.sqs, aws.s3, aws.endpoints, url, workflows or WorkflowSet(), AgentSettings(**options), out
    )
    running.start()
    try:
        yield running
    finally:
        running.stop()


def test_comfyui_down_at_start_is_waited_for_and_the_task_runs_once_it_is_back(aws: SimpleNamespace) -> None:
    # Given an agent started while ComfyUI is not up yet, and a task for it
    port = free_port()
    comfy = comfyui(port=port)
    send(aws, task("r-late"))
    with agent(aws, f"http://127.0.0.1:{port}") as running:
        wait_until(lambda: "waiting for ComfyUI" in running.out.getvalue())
        # Then it takes no task while ComfyUI is away
        assert running.stats.received == 0
        # When ComfyUI comes up
        with comfy:
            (outcome,) = outcomes(aws, 1)
    # Then the row succeeds with its image in the output bucket, run once
    assert (outcome.status, outcome.workflow) == ("succeeded", "txt2img")
    key = JobLayout(JOB).image_key("r-late", 0, "png")
    assert outcome.images == [key]
    body = aws.s3.get_object(Bucket=aws.endpoints.output_bucket, Key=key)["Body"].read()
    assert Image.open(io.BytesIO(body)).size == (64, 64)
    assert comfy.runs(prompt_id_for(JOB, "r-late")) == 1
    assert outcome.prompt_id == prompt_id_for(JOB, "r-late")
    assert tasks_left(aws) == 0


def test_comfyui_restarting_mid_task_gets_the_task_done_once_after_it_returns(aws: SimpleNamespace) -> None:
    # Given a ComfyUI that restarts (losing its queue and history) in the middle of the first matching prompt
    with comfyui("restart=lighthouse:1") as comfy, agent(aws, comfy.base_url) as running:
        send(aws, task("r-restart"))
        (outcome,) = outcomes(aws, 1)
        wait_until(lambda: tasks_left(aws) == 0)
    # Then the task went back to the queue once, ran again after the restart and succeeded: one outcome
    assert outcome.status == "succeeded"
    assert comfy.stats()["restarts"] == 1
    # (released at least once: a busy machine may take it again before the restarted ComfyUI answers, and
    # release it again - without running it)
    assert running.stats.released >= 1
    assert comfy.runs(prompt_id_for(JOB, "r-restart")) == 2  # the lost run and the one that finished
    assert (running.stats.succeeded, running.stats.failed) == (1, 0)


def test_a_duplicate_delivery_is_not_run_twice_on_comfyui(aws: SimpleNamespace) -> None:
    # Given the same task delivered twice (SQS delivers at least once)
    with comfyui() as comfy, agent(aws, comfy.base_url):
        send(aws, task("r-dup"), task("r-dup"))
        first, second = outcomes(aws, 2)
    # Then ComfyUI ran one prompt, and both deliveries report it
    assert comfy.stats()["prompts_queued"] == 1
    assert first.images == second.images == [JobLayout(JOB).image_key("r-dup", 0, "png")]
    assert first.prompt_id == second.prompt_id


def test_node_errors_fail_the_row_naming_the_node(aws: SimpleNamespace, tmp_path: Path) -> None:
    # Given a user's workflow whose KSampler names a sampler ComfyUI does not have
    shipped = (ROOT / "src/imagepipe_cli/workflows/txt2img.json").read_text()
    (tmp_path / "odd.json").write_text(shipped.replace('"euler"', '"euler_imaginary"'))
    with comfyui() as comfy, agent(aws, comfy.base_url, WorkflowSet(tmp_path)):
        send(aws, task("r-odd", workflow="odd"))
        (outcome,) = outcomes(aws, 1)
    assert (outcome.status, outcome.error_type, outcome.workflow) == ("failed", "node_errors", "odd")
    assert "(KSampler)" in outcome.reason and "euler_imaginary" in outcome.reason
    assert tasks_left(aws) == 0


def test_a_workflow_needing_a_missing_node_is_reported_once_and_its_rows_fail_naming_it(
    aws: SimpleNamespace, tmp_path: Path
) -> None:
    # Given a user's workflow with a node from a custom node pack this ComfyUI does not have
    shipped = (ROOT / "src/imagepipe_cli/workflows/txt2img.json").read_text()
    (tmp_path / "fancy.json").write_text(shipped.replace('"KSampler"', '"KSamplerAdvancedPlus"'))
    with comfyui() as comfy, agent(aws, comfy.base_url, WorkflowSet(tmp_path)) as running:
        send(aws, task("r-fancy-1", workflow="fancy"), task("r-fancy-2", workflow="fancy"))
        reasons = {outcome.reason for outcome in outcomes(aws, 2)}
    # Then the agent said so once, at start, and each of its rows failed naming the node; nothing ran
    said = [line for line in running.out.getvalue().splitlines() if "workflow fancy cannot run" in line]
    assert len(said) == 1 and "KSamplerAdvancedPlus" in said[0]
    assert len(reasons) == 1 and "ComfyUI has no node KSamplerAdvancedPlus" in reasons.pop()
    assert comfy.stats().get("prompts_queued", 0) == 0


def test_an_execution_error_fails_the_row_with_comfyuis_message(aws: SimpleNamespace) -> None:
    with comfyui("execution-error=boom") as comfy, agent(aws, comfy.base_url):
        send(aws, task("r-boom", prompt="a boom box"))
        (outcome,) = outcomes(aws, 1)
    assert (outcome.status, outcome.error_type) == ("failed", "execution_error")
    assert "RuntimeError" in outcome.reason and "emulated failure" in outcome.reason


def test_a_row_past_its_hard_timeout_fails_and_comfyui_is_freed(aws: SimpleNamespace) -> None:
    # Given a prompt that never finishes, and a 2 s limit per row
    short = RunSettings(timeout_s=2, poll_s=0.1, ready_s=10)
    with comfyui("hang=forever") as comfy, agent(aws, comfy.base_url, run=short):
        send(aws, task("r-hang", prompt="forever and ever"))
        (outcome,) = outcomes(aws, 1)
        # Then the row fails as timed out, and ComfyUI is not left running it
        assert (outcome.status, outcome.error_type) == ("failed", "timeout")
        wait_until(lambda: comfy._queue_remaining() == 0)
    assert tasks_left(aws) == 0


def test_a_missing_input_image_fails_the_row_naming_the_file(aws: SimpleNamespace) -> None:
    bucket = aws.endpoints.input_bucket
    aws.s3.put_object(Bucket=bucket, Key="inbox/photos/house.png", Body=png((10, 120, 200)))
    with comfyui() as comfy, agent(aws, comfy.base_url):
        send(
            aws,
            task(
                "r-nomask",
                init_image=f"s3://{bucket}/inbox/photos/house.png",
                mask_image=f"s3://{bucket}/inbox/photos/no-such-mask.png",
            ),
        )
        (outcome,) = outcomes(aws, 1)
    assert (outcome.status, outcome.error_type) == ("failed", "missing_image")
    assert "inbox/photos/no-such-mask.png" in outcome.reason
    assert comfy.stats().get("prompts_queued", 0) == 0


def test_a_stop_lets_the_running_task_finish_within_the_grace_period(aws: SimpleNamespace) -> None:
    with comfyui("slow=1") as comfy:
        running = Agent(
            aws.sqs,
            aws.s3,
            aws.endpoints,
            comfy.base_url,
            WorkflowSet(),
            AgentSettings(receive_wait_s=1, grace_s=30, run=FAST),
        ).start()
        send(aws, task("r-finish"))
        wait_until(lambda: comfy.stats().get("prompts_queued", 0) == 1)
        running.stop()
        # Then the task finished: its outcome is out and its message deleted
        (outcome,) = outcomes(aws, 1)
    assert outcome.status == "succeeded"
    assert tasks_left(aws) == 0


def test_sigterm_mid_task_interrupts_it_hands_it_back_and_exits_0(aws: SimpleNamespace) -> None:
    # Given `imagepipe agent` as a process, running a task that would take forever
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": aws.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }
    with comfyui("hang=forever") as comfy:
        send(aws, task("r-term", prompt="forever and ever"))
        process = subprocess.Popen(
            [sys.executable, "-m", "imagepipe_cli", "agent", "--comfyui", comfy.base_url, "--grace", "1"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until(lambda: comfy.stats().get("prompts_queued", 0) == 1)
            # When it is told to stop
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=HANG_GUARD_S)
        finally:
            if process.poll() is None:
                process.kill()
        # Then it exits 0, having interrupted the prompt on ComfyUI
        assert process.returncode == 0, err
        assert "handed back to the queue" in out
        wait_until(lambda: comfy._queue_remaining() == 0)
    # and the task is back in the queue at once, with no outcome sent
    messages = aws.sqs.receive_message(QueueUrl=aws.endpoints.tasks_queue_url, WaitTimeSeconds=5)["Messages"]
    assert ImageTask.model_validate_json(messages[0]["Body"]).row_id == "r-term"
    aws.sqs.delete_message(QueueUrl=aws.endpoints.tasks_queue_url, ReceiptHandle=messages[0]["ReceiptHandle"])
    none = aws.sqs.receive_message(QueueUrl=aws.endpoints.outcomes_queue_url, WaitTimeSeconds=1)
    assert none.get("Messages", []) == []


def test_a_task_running_longer_than_its_visibility_timeout_is_not_delivered_again(
    aws: SimpleNamespace,
) -> None:
    # Given tasks invisible only 3 s past their last extension, a prompt that takes 6 s, and a second free slot
    with comfyui("slow=6") as comfy, agent(aws, comfy.base_url, visibility_s=3, concurrency=2) as running:
        send(aws, task("r-long"))
        (outcome,) = outcomes(aws, 1)
    # Then the agent kept extending it: the other slot never received it
    assert outcome.status == "succeeded"
    assert running.stats.received == 1
    assert comfy.stats()["prompts_queued"] == 1
