"""Lambda's event sources, played locally: the SQS poller (batch size, partial batch response,
concurrency), and S3 notifications and EventBridge rules invoking a function asynchronously."""

from __future__ import annotations

import contextlib
import json
import random
import re
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from botocore.exceptions import ClientError

from imagepipe_cli.local.lambda_runtime import FunctionError
from imagepipe_cli.local.stack import QueueMapping, S3Trigger

S3_EVENTS_QUEUE = "imagepipe-local-s3-events"
ASYNC_RETRIES = 2  # Lambda retries an asynchronous (S3-triggered) invocation twice


class Invocable(Protocol):
    def invoke(self, event: dict) -> Any: ...


def lambda_sqs_event(messages: list[dict], queue_arn: str, region: str) -> dict:
    """The event Lambda builds from ReceiveMessage results."""
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": m.get("Attributes", {}),
                "messageAttributes": {
                    name: {
                        "stringValue": value.get("StringValue"),
                        "binaryValue": value.get("BinaryValue"),
                        "stringListValues": [],
                        "binaryListValues": [],
                        "dataType": value["DataType"],
                    }
                    for name, value in m.get("MessageAttributes", {}).items()
                },
                "md5OfBody": m["MD5OfBody"],
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": region,
            }
            for m in messages
        ]
    }


def failed_message_ids(response: Any, message_ids: list[str], report_batch_item_failures: bool) -> set[str]:
    """Which messages go back to the queue, by Lambda's rules for the handler's response."""
    if not report_batch_item_failures:
        return set()
    if not isinstance(response, dict) or not response.get("batchItemFailures"):
        return set()
    failed = set()
    for item in response["batchItemFailures"]:
        identifier = item.get("itemIdentifier") if isinstance(item, dict) else None
        if not identifier or identifier not in message_ids:
            return set(message_ids)  # a malformed response fails the whole batch, as in Lambda
        failed.add(identifier)
    return failed


CHAOS_HELP = {
    # the local runtime's own (Lambda's event source mapping and invocations)
    "redeliver": "a message delivered twice (SQS is at-least-once)",
    "crash-after-call": "an invocation dies after the image API answered, before anything is recorded",
    "crash-before-ack": "an invocation's work is done but its messages come back (its end was lost)",
    "throttle": "an invocation refused by Lambda; its messages come back after the visibility timeout",
    # AWS's, injected by the moto server for every caller (see moto_server.AwsChaos)
    "ddb-conflict": "a DynamoDB transaction cancelled with TransactionConflict, nothing written",
    "ddb-throttle": "a DynamoDB call answered ThrottlingException / ProvisionedThroughputExceededException",
    "stale-read": "a read without ConsistentRead answers the state of up to 5 s ago",
    "s3-error": "an S3 call answered 500 InternalError / 503 SlowDown, nothing done",
    "sqs-error": "an SQS send, delete or visibility change answered 500 InternalError, nothing done",
}
CHAOS_KINDS = tuple(CHAOS_HELP)
AWS_CHAOS = ("ddb-conflict", "ddb-throttle", "stale-read", "s3-error", "sqs-error")


