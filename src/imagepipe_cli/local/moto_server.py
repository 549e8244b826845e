"""moto in server mode, in its own process on loopback: the local AWS.

Changes from `python -m moto.server`, all about running thousands of tasks, none about what an API call
answers:
- requests are handled one at a time. moto's SQS model is not thread-safe - under concurrent
  DeleteMessage/SendMessage calls we saw deleted messages come back and a message delivered twice -
  its DynamoDB and S3 backends say nothing of threads either, and moto is CPU-bound under one interpreter
  lock anyway, so serialising costs little (several locks would let no more of moto run at once).
- ReceiveMessage with WaitTimeSeconds (a long poll, as Lambda's pollers make) is answered as SQS does,
  but waits outside that lock: moto is asked without waiting, and asked again when the queue gets a
  message or a visibility change (one waiting poll per message), when its next delayed or in-flight
  message is due (one poll per queue), and at the end of the wait.
- moto 5.2.5's SQS work grows with queue depth: every SendMessage and every received message
  recounts the whole queue, reading a slow clock once per message (ReceiveMessage took 1 s at a
  depth of 1,000 here). `speed_up_moto_sqs` reads the clock once per count, reads the retention
  period directly, and keeps the queue's Approximate* counts for up to 0.1 s (AWS documents them as
  approximate and eventually consistent).
- moto 5.2.5's TransactWriteItems deep-copies whole tables for its rollback (O(rows) per finished row);
  `speed_up_moto_dynamodb` snapshots and restores only the items a transaction names.
- moto 5.2.5 spends most of a DynamoDB update on parsing and validating its UpdateExpression anew
  (`speed_up_moto_update_expressions`), and works out which service a request is for anew each time, and
  which method answers its action by listing the response class's methods (`speed_up_moto_dispatch`).
  It lexes every ConditionExpression anew (`speed_up_moto_condition_expressions`), and every request's
  headers go through the email parser (`speed_up_http_headers`). Measured: a client sending the generator's
  conditional claim in a loop, one at a time, 152-195 UpdateItem/s before these last three, 190-257 after.
- no access-log line per request (errors are still logged).
- connections are kept open (`_KeepAliveHandler`): werkzeug's development server closes each one after a
  single request, so every AWS call here cost a TCP connection, a server thread and botocore a new
  connection - a fifth of moto's CPU under load. AWS keeps them open, and botocore reuses them.

And one addition, off until the stack is set up: `--chaos` faults as AWS answers them (`AwsChaos`), turned on
with `POST /_imagepipe/chaos` (a JSON object of probabilities) and counted by `GET /_imagepipe/chaos`, so
every caller - the functions and the CLI - sees the same AWS."""

from __future__ import annotations

