"""Recording what the agent beside the user's ComfyUI made of a local row (a LocalOutcome from
LocalOutcomesQueue), with the job bookkeeping the generator uses: JobState.finish writes the row's outcome
and counts it in its shard in one conditional transaction, so the first outcome of a row wins and a
duplicate (the agent's resend, SQS's redelivery) changes nothing; JobState.hand_to_finisher then hands a
job whose last row this was to the finisher, exactly once.

A local task that reached LocalTasksDeadLetterQueue (no agent finished it) is recorded failed the same
way (dead_task_outcome), so its job still finishes. The agent's credentials reach no JobsTable: only this function writes there, and it takes from the
message only what the row's record needs, with the images checked to be that row's own keys."""

from __future__ import annotations

import re
from typing import Any

from imagepipe.contract import LOCAL_PROVIDER, ImageTask, LocalOutcome, safe_name
from imagepipe.jobstate import FAILED, SUCCEEDED, JobState
from imagepipe.layout import JobLayout
from imagepipe.observability import logger


def outcome_record(outcome: LocalOutcome) -> dict[str, Any]:
    """The row's outcome as JobsTable holds it: the generator's fields (cost 0: the user's own GPU; the
    request id is ComfyUI's prompt id), and the local route's own."""
    name = safe_name(outcome.row_id)
    error = None
    images = list(outcome.images)
    stray = [key for key in images if not _owned(outcome.job_id, name, key)]
    if stray:
        # Never point a row's results at another row's (or job's) files.
        error = {
            "type": "bad_outcome",
            "message": f"the agent reported images that are not this row's: {stray[:3]}",
        }
        images = []
    elif outcome.status == FAILED:
        error = {"type": outcome.error_type or "local_failed", "message": outcome.reason or ""}
    return {
        "name": name,
        "id": outcome.row_id,
        "row": outcome.row_number,
        "images": images,
        "error": error,
        "provider": LOCAL_PROVIDER,
        "model": None,
        "request_id": outcome.prompt_id,
        "cost": 0.0,
        "attempt": 1,
        "throttles": 0,
        "handbacks": 0,
        "answers_lost": 0,
        "seconds": round(outcome.gpu_seconds, 3),
        "backend": "local",
        "workflow": outcome.workflow,
        "prompt_id": outcome.prompt_id,
        "gpu_seconds": round(outcome.gpu_seconds, 3),
    }


def record_outcome(state: JobState, outcome: LocalOutcome) -> bool:
    """True when this outcome is the row's (the first one recorded); False for a duplicate, or for an
    outcome of a job this stack does not have (logged and dropped: there is nothing to count it in)."""
    log = {"job_id": outcome.job_id, "row_id": outcome.row_id, "status": outcome.status}
    if state.job(outcome.job_id) is None:
        logger.warning("local outcome for an unknown job: dropped", extra=log)
        return False
    record = outcome_record(outcome)
    status = FAILED if record["error"] else SUCCEEDED
    if not state.finish(outcome.job_id, record["name"], status, record):
        logger.info("local row already has an outcome: this one is a duplicate", extra=log)
        return False
    logger.info(
        "local row recorded", extra={**log, "prompt_id": outcome.prompt_id, "images": record["images"]}
    )
    return True


def dead_task_outcome(task: ImageTask, receives: int) -> LocalOutcome:
    """The failure recorded for a local task that reached LocalTasksDeadLetterQueue: no agent finished it
    in its deliveries. An outcome the agent sends after all is then a duplicate (the first one won)."""
    return LocalOutcome(
        job_id=task.job_id,
        row_id=task.row_id,
        row_number=task.row_number,
        status=FAILED,
        error_type="dead_letter",
        workflow=task.workflow,
        reason=(
            f"no agent finished this row in {receives} deliveries (an agent crashed on it, or ComfyUI kept "
            "going away while it ran): see the agent's log for this row"
        ),
    )


def _owned(job_id: str, name: str, key: str) -> bool:
    # JobLayout.image_key(name, i, ext): {images_prefix}{name}.png, {name}.2.png ...
    prefix = JobLayout(job_id).images_prefix + name
    return key.startswith(prefix) and re.fullmatch(r"(\.[0-9]+)?\.[a-z0-9]+", key[len(prefix) :]) is not None
