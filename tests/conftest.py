"""Shared fixtures: the stack from template.yaml on in-process moto, the providers' emulators, the
handlers loaded from their CodeUri exactly as the local runtime and Lambda load them."""

from __future__ import annotations

import copy
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote_plus

import boto3
import pytest
from aws_lambda_powertools.utilities import parameters
from moto import mock_aws
from moto.core.botocore_stubber import BotocoreStubber

from imagepipe.jobstate import JobState
from imagepipe.providers.baidu_oauth import clear_tokens
from imagepipe_cli.emulators import BaseEmulator, EmulatorConfig, emulator_class
from imagepipe_cli.emulators.base import parse_fault
from imagepipe_cli.local.event_sources import SqsPoller
from imagepipe_cli.local.lambda_runtime import InlineFunction
from imagepipe_cli.local.moto_server import MotoServer
from imagepipe_cli.local.stack import LocalStack, deploy_stack
from imagepipe_cli.local.template import load_template

# Powertools reads these when imagepipe.observability is first imported, which may be at collection.
os.environ.setdefault("POWERTOOLS_METRICS_NAMESPACE", "imagepipe-tests")
os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "true")

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "template.yaml"
EVENTS = ROOT / "events"
EXAMPLES = ROOT / "examples"
REGION = "us-east-1"

# In-process moto is not thread-safe either (a TransactWriteItems deep-copies a table that another thread is
# writing: "dictionary changed size during iteration"), and the generator's tasks run on threads: one request
# at a time, as the local moto server handles them. No in-process test long-polls, so nothing waits inside.
_MOTO_LOCK = threading.RLock()
_process_request = BotocoreStubber.process_request


def _one_request_at_a_time(self: BotocoreStubber, request: Any) -> Any:
    with _MOTO_LOCK:
        return _process_request(self, request)


