"""LocalOutcomeRecorderFunction on the stack from template.yaml (HybridMode=enabled): what the agent reports
for a local row becomes that row's result, with the generator's job bookkeeping. The agent is played here by
a few lines: take the row's task, write its image, send its LocalOutcome."""

from __future__ import annotations

import json
import re

import pytest

from imagepipe.contract import ImageTask, LocalOutcome
from imagepipe.layout import JobLayout
from imagepipe_cli.emulators.base import render_png
from imagepipe_cli.local.event_sources import SqsPoller
from imagepipe_cli.local.lambda_runtime import InlineFunction

from conftest import REGION

MIXED = b"id,prompt,init_image,mask_image\nplain,a cat on a table,,\nhat,a cat in a hat,cat.png,mask.png\n"


class Agent:
    """What `imagepipe agent` does with AWS for one task, without ComfyUI."""

    def __init__(self, pipeline) -> None:
        self.pipeline, self.sqs = pipeline, pipeline.client("sqs")
        self.tasks_url = pipeline.stack.outputs["LocalTasksQueueUrl"]
        self.outcomes_url = pipeline.stack.outputs["LocalOutcomesQueueUrl"]
        self.poller = self.poller_for(self.outcomes_url)

    def poller_for(self, queue_url: str) -> SqsPoller:
        """Lambda's poller for one of LocalOutcomeRecorderFunction's queues."""
        function = InlineFunction(self.pipeline.stack.functions["LocalOutcomeRecorderFunction"], REGION)
        mapping = next(m for m in self.pipeline.stack.queue_mappings if m.queue_url == queue_url)
        return SqsPoller(self.sqs, mapping, function, region=REGION)

    def take(self) -> dict[str, ImageTask]:
        messages = self.pipeline.queued_messages(self.tasks_url)
        for message in messages:
            self.sqs.delete_message(QueueUrl=self.tasks_url, ReceiptHandle=message["ReceiptHandle"])
        return {task.row_id: task for task in (ImageTask.model_validate_json(m["Body"]) for m in messages)}

    def succeed(self, task: ImageTask, prompt_id: str = "p-1", gpu_seconds: float = 12.5) -> LocalOutcome:
        key = JobLayout(task.job_id).image_key(task.image_name, 0, "png")
        self.pipeline.client("s3").put_object(
            Bucket=self.pipeline.output_bucket, Key=key, Body=render_png("hat", 64, 64)
        )
        return self.send(
            task,
            status="succeeded",
            images=[key],
            prompt_id=prompt_id,
            workflow="inpaint",
            gpu_seconds=gpu_seconds,
        )

    def send(self, task: ImageTask, **fields) -> LocalOutcome:
        outcome = LocalOutcome(job_id=task.job_id, row_id=task.row_id, row_number=task.row_number, **fields)
        self.sqs.send_message(QueueUrl=self.outcomes_url, MessageBody=outcome.model_dump_json())
        return outcome

    def record(self) -> None:
        """Lambda's poller for LocalOutcomesQueue, until it is empty."""
        while self.poller.poll_once():
            pass


@pytest.fixture
def hybrid(pipeline_factory):
    return pipeline_factory(parameters={"HybridMode": "enabled"})


def test_a_local_rows_outcome_is_its_result_with_its_backend_workflow_and_prompt_id(hybrid):
    # Given a mixed file: one plain row, one inpainting row for the agent
    job_id = hybrid.split("campaign/mixed.csv", MIXED)["job_id"]
    agent = Agent(hybrid)
    tasks = agent.take()

    # When the agent reports the inpainting row done
    agent.succeed(tasks["hat"], prompt_id="imagepipe-hat-1", gpu_seconds=12.5)
    agent.record()

    # Then both rows succeeded, each with its backend; the local one with its workflow, prompt id, GPU time
    results = hybrid.results(job_id)
    rows = {row.id: row for row in results.rows}
    assert results.status == "completed"
    assert (rows["plain"].status, rows["plain"].backend, rows["plain"].provider) == (
        "succeeded",
        "cloud",
        "atlascloud",
    )
    hat = rows["hat"]
    assert (hat.status, hat.backend, hat.provider, hat.workflow) == (
        "succeeded",
        "local",
        "comfyui",
        "inpaint",
    )
    assert (hat.prompt_id, hat.gpu_seconds, hat.cost, hat.images) == (
        "imagepipe-hat-1",
        12.5,
        0.0,
        ["images/hat.png"],
    )
    assert not hasattr(rows["plain"], "prompt_id")

    # And report.html carries each row's backend
    report = hybrid.client("s3").get_object(Bucket=hybrid.output_bucket, Key=f"jobs/{job_id}/report.html")
    html = report["Body"].read().decode()
    data = json.loads(re.search(r"\[\{.*\}\]", html).group(0))
    assert {(r["id"], r["backend"]) for r in data} == {("plain", "cloud"), ("hat", "local")}


