"""`imagepipe run`: the whole pipeline on this machine - moto server, the stack from template.yaml,
the same handlers - driven by uploading the input file and waiting for the job to finish, then its
results, report and images fetched from the output bucket."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from imagepipe.contract import DEFAULT_PROVIDER, PROVIDER_NAMES, job_stem
from imagepipe.jobstate import COMPLETED, JOB_FINAL
from imagepipe.layout import STATUS_REJECTED, STATUS_SUCCEEDED
from imagepipe.records import get_json
from imagepipe.rows import FORMATS
from imagepipe_cli.agent.command import AgentError, check_comfyui_url, load_workflows
from imagepipe_cli.emulators import emulator_class
from imagepipe_cli.emulators.base import parse_fault
from imagepipe_cli.local.event_sources import Chaos
from imagepipe_cli.local.runtime import (
    LocalRuntime,
    RuntimeFailure,
    RuntimeSetupError,
    StackOptions,
    stack_parameters,
)
from imagepipe_cli.local.template import load_template
from imagepipe_cli.progress import Progress as _Progress
from imagepipe_cli.uploads import input_images, upload_input

EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE = 0, 1, 2
SPLIT_START_TIMEOUT_S = 120


class RunError(Exception):
    """A problem the user can fix (bad file, bad flag, missing keys): one line, exit code 2."""


@dataclass
class RunOptions(StackOptions):
    input: Path = Path()
    out: Path = Path("output")
    timeout_s: float = 3600.0
    progress: bool = True


@dataclass
class RunSummary:
    job_id: str
    job: dict[str, Any]
    rows: list[dict[str, Any]]
    seconds: float
    exit_code: int


def default_template() -> Path:
    """template.yaml in the current folder, else the one in the checkout this package runs from."""
    here = Path("template.yaml")
    if here.exists():
        return here
    return Path(__file__).resolve().parents[3] / "template.yaml"


def run(options: RunOptions, out: TextIO | None = None, err: TextIO | None = None) -> RunSummary:
    out, err = (
        out or sys.stdout,
        err or sys.stderr,
    )  # the streams of the moment (a test may have swapped them)
    _check_options(options)
    template = load_template(options.template)
    started = time.monotonic()
    options.out.mkdir(parents=True, exist_ok=True)
    clear_previous_output(options.out)
    logs = options.out / "logs"
    logs.mkdir(exist_ok=True)
    job_id = new_job_id(options.input)
    # A file with local rows gets the local route (ComfyUI: --comfyui, else the built-in emulator).
    options.hybrid = options.hybrid or input_images(options.input).local_rows > 0
    with _runtime_errors(), LocalRuntime(template, options, logs, out) as runtime:
        stack, s3 = runtime.stack, runtime.client("s3")
        # S3 suffix filters are case-sensitive: name the object so that the template's filter matches.
        key = f"inbox/{options.input.stem}{options.input.suffix.lower()}"
        bucket = stack.outputs["InputBucketName"]
        upload_input(s3, bucket, options.input, key, {"Metadata": {"job-id": job_id}})
        progress = _Progress(err, enabled=options.progress)
        job = _wait_for_job(runtime, job_id, options, progress)
        progress.done()
        if (job.get("summary") or {}).get("error") or job.get("error"):
            error = job.get("error") or job["summary"]["error"]
            raise RunError(f"{options.input}: {error['message']}")
        rows = download_results(s3, stack.outputs["OutputBucketName"], job_id, options.out)
        time.sleep(0.5)  # the completion event travels EventBridge -> the local tap queue
        runtime.write_stats(logs / "run-stats.json", len(rows), runtime.completions())
        manifest = get_json(s3, stack.outputs["OutputBucketName"], f"jobs/{job_id}/manifest.json") or {}
    seconds = time.monotonic() - started
    code = exit_code(job, rows)
    _print_summary(out, job, rows, options.out, seconds, manifest)
    return RunSummary(job_id, job, rows, seconds, code)


def exit_code(job: dict[str, Any], rows: list[dict[str, Any]]) -> int:
    """0 when the job completed with every row succeeded; 1 otherwise (a row failed, was rejected or cancelled,
    or the job failed - a file with no rows at all fails its job)."""
    if job.get("status") == COMPLETED and rows and all(r["status"] == STATUS_SUCCEEDED for r in rows):
        return EXIT_OK
    return EXIT_ROWS_FAILED


@contextmanager
def _runtime_errors() -> Iterator[None]:
    try:
        yield
    except RuntimeSetupError as exc:
        raise RunError(str(exc)) from None


def _check_options(options: RunOptions) -> None:
    if not options.input.is_file():
        raise RunError(f"{options.input}: no such file")
    if options.input.suffix.lower() not in FORMATS:
        raise RunError(f"{options.input}: the input bucket only takes .csv, .jsonl and .json files")
    if not os.access(options.input, os.R_OK):
        raise RunError(f"{options.input}: not readable")
    if options.out.exists() and not options.out.is_dir():
        raise RunError(f"--out {options.out}: exists and is not a folder")
    check_stack_options(options)


def check_stack_options(options: StackOptions) -> None:
    """The options `run` and `up` share (template, provider, faults, API URL)."""
    if not options.template.is_file():
        raise RunError(f"{options.template}: template not found (use --template)")
    if options.provider is not None and options.provider not in PROVIDER_NAMES:
        raise RunError(f"--provider {options.provider!r}: use one of {', '.join(PROVIDER_NAMES)}")
    try:
        parameters = stack_parameters(load_template(options.template), options)
    except RuntimeSetupError as exc:
        raise RunError(str(exc)) from None
    provider = parameters.get("DefaultProvider", DEFAULT_PROVIDER)
    if options.chaos:
        try:
            Chaos.parse(options.chaos)
        except ValueError as exc:
            raise RunError(f"--chaos: {exc}") from None
    for fault in options.emulator_faults:
        try:
            parse_fault(fault, emulator_class(provider).FAULTS)
        except ValueError as exc:
            raise RunError(f"--emulator-fault: {exc}") from None
    try:  # before the stack is set up: a typo in --comfyui or a bad workflow file costs no wait
        if options.comfyui:
            check_comfyui_url(options.comfyui)
        load_workflows(options.workflows)
    except AgentError as exc:
        raise RunError(str(exc)) from None
    if options.api_url and not re.match(r"^https?://[^\s/]+", options.api_url):
        raise RunError(f"--api-url {options.api_url!r} must start with http:// or https:// and name a host")


def new_job_id(path: Path) -> str:
    stem = job_stem(path.stem)
    return f"{stem}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{os.urandom(2).hex()}"


def clear_previous_output(out: Path) -> None:
    """A previous run's images would mix with this run's: clear them, but only in a folder that a
    previous run wrote (it has results.jsonl)."""
    if (out / "results.jsonl").exists():
        shutil.rmtree(out / "images", ignore_errors=True)
        (out / "results.jsonl").unlink()


def _wait_for_job(
    runtime: LocalRuntime, job_id: str, options: RunOptions, progress: _Progress
) -> dict[str, Any]:
    """Until the job's record says it is finished and its completion event is out - what a user of the
    deployed stack waits for. If every queue is empty and nothing is in flight while rows are still
    without an outcome, the job cannot finish: say so instead of waiting forever."""
    state = runtime.state
    started = time.monotonic()
    deadline = started + options.timeout_s
    quiet_checks = ticks = 0
    while time.monotonic() < deadline:
        try:
            runtime.pump()
        except RuntimeFailure as exc:
            raise RunError(f"{exc} (see {options.out}/logs)") from None
        ticks += 1
        if (
            ticks % 4
        ):  # the job record every second; S3 events every quarter (a busy moto serves one at a time)
            time.sleep(0.25)
            continue
        job = state.job(job_id)
        if job is None:
            if time.monotonic() - started > SPLIT_START_TIMEOUT_S:
                raise RunError(
                    f"the upload did not start a job within {SPLIT_START_TIMEOUT_S} s (see {options.out}/logs)"
                )
        elif job["status"] in JOB_FINAL and not job.get("event_pending"):
            return job
        else:
            counts = state.counts(job_id)
            progress.show(job, counts.finished, counts.cost, runtime.retried)
            # Two quiet checks in a row: a message can be between receive and invoke for an instant.
            quiet_checks = quiet_checks + 1 if job["status"] == "running" and runtime.drained() else 0
            if quiet_checks >= 3:
                missing = int(job.get("queued", 0)) - counts.finished
                raise RunError(
                    f"the job cannot finish: {missing} row(s) have no outcome and nothing is left to run "
                    f"(they are in the dead-letter queue; see {options.out}/logs)"
                )
        time.sleep(0.25)
    raise RunError(f"the job did not finish within {options.timeout_s:.0f} s")


def download_results(s3: Any, bucket: str, job_id: str, out: Path) -> list[dict[str, Any]]:
    """The job's results files and images, as `imagepipe results` fetches them from a deployed stack."""
    prefix = f"jobs/{job_id}/"
    for name in ("results.jsonl", "results.csv", "report.html", "manifest.json"):
        s3.download_file(bucket, prefix + name, str(out / name))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    images = [path for row in rows for path in row["images"]]
    (out / "images").mkdir(parents=True, exist_ok=True)

    def fetch(path: str) -> None:
        # One GET per image (download_file asks HEAD first, to plan a multipart download of a large file).
        (out / path).write_bytes(s3.get_object(Bucket=bucket, Key=prefix + path)["Body"].read())

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(fetch, images))
    return rows


