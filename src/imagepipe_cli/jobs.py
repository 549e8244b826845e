"""`imagepipe submit/status/results/cancel/retry/redrive`: start and follow jobs on a deployed (or local) stack."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError

from imagepipe.contract import IMAGE_COLUMNS, JOB_ID_PATTERN, LOCAL_PROVIDER
from imagepipe.jobstate import CANCELLED, COMPLETED, FAILED, JOB_FINAL, SPLITTING, JobFinishing, TaskState
from imagepipe.layout import JobLayout
from imagepipe.localroute import LocalRoute
from imagepipe.providers import provider_class
from imagepipe.rows import (
    FORMATS,
    InputUnreadable,
    RawRow,
    ReadReport,
    RowDefaults,
    RowRejected,
    decode_lines,
    format_for_key,
    read_rows,
    row_id_of,
    split_lines,
    to_task,
)
from imagepipe.settings import GeneratorSettings
from imagepipe_cli.argtypes import dollars, positive_int
from imagepipe_cli.local.runner import (
    clear_previous_output,
    default_template,
    download_results,
    new_job_id,
)
from imagepipe_cli.local.template import load_template
from imagepipe_cli.progress import Progress
from imagepipe_cli.stackref import Stack, StackError, describe_aws_error, find_stack
from imagepipe_cli.uploads import upload_input

EXIT_OK, EXIT_NOT_OK, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
POLL_S = 2.0  # how often --wait reads the job record (tests shorten it)
SPLIT_START_TIMEOUT_S = 120  # an upload the stack has not turned into a job by then never will
SHOWN_REJECTS = 20
READ_CHUNK = 256 * 1024
DRY_RUN_JOB = "dry-run"  # any valid job id: to_task needs one, nothing is sent
DRY_RUN_BUCKET = "your-input-bucket"
MAX_JOB_ID = 80  # JOB_ID_PATTERN's limit


class JobError(Exception):
    """Something the user asked for that cannot be done: one line, and the command's exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------- the parsers


def stack_option() -> argparse.ArgumentParser:
    """--stack, for every command that works on a stack."""
    stack = argparse.ArgumentParser(add_help=False)
    stack.add_argument(
        "--stack",
        metavar="NAME",
        help="the CloudFormation stack (default: $IMAGEPIPE_STACK, else imagepipe-local when "
        "AWS_ENDPOINT_URL is set - the stack of `imagepipe up` - else imagepipe)",
    )
    return stack


