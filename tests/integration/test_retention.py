"""Job records are kept as long as the job's files: one parameter, JobRetentionDays, sets both the buckets'
lifecycle and the records' DynamoDB TTL, so `imagepipe status` and `retry` work for as long as the results
are there (they used to expire after 60 days while the files were kept 90)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT

DAY_S = 24 * 3600


def _split(pipeline) -> dict:
    job_id = pipeline.split("inbox/kept.csv", b"id,prompt\nlake,a calm lake\n", job_id="kept")["job_id"]
    pipeline.drain_all()
    return pipeline.job(job_id)


@pytest.mark.parametrize(("days", "kept_days"), [("90", 90), ("400", 400), ("7", 60)])
def test_job_records_expire_with_the_jobs_files_and_never_before_60_days(pipeline_factory, days, kept_days):
    # Given a stack whose files are kept `days` days
    pipeline = pipeline_factory(parameters={"JobRetentionDays": days})

    # When a job runs to its end
    job = _split(pipeline)

    # Then its record expires that long after it was last written (60 days at least: redeliveries
    # outlive a shorter one); the buckets' lifecycle reads the same parameter (tests/unit/test_template.py)
    assert job["status"] == "completed"
    assert abs(int(job["expires_at"]) - float(job["created_at"]) - kept_days * DAY_S) < 3600
    (outcome,) = pipeline.state.outcomes("kept")
    assert abs(int(outcome["expires_at"]) - float(job["created_at"]) - kept_days * DAY_S) < 3600


def test_files_kept_forever_keep_their_job_records_forever(pipeline_factory):
    pipeline = pipeline_factory(parameters={"JobRetentionDays": "0"})

    job = _split(pipeline)

    # DynamoDB's TTL expires only numbers: no number, no expiry
    assert job["status"] == "completed" and job.get("expires_at") is None
    assert all(o.get("expires_at") is None for o in pipeline.state.outcomes("kept"))


def test_every_function_keeps_its_records_for_the_stacks_retention():
    # A function that builds its JobState without the setting would write records that expire after the
    # default (90 days) whatever JobRetentionDays says.
    for app in sorted(Path(ROOT, "functions").glob("*/app.py")):
        text = app.read_text(encoding="utf-8")
        if "JobState(" in text:
            assert "retention_days=" in text and "job_retention_days" in text, app.parent.name
