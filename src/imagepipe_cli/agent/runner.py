"""One row on ComfyUI, end to end: choose and fill its workflow, upload its images, queue it under a prompt_id
made from job and row (a redelivered row finds its earlier run instead of running twice), wait, fetch the saved
images. The agent loop calls run_row once per task and records the Outcome it returns."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from imagepipe.contract import safe_name
from imagepipe.jobstate import SUCCEEDED
from imagepipe_cli.agent.comfyui import ComfyClient, ComfyUnavailable, OutputMissing, PromptRejected
from imagepipe_cli.agent.events import Events
from imagepipe_cli.agent.outcomes import Outcome, failed, read_history, retry_later
from imagepipe_cli.agent.waiting import wait_for
from imagepipe_cli.agent.workflows import (
    IMAGE_COLUMNS,
    Workflow,
    WorkflowError,
    WorkflowSet,
    choose_workflow,
    fill,
    row_values,
)

# Fixed forever: prompt ids made with it must come out the same in every agent version.
PROMPT_NAMESPACE = uuid.UUID("6f1d2c4e-9a1b-5c3d-8e7f-0a1b2c3d4e5f")


def prompt_id_for(job_id: str, row_id: str) -> str:
    """The ComfyUI prompt_id of a row: the same on every delivery of its task, different for every row."""
    return str(uuid.uuid5(PROMPT_NAMESPACE, f"{job_id}\n{row_id}"))


@dataclass(frozen=True)
class RowRequest:
    job_id: str
    row_id: str
    fields: Mapping[str, Any]  # the row's columns: prompt, width, seed, workflow, init_image, ...
    images: Mapping[str, bytes] = field(default_factory=dict)  # image column -> the image's bytes


@dataclass(frozen=True)
class RunSettings:
    timeout_s: float = 900.0  # the row's hard limit, queueing included
    poll_s: float = 2.0  # /history at least this often, whatever the WebSocket says
    ready_s: float = 30.0  # how long ComfyUI may be away mid-prompt before the row is handed back
    oom_retries: int = 1  # out-of-memory runs retried after /free
    folder: str = "imagepipe"  # input/<folder>/<job>/ for uploads, output/<folder>/<job>/ for images
    defaults: Mapping[str, Any] = field(default_factory=dict)  # placeholder defaults (model, steps, ...)


def _extension(data: bytes) -> str:
    if data.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".png"


class _RowRun:
    def __init__(
        self, client: ComfyClient, workflows: WorkflowSet, row: RowRequest, settings: RunSettings
    ) -> None:
        self.client, self.workflows, self.row, self.settings = client, workflows, row, settings
        self.prompt_id = prompt_id_for(row.job_id, row.row_id)
        self.started = time.monotonic()
        self.deadline = self.started + settings.timeout_s
        self.workflow_name = ""
        self.runs = 0
        self.gpu_seconds: float | None = None

    def prepare(self, workflow: Workflow) -> dict[str, Any] | Outcome:
        """The filled workflow, its images uploaded; or why it cannot run here (found before any upload)."""
        row, name = self.row, safe_name(self.row.row_id)
        values = row_values(row.job_id, row.row_id, row.fields, self.settings.defaults)
        for column in {*IMAGE_COLUMNS, *row.images}:
            values.pop(column, None)  # a column's text (an S3 key) is not a name ComfyUI knows
        uploads = sorted(workflow.placeholders() & set(row.images))
        subfolder, prefix = (
            f"{self.settings.folder}/{row.job_id}",
            f"{self.settings.folder}/{row.job_id}/{name}",
        )
        try:
            # Checked with stand-in image names first: a row ComfyUI cannot run uploads nothing.
            probe = fill(workflow, {**values, **dict.fromkeys(uploads, "upload")}, prefix)
            if missing := self.client.missing(probe):
                return failed(*missing)
            for column in uploads:
                data = row.images[column]
                values[column] = self.client.upload_image(
                    data, f"{name}-{column}{_extension(data)}", subfolder
                )
            return fill(workflow, values, prefix)
        except WorkflowError as exc:
            return failed("bad_row", str(exc))
        except PromptRejected as exc:
            return failed(exc.error_type, exc.reason)

    def queue(self, workflow: Workflow) -> Outcome | None:
        graph = self.prepare(workflow)
        if isinstance(graph, Outcome):
            return graph
        try:
            self.client.submit(graph, self.prompt_id)
        except PromptRejected as exc:
            return failed(exc.error_type, exc.reason)
        self.runs += 1
        return None

    def give_up(self) -> Outcome:
        for stop in (self.client.interrupt, self.client.unqueue):
            with contextlib.suppress(ComfyUnavailable):
                stop(self.prompt_id)
        return failed(
            "timeout", f"ComfyUI did not finish the row in {self.settings.timeout_s:g} s (interrupted)"
        )

    def collect(self, images: list[dict[str, Any]]) -> Outcome:
        if not images:
            return failed("no_images", "the workflow ran but saved no images (SaveImage got nothing)")
        try:
            return Outcome(SUCCEEDED, images=tuple(self.client.view(image) for image in images))
        except OutputMissing as exc:
            return failed("output_missing", str(exc))

    def run(self) -> Outcome:
        try:
            self.workflow_name = choose_workflow(self.row.fields)
            workflow = self.workflows.get(self.workflow_name)
        except WorkflowError as exc:
            return failed("bad_workflow", str(exc))
        with Events(self.client.base_url, self.client.client_id) as events:
            # A redelivered row: its earlier run's answer stands, or its prompt is still queued; an
            # interrupted run is the exception, it is run again.
            entry = self.client.history(self.prompt_id)
            if entry is not None and read_history(entry).kind == "interrupted":
                self.client.forget(self.prompt_id)
                entry = None
            fresh = entry is None and not self.client.queued(self.prompt_id)
            if fresh and (refused := self.queue(workflow)) is not None:
                return refused
            return self.follow(workflow, events, entry)

    def follow(self, workflow: Workflow, events: Events, entry: dict[str, Any] | None) -> Outcome:
        """From a queued prompt (or its history entry) to the outcome, running it again once after an OOM."""
        oom_retries = self.settings.oom_retries
        while True:
            if entry is None:
                s = self.settings
                waited = wait_for(
                    self.client,
                    events,
                    self.prompt_id,
                    deadline=self.deadline,
                    poll_s=s.poll_s,
                    ready_s=s.ready_s,
                )
                if waited.timed_out:
                    return self.give_up()
                if waited.entry is None:
                    return retry_later("comfyui_lost", waited.lost)
                entry = waited.entry
            result = read_history(entry)
            self.gpu_seconds = result.gpu_seconds
            if result.kind == "success":
                return self.collect(result.images)
            if result.kind == "interrupted":
                return retry_later("interrupted", result.reason)
            if not (result.out_of_memory and oom_retries > 0):
                return failed("out_of_memory" if result.out_of_memory else "execution_error", result.reason)
            oom_retries -= 1
            self.client.free()
            self.client.forget(self.prompt_id)  # so the wait does not read the failed run's entry
            if (refused := self.queue(workflow)) is not None:
                return refused
            entry = None


def unusable_workflows(client: ComfyClient, workflows: WorkflowSet, settings: RunSettings) -> list[str]:
    """The workflows this ComfyUI cannot run with the default values (a node class or model file it lacks),
    one line each naming what is missing: what the agent reports once at start."""
    problems = []
    for name in workflows.names():
        workflow = workflows.get(name)
        values = row_values("check", "check", {}, settings.defaults)
        probe = {key: values.get(key, "probe") for key in workflow.placeholders()}
        try:
            missing = client.missing(fill(workflow, probe, settings.folder))
        except WorkflowError:
            continue  # a value a row must give: checked per row
        if missing:
            problems.append(f"{name} cannot run on this ComfyUI: {missing[1]}")
    return problems


def run_row(
    client: ComfyClient, workflows: WorkflowSet, row: RowRequest, settings: RunSettings | None = None
) -> Outcome:
    """Run one row on ComfyUI and say what became of it. Never raises for what ComfyUI or the row does:
    ComfyUI away -> retry later; a refused or failed workflow -> failed with ComfyUI's reason."""
    run = _RowRun(client, workflows, row, settings or RunSettings())
    try:
        outcome = run.run()
    except ComfyUnavailable as exc:
        outcome = retry_later("comfyui_unavailable", str(exc))
    return dataclasses.replace(
        outcome,
        prompt_id=run.prompt_id,
        workflow=run.workflow_name,
        runs=run.runs,
        gpu_seconds=run.gpu_seconds,
        elapsed_seconds=round(time.monotonic() - run.started, 3),
    )
