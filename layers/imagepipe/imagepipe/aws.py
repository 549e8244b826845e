"""Every boto3 client and resource the functions use, made here with the same botocore retry policy.

botocore's "standard" retry mode retries throttling (ThrottlingException,
ProvisionedThroughputExceededException, SlowDown...), 5xx answers and connection errors with exponential
backoff and jitter, up to `max_attempts` calls in all. What it does not retry - a DynamoDB transaction
cancelled with reason TransactionConflict - jobstate retries itself.

Clients are thread-safe and may be shared; a boto3 *resource* (e.g. a DynamoDB Table) is not: make one per
thread (`resource` returns a new one on each call).
"""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config

MAX_ATTEMPTS = 8
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30


def config(**overrides: Any) -> Config:
    """The shared botocore Config; `overrides` (e.g. read_timeout=...) replace its fields."""
    options: dict[str, Any] = {
        "retries": {"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        "connect_timeout": CONNECT_TIMEOUT_S,
        "read_timeout": READ_TIMEOUT_S,
    }
    options.update(overrides)
    return Config(**options)


def client(name: str, **config_overrides: Any) -> Any:
    """A boto3 client for service `name` (thread-safe: may be shared between threads)."""
    return boto3.client(name, config=config(**config_overrides))


def resource(name: str, **config_overrides: Any) -> Any:
    """A new boto3 resource for service `name`, from its own session (neither resources nor sessions
    are thread-safe: make one per thread)."""
    return boto3.session.Session().resource(name, config=config(**config_overrides))


def table(name: str) -> Any:
    """A new DynamoDB Table resource (not thread-safe: one per thread)."""
    return resource("dynamodb").Table(name)


def tables(name: str, count: int) -> list[Any]:
    """`count` DynamoDB Table resources for as many threads: each its own resource object (resources are
    not thread-safe), all on one client (clients are), with a pooled connection for each. Making a resource
    makes a client, which loads the service's model and endpoint rules (~25 ms of CPU each, at init): ten
    threads' tables now cost one. Made from the default session, as `client`'s clients are (a session of
    its own parses botocore's endpoint data again): call it from one thread at a time (the init phase)."""
    first = boto3.resource("dynamodb", config=config(max_pool_connections=max(10, count)))
    service = type(first)
    return [first.Table(name)] + [service(client=first.meta.client).Table(name) for _ in range(count - 1)]