def add_parsers(commands: Any) -> None:
    """The job commands, added to `imagepipe`'s subcommands."""
    stack = stack_option()
    no_progress = argparse.ArgumentParser(add_help=False)
    no_progress.add_argument("--no-progress", action="store_true", help="with --wait: no progress bar")

    submit_cmd = commands.add_parser(
        "submit",
        parents=[stack, no_progress],
        help="upload a .csv/.jsonl to the stack's input bucket: a new job",
        description="Upload FILE to the stack's input bucket (inbox/NAME) and print the job id on the first "
        "line of stdout. --wait follows the job to its end: exit 0 if every row succeeded, 1 otherwise. "
        "--dry-run checks the file here, without AWS: exit 0 if no row would be rejected, 1 if some would, "
        "2 if the file cannot be read.",
    )
    submit_cmd.add_argument("file", type=Path, metavar="FILE", help="a .csv or .jsonl file of prompts")
    submit_cmd.add_argument(
        "--job-id", metavar="ID", help="name the job (default: <file stem>-<yyyymmdd-hhmmss>-<4 hex>)"
    )
    submit_cmd.add_argument(
        "--max-cost", type=dollars, metavar="USD", help="stop paid calls once the job has spent this much"
    )
    submit_cmd.add_argument("--wait", action="store_true", help="follow the job until it is finished")
    submit_cmd.add_argument(
        "--dry-run", action="store_true", help="check the file with the splitter's rules; upload nothing"
    )
    submit_cmd.add_argument(
        "--template", type=Path, help="--dry-run: the template whose prices apply (default: ./template.yaml)"
    )

    status_cmd = commands.add_parser(
        "status",
        parents=[stack],
        help="one job's status, or a table of recent jobs",
        description="JOB's status, counts, cost and where its results are; without JOB, the recent jobs.",
    )
    status_cmd.add_argument("job", nargs="?", metavar="JOB", help="a job id (default: list recent jobs)")
    status_cmd.add_argument("--json", action="store_true", help="the job record(s) as JSON")
    status_cmd.add_argument(
        "--limit", type=positive_int, default=20, metavar="N", help="recent jobs to list (default: 20)"
    )

    results_cmd = commands.add_parser(
        "results",
        parents=[stack],
        help="download a finished job's results and images",
        description="Download JOB's results.jsonl, results.csv, report.html, manifest.json and images into "
        "DIR, as `imagepipe run` leaves them.",
    )
    results_cmd.add_argument("job", metavar="JOB")
    results_cmd.add_argument(
        "--out", type=Path, default=Path("output"), metavar="DIR", help="output folder (default: ./output)"
    )

    cancel_cmd = commands.add_parser(
        "cancel",
        parents=[stack],
        help="stop a job's paid calls; its rows not yet made end cancelled",
        description="Ask JOB to stop. Exit 1 if it is unknown or already finished.",
    )
    cancel_cmd.add_argument("job", metavar="JOB")

    retry_cmd = commands.add_parser(
        "retry",
        parents=[stack, no_progress],
        help="a new job of a finished job's failed and cancelled rows",
        description="Start JOB-retry-N, made only of JOB's failed and cancelled rows, read again from JOB's "
        "input file, and print its id. Exit 0 with 'nothing to retry' when no row failed.",
    )
    retry_cmd.add_argument("job", metavar="JOB")
    retry_cmd.add_argument("--wait", action="store_true", help="follow the new job until it is finished")
    retry_cmd.add_argument(
        "--max-cost", type=dollars, metavar="USD", help="the new job's budget (default: the old job's)"
    )

    redrive_cmd = commands.add_parser(
        "redrive",
        parents=[stack],
        help="send the rows whose tasks ended in the dead-letter queue back to work",
        description="Rows whose tasks ended in the dead-letter queue (recorded failed, with their message) "
        "are queued again; their jobs run again and finish anew with the new outcomes.",
    )
    redrive_cmd.add_argument("jobs", nargs="*", metavar="JOB", help="jobs to redrive (default: recent jobs)")


COMMANDS = ("submit", "status", "results", "cancel", "retry", "redrive")
Command = Callable[[argparse.Namespace, TextIO, TextIO], int]


