"""`imagepipe up` as a user runs it: a long-running local stack on a fixed port, driven by the AWS CLI and
followed with `imagepipe status` / `imagepipe results`, stopped with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, ROOT

AWS = Path(sys.executable).with_name("aws")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def stack(tmp_path):
    """`imagepipe up` in its own process; yields (endpoint, env for clients, the process's output file)."""
    port = free_port()
    log = tmp_path / "up.out"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    env.pop("AWS_ENDPOINT_URL", None)
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
                str(tmp_path / "state"),
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while "imagepipe is up" not in log.read_text():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)
    client_env = {**env, "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    yield endpoint, client_env, log, process
    if process.poll() is None:
        process.kill()
        process.wait()


def aws(env: dict, *args: str) -> str:
    done = subprocess.run([str(AWS), *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def imagepipe(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imagepipe_cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_aws_cli_starts_a_job_on_imagepipe_up_and_imagepipe_follows_it(stack, tmp_path):
    endpoint, env, log, process = stack

    # Given the stack, found by the AWS CLI through CloudFormation like a deployed one
    described = json.loads(aws(env, "cloudformation", "describe-stacks", "--stack-name", "imagepipe-local"))
    outputs = {o["OutputKey"]: o["OutputValue"] for o in described["Stacks"][0]["Outputs"]}
    assert {"InputBucketName", "OutputBucketName", "JobsTableName"} <= set(outputs)

    # When a user copies a CSV into the input bucket with the AWS CLI
    aws(env, "s3", "cp", str(EXAMPLES / "prompts.csv"), f"s3://{outputs['InputBucketName']}/")

    # Then a job starts and completes; `imagepipe status` shows it
    deadline = time.monotonic() + 180
    while True:
        listed = imagepipe(env, "status", "--json")
        assert listed.returncode == 0, listed.stderr
        jobs = json.loads(listed.stdout)
        if jobs and jobs[0]["status"] in ("completed", "completed_with_failures", "failed"):
            break
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(1)
    job = jobs[0]
    assert job["status"] == "completed" and job["summary"]["counts"]["succeeded"] == 3
    shown = imagepipe(env, "status", job["job_id"])
    assert shown.returncode == 0 and "completed" in shown.stdout and "3 succeeded" in shown.stdout

    # ...its files are in the output bucket, as the AWS CLI lists them
    listing = aws(env, "s3", "ls", f"s3://{outputs['OutputBucketName']}/jobs/{job['job_id']}/")
    for name in ("results.jsonl", "results.csv", "manifest.json", "report.html"):
        assert name in listing

    # ...`imagepipe results` fetches them with the images
    out = tmp_path / "results"
    fetched = imagepipe(env, "results", job["job_id"], "--out", str(out))
    assert fetched.returncode == 0, fetched.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["succeeded"] * 3
    assert all((out / r["images"][0]).is_file() for r in rows)
    assert (out / "report.html").is_file() and (out / "results.csv").is_file()

    # ...and `up` announced the completion. Ctrl-C stops it cleanly.
    deadline = time.monotonic() + 30
    while f"job {job['job_id']}: completed" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0
    text = log.read_text()
    assert "stopping the local stack" in text and "Traceback" not in text
