"""`imagepipe deploy-check --stack NAME [--region R] [--parameter-overrides K=V ...]`: what would make
`sam deploy` fail, or make a second stack clash with the first, found before anything is built or deployed
(`make deploy` runs it first).

- the tools: AWS credentials that work (STS GetCallerIdentity), the SAM CLI, and python3.12 for `sam build`
  (or Docker, for `sam build --use-container`);
- the stack name: the buckets are named from it, the account and the region (template.yaml's BucketName),
  and an S3 bucket name has at most 63 characters, lowercase - so the longest stack name depends on the
  region; CloudFormation fails on such a name only after creating half the stack;
- the secret: its name (ProviderKeysSecretName) is one per account and region, so a second stack with the
  default name fails ("already exists"), and a deleted secret keeps its name for up to 30 days;
- the parameter overrides: names the template has, values its rules allow (as CloudFormation checks them).
"""

from __future__ import annotations

import argparse
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from imagepipe_cli.jobs import EXIT_USAGE
from imagepipe_cli.local.template import (
    ParameterError,
    Template,
    check_parameter,
    load_template,
    parse_overrides,
)
from imagepipe_cli.stackref import describe_aws_error

TEMPLATE = Path(__file__).resolve().parents[2] / "template.yaml"
BUCKET_MAX = 63
STACK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,127}$")  # CloudFormation's rule
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$")


@dataclass(frozen=True)
class Secret:
    """The secret named ProviderKeysSecretName, as Secrets Manager describes it (None: no such secret)."""

    stack: str | None  # the stack that made it (its aws:cloudformation:stack-name tag)
    deleted: bool  # scheduled for deletion: its name stays taken until then


@dataclass
class Findings:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def bucket_names(template: Template, stack: str, account: str, region: str) -> list[str]:
    """The stack's bucket names, from template.yaml's BucketName patterns."""
    values = {"AWS::StackName": stack, "AWS::AccountId": account, "AWS::Region": region}
    names = []
    for resource in template.resources_of_type("AWS::S3::Bucket").values():
        pattern = resource.get("Properties", {}).get("BucketName", {}).get("Fn::Sub")
        if isinstance(pattern, str):
            names.append(re.sub(r"\$\{([^}]+)\}", lambda m: values[m.group(1)], pattern))
    return names


def check_stack_name(template: Template, stack: str, account: str | None, region: str) -> list[str]:
    """The names made from the stack's name. Without the account (no credentials yet), any account: its
    id is always 12 digits, so the lengths are the same."""
    if not STACK_NAME.match(stack):
        return [
            f"stack name {stack!r}: CloudFormation takes a letter, then letters, digits and '-' (at most 128)"
        ]
    errors = []
    longest = max(bucket_names(template, stack, account or "0" * 12, region), key=len, default="")
    if len(longest) > BUCKET_MAX:
        fits = BUCKET_MAX - (len(longest) - len(stack))
        errors.append(
            f"stack name {stack!r} ({len(stack)} characters) is too long for "
            f"{f'account {account}' if account else 'an account'} in {region}: "
            f"its bucket {longest} would be {len(longest)} characters, S3 allows {BUCKET_MAX}; "
            f"the longest stack name that fits is {fits} characters (e.g. {stack[:fits].rstrip('-')!r})"
        )
    if stack != stack.lower():
        errors.append(
            f"stack name {stack!r} has capital letters: S3 bucket names are lowercase "
            f"(e.g. {stack.lower()!r})"
        )
    return errors


def check_secret(stack: str, name: str, secret: Secret | None, default: str) -> Findings:
    found = Findings()
    if secret is not None and secret.deleted:
        found.errors.append(
            f"secret {name!r} is scheduled for deletion and keeps its name until then: restore it "
            f"(aws secretsmanager restore-secret --secret-id {name}) and delete it for good "
            f"(aws secretsmanager delete-secret --secret-id {name} --force-delete-without-recovery), "
            f'or pick another name: PARAMS="ProviderKeysSecretName=imagepipe/{stack}/provider-keys"'
        )
    elif secret is not None and secret.stack != stack:
        owner = f"stack {secret.stack!r}" if secret.stack else "someone outside CloudFormation"
        found.errors.append(
            f"secret {name!r} exists already (made by {owner}): this stack needs its own name, e.g. "
            f'PARAMS="ProviderKeysSecretName=imagepipe/{stack}/provider-keys"'
        )
    elif name == default:
        found.warnings.append(
            f"the secret's name {name!r} is the default, one per account and region: a second stack "
            f"here would need its own (ProviderKeysSecretName=imagepipe/OTHER-STACK/provider-keys)"
        )
    return found