def _print_summary(
    out: TextIO,
    job: dict[str, Any],
    rows: list[dict[str, Any]],
    folder: Path,
    seconds: float,
    manifest: dict[str, Any],
) -> None:
    summary = job.get("summary") or {}
    counts = summary.get("counts") or {}
    print(
        f"job {job['job_id']}: {job['status'].replace('_', ' ')} - {len(rows)} rows: "
        f"{counts.get('succeeded', 0)} succeeded, {counts.get('failed', 0)} failed, "
        f"{counts.get('rejected', 0)} rejected"
        + (f", {counts['cancelled']} cancelled" if counts.get("cancelled") else "")
        + f" in {seconds:.1f} s",
        file=out,
    )
    lost = sum(r["answers_lost"] for r in rows)
    by_provider = sorted({r["provider"] for r in rows if r["provider"] and r["status"] != STATUS_REJECTED})
    print(
        f"  cost: ${summary.get('cost', 0.0):.4f} ({', '.join(by_provider) or 'no calls'})"
        + (f"; {lost} request(s) whose answer never arrived (each may have been charged)" if lost else ""),
        file=out,
    )
    for warning in manifest.get("warnings") or []:
        print(f"  note: {warning}", file=out)
    if not rows:
        print("  the file has no rows (a header only, or blank lines): nothing was generated", file=out)
    problems = [r for r in rows if r["status"] != STATUS_SUCCEEDED]
    for row in problems[:10]:
        print(f"  row {row['row']} (id {row['id']!r}): {row['status']}: {row['error']['message']}", file=out)
    if len(problems) > 10:
        print(f"  ... and {len(problems) - 10} more in results.jsonl", file=out)
    print(
        f"images: {folder / 'images'}   results: {folder / 'results.jsonl'} (and .csv)   "
        f"report: {folder / 'report.html'}   logs: {folder / 'logs'}",
        file=out,
    )
