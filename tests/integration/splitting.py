"""Driving CsvSplitterFunction through its continuations in tests: a Lambda context whose time runs out as
rows are read, and Lambda's poller for SplitContinuationQueue."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from imagepipe.splitter import TIME_MARGIN_S
from imagepipe_cli.local import lambda_runtime
from imagepipe_cli.local.event_sources import SqsPoller

from conftest import REGION, Pipeline


@dataclass
class ShortContext(lambda_runtime.LambdaContext):
    """A context whose remaining time falls by `step` seconds each time it is asked: the splitter asks once a
    row, so an invocation has time for about `rows` rows before it must hand over."""

    left_s: float = 0.0
    step: float = 1.0

    def get_remaining_time_in_millis(self) -> int:
        self.left_s -= self.step
        return int(self.left_s * 1000)


def short_invocations(monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    """Every invocation of a function in this process gets time for about `rows` rows of a split."""
    real = lambda_runtime.make_context

    def make(function: Any, region: str = REGION) -> ShortContext:
        base = real(function, region)
        return ShortContext(**vars(base), left_s=TIME_MARGIN_S + rows + 0.5, step=1.0)

    monkeypatch.setattr(lambda_runtime, "make_context", make)


def run_continuations(pipeline: Pipeline, limit: int = 500) -> int:
    """Lambda's poller for SplitContinuationQueue, until it is empty: how many invocations it made."""
    poller = SqsPoller(
        pipeline.client("sqs"), pipeline.mapping("CsvSplitterFunction"), pipeline.splitter, region=REGION
    )
    invocations = 0
    while poller.poll_once():
        invocations += 1
        assert invocations < limit, "the split never ended"
    return invocations


def queued_row_ids(pipeline: Pipeline) -> list[str]:
    """Every task message on TasksQueue, by row id (sorted; a row queued twice appears twice)."""
    return sorted(json.loads(m["Body"])["row_id"] for m in pipeline.queued_messages())
