"""`imagepipe destroy` on the stack from template.yaml (moto): versioned buckets holding a job's files are
emptied and the stack is deleted; nothing happens without a confirmation."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from conftest import EXAMPLES

STACK = "imagepipe-local"


def test_destroy_empties_the_versioned_buckets_and_deletes_the_stack(pipeline, cli):
    # Given a stack that ran a job (images, results) and whose input file was overwritten and deleted,
    # leaving old versions and a delete marker behind
    job = pipeline.split("inbox/prompts.csv", (EXAMPLES / "prompts.csv").read_bytes())
    pipeline.results(job["job_id"])
    s3 = pipeline.client("s3")
    s3.put_object(Bucket=pipeline.input_bucket, Key="inbox/prompts.csv", Body=b"id,prompt\n1,again\n")
    s3.delete_object(Bucket=pipeline.input_bucket, Key="inbox/prompts.csv")
    versions = s3.list_object_versions(Bucket=pipeline.input_bucket)
    assert versions.get("DeleteMarkers") and len(versions["Versions"]) >= 2

    # When the user destroys it
    code, out, err = cli("destroy", "--stack", STACK, "--yes")

    # Then both buckets are gone with everything in them, and so is the stack
    assert code == 0, err
    assert f"stack {STACK} deleted" in out and "delete-secret" in out
    for bucket in (pipeline.input_bucket, pipeline.output_bucket):
        assert f"emptied {bucket}" in out
        with pytest.raises(ClientError):
            s3.head_bucket(Bucket=bucket)
    stacks = pipeline.client("cloudformation").list_stacks()["StackSummaries"]
    assert {s["StackStatus"] for s in stacks if s["StackName"] == STACK} == {"DELETE_COMPLETE"}


def test_destroy_without_a_confirmation_deletes_nothing(pipeline, cli):
    pipeline.split("inbox/prompts.csv", (EXAMPLES / "prompts.csv").read_bytes())

    code, _, err = cli("destroy", "--stack", STACK, stdin="")  # not a terminal

    assert code == 2 and "pass --yes" in err
    assert pipeline.client("s3").list_objects_v2(Bucket=pipeline.input_bucket)["KeyCount"] == 1
    (stack,) = pipeline.client("cloudformation").describe_stacks(StackName=STACK)["Stacks"]
    assert stack["StackStatus"].endswith("COMPLETE") and not stack["StackStatus"].startswith("DELETE")
