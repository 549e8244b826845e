"""The splitter's side of the local route (issue 12) on the stack from template.yaml: rows with input images
or a workflow go to LocalTasksQueue when HybridMode=enabled, and are rejected with how to enable it when not."""

import json

import pytest

from imagepipe.localroute import ROUTE_OFF

HYBRID = {"HybridMode": "enabled"}
MIXED = (
    b"id,prompt,init_image,mask_image,control_image,controlnet,reference_image,workflow,style\n"
    b"plain,a cat on a table,,,,,,,oil\n"
    b"inpaint,a cat in a hat,photos/cat.png,photos/mask.png,,,,,\n"
    b"edges,a dog,,,edges/dog.png,canny,,,\n"
    b"styled,a bird,,,,,photos/bird.png,,watercolour\n"
    b"custom,a tree,,,,,,my_flow,ink\n"
)


@pytest.fixture
def hybrid(pipeline_factory):
    return pipeline_factory(parameters=HYBRID)


def test_local_rows_go_to_the_agents_queue_and_plain_rows_to_the_generators(hybrid):
    # Given a mixed file in a folder of the input bucket, on a stack with the local route
    job = hybrid.split("campaign/spring/mixed.csv", MIXED)

    # Then the plain row is on TasksQueue, the four others on LocalTasksQueue
    cloud = [json.loads(m["Body"]) for m in hybrid.queued_messages()]
    local_queue = hybrid.stack.outputs["LocalTasksQueueUrl"]
    local = {t["row_id"]: t for t in (json.loads(m["Body"]) for m in hybrid.queued_messages(local_queue))}
    assert [t["row_id"] for t in cloud] == ["plain"] and "backend" not in cloud[0]  # cloud: the default
    assert sorted(local) == ["custom", "edges", "inpaint", "styled"]
    assert {t["provider"] for t in local.values()} == {"comfyui"}

    # And each image is an s3:// URI of the input bucket, relative to the file's folder
    folder = f"s3://{hybrid.input_bucket}/campaign/spring"
    assert (local["inpaint"]["init_image"], local["inpaint"]["mask_image"]) == (
        f"{folder}/photos/cat.png",
        f"{folder}/photos/mask.png",
    )
    assert (local["edges"]["control_image"], local["edges"]["controlnet"]) == (
        f"{folder}/edges/dog.png",
        "canny",
    )
    assert local["styled"]["columns"] == {"style": "watercolour"}
    assert (local["custom"]["workflow"], local["custom"]["columns"]) == ("my_flow", {"style": "ink"})

    # And the job counts the local rows like any other
    assert (job["rows"], job["queued"], job["rejected"]) == (5, 5, 0)
    assert hybrid.job(job["job_id"])["queued"] == 5
    backends = {row.id: row.backend for row in hybrid.split_rows(job["job_id"])}
    assert backends == {
        "plain": "cloud",
        "inpaint": "local",
        "edges": "local",
        "styled": "local",
        "custom": "local",
    }


def test_without_the_local_route_its_rows_are_rejected_saying_how_to_enable_it(pipeline):
    job = pipeline.split("campaign/mixed.csv", MIXED)

    rows = {row.id: row for row in pipeline.split_rows(job["job_id"])}
    assert rows["plain"].status == "queued"
    assert {rows[i].error["message"] for i in ("inpaint", "edges", "styled", "custom")} == {ROUTE_OFF}
    assert {rows[i].backend for i in ("inpaint", "edges", "styled", "custom")} == {"local"}
    assert (job["rows"], job["queued"], job["rejected"]) == (5, 1, 4)
    assert "LocalTasksQueueUrl" not in pipeline.stack.outputs


def test_an_image_outside_the_input_bucket_is_rejected_and_nothing_is_fetched(hybrid):
    body = (
        b"id,prompt,init_image\n"
        b"url,a cat,http://169.254.169.254/latest/meta-data/iam\n"
        b"other,a cat,s3://someone-elses-bucket/cat.png\n"
        b"escape,a cat,../../cat.png\n"
        b"ok,a cat,cat.png\n"
    )

    job = hybrid.split("campaign/images.csv", body)

    rows = {row.id: row for row in hybrid.split_rows(job["job_id"])}
    assert all("no URLs are fetched" in rows[i].error["message"] for i in ("url", "other"))
    assert "leads outside the input bucket" in rows["escape"].error["message"]
    assert rows["ok"].status == "queued"
    local = [
        json.loads(m["Body"]) for m in hybrid.queued_messages(hybrid.stack.outputs["LocalTasksQueueUrl"])
    ]
    assert [t["init_image"] for t in local] == [f"s3://{hybrid.input_bucket}/campaign/cat.png"]
