"""Imported once by the process the local runtime forks its execution environments from
(`lambda_runtime.PRELOAD`), so that what every environment would otherwise redo on the same two cores at the
same moment - ten of them on a cold start, inside the first batches' billed time - is done once. On Lambda
each environment has its own CPU and its init is billed apart (`make bench` bills each cold start at what a
fresh python3.12 process takes, not at this). Nothing here changes what a call sends or answers.

- botocore's JSON data (service models, endpoint rule sets, endpoints.json, boto3's resource models) is
  parsed here once for the services the functions use, and every session an environment makes reads it from
  here: botocore parses it anew per session (about 40 ms of CPU for a new session's first client of a
  service; the generator's init makes several sessions). botocore already treats the data as read-only - a
  session's clients share it - so sessions sharing it changes nothing else.
- httpx's default TLS context is made here once, for the first httpx client an environment makes (the
  generator's): making it loads a CA bundle (certifi's, or SSL_CERT_FILE's), about 20 ms of CPU per
  environment. Each context is still used by one client only (httpcore sets its ALPN protocols per
  connection): a second client, one asking for other verification, or one made after SSL_CERT_FILE or
  SSL_CERT_DIR changed gets its own, as without the preload.
- Compiled bytecode is kept. Each environment imports its function and the shared package afresh (its init
  phase); with PYTHONDONTWRITEBYTECODE set nothing kept their bytecode, and every environment compiled them
  from source. It goes to a cache directory of its own (`sys.pycache_prefix`), never beside the sources.

A generator's init in a forked environment: 0.56 s of CPU before, 0.2 s after (on this 2-core host)."""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

import boto3
from botocore import loaders

SERVICES = ("dynamodb", "s3", "sqs", "secretsmanager", "events")
RESOURCES = ("dynamodb", "s3")

_parsed: dict[str, Any] = {}
_listed: dict[tuple, Any] = {}
_load_file = loaders.JSONFileLoader.load_file
_list_available_services = loaders.Loader.list_available_services


def _shared_load_file(self: loaders.JSONFileLoader, file_path: str) -> Any:
    if file_path not in _parsed:
        _parsed[file_path] = _load_file(self, file_path)
    return _parsed[file_path]


def _shared_list_available_services(self: loaders.Loader, type_name: str) -> Any:
    """Which services have data of a type: a walk of every data directory (hundreds of them), per session."""
    key = (tuple(self.search_paths), type_name)
    if key not in _listed:
        _listed[key] = _list_available_services(self, type_name)
    return list(_listed[key])


def share_botocore_data() -> None:
    loaders.JSONFileLoader.load_file = _shared_load_file  # type: ignore[method-assign]
    loaders.Loader.list_available_services = _shared_list_available_services  # type: ignore[method-assign]
    session = boto3.session.Session(
        aws_access_key_id="preload", aws_secret_access_key="preload", region_name="us-east-1"
    )
    for service in SERVICES:
        session.client(service)
    for service in RESOURCES:
        session.resource(service)


_made_ahead: list[tuple[tuple, Any]] = []


def _trusted() -> tuple:
    """What httpx's default verification trusts: SSL_CERT_FILE or SSL_CERT_DIR when set, else certifi's CAs."""
    return (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


def make_tls_context_ahead() -> None:
    from httpx import _config
    from httpx._transports import default

    create = _config.create_ssl_context
    _made_ahead.append((_trusted(), create()))

    def create_ssl_context(verify: Any = True, cert: Any = None, trust_env: bool = True) -> Any:
        if _made_ahead and verify is True and cert is None and trust_env and _made_ahead[0][0] == _trusted():
            return _made_ahead.pop()[1]
        return create(verify, cert, trust_env)

    _config.create_ssl_context = default.create_ssl_context = create_ssl_context  # type: ignore[assignment]


def keep_bytecode() -> None:
    if sys.dont_write_bytecode and sys.pycache_prefix is None:
        sys.pycache_prefix = os.path.join(tempfile.gettempdir(), f"imagepipe-pycache-{os.getuid()}")
        sys.dont_write_bytecode = False


share_botocore_data()
make_tls_context_ahead()
keep_bytecode()