BotocoreStubber.process_request = _one_request_at_a_time  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """The local moto server (server mode, over HTTP on loopback), one for the test module."""
    with MotoServer(log_path=tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


def create_jobs_table(resource: Any, name: str = "jobs") -> Any:
    """A table with JobsTable's keys (pk, sk), on whatever DynamoDB `resource` reaches."""
    return resource.create_table(
        TableName=name,
        KeySchema=[
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )


def load_event(name: str) -> dict:
    return json.loads((EVENTS / name).read_text())


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never a real account: fake credentials, a region, no endpoint override, no X-Ray."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SECURITY_TOKEN": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_METRICS_NAMESPACE": "imagepipe-tests",
    }.items():
        monkeypatch.setenv(name, value)
    for name in (
        "AWS_ENDPOINT_URL",
        "AWS_PROFILE",
        "ATLASCLOUD_API_KEY",
        "QIANFAN_API_KEY",
        "OPENAI_API_KEY",
        "BAIDU_API_KEY",
        "BAIDU_SECRET_KEY",
    ):
        monkeypatch.delenv(name, raising=False)
    # Warm-Lambda caches (the token, the secret) must not leak from one test's emulator to the next.
    clear_tokens()
    parameters.clear_caches()


@pytest.fixture
def emulator_factory() -> Iterator[Callable[..., BaseEmulator]]:
    """start("atlascloud", "refuse=word", latency_ms=...) -> a running emulator of that provider."""
    started: list[BaseEmulator] = []

    def start(provider: str = "atlascloud", *faults: str, **config: Any) -> BaseEmulator:
        cls = emulator_class(provider)
        emulator = cls(EmulatorConfig(faults=tuple(parse_fault(f, cls.FAULTS) for f in faults), **config))
        started.append(emulator.start())
        return emulator

    yield start
    for emulator in started:
        emulator.stop()


# The stack's parameter naming each provider's base URL.
URL_PARAMETERS = {
    "atlascloud": "AtlasCloudBaseUrl",
    "qianfan": "QianfanBaseUrl",
    "openai": "OpenAIBaseUrl",
    "baidu-oauth": "BaiduBaseUrl",
}
# Generator settings shortened so tests do not wait on real-time polls: POLL_INTERVAL_SECONDS (not a
# template parameter) and PollDelaySeconds' 8 s, the first wait on a model the generator has not learnt
# yet (0: its shortest) - with the template's PollBudgetSeconds (2 s) the emulator's quick generations
# are read within the invocation that submitted them.
FAST_POLLS = {"POLL_INTERVAL_SECONDS": "0.1", "POLL_DELAY_SECONDS": "0"}
# The poll budget runs from the invocation's start, and on a busy 2-core machine an in-process cold start
# (imports, first clients, the secret) can take most of the template's 2 s: a test about something else
# would then see its quick predictions handed back. Tests about hand-backs set PollBudgetSeconds themselves.
TEST_PARAMETERS = {"PollBudgetSeconds": "10"}
# The functions Lambda drives from queues, in the order a drain works them.
DRAINED = ("ImageGeneratorFunction", "DeadLetterRecorderFunction", "JobFinisherFunction")


@dataclass
class Pipeline:
    """The stack from template.yaml on in-process moto, with its two handlers callable in-process."""

    stack: LocalStack
    emulators: dict[str, BaseEmulator]
    client: Callable[[str], Any]
    splitter: InlineFunction
    generator: InlineFunction
    finisher: InlineFunction
    recorder: InlineFunction

    @property
    def emulator(self) -> BaseEmulator:
        """The default provider's emulator."""
        return self.emulators[self.stack.parameters["DefaultProvider"]]

    @property
    def input_bucket(self) -> str:
        return self.stack.outputs["InputBucketName"]

    @property
    def output_bucket(self) -> str:
        return self.stack.outputs["OutputBucketName"]

    @property
    def tasks_queue(self) -> str:
        return self.stack.outputs["TasksQueueUrl"]

    @property
    def dead_letter_queue(self) -> str:
        return self.stack.outputs["TasksDeadLetterQueueUrl"]

    def upload(self, key: str, body: bytes, job_id: str | None = None) -> dict:
        """Put a file in the input bucket; returns the S3 event Lambda would get for it."""
        s3 = self.client("s3")
        extra = {"Metadata": {"job-id": job_id}} if job_id else {}
        put = s3.put_object(Bucket=self.input_bucket, Key=key, Body=body, **extra)
        event = copy.deepcopy(load_event("s3_put_csv.json"))
        record = event["Records"][0]["s3"]
        record["bucket"]["name"] = self.input_bucket
        record["object"].update(key=quote_plus(key), size=len(body), eTag=put["ETag"].strip('"'))
        return event

    def split(self, key: str, body: bytes, job_id: str | None = None) -> dict:
        return self.splitter.invoke(self.upload(key, body, job_id))["jobs"][0]

    def queued_messages(self, queue_url: str | None = None) -> list[dict]:
        sqs = self.client("sqs")
        messages: list[dict] = []
        # Each message read once: it stays hidden for the rest of the test.
        while batch := sqs.receive_message(
            QueueUrl=queue_url or self.tasks_queue,
            MaxNumberOfMessages=10,
            VisibilityTimeout=600,
            MessageSystemAttributeNames=["All"],
        ).get("Messages", []):
            messages.extend(batch)
        return messages

    def new_generator(self) -> InlineFunction:
        """Another execution environment of the generator (its own module state), for concurrent invocations."""
        import uuid

        fn = self.stack.functions["ImageGeneratorFunction"]
        return InlineFunction(
            fn, REGION, {**FAST_POLLS}, module_name=f"local_generator_{uuid.uuid4().hex[:8]}"
        )

    def mapping(self, function: str = "ImageGeneratorFunction") -> Any:
        return next(m for m in self.stack.queue_mappings if m.function == function)

    def poller(self, function: str = "ImageGeneratorFunction", **options: Any) -> SqsPoller:
        handler = {
            "ImageGeneratorFunction": self.generator,
            "JobFinisherFunction": self.finisher,
            "DeadLetterRecorderFunction": self.recorder,
        }[function]
        return SqsPoller(self.client("sqs"), self.mapping(function), handler, region=REGION, **options)

    @property
    def state(self) -> JobState:
        return JobState(
            boto3.resource("dynamodb", region_name=REGION).Table(self.stack.outputs["JobsTableName"])
        )

    def drain(self, max_polls: int = 200) -> int:
        """Lambda's pollers, one batch at a time, until the queues are empty; failed tasks come back at once."""
        pollers = [self.poller(name) for name in DRAINED]
        polls = 0
        with self.failed_messages_back_at_once():
            while polls < max_polls and sum(p.poll_once() for p in pollers):
                polls += 1
        return polls

    @contextmanager
    def failed_messages_back_at_once(self) -> Iterator[None]:
        """The drained queues' VisibilityTimeout at 0 for a while (what `imagepipe run --visibility-timeout`
        does, shortened all the way): a message a poller left (failed) is received again at once."""
        sqs = self.client("sqs")
        urls = [self.mapping(name).queue_url for name in DRAINED]
        saved = {
            url: sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["VisibilityTimeout"])["Attributes"][
                "VisibilityTimeout"
            ]
            for url in urls
        }
        for url in urls:
            sqs.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "0"})
        try:
            yield
        finally:
            for url, seconds in saved.items():
                sqs.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": seconds})

    def drain_all(self, max_seconds: float = 120.0) -> None:
        """Lambda's pollers until nothing is waiting, in flight or delayed (handed-back predictions come
        back after their delay, so this waits for them); the finisher included."""
        import time

        pollers = [self.poller(name) for name in DRAINED]
        sqs = self.client("sqs")
        deadline = time.monotonic() + max_seconds
        with self.failed_messages_back_at_once():
            self._drain_all(pollers, sqs, deadline, max_seconds)

    def _drain_all(self, pollers: list[SqsPoller], sqs: Any, deadline: float, max_seconds: float) -> None:
        import time

        while time.monotonic() < deadline:
            if sum(p.poll_once() for p in pollers):
                continue
            waiting = 0
            for queue in (self.tasks_queue, self.dead_letter_queue, self.stack.outputs["FinisherQueueUrl"]):
                attrs = sqs.get_queue_attributes(
                    QueueUrl=queue,
                    # Not the in-flight ones: a test may hold messages it received itself and never returns.
                    AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesDelayed"],
                )["Attributes"]
                waiting += sum(int(v) for v in attrs.values())
            if not waiting:
                return
            time.sleep(0.2)
        raise AssertionError(f"the queues were not drained within {max_seconds} s")

    def outcome(self, job_id: str, name: str) -> dict:
        """A finished task's outcome as JobsTable holds it."""
        return next(o for o in self.state.outcomes(job_id) if o["name"] == name)

    def job(self, job_id: str) -> dict | None:
        return self.state.job(job_id)

    def results(self, job_id: str) -> Results:
        """The job's results.jsonl as the finisher wrote it (the queues are worked off first)."""
        self.drain_all()
        body = self.client("s3").get_object(Bucket=self.output_bucket, Key=f"jobs/{job_id}/results.jsonl")
        rows = [Row(**json.loads(line)) for line in body["Body"].read().decode().splitlines()]
        return Results(job=self.state.job(job_id) or {}, rows=rows)

    def split_rows(self, job_id: str) -> list[Row]:
        """What the splitter made of each row (rows.jsonl): queued, or rejected with the reason."""
        body = self.client("s3").get_object(Bucket=self.output_bucket, Key=f"jobs/{job_id}/rows.jsonl")
        return [Row(**json.loads(line)) for line in body["Body"].read().decode().splitlines()]


