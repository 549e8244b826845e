"""JobState under what DynamoDB does and moto (one request at a time) does not: transactions cancelled by
a conflicting one, duplicate deliveries racing on one task, and the budget reservations of calls in flight."""

from __future__ import annotations

import threading

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from imagepipe import jobstate
from imagepipe.jobstate import JobState

from conftest import create_jobs_table


def make_table():
    return create_jobs_table(boto3.resource("dynamodb", region_name="us-east-1"))


@pytest.fixture
def table(monkeypatch):
    monkeypatch.setattr(jobstate, "_sleep", lambda s: None)
    with mock_aws():
        yield make_table()


def cancelled(*codes: str) -> ClientError:
    """A TransactionCanceledException as DynamoDB sends it: one reason per item."""
    return ClientError(
        {
            "Error": {"Code": "TransactionCanceledException", "Message": "Transaction cancelled"},
            "CancellationReasons": [{"Code": code} for code in codes],
        },
        "TransactWriteItems",
    )


class Conflicting:
    """The table's client, whose next `times` transactions are cancelled (TransactionConflict) before
    reaching DynamoDB - as when another task finishes on the same counter shard at the same moment."""

    def __init__(self, client, times: int, reasons=("None", "TransactionConflict")) -> None:
        self._client, self.times, self.reasons, self.sent = client, times, reasons, 0

    def transact_write_items(self, **request):
        self.sent += 1
        if self.times > 0:
            self.times -= 1
            raise cancelled(*self.reasons)
        return self._client.transact_write_items(**request)

    def __getattr__(self, name):
        return getattr(self._client, name)


def conflicting_state(table, times: int, **kw) -> tuple[JobState, Conflicting]:
    state = JobState(table)
    client = Conflicting(state._client, times, **kw)
    state._client = client
    return state, client


def test_a_finish_that_meets_a_conflicting_transaction_is_sent_again_and_counted_once(table):
    state, client = conflicting_state(table, times=3)

    assert state.finish("job", "a", "succeeded", {"cost": 0.25}) is True

    assert client.sent == 4
    counts = state.counts("job")
    assert (counts.succeeded, counts.cost) == (1, 0.25)


def test_throttling_inside_a_transaction_is_retried_too(table):
    state, client = conflicting_state(table, times=2, reasons=("ThrottlingError", "None"))

    assert state.finish("job", "a", "failed", {"cost": 0.0}) is True
    assert state.counts("job").failed == 1


def test_only_a_failed_condition_means_the_task_was_finished_by_another(table):
    state = JobState(table)
    assert state.finish("job", "a", "succeeded", {"cost": 0.25})
    # a duplicate: its condition fails - a final answer, not a conflict to retry
    state, client = conflicting_state(table, times=0)
    assert state.finish("job", "a", "succeeded", {"cost": 0.25}, reserved=0.0) is False
    assert client.sent == 1
    assert state.counts("job").succeeded == 1


def test_a_conflict_that_never_ends_is_raised_not_taken_for_a_duplicate(table):
    state, client = conflicting_state(table, times=1000)

    with pytest.raises(ClientError) as caught:
        state.finish("job", "a", "succeeded", {"cost": 0.25})

    assert caught.value.response["Error"]["Code"] == "TransactionCanceledException"
    assert client.sent == jobstate.CONFLICT_TRIES
    assert state.counts("job").finished == 0


def test_a_single_write_that_meets_a_transaction_is_retried(table):
    calls = []

    def write(**request):
        calls.append(request)
        if len(calls) < 3:
            raise ClientError({"Error": {"Code": "TransactionConflictException"}}, "UpdateItem")
        return {"Attributes": {}}

    assert jobstate._conditionally(write, Key={"pk": "x"}) is True
    assert len(calls) == 3


# ---------------------------------------------------------------- defect 5: writes only under the claim


def test_a_late_prediction_never_reopens_a_finished_task(table):
    # Given a delivery that claimed the task and submitted, while another finished the task meanwhile
    state = JobState(table)
    claim = state.claim("job", "a", "atlascloud")
    assert state.finish("job", "a", "failed", {"cost": 0.0, "answers_lost": 1})

    # When the first one's prediction id arrives late
    kept = state.record_prediction("job", "a", "pred-1", 1.0, claimed_at=claim.claimed_at)

    # Then it is not kept: the task stays finished and cannot be counted a second time
    assert kept is False
    assert state.task("job", "a").status == "failed"
    assert state.finish("job", "a", "succeeded", {"cost": 0.003}) is False
    assert state.counts("job").finished == 1


