"""The `imagepipe` command: `run` the whole pipeline locally, or serve the Atlas `emulator`."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from imagepipe_cli.emulator import EmulatorConfig, parse_fault, serve
from imagepipe_cli.local.runner import EXIT_USAGE, RunError, RunOptions, default_template, run


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535)")
    return value


def _fault(text: str) -> str:
    try:
        parse_fault(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


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
    run_cmd.add_argument(
        "--atlas-url",
        metavar="URL",
        help="an Atlas-compatible API (token at URL/oauth/2.0/token); keys from ATLAS_ACCESS_KEY/ATLAS_SECRET_KEY. "
        "Default: ATLAS_BASE_URL if set, else the built-in emulator",
    )
    run_cmd.add_argument(
        "--concurrency",
        type=_positive_int,
        metavar="N",
        help="generator invocations in flight (default: GeneratorMaxConcurrency in template.yaml)",
    )
    run_cmd.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        help="tasks per generator invocation (default: GeneratorBatchSize in template.yaml)",
    )
    run_cmd.add_argument(
        "--template", type=Path, default=None, help="the SAM template (default: ./template.yaml)"
    )
    run_cmd.add_argument(
        "--emulator-latency-ms",
        type=_non_negative,
        default=50.0,
        metavar="MS",
        help="emulator: time to make one image (default: 50)",
    )
    run_cmd.add_argument(
        "--emulator-fault",
        type=_fault,
        action="append",
        default=[],
        metavar="FAULT",
        help="emulator: refuse=WORD, fail=WORD, flaky=WORD:N, error-rate=P, "
        "revoke-tokens-every=N or url-only (repeatable)",
    )
    run_cmd.add_argument(
        "--retry-delay",
        type=_positive_int,
        default=1,
        metavar="S",
        help="seconds before a failed task is retried (AWS: the queue's visibility timeout)",
    )
    run_cmd.add_argument("--no-progress", action="store_true", help="no progress bar")

    emu = commands.add_parser("emulator", help="serve the Atlas API emulator on loopback until Ctrl-C")
    emu.add_argument("--port", type=_port, default=8790, help="port (default: 8790; 0 picks a free one)")
    emu.add_argument(
        "--latency-ms", type=_non_negative, default=0.0, metavar="MS", help="time to make one image"
    )
    emu.add_argument(
        "--rate-limit",
        type=_non_negative,
        default=None,
        metavar="R",
        help="generation requests per second before HTTP 429",
    )
    emu.add_argument(
        "--fault",
        type=_fault,
        action="append",
        default=[],
        metavar="FAULT",
        help="refuse=WORD, fail=WORD, flaky=WORD:N, error-rate=P, revoke-tokens-every=N, url-only",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "emulator":
        if args.rate_limit == 0:
            print("imagepipe: error: --rate-limit must be more than 0", file=sys.stderr)
            return EXIT_USAGE
        try:
            serve(
                EmulatorConfig(
                    port=args.port,
                    latency_ms=args.latency_ms,
                    rate_limit=args.rate_limit,
                    faults=tuple(parse_fault(f) for f in args.fault),
                )
            )
        except OSError as exc:  # port in use, address not available
            print(
                f"imagepipe: error: cannot serve on port {args.port}: {exc.strerror or exc}", file=sys.stderr
            )
            return EXIT_USAGE
        return 0
    options = RunOptions(
        input=args.input,
        out=args.out,
        template=args.template or default_template(),
        atlas_url=args.atlas_url,
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        emulator_latency_ms=args.emulator_latency_ms,
        emulator_faults=args.emulator_fault,
        retry_delay_s=args.retry_delay,
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
