"""The progress line shown while a job runs: rows done/total, rate, ETA and cost, on a terminal or a log."""

from __future__ import annotations

import time
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self._stream, self._tty = stream, enabled and stream.isatty()
        self._enabled = enabled
        self._started = time.monotonic()
        self._last_line = 0.0
        self._line = ""

    def show(self, job: dict | None, done: int, cost: float = 0.0, retried: int = 0) -> None:
        if not self._enabled:
            return
        queued = job.get("queued") if job and job.get("status") != "splitting" else None
        elapsed = time.monotonic() - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        if queued:
            width = 30
            filled = int(width * min(done, queued) / queued)
            line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{queued} rows"
            if rate > 0 and done < queued:
                line += f"  ETA {int((queued - done) / rate)} s"
        else:
            line = f"splitting the file... {done} rows done"
        line += f"  {rate:5.1f}/s  ${cost:.4f}" + (f"  {retried} retried" if retried else "")
        self._line = line
        if self._tty:
            self._stream.write("\r" + line.ljust(79))
            self._stream.flush()
        elif time.monotonic() - self._last_line >= 10:
            # A log (CI, a pipe) gets a line every 10 s, not a carriage-return animation.
            self._stream.write(line + "\n")
            self._last_line = time.monotonic()

    def done(self) -> None:
        if not self._enabled:
            return
        # A terminal has the last line already; a log gets it once more, final.
        self._stream.write("\n" if self._tty else self._line + "\n")
        self._stream.flush()
