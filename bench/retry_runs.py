"""Issue "as harsh as AWS": with the template's defaults (no flag but the emulator's), does an API limited
to R requests/s lose a row to rate limits, and does an API with ~18% transient faults lose a row to
attempt exhaustion? Each run is `imagepipe run` against a standalone emulator (a real HTTP server) given
as --api-url; prints one line per run: rows, succeeded, failed (by error type), the API's answers, time.

    python bench/retry_runs.py [--rows-limited 900] [--rate 20] [--rows-faulty 600]"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from imagepipe_cli.emulators import EmulatorConfig, emulator_class
from imagepipe_cli.emulators.base import parse_fault

ROOT = Path(__file__).resolve().parents[1]


def run(label: str, rows: int, config: EmulatorConfig, provider: str = "qianfan") -> dict:
    cls = emulator_class(provider)
    with cls(config) as emulator, tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / f"{label}.csv"
        source.write_text("id,prompt\n" + "".join(f"r{i},a product shot number {i}\n" for i in range(rows)))
        out = Path(tmp) / "out"
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "imagepipe_cli", "run", str(source), "--out", str(out), "--no-progress",
             "--provider", provider, "--api-url", emulator.base_url],
            cwd=ROOT, env={**os.environ, **emulator.keys}, capture_output=True, text=True, timeout=3600,
        )  # fmt: skip
        seconds = time.monotonic() - started
        results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        stats = emulator.stats()
    statuses = Counter(r["status"] for r in results)
    errors = Counter(r["error"]["type"] for r in results if r["error"])
    line = {
        "run": label,
        "exit": proc.returncode,
        "rows": rows,
        "succeeded": statuses["succeeded"],
        "failed": dict(errors),
        "responses": stats.get("responses"),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(line), flush=True)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-limited", type=int, default=900)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--rows-faulty", type=int, default=600)
    args = parser.parse_args()
    qianfan = emulator_class("qianfan")
    run("rate-limited", args.rows_limited, EmulatorConfig(latency_ms=300, rate_limit=args.rate))
    faults = ("error-rate=0.12", "malformed-rate=0.06")  # 18% of calls fail transiently
    run(
        "transient-faults",
        args.rows_faulty,
        EmulatorConfig(latency_ms=200, faults=tuple(parse_fault(f, qianfan.FAULTS) for f in faults)),
    )


if __name__ == "__main__":
    main()
