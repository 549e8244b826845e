"""`imagepipe deploy-check` (make deploy runs it first): what would make `sam deploy` fail, said before
anything is built - bucket names past S3's 63 characters, a secret name another stack holds or a deleted
one still holds, parameter overrides the template refuses, missing tools or credentials."""

from __future__ import annotations

import subprocess

import boto3
import pytest
from moto import mock_aws

from imagepipe_cli.deploycheck import Secret, bucket_names, check, check_tools, describe_secret
from imagepipe_cli.local.template import load_template

from conftest import ROOT, TEMPLATE

ACCOUNT = "123456789012"
DEFAULT_SECRET = "imagepipe/provider-keys"


@pytest.fixture(scope="module")
def template():
    return load_template(TEMPLATE)


def test_the_bucket_names_are_the_templates(template):
    assert sorted(bucket_names(template, "imagepipe", ACCOUNT, "us-east-1")) == [
        "imagepipe-input-123456789012-us-east-1",
        "imagepipe-output-123456789012-us-east-1",
    ]


def test_a_40_character_name_in_a_long_region_fails_saying_the_limit_and_the_longest_name_that_fits(template):
    # Given a 40-character stack name and a region with a long name
    stack = "campaign-images-production-eu-team-alpha"
    assert len(stack) == 40

    # When it is checked
    found = check(template, stack, "ap-southeast-2", ACCOUNT, {}, None)

    # Then it fails before deploying: the bucket and its length, S3's limit, and the longest name that fits
    (error,) = found.errors
    bucket = f"{stack}-output-{ACCOUNT}-ap-southeast-2"
    assert f"{bucket} would be {len(bucket)} characters, S3 allows 63" in error
    fits = 63 - len(f"-output-{ACCOUNT}-ap-southeast-2")
    assert f"the longest stack name that fits is {fits} characters" in error
    assert fits == 28 and len(f"{stack[:fits]}-output-{ACCOUNT}-ap-southeast-2") == 63


def test_the_longest_name_that_fits_passes_and_one_more_character_does_not(template):
    fits = 63 - len(f"-output-{ACCOUNT}-us-east-1")
    assert check(template, "a" * fits, "us-east-1", ACCOUNT, {}, None).errors == []
    assert check(template, "a" * (fits + 1), "us-east-1", ACCOUNT, {}, None).errors


@pytest.mark.parametrize(("stack", "says"), [("ImagePipe", "capital letters"), ("1pipe", "takes a letter")])
def test_a_name_s3_or_cloudformation_refuses_fails(template, stack, says):
    (error,) = check(template, stack, "us-east-1", ACCOUNT, {}, None).errors
    assert says in error


def test_the_default_secret_name_is_a_warning_and_another_stacks_secret_an_error(template):
    # First stack, default secret name: fine, with a word about a second stack
    first = check(template, "imagepipe", "us-east-1", ACCOUNT, {}, None)
    assert (
        first.errors == []
        and "ProviderKeysSecretName=imagepipe/OTHER-STACK/provider-keys" in first.warnings[0]
    )
    # Redeploying the same stack: its own secret is fine
    assert check(template, "imagepipe", "us-east-1", ACCOUNT, {}, Secret("imagepipe", False)).errors == []
    # A second stack with the default name: the secret is the first stack's
    (error,) = check(template, "imagepipe-b", "us-east-1", ACCOUNT, {}, Secret("imagepipe", False)).errors
    assert f"secret {DEFAULT_SECRET!r} exists already (made by stack 'imagepipe')" in error
    assert 'PARAMS="ProviderKeysSecretName=imagepipe/imagepipe-b/provider-keys"' in error
    # ... and with its own name, nothing to say
    own = {"ProviderKeysSecretName": "imagepipe/imagepipe-b/provider-keys"}
    assert check(template, "imagepipe-b", "us-east-1", ACCOUNT, own, None).errors == []


def test_a_secret_deleted_with_its_stack_still_holds_its_name(template):
    (error,) = check(template, "imagepipe", "us-east-1", ACCOUNT, {}, Secret("imagepipe", True)).errors
    assert "scheduled for deletion" in error and "restore-secret" in error and "--force-delete" in error


