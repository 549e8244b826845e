"""The sample outputs README.md and docs/*.md show come from real runs and stay true: each block marked
`<!-- sample: NAME -->` is compared with what the same command prints today. Only what changes from run
to run (ports, times, job ids, request ids) is masked; everything else must match."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# What differs between two runs of the same command, and nothing else.
MASKS = [
    (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", "<time>"),
    (r"\b([a-z]+)-\d{8}-\d{6}-[0-9a-f]{4}\b", r"\1-<job>"),
    (r"JobSweeperFunctionSweep-[A-Z0-9]+", "JobSweeperFunctionSweep-<id>"),
    (r"\b[0-9a-f]{32}\b", "<hex>"),
    (r"127\.0\.0\.1:\d+", "127.0.0.1:<port>"),
    (r"\bin \d+(\.\d+)? s\b", "in <n> s"),
]
VOLATILE = {"request_id", "seconds", "created_at", "finished_at", "etag", "version_id"}


def samples() -> dict[str, str]:
    found: dict[str, str] = {}
    for doc in DOCS:
        for name, body in re.findall(
            r"<!-- sample: ([a-z-]+) -->\n```[a-z]*\n(.*?)```", doc.read_text(), re.S
        ):
            assert name not in found, f"two samples named {name}"
            found[name] = body
    return found


SAMPLES = samples()


def mask(text: str) -> str:
    for pattern, replacement in MASKS:
        text = re.sub(pattern, replacement, text)
    return text


def assert_same_lines(shown: str, printed: str) -> None:
    """Every line shown is the line printed, in order; a shown line `...` stands for any lines."""
    shown_lines, printed_lines = mask(shown).splitlines(), mask(printed).splitlines()
    at = 0
    for i, line in enumerate(shown_lines):
        if line == "...":
            following = shown_lines[i + 1] if i + 1 < len(shown_lines) else None
            while at < len(printed_lines) and printed_lines[at] != following:
                at += 1
            continue
        assert at < len(printed_lines), f"shown but not printed: {line!r}\nprinted:\n{mask(printed)}"
        assert line == printed_lines[at], f"shown:   {line!r}\nprinted: {printed_lines[at]!r}"
        at += 1
    assert at == len(printed_lines), f"printed but not shown: {printed_lines[at:]}"


def imagepipe(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imagepipe_cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def environment() -> dict[str, str]:
    """A user's shell without provider keys or a stack of their own (the demo's header depends on neither)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_SECRET_KEY"))}
    env.pop("AWS_ENDPOINT_URL", None)
    return env


def test_the_samples_are_all_there():
    assert {
        "demo-output",
        "submit-session",
        "results-jsonl",
        "results-csv-header",
        "completion-event",
    } <= set(SAMPLES)


def test_the_demo_output_is_what_make_demo_prints(tmp_path):
    # What `make demo` runs (the Makefile's command, from a folder of its own so ./output is not the user's)
    makefile = (ROOT / "Makefile").read_text()
    command = re.search(r"^demo:.*\n\t\$\(BIN\)/imagepipe (.*)$", makefile, re.M).group(1)
    args = shlex.split(command)
    args[args.index("run") + 1] = str(ROOT / args[args.index("run") + 1])
    run = imagepipe(*args, "--no-progress", cwd=tmp_path, env=environment())

    assert run.returncode == 0, run.stderr
    assert_same_lines(SAMPLES["demo-output"], run.stdout)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory) -> Path:
    """The run the results samples come from (the README names its command)."""
    out = tmp_path_factory.mktemp("mixed") / "out"
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"From `imagepipe (run examples/mixed\.csv[^`]*)`", readme).group(1)
    args = shlex.split(command)
    args[1] = str(ROOT / args[1])
    run = imagepipe(*args, "--out", str(out), "--no-progress", cwd=ROOT, env=environment())
    assert run.returncode == 1, run.stderr  # rows were rejected and one failed, as the sample shows
    return out


def test_the_results_lines_are_lines_of_a_real_run(mixed_run):
    real = {r["row"]: r for r in map(json.loads, (mixed_run / "results.jsonl").read_text().splitlines())}
    shown = [json.loads(line) for line in SAMPLES["results-jsonl"].splitlines()]

    assert {r["status"] for r in shown} >= {"succeeded", "failed", "rejected"}
    for line in shown:
        printed = real[line["row"]]
        assert list(line) == list(printed)  # the same fields, in the same order
        for field, value in line.items():
            if field not in VOLATILE:
                assert mask(json.dumps(value)) == mask(json.dumps(printed[field])), (line["row"], field)


def test_the_results_csv_header_is_the_real_one(mixed_run):
    header = (mixed_run / "results.csv").read_text().splitlines()[0]
    assert SAMPLES["results-csv-header"].strip() == header


def _same_shape(shown, printed, where="detail"):
    if isinstance(shown, dict):
        assert isinstance(printed, dict) and list(shown) == list(printed), where
        for key in shown:
            if key not in VOLATILE:
                _same_shape(shown[key], printed[key], f"{where}.{key}")
    else:
        assert mask(json.dumps(shown)) == mask(json.dumps(printed)), where


def test_the_completion_event_is_the_one_a_real_run_published(mixed_run):
    (printed,) = json.loads((mixed_run / "logs" / "run-stats.json").read_text())["completion_events"]
    _same_shape(json.loads(SAMPLES["completion-event"]), printed)


@pytest.fixture
def local_stack(tmp_path):
    """`imagepipe up` on a free port; yields the environment of a shell that uses it."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**environment(), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    log = tmp_path / "up.out"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "imagepipe_cli",
                "up",
                "--port",
                str(port),
                "--state-dir",
                str(tmp_path / "s"),
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 180
        while "imagepipe is up" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        yield {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1"}
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def test_the_submit_session_is_what_the_commands_print(local_stack, tmp_path):
    # The session's commands, run as shown, from a folder holding the example file
    (tmp_path / "examples").mkdir()
    shutil.copy(EXAMPLES / "mixed.csv", tmp_path / "examples" / "mixed.csv")
    steps = re.split(r"^\$ ", SAMPLES["submit-session"], flags=re.M)[1:]
    assert len(steps) >= 2
    for step in steps:
        command, _, shown = step.partition("\n")
        args = shlex.split(command)
        assert args[0] == "imagepipe"
        run = imagepipe(*args[1:], cwd=tmp_path, env=local_stack)
        assert run.returncode in (0, 1), run.stderr
        assert_same_lines(shown, run.stdout)
