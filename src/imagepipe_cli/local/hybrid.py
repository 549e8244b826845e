"""The local route on the local stack: HybridMode=enabled, and the agent (`imagepipe agent`'s loop) in a
thread beside the generator, working for the stack through moto server as it would for a deployed one,
on the ComfyUI at --comfyui or on the built-in ComfyUI emulator."""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING

from imagepipe_cli.agent.command import AgentError, check_comfyui_url, endpoints, load_workflows
from imagepipe_cli.agent.loop import Agent, AgentSettings
from imagepipe_cli.agent.runner import RunSettings
from imagepipe_cli.emulators import EmulatorConfig
from imagepipe_cli.emulators.comfyui import ComfyUIEmulator
from imagepipe_cli.local.template import Template

if TYPE_CHECKING:
    from imagepipe_cli.local.runtime import LocalRuntime

STOP_GRACE_S = 5.0  # when the run ends (its rows are done) or `up` is stopped


def hybrid_parameters(template: Template) -> dict[str, str]:
    from imagepipe_cli.local.runtime import RuntimeSetupError

    if not template.parameter("HybridMode"):
        raise RuntimeSetupError(
            f"{template.path}: the template has no HybridMode parameter (the local route)"
        )
    return {"HybridMode": "enabled"}


def start_agent(runtime: LocalRuntime, cleanup: ExitStack) -> Agent:
    """The agent on its ComfyUI, announced in the header like the image APIs; stopped with the runtime."""
    from imagepipe_cli.local.runtime import STACK_NAME, RuntimeSetupError

    options = runtime.options
    try:
        workflows = load_workflows(options.workflows)
        url = check_comfyui_url(options.comfyui) if options.comfyui else None
    except AgentError as exc:
        raise RuntimeSetupError(str(exc)) from None
    if url is None:
        config = EmulatorConfig(latency_ms=options.emulator_latency_ms)
        runtime.comfyui_emulator = cleanup.enter_context(ComfyUIEmulator(config))
        url = runtime.comfyui_emulator.base_url
        what = f"the built-in ComfyUI EMULATOR at {url} (not a real ComfyUI; placeholder images)"
    else:
        what = f"ComfyUI at {url} (--comfyui)"
    added = f", workflows from {options.workflows}" if options.workflows else ""
    print(f"local route (HybridMode=enabled): agent on {what}{added}", file=runtime.out)
    log = cleanup.enter_context((runtime.logs / "agent.log").open("a", encoding="utf-8"))
    agent = Agent(
        runtime.client("sqs"),
        runtime.client("s3"),
        endpoints(STACK_NAME, runtime.stack.outputs),
        url,
        workflows,
        AgentSettings(receive_wait_s=5, grace_s=STOP_GRACE_S, run=RunSettings(poll_s=0.5)),
        log,
        notices=runtime.out,
    )
    agent.start()

    def stop() -> None:
        agent.stopping()
        runtime.moto.stop_long_polls()  # its receive answers at once
        agent.stop()

    cleanup.callback(stop)
    return agent
