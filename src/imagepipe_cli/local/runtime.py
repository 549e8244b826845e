"""The local stack, running: moto server on loopback, the stack that template.yaml declares, the image
APIs (emulators unless real ones are configured), the functions in their own processes and Lambda's
event sources - what `imagepipe run` uses for one job and `imagepipe up` keeps up for any client."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import ExitStack, closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import boto3
from botocore.config import Config

from imagepipe.contract import DEFAULT_PROVIDER, PROVIDER_NAMES
from imagepipe.jobstate import JobState
from imagepipe.providers import provider_class
from imagepipe_cli.agent.loop import Agent
from imagepipe_cli.emulators import BaseEmulator, EmulatorConfig, emulator_class
from imagepipe_cli.emulators.base import parse_fault
from imagepipe_cli.emulators.comfyui import ComfyUIEmulator
from imagepipe_cli.local.event_sources import Chaos, Delivery, EventBridgeRules, S3Notifications, SqsPoller
from imagepipe_cli.local.hybrid import hybrid_parameters, start_agent
from imagepipe_cli.local.lambda_runtime import ProcessFunction
from imagepipe_cli.local.moto_server import MotoServer
from imagepipe_cli.local.stack import LocalStack, deploy_stack
from imagepipe_cli.local.template import (
    ParameterError,
    Template,
    check_parameter,
    parse_overrides,
    samconfig_overrides,
)

REGION = "us-east-1"
STACK_NAME = "imagepipe-local"
GENERATOR = "ImageGeneratorFunction"
# Lambda's SQS pollers long-poll (up to 20 s): a message is picked up as soon as it is sent, and an
# empty queue costs no stream of receives.
LONG_POLL_S = 20
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@dataclass
class StackOptions:
    """How the local stack is set up: the same for `imagepipe run` and `imagepipe up`."""

    template: Path = Path("template.yaml")
    provider: str | None = None  # None: DefaultProvider from the overrides, samconfig.toml or the template
    api_url: str | None = None
    live: bool = False  # providers whose keys are in the environment are called on their public APIs (paid)
    model: str | None = None
    concurrency: int | None = None
    batch_size: int | None = None
    emulator_latency_ms: float = 50.0
    emulator_faults: list[str] = field(default_factory=list)
    visibility_timeout_s: int | None = (
        None  # every queue's VisibilityTimeout, shortened (None: the template's)
    )
    chaos: str = ""  # e.g. "redeliver=0.2,crash-after-call=0.05,ddb-conflict=0.05" (see Chaos)
    max_attempts: int | None = None  # the stack's TaskMaxAttempts
    parameter_overrides: list[str] = field(default_factory=list)  # K=V, as `sam deploy --parameter-overrides`
    config_env: str = "default"  # samconfig.toml's [<env>.deploy.parameters] parameter_overrides
    # The local route (HybridMode=enabled, the agent beside the generator): with --comfyui, for a file with
    # local rows (hybrid), or when the parameters enable it; ComfyUI is the built-in emulator without --comfyui.
    comfyui: str | None = None
    workflows: Path | None = None
    hybrid: bool = False


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
        self.agent: Agent | None = None
        self.comfyui_emulator: ComfyUIEmulator | None = None

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
        cleanup = self._cleanup
        parameters = stack_parameters(self.template, self.options)
        if self.options.comfyui or self.options.hybrid:
            parameters = {**parameters, **hybrid_parameters(self.template)}
        # The provider the stack defaults to, wherever it was set (flag, overrides, samconfig.toml, template).
        self.options = options = replace(
            self.options, provider=parameters.get("DefaultProvider", DEFAULT_PROVIDER)
        )
        self.moto = cleanup.enter_context(MotoServer(log_path=self.logs / "moto.log", port=self.port))
        self.apis = _api_endpoints(options, cleanup, self.out)
        self.client = _client_factory(self.moto.url)
        self.stack = deploy_stack(
            self.client,
            self.template,
            stack_name=STACK_NAME,
            parameters={**parameters, **_api_parameters(self.apis)},
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
        chaos_env = {"IMAGEPIPE_CHAOS_CRASH_AFTER_CALL": str(self.chaos.crash_after_call)}
        self.functions = {
            logical_id: cleanup.enter_context(
                closing(
                    ProcessFunction(
                        fn,
                        concurrency=_concurrency_for(self.stack, logical_id, options),
                        env_overrides={
                            **env,
                            **(chaos_env if self.chaos.crash_after_call and logical_id == GENERATOR else {}),
                        },
                        log_path=self.logs / f"{logical_id}.log",
                        region=REGION,
                    )
                )
            )
            for logical_id, fn in self.stack.functions.items()
        }
        self.sqs = self.client("sqs")
        if options.visibility_timeout_s is not None:
            self._shorten_visibility(options.visibility_timeout_s)
        self.notifications = S3Notifications(
            self.client("s3"), self.sqs, self.stack.s3_triggers, self.functions
        )
        self.notifications.setup()
        self.rules = EventBridgeRules(
            self.client("events"),
            self.sqs,
            self.functions,
            {fn.name: logical_id for logical_id, fn in self.stack.functions.items()},
            REGION,
        )
        self.rules.setup()
        for schedule in self.rules.schedules:
            print(
                f"schedule: rule {schedule.rule} fires every {schedule.period_s:g} s (EventBridge, played locally)",
                file=self.out,
            )
        self.rules.start_schedules()
        cleanup.callback(self.rules.stop_schedules)
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
                wait_s=LONG_POLL_S,
                chaos=self.chaos if mapping.function == GENERATOR else None,
            )
            for mapping in self.stack.queue_mappings
        ]
        for poller in self.pollers:
            poller.start()
            cleanup.callback(poller.stop)
        # S3 and EventBridge events reach their functions as they arrive, as on AWS (see AsyncInvocations).
        for source in (self.notifications, self.rules):
            source.start(LONG_POLL_S)
            cleanup.callback(source.stop)
        cleanup.callback(self._stop_polling)
        if parameters.get("HybridMode") == "enabled":
            self.agent = start_agent(self, cleanup)
        self.state = JobState(_resource("dynamodb", self.moto.url).Table(self.stack.outputs["JobsTableName"]))
        # AWS's faults only now that the stack is deployed and set up: they are the run's, not the set-up's.
        if self.chaos.aws_spec():
            self.moto.set_chaos({**self.chaos.aws_spec(), "seed": self.chaos.seed})
        if str(self.chaos):
            print(f"chaos: {self.chaos} (see `imagepipe run --help`)", file=self.out)

    def _stop_polling(self) -> None:
        """Before the pollers are joined: none starts another receive, and those waiting answer now."""
        for poller in self.pollers:
            poller.stopping()
        self.notifications.stopping()
        self.rules.stopping()
        self.moto.stop_long_polls()

    def _shorten_visibility(self, seconds: int) -> None:
        """--visibility-timeout: every queue of the stack alike (the one allowed shortcut), said in the header."""
        queues = set(self.template.resources_of_type("AWS::SQS::Queue"))
        resources = self.client("cloudformation").describe_stack_resources(StackName=STACK_NAME)[
            "StackResources"
        ]
        names = [
            r["PhysicalResourceId"].rstrip("/").rsplit("/", 1)[-1]
            for r in resources
            if r.get("LogicalResourceId") in queues
        ]
        original: dict[str, int] = {}
        for name in names:
            url = self.sqs.get_queue_url(QueueName=name)["QueueUrl"]
            attributes = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["VisibilityTimeout"])
            original[url] = int(attributes["Attributes"]["VisibilityTimeout"])
            self.sqs.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": str(seconds)})
        tasks = next((m.queue_url for m in self.stack.queue_mappings if m.function == GENERATOR), "")
        waits = f"{original[tasks]} s on the tasks queue" if tasks in original else ""
        if original:
            waits += (
                f" ({min(original.values())}-{max(original.values())} s across its {len(original)} queues)"
            )
        print(
            f"queues: visibility timeout shortened to {seconds} s (--visibility-timeout); AWS waits {waits.strip()}",
            file=self.out,
        )

    def _agent_stats(self) -> dict[str, Any] | None:
        """The agent's tasks, and the prompts the built-in ComfyUI ran (how many times each: once)."""
        if self.agent is None:
            return None
        stats: dict[str, Any] = dict(vars(self.agent.stats))
        if self.comfyui_emulator is not None:
            counters = self.comfyui_emulator.stats()
            stats["comfyui_emulator"] = {k: v for k, v in counters.items() if ":" not in k}
        return stats

    def pump(self) -> list[Delivery]:
        """The S3 and EventBridge events delivered to their functions since the last call (Lambda's
        asynchronous invocation, with its retries); raise RuntimeFailure if the splitter kept failing or a
        poller stopped."""
        deliveries = self.notifications.poll_once() + self.rules.poll_once()
        for delivery in deliveries:
            if delivery.error:
                raise RuntimeFailure(f"{delivery.function} failed 3 times on an event: {delivery.error}")
        reason = self.stopped()
        if reason:
            raise RuntimeFailure(reason)
        return deliveries

    def stopped(self) -> str | None:
        """Why the runtime can run nothing more (an event delivery thread or a queue poller stopped), if so."""
        for source in (self.notifications, self.rules):
            if source.fatal:
                return f"the event deliveries stopped: {source.fatal}"
        for poller in self.pollers:
            if poller.stats.fatal:
                return f"the queue poller stopped: {poller.stats.fatal}"
        return None

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
        local = [self.stack.outputs["LocalTasksQueueUrl"]] if self.agent is not None else []
        for queue_url in [*(m.queue_url for m in self.stack.queue_mappings), *local]:
            attrs = self.sqs.get_queue_attributes(
                QueueUrl=queue_url,
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
                "deletes_failed": sum(p.stats.deletes_failed for p in self.pollers),
                "invocations_failed": sum(fn.failures for fn in self.functions.values()),
                "invocations_timed_out": sum(fn.timeouts for fn in self.functions.values()),
                # injected by the moto server, by kind (ddb-conflict, ddb-throttle, stale-read, s3-error, sqs-error)
                **self.moto.chaos_injected(),
            },
            "functions": {
                name: {
                    "invocations": fn.invocations,
                    "billed_seconds": round(fn.billed_s, 3),  # init phases included
                    "init_seconds": round(fn.init_s, 3),
                    "timed_out": fn.timeouts,
                    "cold_starts": fn.cold_starts,
                }
                for name, fn in self.functions.items()
            },
            "emulators": {
                name: api.emulator.stats() for name, api in self.apis.items() if api.emulator is not None
            },
            "agent": self._agent_stats(),
        }
        for api in stats["emulators"].values():  # per-prompt counters, apart: what each prompt was billed
            api["paid_by_prompt"] = {k[5:]: api.pop(k) for k in [k for k in api if k.startswith("paid:")]}
            for key in [k for k in api if ":" in k]:
                del api[key]
        path.write_text(json.dumps(stats, indent=2), encoding="utf-8")


