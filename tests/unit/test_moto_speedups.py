"""The local moto server's speed-ups change how fast moto answers, never what it answers."""

from __future__ import annotations

import boto3
import pytest
from moto import mock_aws

from imagepipe.jobstate import JobState
from imagepipe_cli.local.moto_server import speed_up_moto_dynamodb

from conftest import create_jobs_table


@pytest.fixture
def state(monkeypatch):
    from moto.dynamodb import models

    # Undo the patch after the test, whatever speed_up_moto_dynamodb replaced.
    monkeypatch.setattr(
        models.DynamoDBBackend, "transact_write_items", models.DynamoDBBackend.transact_write_items
    )
    speed_up_moto_dynamodb()
    with mock_aws():
        table = create_jobs_table(boto3.resource("dynamodb", region_name="us-east-1"))
        yield JobState(table)


def test_a_transaction_whose_condition_fails_changes_nothing(state):
    # Given a finished task, counted once
    assert state.finish("job", "a", "succeeded", {"cost": 0.5})

    # When a duplicate tries to finish it again (its counter update comes after the failed condition)
    assert not state.finish("job", "a", "failed", {"cost": 0.5})

    # Then neither the task nor its counter moved
    counts = state.counts("job")
    assert (counts.succeeded, counts.failed, counts.cost) == (1, 0, 0.5)
    (outcome,) = state.outcomes("job")
    assert outcome["status"] == "succeeded"


def test_a_first_transaction_creates_both_items(state):
    assert state.finish("job", "b", "failed", {"cost": 0.0, "answers_lost": 2})

    counts = state.counts("job")
    assert (counts.failed, counts.answers_lost) == (1, 2)
