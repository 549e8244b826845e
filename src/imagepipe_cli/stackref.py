"""Finding a deployed (or local) imagepipe stack by name, the way any boto3 tool finds AWS resources."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import cached_property
from typing import Any, TypeVar

import boto3
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)

from imagepipe.jobstate import JobState

DEPLOYED_STACK = "imagepipe"
# What `imagepipe up` (moto server on loopback) creates; found through AWS_ENDPOINT_URL.
LOCAL_STACK = "imagepipe-local"
T = TypeVar("T")


class StackError(Exception):
    """The stack cannot be reached or is not there: one line for the user, exit code 2."""


def default_stack_name(environ: Mapping[str, str] | None = None) -> str:
    """IMAGEPIPE_STACK, else the local stack when an endpoint override points boto3 elsewhere, else the
    deployed one."""
    environ = os.environ if environ is None else environ
    if environ.get("IMAGEPIPE_STACK"):
        return environ["IMAGEPIPE_STACK"]
    return LOCAL_STACK if environ.get("AWS_ENDPOINT_URL") else DEPLOYED_STACK


def describe_aws_error(exc: Exception, region: str | None = None) -> str | None:
    """One line for an AWS error a user can act on (credentials, region, endpoint, a refusal), else None."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials found: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    if isinstance(exc, PartialCredentialsError):
        return f"incomplete AWS credentials: {exc}"
    if isinstance(exc, NoRegionError):
        return "no AWS region: set AWS_REGION (or AWS_DEFAULT_REGION, or a region in your profile)"
    if isinstance(exc, EndpointConnectionError):
        hint = " (AWS_ENDPOINT_URL: is `imagepipe up` running?)" if endpoint else ""
        return f"cannot reach AWS at {exc.kwargs.get('endpoint_url', 'its endpoint')}{hint}"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        where = f" in {region}" if region else ""
        return (
            f"AWS refused {exc.operation_name}{where}: {error.get('Code', '?')}: {error.get('Message', exc)}"
        )
    if isinstance(exc, (BotoCoreError, Boto3Error)):
        return f"AWS call failed: {exc}"
    return None


@contextmanager
def aws_errors(region: str | None = None) -> Iterator[None]:
    """Turn AWS errors into StackError (one line, no traceback)."""
    try:
        yield
    except (BotoCoreError, ClientError, Boto3Error) as exc:
        raise StackError(describe_aws_error(exc, region) or str(exc)) from None


class Stack:
    """A stack's Outputs and clients for its resources, all through one boto3 session."""

    def __init__(
        self,
        name: str,
        outputs: dict[str, str],
        session: boto3.session.Session,
        parameters: dict[str, str] | None = None,
    ) -> None:
        self.name, self.outputs, self._session = name, outputs, session
        self.parameters = parameters or {}
        self._clients: dict[str, Any] = {}
        self._resources: dict[str, Any] = {}

    @property
    def region(self) -> str | None:
        return self._session.region_name

    def output(self, key: str) -> str:
        try:
            return self.outputs[key]
        except KeyError:
            raise StackError(
                f"stack {self.name!r} has no output {key}: is it an imagepipe stack (template.yaml)?"
            ) from None

    def client(self, name: str) -> Any:
        if name not in self._clients:
            with aws_errors(self.region):
                self._clients[name] = self._session.client(name, config=_CONFIG)
        return self._clients[name]

    def resource(self, name: str) -> Any:
        if name not in self._resources:
            with aws_errors(self.region):
                self._resources[name] = self._session.resource(name, config=_CONFIG)
        return self._resources[name]

    @cached_property
    def state(self) -> JobState:
        # The records it writes (retry, redrive, cancel) are kept as long as the functions' (JobRetentionDays).
        days = self.parameters.get("JobRetentionDays")
        table = self.resource("dynamodb").Table(self.output("JobsTableName"))
        return JobState(table, retention_days=int(days)) if days else JobState(table)

    def call(self, fn: Callable[[], T]) -> T:
        """fn() with AWS errors as StackError."""
        with aws_errors(self.region):
            return fn()


_CONFIG = Config(retries={"mode": "standard", "max_attempts": 5}, max_pool_connections=32)


def find_stack(name: str | None = None, session: boto3.session.Session | None = None) -> Stack:
    """The stack named `name` (default: default_stack_name()), by its CloudFormation Outputs. The
    endpoint, region and credentials come from boto3's usual sources (AWS_ENDPOINT_URL included)."""
    name = name or default_stack_name()
    session = session or boto3.session.Session()
    region = session.region_name
    with aws_errors(region):
        cfn = session.client("cloudformation", config=_CONFIG)
        try:
            stacks = cfn.describe_stacks(StackName=name)["Stacks"]
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if error.get("Code") == "ValidationError" and "does not exist" in error.get("Message", ""):
                endpoint = os.environ.get("AWS_ENDPOINT_URL")
                at = f" at {endpoint}" if endpoint else ""
                raise StackError(
                    f"stack {name!r} not found in region {region}{at} (use --stack NAME or IMAGEPIPE_STACK)"
                ) from None
            raise
    if not stacks:
        raise StackError(f"stack {name!r} not found in region {region}")
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs", [])}
    parameters = {p["ParameterKey"]: p.get("ParameterValue", "") for p in stacks[0].get("Parameters", [])}
    return Stack(name, outputs, session, parameters)
