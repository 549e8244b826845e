"""`imagepipe destroy --stack NAME`: the stack deleted, its buckets emptied first.

CloudFormation cannot delete a bucket that holds objects, and the stack's buckets are versioned: every
version and delete marker must go before `delete-stack` can succeed. Nothing is deleted without a
confirmation (the stack's name typed back, or --yes)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from botocore.exceptions import BotoCoreError, ClientError

from imagepipe_cli.stackref import StackError, describe_aws_error, find_stack

EXIT_USAGE, EXIT_NOT_OK = 2, 1
WAIT_S = 1800.0  # a stack's deletion normally takes a minute or two


def add_parser(commands: Any, stack: argparse.ArgumentParser) -> None:
    cmd = commands.add_parser(
        "destroy",
        parents=[stack],
        help="delete the stack after emptying its buckets (asks first)",
        description="Empty the stack's S3 buckets (every object version: images, results, uploads) and "
        "delete the stack. Its job records go with it. Asks for the stack's name unless --yes.",
    )
    cmd.add_argument("--yes", action="store_true", help="do not ask (for scripts)")


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    try:
        stack = find_stack(args.stack)
        cfn = stack.client("cloudformation")
        resources = stack.call(lambda: _resources(cfn, stack.name))
        buckets = [r["PhysicalResourceId"] for r in resources if r["ResourceType"] == "AWS::S3::Bucket"]
        secret = stack.outputs.get("ProviderKeysSecretName", "")
        if not args.yes and not _confirmed(stack.name, buckets, out):
            print("imagepipe: nothing deleted", file=err)
            return EXIT_NOT_OK
        s3 = stack.client("s3")
        for bucket in buckets:
            removed = stack.call(lambda b=bucket: _empty(s3, b))
            print(f"emptied {bucket}: {removed} object version(s) and delete marker(s) removed", file=out)
        stack.call(lambda: cfn.delete_stack(StackName=stack.name))
        print(f"deleting stack {stack.name} ...", file=out)
        status = stack.call(lambda: _wait_deleted(cfn, stack.name))
        if status != "DELETE_COMPLETE":
            print(f"imagepipe: error: stack {stack.name} is {status}: see its events", file=err)
            return EXIT_NOT_OK
        print(f"stack {stack.name} deleted", file=out)
        if secret:
            print(
                f"the keys secret {secret} is scheduled for deletion and can be restored for a while; "
                f"a new stack with the same ProviderKeysSecretName fails until it is gone: "
                f"`aws secretsmanager delete-secret --secret-id {secret} --force-delete-without-recovery` "
                "frees the name now",
                file=out,
            )
        return 0
    except StackError as exc:
        print(f"imagepipe: error: {exc}", file=err)
    except (BotoCoreError, ClientError) as exc:
        print(f"imagepipe: error: {describe_aws_error(exc) or exc}", file=err)
    except KeyboardInterrupt:
        print("imagepipe: interrupted", file=err)
    return EXIT_USAGE


def _confirmed(name: str, buckets: list[str], out: TextIO) -> bool:
    if not sys.stdin.isatty():
        raise StackError("destroy deletes every image and result of the stack: pass --yes to confirm")
    print(f"This deletes stack {name} and everything in {', '.join(buckets) or 'its buckets'}.", file=out)
    return input(f"Type {name} to confirm: ").strip() == name


def _resources(cfn: Any, name: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for page in cfn.get_paginator("list_stack_resources").paginate(StackName=name):
        found += page["StackResourceSummaries"]
    return found


def _empty(s3: Any, bucket: str) -> int:
    """Every version and delete marker in the bucket, deleted 1,000 at a time; how many."""
    removed = 0
    try:
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
            keys = [
                {"Key": v["Key"], "VersionId": v["VersionId"]}
                for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
            ]
            for start in range(0, len(keys), 1000):
                answer = s3.delete_objects(
                    Bucket=bucket, Delete={"Objects": keys[start : start + 1000], "Quiet": True}
                )
                if answer.get("Errors"):
                    error = answer["Errors"][0]
                    raise StackError(f"cannot empty {bucket}: {error.get('Key')}: {error.get('Message')}")
                removed += len(keys[start : start + 1000])
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
            return removed
        raise
    return removed


def _wait_deleted(cfn: Any, name: str) -> str:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            stacks = cfn.describe_stacks(StackName=name)["Stacks"]
        except ClientError as exc:
            if "does not exist" in exc.response.get("Error", {}).get("Message", ""):
                return "DELETE_COMPLETE"
            raise
        status = stacks[0]["StackStatus"] if stacks else "DELETE_COMPLETE"
        if not status.endswith("_IN_PROGRESS"):
            return status
        time.sleep(5)
    return "DELETE_IN_PROGRESS (still, after 30 minutes)"
