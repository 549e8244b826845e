"""The agent's work loop: local tasks from the stack's LocalTasksQueue, run on ComfyUI one per slot, their
images written to the output bucket and their outcomes sent to LocalOutcomesQueue, where the stack records
them. A task is deleted only after its outcome is sent, so a crash at any point means a redelivery, and a
redelivery finds its earlier ComfyUI run by prompt_id instead of running it twice."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from pydantic import ValidationError

from imagepipe.contract import MAX_IMAGES_PER_ROW, ImageTask, LocalOutcome
from imagepipe.jobstate import SUCCEEDED
from imagepipe.layout import JobLayout
from imagepipe_cli.agent.comfyui import ComfyClient, ComfyUnavailable
from imagepipe_cli.agent.inputs import row_request
from imagepipe_cli.agent.outcomes import Outcome
from imagepipe_cli.agent.runner import RunSettings, prompt_id_for, run_row, unusable_workflows
from imagepipe_cli.agent.workflows import WorkflowSet


@dataclass(frozen=True)
class Endpoints:
    """What the agent uses of the stack (its Outputs): two queues and two buckets."""

    tasks_queue_url: str
    outcomes_queue_url: str
    input_bucket: str
    output_bucket: str


DEFAULT_VISIBILITY_S = 300  # LocalTasksQueue's in template.yaml


@dataclass(frozen=True)
class AgentSettings:
    concurrency: int = 1  # tasks at once: ComfyUI runs one prompt at a time, more only queue there
    receive_wait_s: int = 10  # SQS long poll; also how long a stop may wait for an idle slot
    # A running task stays invisible this long past its last extension; None: the queue's VisibilityTimeout
    # (the template's, which is also how soon a dead agent's task returns).
    visibility_s: int | None = None
    grace_s: float = 30.0  # on stop: how long a running task may finish before it is interrupted and released
    run: RunSettings = field(default_factory=RunSettings)


@dataclass
class AgentStats:
    received: int = 0
    succeeded: int = 0
    failed: int = 0
    released: int = 0  # handed back to the queue (ComfyUI away, or the agent stopping)


class _Stopping(Exception):
    """The agent was stopped while it waited."""


@dataclass
class _Slot:
    """One task in flight: what the heartbeat extends and what a stop interrupts and releases."""

    receipt: str
    prompt_id: str
    abandoned: bool = False


class Agent:
    def __init__(
        self,
        sqs: Any,
        s3: Any,
        endpoints: Endpoints,
        comfyui_url: str,
        workflows: WorkflowSet,
        settings: AgentSettings | None = None,
        out: TextIO | None = None,
        notices: TextIO | None = None,
    ) -> None:
        """out: every line the agent says; notices (when it runs inside `imagepipe run`/`up`, whose log is
        out): also the lines a user must see - ComfyUI unreachable, a workflow that cannot run."""
        self.sqs, self.s3, self.endpoints, self.workflows = sqs, s3, endpoints, workflows
        self.notices = notices
        self.settings = settings or AgentSettings()
        self.comfyui_url, self.out = comfyui_url, out
        self.stats = AgentStats()
        self.visibility_s = self.settings.visibility_s or DEFAULT_VISIBILITY_S  # the queue's, once read
        self.ready = threading.Event()  # ComfyUI answered and the workflows were checked
        self._stopping = threading.Event()  # no new task
        self._stopped = threading.Event()  # nothing runs any more
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {}
        self._threads: list[threading.Thread] = []

    def say(self, line: str, notice: bool = False) -> None:
        with self._lock:
            for stream in {self.out, self.notices if notice else None} - {None}:
                print(f"agent: {line}", file=stream, flush=True)

    # ---- lifecycle

    def start(self) -> Agent:
        self._spawn(self._main, "agent")
        return self

    def stopping(self) -> None:
        """Take no new task from now on (stop() waits for the running ones)."""
        self._stopping.set()

    def stop(self, grace_s: float | None = None) -> None:
        """Take no new task; let running ones finish for up to grace_s, then interrupt them on ComfyUI and
        hand their messages back to the queue."""
        self._stopping.set()
        grace = self.settings.grace_s if grace_s is None else grace_s
        end = time.monotonic() + grace
        while self._busy() and time.monotonic() < end:
            time.sleep(0.05)
        with self._lock:
            left = list(self._slots.values())
            for slot in left:
                slot.abandoned = True
        client = ComfyClient(self.comfyui_url)
        for slot in left:
            for stop in (client.interrupt, client.unqueue):
                with contextlib.suppress(ComfyUnavailable):
                    stop(slot.prompt_id)
            self._release(slot.receipt)
            self.say(f"stopping: task {slot.prompt_id} interrupted and handed back to the queue")
        client.close()
        self._stopped.set()
        for thread in self._threads:
            thread.join(timeout=self.settings.receive_wait_s + 5)

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def _busy(self) -> bool:
        with self._lock:
            return bool(self._slots)

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _main(self) -> None:
        client = ComfyClient(self.comfyui_url)
        try:
            if not self._wait_for_comfyui(client, first=True):
                return
            for problem in unusable_workflows(client, self.workflows, self.settings.run):
                self.say(f"workflow {problem} - its rows will fail until that is installed", notice=True)
        except ComfyUnavailable:
            pass  # gone again during the check: the slots wait for it before their first task
        finally:
            client.close()
        self.visibility_s = self.settings.visibility_s or self._queue_visibility()
        self.ready.set()
        self._spawn(self._heartbeat, "agent-heartbeat")
        for number in range(self.settings.concurrency):
            self._spawn(self._work, f"agent-slot-{number}", number)

    def _queue_visibility(self) -> int:
        try:
            attributes = self.sqs.get_queue_attributes(
                QueueUrl=self.endpoints.tasks_queue_url, AttributeNames=["VisibilityTimeout"]
            )["Attributes"]
            return max(3, int(attributes["VisibilityTimeout"]))
        except Exception as exc:
            self.say(f"cannot read the tasks queue's visibility timeout ({exc}): {DEFAULT_VISIBILITY_S} s")
            return DEFAULT_VISIBILITY_S

    def _wait_for_comfyui(self, client: ComfyClient, first: bool = False) -> bool:
        """True once ComfyUI answers /system_stats; False if the agent is stopped first."""
        said = False
        while not self._stopping.is_set():
            try:
                stats = client.wait_ready(5.0, max_delay=2.0, sleep=self._sleep)
            except _Stopping:
                return False
            except ComfyUnavailable as exc:
                if not said:
                    self.say(f"waiting for ComfyUI: {exc}", notice=True)
                    said = True
                continue
            version = (stats.get("system") or {}).get("comfyui_version", "?")
            if first or said:
                self.say(f"ComfyUI {version} at {client.base_url} is ready", notice=said)
            return True
        return False

    def _sleep(self, seconds: float) -> None:
        if self._stopping.wait(seconds):
            raise _Stopping

    # ---- the slots

    def _work(self, number: int) -> None:
        client = ComfyClient(self.comfyui_url)
        try:
            while not self._stopping.is_set():
                messages = self._receive()
                for message in messages:
                    if self._stopping.is_set():
                        self._release(message["ReceiptHandle"])
                        continue
                    try:
                        outcome = self._handle(number, client, message)
                    except Exception as exc:  # AWS refused or failed: the message comes back by itself
                        self.say(f"task left for a later delivery: {type(exc).__name__}: {exc}")
                        outcome = None
                    finally:
                        with self._lock:
                            self._slots.pop(number, None)
                    if outcome is not None and outcome.retry_later:
                        self._wait_for_comfyui(client)
        finally:
            client.close()

    def _receive(self) -> list[dict[str, Any]]:
        try:
            return self.sqs.receive_message(
                QueueUrl=self.endpoints.tasks_queue_url,
                MaxNumberOfMessages=1,
                WaitTimeSeconds=self.settings.receive_wait_s,
                VisibilityTimeout=self.visibility_s,
            ).get("Messages", [])
        except Exception as exc:
            self.say(f"cannot receive from the tasks queue: {exc}")
            self._stopping.wait(self.settings.receive_wait_s)
            return []

    def _handle(self, number: int, client: ComfyClient, message: dict[str, Any]) -> Outcome | None:
        receipt = message["ReceiptHandle"]
        self._count("received")
        try:
            task = ImageTask.model_validate_json(message["Body"])
        except ValidationError as exc:
            # Not a task this agent can read (a newer stack's?): it goes to the dead-letter queue in time.
            self.say(f"a message that is not a local task was left in the queue: {exc.errors()[0]['msg']}")
            return None
        if task.backend != "local":
            self.say(f"row {task.row_number} of job {task.job_id} is not a local task: left in the queue")
            return None
        with self._lock:
            self._slots[number] = _Slot(receipt, prompt_id_for(task.job_id, task.row_id))
        request = row_request(task, self.s3, self.endpoints.input_bucket, client, self.workflows)
        outcome = (
            request
            if isinstance(request, Outcome)
            else run_row(client, self.workflows, request, self.settings.run)
        )
        with self._lock:
            if self._slots[number].abandoned:  # stop() interrupted and released it
                return None
        if outcome.retry_later:
            self._release(receipt)
            self._count("released")
            self.say(f"row {task.row_number} of job {task.job_id} back to the queue: {outcome.reason}")
            return outcome
        keys = self._write_images(task, outcome) if outcome.status == SUCCEEDED else []
        self._send_outcome(task, outcome, keys)
        self.sqs.delete_message(QueueUrl=self.endpoints.tasks_queue_url, ReceiptHandle=receipt)
        self._count("succeeded" if outcome.status == SUCCEEDED else "failed")
        what = f"{len(keys)} image(s)" if keys else f"failed: {outcome.reason}"
        self.say(f"row {task.row_number} of job {task.job_id} ({outcome.workflow or '-'}): {what}")
        return outcome

    def _write_images(self, task: ImageTask, outcome: Outcome) -> list[str]:
        layout = JobLayout(task.job_id)
        keys = []
        for index, data in enumerate(outcome.images[:MAX_IMAGES_PER_ROW]):
            key = layout.image_key(task.image_name, index, "png")
            self.s3.put_object(
                Bucket=self.endpoints.output_bucket, Key=key, Body=data, ContentType="image/png"
            )
            keys.append(key)
        return keys

    def _send_outcome(self, task: ImageTask, outcome: Outcome, keys: list[str]) -> None:
        body = LocalOutcome(
            job_id=task.job_id,
            row_id=task.row_id,
            row_number=task.row_number,
            status="succeeded" if outcome.status == SUCCEEDED else "failed",
            images=keys,
            reason=outcome.reason
            or (None if outcome.status == SUCCEEDED else outcome.error_type or "failed"),
            error_type=outcome.error_type or None,
            prompt_id=outcome.prompt_id or None,
            workflow=outcome.workflow or None,
            gpu_seconds=outcome.gpu_seconds or 0,
        )
        self.sqs.send_message(QueueUrl=self.endpoints.outcomes_queue_url, MessageBody=body.model_dump_json())

    def _release(self, receipt: str) -> None:
        """Visible again at once, for this agent once ComfyUI is back or for another agent now."""
        try:
            self.sqs.change_message_visibility(
                QueueUrl=self.endpoints.tasks_queue_url, ReceiptHandle=receipt, VisibilityTimeout=0
            )
        except Exception as exc:  # it comes back when its visibility timeout ends anyway
            self.say(f"could not hand a task back to the queue: {exc}")

    def _heartbeat(self) -> None:
        """Every third of the visibility timeout, each running task's timeout starts again."""
        period = self.visibility_s / 3
        while not self._stopped.wait(period):
            with self._lock:
                receipts = [slot.receipt for slot in self._slots.values() if not slot.abandoned]
            for receipt in receipts:
                try:
                    self.sqs.change_message_visibility(
                        QueueUrl=self.endpoints.tasks_queue_url,
                        ReceiptHandle=receipt,
                        VisibilityTimeout=self.visibility_s,
                    )
                except Exception as exc:
                    self.say(f"could not extend a running task's visibility: {exc}")
