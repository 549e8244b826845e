"""The `imagepipe` command: `run` the whole pipeline locally, or serve a provider's `emulator`."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from imagepipe.contract import DEFAULT_PROVIDER, PROVIDER_NAMES
from imagepipe_cli import deploycheck, destroy, envvars, jobs, keys
from imagepipe_cli.agent import command as agent_command
from imagepipe_cli.argtypes import non_negative, port, positive_int
from imagepipe_cli.emulators import EmulatorConfig, emulator_class
from imagepipe_cli.emulators.base import parse_fault, serve
from imagepipe_cli.local.event_sources import CHAOS_HELP
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

EMULATED = (*PROVIDER_NAMES, "comfyui")  # `imagepipe emulator --provider`: the image APIs and ComfyUI


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
        "Exit 0 if every row succeeded, 1 if any failed or was rejected (or the job failed: a file with no rows), "
        "2 if the input or a flag is unusable.",
        epilog=CHAOS_EPILOG,
        formatter_class=_Formatter,
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
        "--provider", choices=EMULATED, default=DEFAULT_PROVIDER, help="which API (or comfyui) to emulate"
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
        epilog=CHAOS_EPILOG,
        formatter_class=_Formatter,
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
    keys.add_parser(commands, jobs.stack_option())
    destroy.add_parser(commands, jobs.stack_option())
    envvars.add_parser(commands, jobs.stack_option())
    deploycheck.add_parser(commands)
    agent_command.add_parser(commands, jobs.stack_option())
    return parser


def _stack_options(parser: argparse.ArgumentParser) -> None:
    """How the local stack is set up: the same for `run` and `up`."""
    parser.add_argument(
        "--provider",
        choices=PROVIDER_NAMES,
        default=None,
        help="the image API for rows without a provider column (default: DefaultProvider, "
        f"from --parameter-overrides, samconfig.toml or template.yaml: {DEFAULT_PROVIDER})",
    )
    parser.add_argument(
        "--api-url",
        metavar="URL",
        help="the provider's base URL, without the path (e.g. http://127.0.0.1:8000); keys from its "
        "environment variables. Default: the built-in emulator (the public API with --live)",
    )
    parser.add_argument(
        "--live",
        action="store_true",
        help="call the real, paid APIs of the providers whose keys are in the environment (without it, "
        "keys in the environment are not used and every provider is its built-in emulator)",
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
        "--max-attempts",
        type=positive_int,
        metavar="N",
        help="attempts of a task on transient errors (default: TaskMaxAttempts in template.yaml)",
    )
    parser.add_argument(
        "--parameter-overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="K=V",
        help="template parameters, as `sam deploy --parameter-overrides` takes them (e.g. "
        "GeneratorTimeoutSeconds=60 ProviderHttpTimeoutSeconds=10); over samconfig.toml's, under the flags "
        "above. Put INPUT before this flag",
    )
    agent_command.comfyui_option(parser)
    parser.add_argument(
        "--config-env",
        default="default",
        metavar="NAME",
        help="samconfig.toml (beside the template) environment whose deploy parameter_overrides apply "
        "(default: default; a missing file or environment is fine)",
    )
    parser.add_argument(
        "--visibility-timeout",
        type=positive_int,
        metavar="S",
        help="shorten every queue's VisibilityTimeout to S seconds (AWS: the template's, e.g. 1800): a crashed "
        "or timed-out invocation's messages come back after S s. The one timing shortcut; the header says so",
    )
    parser.add_argument(
        "--chaos",
        metavar="SPEC",
        help="fail on purpose: KIND=P,... each a probability (e.g. redeliver=0.2,ddb-conflict=0.05); "
        "the kinds are listed below",
    )


class _Formatter(argparse.HelpFormatter):
    """Wraps paragraphs as usual, but keeps a text with its own line breaks (the chaos list) as it is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line + "\n" for line in text.splitlines())
        return super()._fill_text(text, width, indent)


CHAOS_EPILOG = (
    "--chaos kinds (each KIND=P, P a probability from 0 to 1):\n"
    + "".join(f"  {kind + '=P':<20} {meaning}\n" for kind, meaning in CHAOS_HELP.items())
    + "The AWS kinds (ddb-conflict .. sqs-error) are answered by the moto server to every caller, once the "
    "stack is set up."
)


def _faults_help() -> str:
    lines = ["Faults each emulator can inject (WORD matches inside the prompt):"]
    for name in EMULATED:
        kinds = emulator_class(name).FAULTS
        lines.append(f"  {name}: " + ", ".join(f"{k}={shape}" if shape else k for k, shape in kinds.items()))
    return "\n".join(lines)


def _stack_fields(args: argparse.Namespace) -> dict:
    """The StackOptions fields from the flags `run` and `up` share."""
    return {
        "template": args.template or default_template(),
        "provider": args.provider,
        "api_url": args.api_url,
        "live": args.live,
        "model": args.model,
        "concurrency": args.concurrency,
        "batch_size": args.batch_size,
        "emulator_latency_ms": args.emulator_latency_ms,
        "emulator_faults": args.emulator_fault,
        "visibility_timeout_s": args.visibility_timeout,
        "chaos": args.chaos or "",
        "max_attempts": args.max_attempts,
        "parameter_overrides": args.parameter_overrides,
        "config_env": args.config_env,
        "comfyui": args.comfyui,
        "workflows": args.workflows,
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
    stack_commands = {
        "keys": keys.run,
        "destroy": destroy.run,
        "env-vars": envvars.run,
        "deploy-check": deploycheck.run,
        "agent": agent_command.run,
    }
    if args.command in stack_commands:
        command = stack_commands[args.command]
        return jobs.guarded(command, args)
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
