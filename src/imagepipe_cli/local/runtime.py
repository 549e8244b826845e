"""The local stack, running: moto server on loopback, the stack that template.yaml declares, the image
APIs (emulators unless real ones are configured), the functions in their own processes and Lambda's
event sources - what `imagepipe run` uses for one job and `imagepipe up` keeps up for any client."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import boto3
from botocore.config import Config

from imagepipe.contract import DEFAULT_PROVIDER, PROVIDER_NAMES
from imagepipe.jobstate import JobState
from imagepipe.providers import provider_class
from imagepipe_cli.emulators import BaseEmulator, EmulatorConfig, emulator_class
from imagepipe_cli.emulators.base import parse_fault
from imagepipe_cli.local.event_sources import Chaos, Delivery, EventBridgeRules, S3Notifications, SqsPoller
from imagepipe_cli.local.lambda_runtime import ProcessFunction
from imagepipe_cli.local.moto_server import MotoServer
from imagepipe_cli.local.stack import LocalStack, deploy_stack
from imagepipe_cli.local.template import Template

REGION = "us-east-1"
STACK_NAME = "imagepipe-local"
GENERATOR = "ImageGeneratorFunction"
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@dataclass
class StackOptions:
    """How the local stack is set up: the same for `imagepipe run` and `imagepipe up`."""

    template: Path = Path("template.yaml")
    provider: str = DEFAULT_PROVIDER
    api_url: str | None = None
    model: str | None = None
    concurrency: int | None = None
    batch_size: int | None = None
    emulator_latency_ms: float = 50.0
    emulator_faults: list[str] = field(default_factory=list)
    retry_delay_s: int = 1
    chaos: str = ""  # e.g. "redeliver=0.2,crash-after-call=0.05" (see Chaos)
    max_attempts: int | None = None  # the stack's TaskMaxReceiveCount


# With chaos, a crashed invocation's task comes back after --retry-delay, not after the queue's 30-minute
# visibility timeout; its claim on the API call must then count as abandoned after seconds, not after the
# function's 300 s Timeout - and an HTTP call must not outlive that.
CHAOS_TIMING = {"CLAIM_STALE_SECONDS": "6", "HTTP_TIMEOUT_SECONDS": "2"}


class RuntimeSetupError(Exception):
    """The local stack cannot be set up as asked (a flag out of range, keys missing): one line for the user."""


class RuntimeFailure(Exception):
    """Something the local stack needs stopped working (the splitter kept failing, a poller died)."""


class LocalRuntime:
    def __init__(
        self, template: Template, options: StackOptions, logs: Path, out: TextIO, port: int = 0
    ) -> None:
        self.template, self.options, self.logs, self.out, self.port = template, options, logs, out, port
        self._cleanup = ExitStack()

    def __enter__(self) -> LocalRuntime:
        try:
            self._start()
        except BaseException:
            self._cleanup.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._cleanup.close()

    def _start(self) -> None:
        cleanup, options = self._cleanup, self.options
        self.moto = cleanup.enter_context(MotoServer(log_path=self.logs / "moto.log", port=self.port))
        self.apis = _api_endpoints(options, cleanup, self.out)
        self.client = _client_factory(self.moto.url)
        self.stack = deploy_stack(
            self.client,
            self.template,
            stack_name=STACK_NAME,
            parameters=_stack_parameters(self.template, options, self.apis),
            region=REGION,
        )
        # The keys go where a deployed stack keeps them: the functions read them from the secret.
        keys = {name: value for api in self.apis.values() for name, value in api.keys.items()}
        self.client("secretsmanager").put_secret_value(
            SecretId=self.stack.outputs["ProviderKeysSecretName"], SecretString=json.dumps(keys)
        )
        env = {
            **FAKE_CREDENTIALS,
            "AWS_ENDPOINT_URL": self.moto.url,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "POWERTOOLS_TRACE_DISABLED": "true",  # no X-Ray daemon here
        }
        self.chaos = Chaos.parse(options.chaos) if options.chaos else Chaos()
        chaos_env = {**CHAOS_TIMING, "IMAGEPIPE_CHAOS_CRASH_AFTER_CALL": str(self.chaos.crash_after_call)}
        self.functions = {
            logical_id: cleanup.enter_context(
                closing(
                    ProcessFunction(
                        fn,
                        concurrency=_concurrency_for(self.stack, logical_id, options),
                        env_overrides={
                            **env,
                            **(chaos_env if options.chaos and logical_id == GENERATOR else {}),
                        },
                        log_path=self.logs / f"{logical_id}.log",
                        region=REGION,
                    )
                )
            )
            for logical_id, fn in self.stack.functions.items()
        }
        self.sqs = self.client("sqs")
        self.notifications = S3Notifications(
            self.client("s3"), self.sqs, self.stack.s3_triggers, self.functions
        )
        self.notifications.setup()
        self.rules = EventBridgeRules(
            self.client("events"),
            self.sqs,
            self.functions,
            {fn.name: logical_id for logical_id, fn in self.stack.functions.items()},
        )
        self.rules.setup()
        # The stack's own events ("ImageJob Completed"), for `imagepipe up` to show and tests to count.
        self.completions_queue = self.rules.tap("imagepipe-local-completions", {"source": ["imagepipe"]})
        self.pollers = [
            SqsPoller(
                self.client("sqs"),
                mapping,
                self.functions[mapping.function],
                region=REGION,
                batch_size=options.batch_size if mapping.function == GENERATOR else None,
                concurrency=_concurrency_for(self.stack, mapping.function, options),
                retry_delay_s=options.retry_delay_s,
                chaos=self.chaos if mapping.function == GENERATOR else None,
            )
            for mapping in self.stack.queue_mappings
        ]
        for poller in self.pollers:
            poller.start()
            cleanup.callback(poller.stop)
        self.state = JobState(_resource("dynamodb", self.moto.url).Table(self.stack.outputs["JobsTableName"]))

    def pump(self) -> list[Delivery]:
        """Deliver pending S3 events to their function (Lambda's asynchronous invocation, with its
        retries); raise RuntimeFailure if the splitter kept failing or a poller stopped."""
        deliveries = self.notifications.poll_once() + self.rules.poll_once()
        for delivery in deliveries:
            if delivery.error:
                raise RuntimeFailure(f"{delivery.function} failed 3 times on an event: {delivery.error}")
        for poller in self.pollers:
            if poller.stats.fatal:
                raise RuntimeFailure(f"the queue poller stopped: {poller.stats.fatal}")
        return deliveries

    def completions(self) -> list[dict]:
        """ "ImageJob Completed" events published since the last call."""
        found = []
        while messages := self.sqs.receive_message(
            QueueUrl=self.completions_queue, MaxNumberOfMessages=10, WaitTimeSeconds=0
        ).get("Messages", []):
            for message in messages:
                found.append(json.loads(message["Body"]))
                self.sqs.delete_message(
                    QueueUrl=self.completions_queue, ReceiptHandle=message["ReceiptHandle"]
                )
        return found

    @property
    def retried(self) -> int:
        return sum(p.stats.returned for p in self.pollers)

    def drained(self) -> bool:
        """No task can still arrive: a received message stays 'not visible' until it is deleted or
        returned, so empty counters mean nothing is waiting, in flight or due for a retry."""
        for mapping in self.stack.queue_mappings:
            attrs = self.sqs.get_queue_attributes(
                QueueUrl=mapping.queue_url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                    "ApproximateNumberOfMessagesDelayed",
                ],
            )["Attributes"]
            if any(int(v) for v in attrs.values()):
                return False
        return True

    def write_stats(self, path: Path, rows: int, events: list[dict] | None = None) -> None:
        """What the run cost in Lambda time and API calls (what `make bench` reports), what the chaos did,
        and the completion events the stack published."""
        stats = {
            "rows": rows,
            "completion_events": [e.get("detail") for e in events or []],
            "dead_letter_queue": int(
                self.sqs.get_queue_attributes(
                    QueueUrl=self.stack.outputs["TasksDeadLetterQueueUrl"],
                    AttributeNames=["ApproximateNumberOfMessages"],
                )["Attributes"]["ApproximateNumberOfMessages"]
            ),
            "chaos": {
                "spec": str(self.chaos),
                "redelivered": sum(p.stats.redelivered for p in self.pollers),
                "throttled": sum(p.stats.throttled for p in self.pollers),
                "acks_lost": sum(p.stats.acks_lost for p in self.pollers),
                "invocations_failed": sum(fn.failures for fn in self.functions.values()),
            },
            "functions": {
                name: {"invocations": fn.invocations, "billed_seconds": round(fn.billed_s, 3)}
                for name, fn in self.functions.items()
            },
            "emulators": {
                name: api.emulator.stats() for name, api in self.apis.items() if api.emulator is not None
            },
        }
        for api in stats["emulators"].values():  # per-prompt counters, apart: what each prompt was billed
            api["paid_by_prompt"] = {k[5:]: api.pop(k) for k in [k for k in api if k.startswith("paid:")]}
            for key in [k for k in api if ":" in k]:
                del api[key]
        path.write_text(json.dumps(stats, indent=2), encoding="utf-8")


def _check_range(template: Template, parameter: str, flag: str, value: int) -> None:
    spec = template.parameter(parameter)
    low, high = int(spec.get("MinValue", 1)), int(spec.get("MaxValue", 10**6))
    if not low <= value <= high:
        raise RuntimeSetupError(
            f"{flag} must be between {low} and {high} ({parameter} in template.yaml), got {value}"
        )


def _stack_parameters(template: Template, options: StackOptions, apis: dict[str, _Api]) -> dict[str, str]:
    params = {
        "DefaultProvider": options.provider,
        "DefaultModel": options.model or "",
        "AtlasCloudBaseUrl": apis["atlascloud"].base_url,
        "QianfanBaseUrl": apis["qianfan"].base_url,
        "OpenAIBaseUrl": apis["openai"].base_url,
        "BaiduBaseUrl": apis["baidu-oauth"].base_url,
    }
    if options.batch_size is not None:
        _check_range(template, "GeneratorBatchSize", "--batch-size", options.batch_size)
        params["GeneratorBatchSize"] = str(options.batch_size)
    if options.concurrency is not None:
        _check_range(template, "GeneratorMaxConcurrency", "--concurrency", options.concurrency)
        params["GeneratorMaxConcurrency"] = str(options.concurrency)
    if options.max_attempts is not None:
        _check_range(template, "TaskMaxReceiveCount", "--max-attempts", options.max_attempts)
        params["TaskMaxReceiveCount"] = str(options.max_attempts)
    return params


@dataclass
class _Api:
    base_url: str
    keys: dict[str, str]
    emulator: BaseEmulator | None = None


def _api_endpoints(options: StackOptions, cleanup: ExitStack, out: TextIO) -> dict[str, _Api]:
    """Each provider's API: --api-url for the chosen provider; else its public URL when its keys are in
    the environment; else its built-in emulator (which a file with a provider column may also use)."""
    apis: dict[str, _Api] = {}
    for name in PROVIDER_NAMES:
        cls = provider_class(name)
        env_keys = {key: os.environ.get(key, "") for key in cls.key_names}
        has_keys = all(env_keys.values())
        if name == options.provider and options.api_url:
            if not has_keys:
                raise RuntimeSetupError(
                    f"set {' and '.join(cls.key_names)} to call {name} at {options.api_url}"
                )
            apis[name] = _Api(options.api_url.rstrip("/"), env_keys)
        elif has_keys:
            apis[name] = _Api(cls.public_url, env_keys)
        faults = options.emulator_faults if name == options.provider else []
        if name not in apis:
            emulator = emulator_class(name)
            config = EmulatorConfig(
                latency_ms=options.emulator_latency_ms,
                faults=tuple(parse_fault(f, emulator.FAULTS) for f in faults),
            )
            running = cleanup.enter_context(emulator(config))
            apis[name] = _Api(running.base_url, dict(running.keys), running)
        api = apis[name]
        if api.emulator is not None:
            extra = f", faults: {', '.join(faults)}" if faults else ""
            what = (
                f"the built-in {emulator.title} EMULATOR at {api.base_url} (not the real API; "
                f"{options.emulator_latency_ms:g} ms per image{extra})"
            )
        else:
            what = f"{api.base_url} (keys from {', '.join(cls.key_names)})"
        default = " (the default)" if name == options.provider else ""
        print(f"image API {name}{default}: {what}", file=out)
    return apis


def _client_factory(endpoint: str) -> Callable[[str], Any]:
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    )
    config = Config(max_pool_connections=64, retries={"mode": "standard", "max_attempts": 5})
    return lambda name: session.client(name, endpoint_url=endpoint, config=config)


def _resource(name: str, endpoint: str) -> Any:
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    )
    return session.resource(name, endpoint_url=endpoint)


def _concurrency_for(stack: LocalStack, logical_id: str, options: StackOptions) -> int:
    for mapping in stack.queue_mappings:
        if mapping.function == logical_id:
            if logical_id == GENERATOR:
                return options.concurrency or mapping.max_concurrency
            return min(mapping.max_concurrency, 2)  # the finisher: one job at a time is plenty locally
    return 1  # S3-triggered: one file, one invocation at a time is plenty locally
