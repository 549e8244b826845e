"""`imagepipe agent --comfyui URL`: the agent beside the user's ComfyUI, working for a stack with
HybridMode=enabled until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import re
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from imagepipe_cli.agent.loop import Agent, AgentSettings, Endpoints
from imagepipe_cli.agent.runner import RunSettings
from imagepipe_cli.agent.workflows import WorkflowError, WorkflowSet
from imagepipe_cli.argtypes import non_negative, positive_int
from imagepipe_cli.stackref import StackError, find_stack


class AgentError(Exception):
    """A flag or the stack is unusable for the agent: one line, exit code 2."""


def add_parser(commands: Any, stack: argparse.ArgumentParser) -> None:
    cmd = commands.add_parser(
        "agent",
        parents=[stack],
        help="run the stack's local rows (inpainting, ControlNet, IP-Adapter) on your ComfyUI until Ctrl-C",
        description="Take the local tasks of a stack deployed with HybridMode=enabled, run them on the "
        "ComfyUI at URL and record their outcomes. AWS credentials: the stack's AgentPolicy (see docs/hybrid.md).",
    )
    comfyui_option(cmd, required=True)
    cmd.add_argument(
        "--concurrency",
        type=positive_int,
        default=1,
        metavar="N",
        help="tasks at once (default: 1; ComfyUI runs one prompt at a time, more keep its queue full)",
    )
    cmd.add_argument(
        "--task-timeout",
        type=positive_int,
        default=900,
        metavar="S",
        help="a row's hard limit on ComfyUI, queueing included; then it fails as timed out (default: 900)",
    )
    cmd.add_argument(
        "--grace",
        type=non_negative,
        default=30.0,
        metavar="S",
        help="on Ctrl-C/SIGTERM, how long a running task may finish before it is interrupted and handed "
        "back to the queue (default: 30)",
    )


def comfyui_option(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """--comfyui and --workflows: the same for `agent`, `run` and `up`."""
    parser.add_argument(
        "--comfyui",
        required=required,
        metavar="URL",
        help="the ComfyUI server's base URL (e.g. http://127.0.0.1:8188)"
        + ("" if required else "; default: the built-in ComfyUI emulator when the file has local rows"),
    )
    parser.add_argument(
        "--workflows",
        type=Path,
        metavar="DIR",
        help="DIR/<name>.json: ComfyUI API-format workflows that add to or replace the shipped ones by name",
    )


def check_comfyui_url(url: str) -> str:
    if not re.match(r"^https?://[^\s/]+", url):
        raise AgentError(f"--comfyui {url!r} must start with http:// or https:// and name a host")
    return url.rstrip("/")


def load_workflows(directory: Path | None) -> WorkflowSet:
    try:
        return WorkflowSet(directory)
    except WorkflowError as exc:
        message = str(exc)
        raise AgentError(
            message if message.startswith("--workflows") else f"--workflows: {message}"
        ) from None


def endpoints(name: str, outputs: Mapping[str, str]) -> Endpoints:
    """The queues and buckets the agent uses, from the stack's Outputs."""
    if "LocalTasksQueueUrl" not in outputs:
        raise StackError(
            f"stack {name!r} has no local route: deploy it with HybridMode=enabled "
            "(sam deploy --parameter-overrides HybridMode=enabled)"
        )
    try:
        return Endpoints(
            tasks_queue_url=outputs["LocalTasksQueueUrl"],
            outcomes_queue_url=outputs["LocalOutcomesQueueUrl"],
            input_bucket=outputs["InputBucketName"],
            output_bucket=outputs["OutputBucketName"],
        )
    except KeyError as exc:
        raise StackError(f"stack {name!r} has no output {exc.args[0]}: is it an imagepipe stack?") from None


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Until SIGTERM or Ctrl-C; then the running task finishes or is handed back within --grace; exit 0."""
    try:
        url = check_comfyui_url(args.comfyui)
        workflows = load_workflows(args.workflows)
    except AgentError as exc:
        print(f"imagepipe: error: {exc}", file=err)
        return 2
    stack = find_stack(args.stack)
    settings = AgentSettings(
        concurrency=args.concurrency, grace_s=args.grace, run=RunSettings(timeout_s=args.task_timeout)
    )
    agent = Agent(
        stack.client("sqs"),
        stack.client("s3"),
        endpoints(stack.name, stack.outputs),
        url,
        workflows,
        settings,
        out,
    )
    stop = threading.Event()

    def stopping(*_: Any) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once, exit 130

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stopping)
    agent.say(
        f"stack {stack.name}: tasks from {agent.endpoints.tasks_queue_url}, ComfyUI at {url}, "
        f"workflows {', '.join(workflows.names())}, {args.concurrency} at a time; Ctrl-C to stop"
    )
    agent.start()
    while not stop.wait(1.0):
        pass
    agent.say(f"stopping (up to {args.grace:g} s for a running task)")
    agent.stop()
    s = agent.stats
    agent.say(f"stopped: {s.succeeded} succeeded, {s.failed} failed, {s.released} handed back")
    return 0
