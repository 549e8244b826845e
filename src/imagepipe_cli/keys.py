"""`imagepipe keys set NAME...` and `imagepipe keys list`: the provider keys in a stack's secret.

`aws secretsmanager put-secret-value` replaces the whole JSON, so storing a second key that way wipes
the first. `keys set` reads the secret, changes only the names it is given and writes it back; a value
comes from the environment variable of that name, else from stdin (typed without echo at a terminal),
and is never printed or logged."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from typing import Any, TextIO

from botocore.exceptions import ClientError

from imagepipe.contract import PROVIDER_NAMES
from imagepipe.providers import provider_class
from imagepipe_cli.jobs import JobError
from imagepipe_cli.stackref import find_stack

KEY_NAMES = tuple(sorted({key for name in PROVIDER_NAMES for key in provider_class(name).key_names}))
CACHE_NOTE = "new uploads use them at once"


def add_parser(commands: Any, stack: argparse.ArgumentParser) -> None:
    keys_cmd = commands.add_parser(
        "keys",
        help="store provider keys in the stack's secret (merged, never printed), or list their names",
        description="The provider keys the stack's functions use live in its Secrets Manager secret "
        "(the ProviderKeysSecretName output). `set` merges; `list` shows names only.",
    )
    actions = keys_cmd.add_subparsers(dest="keys_action", required=True, metavar="ACTION")
    set_cmd = actions.add_parser(
        "set",
        parents=[stack],
        help="store these keys, keeping the others",
        description="Store each NAME's value - from the environment variable NAME, else one line of "
        f"stdin - in the stack's secret, keeping every other key. Names: {', '.join(KEY_NAMES)}.",
    )
    set_cmd.add_argument("names", nargs="+", metavar="NAME", help="a key's name, e.g. ATLASCLOUD_API_KEY")
    actions.add_parser("list", parents=[stack], help="the names of the keys stored (never their values)")


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """`keys set` / `keys list` (run through jobs.guarded: every error one line)."""
    if args.keys_action == "set":
        values = {name: _value(name) for name in _names(args.names)}  # before touching AWS
    stack = find_stack(args.stack)
    secret = stack.output("ProviderKeysSecretName")
    manager = stack.client("secretsmanager")
    stored = _stored(manager, secret)
    if args.keys_action == "list":
        names = [name for name in sorted(stored) if stored[name]]
        print(f"{secret}: {', '.join(names) if names else 'no keys'}", file=out)
        return 0
    manager.put_secret_value(SecretId=secret, SecretString=json.dumps({**stored, **values}))
    kept = sorted(set(stored) - set(values))
    print(
        f"stored {', '.join(values)} in {secret}"
        + (f" (kept {', '.join(kept)})" if kept else "")
        + f"; {CACHE_NOTE}",
        file=out,
    )
    return 0


def _names(names: list[str]) -> list[str]:
    unknown = [name for name in names if name not in KEY_NAMES]
    if unknown:
        raise JobError(f"unknown key name {', '.join(unknown)}: the names are {', '.join(KEY_NAMES)}")
    return list(dict.fromkeys(names))


def _value(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        value = getpass.getpass(f"{name}: ") if sys.stdin.isatty() else sys.stdin.readline()
    value = value.strip()
    if not value:
        raise JobError(f"no value for {name}: export {name}, or give it on stdin")
    return value


def _stored(manager: Any, secret: str) -> dict[str, str]:
    """The secret's keys now ({} when it has no value yet)."""
    try:
        text = manager.get_secret_value(SecretId=secret)["SecretString"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
            return {}
        raise
    try:
        stored = json.loads(text or "{}")
    except json.JSONDecodeError:
        stored = None
    if not isinstance(stored, dict):
        raise JobError(f"the secret {secret} does not hold a JSON object: put one there, or delete its value")
    return stored
