"""Waiting for one queued prompt: /history is the source of truth, polled every poll_s; the WebSocket only wakes
the wait early. Ends in the history entry, in "lost" (ComfyUI restarted or went away) or at the deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagepipe_cli.agent.comfyui import ComfyClient, ComfyUnavailable
from imagepipe_cli.agent.events import Events


@dataclass(frozen=True)
class Waited:
    entry: dict[str, Any] | None = None  # the /history entry, when the prompt ended
    lost: str = ""  # why ComfyUI no longer has the prompt
    timed_out: bool = False


def _look(client: ComfyClient, prompt_id: str) -> Waited | None:
    entry = client.history(prompt_id)
    if entry:
        return Waited(entry)
    if client.queued(prompt_id):
        return None
    # It may have ended between the two calls: history once more before calling it lost.
    entry = client.history(prompt_id)
    if entry:
        return Waited(entry)
    return Waited(lost="ComfyUI no longer has the prompt in its queue or history (it restarted)")


def wait_for(
    client: ComfyClient,
    events: Events | None,
    prompt_id: str,
    *,
    deadline: float,
    poll_s: float,
    ready_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> Waited:
    """Wait until deadline (a clock() time). If ComfyUI stops answering, wait up to ready_s for it to come back,
    then look whether the prompt survived."""
    while True:
        try:
            found = _look(client, prompt_id)
        except ComfyUnavailable as exc:
            try:
                client.wait_ready(min(ready_s, max(0.0, deadline - clock())))
            except ComfyUnavailable:
                return Waited(lost=f"ComfyUI stopped answering while the prompt ran: {exc}")
            found = None  # back: the next look tells whether the prompt survived
        if found is not None:
            return found
        left = deadline - clock()
        if left <= 0:
            return Waited(timed_out=True)
        if events is not None:
            events.wait(prompt_id, min(poll_s, left))
        else:
            time.sleep(min(poll_s, left))
