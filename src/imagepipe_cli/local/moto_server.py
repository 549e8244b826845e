"""moto in server mode, in its own process on loopback: the local AWS.

Three changes from `python -m moto.server`, all about running thousands of tasks, none about what
an API call answers:
- requests are handled one at a time. moto's SQS model is not thread-safe - under concurrent
  DeleteMessage/SendMessage calls we saw deleted messages come back and a message delivered twice -
  and moto is bound by one interpreter lock anyway, so serialising costs little. Clients therefore
  must not long-poll (WaitTimeSeconds=0).
- moto 5.2.5's SQS work grows with queue depth: every SendMessage and every received message
  recounts the whole queue, reading a slow clock once per message (ReceiveMessage took 1 s at a
  depth of 1,000 here). `speed_up_moto_sqs` reads the clock once per count, reads the retention
  period directly, and keeps the queue's Approximate* counts for up to 0.1 s (AWS documents them as
  approximate and eventually consistent).
- moto 5.2.5's TransactWriteItems deep-copies whole tables for its rollback (O(rows) per finished row);
  `speed_up_moto_dynamodb` snapshots and restores only the items a transaction names."""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx


class MotoServer:
    def __init__(self, log_path: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port, self.log_path = host, port or _free_port(host), log_path
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> MotoServer:
        with socket.socket() as probe:
            if probe.connect_ex((self.host, self.port)) == 0:
                # Something already answers there (another `imagepipe up`?): never reuse its state.
                raise OSError(f"port {self.port} on {self.host} is already in use")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed by the child's exit
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "imagepipe_cli.local.moto_server",
                "--host",
                self.host,
                "--port",
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"moto server exited with code {self._process.returncode}; see {self.log_path}"
                )
            try:
                if httpx.get(f"{self.url}/moto-api/", timeout=1.0).status_code < 500:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not start within {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class _OneAtATime:
    """WSGI middleware: one request inside moto at a time. With a `write_log`, every DynamoDB write is
    also logged as one line `operation<TAB>pk<TAB>sk` (what `make bench` counts per item and per key)."""

    def __init__(self, app: Any, write_log: str | None = None) -> None:
        self._app, self._lock = app, threading.Lock()
        self._write_log = open(write_log, "a", buffering=1) if write_log else None  # noqa: SIM115 - lives as long as the server

    def __call__(self, environ: dict, start_response: Any) -> Any:
        with self._lock:
            if self._write_log is not None:
                self._log_writes(environ)
            # Read the whole body inside the lock, so a slow client cannot hold moto mid-request.
            return list(self._app(environ, start_response))

    def _log_writes(self, environ: dict) -> None:
        operation = environ.get("HTTP_X_AMZ_TARGET", "").rpartition(".")[2]
        if operation not in DYNAMODB_WRITES:
            return
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)
        for pk, sk in _written_keys(operation, json.loads(body or b"{}")):
            self._write_log.write(f"{operation}\t{pk}\t{sk}\n")


DYNAMODB_WRITES = {"PutItem", "UpdateItem", "DeleteItem", "TransactWriteItems", "BatchWriteItem"}


def _written_keys(operation: str, request: dict) -> list[tuple[str, str]]:
    def key_of(item: dict) -> tuple[str, str]:
        return item.get("pk", {}).get("S", ""), item.get("sk", {}).get("S", "")

    if operation == "PutItem":
        return [key_of(request.get("Item", {}))]
    if operation in ("UpdateItem", "DeleteItem"):
        return [key_of(request.get("Key", {}))]
    if operation == "TransactWriteItems":
        return [
            key_of(part.get("Key") or part.get("Item") or {})
            for item in request.get("TransactItems", [])
            for part in item.values()
        ]
    return [
        key_of(
            (entry.get("PutRequest") or {}).get("Item") or (entry.get("DeleteRequest") or {}).get("Key") or {}
        )
        for entries in request.get("RequestItems", {}).values()
        for entry in entries
    ]


