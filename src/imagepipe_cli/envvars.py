"""`imagepipe env-vars [--stack NAME] [--out FILE]`: the SAM CLI's --env-vars file for a deployed stack.

`sam local invoke CsvSplitterFunction -e events/s3_put_csv.json` alone cannot work: SAM CLI resolves a
`!Ref` in the template's environment to the logical id ("TasksQueue"), not to the stack's queue URL. The
deployed functions hold the resolved values, so this file is read from them (Lambda's
GetFunctionConfiguration): {"FunctionLogicalId": {"VAR": "value"}}, SAM CLI's format. No value is a
secret: the API keys are read from Secrets Manager at run time, never from the environment."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, TextIO

from imagepipe_cli.stackref import Stack, find_stack


def add_parser(commands: Any, stack: argparse.ArgumentParser) -> None:
    cmd = commands.add_parser(
        "env-vars",
        parents=[stack],
        help="write the SAM CLI --env-vars file of the stack's functions (for sam local invoke)",
        description="Write each function's environment as the stack resolved it (queue URLs, table and "
        "bucket names), in SAM CLI's --env-vars format, so that e.g. `sam local invoke CsvSplitterFunction "
        "-e events/s3_put_csv.json --env-vars env.json` works against that stack.",
    )
    cmd.add_argument("--out", type=Path, metavar="FILE", help="write it here (default: standard output)")


def env_vars(stack: Stack) -> dict[str, dict[str, str]]:
    """{logical id: {variable: value}} for every Lambda function of the stack."""
    cfn, lam = stack.client("cloudformation"), stack.client("lambda")
    pages = cfn.get_paginator("list_stack_resources").paginate(StackName=stack.name)
    functions = {
        r["LogicalResourceId"]: r["PhysicalResourceId"]
        for page in stack.call(lambda: list(pages))
        for r in page["StackResourceSummaries"]
        if r["ResourceType"] == "AWS::Lambda::Function"
    }
    found = {}
    for logical_id, name in sorted(functions.items()):
        config = stack.call(lambda n=name: lam.get_function_configuration(FunctionName=n))
        variables = config.get("Environment", {}).get("Variables", {})
        found[logical_id] = {name: str(value) for name, value in sorted(variables.items())}
    return found


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run through jobs.guarded: every error one line."""
    stack = find_stack(args.stack)
    text = json.dumps(env_vars(stack), indent=2) + "\n"
    if args.out is None:
        out.write(text)
        return 0
    args.out.write_text(text, encoding="utf-8")
    first = "CsvSplitterFunction -e events/s3_put_csv.json"
    print(f"wrote {args.out} ({stack.name}); e.g. sam local invoke {first} --env-vars {args.out}", file=out)
    return 0
