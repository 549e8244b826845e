"""The proof, on this machine: 1,000 rows through `imagepipe run` while the API fails in every way it can
(10% 5xx, 5% 429, 2% timeouts, 1% malformed answers, moderation refusals) and the local runtime delivers
20% of the messages twice and kills 5% of the invocations right after the API answered. Every row ends
once, in a terminal state with a reason; every row that can succeed succeeds; nothing is paid twice
except the counted requests whose answer never arrived; counts and the completion event agree.
Each provider's proof is its own test file (test_proof.py, test_proof_async.py), so `make test`'s workers
run the two at once."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT

ROWS = 1000
FAULTS = (
    "error-rate=0.1",
    "rate-limit-rate=0.05",
    "hang-rate=0.02",
    "malformed-rate=0.01",
    "refuse=forbidden",
)
# The runtime's own faults, then AWS's (answered by the moto server to every caller): transaction
# conflicts, throttling, stale reads, S3 and SQS errors.
CHAOS = (
    "redeliver=0.2,crash-after-call=0.05,"
    "ddb-conflict=0.05,ddb-throttle=0.02,stale-read=0.05,s3-error=0.02,sqs-error=0.02"
)
# The template's retry timing and attempts (TaskMaxAttempts 8, backoff from 2 s), scaled only where a
# crash makes the run wait: the function's Timeout (so a crashed call's claim goes stale after 90 s, not
# 360 s), the HTTP timeout inside it, and - the one explicit shortcut - the queues' visibility timeout.
TIMING = ["--visibility-timeout", "10", "--parameter-overrides",
          "GeneratorTimeoutSeconds=30", "ProviderHttpTimeoutSeconds=5"]  # fmt: skip


def prompt(i: int) -> str:
    return f"a forbidden picture number {i}" if i % 50 == 7 else f"a product shot number {i}"


def prove(tmp_path: Path, provider: str, can_fail: set[str]) -> None:
    """One provider's proof: the run, then what every row, the API's counts and the completion event say."""
    source = tmp_path / "proof.csv"
    source.write_text("id,prompt\n" + "".join(f"r{i},{prompt(i)}\n" for i in range(1, ROWS + 1)))
    out = tmp_path / "out"
    faults = [arg for fault in FAULTS for arg in ("--emulator-fault", fault)]
    run = subprocess.run(
        [sys.executable, "-m", "imagepipe_cli", "run", str(source), "--out", str(out), "--no-progress",
         "--provider", provider, "--chaos", CHAOS, *faults, *TIMING],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert run.returncode in (0, 1), run.stdout + run.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    stats = json.loads((out / "logs" / "run-stats.json").read_text())
    api = stats["emulators"][provider]

    # Every row exactly once, each in one terminal state with a reason
    assert [r["row"] for r in rows] == list(range(1, ROWS + 1))
    assert {r["status"] for r in rows} <= {"succeeded", "failed"}
    assert all(r["error"] and r["error"]["message"] for r in rows if r["status"] == "failed")

    # Every row that can succeed succeeded: refusals fail for moderation, and only what cannot be
    # retried without paying twice fails otherwise
    for r in rows:
        if "forbidden" in r["prompt"]:
            # refused - unless its submit's answer was lost first (Atlas Cloud): then it cannot be known
            assert r["status"] == "failed" and r["error"]["type"] in can_fail, r
        elif r["status"] == "failed":
            assert r["error"]["type"] in can_fail, r
    assert sum(r["error"]["type"] == "moderation" for r in rows if r["error"]) >= ROWS // 50 * 0.7
    lost = [r for r in rows if r["error"] and r["error"]["type"] == "answer_lost"]
    assert all(r["answers_lost"] >= 1 for r in lost)  # each such row says so, and is counted
    good = [r for r in rows if r["status"] == "succeeded"]
    assert len(good) + len(lost) + sum("forbidden" in r["prompt"] for r in rows) >= ROWS
    assert all(r["images"] for r in good)

    # At most one paid generation per row, except requests whose answer was lost - each counted
    paid = api["paid_by_prompt"]
    for r in rows:
        assert paid.get(r["prompt"], 0) <= 1 + r["answers_lost"], r
    if provider == "atlascloud":
        assert all(paid.get(r["prompt"], 0) <= 1 for r in rows)  # a submit is never resent

    # The faults and the chaos really happened
    responses = api["responses"]
    assert int(responses.get("500", 0)) > 50 and int(responses.get("429", 0)) > 20
    assert stats["chaos"]["redelivered"] > 100 and stats["chaos"]["invocations_failed"] > 5

    # The DLQ holds nothing the results do not call failed, and the counts and the one completion event
    # agree with the results
    assert stats["dead_letter_queue"] == 0
    counts = Counter(r["status"] for r in rows)
    (event,) = stats["completion_events"]
    assert event["counts"] == {
        "total": ROWS,
        "succeeded": counts["succeeded"],
        "failed": counts["failed"],
        "rejected": 0,
        "cancelled": 0,
    }
    assert event["cost"] == pytest.approx(sum(r["cost"] for r in rows))
    print(
        f"{provider}: {ROWS} rows, {counts['succeeded']} succeeded, {counts['failed']} failed "
        f"({Counter(r['error']['type'] for r in rows if r['error'])}); responses {responses}; "
        f"chaos {stats['chaos']}; lost answers {sum(r['answers_lost'] for r in rows)}; "
        f"paid {sum(paid.values())} for {len(good)} rows made"
    )
