"""Shared fixtures: the stack from template.yaml on in-process moto, the Atlas emulator, the handlers
loaded from their CodeUri exactly as the local runtime and Lambda load them."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import boto3
import pytest
from aws_lambda_powertools.utilities import parameters
from moto import mock_aws

from imagepipe.atlas import TOKENS
from imagepipe.results import JobResults, collect_results
from imagepipe_cli.emulator import AtlasEmulator, EmulatorConfig, parse_fault
from imagepipe_cli.local.event_sources import SqsPoller
from imagepipe_cli.local.lambda_runtime import InlineFunction
from imagepipe_cli.local.stack import LocalStack, deploy_stack
from imagepipe_cli.local.template import load_template

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "template.yaml"
EVENTS = ROOT / "events"
EXAMPLES = ROOT / "examples"
REGION = "us-east-1"


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
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "ATLAS_BASE_URL", "ATLAS_ACCESS_KEY", "ATLAS_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    # Warm-Lambda caches (the token, the secret) must not leak from one test's emulator to the next.
    TOKENS.clear()
    parameters.clear_caches()


@pytest.fixture
def emulator_factory() -> Iterator[Callable[..., AtlasEmulator]]:
    started: list[AtlasEmulator] = []

    def start(*faults: str, **config: Any) -> AtlasEmulator:
        emulator = AtlasEmulator(
            EmulatorConfig(faults=tuple(parse_fault(f) for f in faults), **config)
        ).start()
        started.append(emulator)
        return emulator

    yield start
    for emulator in started:
        emulator.stop()


@dataclass
class Pipeline:
    """The stack from template.yaml on in-process moto, with its two handlers callable in-process."""

    stack: LocalStack
    emulator: AtlasEmulator
    client: Callable[[str], Any]
    splitter: InlineFunction
    generator: InlineFunction

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
            QueueUrl=queue_url or self.tasks_queue, MaxNumberOfMessages=10, VisibilityTimeout=600
        ).get("Messages", []):
            messages.extend(batch)
        return messages

    def poller(self, **options: Any) -> SqsPoller:
        (mapping,) = self.stack.queue_mappings
        return SqsPoller(self.client("sqs"), mapping, self.generator, region=REGION, **options)

    def drain(self, max_polls: int = 200) -> int:
        """Lambda's poller, one batch at a time, until the queue is empty; failed tasks come back at once."""
        poller = self.poller(retry_delay_s=0)
        polls = 0
        while polls < max_polls and poller.poll_once():
            polls += 1
        return polls

    def results(self, job_id: str) -> JobResults:
        return collect_results(self.client("s3"), self.output_bucket, job_id, drained=True)


@pytest.fixture
def pipeline_factory(emulator_factory: Callable[..., AtlasEmulator]) -> Iterator[Callable[..., Pipeline]]:
    with mock_aws():

        def make(*faults: str, **emulator_config: Any) -> Pipeline:
            emulator = emulator_factory(*faults, **emulator_config)

            def client(name: str) -> Any:
                return boto3.client(name, region_name=REGION)

            stack = deploy_stack(
                client,
                load_template(TEMPLATE),
                stack_name="imagepipe-local",
                parameters={"AtlasBaseUrl": emulator.base_url, "AtlasTokenUrl": emulator.token_url},
                region=REGION,
            )
            client("secretsmanager").put_secret_value(
                SecretId=stack.outputs["AtlasCredentialsSecretName"],
                SecretString=json.dumps(
                    {"access_key": "emulator-access-key", "secret_key": "emulator-secret-key"}
                ),
            )
            return Pipeline(
                stack=stack,
                emulator=emulator,
                client=client,
                splitter=InlineFunction(stack.functions["CsvSplitterFunction"], REGION),
                generator=InlineFunction(stack.functions["ImageGeneratorFunction"], REGION),
            )

        yield make


@pytest.fixture
def pipeline(pipeline_factory: Callable[..., Pipeline]) -> Pipeline:
    return pipeline_factory()