@dataclass(frozen=True)
class Chaos:
    """What the local lab does wrong on purpose, each a probability (CHAOS_HELP). The first four are played by
    the local runtime; the AWS ones are injected by the moto server once the stack is set up (`aws_spec`)."""

    redeliver: float = 0.0
    crash_after_call: float = 0.0
    crash_before_ack: float = 0.0
    throttle: float = 0.0
    ddb_conflict: float = 0.0
    ddb_throttle: float = 0.0
    stale_read: float = 0.0
    s3_error: float = 0.0
    sqs_error: float = 0.0
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> Chaos:
        """ "redeliver=0.2,crash-after-call=0.05"; ValueError with a one-line reason."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, number = part.partition("=")
            if name not in CHAOS_KINDS:
                raise ValueError(f"unknown chaos {name!r}: use {', '.join(k + '=P' for k in CHAOS_KINDS)}")
            try:
                probability = float(number)
            except ValueError:
                probability = -1.0
            if not 0 <= probability <= 1:
                raise ValueError(f"chaos {part!r}: P must be a number from 0 to 1")
            values[name.replace("-", "_")] = probability
        return cls(**values)

    def aws_spec(self) -> dict[str, float]:
        """The AWS faults, as the moto server takes them (POST /_imagepipe/chaos)."""
        return {
            k: getattr(self, k.replace("-", "_")) for k in AWS_CHAOS if getattr(self, k.replace("-", "_"))
        }

    def __str__(self) -> str:
        return ",".join(
            f"{k}={getattr(self, k.replace('-', '_')):g}"
            for k in CHAOS_KINDS
            if getattr(self, k.replace("-", "_"))
        )


@dataclass
class PollerStats:
    deleted: int = 0
    returned: int = 0
    redelivered: int = 0
    throttled: int = 0
    acks_lost: int = 0
    deletes_failed: int = 0
    fatal: str | None = None  # the poller stopped on this error
    lock: threading.Lock = field(default_factory=threading.Lock)


class SqsPoller:
    """Drives a function from a queue as an SQS event source mapping does: up to `concurrency`
    invocations in flight, each with up to `batch_size` messages; the messages a batch reports as
    failed (or all of them, on a function error, a timeout or a throttle) are left alone, so they come back
    when the queue's own VisibilityTimeout ends, as on AWS; the rest are deleted. Delays, maxReceiveCount and
    the redrive to the dead-letter queue are SQS's own (moto's)."""

    def __init__(
        self,
        sqs: Any,
        mapping: QueueMapping,
        function: Invocable,
        *,
        region: str,
        batch_size: int | None = None,
        concurrency: int | None = None,
        idle_sleep_s: float = 0.2,
        wait_s: int = 0,
        chaos: Chaos | None = None,
    ) -> None:
        self._sqs, self._mapping, self._function, self._region = sqs, mapping, function, region
        self.batch_size = batch_size or mapping.batch_size
        self.concurrency = concurrency or mapping.max_concurrency
        # wait_s > 0: long polls, as Lambda's pollers make them (the local moto server answers them without
        # holding up other requests); 0: short polls, `idle_sleep_s` apart while the queue is empty.
        self._idle_sleep_s, self._wait_s = idle_sleep_s, wait_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.stats = PollerStats()
        self._chaos = chaos or Chaos()
        self._rng = random.Random(self._chaos.seed)
        self._rng_lock = threading.Lock()
        # Messages done, for the deleter thread (started with the slots; poll_once alone deletes at once).
        self._deleter: threading.Thread | None = None
        self._deletes: list[dict] = []
        self._deletes_ready = threading.Condition()
        self._deleter_stop = False

    def start(self) -> None:
        self._deleter = threading.Thread(target=self._run_deletes, name="sqs-deletes", daemon=True)
        self._deleter.start()
        for index in range(self.concurrency):
            thread = threading.Thread(target=self._run, name=f"sqs-poller-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stopping(self) -> None:
        """No new receive from now on (`stop` waits for the ones under way)."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        if self._deleter is not None:
            with self._deletes_ready:
                self._deleter_stop = True
                self._deletes_ready.notify()
            self._deleter.join()

    def _run(self) -> None:
        """One of `concurrency` invocation slots. As Lambda's pollers do, the slot's next batch is received
        while the current one runs, and its messages are deleted by the deleter thread, so neither SQS
        call stands between one invocation and the next (a message received ahead waits at most one
        invocation, its visibility timeout running, as in a poller's buffer on AWS)."""
        ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqs-receive")
        try:
            next_batch: Future[list[dict]] | None = None
            while not self._stop.is_set():
                messages = next_batch.result() if next_batch is not None else self._receive()
                next_batch = None
                if not messages:
                    if not self._wait_s:
                        self._stop.wait(self._idle_sleep_s)
                    continue
                if not self._stop.is_set():
                    next_batch = ahead.submit(self._receive)
                self._invoke(messages)
        except Exception as exc:  # the runner stops the job with this reason instead of waiting for it
            with self.stats.lock:
                self.stats.fatal = f"{type(exc).__name__}: {exc}"
        finally:
            ahead.shutdown(wait=True)

    def poll_once(self) -> int:
        """Receive one batch and invoke the function with it; returns how many messages it had."""
        messages = self._receive()
        if messages:
            self._invoke(messages)
        return len(messages)

    def _receive(self) -> list[dict]:
        return self._sqs.receive_message(
            QueueUrl=self._mapping.queue_url,
            MaxNumberOfMessages=self.batch_size,
            WaitTimeSeconds=self._wait_s,
            MessageSystemAttributeNames=["All"],
            MessageAttributeNames=["All"],
        ).get("Messages", [])

    def _run_deletes(self) -> None:
        """The slots' deletes, up to ten per DeleteMessageBatch, sent as soon as there are any (the last
        ones when the poller stops)."""
        while True:
            with self._deletes_ready:
                self._deletes_ready.wait_for(lambda: self._deletes or self._deleter_stop)
                entries, self._deletes = self._deletes[:10], self._deletes[10:]
                if not entries:
                    return
            self._delete(entries)

    def _delete(self, messages: list[dict]) -> None:
        try:
            self._sqs.delete_message_batch(
                QueueUrl=self._mapping.queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
            )
        except ClientError:
            # SQS kept failing the delete (--chaos sqs-error, after botocore's retries): as with Lambda, the
            # messages come back after the visibility timeout and are delivered again (at-least-once).
            with self.stats.lock:
                self.stats.deletes_failed += len(messages)

    def _chance(self, probability: float) -> bool:
        if not probability:
            return False
        with self._rng_lock:
            return self._rng.random() < probability

    def _invoke(self, messages: list[dict]) -> None:
        ids = [m["MessageId"] for m in messages]
        for message in messages:
            if self._chance(self._chaos.redeliver):
                # At-least-once: the same task again, to be received by another poller, maybe at once.
                self._sqs.send_message(QueueUrl=self._mapping.queue_url, MessageBody=message["Body"])
                with self.stats.lock:
                    self.stats.redelivered += 1
        if self._chance(self._chaos.throttle):
            # Lambda refused the invocation: the batch goes back, its receives counted, nothing ran.
            failed = set(ids)
            with self.stats.lock:
                self.stats.throttled += 1
        else:
            try:
                response = self._function.invoke(
                    lambda_sqs_event(messages, self._mapping.queue_arn, self._region)
                )
                failed = failed_message_ids(response, ids, self._mapping.report_batch_item_failures)
            except FunctionError:
                failed = set(ids)  # the function's log has the error; Lambda returns the whole batch
            if self._chance(self._chaos.crash_before_ack):
                # The work was done, but the invocation timed out before Lambda could delete the messages.
                failed = set(ids)
                with self.stats.lock:
                    self.stats.acks_lost += 1
        done = [m for m in messages if m["MessageId"] not in failed]
        back = [m for m in messages if m["MessageId"] in failed]
        if done and self._deleter is not None:
            with self._deletes_ready:
                self._deletes.extend(done)
                self._deletes_ready.notify()
        elif done:
            self._delete(done)
        # The failed ones (`back`) stay in flight until the queue's VisibilityTimeout ends: then SQS hands
        # them out again, their receive count one higher (or moves them to the dead-letter queue).
        with self.stats.lock:
            self.stats.deleted += len(done)
            self.stats.returned += len(back)


