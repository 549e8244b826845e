"""ComfyUI's WebSocket (/ws?clientId=), used only to wake early when a prompt ends: /history decides what
happened. A socket that cannot open, goes quiet or is cut off just leaves the caller polling."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.sync.client import ClientConnection, connect

# Messages that mean "this prompt is over, look at /history" (server.py / execution.py / main.py).
ENDED = {"execution_success", "execution_error", "execution_interrupted"}


def _ends(raw: str | bytes, prompt_id: str) -> bool:
    if isinstance(raw, bytes):  # binary frames are preview images
        return False
    try:
        message = json.loads(raw)
    except ValueError:
        return False
    data: Any = message.get("data") if isinstance(message, dict) else None
    if not isinstance(data, dict) or data.get("prompt_id") != prompt_id:
        return False
    kind = message.get("type")
    # main.py: `executing` with node None is sent to the prompt's client once its history is written.
    return kind in ENDED or (kind == "executing" and data.get("node") is None)


class Events:
    """One WebSocket to ComfyUI for one client_id. Open it before POST /prompt so no message is missed."""

    def __init__(self, base_url: str, client_id: str, open_timeout: float = 5.0) -> None:
        url = base_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        self._ws: ClientConnection | None
        self._stack = contextlib.ExitStack()  # websockets wants connect() used as a context manager
        try:
            # proxy=None: ComfyUI is on this machine or the LAN; max_size=None: previews can be large;
            # max_queue=None: messages left unread after the wake-up (a row's progress) must not stall the
            # reader, or close() waits its whole close_timeout for a close frame stuck behind them.
            self._ws = self._stack.enter_context(
                connect(
                    f"{url}/ws?clientId={client_id}",
                    proxy=None,
                    open_timeout=open_timeout,
                    max_size=None,
                    max_queue=None,
                    compression=None,
                )
            )
        except (OSError, TimeoutError, WebSocketException):
            self._ws = None

    def wait(self, prompt_id: str, timeout: float) -> bool:
        """Up to timeout seconds; True as soon as ComfyUI says prompt_id ended."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            if self._ws is None:
                time.sleep(left)
                return False
            try:
                raw = self._ws.recv(timeout=left)
            except TimeoutError:
                return False
            except (ConnectionClosed, OSError):
                self.close()
                continue
            if _ends(raw, prompt_id):
                return True
        return False

    def close(self) -> None:
        self._ws = None
        with contextlib.suppress(OSError, WebSocketException):
            self._stack.close()

    def __enter__(self) -> Events:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