def test_a_stop_outcome_lands_only_under_the_deliverys_own_claim(table):
    # Given my delivery's claim, taken over later by another delivery that judged it stale
    mine = JobState(table, clock=lambda: 1000.0)
    theirs = JobState(table, clock=lambda: 1400.0)
    my_claim = mine.claim("job", "a", "qianfan")
    assert theirs.claim("job", "a", "qianfan", stale=theirs.task("job", "a")) is not None

    # When I record "cancelled" (no call made) under my claim, it does not land over their call...
    cancelled = {"cost": 0.0, "error": {"type": "cancelled", "message": "the job was cancelled"}}
    assert mine.finish("job", "a", "cancelled", cancelled, claimed_at=my_claim.claimed_at) is False

    # ...and their paid image is recorded and counted once, at its cost
    assert theirs.finish("job", "a", "succeeded", {"cost": 0.02}) is True
    counts = theirs.counts("job")
    assert (counts.succeeded, counts.cancelled, counts.cost) == (1, 0, 0.02)


# ---------------------------------------------------------------- defect 6: budget reservations


def test_a_claim_reserves_the_calls_expected_cost_until_the_task_finishes(table):
    state = JobState(table)
    claim = state.claim("job", "a", "atlascloud", reserve=0.03)
    assert state.counts("job").reserved == pytest.approx(0.03)
    # a refused claim (a duplicate) reserves nothing
    assert state.claim("job", "a", "atlascloud", reserve=0.03) is None
    assert state.counts("job").reserved == pytest.approx(0.03)

    assert state.finish("job", "a", "succeeded", {"cost": 0.028}, reserved=claim.reserved)

    counts = state.counts("job")
    assert counts.reserved == 0 and counts.cost == pytest.approx(0.028)


def test_a_finisher_that_does_not_know_the_reservation_still_gives_it_back(table):
    # e.g. the dead-letter recorder: it never saw the claim
    state = JobState(table)
    state.claim("job", "a", "qianfan", reserve=0.02)

    assert state.finish("job", "a", "failed", {"cost": 0.0}, reserved=0.0)  # a wrong guess is corrected

    assert state.counts("job").reserved == 0
    assert state.counts("job").failed == 1


def test_a_released_claim_gives_its_reservation_back(table):
    state = JobState(table)
    claim = state.claim("job", "a", "qianfan", reserve=0.02)

    assert state.release("job", "a", claimed_at=claim.claimed_at, reserved=claim.reserved)

    assert state.counts("job").reserved == 0
    again = state.claim("job", "a", "qianfan", reserve=0.02)
    assert again is not None and state.counts("job").reserved == pytest.approx(0.02)


def test_a_stale_claim_taken_over_moves_its_reservation_not_doubles_it(table):
    state = JobState(table)
    state.claim("job", "a", "qianfan", reserve=0.02)

    taken = state.claim("job", "a", "qianfan", stale=state.task("job", "a"), reserve=0.02)

    assert taken is not None and taken.answers_lost == 1
    assert state.counts("job").reserved == pytest.approx(0.02)


# ---------------------------------------------------------------- against the lab's moto server


def test_many_tasks_finishing_at_once_on_one_shard_under_conflicts_are_counted_exactly(tmp_path, monkeypatch):
    from botocore.config import Config

    from imagepipe_cli.local.moto_server import MotoServer

    monkeypatch.setattr(jobstate, "_sleep", lambda s: None)
    with MotoServer(log_path=tmp_path / "moto.log") as server:
        resource = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        ).resource("dynamodb", endpoint_url=server.url, config=Config(retries={"mode": "standard"}))
        table = create_jobs_table(resource)
        state = JobState(table)
        server.set_chaos({"ddb-conflict": 0.5, "seed": 3})
        names = [f"t{i}" for i in range(40)]
        # every task finished twice (a duplicate delivery each), from 8 threads at once
        results: list[bool] = []
        lock = threading.Lock()

        def finish(name: str) -> None:
            done = state.finish("job", name, "succeeded", {"cost": 0.5})
            with lock:
                results.append(done)

        threads = [threading.Thread(target=finish, args=(n,)) for n in names * 2]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        injected = server.chaos_injected().get("ddb-conflict", 0)
        server.set_chaos({})

        assert injected > 0
        assert results.count(True) == len(names)
        counts = state.counts("job")
        assert (counts.succeeded, counts.cost) == (len(names), pytest.approx(0.5 * len(names)))
