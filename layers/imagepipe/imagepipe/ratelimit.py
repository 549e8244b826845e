"""Rate governance: how fast the generators call each provider and model - one schedule in JobsTable that
every generator instance shares, paced at a configured limit or at one the adaptive controller learns.

The schedule (GCRA, the "virtual scheduling" form of a token bucket): one item per provider and model
holds `tat`, the time the next call may go. Taking a token is one conditional UpdateItem,
`SET tat = tat + step` if `tat` lies between now - BURST_S and now + HORIZON_S; the caller then sleeps
until its slot (the old `tat`). The write is atomic and adds to the item without reading it first, so
instances never read-modify-write or retry against each other while the schedule is busy; slots are
`step` apart whoever takes them, so no more than one call per step (plus BURST_S worth after a pause)
is ever let through, across any number of processes. A schedule more than HORIZON_S ahead refuses the
write: the caller sleeps until its turn could come (one caller per instance contends, the others queue
behind it in the instance), or - when that is past its invocation's deadline - the task goes back as
a delayed message. HORIZON_S keeps the tokens handed out ahead short, so a lowered rate applies at once.
(Sub-second slot counters would do the same with `ADD n` but make every refused caller write again
each slot; here a refused caller knows when to come back.)

The rate: a configured limit (ProviderRateLimits) is used as it is until the provider refuses a call
(then it is too high, or late calls bunched up: the controller takes over just below it, PLATEAU_CUT). An unknown limit is found adaptively: a slow
start from START_RATE doubling every DOUBLING_S until the first rate-limit answer, then CUBIC as
botocore's adaptive retry mode computes it (botocore.retries.throttling.CubicCalculator: cut to
BETA x the rate at the refusal, grow back concavely to it), with the probe beyond that rate slowed to
PROBE of it per second - a provider's burst allowance hides an overshoot until it is spent, so a fast
probe overshoots far before the first refusal arrives. The learnt state (the rate at the last refusal
and when it came) lives in the same item, so N instances share one rate and together converge to the
limit, not N x it. A refusal lowers the rate once per "epoch": only a call admitted EPOCH_S after the last
cut may cut again (TCP's once-per-round-trip rule, the provider's counting window as the round trip), and
the rate it records is the lower of the refused call's rate and the rate the instance saw the schedule
run at over the last second, less PLATEAU_CUT (halved when it ends the slow start, which overshoots by up
to a doubling before the burst runs out; a configured rate is taken as it is).

Per instance, Google SRE's client-side throttling guards the rest: when the provider has refused most
recent calls for their rate, calls are refused here before they are sent (see SRE_K).

If JobsTable cannot be reached the call goes ahead unpaced (logged): the limiter protects the
provider's limit, it must not stop the pipeline."""

from __future__ import annotations

import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from botocore.retries.throttling import CubicCalculator

from imagepipe.contract import PROVIDER_NAMES
from imagepipe.observability import logger
from imagepipe.providers.base import time_left

START_RATE = 10.0  # calls/s before a limit is known
DOUBLING_S = 3.0  # the slow start doubles the rate this often, until the first refusal
BETA = 0.7  # botocore's: a refusal cuts the rate to BETA x the rate it came at
SCALE = 0.4  # botocore's CUBIC scale constant
PROBE = 0.01  # past the last refused rate, the rate grows by this share of it per second
PLATEAU_CUT = 0.95  # the refused rate was above the limit: the next plateau is this share of it
SLOW_START_CUT = 0.5  # the refusal that ends the slow start: it overshot by up to one doubling (TCP halves)
MIN_RATE, MAX_RATE = 0.05, 10_000.0
BURST_S = 0.1  # after a pause, this much of the rate may go at once
HORIZON_S = 0.5  # tokens are handed out at most this far ahead
MAX_WAIT_S = 60.0  # the longest a task waits for a token inside one invocation
CALL_ROOM_S = 15.0  # a token must come this long before the invocation's deadline (for the call itself)
TTL_S = 30 * 24 * 3600
MEASURE_S = 1.0  # the schedule's recent rate is measured over this long
# A refusal cuts again only for a call admitted this long after the last cut: a provider counts calls over a
# window (a second, typically), so calls sent just after a cut still meet the burst that caused it.
EPOCH_S = 1.0
# Google SRE client-side throttling (SRE book, "Handling Overload"): over the last SRE_WINDOW_S, a call is
# refused here with probability (requests - SRE_K x accepts) / (requests + 1) - a guard for when the
# provider refuses most calls anyway (a quota spent, a limit far below the schedule's rate).
SRE_K, SRE_WINDOW_S = 2.0, 120.0

