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

from imagepipe.contract import DEFAULT_PROVIDER, PROVIDER_NAMES, job_stem
from imagepipe.jobstate import JOB_FINAL, JobState
from imagepipe.layout import STATUS_REJECTED, STATUS_SUCCEEDED
from imagepipe.providers import provider_class
from imagepipe.records import get_json
from imagepipe.rows import FORMATS
from imagepipe_cli.emulators import BaseEmulator, EmulatorConfig, emulator_class
from imagepipe_cli.emulators.base import parse_fault
from imagepipe_cli.local.event_sources import S3Notifications, SqsPoller
from imagepipe_cli.local.lambda_runtime import ProcessFunction
from imagepipe_cli.local.moto_server import MotoServer
from imagepipe_cli.local.stack import LocalStack, deploy_stack
from imagepipe_cli.local.template import Template, load_template

REGION = "us-east-1"
STACK_NAME = "imagepipe-local"
GENERATOR = "ImageGeneratorFunction"
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
    provider: str = DEFAULT_PROVIDER
    api_url: str | None = None
    model: str | None = None
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
        apis = _api_endpoints(options, cleanup, out)
        client = _client_factory(moto.url)
        stack = deploy_stack(
            client,
            template,
            stack_name=STACK_NAME,
            parameters=_stack_parameters(template, options, apis),
            region=REGION,
        )
        # The keys go where a deployed stack keeps them: the functions read them from the secret.
        keys = {name: value for api in apis.values() for name, value in api.keys.items()}
        client("secretsmanager").put_secret_value(
            SecretId=stack.outputs["ProviderKeysSecretName"], SecretString=json.dumps(keys)
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
                batch_size=options.batch_size if mapping.function == GENERATOR else None,
                concurrency=_concurrency_for(stack, mapping.function, options),
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
        state = JobState(_resource("dynamodb", moto.url).Table(stack.outputs["JobsTableName"]))
        job = _wait_for_job(stack, state, sqs, notifications, pollers, job_id, options, progress)
        progress.done()
        if (job.get("summary") or {}).get("error") or job.get("error"):
            error = job.get("error") or job["summary"]["error"]
            raise RunError(f"{options.input}: {error['message']}")
        rows = _download_results(s3, stack.outputs["OutputBucketName"], job_id, options.out)
        _write_run_stats(logs / "run-stats.json", functions, apis, len(rows))
        manifest = get_json(s3, stack.outputs["OutputBucketName"], f"jobs/{job_id}/manifest.json") or {}
    seconds = time.monotonic() - started
    code = EXIT_OK if all(r["status"] == STATUS_SUCCEEDED for r in rows) else EXIT_ROWS_FAILED
    _print_summary(out, job, rows, options.out, seconds, manifest)
    return RunSummary(job_id, job, rows, seconds, code)


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
    if options.provider not in PROVIDER_NAMES:
        raise RunError(f"--provider {options.provider!r}: use one of {', '.join(PROVIDER_NAMES)}")
    for fault in options.emulator_faults:
        try:
            parse_fault(fault, emulator_class(options.provider).FAULTS)
        except ValueError as exc:
            raise RunError(f"--emulator-fault: {exc}") from None
    if options.api_url and not re.match(r"^https?://[^\s/]+", options.api_url):
        raise RunError(f"--api-url {options.api_url!r} must start with http:// or https:// and name a host")


def _check_range(template: Template, parameter: str, flag: str, value: int) -> None:
    spec = template.parameter(parameter)
    low, high = int(spec.get("MinValue", 1)), int(spec.get("MaxValue", 10**6))
    if not low <= value <= high:
        raise RunError(f"{flag} must be between {low} and {high} ({parameter} in template.yaml), got {value}")


def _stack_parameters(template: Template, options: RunOptions, apis: dict[str, _Api]) -> dict[str, str]:
    params = {
        "DefaultProvider": options.provider,
        "DefaultModel": options.model or "",
        "AtlasCloudBaseUrl": apis["atlascloud"].base_url,
        "QianfanBaseUrl": apis["qianfan"].base_url,
        "OpenAIBaseUrl": apis["openai"].base_url,
        "BaiduBaseUrl": apis["baidu-oauth"].base_url,
    }
    if options.batch_size is not None:
        _check_range(template, "GeneratorBatchSize", "--batch-size", options.batch_size)
        params["GeneratorBatchSize"] = str(options.batch_size)
    if options.concurrency is not None:
        _check_range(template, "GeneratorMaxConcurrency", "--concurrency", options.concurrency)
        params["GeneratorMaxConcurrency"] = str(options.concurrency)
    return params


@dataclass
class _Api:
    base_url: str
    keys: dict[str, str]
    emulator: BaseEmulator | None = None


def _api_endpoints(options: RunOptions, cleanup: ExitStack, out: TextIO) -> dict[str, _Api]:
    """Each provider's API: --api-url for the chosen provider; else its public URL when its keys are in
    the environment; else its built-in emulator (which a file with a provider column may also use)."""
    apis: dict[str, _Api] = {}
    for name in PROVIDER_NAMES:
        cls = provider_class(name)
        env_keys = {key: os.environ.get(key, "") for key in cls.key_names}
        has_keys = all(env_keys.values())
        if name == options.provider and options.api_url:
            if not has_keys:
                raise RunError(f"set {' and '.join(cls.key_names)} to call {name} at {options.api_url}")
            apis[name] = _Api(options.api_url.rstrip("/"), env_keys)
        elif has_keys:
            apis[name] = _Api(cls.public_url, env_keys)
        faults = options.emulator_faults if name == options.provider else []
        if name not in apis:
            emulator = emulator_class(name)
            config = EmulatorConfig(
                latency_ms=options.emulator_latency_ms,
                faults=tuple(parse_fault(f, emulator.FAULTS) for f in faults),
            )
            running = cleanup.enter_context(emulator(config))
            apis[name] = _Api(running.base_url, dict(running.keys), running)
        api = apis[name]
        if api.emulator is not None:
            extra = f", faults: {', '.join(faults)}" if faults else ""
            what = (
                f"the built-in {emulator.title} EMULATOR at {api.base_url} (not the real API; "
                f"{options.emulator_latency_ms:g} ms per image{extra})"
            )
        else:
            what = f"{api.base_url} (keys from {', '.join(cls.key_names)})"
        default = " (the default)" if name == options.provider else ""
        print(f"image API {name}{default}: {what}", file=out)
    return apis


def _client_factory(endpoint: str) -> Callable[[str], Any]:
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    )
    config = Config(max_pool_connections=64, retries={"mode": "standard", "max_attempts": 5})
    return lambda name: session.client(name, endpoint_url=endpoint, config=config)