def check_overrides(template: Template, overrides: dict[str, str]) -> list[str]:
    errors = []
    for name, value in overrides.items():
        try:
            check_parameter(template, name, value, "PARAMS")
        except ParameterError as exc:
            errors.append(str(exc))
    return errors


def check_tools(sam: str | None, python312: str | None, docker: str | None) -> Findings:
    found = Findings()
    if not sam:
        found.errors.append("no SAM CLI: install it (pip install aws-sam-cli, or `make deploy` does)")
    if not python312 and not docker:
        found.errors.append(
            "`sam build` needs python3.12 on PATH (the functions' runtime), or Docker for "
            "`sam build --use-container`"
        )
    elif not python312:
        found.warnings.append("no python3.12 on PATH: building in a container (sam build --use-container)")
    return found


def check(
    template: Template,
    stack: str,
    region: str,
    account: str,
    overrides: dict[str, str],
    secret: Secret | None,
) -> Findings:
    """Everything but the tools, from what AWS said about the account and the secret."""
    secret_param = template.parameter("ProviderKeysSecretName")
    secret_name = overrides.get("ProviderKeysSecretName", str(secret_param.get("Default", "")))
    found = check_secret(stack, secret_name, secret, str(secret_param.get("Default", "")))
    found.errors[:0] = check_stack_name(template, stack, account, region) + check_overrides(
        template, overrides
    )
    return found


def describe_secret(client: Any, name: str) -> Secret | None:
    try:
        answer = client.describe_secret(SecretId=name)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
            return None
        raise
    tags = {t["Key"]: t["Value"] for t in answer.get("Tags", [])}
    return Secret(stack=tags.get("aws:cloudformation:stack-name"), deleted="DeletedDate" in answer)


def add_parser(commands: Any) -> None:
    cmd = commands.add_parser(
        "deploy-check",
        help="check a stack name, the account and the tools before `sam deploy` (make deploy runs it)",
        description="Check what would make `sam deploy` fail: AWS credentials, the SAM CLI, python3.12 "
        "(or Docker), bucket names of at most 63 characters, a secret name no other stack uses, and "
        "the parameter overrides. Exit 0 when it can go ahead (warnings allowed), 2 otherwise.",
    )
    cmd.add_argument("--stack", required=True, metavar="NAME", help="the stack to deploy")
    cmd.add_argument("--region", help="where (default: boto3's region: AWS_REGION, your profile)")
    cmd.add_argument("--parameter-overrides", nargs="*", default=[], metavar="K=V", help="as for sam deploy")
    cmd.add_argument("--sam", help="the SAM CLI to use (default: sam on PATH)")


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    template = load_template(TEMPLATE)
    found = check_tools(args.sam or shutil.which("sam"), shutil.which("python3.12"), shutil.which("docker"))
    try:
        overrides = parse_overrides(args.parameter_overrides, "PARAMS")
    except ParameterError as exc:
        found.errors.append(str(exc))
        overrides = {}
    session = boto3.session.Session(region_name=args.region)
    region = session.region_name
    if not region:
        found.errors.append("no AWS region: REGION=..., or AWS_REGION, or a region in your profile")
        found.errors += check_overrides(template, overrides)
    else:
        account, secret = _account_and_secret(session, template, overrides, found)
        if account:
            print(f"stack {args.stack} in account {account}, region {region}", file=out)
            more = check(template, args.stack, region, account, overrides, secret)
        else:  # the names can still be checked: every account id is 12 digits
            more = Findings(
                check_stack_name(template, args.stack, None, region) + check_overrides(template, overrides)
            )
        found.errors += more.errors
        found.warnings += more.warnings
    for warning in found.warnings:
        print(f"warning: {warning}", file=err)
    for error in found.errors:
        print(f"imagepipe: error: {error}", file=err)
    if found.errors:
        return EXIT_USAGE
    print("deploy-check: ok", file=out)
    return 0


def _account_and_secret(
    session: Any, template: Template, overrides: dict[str, str], found: Findings
) -> tuple[str | None, Secret | None]:
    """The account the credentials reach, and the secret of that name there (an AWS error: a finding)."""
    default = str(template.parameter("ProviderKeysSecretName").get("Default", ""))
    try:
        account = session.client("sts").get_caller_identity()["Account"]
        return account, describe_secret(
            session.client("secretsmanager"), overrides.get("ProviderKeysSecretName", default)
        )
    except (BotoCoreError, ClientError) as exc:
        found.errors.append(f"AWS: {describe_aws_error(exc, session.region_name) or exc}")
        return None, None