def run_command(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """One job command; every error a user can act on is one line on stderr, never a traceback."""
    command: Command = {
        "submit": submit,
        "status": status,
        "results": results,
        "cancel": cancel,
        "retry": retry,
        "redrive": redrive,
    }[args.command]
    return guarded(command, args, out, err)


def guarded(
    command: Command, args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """A command on a stack, its errors one line on stderr (JobError, StackError and AWS's: exit 2;
    Ctrl-C: 130; anything else, a bug: 3), never a traceback."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        return command(args, out, err)
    except (JobError, StackError) as exc:
        code = exc.code if isinstance(exc, JobError) else EXIT_USAGE
        # Ctrl-C while waiting is the user's choice, not an error.
        print(f"imagepipe: {'' if code == EXIT_INTERRUPTED else 'error: '}{exc}", file=err)
        return code
    except (BotoCoreError, ClientError, Boto3Error) as exc:
        print(f"imagepipe: error: {describe_aws_error(exc) or exc}", file=err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("imagepipe: interrupted", file=err)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug, not the user's doing: still one line
        print(f"imagepipe: internal error: {type(exc).__name__}: {exc}", file=err)
        return EXIT_INTERNAL


def _stack_flag(args: argparse.Namespace) -> str:
    """The --stack part of a command to suggest, so the suggestion works as printed."""
    return f" --stack {args.stack}" if args.stack else ""


# ---------------------------------------------------------------------------------------- submit


def submit(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    path: Path = args.file
    _check_file(path)
    if args.dry_run:
        return dry_run(path, args.template or default_template(), out)
    job_id = args.job_id or new_job_id(path)
    if not re.match(JOB_ID_PATTERN, job_id):
        raise JobError(
            f"--job-id {job_id!r}: use 1-80 letters, digits, '-' or '_', starting with a letter or digit"
        )
    stack = find_stack(args.stack)
    state = stack.state
    # The splitter ignores an upload whose job exists already: say so now instead of starting nothing.
    if stack.call(lambda: state.job(job_id)) is not None:
        raise JobError(f"job {job_id!r} exists already on stack {stack.name}: choose another --job-id")
    bucket = stack.output("InputBucketName")
    # S3 suffix filters are case-sensitive: name the object so that the template's filter matches.
    key = f"inbox/{path.stem}{path.suffix.lower()}"
    metadata = {"job-id": job_id}
    if args.max_cost is not None:
        metadata["max-cost"] = f"{args.max_cost:g}"
    s3 = stack.client("s3")
    images = stack.call(lambda: upload_input(s3, bucket, path, key, {"Metadata": metadata}))
    print(job_id, file=out, flush=True)
    beside = f" (and {len(images.files)} image(s) its rows name, beside it)" if images.files else ""
    print(
        f"uploaded {path} to s3://{bucket}/{key}{beside}; follow it with: imagepipe status {job_id}{_stack_flag(args)}",
        file=err,
    )
    if not args.wait:
        return EXIT_OK
    return _wait_and_report(stack, job_id, args, out, err)


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise JobError(f"{path}: no such file")
    if path.suffix.lower() not in FORMATS:
        raise JobError(f"{path}: the input bucket only takes .csv, .jsonl and .json files")
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise JobError(f"{path}: not readable ({exc.strerror or exc})") from None


def _wait_and_report(stack: Stack, job_id: str, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    job = _wait(stack, job_id, err, progress=not args.no_progress, hint=_stack_flag(args))
    for line in _job_lines(stack, job, args):
        print(line, file=out)
    return EXIT_OK if job["status"] == COMPLETED else EXIT_NOT_OK


def _wait(stack: Stack, job_id: str, err: TextIO, *, progress: bool, hint: str = "") -> dict[str, Any]:
    """Until the job's record is final, with the progress bar on stderr."""
    state = stack.state
    bar = Progress(err, enabled=progress)
    started = time.monotonic()
    try:
        while True:
            job = stack.call(lambda: state.job(job_id))
            if job is None:
                if time.monotonic() - started > SPLIT_START_TIMEOUT_S:
                    bar.done()
                    raise JobError(
                        f"the stack did not start job {job_id} within {SPLIT_START_TIMEOUT_S} s of the upload "
                        "(is its S3 trigger working? see the splitter's logs)",
                        EXIT_NOT_OK,
                    )
                bar.show(None, 0)
            elif job["status"] in JOB_FINAL:
                bar.done()
                return job
            else:
                counts = stack.call(lambda: state.counts(job_id))
                bar.show(job, counts.finished, counts.cost)
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        bar.done()
        raise JobError(
            f"stopped waiting; job {job_id} goes on (imagepipe status {job_id}{hint})", EXIT_INTERRUPTED
        ) from None


# ---------------------------------------------------------------------------------------- dry run


@dataclass
class _Verdict:
    row: int
    row_id: str | None
    reason: str | None = None  # None: the row would be queued
    provider: str | None = None
    images: int = 0


def dry_run(path: Path, template_path: Path, out: TextIO) -> int:
    """The splitter's verdict on every row, made here: no upload, no AWS call."""
    try:
        template = load_template(template_path)
    except (OSError, ValueError) as exc:
        raise JobError(f"{template_path}: cannot read the template ({exc})") from None
    parameters = template.body.get("Parameters", {})
    provider = str(parameters.get("DefaultProvider", {}).get("Default", "atlascloud"))
    model = str(parameters.get("DefaultModel", {}).get("Default") or "") or None
    # The generator's own parser of PricePerImage ("atlascloud=0.003,..."); nothing else is read.
    prices = GeneratorSettings.model_construct(
        price_per_image=str(parameters.get("PricePerImage", {}).get("Default", ""))
    ).prices()
    report = ReadReport()
    try:
        with path.open("rb") as handle:
            chunks = iter(lambda: handle.read(READ_CHUNK), b"")
            rows = read_rows(decode_lines(split_lines(chunks)), format_for_key(path.name), report)
            verdicts = list(_verdicts(rows, RowDefaults(provider=provider, model=model)))
    except InputUnreadable as exc:
        raise JobError(f"{path}: {exc}") from None
    except OSError as exc:
        raise JobError(f"{path}: not readable ({exc.strerror or exc})") from None

    rejected = [v for v in verdicts if v.reason]
    queued = len(verdicts) - len(rejected)
    print(
        f"{path}: {len(verdicts)} rows ({report.format}) - {queued} would be queued, "
        f"{len(rejected)} would be rejected",
        file=out,
    )
    for verdict in rejected[:SHOWN_REJECTS]:
        who = f" (id {verdict.row_id!r})" if verdict.row_id is not None else ""
        print(f"  row {verdict.row}{who}: {verdict.reason}", file=out)
    if len(rejected) > SHOWN_REJECTS:
        print(f"  ... and {len(rejected) - SHOWN_REJECTS} more", file=out)
    images: Counter[str] = Counter()
    for verdict in verdicts:
        if not verdict.reason and verdict.provider and verdict.provider != LOCAL_PROVIDER:
            images[verdict.provider] += verdict.images
    parts, total = [], 0.0
    for name, count in sorted(images.items()):
        if name in prices:
            total += count * prices[name]
            parts.append(f"{name}: {count} image(s) x ${prices[name]:g}")
        else:
            parts.append(f"{name}: {count} image(s), no price in PricePerImage")
    print(
        f"estimated cost: ${total:.4f}" + (f" ({'; '.join(parts)})" if parts else " (no images)"),
        file=out,
    )
    print(
        f"  an estimate from {template_path.name}'s PricePerImage default: your stack's prices and the "
        "price a provider reports (Atlas Cloud) apply",
        file=out,
    )
    local = sum(1 for v in verdicts if not v.reason and v.provider == LOCAL_PROVIDER)
    if local:
        print(
            f"note: {local} row(s) go to the local ComfyUI route: the stack needs HybridMode=enabled and an "
            "`imagepipe agent` beside ComfyUI (cost $0 API, GPU time on your machine)",
            file=out,
        )
    if report.ignored_columns:
        print(
            f"note: extra column(s) echoed back in the results: {', '.join(report.ignored_columns)}", file=out
        )
    print(
        f"note: rows without a provider column go to {provider} ({template_path.name}'s DefaultProvider "
        "default; a stack deployed with another one differs)",
        file=out,
    )
    print(
        "note: API keys are checked on the stack, not here: rows for a provider without a key in the "
        "stack's secret are rejected when the file is split",
        file=out,
    )
    return EXIT_NOT_OK if rejected else EXIT_OK


def _verdicts(rows: Iterable[RawRow], defaults: RowDefaults) -> Iterator[_Verdict]:
    """What the splitter (splitter._split_row) decides for each row, minus the key check, which needs the
    stack's secret: to_task, then duplicate ids, then the provider's own limits."""
    seen: dict[str, int] = {}
    for raw in rows:
        try:
            task = to_task(DRY_RUN_JOB, raw, defaults, _dry_run_route(raw))
        except RowRejected as exc:
            yield _Verdict(raw.number, row_id_of(raw), str(exc))
            continue
        first = seen.setdefault(task.row_id, raw.number)
        if first != raw.number:
            yield _Verdict(
                raw.number, task.row_id, f"duplicate id {task.row_id!r}: row {first} already uses it"
            )
            continue
        if task.backend == "local":  # ComfyUI's own checks are the agent's (its nodes and models)
            yield _Verdict(raw.number, task.row_id, None, task.provider, task.n)
            continue
        reason = provider_class(task.provider).check(task)
        yield _Verdict(raw.number, task.row_id, reason or None, task.provider, task.n)


def _dry_run_route(raw: RawRow) -> LocalRoute:
    """The local route as a dry run sees it: enabled (the stack is not known here: without HybridMode=enabled
    the splitter rejects these rows), the file at the bucket's top, and an s3:// image taken to be in the
    stack's input bucket (the only bucket the splitter accepts)."""
    named = [
        v for k in IMAGE_COLUMNS if isinstance(v := (raw.values or {}).get(k), str) and v.startswith("s3://")
    ]
    bucket = named[0].removeprefix("s3://").partition("/")[0] if named else DRY_RUN_BUCKET
    return LocalRoute(enabled=True, bucket=bucket, folder="")


# ---------------------------------------------------------------------------------------- status


def status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    stack = find_stack(args.stack)
    if args.job is None:
        return _recent(stack, args, out)
    job = _job(stack, args.job)
    if args.json:
        record = dict(job)
        if job["status"] not in JOB_FINAL:
            counts = stack.call(lambda: stack.state.counts(args.job))
            record["live_counts"] = {**asdict(counts), "finished": counts.finished}
        print(json.dumps(record, indent=2, default=str), file=out)
    else:
        for line in _job_lines(stack, job, args):
            print(line, file=out)
    return EXIT_OK


def _job(stack: Stack, job_id: str) -> dict[str, Any]:
    job = stack.call(lambda: stack.state.job(job_id))
    if job is None:
        raise JobError(f"no job {job_id!r} on stack {stack.name} (imagepipe status lists them)", EXIT_NOT_OK)
    return job


def _words(status: str) -> str:
    # "completed_with_failures" must never read as a plain success.
    return status.replace("_", " ")


def _job_lines(stack: Stack, job: dict[str, Any], args: argparse.Namespace) -> list[str]:
    job_id, status, final = job["job_id"], job["status"], job["status"] in JOB_FINAL
    summary = job.get("summary") or {}
    cancel = " (cancel requested)" if job.get("cancel_requested") and not final else ""
    lines = [f"job {job_id}: {_words(status)}{cancel}"]
    if final:
        c = summary.get("counts") or {}
        cost = float(summary.get("cost", job.get("cost", 0.0)) or 0.0)
        lost = int(summary.get("answers_lost") or 0)
        lines.append(
            f"  rows:     {c.get('total', 0)} - {c.get('succeeded', 0)} succeeded, {c.get('failed', 0)} failed, "
            f"{c.get('rejected', 0)} rejected, {c.get('cancelled', 0)} cancelled"
        )
        cost_text = f"${cost:.4f}"
    else:
        counts = stack.call(lambda: stack.state.counts(job_id))
        cost, lost = counts.cost, counts.answers_lost
        if status == SPLITTING:
            lines.append(f"  rows:     the file is being split; {counts.finished} made so far")
        else:
            queued, rejected = int(job.get("queued", 0)), int(job.get("rejected", 0))
            lines.append(
                f"  rows:     {job.get('total', queued + rejected)} - so far {counts.succeeded} succeeded, "
                f"{counts.failed} failed, {rejected} rejected, {counts.cancelled} cancelled; "
                f"{max(queued - counts.finished, 0)} still to make"
            )
        cost_text = f"${cost:.4f} so far"
    max_cost = job.get("max_cost")
    lines.append(
        f"  cost:     {cost_text} ({f'max ${float(max_cost):g}' if max_cost is not None else 'no max cost'})"
    )
    if lost:
        lines.append(f"  note:     {lost} request(s) whose answer never arrived (each may have been charged)")
    finished = summary.get("finished_at") or job.get("finished_iso") or "-"
    lines.append(f"  created:  {job.get('created_iso') or '-'}   finished: {finished}")
    source = job.get("source") or {}
    if source.get("bucket"):
        lines.append(f"  source:   s3://{source['bucket']}/{source.get('key', '')}")
    if job.get("provider"):
        model = job.get("model") or "its default model"
        lines.append(f"  provider: {job['provider']}, {model} (rows without a provider column)")
    if job.get("parent_job"):
        lines.append(f"  retry of: {job['parent_job']}")
    error = job.get("error") or summary.get("error")
    if error:
        lines.append(f"  error:    {error.get('message', error)}")
    if final:
        bucket = (summary.get("results") or {}).get("bucket") or stack.outputs.get("OutputBucketName", "?")
        lines.append(
            f"  results:  s3://{bucket}/{JobLayout(job_id).prefix} (results.jsonl, results.csv, report.html, images/)"
        )
        lines.append(f"            imagepipe results {job_id} --out DIR{_stack_flag(args)}")
    else:
        lines.append("  results:  written when the job finishes")
    return lines


def _recent(stack: Stack, args: argparse.Namespace, out: TextIO) -> int:
    state = stack.state
    ids = stack.call(lambda: state.recent_jobs(args.limit))
    jobs = [job for job in (stack.call(lambda j=j: state.job(j)) for j in ids) if job is not None]
    if args.json:
        print(json.dumps(jobs, indent=2, default=str), file=out)
        return EXIT_OK
    if not jobs:
        print(f"no jobs on stack {stack.name} yet (imagepipe submit FILE starts one)", file=out)
        return EXIT_OK
    table = [("JOB", "STATUS", "DONE/TOTAL", "COST", "CREATED")]
    for job in jobs:
        summary = job.get("summary") or {}
        if job["status"] in JOB_FINAL:
            total = int((summary.get("counts") or {}).get("total", job.get("total", 0)))
            done, cost = f"{total}/{total}", float(summary.get("cost", job.get("cost", 0.0)) or 0.0)
        else:
            counts = stack.call(lambda j=job["job_id"]: state.counts(j))
            finished = counts.finished + int(job.get("rejected", 0))
            total_text = "?" if job["status"] == SPLITTING else str(job.get("total", "?"))
            done, cost = f"{finished}/{total_text}", counts.cost
        table.append(
            (job["job_id"], _words(job["status"]), done, f"${cost:.4f}", job.get("created_iso") or "-")
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=out
        )
    return EXIT_OK


# ---------------------------------------------------------------------------------------- results


def results(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    folder: Path = args.out
    if folder.exists() and not folder.is_dir():
        raise JobError(f"--out {folder}: exists and is not a folder")
    stack = find_stack(args.stack)
    job = _job(stack, args.job)
    if job["status"] not in JOB_FINAL:
        raise JobError(
            f"job {args.job} is {_words(job['status'])}: its results are written when it finishes "
            f"(imagepipe status {args.job}{_stack_flag(args)})",
            EXIT_NOT_OK,
        )
    bucket = ((job.get("summary") or {}).get("results") or {}).get("bucket") or stack.output(
        "OutputBucketName"
    )
    folder.mkdir(parents=True, exist_ok=True)
    clear_previous_output(folder)
    s3 = stack.client("s3")
    rows = stack.call(lambda: download_results(s3, bucket, args.job, folder))
    images = sum(len(row["images"]) for row in rows)
    print(
        f"job {args.job}: {_words(job['status'])} - {len(rows)} rows, {images} image(s) downloaded", file=out
    )
    print(
        f"images: {folder / 'images'}   results: {folder / 'results.jsonl'} (and .csv)   "
        f"report: {folder / 'report.html'}",
        file=out,
    )
    return EXIT_OK


# ---------------------------------------------------------------------------------------- cancel


def cancel(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    stack = find_stack(args.stack)
    state = stack.state
    job = _job(stack, args.job)
    # request_cancel refuses a final job; a job that ends between the read and the write is refused too.
    if job["status"] in JOB_FINAL or not stack.call(lambda: state.request_cancel(args.job)):
        job = _job(stack, args.job)
        raise JobError(f"job {args.job} is already {_words(job['status'])}: nothing to cancel", EXIT_NOT_OK)
    print(f"cancel requested for job {args.job} (it was {_words(job['status'])})", file=out)
    print("  no more paid calls are made for it; its rows not yet made end cancelled", file=out)
    print("  predictions already submitted are still collected (they are paid for already)", file=out)
    print(
        f"  it ends cancelled once every row is accounted for: imagepipe status {args.job}{_stack_flag(args)}",
        file=out,
    )
    return EXIT_OK


# ---------------------------------------------------------------------------------------- retry


def retry(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    stack = find_stack(args.stack)
    s3 = stack.client("s3")
    old = _job(stack, args.job)
    old_id = old["job_id"]
    if old["status"] not in JOB_FINAL:
        raise JobError(f"job {old_id} is {_words(old['status'])}: retry it once it has finished", EXIT_NOT_OK)
    output = ((old.get("summary") or {}).get("results") or {}).get("bucket") or stack.output(
        "OutputBucketName"
    )
    body = stack.call(lambda: s3.get_object(Bucket=output, Key=JobLayout(old_id).results_key)["Body"].read())
    outcomes = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
    wanted = {r["row"]: r["status"] for r in outcomes if r["status"] in (FAILED, CANCELLED)}
    if not wanted:
        print(f"nothing to retry: no row of job {old_id} failed or was cancelled", file=out)
        return EXIT_OK

    lines = _rows_to_retry(stack, old, set(wanted))
    new_id = _free_retry_id(stack, old_id)
    bucket = stack.output("InputBucketName")
    key = f"inbox/retries/{new_id}.jsonl"
    metadata = {"job-id": new_id, "parent-job": old_id}
    max_cost = args.max_cost if args.max_cost is not None else old.get("max_cost")
    if max_cost is not None:
        metadata["max-cost"] = f"{float(max_cost):g}"
    payload = "".join(line + "\n" for line in lines).encode("utf-8", "backslashreplace")
    stack.call(
        lambda: s3.put_object(
            Bucket=bucket, Key=key, Body=payload, Metadata=metadata, ContentType="application/x-ndjson"
        )
    )
    print(new_id, file=out, flush=True)
    kinds = Counter(wanted.values())
    print(
        f"{len(lines)} row(s) of job {old_id} ({kinds[FAILED]} failed, {kinds[CANCELLED]} cancelled) uploaded to "
        f"s3://{bucket}/{key}; follow it with: imagepipe status {new_id}{_stack_flag(args)}",
        file=err,
    )
    if len(lines) < len(wanted):
        print(
            f"note: {len(wanted) - len(lines)} of those rows could not be read again from the input", file=err
        )
    if not args.wait:
        return EXIT_OK
    return _wait_and_report(stack, new_id, args, out, err)


def _rows_to_retry(stack: Stack, job: dict[str, Any], numbers: set[int]) -> list[str]:
    """The rows with these numbers, read from the job's own input the way the splitter numbered them, as
    JSONL lines of the row's own values."""
    source = job.get("source") or {}
    bucket, key, etag = source.get("bucket"), source.get("key"), source.get("etag")
    if not bucket or not key:
        raise JobError(f"job {job['job_id']} has no input file on record: nothing to read the rows from")
    s3 = stack.client("s3")
    extra = {"IfMatch": etag} if etag else {}
    try:
        # IfMatch: another upload under the same key would number its rows differently.
        obj = s3.get_object(Bucket=bucket, Key=key, **extra)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "412"):
            raise JobError(
                f"the input of job {job['job_id']} (s3://{bucket}/{key}) was replaced since the job ran: "
                "its rows can no longer be told apart",
                EXIT_NOT_OK,
            ) from None
        if code in ("NoSuchKey", "404"):
            raise JobError(
                f"the input of job {job['job_id']} (s3://{bucket}/{key}) is gone: nothing to retry from",
                EXIT_NOT_OK,
            ) from None
        raise
    lines = []
    try:
        chunks = obj["Body"].iter_chunks(READ_CHUNK)
        for raw in read_rows(decode_lines(split_lines(chunks)), format_for_key(key), ReadReport()):
            if raw.number in numbers and raw.values is not None:
                values = dict(raw.values)
                # Without an id column the row number was the id: keep it, so the retried row keeps its id
                # (and image name) instead of taking its new position.
                values.setdefault("id", str(raw.number))
                lines.append(json.dumps(values, ensure_ascii=False))
    except InputUnreadable as exc:
        raise JobError(f"the input of job {job['job_id']} cannot be read again: {exc}", EXIT_NOT_OK) from None
    return lines


def _free_retry_id(stack: Stack, old_id: str) -> str:
    """<old>-retry-<n>, the first n that no job and no pending retry upload uses."""
    state, s3, bucket = stack.state, stack.client("s3"), stack.output("InputBucketName")
    for n in range(1, 1000):
        suffix = f"-retry-{n}"
        candidate = old_id[: MAX_JOB_ID - len(suffix)] + suffix
        if stack.call(lambda c=candidate: state.job(c)) is not None:
            continue
        # An upload not split yet has no job record: its object says the name is taken.
        try:
            s3.head_object(Bucket=bucket, Key=f"inbox/retries/{candidate}.jsonl")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return candidate
            raise
    raise JobError(f"job {old_id} has been retried 999 times already")


# ---------------------------------------------------------------------------------------- redrive


def redrive(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """The rows whose tasks ended in the dead-letter queue (recorded failed, their message kept) go back to
    work. Each row is first taken back on record - uncounted as failed and its job reopened (running), in
    one transaction - and only then sent, so the job is always running while it has work and finishes,
    writes its results and announces itself anew with the new outcomes. A row whose prediction is on
    record (asynchronous API: already paid) is sent with it and resumed, never submitted again. A redrive
    that stopped between the two is completed by the next one (its messages are kept until sent)."""
    stack = find_stack(args.stack)
    state, sqs, tasks = stack.state, stack.client("sqs"), stack.output("TasksQueueUrl")
    job_ids = args.jobs or stack.call(lambda: state.recent_jobs(100))
    total, code = 0, EXIT_OK
    for job_id in job_ids:
        sent = resumed = 0

        def send(name: str, body: str, job_id: str = job_id) -> None:
            stack.call(lambda: sqs.send_message(QueueUrl=tasks, MessageBody=body))
            stack.call(lambda: state.redrive_sent(job_id, name))

        for name, body in stack.call(lambda j=job_id: state.unsent_redrives(j)):
            send(name, body)  # taken back by an earlier redrive that stopped before sending it
            sent += 1
        for name, body in stack.call(lambda j=job_id: state.dead_letters(j)):
            task = stack.call(lambda n=name, j=job_id: state.task(j, n))
            message = _redrive_message(body, task)
            try:
                taken = stack.call(lambda n=name, j=job_id, m=message: state.redrive(j, n, m))
            except JobFinishing as exc:
                print(f"imagepipe: {exc}", file=err)
                code = EXIT_NOT_OK
                break
            if not taken:
                continue  # another redrive took it, or it has an outcome again
            send(name, message)
            sent += 1
            resumed += bool(task and task.prediction_id)
        if sent:
            note = f" ({resumed} resuming the prediction already paid for)" if resumed else ""
            print(
                f"job {job_id}: {sent} dead-lettered row(s) queued again{note}; the job runs again", file=out
            )
        total += sent
    print(f"redrove {total} row(s) from the dead-letter queue", file=out)
    return code


def _redrive_message(body: str, task: TaskState | None) -> str:
    """The task message to send again: a fresh start of its tries, and its prediction if one is on
    record (resumed, never submitted again - even when the kept message predates it)."""
    fields = {
        k: v
        for k, v in json.loads(body).items()
        if k not in ("prediction_id", "handbacks", "submitted_at", "attempts", "throttles", "first_failed_at")
    }
    if task is not None and task.prediction_id:
        fields.update(prediction_id=task.prediction_id, submitted_at=task.submitted_at)
    return json.dumps(fields)


def _job_of(body: str) -> str:
    try:
        return str(json.loads(body).get("job_id") or "?")
    except (ValueError, AttributeError):
        return "?"