def stack_parameters(template: Template, options: StackOptions) -> dict[str, str]:
    """The stack's parameters as `sam deploy` would pass them: explicit flags (--provider, --model,
    --concurrency, --batch-size, --max-attempts) over --parameter-overrides over samconfig.toml's
    parameter_overrides (--config-env) over the template's defaults; each checked as CloudFormation checks it.
    The API base URLs are set last, by the runtime (`_api_parameters`)."""
    try:
        values = {
            name: str(spec["Default"])
            for name, spec in template.body.get("Parameters", {}).items()
            if "Default" in spec
        }
        samconfig = template.base_dir / "samconfig.toml"
        given = [
            (
                f"{samconfig.name} [{options.config_env}.deploy.parameters]",
                samconfig_overrides(samconfig, options.config_env),
            ),
            ("--parameter-overrides", parse_overrides(options.parameter_overrides, "--parameter-overrides")),
        ]
        flags = {
            "--provider": ("DefaultProvider", options.provider),
            "--model": ("DefaultModel", options.model),
            "--batch-size": ("GeneratorBatchSize", options.batch_size),
            "--concurrency": ("GeneratorMaxConcurrency", options.concurrency),
            "--max-attempts": (_max_attempts_parameter(template), options.max_attempts),
        }
        given.extend((flag, {name: str(value)}) for flag, (name, value) in flags.items() if value is not None)
        for source, overrides in given:
            for name, value in overrides.items():
                check_parameter(template, name, value, source)
                values[name] = value
    except ParameterError as exc:
        raise RuntimeSetupError(str(exc)) from None
    return values


