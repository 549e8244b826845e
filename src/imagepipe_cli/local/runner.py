"""`imagepipe run`: the whole pipeline on this machine - moto server, the stack from template.yaml,
the same handlers - driven by uploading the input file, then results.jsonl built from what the stack
recorded."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import boto3
from botocore.config import Config

from imagepipe.contract import job_stem
from imagepipe.layout import STATUS_FAILED, STATUS_REJECTED, STATUS_SUCCEEDED
from imagepipe.records import get_json
from imagepipe.results import JobResults, collect_results
from imagepipe.rows import FORMATS
from imagepipe_cli.emulator import AtlasEmulator, EmulatorConfig, parse_fault
from imagepipe_cli.local.event_sources import S3Notifications, SqsPoller
from imagepipe_cli.local.lambda_runtime import ProcessFunction
from imagepipe_cli.local.moto_server import MotoServer
from imagepipe_cli.local.stack import LocalStack, deploy_stack
from imagepipe_cli.local.template import Template, load_template

REGION = "us-east-1"
STACK_NAME = "imagepipe-local"
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE = 0, 1, 2
SPLIT_START_TIMEOUT_S = 120


class RunError(Exception):
    """A problem the user can fix (bad file, bad flag, missing keys): one line, exit code 2."""


@dataclass
class RunOptions:
    input: Path
    out: Path = Path("output")
    template: Path = Path("template.yaml")
    atlas_url: str | None = None
    concurrency: int | None = None
    batch_size: int | None = None
    emulator_latency_ms: float = 50.0
    emulator_faults: list[str] = field(default_factory=list)
    retry_delay_s: int = 1
    timeout_s: float = 3600.0
    progress: bool = True


@dataclass
class RunSummary:
    job_id: str
    results: JobResults
    seconds: float
    exit_code: int


def default_template() -> Path:
    """template.yaml in the current folder, else the one in the checkout this package runs from."""
    here = Path("template.yaml")
    if here.exists():
        return here
    return Path(__file__).resolve().parents[3] / "template.yaml"


def run(options: RunOptions, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> RunSummary:
    _check_options(options)
    template = load_template(options.template)
    started = time.monotonic()
    options.out.mkdir(parents=True, exist_ok=True)
    _clear_previous_output(options.out)
    logs = options.out / "logs"
    logs.mkdir(exist_ok=True)
    job_id = _new_job_id(options.input)
    with ExitStack() as cleanup:
        moto = cleanup.enter_context(MotoServer(log_path=logs / "moto.log"))
        api = _api_endpoint(options, cleanup, out)
        client = _client_factory(moto.url)
        stack = deploy_stack(
            client,
            template,
            stack_name=STACK_NAME,
            parameters=_stack_parameters(template, options, api),
            region=REGION,
        )
        client("secretsmanager").put_secret_value(
            SecretId=stack.outputs["AtlasCredentialsSecretName"],
            SecretString=json.dumps({"access_key": api["access_key"], "secret_key": api["secret_key"]}),
        )
        env = {
            **FAKE_CREDENTIALS,
            "AWS_ENDPOINT_URL": moto.url,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "POWERTOOLS_TRACE_DISABLED": "true",  # no X-Ray daemon here
        }
        functions = {
            logical_id: cleanup.enter_context(
                closing(
                    ProcessFunction(
                        fn,
                        concurrency=_concurrency_for(stack, logical_id, options),
                        env_overrides=env,
                        log_path=logs / f"{logical_id}.log",
                        region=REGION,
                    )
                )
            )
            for logical_id, fn in stack.functions.items()
        }
        s3, sqs = client("s3"), client("sqs")
        notifications = S3Notifications(s3, sqs, stack.s3_triggers, functions)
        notifications.setup()
        pollers = [
            SqsPoller(
                client("sqs"),
                mapping,
                functions[mapping.function],
                region=REGION,
                batch_size=options.batch_size,
                concurrency=options.concurrency,
                retry_delay_s=options.retry_delay_s,
            )
            for mapping in stack.queue_mappings
        ]
        for poller in pollers:
            poller.start()
            cleanup.callback(poller.stop)

        # S3 suffix filters are case-sensitive: name the object so that the template's filter matches.
        key = f"inbox/{options.input.stem}{options.input.suffix.lower()}"
        s3.upload_file(
            str(options.input),
            stack.outputs["InputBucketName"],
            key,
            ExtraArgs={"Metadata": {"job-id": job_id}},
        )
        progress = _Progress(err, enabled=options.progress)
        _wait_for_job(stack, s3, sqs, notifications, pollers, job_id, options, progress)
        results = collect_results(s3, stack.outputs["OutputBucketName"], job_id, drained=True)
        progress.done()
        manifest = results.manifest or {}
        if manifest.get("status") == "unreadable":
            raise RunError(f"{options.input}: {manifest['error']['message']}")
        rows = _write_results(s3, stack.outputs["OutputBucketName"], results, options.out)
    seconds = time.monotonic() - started
    code = EXIT_OK if all(r["status"] == STATUS_SUCCEEDED for r in rows) else EXIT_ROWS_FAILED
    _print_summary(out, job_id, rows, options.out, seconds, manifest)
    return RunSummary(job_id, results, seconds, code)


def _check_options(options: RunOptions) -> None:
    if not options.input.is_file():
        raise RunError(f"{options.input}: no such file")
    if options.input.suffix.lower() not in FORMATS:
        raise RunError(f"{options.input}: the input bucket only takes .csv and .jsonl files")
    if not os.access(options.input, os.R_OK):
        raise RunError(f"{options.input}: not readable")
    if options.out.exists() and not options.out.is_dir():
        raise RunError(f"--out {options.out}: exists and is not a folder")
    if not options.template.is_file():
        raise RunError(f"{options.template}: template not found (use --template)")
    for fault in options.emulator_faults:
        try:
            parse_fault(fault)
        except ValueError as exc:
            raise RunError(f"--emulator-fault: {exc}") from None
    if options.atlas_url and not re.match(r"^https?://", options.atlas_url):
        raise RunError(f"--atlas-url {options.atlas_url!r} must start with http:// or https://")


def _check_range(template: Template, parameter: str, flag: str, value: int) -> None:
    spec = template.parameter(parameter)
    low, high = int(spec.get("MinValue", 1)), int(spec.get("MaxValue", 10**6))
    if not low <= value <= high:
        raise RunError(f"{flag} must be between {low} and {high} ({parameter} in template.yaml), got {value}")


def _stack_parameters(template: Template, options: RunOptions, api: dict[str, str]) -> dict[str, str]:
    params = {"AtlasBaseUrl": api["base_url"], "AtlasTokenUrl": api["token_url"]}
    if os.environ.get("ATLAS_MODEL"):
        params["AtlasModel"] = os.environ["ATLAS_MODEL"]
    if options.batch_size is not None:
        _check_range(template, "GeneratorBatchSize", "--batch-size", options.batch_size)
        params["GeneratorBatchSize"] = str(options.batch_size)
    if options.concurrency is not None:
        _check_range(template, "GeneratorMaxConcurrency", "--concurrency", options.concurrency)
        params["GeneratorMaxConcurrency"] = str(options.concurrency)
    return params


def _api_endpoint(options: RunOptions, cleanup: ExitStack, out: TextIO) -> dict[str, str]:
    """The image API to call: --atlas-url, else ATLAS_BASE_URL, else a fresh emulator."""
    base_url = options.atlas_url or os.environ.get("ATLAS_BASE_URL")
    if base_url:
        base_url = base_url.rstrip("/")
        access, secret = os.environ.get("ATLAS_ACCESS_KEY", ""), os.environ.get("ATLAS_SECRET_KEY", "")
        if not access or not secret:
            raise RunError("set ATLAS_ACCESS_KEY and ATLAS_SECRET_KEY to call the image API at " + base_url)
        token_url = (
            f"{base_url}/oauth/2.0/token"
            if options.atlas_url
            else os.environ.get("ATLAS_TOKEN_URL", "https://aip.baidubce.com/oauth/2.0/token")
        )
        return {"base_url": base_url, "token_url": token_url, "access_key": access, "secret_key": secret}
    config = EmulatorConfig(
        latency_ms=options.emulator_latency_ms, faults=tuple(parse_fault(f) for f in options.emulator_faults)
    )
    emulator = cleanup.enter_context(AtlasEmulator(config))
    faults = f", faults: {', '.join(options.emulator_faults)}" if options.emulator_faults else ""
    print(
        f"image API: the built-in Atlas EMULATOR at {emulator.base_url} (not the real API; "
        f"{options.emulator_latency_ms:g} ms per image{faults})",
        file=out,
    )
    return {
        "base_url": emulator.base_url,
        "token_url": emulator.token_url,
        "access_key": config.access_key,
        "secret_key": config.secret_key,
    }


def _client_factory(endpoint: str) -> Callable[[str], Any]:
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    )
    config = Config(max_pool_connections=64, retries={"mode": "standard", "max_attempts": 5})
    return lambda name: session.client(name, endpoint_url=endpoint, config=config)


def _concurrency_for(stack: LocalStack, logical_id: str, options: RunOptions) -> int:
    for mapping in stack.queue_mappings:
        if mapping.function == logical_id:
            return options.concurrency or mapping.max_concurrency
    return 1  # S3-triggered: one file, one invocation at a time is plenty locally


def _new_job_id(path: Path) -> str:
    stem = job_stem(path.stem)
    return f"{stem}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{os.urandom(2).hex()}"


def _clear_previous_output(out: Path) -> None:
    """A previous run's images would mix with this run's: clear them, but only in a folder that a
    previous run wrote (it has results.jsonl)."""
    if (out / "results.jsonl").exists():
        shutil.rmtree(out / "images", ignore_errors=True)
        (out / "results.jsonl").unlink()


def _wait_for_job(
    stack: LocalStack,
    s3: Any,
    sqs: Any,
    notifications: S3Notifications,
    pollers: list[SqsPoller],
    job_id: str,
    options: RunOptions,
    progress: _Progress,
) -> None:
    """Until the file is split and no task can still arrive: the tasks queue is empty and no
    invocation is in flight. (Rows are then counted from the stack's records, not from here.)"""
    output_bucket = stack.outputs["OutputBucketName"]
    manifest_key = f"jobs/{job_id}/manifest.json"
    started = time.monotonic()
    deadline = started + options.timeout_s
    manifest: dict | None = None
    quiet_checks = 0
    while time.monotonic() < deadline:
        if manifest is None and time.monotonic() - started > SPLIT_START_TIMEOUT_S:
            raise RunError(
                f"the upload did not start a job within {SPLIT_START_TIMEOUT_S} s (see {options.out}/logs)"
            )
        for delivery in notifications.poll_once():
            if delivery.error:
                raise RunError(
                    f"the splitter failed 3 times on the upload: {delivery.error} (see {options.out}/logs)"
                )
        if manifest is None or manifest.get("status") == "splitting":
            manifest = get_json(s3, output_bucket, manifest_key)
        for poller in pollers:
            if poller.stats.fatal:
                raise RunError(f"the queue poller stopped: {poller.stats.fatal} (see {options.out}/logs)")
        done = sum(p.stats.deleted for p in pollers)
        progress.show(manifest, done, sum(p.stats.returned for p in pollers))
        if manifest and manifest.get("status") != "splitting":
            # Two quiet checks in a row: a message can be between receive and invoke for an instant.
            quiet_checks = quiet_checks + 1 if _drained(sqs, stack) else 0
            if quiet_checks >= 2:
                return
        time.sleep(0.25)
    raise RunError(f"the job did not finish within {options.timeout_s:.0f} s")


def _drained(sqs: Any, stack: LocalStack) -> bool:
    """No task can still arrive: a received message stays 'not visible' until it is deleted or
    returned, so empty counters mean nothing is waiting, in flight or due for a retry."""
    for mapping in stack.queue_mappings:
        attrs = sqs.get_queue_attributes(
            QueueUrl=mapping.queue_url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )["Attributes"]
        if any(int(v) for v in attrs.values()):
            return False
    return True


def _write_results(s3: Any, bucket: str, results: JobResults, out: Path) -> list[dict[str, Any]]:
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    downloads = [key for row in results.rows for key in row.images]

    def fetch(key: str) -> None:
        s3.download_file(bucket, key, str(images_dir / key.rsplit("/", 1)[-1]))

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(fetch, downloads))
    rows = [
        {
            "id": row.id,
            "row": row.row,
            "status": row.status,
            "images": [f"images/{key.rsplit('/', 1)[-1]}" for key in row.images],
            "error": row.error,
        }
        for row in results.rows
    ]
    with open(out / "results.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows


def _print_summary(
    out: TextIO,
    job_id: str,
    rows: list[dict[str, Any]],
    folder: Path,
    seconds: float,
    manifest: dict[str, Any],
) -> None:
    counts = {
        status: sum(1 for r in rows if r["status"] == status)
        for status in (STATUS_SUCCEEDED, STATUS_FAILED, STATUS_REJECTED)
    }
    print(
        f"job {job_id}: {len(rows)} rows - {counts[STATUS_SUCCEEDED]} succeeded, {counts[STATUS_FAILED]} failed, "
        f"{counts[STATUS_REJECTED]} rejected in {seconds:.1f} s",
        file=out,
    )
    for warning in manifest.get("warnings") or []:
        print(f"  note: {warning}", file=out)
    problems = [r for r in rows if r["status"] != STATUS_SUCCEEDED]
    for row in problems[:10]:
        print(f"  row {row['row']} (id {row['id']!r}): {row['status']}: {row['error']['message']}", file=out)
    if len(problems) > 10:
        print(f"  ... and {len(problems) - 10} more in results.jsonl", file=out)
    print(
        f"images: {folder / 'images'}   results: {folder / 'results.jsonl'}   logs: {folder / 'logs'}",
        file=out,
    )


class _Progress:
    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self._stream, self._tty = stream, enabled and stream.isatty()
        self._enabled = enabled
        self._started = time.monotonic()
        self._last_line = 0.0
        self._line = ""

    def show(self, manifest: dict | None, done: int, retried: int) -> None:
        if not self._enabled:
            return
        queued = manifest.get("queued") if manifest and manifest.get("status") != "splitting" else None
        elapsed = time.monotonic() - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        if queued:
            width = 30
            filled = int(width * min(done, queued) / queued)
            line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{queued} tasks"
        else:
            line = f"splitting the file... {done} tasks done"
        line += f"  {rate:5.1f}/s" + (f"  {retried} retried" if retried else "")
        self._line = line
        if self._tty:
            self._stream.write("\r" + line.ljust(79))
            self._stream.flush()
        elif time.monotonic() - self._last_line >= 10:
            self._stream.write(line + "\n")
            self._last_line = time.monotonic()

    def done(self) -> None:
        if not self._enabled:
            return
        # A terminal has the last line already; a log gets it once more, final.
        self._stream.write("\n" if self._tty else self._line + "\n")
        self._stream.flush()