def test_a_duplicate_outcome_is_not_counted_twice(hybrid):
    job_id = hybrid.split("campaign/mixed.csv", MIXED)["job_id"]
    agent = Agent(hybrid)
    hat = agent.take()["hat"]

    # When the agent's outcome arrives twice (a resend), the second saying otherwise
    agent.succeed(hat, prompt_id="first")
    agent.send(
        hat, status="failed", reason="ComfyUI said no", error_type="execution_error", prompt_id="second"
    )
    agent.record()

    # Then the row counts once, as the first outcome said
    counts = hybrid.state.counts(job_id)
    assert (counts.succeeded, counts.failed) == (1, 0)
    assert hybrid.outcome(job_id, "hat")["prompt_id"] == "first"


def test_a_failed_outcome_carries_its_reason(hybrid):
    job_id = hybrid.split("campaign/mixed.csv", MIXED)["job_id"]
    agent = Agent(hybrid)
    hat = agent.take()["hat"]

    reason = (
        "the workflow inpaint needs the node 'InpaintModelConditioning', which this ComfyUI does not have"
    )
    agent.send(
        hat, status="failed", reason=reason, error_type="missing_node", workflow="inpaint", prompt_id=None
    )
    agent.record()

    results = hybrid.results(job_id)
    rows = {row.id: row for row in results.rows}
    assert results.status == "completed_with_failures"
    assert (rows["hat"].status, rows["hat"].backend, rows["hat"].error) == (
        "failed",
        "local",
        {"type": "missing_node", "message": reason},
    )


def test_a_job_with_cloud_and_local_rows_finishes_only_when_both_are_done(hybrid):
    job_id = hybrid.split("campaign/mixed.csv", MIXED)["job_id"]
    agent = Agent(hybrid)
    hat = agent.take()["hat"]

    # When the cloud row is done but the local one is not
    hybrid.drain_all()

    # Then the job is still running
    assert hybrid.job(job_id)["status"] == "running"

    # And once the agent reports, the job finishes
    agent.succeed(hat)
    agent.record()
    hybrid.drain_all()
    assert hybrid.job(job_id)["status"] == "completed"


def test_images_that_are_not_the_rows_own_keys_fail_the_row(hybrid):
    job_id = hybrid.split("campaign/mixed.csv", MIXED)["job_id"]
    agent = Agent(hybrid)
    hat = agent.take()["hat"]

    agent.send(hat, status="succeeded", images=[f"jobs/{job_id}/images/plain.png"], prompt_id="p")
    agent.record()

    row = {row.id: row for row in hybrid.results(job_id).rows}["hat"]
    assert (row.status, row.error["type"], row.images) == ("failed", "bad_outcome", [])


def test_a_local_task_no_agent_finished_fails_its_row_so_its_job_finishes(hybrid):
    # Given a local task that went to LocalTasksDeadLetterQueue (received 10 times, never finished)
    job_id = hybrid.split("campaign/mixed.csv", MIXED)["job_id"]
    agent = Agent(hybrid)
    hat = agent.take()["hat"]
    dead_url = hybrid.stack.outputs["LocalTasksDeadLetterQueueUrl"]
    agent.sqs.send_message(QueueUrl=dead_url, MessageBody=hat.model_dump_json())

    # When Lambda's poller for that queue delivers it to the recorder
    assert agent.poller_for(dead_url).poll_once() == 1

    # Then the row failed saying so, and the job finished with the cloud row's image
    results = hybrid.results(job_id)
    rows = {row.id: row for row in results.rows}
    assert results.status == "completed_with_failures"
    assert (rows["hat"].status, rows["hat"].backend, rows["hat"].error["type"]) == (
        "failed",
        "local",
        "dead_letter",
    )
    assert "no agent finished this row" in rows["hat"].error["message"]
    assert rows["plain"].status == "succeeded"
    assert hybrid.queued_messages(dead_url) == []  # settled: not left for the alarm


def test_an_agents_late_outcome_after_its_task_was_dead_lettered_is_a_duplicate(hybrid):
    job_id = hybrid.split("campaign/mixed.csv", MIXED)["job_id"]
    agent = Agent(hybrid)
    hat = agent.take()["hat"]
    agent.send(hat, status="failed", reason="first", error_type="execution_error")
    agent.record()

    # A dead-lettered copy of the same task, after the row already has its outcome
    dead_url = hybrid.stack.outputs["LocalTasksDeadLetterQueueUrl"]
    agent.sqs.send_message(QueueUrl=dead_url, MessageBody=hat.model_dump_json())
    assert agent.poller_for(dead_url).poll_once() == 1

    assert hybrid.outcome(job_id, "hat")["error"] == {"type": "execution_error", "message": "first"}
    assert hybrid.state.counts(job_id).failed == 1