_ENTRY = re.compile(r"^(?P<key>[a-z-]+(?:/[^,=\s]+)?)=(?P<rate>[0-9]+(?:\.[0-9]+)?)(?P<unit>/s|/min)?$")


def parse_rate_limits(text: str) -> dict[str, float]:
    """ProviderRateLimits as {"provider" or "provider/model": calls per second}, e.g.
    "atlascloud=20,qianfan/irag-1.0=600/min". Raises ValueError saying which entry is wrong and why."""
    limits: dict[str, float] = {}
    for raw in filter(None, (part.strip() for part in text.split(","))):
        match = _ENTRY.match(raw)
        if not match:
            raise ValueError(
                f"ProviderRateLimits entry {raw!r} is not provider[/model]=N[/s|/min] "
                "(e.g. atlascloud=20,qianfan/irag-1.0=600/min)"
            )
        key, rate = match["key"], float(match["rate"]) / (60.0 if match["unit"] == "/min" else 1.0)
        if key.split("/")[0] not in PROVIDER_NAMES:
            raise ValueError(
                f"ProviderRateLimits entry {raw!r}: no provider {key.split('/')[0]!r} "
                f"(one of {', '.join(PROVIDER_NAMES)})"
            )
        if rate <= 0:
            raise ValueError(f"ProviderRateLimits entry {raw!r}: the rate must be above 0")
        if key in limits:
            raise ValueError(f"ProviderRateLimits names {key!r} twice")
        limits[key] = rate
    return limits


@dataclass(frozen=True)
class Learnt:
    """The shared controller state: when the schedule began, and the last refusal (time, rate)."""

    born: float
    cut_at: float | None = None
    w_max: float | None = None


def learnt_rate(state: Learnt, now: float, configured: float | None) -> float:
    """The rate the schedule runs at now, from the shared state (the same answer on every instance)."""
    if state.cut_at is None or state.w_max is None:
        if configured is not None:
            return configured
        rate = START_RATE * 2 ** (max(0.0, now - state.born) / DOUBLING_S)
    else:
        cubic = CubicCalculator(state.w_max, state.cut_at, scale_constant=SCALE, beta=BETA)
        past_plateau = max(0.0, now - state.cut_at - cubic.get_params_snapshot().k)
        rate = min(cubic.success_received(now), state.w_max * (1 + PROBE * past_plateau))
    return max(MIN_RATE, min(rate, configured or MAX_RATE))


class NoToken(Exception):
    """No token before the invocation's deadline: the task should come back after `after_s`."""

    def __init__(self, message: str, after_s: float) -> None:
        super().__init__(message)
        self.after_s = after_s


@dataclass(frozen=True)
class Token:
    key: str
    rate: float  # the rate it was handed out at
    admitted_at: float  # when it was handed out
    slot: float  # when the call may go