def complete_s3_event(event: dict) -> dict:
    """moto's S3 event records leave out fields AWS always sends (and Powertools' S3Model
    requires); add them as AWS fills them, keeping anything moto did send."""
    for record in event.get("Records") or []:
        record.setdefault("userIdentity", {"principalId": "AWS:LOCAL"})
        record.setdefault("requestParameters", {"sourceIPAddress": "127.0.0.1"})
        record.setdefault("responseElements", {"x-amz-request-id": "LOCAL", "x-amz-id-2": "LOCAL"})
        s3 = record.get("s3", {})
        s3.get("bucket", {}).setdefault("ownerIdentity", {"principalId": "LOCAL"})
        s3.get("object", {}).setdefault("sequencer", f"{time.time_ns():020X}")
    return event


@dataclass
class Delivery:
    function: str
    event: dict
    result: Any = None
    error: str | None = None


class AsyncInvocations:
    """Lambda's asynchronous invocation, played locally: each event that reaches one of a source's delivery
    queues invokes its function (a failed invocation is tried twice more). `poll_once` delivers what is there
    now. `start` has a thread per queue deliver each event as it arrives instead, on long polls (an idle
    queue then costs moto one look a second, not a receive from the runner every quarter second), and
    `poll_once` hands over what they delivered since it was last called."""

    def __init__(self, sqs: Any, functions: dict[str, Invocable]) -> None:
        self._sqs, self._functions = sqs, functions
        self._lock = threading.Lock()
        self._delivered: list[Delivery] = []
        self._stop = threading.Event()
        self._watchers: list[threading.Thread] = []
        self.fatal: str | None = None  # why a delivery thread stopped (the runtime stops the job with it)

    def delivery_queues(self) -> list[str]:
        raise NotImplementedError

    def _route(self, queue_url: str, event: dict) -> tuple[str | None, dict]:
        """The function (logical id) an event of `queue_url` goes to, if any, and the event it gets."""
        raise NotImplementedError

    def poll_once(self) -> list[Delivery]:
        if self._watchers:
            with self._lock:
                delivered, self._delivered = self._delivered, []
            return delivered
        return [delivery for url in self.delivery_queues() for delivery in self._poll(url, 0)]

    def start(self, wait_s: int) -> None:
        for index, url in enumerate(self.delivery_queues()):
            thread = threading.Thread(
                target=self._watch, args=(url, wait_s), name=f"{type(self).__name__}-{index}", daemon=True
            )
            thread.start()
            self._watchers.append(thread)

    def stopping(self) -> None:
        """No new receive from now on (`stop` waits for the ones under way)."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._watchers:
            thread.join()

    def _watch(self, url: str, wait_s: int) -> None:
        try:
            while not self._stop.is_set():
                deliveries = self._poll(url, wait_s)
                with self._lock:
                    self._delivered += deliveries
        except Exception as exc:  # moto gone: the runtime stops the job with this reason
            with self._lock:
                self.fatal = self.fatal or f"{type(exc).__name__}: {exc}"

    def _poll(self, url: str, wait_s: int) -> list[Delivery]:
        messages = self._sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_s
        ).get("Messages", [])
        deliveries = []
        for message in messages:
            function, event = self._route(url, json.loads(message["Body"]))
            if function:
                deliveries.append(self._deliver(function, event))
            # SQS kept failing the delete (--chaos sqs-error): the event comes again (at-least-once)
            with contextlib.suppress(ClientError):
                self._sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        return deliveries

    def _deliver(self, function: str, event: dict) -> Delivery:
        delivery = Delivery(function, event)
        for _ in range(1 + ASYNC_RETRIES):
            try:
                delivery.result, delivery.error = self._functions[function].invoke(event), None
                break
            except FunctionError as exc:
                delivery.error = str(exc)
        return delivery


class S3Notifications(AsyncInvocations):
    """S3 -> function notifications. moto does not deliver the template's S3 -> Lambda
    notification, but it does deliver S3 -> SQS; so the bucket notifies a local queue with the
    template's own events and filters, and each event is passed to the function as Lambda would
    (asynchronously: a failed invocation is tried twice more)."""

    def __init__(self, s3: Any, sqs: Any, triggers: list[S3Trigger], functions: dict[str, Invocable]) -> None:
        super().__init__(sqs, functions)
        self._s3, self._triggers = s3, triggers
        self._queue_url = ""

    def setup(self) -> None:
        self._queue_url = self._sqs.create_queue(QueueName=S3_EVENTS_QUEUE)["QueueUrl"]
        queue_arn = self._sqs.get_queue_attributes(QueueUrl=self._queue_url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        by_bucket: dict[str, list[dict]] = {}
        for index, trigger in enumerate(self._triggers):
            config: dict[str, Any] = {
                "Id": f"{trigger.function}-{index}",
                "QueueArn": queue_arn,
                "Events": trigger.events,
            }
            rules = ((trigger.filter or {}).get("S3Key") or {}).get("Rules")
            if rules:
                config["Filter"] = {"Key": {"FilterRules": rules}}
            by_bucket.setdefault(trigger.bucket, []).append(config)
        for bucket, configs in by_bucket.items():
            self._s3.put_bucket_notification_configuration(
                Bucket=bucket, NotificationConfiguration={"QueueConfigurations": configs}
            )

    def delivery_queues(self) -> list[str]:
        return [self._queue_url]

    def _route(self, queue_url: str, event: dict) -> tuple[str | None, dict]:
        event = complete_s3_event(event)
        return self._function_for(event), event

    def _function_for(self, event: dict) -> str | None:
        records = event.get("Records") or []
        if records:
            config_id = records[0].get("s3", {}).get("configurationId", "")
            return config_id.rsplit("-", 1)[0] or None
        bucket = event.get("Bucket")  # s3:TestEvent: no configuration id, only the bucket
        return next((t.function for t in self._triggers if t.bucket == bucket), None)


class EventBridgeRules(AsyncInvocations):
    """EventBridge -> function, for the stack's rules (the splitter's "Object Created" and "ImageJob
    Requested"). moto keeps the rules and matches events, but cannot run a Lambda target; so each rule's
    Lambda target is swapped for an SQS target here, and each event is passed to the function as Lambda would
    (asynchronously: a failed invocation is tried twice more). `taps` are extra queues that receive the
    stack's own events (e.g. "ImageJob Completed"), for whoever wants to watch them."""

    def __init__(
        self,
        events: Any,
        sqs: Any,
        functions: dict[str, Invocable],
        names: dict[str, str],
        region: str = "us-east-1",
    ) -> None:
        # names: function name (as the stack named it) -> logical id
        super().__init__(sqs, functions)
        self._events, self._names, self._region = events, names, region
        self._queues: dict[str, str] = {}  # queue url -> logical id
        self.schedules: list[Schedule] = []  # rules with a rate(...): moto keeps them but never fires them
        self._schedules_stop = threading.Event()
        self._thread: threading.Thread | None = None

    def setup(self) -> None:
        for rule in self._events.list_rules().get("Rules", []):
            period_s = schedule_period_s(rule.get("ScheduleExpression") or "")
            for target in self._events.list_targets_by_rule(Rule=rule["Name"]).get("Targets", []):
                logical_id = self._names.get(target["Arn"].rsplit(":", 1)[-1])
                if logical_id is None:
                    continue
                url, arn = _queue(self._sqs, f"imagepipe-local-events-{logical_id}")
                self._queues[url] = logical_id
                if period_s and rule.get("State", "ENABLED") == "ENABLED":
                    self.schedules.append(
                        Schedule(rule["Name"], rule["Arn"], period_s, url, target.get("Input"))
                    )
                # The queue takes the Lambda target's place: moto fails a PutEvents that matches a rule
                # with a Lambda target (it cannot run one), as it would try to run the function in Docker.
                self._events.remove_targets(Rule=rule["Name"], Ids=[target["Id"]])
                self._events.put_targets(Rule=rule["Name"], Targets=[{"Id": "local-delivery", "Arn": arn}])

    def start_schedules(self, first_after_s: float | None = None) -> None:
        """Fire each scheduled rule at its rate, as EventBridge does, on a background thread: the "Scheduled
        Event" goes to the rule's delivery queue, and `poll_once` invokes the function with it asynchronously
        (two retries), like every other EventBridge delivery. The first firing is one period after the start
        (or after `first_after_s`)."""
        if not self.schedules or self._thread is not None:
            return
        now = time.monotonic()
        due = {s.rule: now + (s.period_s if first_after_s is None else first_after_s) for s in self.schedules}

        def run() -> None:
            while not self._schedules_stop.is_set():
                now = time.monotonic()
                for schedule in self.schedules:
                    if now >= due[schedule.rule]:
                        due[schedule.rule] = now + schedule.period_s
                        self._fire(schedule)
                self._schedules_stop.wait(max(0.05, min(due.values()) - time.monotonic()))

        self._thread = threading.Thread(target=run, name="eventbridge-schedules", daemon=True)
        self._thread.start()

    def stop_schedules(self) -> None:
        self._schedules_stop.set()
        if self._thread is not None:
            self._thread.join()

    def _fire(self, schedule: Schedule) -> None:
        event = schedule.input or json.dumps(
            {
                "version": "0",
                "id": str(uuid.uuid4()),
                "detail-type": "Scheduled Event",
                "source": "aws.events",
                "account": schedule.arn.split(":")[4],
                "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "region": self._region,
                "resources": [schedule.arn],
                "detail": {},
            }
        )
        try:
            self._sqs.send_message(QueueUrl=schedule.queue_url, MessageBody=event)
            schedule.fired += 1
        except Exception:  # noqa: BLE001 - a missed firing; EventBridge's schedule runs on regardless
            schedule.missed += 1

    def tap(self, name: str, pattern: dict) -> str:
        """A queue that receives every event matching `pattern` (returns its URL)."""
        url, arn = _queue(self._sqs, name)
        self._events.put_rule(Name=name, EventPattern=json.dumps(pattern), State="ENABLED")
        self._events.put_targets(Rule=name, Targets=[{"Id": "tap", "Arn": arn}])
        return url

    def delivery_queues(self) -> list[str]:
        return list(self._queues)

    def _route(self, queue_url: str, event: dict) -> tuple[str | None, dict]:
        return self._queues[queue_url], event


@dataclass
class Schedule:
    rule: str
    arn: str
    period_s: float
    queue_url: str
    input: str | None = None  # the target's constant Input, if the rule sets one
    fired: int = 0
    missed: int = 0


_RATE = re.compile(r"^rate\(\s*(\d+)\s+(minute|minutes|hour|hours|day|days)\s*\)$")
_UNIT_S = {"minute": 60, "hour": 3600, "day": 86400}


def schedule_period_s(expression: str) -> float | None:
    """rate(5 minutes) -> 300.0; None for no schedule or one the local runtime does not fire (cron)."""
    match = _RATE.match(expression.strip())
    if not match:
        return None
    return int(match.group(1)) * _UNIT_S[match.group(2).rstrip("s")]


def _queue(sqs: Any, name: str) -> tuple[str, str]:
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return url, arn
