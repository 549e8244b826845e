"""The shared rate limiter: ProviderRateLimits as written, the schedule that never lets more calls through
than its rate across processes, and the adaptive controller that backs off on refusals and recovers."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from imagepipe.ratelimit import (
    BETA,
    PLATEAU_CUT,
    SLOW_START_CUT,
    SRE_WINDOW_S,
    START_RATE,
    NoToken,
    RateLimiter,
    parse_rate_limits,
)
from imagepipe_cli.local.template import load_template

ROOT = Path(__file__).resolve().parents[2]
REGION = "us-east-1"


def create_jobs_table(ddb, name: str = "jobs") -> str:
    """JobsTable as template.yaml declares it (its keys and billing), on whatever DynamoDB `ddb` reaches."""
    props = load_template(ROOT / "template.yaml").body["Resources"]["JobsTable"]["Properties"]
    ddb.create_table(
        TableName=name,
        KeySchema=props["KeySchema"],
        AttributeDefinitions=props["AttributeDefinitions"],
        BillingMode=props["BillingMode"],
    )
    return name


# ---------------------------------------------------------------- ProviderRateLimits


def test_rate_limits_per_provider_and_model_per_second_or_per_minute():
    assert parse_rate_limits("atlascloud=20, qianfan/irag-1.0=600/min,openai=2.5/s") == {
        "atlascloud": 20.0,
        "qianfan/irag-1.0": 10.0,
        "openai": 2.5,
    }
    assert parse_rate_limits("") == {}
    assert parse_rate_limits("atlascloud/baidu/ERNIE-Image-Turbo/text-to-image=5") == {
        "atlascloud/baidu/ERNIE-Image-Turbo/text-to-image": 5.0
    }


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("qianfan=fast", "entry 'qianfan=fast' is not provider[/model]=N[/s|/min]"),
        ("qianfan 20", "entry 'qianfan 20' is not provider[/model]=N[/s|/min]"),
        ("qianfn=20", "no provider 'qianfn' (one of atlascloud, qianfan, openai, baidu-oauth)"),
        ("qianfan=0", "the rate must be above 0"),
        ("qianfan=1,qianfan=2", "names 'qianfan' twice"),
    ],
)
def test_a_bad_rate_limit_says_which_entry_and_why(value, message):
    with pytest.raises(ValueError) as caught:
        parse_rate_limits(value)
    assert message in str(caught.value)


def test_a_model_limit_wins_over_its_providers_and_an_unnamed_model_learns_its_own():
    limiter = RateLimiter(None, "jobs", {"qianfan": 20.0, "atlascloud/m1": 5.0})
    assert limiter.bucket("qianfan", "irag-1.0") == ("qianfan", 20.0)
    assert limiter.bucket("atlascloud", "m1") == ("atlascloud/m1", 5.0)
    assert limiter.bucket("atlascloud", "m2") == ("atlascloud/m2", None)


# ---------------------------------------------------------------- the adaptive controller (fake clock)


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


@pytest.fixture
def fake():
    with mock_aws():
        ddb = boto3.client("dynamodb", region_name=REGION)
        table = create_jobs_table(ddb)
        clock = FakeClock()

        def make(limits=None) -> RateLimiter:
            return RateLimiter(ddb, table, limits, clock=clock, sleep=clock.sleep)

        yield make, clock


def take(limiter: RateLimiter, n: int, provider="atlascloud", model="m", *, answer: bool = True):
    """n calls' tokens; each call taken by the provider (answer) or left unanswered."""
    tokens = [limiter.acquire(provider, model) for _ in range(n)]
    for token in tokens if answer else ():
        limiter.heard(token, refused=False)
    return tokens


def test_an_unknown_limit_starts_slow_then_a_refusal_cuts_the_rate_and_success_brings_it_back(fake):
    make, clock = fake
    limiter = make()

    # Given a provider with no configured limit: the schedule starts at START_RATE and speeds up
    first = take(limiter, 30)
    assert first[1].slot - first[0].slot == pytest.approx(1 / START_RATE, rel=0.01)
    before = first[-1].rate
    assert before > START_RATE

    # When the provider refuses a call for its rate
    limiter.refused(first[-1])

    # Then the next calls go at under BETA of the refused rate, further apart
    after = take(limiter, 3)
    assert after[0].rate <= before * BETA
    assert after[2].slot - after[1].slot > first[-1].slot - first[-2].slot

    # And a refusal of a call handed out before that cut does not cut again (one cut per epoch)
    limiter.refused(first[-2])
    assert take(limiter, 1)[0].rate >= after[-1].rate

    # When the calls succeed for a while, the rate comes back above where the cut left it - but creeps
    # past the plateau (half the refused rate: the slow start overshoots by up to a doubling) slowly
    clock.now += 30
    later = take(limiter, 2)
    assert after[0].rate < before * SLOW_START_CUT <= later[0].rate <= before


def test_refusals_that_keep_coming_keep_cutting_and_each_cut_is_shared_by_every_instance(fake):
    make, clock = fake
    one, two = make(), make()  # two execution environments, one schedule
    take(one, 20)
    rate = take(one, 1)[0].rate
    for _ in range(4):
        clock.now += 2  # refusals that keep coming, each a provider's counting window after the last cut
        token = take(two, 1)[0]
        two.refused(token)
    # The other instance paces at the rate the refusals left, which is far below where it was
    assert take(one, 2)[1].rate < rate * BETA**3