class RateLimiter:
    """Paces paid calls per provider and model on the schedule in JobsTable (see the module's docstring).
    `client` is a low-level DynamoDB client (thread-safe), `limits` parse_rate_limits' answer."""

    def __init__(
        self,
        client: Any,
        table: str,
        limits: Mapping[str, float] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client, self.table, self.limits = client, table, dict(limits or {})
        self.clock, self.sleep = clock, sleep
        self._lock = threading.Lock()
        self._gates: dict[str, threading.Lock] = {}
        self._known: dict[str, Learnt] = {}
        self._samples: dict[str, deque[tuple[float, int]]] = {}
        self._answers: dict[str, deque[tuple[float, bool]]] = {}  # (when, accepted) per key, for SRE_K

    def bucket(self, provider: str, model: str) -> tuple[str, float | None]:
        """Which schedule a call takes its token from, and its configured rate (None: learnt). A limit for
        the model wins over one for the provider (then every model of the provider shares one); without
        either, each provider and model learns its own."""
        for key in (f"{provider}/{model}", provider):
            if key in self.limits:
                return key, self.limits[key]
        return f"{provider}/{model}", None

    def acquire(self, provider: str, model: str, max_wait_s: float | None = None) -> Token | None:
        """A token for one call, after sleeping until its slot. None: JobsTable could not be reached (the
        call goes ahead unpaced)."""
        key, configured = self.bucket(provider, model)
        refuse = self.refusal_odds(key)
        if refuse and random.random() < refuse:
            self.answered(key, accepted=False)
            raise NoToken(f"{key} refused most recent calls: this one is held back", random.uniform(5, 30))
        if max_wait_s is None:
            left = time_left()
            max_wait_s = MAX_WAIT_S if left is None else min(MAX_WAIT_S, left - CALL_ROOM_S)
        give_up = self.clock() + max_wait_s
        with self._gate(key):  # one caller per instance contends for the item; the others queue here
            losses = 0
            while True:
                now = self.clock()
                known = self._known.get(key)
                rate = learnt_rate(known, now, configured) if known else (configured or START_RATE)
                try:
                    item, slot = self._take(key, now, 1.0 / rate)
                except _Ahead as ahead:
                    if ahead.tat - HORIZON_S > give_up:
                        raise NoToken(
                            f"no {key} rate-limit token before the invocation's deadline",
                            max(1.0, ahead.tat - now),
                        ) from None
                    # Other instances want the same slot: each loss spreads the next try over more slots
                    # (as Ethernet backs off), so about one caller tries per slot instead of all of them.
                    spread = min(HORIZON_S, 2**losses / rate)
                    self.sleep(max(0.0, ahead.tat - HORIZON_S - now) + random.uniform(0, spread))
                    losses += 1
                    continue
                except (ClientError, BotoCoreError) as exc:
                    logger.warning(f"rate limiter unavailable, calling {key} unpaced: {exc}")
                    return None
                break
            self._remember(key, item, now)
        wait = slot - self.clock()
        if wait > 0:
            self.sleep(wait)
        return Token(key, rate, now, slot)

    def heard(self, token: Token | None, *, refused: bool) -> None:
        """The provider's answer to a call made on `token` (None: made unpaced): refused for its rate, or
        taken (whatever else the answer said)."""
        if token is None:
            return
        if refused:
            self.refused(token)
        else:
            self.answered(token.key, accepted=True)

    def refused(self, token: Token) -> None:
        """The provider refused a call for its rate: lower the shared rate, once per epoch."""
        key, configured = token.key, self.limits.get(token.key)
        self.answered(key, accepted=False)
        now = self.clock()
        measured = self.measured_rate(key, now)
        known = self._known.get(key)
        if configured is not None:
            # A configured schedule runs at its rate by construction (no slow start overshot it, and what an
            # instance measured over a second just after start-up says nothing): a refusal - the limit set
            # too high, or calls that went late and bunched up - cuts just below the rate the call came at.
            w_max = token.rate * PLATEAU_CUT
        else:
            slow_start = known is None or known.cut_at is None
            w_max = min(token.rate, measured or token.rate) * (SLOW_START_CUT if slow_start else PLATEAU_CUT)
        w_max = max(MIN_RATE, min(w_max, configured or MAX_RATE))
        try:
            item = self.client.update_item(
                TableName=self.table,
                Key=_key(key),
                UpdateExpression="SET cut_at = :now, w_max = :w, expires_at = :ttl ADD refusals :one",
                ConditionExpression="attribute_not_exists(cut_at) OR cut_at < :admitted",
                ExpressionAttributeValues={
                    ":now": _n(now),
                    ":w": _n(w_max),
                    ":ttl": {"N": str(int(now) + TTL_S)},
                    ":one": {"N": "1"},
                    ":admitted": _n(token.admitted_at - EPOCH_S),
                },
                ReturnValues="ALL_NEW",
            )["Attributes"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                logger.warning(f"rate limiter: could not record {key}'s refusal: {exc}")
            return
        except BotoCoreError as exc:
            logger.warning(f"rate limiter: could not record {key}'s refusal: {exc}")
            return
        self._remember(key, item, None)
        logger.info(
            f"{key} refused a call for its rate: pacing it at {w_max * BETA:.2f}/s, back up to {w_max:.2f}/s",
            extra={"rate_limit_key": key, "rate_before": round(token.rate, 3), "measured": measured},
        )

    def answered(self, key: str, *, accepted: bool) -> None:
        now = self.clock()
        with self._lock:
            answers = self._answers.setdefault(key, deque())
            answers.append((now, accepted))
            while answers and answers[0][0] < now - SRE_WINDOW_S:
                answers.popleft()

    def refusal_odds(self, key: str) -> float:
        """Google SRE's client-side rejection probability for `key`, from this instance's recent calls."""
        since = self.clock() - SRE_WINDOW_S
        with self._lock:
            recent = [ok for at, ok in self._answers.get(key, ()) if at >= since]
        return max(0.0, (len(recent) - SRE_K * sum(recent)) / (len(recent) + 1))

    def measured_rate(self, key: str, now: float) -> float | None:
        """The rate the schedule ran at over the last MEASURE_S, from the counts this instance saw."""
        with self._lock:
            samples = list(self._samples.get(key, ()))
        recent = [(t, n) for t, n in samples if t >= now - MEASURE_S]
        if len(recent) < 2 or recent[-1][0] - recent[0][0] < MEASURE_S / 4:
            return None
        return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])

    # ---- the item

    def _take(self, key: str, now: float, step: float) -> tuple[dict[str, Any], float]:
        """One token's write: the item after it, and the token's slot. Raises _Ahead."""
        values = {
            ":step": _n(step),
            ":floor": _n(now - BURST_S),
            ":ceiling": _n(now + HORIZON_S),
            ":one": {"N": "1"},
            ":ttl": {"N": str(int(now) + TTL_S)},
        }
        try:
            item = self.client.update_item(
                TableName=self.table,
                Key=_key(key),
                UpdateExpression="SET tat = tat + :step, expires_at = :ttl ADD n :one",
                ConditionExpression="tat BETWEEN :floor AND :ceiling",
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )["Attributes"]
            return item, float(item["tat"]["N"]) - step
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise
            old = exc.response.get("Item") or {}
        if "tat" in old and float(old["tat"]["N"]) > now + HORIZON_S:
            raise _Ahead(float(old["tat"]["N"]))
        # New, or idle since before now - BURST_S: the schedule starts again now.
        try:
            item = self.client.update_item(
                TableName=self.table,
                Key=_key(key),
                UpdateExpression="SET tat = :next, born = if_not_exists(born, :now), expires_at = :ttl "
                "ADD n :one",
                ConditionExpression="attribute_not_exists(tat) OR tat < :floor",
                ExpressionAttributeValues={
                    ":next": _n(now + step),
                    ":now": _n(now),
                    ":floor": values[":floor"],
                    ":one": values[":one"],
                    ":ttl": values[":ttl"],
                },
                ReturnValues="ALL_NEW",
            )["Attributes"]
            return item, now
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise
            raise _Ahead(now) from None  # another instance started it first: take the ordinary way

    def _remember(self, key: str, item: Mapping[str, Any], now: float | None) -> None:
        def number(name: str) -> float | None:
            return float(item[name]["N"]) if name in item else None

        learnt = Learnt(born=number("born") or 0.0, cut_at=number("cut_at"), w_max=number("w_max"))
        with self._lock:
            self._known[key] = learnt
            if now is not None and "n" in item:
                samples = self._samples.setdefault(key, deque(maxlen=64))
                samples.append((now, int(item["n"]["N"])))

    def _gate(self, key: str) -> threading.Lock:
        with self._lock:
            return self._gates.setdefault(key, threading.Lock())


class _Ahead(Exception):
    """The schedule is handed out past the horizon: the next slot is `tat`."""

    def __init__(self, tat: float) -> None:
        super().__init__(tat)
        self.tat = tat


def _key(key: str) -> dict[str, Any]:
    return {"pk": {"S": f"RATE#{key}"}, "sk": {"S": "LIMIT"}}


def _n(value: float) -> dict[str, str]:
    return {"N": f"{value:.6f}"}
