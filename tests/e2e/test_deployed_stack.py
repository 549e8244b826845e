"""Opt-in: the same job against a deployed stack, found by its Outputs. Never runs in CI.

IMAGEPIPE_STACK=imagepipe AWS_PROFILE=... pytest tests/e2e/test_deployed_stack.py
"""

import json
import os
import time
import uuid

import boto3
import pytest

from imagepipe.jobstate import JOB_FINAL, JobState

from conftest import EXAMPLES

STACK = os.environ.get("IMAGEPIPE_STACK")
pytestmark = pytest.mark.skipif(not STACK, reason="set IMAGEPIPE_STACK to run against a deployed stack")


@pytest.fixture
def real_aws(monkeypatch):
    # conftest points everything at fake credentials; this test is the one place that must not.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_the_brief_csv_is_generated_by_the_deployed_stack(real_aws):
    outputs = {
        o["OutputKey"]: o["OutputValue"]
        for o in boto3.client("cloudformation").describe_stacks(StackName=STACK)["Stacks"][0]["Outputs"]
    }
    s3 = boto3.client("s3")
    job_id = f"e2e-{uuid.uuid4().hex[:8]}"
    s3.upload_file(
        str(EXAMPLES / "prompts.csv"), outputs["InputBucketName"], f"inbox/{job_id}.csv",
        ExtraArgs={"Metadata": {"job-id": job_id}},
    )  # fmt: skip

    state = JobState(boto3.resource("dynamodb").Table(outputs["JobsTableName"]))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        job = state.job(job_id)
        if job and job["status"] in JOB_FINAL:
            break
        time.sleep(10)
    assert job and job["status"] == "completed"
    body = s3.get_object(Bucket=outputs["OutputBucketName"], Key=f"jobs/{job_id}/results.jsonl")[
        "Body"
    ].read()
    assert [json.loads(line)["status"] for line in body.decode().splitlines()] == ["succeeded"] * 3
