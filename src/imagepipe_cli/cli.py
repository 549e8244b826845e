"""The `imagepipe` command: `run` the whole pipeline locally, or serve a provider's `emulator`."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from imagepipe.contract import DEFAULT_PROVIDER, PROVIDER_NAMES
from imagepipe_cli import jobs
from imagepipe_cli.argtypes import non_negative, port, positive_int
from imagepipe_cli.emulators import EmulatorConfig, emulator_class
from imagepipe_cli.emulators.base import parse_fault, serve
from imagepipe_cli.local.runner import (
    EXIT_USAGE,
    RunError,
    RunOptions,
    check_stack_options,
    default_template,
    run,
)
from imagepipe_cli.local.runtime import RuntimeSetupError
from imagepipe_cli.local.up import DEFAULT_PORT, UpOptions, up


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagepipe", description="Batch AI-image generation on AWS serverless."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run_cmd = commands.add_parser(
        "run",
        help="run the whole pipeline on this machine (moto server + the built-in API emulator)",
        description="Upload INPUT to a local stack made from template.yaml and run it to the end: "
        "images in DIR/images, one line per input row in DIR/results.jsonl. "
        "Exit 0 if every row succeeded, 1 if any failed or was rejected, 2 if the input or a flag is unusable.",
    )
    run_cmd.add_argument(
        "input", type=Path, help="a .csv (id,prompt,negative_prompt,width,height) or .jsonl file"
    )
    run_cmd.add_argument(
        "--out", type=Path, default=Path("output"), metavar="DIR", help="output folder (default: ./output)"
    )
    _stack_options(run_cmd)
    run_cmd.add_argument("--no-progress", action="store_true", help="no progress bar")

    emu = commands.add_parser(
        "emulator", help="serve an image API's emulator on loopback until Ctrl-C", description=_faults_help()
    )
    emu.add_argument(
        "--provider", choices=PROVIDER_NAMES, default=DEFAULT_PROVIDER, help="which API to emulate"
    )
    emu.add_argument("--port", type=port, default=8790, help="port (default: 8790; 0 picks a free one)")
    emu.add_argument(
        "--latency-ms",
        type=non_negative,
        default=0.0,
        metavar="MS",
        help="time to make one request's images (Atlas Cloud: the generation time)",
    )
    emu.add_argument(
        "--rate-limit",
        type=non_negative,
        default=None,
        metavar="R",
        help="paid requests per second before the API's rate-limit answer",
    )
    emu.add_argument(
        "--url-ttl",
        type=non_negative,
        default=3600.0,
        metavar="S",
        help="output URLs expire after S seconds",
    )
    emu.add_argument("--fault", action="append", default=[], metavar="FAULT", help="a fault (repeatable)")
    up_cmd = commands.add_parser(
        "up",
        help="keep a local stack running for any AWS client (moto server + the API emulators) until Ctrl-C",
        description="Start the stack that template.yaml declares on moto server at a fixed port, with the "
        "functions and the API emulators, and keep it up: upload with `aws --endpoint-url ... s3 cp`, follow "
        "jobs with AWS_ENDPOINT_URL=... imagepipe status. Ctrl-C stops it.",
    )
    up_cmd.add_argument("--port", type=port, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    up_cmd.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".imagepipe"),
        metavar="DIR",
        help="logs go here (default: .imagepipe)",
    )
    _stack_options(up_cmd)
    # submit, status, results, cancel, retry, redrive: jobs on a deployed (or `imagepipe up`) stack.
    jobs.add_parsers(commands)
    return parser


def _stack_options(parser: argparse.ArgumentParser) -> None:
    """How the local stack is set up: the same for `run` and `up`."""
    parser.add_argument(
        "--provider",
        choices=PROVIDER_NAMES,
        default=DEFAULT_PROVIDER,
        help=f"the image API for rows without a provider column (default: {DEFAULT_PROVIDER})",
    )
    parser.add_argument(
        "--api-url",
        metavar="URL",
        help="the provider's base URL, without the path (e.g. http://127.0.0.1:8000); keys from its "
        "environment variables. Default: the public API when its keys are set, else the built-in emulator",
    )
    parser.add_argument("--model", metavar="M", help="the model for rows without a model column")
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        metavar="N",
        help="generator invocations in flight (default: GeneratorMaxConcurrency in template.yaml)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="N",
        help="tasks per generator invocation (default: GeneratorBatchSize in template.yaml)",
    )
    parser.add_argument(
        "--template", type=Path, default=None, help="the SAM template (default: ./template.yaml)"
    )
    parser.add_argument(
        "--emulator-latency-ms",
        type=non_negative,
        default=50.0,
        metavar="MS",
        help="emulator: time to make one image (default: 50)",
    )
    parser.add_argument(
        "--emulator-fault",
        action="append",
        default=[],
        metavar="FAULT",
        help="the provider's emulator: refuse=WORD, fail=WORD, flaky=WORD:N, rate-limit=WORD:N, stop=WORD, "
        "hang=WORD, malformed=WORD, error-rate=P, and each API's own (see `imagepipe emulator --help`)",
    )
    parser.add_argument(
        "--retry-delay",
        type=positive_int,
        default=1,
        metavar="S",
        help="seconds before a failed task is retried (AWS: the queue's visibility timeout)",
    )
    parser.add_argument(
        "--max-attempts",
        type=positive_int,
        metavar="N",
        help="deliveries of a task before the dead-letter queue (default: TaskMaxReceiveCount in template.yaml)",
    )
    parser.add_argument(
        "--chaos",
        metavar="SPEC",
        help="make the local runtime fail on purpose, each a probability: redeliver=P (a message delivered "
        "twice), crash-after-call=P (an invocation dies after the API answered), crash-before-ack=P (the "
        "work is done but the messages come back), throttle=P (an invocation refused); e.g. "
        "redeliver=0.2,crash-after-call=0.05",
    )


def _faults_help() -> str:
    lines = ["Faults each emulator can inject (WORD matches inside the prompt):"]
    for name in PROVIDER_NAMES:
        kinds = emulator_class(name).FAULTS
        lines.append(f"  {name}: " + ", ".join(f"{k}={shape}" if shape else k for k, shape in kinds.items()))
    return "\n".join(lines)


def _stack_fields(args: argparse.Namespace) -> dict:
    """The StackOptions fields from the flags `run` and `up` share."""
    return {
        "template": args.template or default_template(),
        "provider": args.provider,
        "api_url": args.api_url,
        "model": args.model,
        "concurrency": args.concurrency,
        "batch_size": args.batch_size,
        "emulator_latency_ms": args.emulator_latency_ms,
        "emulator_faults": args.emulator_fault,
        "retry_delay_s": args.retry_delay,
        "chaos": args.chaos or "",
        "max_attempts": args.max_attempts,
    }


def _up(args: argparse.Namespace) -> int:
    options = UpOptions(port=args.port, state_dir=args.state_dir, **_stack_fields(args))
    try:
        check_stack_options(options)
        return up(options)
    except (RunError, RuntimeSetupError) as exc:
        print(f"imagepipe: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # the port is taken
        print(f"imagepipe: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in jobs.COMMANDS:
        return jobs.run_command(args)
    if args.command == "up":
        return _up(args)
    if args.command == "emulator":
        if args.rate_limit == 0:
            print("imagepipe: error: --rate-limit must be more than 0", file=sys.stderr)
            return EXIT_USAGE
        emulator = emulator_class(args.provider)
        try:
            faults = tuple(parse_fault(f, emulator.FAULTS) for f in args.fault)
        except ValueError as exc:
            print(f"imagepipe: error: --fault: {exc}", file=sys.stderr)
            return EXIT_USAGE
        config = EmulatorConfig(
            port=args.port,
            latency_ms=args.latency_ms,
            rate_limit=args.rate_limit,
            faults=faults,
            url_ttl_s=args.url_ttl,
        )
        try:
            serve(emulator(config))
        except OSError as exc:  # port in use, address not available
            print(
                f"imagepipe: error: cannot serve on port {args.port}: {exc.strerror or exc}", file=sys.stderr
            )
            return EXIT_USAGE
        return 0
    options = RunOptions(
        input=args.input,
        out=args.out,
        **_stack_fields(args),
        progress=not args.no_progress,
    )
    try:
        return run(options).exit_code
    except RunError as exc:
        print(f"imagepipe: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("imagepipe: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not the user's input: keep the details in a file
        log = options.out / "logs" / "imagepipe-error.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(traceback.format_exc(), encoding="utf-8")
            where = f"details: {log}"
        except OSError:
            where = "the details could not be written to a log file"
        print(f"imagepipe: internal error: {type(exc).__name__}: {exc} ({where})", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