def test_parameter_overrides_are_checked_against_the_template(template):
    errors = check(
        template, "imagepipe", "us-east-1", ACCOUNT, {"DefaultProvider": "dalle", "Nope": "1"}, None
    ).errors
    assert any("DefaultProvider='dalle' must be one of" in e for e in errors)
    assert any("Nope is not a parameter of template.yaml" in e for e in errors)


def test_sam_and_python312_or_docker_are_needed():
    assert check_tools("/x/sam", "/usr/bin/python3.12", None).errors == []
    container = check_tools("/x/sam", None, "/usr/bin/docker")
    assert container.errors == [] and "--use-container" in container.warnings[0]
    missing = check_tools(None, None, None).errors
    assert any("no SAM CLI" in e for e in missing) and any("python3.12" in e for e in missing)


def test_the_secret_is_found_with_the_stack_that_made_it():
    with mock_aws():
        client = boto3.client("secretsmanager", region_name="us-east-1")
        assert describe_secret(client, DEFAULT_SECRET) is None
        client.create_secret(
            Name=DEFAULT_SECRET,
            SecretString="{}",
            Tags=[{"Key": "aws:cloudformation:stack-name", "Value": "a"}],
        )
        assert describe_secret(client, DEFAULT_SECRET) == Secret("a", False)
        client.delete_secret(SecretId=DEFAULT_SECRET, RecoveryWindowInDays=7)
        assert describe_secret(client, DEFAULT_SECRET) == Secret("a", True)


def test_the_command_says_what_is_wrong_in_one_line_each(cli, monkeypatch):
    # Given an account (moto's), no SAM CLI nor python3.12 on PATH, a long name and a bad override
    monkeypatch.setenv("PATH", "/nonexistent")
    with mock_aws():
        code, out, err = cli(
            "deploy-check", "--stack", "x" * 40, "--region", "us-east-1", "--parameter-overrides", "Bad"
        )

    # Then each is one line, and nothing can go ahead (exit 2)
    assert code == 2 and "deploy-check: ok" not in out
    assert f"stack x{'x' * 39} in account {ACCOUNT}, region us-east-1" in out
    assert "no SAM CLI" in err and "PARAMS: 'Bad' is not NAME=VALUE" in err
    assert "S3 allows 63; the longest stack name that fits is 33 characters" in err


def test_the_command_lets_a_good_stack_go_ahead_with_its_warnings(cli, monkeypatch, tmp_path):
    for tool in ("sam", "python3.12"):
        (tmp_path / tool).write_text("#!/bin/sh\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with mock_aws():
        code, out, err = cli("deploy-check", "--stack", "imagepipe", "--region", "eu-west-1")

    assert code == 0 and "deploy-check: ok" in out and "warning: the secret's name" in err


def test_without_credentials_the_stack_name_is_still_checked(cli, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    code, out, err = cli("deploy-check", "--stack", "x" * 40, "--region", "ap-southeast-2")

    assert code == 2 and "no AWS credentials found" in err
    assert "too long for an account in ap-southeast-2" in err and "fits is 28 characters" in err


def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_make_deploy_runs_the_check_first_and_stops_when_it_fails():
    # Without a stack name: the usage, nothing else
    usage = _make("deploy")
    assert usage.returncode == 2 and "usage: make deploy STACK=name" in usage.stdout
    # With one: deploy-check, then sam build, then sam deploy, each only if the one before succeeded,
    # all in the same region, with the same overrides
    plan = _make("-n", "deploy", "STACK=campaign", "REGION=eu-west-1", "PARAMS=DefaultProvider=qianfan")
    text = plan.stdout
    check, build, deploy = (text.index(s) for s in ("imagepipe deploy-check", "sam build", "sam deploy"))
    assert check < build < deploy
    assert text[check:deploy].count("&&") == 2
    assert '--stack "campaign"' in text and '--stack-name "campaign"' in text
    assert text.count('--region "$region"') == 2 and 'region="eu-west-1"' in text
    assert "--parameter-overrides DefaultProvider=qianfan" in text


def test_make_destroy_calls_imagepipe_destroy_for_the_stack():
    plan = _make("-n", "destroy", "STACK=campaign", "REGION=eu-west-1")
    assert (
        'AWS_REGION=eu-west-1 AWS_DEFAULT_REGION=eu-west-1 .venv/bin/imagepipe destroy --stack "campaign"'
        in (plan.stdout)
    )