class Row(SimpleNamespace):
    """One line of results.jsonl or rows.jsonl, read as attributes (row.status, row.error)."""


@dataclass
class Results:
    job: dict
    rows: list[Row]

    @property
    def status(self) -> str:
        return self.job.get("status", "")


@pytest.fixture
def pipeline_factory(emulator_factory: Callable[..., BaseEmulator]) -> Iterator[Callable[..., Pipeline]]:
    """make(*faults, provider=, also=(other providers), parameters={...}, **emulator config): the stack
    from template.yaml with `provider` as its default; `also` starts more providers' emulators. The
    faults and config go to the default provider's emulator."""
    with mock_aws():

        def make(
            *faults: str,
            provider: str = "atlascloud",
            also: tuple[str, ...] = (),
            parameters: dict[str, str] | None = None,
            generator_env: dict[str, str] | None = None,
            **emulator_config: Any,
        ) -> Pipeline:
            emulators = {provider: emulator_factory(provider, *faults, **emulator_config)}
            for other in also:
                emulators[other] = emulator_factory(other)

            def client(name: str) -> Any:
                return boto3.client(name, region_name=REGION)

            urls = {URL_PARAMETERS[name]: e.base_url for name, e in emulators.items()}
            stack = deploy_stack(
                client,
                load_template(TEMPLATE),
                stack_name="imagepipe-local",
                parameters={"DefaultProvider": provider, **urls, **TEST_PARAMETERS, **(parameters or {})},
                region=REGION,
            )
            keys = {name: value for e in emulators.values() for name, value in e.keys.items()}
            client("secretsmanager").put_secret_value(
                SecretId=stack.outputs["ProviderKeysSecretName"], SecretString=json.dumps(keys)
            )
            return Pipeline(
                stack=stack,
                emulators=emulators,
                client=client,
                splitter=InlineFunction(stack.functions["CsvSplitterFunction"], REGION),
                generator=InlineFunction(
                    stack.functions["ImageGeneratorFunction"], REGION, {**FAST_POLLS, **(generator_env or {})}
                ),
                finisher=InlineFunction(stack.functions["JobFinisherFunction"], REGION),
                recorder=InlineFunction(stack.functions["DeadLetterRecorderFunction"], REGION),
            )

        yield make


@pytest.fixture
def pipeline(pipeline_factory: Callable[..., Pipeline]) -> Pipeline:
    return pipeline_factory()


@pytest.fixture
def cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., tuple[int, str, str]]:
    """run("status", ..., stdin=None) -> (exit code, stdout, stderr), as a user sees them, on the local stack
    (found the way a user of `imagepipe up` would); never a traceback. `stdin`: what the user types."""
    import io
    import sys

    from imagepipe_cli.cli import main

    monkeypatch.setenv("IMAGEPIPE_STACK", "imagepipe-local")

    def run(*argv: Any, stdin: str | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()  # what the handlers logged before, not the user's
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return code, out, err

    return run


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The proofs first: they are the longest tests by far, so make test's workers start them at once and
    work off the rest beside them."""
    items.sort(key=lambda item: not item.path.name.startswith("test_proof"))
