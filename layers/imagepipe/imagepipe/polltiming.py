"""When an asynchronous prediction is likely done, learnt per provider and model from what the polls found.

A poll that finds a prediction still running costs an HTTP call and a hand-back; a poll that comes late
costs only wall time. So the generator polls each prediction once, at the time this estimate gives (after
its submit), and the estimate follows the answers: a prediction still running at t seconds moves it to
at least t x GROW (x COLD_GROW while no prediction of the model has been seen finished: the first ones
search upward from PollDelaySeconds); one found finished on schedule moves it down by DECAY - or into
the bracket between the longest any prediction was seen running and now, if that is lower - at most
once per period of the estimate itself, so a whole wave of predictions polled together counts as one
answer. For a steady
generation time the estimate settles where about one wave in eight meets a prediction still running
(ln 1.25 / ln (1 / 0.97) periods between misses).

It is kept per execution environment (a cold one starts from PollDelaySeconds): Atlas Cloud reports no
completion time, so only the polls' own answers teach it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

COLD_GROW = 2.0  # no finished prediction seen yet: double the wait (a search, few polls wasted)
GROW = 1.25  # a prediction still running at t: poll it (and its like) again at t x GROW at the earliest
DECAY = 0.03  # finished on schedule: 3 % shorter, once per period
ON_SCHEDULE = 1.2  # a poll at most this much later than the estimate counts as on schedule
MIN_S = 0.1  # a model that seems instant is still given this long (after a miss: a poll interval)


@dataclass
class _Estimate:
    seconds: float
    seen_done: bool = False
    sure: bool = False  # the last read found its prediction finished
    decayed_at: float = float("-inf")
    running_at: float = 0.0  # the longest a prediction was seen running since the last decay


class GenerationTimes:
    """The learnt delay, from a prediction's submit to the poll that likely finds it done, per
    (provider, model). Thread-safe: the tasks of a batch share it."""

    def __init__(self, initial_s: float, max_s: float, clock: Callable[[], float] = time.time) -> None:
        self.initial_s, self.max_s, self.clock = max(MIN_S, initial_s), max_s, clock
        self._lock = threading.Lock()
        self._estimates: dict[tuple[str, str], _Estimate] = {}

    def _get(self, key: tuple[str, str]) -> _Estimate:
        return self._estimates.setdefault(key, _Estimate(self.initial_s))

    def delay(self, provider: str, model: str) -> float:
        """Seconds after its submit at which a prediction of this model is likely done."""
        with self._lock:
            return self._get((provider, model)).seconds

    def sure(self, provider: str, model: str) -> bool:
        """Whether the last read of this model found its prediction finished (the estimate held)."""
        with self._lock:
            return self._get((provider, model)).sure

    def running(self, provider: str, model: str, elapsed_s: float) -> None:
        """A poll found a prediction still running elapsed_s after its submit."""
        with self._lock:
            estimate = self._get((provider, model))
            estimate.sure = False
            grow = GROW if estimate.seen_done else COLD_GROW
            estimate.running_at = max(estimate.running_at, elapsed_s)
            estimate.seconds = min(self.max_s, max(estimate.seconds, elapsed_s * grow))

    def done(self, provider: str, model: str, elapsed_s: float) -> None:
        """A poll found a prediction finished elapsed_s after its submit."""
        now = self.clock()
        with self._lock:
            estimate = self._get((provider, model))
            estimate.seen_done = estimate.sure = True
            on_schedule = elapsed_s <= estimate.seconds * ON_SCHEDULE
            if on_schedule and now - estimate.decayed_at >= estimate.seconds:
                shorter = estimate.seconds * (1 - DECAY)
                if estimate.running_at:
                    # Seen running at r and now done at t: the time is in (r, t], maybe well short of the
                    # estimate (the cold search doubles): come down at once to the bracket's middle, or
                    # r x GROW if that is later.
                    r = estimate.running_at
                    shorter = min(shorter, max(r * GROW, (r + elapsed_s) / 2))
                estimate.seconds = max(MIN_S, shorter)
                estimate.decayed_at, estimate.running_at = now, 0.0
