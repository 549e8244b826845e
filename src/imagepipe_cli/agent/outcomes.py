"""What became of a row on ComfyUI: the Outcome the agent loop records, and how ComfyUI's answers map onto it
(succeeded, failed with ComfyUI's reason, or retry later: put the task back and wait for ComfyUI)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imagepipe.jobstate import FAILED, SUCCEEDED

RETRY_LATER = "retry"
MAX_REASON_CHARS = 1000


@dataclass(frozen=True)
class Outcome:
    status: str  # SUCCEEDED, FAILED or RETRY_LATER
    reason: str = ""  # for people: what ComfyUI said, naming the node or model
    error_type: str = (
        ""  # for machines: node_errors, missing_node, execution_error, out_of_memory, timeout, ...
    )
    prompt_id: str = ""
    workflow: str = ""
    images: tuple[bytes, ...] = ()
    gpu_seconds: float | None = None  # ComfyUI's own execution time (history timestamps), when it ran
    elapsed_seconds: float = 0.0  # wall time this call spent on the row
    runs: int = 0  # prompts this call queued on ComfyUI (0: an earlier run was found and used)

    @property
    def retry_later(self) -> bool:
        return self.status == RETRY_LATER

    def error(self) -> dict[str, str] | None:
        """The {"type", "message"} a task record keeps for a failed row."""
        return None if self.status == SUCCEEDED else {"type": self.error_type, "message": self.reason}


def failed(error_type: str, reason: str, **kwargs: Any) -> Outcome:
    return Outcome(FAILED, reason[:MAX_REASON_CHARS], error_type, **kwargs)


def retry_later(error_type: str, reason: str, **kwargs: Any) -> Outcome:
    return Outcome(RETRY_LATER, reason[:MAX_REASON_CHARS], error_type, **kwargs)


@dataclass(frozen=True)
class Finished:
    """A /history entry read: how the prompt ended."""

    kind: str  # "success", "error" or "interrupted"
    reason: str
    out_of_memory: bool
    gpu_seconds: float | None
    images: list[dict[str, Any]]  # type=output images, in node order


def _messages(entry: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    raw = (entry.get("status") or {}).get("messages") or []
    return [(m[0], m[1]) for m in raw if isinstance(m, list) and len(m) == 2 and isinstance(m[1], dict)]


def _gpu_seconds(messages: list[tuple[str, dict[str, Any]]]) -> float | None:
    stamps = [data["timestamp"] for _, data in messages if isinstance(data.get("timestamp"), int | float)]
    return round((max(stamps) - min(stamps)) / 1000.0, 3) if len(stamps) >= 2 else None


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 62, node_id)


def read_history(entry: dict[str, Any]) -> Finished:
    """execution.py's history entry: status.status_str, status.messages, outputs[node].images."""
    messages = _messages(entry)
    gpu = _gpu_seconds(messages)
    for kind, data in messages:
        if kind == "execution_error":
            exc_type = str(data.get("exception_type") or "")
            message = str(data.get("exception_message") or "").strip()
            oom = (
                "OutOfMemory" in exc_type
                or "out of memory" in message.lower()
                or "Allocation on device" in message
            )
            first_line = message.splitlines()[0].strip() if message else exc_type
            where = f"node {data.get('node_id')} ({data.get('node_type')})"
            return Finished("error", f"{where}: {exc_type}: {first_line}", oom, gpu, [])
        if kind == "execution_interrupted":
            where = f"node {data.get('node_id')} ({data.get('node_type')})"
            return Finished("interrupted", f"ComfyUI interrupted the prompt at {where}", False, gpu, [])
    status = (entry.get("status") or {}).get("status_str")
    if status not in (None, "success"):
        return Finished("error", f"ComfyUI ended the prompt with status {status!r}", False, gpu, [])
    images = []
    outputs = entry.get("outputs") or {}
    for node_id in sorted(outputs, key=_node_order):
        for image in (outputs[node_id] or {}).get("images") or []:
            if isinstance(image, dict) and image.get("type") == "output" and image.get("filename"):
                images.append(image)
    return Finished("success", "", False, gpu, images)
