"""When a prediction is polled: the learnt generation time per provider and model (polltiming.py), and
the batch's hand-backs sent together (outbox.py)."""

from __future__ import annotations

import threading

from imagepipe.outbox import Outbox
from imagepipe.polltiming import GenerationTimes

ATLAS, TURBO, OTHER = "atlascloud", "baidu/ERNIE-Image-Turbo/text-to-image", "other/model"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def learnt(times: GenerationTimes, clock: Clock, generation_s: float, rounds: int) -> list[int]:
    """`rounds` waves of predictions that take generation_s, each polled at the learnt delay and again
    until done, as the generator does; the polls each wave needed."""
    polls = []
    for _ in range(rounds):
        at, n = times.delay(ATLAS, TURBO), 0
        while True:
            n += 1
            if at >= generation_s:
                times.done(ATLAS, TURBO, at)
                break
            times.running(ATLAS, TURBO, at)
            at = max(times.delay(ATLAS, TURBO), at + 1)
        clock.now += at + 1
        polls.append(n)
    return polls


def test_a_cold_model_starts_at_the_poll_delay_and_a_20s_model_is_then_polled_once():
    clock = Clock()
    times = GenerationTimes(8, 1800, clock)
    assert times.delay(ATLAS, TURBO) == 8

    polls = learnt(times, clock, 20.0, rounds=6)

    # The first wave searches upward (8 s running, 16 s running, 32 s done); then the delay comes down
    # to just past 16 s x 1.25 at once, and later waves need one poll (at most one wave in five a second)
    assert polls[0] == 3
    assert times.delay(ATLAS, TURBO) <= 32
    assert sum(polls[1:]) <= 6
    assert 18 <= times.delay(ATLAS, TURBO) < 26
    # Another model keeps its own estimate.
    assert times.delay(ATLAS, OTHER) == 8


def test_the_learnt_delay_follows_the_generation_time_down_and_up():
    clock = Clock()
    times = GenerationTimes(8, 1800, clock)
    learnt(times, clock, 20.0, rounds=3)
    slow = times.delay(ATLAS, TURBO)

    # Generations get faster: each wave polled on schedule and found done brings the delay down...
    learnt(times, clock, 5.0, rounds=60)
    assert 4 <= times.delay(ATLAS, TURBO) < slow / 2
    # ...and slower again: a prediction still running moves it past the time it was seen running, and
    # the next waves are read about once each.
    polls = learnt(times, clock, 12.0, rounds=4)
    assert polls[0] > 1 and sum(polls[1:]) <= 4
    assert times.delay(ATLAS, TURBO) >= 12 * 0.9


def test_a_wave_polled_together_counts_once():
    clock = Clock()
    times = GenerationTimes(8, 1800, clock)
    times.done(ATLAS, TURBO, 8.0)
    after_one = times.delay(ATLAS, TURBO)
    for _ in range(50):  # fifty predictions of the same wave, found done at the same moment
        times.done(ATLAS, TURBO, 8.0)
    assert times.delay(ATLAS, TURBO) == after_one
    for _ in range(50):
        times.running(ATLAS, TURBO, 10.0)
    assert times.delay(ATLAS, TURBO) == 12.5  # not 10 x 1.25^50


def test_the_delay_never_passes_max_generation_seconds():
    times = GenerationTimes(8, 60, Clock())
    for elapsed in (8, 16, 32, 64, 128):
        times.running(ATLAS, TURBO, elapsed)
    assert times.delay(ATLAS, TURBO) == 60


class FakeSqs:
    def __init__(self, refuse: set[str] = frozenset()) -> None:
        self.calls: list[list[dict]] = []
        self.refuse = refuse

    def send_message_batch(self, QueueUrl: str, Entries: list[dict]) -> dict:
        self.calls.append(Entries)
        refused = {e["Id"] for e in Entries if e["MessageBody"] in self.refuse}
        return {
            "Successful": [{"Id": e["Id"]} for e in Entries if e["Id"] not in refused],
            "Failed": [{"Id": i, "Code": "InternalError", "Message": "refused"} for i in refused],
        }


def test_a_batchs_hand_backs_go_in_one_call_and_each_task_learns_its_own_answer():
    sqs = FakeSqs(refuse={"b"})
    outbox = Outbox(sqs, "queue", tasks=4, max_wait_s=30)
    answers: dict[str, str | None] = {}

    def hand_back(body: str) -> None:
        answers[body] = outbox.send(body, 20)
        outbox.task_ended()

    threads = [threading.Thread(target=hand_back, args=(body,)) for body in "abc"]
    for thread in threads:
        thread.start()
    outbox.task_ended()  # the fourth task finished without handing back
    for thread in threads:
        thread.join(10)

    assert len(sqs.calls) == 1
    assert sorted(e["MessageBody"] for e in sqs.calls[0]) == ["a", "b", "c"]
    assert {e["DelaySeconds"] for e in sqs.calls[0]} == {20}
    assert answers == {"a": None, "b": "refused", "c": None}


def test_a_lone_hand_back_is_sent_at_once():
    sqs = FakeSqs()
    assert Outbox(sqs, "queue", tasks=1, max_wait_s=30).send("a", 5) is None
    assert len(sqs.calls) == 1