def test_a_configured_limit_is_used_as_it_is_and_after_a_refusal_never_exceeded_again(fake):
    make, clock = fake
    limiter = make({"qianfan": 20.0})
    tokens = take(limiter, 10, "qianfan", "irag-1.0")
    assert {round(t.rate, 6) for t in tokens} == {20.0}
    assert tokens[5].slot - tokens[4].slot == pytest.approx(0.05, rel=0.01)

    limiter.refused(tokens[-1])
    assert take(limiter, 1, "qianfan", "irag-1.0")[0].rate < 20.0 * BETA + 0.01
    clock.now += 3600  # an hour of successes: the probe never goes past the configured limit
    assert take(limiter, 1, "qianfan", "irag-1.0")[0].rate == pytest.approx(20.0)


def test_a_refusal_right_after_start_up_cuts_a_configured_limit_just_below_it_not_by_half(fake):
    # Given a configured 20/s whose first calls went late and bunched up: the provider refused one in the
    # first second, when this instance had seen the schedule run for only a few calls
    make, clock = fake
    limiter = make({"qianfan": 20.0})
    tokens = take(limiter, 4, "qianfan", "irag-1.0")
    limiter.refused(tokens[-1])
    # and refused a call sent just after the cut too: it met the same burst, in the provider's same second
    clock.now += 0.3
    limiter.refused(take(limiter, 1, "qianfan", "irag-1.0", answer=False)[0])

    # Then the rate comes back to 0.9 x 20 within seconds (CUBIC's plateau), not to half of it
    clock.now += 5
    assert take(limiter, 1, "qianfan", "irag-1.0")[0].rate >= 20.0 * PLATEAU_CUT * 0.99


def test_when_the_provider_refuses_most_calls_the_instance_holds_calls_back_until_it_takes_them_again(
    fake, monkeypatch
):
    make, clock = fake
    limiter = make()
    tokens = take(limiter, 16, answer=False)
    # Given six calls refused for their rate and none taken (Google SRE: (requests - 2 x accepts) / (requests + 1))
    for token in tokens[:6]:
        limiter.heard(token, refused=True)
    assert limiter.refusal_odds("atlascloud/m") == pytest.approx(6 / 7)

    # Then a call drawn into those odds is held back before it is sent: its task comes back later
    monkeypatch.setattr("imagepipe.ratelimit.random.random", lambda: 0.5)
    with pytest.raises(NoToken) as held:
        limiter.acquire("atlascloud", "m")
    assert held.value.after_s >= 5

    # And calls the provider takes bring the odds down to nothing (ten taken for six refused)
    for token in tokens[6:]:
        limiter.heard(token, refused=False)
    assert limiter.refusal_odds("atlascloud/m") == pytest.approx(0.0)
    assert limiter.acquire("atlascloud", "m") is not None
    clock.now += SRE_WINDOW_S + 1  # and old answers are forgotten
    assert limiter.refusal_odds("atlascloud/m") == 0.0


# ---------------------------------------------------------------- the schedule across processes


RATE = 8.0
WORKERS, THREADS, RUN_S = 4, 3, 3.0


def _admit_calls(url: str, table: str, ready, go, out) -> None:
    """One generator process: THREADS callers take tokens for RUN_S and record when each was let through."""
    ddb = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    ).client("dynamodb", endpoint_url=url)
    limiter = RateLimiter(ddb, table, {"qianfan": RATE})
    admitted: list[tuple[float, float]] = []
    lock = threading.Lock()

    def caller() -> None:
        while time.time() < start_at + RUN_S:
            token = limiter.acquire("qianfan", "irag-1.0", max_wait_s=10)
            assert token is not None
            with lock:
                admitted.append((token.slot, time.time()))  # the slot, and when the caller went

    ready.put(True)
    go.wait()  # every process started (a loaded machine may take seconds to spawn them)
    start_at = time.time()
    threads = [threading.Thread(target=caller) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put(admitted)


def test_the_shared_schedule_never_lets_more_than_its_rate_through_across_processes(moto_server):
    ddb = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    ).client("dynamodb", endpoint_url=moto_server.url)
    table = create_jobs_table(ddb, "jobs-processes")
    spawn = multiprocessing.get_context("spawn")
    ready, go, out = spawn.Queue(), spawn.Event(), spawn.Queue()
    processes = [
        spawn.Process(target=_admit_calls, args=(moto_server.url, table, ready, go, out))
        for _ in range(WORKERS)
    ]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=120)
    go.set()
    admitted = sorted(call for _ in processes for call in out.get(timeout=120))
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0

    slots = [slot for slot, _ in admitted]
    went = sorted(at for _, at in admitted)
    # Every caller waited and was let through (12 callers competing for RATE calls a second)...
    assert len(admitted) >= RATE * RUN_S * 0.5
    # ...no caller went before its slot, and no two slots are closer than one step, whoever took them
    assert all(at >= slot for slot, at in admitted)
    assert min(b - a for a, b in zip(slots, slots[1:], strict=False)) >= 1 / RATE - 1e-4
    # Counted with the callers' own clocks: no second holds more than the rate, but for a few calls whose
    # callers woke late on this shared machine and went just after the second before
    for start in went:
        assert sum(start <= at < start + 1.0 for at in went) <= RATE + 3