def _max_attempts_parameter(template: Template) -> str:
    """--max-attempts sets TaskMaxAttempts (attempts for transient errors); a template without it: the
    older TaskMaxReceiveCount."""
    return "TaskMaxAttempts" if template.parameter("TaskMaxAttempts") else "TaskMaxReceiveCount"


def _api_parameters(apis: dict[str, _Api]) -> dict[str, str]:
    """Each provider's base URL: the emulator's, --api-url's or the public one - always the runtime's."""
    return {
        "AtlasCloudBaseUrl": apis["atlascloud"].base_url,
        "QianfanBaseUrl": apis["qianfan"].base_url,
        "OpenAIBaseUrl": apis["openai"].base_url,
        "BaiduBaseUrl": apis["baidu-oauth"].base_url,
    }


@dataclass
class _Api:
    base_url: str
    keys: dict[str, str]
    emulator: BaseEmulator | None = None


def _api_endpoints(options: StackOptions, cleanup: ExitStack, out: TextIO) -> dict[str, _Api]:
    """Each provider's API: --api-url for the chosen provider; else, with --live, its public URL when its
    keys are in the environment; else its built-in emulator (which a file with a provider column may also
    use). Keys in the environment alone never make a run pay: a demo stays on the emulators."""
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
        elif has_keys and options.live:
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
            ignored = (
                f"; {' and '.join(cls.key_names)} set but not used: --live calls the real API"
                if has_keys
                else ""
            )
            what = (
                f"the built-in {emulator.title} EMULATOR at {api.base_url} (not the real API; "
                f"{options.emulator_latency_ms:g} ms per image{extra}{ignored})"
            )
        else:
            what = f"the REAL API at {api.base_url}, which charges (keys from {', '.join(cls.key_names)})"
        default = " (the default)" if name == options.provider else ""
        print(f"image API {name}{default}: {what}", file=out)
    return apis


def _client_factory(endpoint: str) -> Callable[[str], Any]:
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    )
    config = Config(max_pool_connections=64, retries={"mode": "standard", "max_attempts": 8})
    return lambda name: session.client(name, endpoint_url=endpoint, config=config)


def _resource(name: str, endpoint: str) -> Any:
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    )
    config = Config(retries={"mode": "standard", "max_attempts": 8})  # the CLI sees --chaos too
    return session.resource(name, endpoint_url=endpoint, config=config)


def _concurrency_for(stack: LocalStack, logical_id: str, options: StackOptions) -> int:
    for mapping in stack.queue_mappings:
        if mapping.function == logical_id:
            if logical_id == GENERATOR:
                return options.concurrency or mapping.max_concurrency
            return min(mapping.max_concurrency, 2)  # the finisher: one job at a time is plenty locally
    return 1  # S3-triggered: one file, one invocation at a time is plenty locally