def _resource(name: str, endpoint: str) -> Any:
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    )
    return session.resource(name, endpoint_url=endpoint)


def _concurrency_for(stack: LocalStack, logical_id: str, options: RunOptions) -> int:
    for mapping in stack.queue_mappings:
        if mapping.function == logical_id:
            if logical_id == GENERATOR:
                return options.concurrency or mapping.max_concurrency
            return min(mapping.max_concurrency, 2)  # the finisher: one job at a time is plenty locally
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
    state: JobState,
    sqs: Any,
    notifications: S3Notifications,
    pollers: list[SqsPoller],
    job_id: str,
    options: RunOptions,
    progress: _Progress,
) -> dict[str, Any]:
    """Until the job's record says it is finished and its completion event is out - what a user of the
    deployed stack waits for. If every queue is empty and nothing is in flight while rows are still
    without an outcome, the job cannot finish: say so instead of waiting forever."""
    started = time.monotonic()
    deadline = started + options.timeout_s
    quiet_checks = 0
    while time.monotonic() < deadline:
        for delivery in notifications.poll_once():
            if delivery.error:
                raise RunError(
                    f"the splitter failed 3 times on the upload: {delivery.error} (see {options.out}/logs)"
                )
        for poller in pollers:
            if poller.stats.fatal:
                raise RunError(f"the queue poller stopped: {poller.stats.fatal} (see {options.out}/logs)")
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
            progress.show(job, counts.finished, counts.cost, sum(p.stats.returned for p in pollers))
            # Two quiet checks in a row: a message can be between receive and invoke for an instant.
            quiet_checks = quiet_checks + 1 if job["status"] == "running" and _drained(sqs, stack) else 0
            if quiet_checks >= 8:
                missing = int(job.get("queued", 0)) - counts.finished
                raise RunError(
                    f"the job cannot finish: {missing} row(s) have no outcome and nothing is left to run "
                    f"(they are in the dead-letter queue; see {options.out}/logs)"
                )
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


def _download_results(s3: Any, bucket: str, job_id: str, out: Path) -> list[dict[str, Any]]:
    """The job's results files and images, as `imagepipe results` fetches them from a deployed stack."""
    prefix = f"jobs/{job_id}/"
    for name in ("results.jsonl", "results.csv", "report.html", "manifest.json"):
        s3.download_file(bucket, prefix + name, str(out / name))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    images = [path for row in rows for path in row["images"]]
    (out / "images").mkdir(parents=True, exist_ok=True)

    def fetch(path: str) -> None:
        s3.download_file(bucket, prefix + path, str(out / path))

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(fetch, images))
    return rows


def _write_run_stats(
    path: Path, functions: dict[str, ProcessFunction], apis: dict[str, _Api], rows: int
) -> None:
    """What the run cost in Lambda time and API calls (what `make bench` reports)."""
    stats = {
        "rows": rows,
        "functions": {
            name: {"invocations": fn.invocations, "billed_seconds": round(fn.billed_s, 3)}
            for name, fn in functions.items()
        },
        "emulators": {name: api.emulator.stats() for name, api in apis.items() if api.emulator is not None},
    }
    for api in stats["emulators"].values():  # per-prompt counters are for tests, not for a summary
        for key in [k for k in api if ":" in k]:
            del api[key]
    path.write_text(json.dumps(stats, indent=2), encoding="utf-8")


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


class _Progress:
    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self._stream, self._tty = stream, enabled and stream.isatty()
        self._enabled = enabled
        self._started = time.monotonic()
        self._last_line = 0.0
        self._line = ""

    def show(self, job: dict | None, done: int, cost: float = 0.0, retried: int = 0) -> None:
        if not self._enabled:
            return
        queued = job.get("queued") if job and job.get("status") != "splitting" else None
        elapsed = time.monotonic() - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        if queued:
            width = 30
            filled = int(width * min(done, queued) / queued)
            line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{queued} rows"
            if rate > 0 and done < queued:
                line += f"  ETA {int((queued - done) / rate)} s"
        else:
            line = f"splitting the file... {done} rows done"
        line += f"  {rate:5.1f}/s  ${cost:.4f}" + (f"  {retried} retried" if retried else "")
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