import argparse
import base64
import copy
import functools
import io
import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
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

    def set_chaos(self, spec: dict[str, float]) -> None:
        """Turn AWS's faults on (probabilities by kind, see AwsChaos); an empty spec turns them off."""
        httpx.post(f"{self.url}{CHAOS_PATH}", json=spec, timeout=10).raise_for_status()

    def stop_long_polls(self) -> None:
        """Every long poll waiting now answers at once, empty, and no receive waits from then on: for the
        pollers to stop at once."""
        httpx.post(f"{self.url}{WAKE_PATH}", timeout=10).raise_for_status()

    def chaos_injected(self) -> dict[str, int]:
        """The faults the server injected so far, by kind."""
        return httpx.get(f"{self.url}{CHAOS_PATH}", timeout=10).json()["injected"]

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
    also logged as one line `operation<TAB>pk<TAB>sk` (what `make bench` counts per item and per key).
    `chaos` may answer a request instead of moto (see AwsChaos); it is off until turned on over HTTP."""

    def __init__(self, app: Any, write_log: str | None = None) -> None:
        self._app, self._lock = app, threading.Lock()
        # Long polls wait on this, outside the lock (see _long_poll): per queue, the polls waiting in the
        # order they came, and the turns to look again that sends gave them; and how often the runtime stopped.
        # One condition per queue (on one lock), so a send wakes only that queue's polls.
        self._waits_lock = threading.Lock()
        self._changed: dict[str, threading.Condition] = {}
        self._waiting: dict[str, list[object]] = {}
        self._tickets: dict[str, int] = {}
        self._stops = 0
        self._write_log = open(write_log, "a", buffering=1) if write_log else None  # noqa: SIM115 - lives as long as the server
        self.chaos = AwsChaos()

    def __call__(self, environ: dict, start_response: Any) -> Any:
        if environ.get("PATH_INFO") == CHAOS_PATH:
            return self._control(environ, start_response)
        if environ.get("PATH_INFO") == WAKE_PATH:
            self._wake(None)
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b"{}"]
        long_poll = _LongPoll.of(environ)
        if long_poll is None:
            return self._once(environ, start_response)
        return self._long_poll(long_poll, environ, start_response)

    def _once(self, environ: dict, start_response: Any) -> Any:
        with self._lock:
            request = _Request.of(environ)
            fault = self.chaos.fault(request)
            if fault is not None:
                status, headers, payload = fault
                start_response(status, headers)
                return [payload]
            if self._write_log is not None:
                self._log_writes(request)
            if not self.chaos.spec:
                # Read the whole answer inside the lock, so a slow client cannot hold moto mid-request.
                answer = list(self._app(environ, start_response))
            else:
                captured, capture = _capturing()
                body = b"".join(self._app(environ, capture))
                status, headers, body = self.chaos.answered(request, (captured[0], captured[1], body))
                start_response(status, headers)
                answer = [body]
        if request.service == "sqs" and request.operation in SQS_MAKES_VISIBLE:
            self._wake(request.queue(), _visible_now(request.json()))
        return answer

    def _long_poll(self, poll: _LongPoll, environ: dict, start_response: Any) -> Any:
        """ReceiveMessage with WaitTimeSeconds, as SQS answers it: at once when messages are there, else
        as soon as some arrive, else empty at the end of the wait. moto itself would sleep holding the lock;
        here it is asked without waiting, and the wait happens outside the lock.

        Who asks again, and when: a send or a visibility change gives as many waiting polls of the queue a
        turn as it has messages (a "ticket" each); the queue's longest-waiting poll alone looks again when
        moto says its next delayed or in-flight message becomes receivable, at least every
        LONG_POLL_IDLE_RECHECK_S (for what moto moves to a dead-letter queue, which no send announces), and
        when it finds a full batch then, gives one more poll a turn (more may have come due). Ten idle pollers of a queue thus cost moto what one
        does, not ten receives at every send and every LONG_POLL_RECHECK_S."""
        queue, me = poll.queue, object()
        changed = self._changed_for(queue)
        with changed:
            stops = self._stops
            self._waiting.setdefault(queue, []).append(me)
        # Once the runtime is stopping, no receive waits (nor one that arrives just after).
        deadline = time.monotonic() + (0.0 if stops else poll.wait_s)
        looked_on_time = False  # this receive is the leader's, when a message came due
        try:
            while True:
                captured, capture = _capturing()
                body = b"".join(self._once(poll.environ(environ), capture))
                received = poll.received(body)
                if looked_on_time and received is not None and received >= poll.max_messages:
                    self._wake(queue)  # more may have come due at once: no send announced them
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not captured[0].startswith("200") or received != 0:
                    start_response(captured[0], captured[1])
                    return [body]
                recheck_s = self._receivable_in(queue)
                with changed:
                    leader = self._waiting[queue][0] is me

                    def turn(was_leader: bool = leader) -> bool:
                        return (
                            self._stops != stops
                            or self._tickets.get(queue, 0) > 0
                            or (not was_leader and self._waiting[queue][0] is me)  # now the leader
                        )

                    changed.wait_for(turn, min(remaining, recheck_s) if leader else remaining)
                    if self._stops != stops:  # the runtime is stopping: answer empty now
                        start_response(captured[0], captured[1])
                        return [body]
                    looked_on_time = self._tickets.get(queue, 0) == 0
                    if not looked_on_time:
                        self._tickets[queue] -= 1
        finally:
            with changed:
                self._waiting[queue].remove(me)
                self._tickets[queue] = min(self._tickets.get(queue, 0), len(self._waiting[queue]))
                changed.notify_all()  # the next in line may be the leader now

    def _changed_for(self, queue: str) -> threading.Condition:
        with self._waits_lock:
            return self._changed.setdefault(queue, threading.Condition(self._waits_lock))

    def _receivable_in(self, queue: str) -> float:
        """Seconds until the leading long poll of `queue` looks again (see _long_poll)."""
        with self._lock:
            due = next_receivable_at(queue)
        wait_s = LONG_POLL_RECHECK_S if due is None else due - time.time()
        # Due already, yet the receive found nothing (a send would have given a turn): look as before.
        return min(LONG_POLL_IDLE_RECHECK_S, wait_s if wait_s > 0 else LONG_POLL_RECHECK_S)

    def _wake(self, queue: str | None, turns: int = 1) -> None:
        """`turns` long polls waiting on `queue` look again now (None: every long poll ends, empty, and none
        waits again)."""
        with self._waits_lock:
            if queue is None:
                self._stops += 1
                for changed in self._changed.values():
                    changed.notify_all()
            elif queue in self._changed:
                waiting = len(self._waiting.get(queue, ()))
                self._tickets[queue] = min(self._tickets.get(queue, 0) + turns, waiting)
                self._changed[queue].notify(self._tickets[queue])

    def _control(self, environ: dict, start_response: Any) -> Any:
        """POST a JSON object {"ddb-conflict": P, ...} to set the chaos (an empty one turns it off); GET the
        faults injected so far by kind."""
        try:
            if environ.get("REQUEST_METHOD") == "POST":
                spec = json.loads(
                    environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)) or b"{}"
                )
                with self._lock:
                    self.chaos.configure(spec)
            with self._lock:
                payload = json.dumps({"spec": self.chaos.spec, "injected": self.chaos.injected}).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
        except (ValueError, TypeError) as exc:
            payload = json.dumps({"error": str(exc)}).encode()
            start_response("400 Bad Request", [("Content-Type", "application/json")])
        return [payload]

    def _log_writes(self, request: _Request) -> None:
        if request.service != "dynamodb" or request.operation not in DYNAMODB_WRITES:
            return
        for pk, sk in _written_keys(request.operation, json.loads(request.body or b"{}")):
            self._write_log.write(f"{request.operation}\t{pk}\t{sk}\n")


def _visible_now(body: dict) -> int:
    """How many of a send's or visibility change's messages are receivable at once: a turn for a waiting poll
    each. A message delayed (or hidden) for a second or more needs none - the queue's leading poll looks
    again at least every LONG_POLL_IDLE_RECHECK_S, sees when it is due and looks then - and one for each
    would be a receive that finds nothing (ten per batch of hand-backs, a third of moto's receives)."""

    def hidden_s(entry: dict) -> float:
        value = entry.get("DelaySeconds", entry.get("VisibilityTimeout")) or 0
        try:
            return float(value)
        except (TypeError, ValueError):
            return 0.0

    entries = body.get("Entries") or [body]
    return sum(
        1 for entry in entries if isinstance(entry, dict) and hidden_s(entry) < LONG_POLL_IDLE_RECHECK_S
    )


def _capturing() -> tuple[list[Any], Any]:
    """A start_response that keeps the status and headers (moto answers by returning its body, never by
    write()), for an answer to be looked at before it is sent."""
    captured: list[Any] = []

    def capture(status: str, headers: list, exc_info: Any = None) -> Any:
        captured[:] = [status, headers]
        return lambda data: None

    return captured, capture


CHAOS_PATH = "/_imagepipe/chaos"
# POST: every long poll answers now and none waits from then on (the local runtime is stopping).
WAKE_PATH = "/_imagepipe/stop-long-polls"
LONG_POLL_RECHECK_S = 0.2  # when moto's model cannot say when a queue's next message is due
SWITCH_INTERVAL_S = 1.0  # the server process's sys.setswitchinterval (see main)
LONG_POLL_IDLE_RECHECK_S = 1.0  # at most SQS's smallest delay (1 s): see _visible_now
# Calls that may make messages receivable at once (a delete or a receive never does).
SQS_MAKES_VISIBLE = {
    "SendMessage",
    "SendMessageBatch",
    "ChangeMessageVisibility",
    "ChangeMessageVisibilityBatch",
}
AWS_CHAOS_KINDS = ("ddb-conflict", "ddb-throttle", "stale-read", "s3-error", "sqs-error")
STALE_READ_WINDOW_S = 5.0  # how old a stale answer may be (DynamoDB: "usually within a second")
DYNAMODB_READS = {"GetItem", "Query", "Scan", "BatchGetItem"}
SQS_WRITES = {
    "SendMessage",
    "SendMessageBatch",
    "DeleteMessage",
    "DeleteMessageBatch",
    "ChangeMessageVisibility",
    "ChangeMessageVisibilityBatch",
}
_SERVICE_IN_AUTH = re.compile(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/aws4_request")

Answer = tuple[str, list[tuple[str, str]], bytes]


class _Request:
    """What the chaos needs to know of a request: its service (from the SigV4 credential scope), its
    operation (X-Amz-Target for the JSON services) and its body."""

    def __init__(self, service: str, operation: str, body: bytes) -> None:
        self.service, self.operation, self.body = service, operation, body

    @classmethod
    def of(cls, environ: dict) -> _Request:
        match = _SERVICE_IN_AUTH.search(environ.get("HTTP_AUTHORIZATION", "")) or _SERVICE_IN_AUTH.search(
            (environ.get("QUERY_STRING") or "").replace("%2F", "/")
        )
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        service = match.group(1) if match else ""
        if target.startswith("DynamoDB_"):
            service = "dynamodb"
        body = b""
        if service in ("dynamodb", "sqs"):  # small JSON bodies, read here and handed on to moto
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = io.BytesIO(body)
        return cls(service, target.rpartition(".")[2], body)

    def queue(self) -> str:
        """The queue an SQS request names (its URL's last part)."""
        return str(self.json().get("QueueUrl") or "").rstrip("/").rsplit("/", 1)[-1]

    def json(self) -> dict:
        try:
            value = json.loads(self.body or b"{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


class _LongPoll:
    """A ReceiveMessage that may wait (WaitTimeSeconds > 0, SQS's JSON protocol): its body, asked of moto
    with WaitTimeSeconds 0."""

    def __init__(self, body: dict, wait_s: float) -> None:
        self.body, self.wait_s = body, wait_s
        self.queue = str(body.get("QueueUrl") or "").rstrip("/").rsplit("/", 1)[-1]
        self._payload = json.dumps({**body, "WaitTimeSeconds": 0}).encode()

    @classmethod
    def of(cls, environ: dict) -> _LongPoll | None:
        if environ.get("HTTP_X_AMZ_TARGET") != "AmazonSQS.ReceiveMessage":
            return None
        payload = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(payload)
        try:
            body = json.loads(payload or b"{}")
            wait_s = float(body.get("WaitTimeSeconds") or 0)
        except (ValueError, TypeError, AttributeError):
            return None  # moto answers it as it is
        return cls(body, wait_s) if wait_s > 0 else None

    def environ(self, environ: dict) -> dict:
        """The request once more, as a receive that does not wait."""
        return {**environ, "wsgi.input": io.BytesIO(self._payload), "CONTENT_LENGTH": str(len(self._payload))}

    @property
    def max_messages(self) -> int:
        try:
            return int(self.body.get("MaxNumberOfMessages") or 1)
        except (TypeError, ValueError):
            return 1

    @staticmethod
    def received(body: bytes) -> int | None:
        """How many messages an answer holds (None: not an answer to wait on)."""
        try:
            return len(json.loads(body or b"{}").get("Messages") or [])
        except (ValueError, AttributeError, TypeError):
            return None


class AwsChaos:
    """AWS's own failures, each a probability, answered in AWS's own shapes so botocore and the code see
    exactly what AWS would send; nothing of the request is done when a fault is answered.

    - ddb-conflict: TransactWriteItems cancelled, one item's reason `TransactionConflict` (botocore does
      not retry it).
    - ddb-throttle: any DynamoDB call answered ThrottlingException or ProvisionedThroughputExceededException
      (botocore's standard mode retries both).
    - stale-read: a GetItem/Query/Scan/BatchGetItem without ConsistentRead answers what the same request
      answered up to STALE_READ_WINDOW_S ago (an eventually consistent read); a consistent read never does.
    - s3-error: any S3 call answered 500 InternalError or 503 SlowDown.
    - sqs-error: a send, delete or visibility change answered 500 InternalError (SQS's JSON protocol)."""

    def __init__(self) -> None:
        self.spec: dict[str, float] = {}
        self.injected: dict[str, int] = dict.fromkeys(AWS_CHAOS_KINDS, 0)
        self._rng = random.Random()
        self._answers: dict[tuple[str, bytes], deque[tuple[float, Answer]]] = {}
        self._pruned = time.monotonic()

    def configure(self, spec: dict[str, Any]) -> None:
        probabilities: dict[str, float] = {}
        for name, value in spec.items():
            if name == "seed":
                self._rng.seed(value)
                continue
            if name not in AWS_CHAOS_KINDS:
                raise ValueError(f"unknown chaos {name!r}")
            probability = float(value)
            if not 0 <= probability <= 1:
                raise ValueError(f"chaos {name}: {value} is not a probability")
            if probability:
                probabilities[name] = probability
        self.spec = probabilities

    def _chance(self, kind: str) -> bool:
        probability = self.spec.get(kind, 0.0)
        return bool(probability) and self._rng.random() < probability

    def _count(self, kind: str, answer: Answer) -> Answer:
        self.injected[kind] += 1
        return answer

    def fault(self, request: _Request) -> Answer | None:
        if not self.spec:
            return None
        if request.service == "dynamodb":
            if self._chance("ddb-throttle"):
                return self._count("ddb-throttle", _dynamodb_throttle(self._rng))
            if request.operation == "TransactWriteItems" and self._chance("ddb-conflict"):
                items = len(request.json().get("TransactItems") or []) or 1
                return self._count("ddb-conflict", _transaction_conflict(items, self._rng.randrange(items)))
        elif request.service == "s3" and self._chance("s3-error"):
            return self._count("s3-error", _s3_error(self._rng))
        elif request.service == "sqs" and request.operation in SQS_WRITES and self._chance("sqs-error"):
            return self._count("sqs-error", _sqs_internal_error())
        return None

    def answered(self, request: _Request, answer: Answer) -> Answer:
        """moto's answer, or (stale-read) an older answer the same eventually consistent read gave up to
        STALE_READ_WINDOW_S ago, when it differs from the current one: what a read may see after a write."""
        if "stale-read" not in self.spec or request.service != "dynamodb":
            return answer
        if request.operation not in DYNAMODB_READS or not answer[0].startswith("200") or _consistent(request):
            return answer
        now = time.monotonic()
        history = self._answers.setdefault((request.operation, request.body), deque())
        while history and now - history[0][0] > STALE_READ_WINDOW_S:
            history.popleft()
        older = [old for _, old in history if old[2] != answer[2]]
        history.append((now, answer))
        if now - self._pruned > STALE_READ_WINDOW_S:
            self._pruned = now
            for key in [k for k, h in self._answers.items() if not h or now - h[-1][0] > STALE_READ_WINDOW_S]:
                del self._answers[key]
        if older and self._chance("stale-read"):
            return self._count("stale-read", older[self._rng.randrange(len(older))])
        return answer


def _consistent(request: _Request) -> bool:
    """ConsistentRead=true (for BatchGetItem: on every table it reads)."""
    body = request.json()
    if request.operation == "BatchGetItem":
        tables = (body.get("RequestItems") or {}).values()
        return bool(tables) and all(bool(t.get("ConsistentRead")) for t in tables)
    return bool(body.get("ConsistentRead"))


def _json_error(status: str, error_type: str, message: str, **extra: Any) -> Answer:
    body = json.dumps({"__type": error_type, "message": message, **extra}).encode()
    return (
        status,
        [("Content-Type", "application/x-amz-json-1.0"), ("x-amzn-RequestId", str(uuid.uuid4()))],
        body,
    )


def _dynamodb_throttle(rng: random.Random) -> Answer:
    if rng.random() < 0.5:
        return _json_error(
            "400 Bad Request",
            "com.amazon.coral.availability#ThrottlingException",
            "Rate of requests exceeds the allowed throughput.",
        )
    return _json_error(
        "400 Bad Request",
        "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
        "The level of configured provisioned throughput for the table was exceeded. "
        "Consider increasing your provisioning level with the UpdateTable API.",
    )


def _transaction_conflict(items: int, conflicting: int) -> Answer:
    reasons = [
        {"Code": "TransactionConflict", "Message": "Transaction is ongoing for the item"}
        if index == conflicting
        else {"Code": "None"}
        for index in range(items)
    ]
    codes = ", ".join(r["Code"] for r in reasons)
    return _json_error(
        "400 Bad Request",
        "com.amazonaws.dynamodb.v20120810#TransactionCanceledException",
        f"Transaction cancelled, please refer cancellation reasons for specific reasons [{codes}]",
        CancellationReasons=reasons,
    )


def _s3_error(rng: random.Random) -> Answer:
    request_id = uuid.uuid4().hex[:16].upper()
    if rng.random() < 0.5:
        status, code, message = (
            "500 Internal Server Error",
            "InternalError",
            ("We encountered an internal error. Please try again."),
        )
    else:
        status, code, message = "503 Slow Down", "SlowDown", "Please reduce your request rate."
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<RequestId>{request_id}</RequestId><HostId>{uuid.uuid4().hex}</HostId></Error>"
    ).encode()
    return (
        status,
        [
            ("Content-Type", "application/xml"),
            ("x-amz-request-id", request_id),
            ("x-amz-id-2", uuid.uuid4().hex),
        ],
        body,
    )


def _sqs_internal_error() -> Answer:
    status, headers, body = _json_error(
        "500 Internal Server Error",
        "com.amazonaws.sqs#InternalError",
        "We encountered an internal error. Please try again.",
    )
    # SQS's JSON protocol also names the error the query way; botocore takes the code from this header.
    return status, [*headers, ("x-amzn-query-error", "InternalError;Receiver")], body


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


def next_receivable_at(queue_name: str) -> float | None:
    """Epoch seconds at which the first of `queue_name`'s delayed or in-flight messages becomes receivable
    (now, if one is receivable already; inf if it has none), read from moto 5.2.5's model; None when this moto
    cannot say. Called under the server's lock."""
    import moto
    from moto.sqs.models import sqs_backends

    if moto.__version__ != "5.2.5":
        return None
    due_ms = float("inf")
    for account in list(sqs_backends.values()):
        for backend in list(account.values()):
            queue = backend.queues.get(queue_name)
            for message in list(queue._messages) if queue is not None else ():
                due_ms = min(due_ms, max(message.visible_at, message.delayed_until))
    return due_ms / 1000.0


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


def speed_up_moto_update_expressions() -> None:
    """moto 5.2.5 parses every UpdateExpression anew, deep-copies its syntax tree for each validation and, in
    every one of the ten passes over the tree, rebuilds each pass's node map once per node (and two passes
    re-walk the whole subtree at every level). The generator sends the same few expressions for every task:
    parse each once (the tree is only read, or copied before it is changed), copy it by unpickling, build
    each pass's map once per pass, and remember the passes that only check the expression against its
    names and the table's keys once they passed for that expression. The same items, the same errors."""
    import pickle
    from functools import lru_cache

    import moto
    from moto.dynamodb.parsing import ast_nodes, expressions, validators

    if moto.__version__ != "5.2.5":
        return
    parse = expressions.UpdateExpressionParser.make.__func__
    pickled: dict[int, bytes] = {}

    @lru_cache(maxsize=256)
    def parsed(cls: Any, expression: str) -> Any:
        tree = parse(cls, expression)
        pickled[id(tree)] = pickle.dumps(tree)
        return tree

    def make(cls: Any, expression: str) -> Any:
        # An expression that does not parse raises here each time (lru_cache keeps no exceptions).
        return parsed(cls, expression)

    expressions.UpdateExpressionParser.make = classmethod(make)

    def copy_tree(value: Any, memo: Any = None) -> Any:
        data = pickled.get(id(value))
        return pickle.loads(data) if data is not None else copy.deepcopy(value, memo)

    validators.deepcopy = copy_tree

    def processing(self: Any) -> tuple[tuple, tuple]:
        """The pass's node types and, in the same order, the processor of each (its map built once)."""
        cached = self.__dict__.get("_imagepipe_map")
        if cached is None:
            processing_map = self._processing_map()
            cached = self.__dict__["_imagepipe_map"] = (tuple(processing_map), tuple(processing_map.values()))
        return cached

    traverser = ast_nodes.DepthFirstTraverser
    traverser.nodes_to_be_processed = lambda self: processing(self)[0]
    no_hook = traverser.pre_processing_of_child
    # isinstance() on moto's nodes goes through ABCMeta (they are abstract classes), four times per node and
    # pass: what a node's type is, and which of a pass's processors takes it, is looked up once per type.
    is_node: dict[type, bool] = {}
    processor_of: dict[tuple[type, type], int] = {}  # (pass, node type) -> index of its processor, -1: none

    def traverse_node_recursively(self: Any, node: Any, child_id: int = -1) -> Any:
        types, processors = processing(self)
        hook = None if type(self).pre_processing_of_child is no_hook else self.pre_processing_of_child
        kind = type(self)

        def walk(node: Any, child_id: int) -> Any:
            node_type = type(node)
            known = is_node.get(node_type)
            if known is None:
                known = is_node[node_type] = isinstance(node, ast_nodes.Node)
            if not known:
                return node
            parent = node.parent
            if node.children is not None:
                for index, child in enumerate(node.children):
                    if hook is not None:
                        hook(node, index)
                    walk(child, index)
            which = processor_of.get((kind, node_type))
            if which is None:
                which = processor_of[(kind, node_type)] = next(
                    (i for i, cls in enumerate(types) if isinstance(node, cls)), -1
                )
            if which >= 0:
                node = processors[which](node)
                node.parent = parent
                if parent:
                    parent.children[child_id] = node
            return node

        return walk(node, child_id)

    traverser.traverse_node_recursively = traverse_node_recursively

    checks_only = (
        validators.ActionCountValidator,
        validators.OverlappingPathsValidator,
        validators.UpdateHashRangeKeyValidator,
    )
    passed: set[tuple] = set()

    def __init__(
        self: Any,
        expression: Any,
        expression_attribute_names: Any,
        expression_attribute_values: Any,
        item: Any,
        table: Any,
    ) -> None:
        names = expression_attribute_names
        self.expression_attribute_names, self.expression_attribute_values = names, expression_attribute_values
        self.item, self.table = item, table
        self._imagepipe_key = None
        if id(expression) in pickled:
            self._imagepipe_key = (
                id(expression),
                tuple(sorted((names or {}).items())),
                tuple(table.table_key_attrs),
            )
        self.processors = self.get_ast_processors()
        if self._imagepipe_key in passed:
            self.processors = [p for p in self.processors if not isinstance(p, checks_only)]
        self.node_to_validate = copy_tree(expression)

    def validate(self: Any) -> Any:
        node = self.node_to_validate
        for processor in self.processors:
            node = processor.traverse(node)
        if self._imagepipe_key is not None:
            passed.add(self._imagepipe_key)
        return node

    validators.Validator.__init__, validators.Validator.validate = __init__, validate


def speed_up_moto_condition_expressions() -> None:
    """moto 5.2.5 lexes every ConditionExpression anew, trying seven regular expressions at each token. The
    tokens depend on the expression's text alone (they are immutable tuples; the parse that follows builds
    new nodes from them, with the request's names and values): lex each text once."""
    from collections import deque

    import moto
    from moto.dynamodb.comparisons import ConditionExpressionParser

    if moto.__version__ != "5.2.5":
        return
    lex = ConditionExpressionParser._lex_condition_expression
    lexed_texts: dict[str, tuple] = {}

    def lexed(self: Any) -> deque:
        # A text that does not lex raises here each time (nothing is kept for it).
        tokens = lexed_texts.get(self.condition_expression)
        if tokens is None:
            tokens = tuple(lex(self))
            if len(lexed_texts) < 1024:
                lexed_texts[self.condition_expression] = tokens
        return deque(tokens)

    ConditionExpressionParser._lex_condition_expression = lexed  # type: ignore[method-assign]


def speed_up_http_headers() -> None:
    """Every request's headers are parsed by the standard library's email parser (`http.client.parse_headers`,
    which http.server calls): a tenth of the server's CPU per DynamoDB call. Headers as botocore and the AWS
    CLI send them - one `Name: value` per line - are read directly into the same message class; anything
    else (a folded line, a line without a colon) still goes to the email parser."""
    import email.parser
    import http.client

    read_lines = http.client._read_headers  # type: ignore[attr-defined]  # keeps the line and count limits

    def parse_headers(fp: Any, _class: Any = http.client.HTTPMessage) -> Any:
        lines = read_lines(fp)
        message = _class()
        for raw in lines:
            line = raw.decode("iso-8859-1").rstrip("\r\n")
            if not line:
                break
            name, colon, value = line.partition(":")
            if not colon or line[0] in " \t" or not name or name != name.rstrip(" \t"):
                return email.parser.Parser(_class=_class).parsestr(b"".join(lines).decode("iso-8859-1"))
            message[name] = value.lstrip(" \t")
        return message

    http.client.parse_headers = parse_headers  # type: ignore[assignment]


# The members of DynamoDB's answers that hold items (and counts): JSON as they are, but for binary values.
ITEM_MEMBERS = {
    "Item",
    "Items",
    "Responses",
    "Attributes",
    "LastEvaluatedKey",
    "UnprocessedKeys",
    "Count",
    "ScannedCount",
}


class _NotPlain(Exception):
    pass


def _wire(value: Any) -> Any:
    """An item (or items) as DynamoDB's JSON carries it: binary values in base64, everything else as is."""
    if isinstance(value, dict):
        return {key: _wire(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_wire(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, str | bool | int):
        return value
    raise _NotPlain  # None, floats, anything else: moto's own serializer decides


def speed_up_moto_dispatch() -> None:
    """moto 5.2.5 finds the method for a request's action by listing its response class's methods with
    inspect.getmembers, on every request of every service: an eighth of a GetItem's time in moto here. A
    class's methods do not change: each class's are listed once."""
    import moto
    from moto.core import responses

    if moto.__version__ != "5.2.5":
        return
    method_names = responses.method_names_from_class

    @functools.cache
    def listed(clazz: Any) -> frozenset[str]:
        return frozenset(method_names(clazz))

    responses.method_names_from_class = listed  # type: ignore[assignment]


def speed_up_moto_dynamodb_answers() -> None:
    """moto 5.2.5 turns every DynamoDB answer into JSON by walking the operation's output model member by
    member (about 1 ms per item: a 16-item BatchGetItem took 15 ms here). The items in an answer are
    already in DynamoDB's JSON shape: write them as they are (binary values in base64, as the serializer
    does) and leave the other members (ConsumedCapacity...) to moto's serializer, so the answer is the same."""
    import moto
    from moto import settings
    from moto.core import serialize
    from moto.core.responses import ActionResult
    from moto.dynamodb import responses

    if moto.__version__ != "5.2.5":
        return

    def execute_result(self: Any, context: Any) -> Any:
        result, members = self.result, context.operation_model.output_shape
        fast = {}
        if isinstance(result, dict) and members is not None:
            try:
                fast = {
                    key: _wire(value)
                    for key, value in result.items()
                    if key in ITEM_MEMBERS and key in members.members and value is not None
                }
            except _NotPlain:
                fast = {}
        if not fast:
            return ActionResult.execute_result(self, context)
        serializer = context.serializer_class(
            operation_model=context.operation_model,
            pretty_print=settings.PRETTIFY_RESPONSES,
            value_picker=serialize.XFormedAttributePicker(
                response_transformers=getattr(context.response, "RESPONSE_KEY_PATH_TO_TRANSFORMER", None)
            ),
        )
        serialized = serializer.MAP_TYPE()
        serializer._serialize(serialized, {k: v for k, v in result.items() if k not in fast}, members, "")
        serialized.update(fast)
        answer = serializer._serialized_result_to_response(
            serializer._create_default_response(), result, members, serialized
        )
        return answer["status_code"], answer["headers"], answer["body"]

    responses.DynamoResult.execute_result = execute_result


def _keep_alive_handler() -> type:
    from moto.moto_server.werkzeug_app import MotoRequestHandler

    class _KeepAliveHandler(MotoRequestHandler):
        """moto's request handler (its environ: S3 metadata names with underscores kept) on HTTP/1.1
        connections that stay open, as AWS's do. werkzeug's `run_wsgi` cannot keep them: after each answer
        it reads and discards whatever the socket holds, which on a kept connection is the next request.
        Here the request's body is read whole (its Content-Length, or to the end of its chunks) before moto
        sees it, and the answer is written in one piece with its length, so each request ends exactly where
        the next one starts."""

        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def run_wsgi(self) -> None:
            if self.headers.get("Expect", "").lower().strip(" \t") == "100-continue":
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            environ = self.environ = self.make_environ()
            stream = environ["wsgi.input"]
            if environ.get("wsgi.input_terminated"):  # chunked: werkzeug's de-chunking stream, to its end
                body = stream.read()
            else:
                body = stream.read(int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = io.BytesIO(body)
            captured, capture = _capturing()
            try:
                answer = self.server.app(environ, capture)
                try:
                    payload = b"".join(answer)
                finally:
                    if hasattr(answer, "close"):
                        answer.close()
                status, headers = captured
            except Exception:  # moto's own failure: a 500, as werkzeug answers it, on a closed connection
                logging.getLogger("werkzeug").exception("Error on request %s %s", self.command, self.path)
                status, headers, payload = "500 INTERNAL SERVER ERROR", [("Content-Type", "text/plain")], b""
                self.close_connection = True
            code, _, reason = status.partition(" ")
            head = self.command == "HEAD" or int(code) in (204, 304) or int(code) < 200
            lines = [f"{self.protocol_version} {status}", f"Server: {self.version_string()}",
                     f"Date: {self.date_time_string()}"]  # fmt: skip
            for name, value in headers:
                if name.lower() in ("connection", "transfer-encoding", "date", "server") or (
                    name.lower() == "content-length" and not head
                ):
                    continue
                lines.append(f"{name}: {value}")
            if not head:
                lines.append(f"Content-Length: {len(payload)}")
            if self.close_connection:
                lines.append("Connection: close")
            self.wfile.write("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + (b"" if head else payload))

    return _KeepAliveHandler


def main(argv: list[str] | None = None) -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import run_simple

    parser = argparse.ArgumentParser(description="moto server, one request at a time")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    # One request runs in moto at a time, among a thread per kept connection: with the interpreter's 5 ms
    # switch interval the thread in moto is made to hand the interpreter lock over to threads that only
    # wait for moto's lock, then queues for it again. With 1 s a request runs on until it waits on its
    # socket. Billed handler seconds per image, 200-row Atlas runs at the template's concurrency, two runs
    # each, interleaved: 5 ms 0.111-0.117 vs 50 ms 0.096-0.104; later, on a busier machine, 50 ms
    # 0.172-0.174 vs 200 ms 0.136-0.155 vs 1 s 0.115-0.123.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    speed_up_moto_sqs()
    speed_up_moto_dynamodb()
    speed_up_moto_update_expressions()
    speed_up_moto_condition_expressions()
    speed_up_moto_dynamodb_answers()
    speed_up_moto_dispatch()
    speed_up_http_headers()
    app = DomainDispatcherApplication(create_backend_app)
    # Which service a host name belongs to never changes, but moto works it out anew for every request
    # (walking every backend's URL patterns and moto's module list): remember it.
    app.get_backend_for_host = functools.lru_cache(maxsize=1024)(app.get_backend_for_host)
    app = _OneAtATime(app, os.environ.get("IMAGEPIPE_DYNAMODB_WRITE_LOG"))
    # No line per request in moto.log (werkzeug's access log: a seventh of the server's CPU under load, on
    # the interpreter lock every request waits for); errors are still logged.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    run_simple(args.host, args.port, app, threaded=True, request_handler=_keep_alive_handler())


if __name__ == "__main__":
    main()
