"""`imagepipe destroy --stack NAME`: the stack deleted, its buckets emptied first.

CloudFormation cannot delete a bucket that holds objects, and the stack's buckets are versioned: every
version and delete marker must go before `delete-stack` can succeed. Nothing is deleted without a
confirmation (the stack's name typed back, or --yes)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from botocore.exceptions import ClientError, WaiterError

from imagepipe_cli.jobs import EXIT_NOT_OK, JobError
from imagepipe_cli.stackref import find_stack

WAIT_DELAY_S, WAIT_ATTEMPTS = 5, 360  # up to 30 minutes; a stack's deletion normally takes a minute or two


def add_parser(commands: Any, stack: argparse.ArgumentParser) -> None:
    cmd = commands.add_parser(
        "destroy",
        parents=[stack],
        help="delete the stack after emptying its buckets (asks first)",
        description="Empty the stack's S3 buckets (every object version: images, results, uploads) and "
        "delete the stack. Its job records go with it. Asks for the stack's name unless --yes.",
    )
    cmd.add_argument("--yes", action="store_true", help="do not ask (for scripts)")


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run through jobs.guarded: every error one line."""
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
    try:
        cfn.get_waiter("stack_delete_complete").wait(
            StackName=stack.name, WaiterConfig={"Delay": WAIT_DELAY_S, "MaxAttempts": WAIT_ATTEMPTS}
        )
    except WaiterError as exc:
        print(f"imagepipe: error: stack {stack.name} was not deleted ({exc}): see its events", file=err)
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


def _confirmed(name: str, buckets: list[str], out: TextIO) -> bool:
    if not sys.stdin.isatty():
        raise JobError("destroy deletes every image and result of the stack: pass --yes to confirm")
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
                    raise JobError(f"cannot empty {bucket}: {error.get('Key')}: {error.get('Message')}")
                removed += len(keys[start : start + 1000])
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
            return removed
        raise
    return removed