COUNT_TTL_S = 0.1


def speed_up_moto_sqs() -> None:
    import moto
    from moto.sqs import models

    if moto.__version__ != "5.2.5":
        return  # written against 5.2.5's internals; a newer moto runs as it is
    original_unix_time = models.unix_time

    def unix_time(dt: Any = None) -> float:
        return time.time() if dt is None else original_unix_time(dt)

    def unix_time_millis(dt: Any = None) -> float:
        return unix_time(dt) * 1000.0

    models.unix_time, models.unix_time_millis = unix_time, unix_time_millis

    def counts(queue: Any) -> tuple[int, int, int]:
        cached = queue.__dict__.get("_imagepipe_counts")
        now = time.time()
        if cached and now - cached[0] < COUNT_TTL_S:
            return cached[1]
        now_ms = now * 1000.0
        available = not_visible = delayed = 0
        for message in queue._messages:
            is_delayed = now_ms < message.delayed_until
            is_visible = now_ms > message.visible_at
            delayed += is_delayed
            not_visible += not is_visible
            available += is_visible and not is_delayed
        queue.__dict__["_imagepipe_counts"] = (now, (available, not_visible, delayed))
        return available, not_visible, delayed

    models.Queue.approximate_number_of_messages = property(lambda q: counts(q)[0])
    models.Queue.approximate_number_of_messages_not_visible = property(lambda q: counts(q)[1])
    models.Queue.approximate_number_of_messages_delayed = property(lambda q: counts(q)[2])

    def is_message_valid_based_on_retention_period(self: Any, queue_name: str, message: Any) -> bool:
        queue = self.get_queue(queue_name)
        retain_until = int(queue.message_retention_period) + message.sent_timestamp / 1000
        return retain_until > unix_time()

    models.SQSBackend.is_message_valid_based_on_retention_period = is_message_valid_based_on_retention_period


def speed_up_moto_dynamodb() -> None:
    """moto 5.2.5's TransactWriteItems deep-copies every table it touches to be able to roll back: each
    transaction costs O(table size), a job O(rows^2). Snapshot only the items the transaction names and
    restore those instead - the same all-or-nothing result."""
    import moto
    from moto.dynamodb import models

    if moto.__version__ != "5.2.5":
        return
    original = models.DynamoDBBackend.transact_write_items

    class _NoTableCopies:
        """Stands in for the `copy` module inside moto's dynamodb models while a transaction runs."""

        @staticmethod
        def deepcopy(value: Any) -> Any:
            return value  # the "backup" is the live table; the touched items are restored below

    def transact_write_items(self: Any, transact_items: list[dict[str, Any]]) -> None:
        snapshots = []
        for item in transact_items:
            _, op = next(iter(item.items()))
            table = self.get_table(op["TableName"])
            key = op.get("Key") or {
                name: op["Item"][name]
                for name in (table.hash_key_attr, table.range_key_attr)
                if name and name in op.get("Item", {})
            }
            current = self.get_item(op["TableName"], key)
            snapshots.append((op["TableName"], key, current.to_json()["Attributes"] if current else None))
        real_copy, models.copy = models.copy, _NoTableCopies
        try:
            original(self, transact_items)
        except Exception:
            for table_name, key, attributes in reversed(snapshots):
                if attributes is None:
                    if self.get_item(table_name, key) is not None:
                        self.delete_item(table_name, key)
                else:
                    self.put_item(table_name, attributes)
            raise
        finally:
            models.copy = real_copy

    models.DynamoDBBackend.transact_write_items = transact_write_items


def main(argv: list[str] | None = None) -> None:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    parser = argparse.ArgumentParser(description="moto server, one request at a time")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    speed_up_moto_sqs()
    speed_up_moto_dynamodb()
    app = DomainDispatcherApplication(create_backend_app)
    app = _OneAtATime(app, os.environ.get("IMAGEPIPE_DYNAMODB_WRITE_LOG"))
    run_simple(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
