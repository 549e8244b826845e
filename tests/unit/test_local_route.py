"""Which rows go to the local ComfyUI route, and what their tasks carry (imagepipe.localroute via rows.to_task)."""

from __future__ import annotations

import pytest

from imagepipe.localroute import ROUTE_OFF, LocalRoute
from imagepipe.rows import RawRow, RowRejected, to_task

BUCKET = "imagepipe-input-123"
ON = LocalRoute(enabled=True, bucket=BUCKET).for_file(BUCKET, "campaign/spring/prompts.csv")


def task(route: LocalRoute | None = ON, **values: object):
    return to_task("job-1", RawRow(1, {"id": "1", "prompt": "a cat", **values}), route=route)


def reason(route: LocalRoute | None = ON, **values: object) -> str:
    with pytest.raises(RowRejected) as raised:
        task(route, **values)
    return str(raised.value)


def test_a_plain_row_stays_on_the_cloud_route_with_nothing_of_the_local_one():
    plain = task(style="oil")

    assert (plain.backend, plain.provider, plain.images, plain.columns) == ("cloud", "atlascloud", {}, {})


@pytest.mark.parametrize(
    "values",
    [
        {"init_image": "cat.png"},
        {"workflow": "txt2img"},
        {"backend": "LOCAL"},
        {"reference_image": "cat.png"},
    ],
    ids=["image", "workflow", "backend", "reference"],
)
def test_an_image_a_workflow_or_backend_local_sends_the_row_to_comfyui(values):
    local = task(**values)

    assert (local.backend, local.provider) == ("local", "comfyui")


def test_image_paths_are_resolved_from_the_input_files_folder_in_the_input_bucket():
    local = task(
        init_image="inpaint/cat.png",
        mask_image="../shared/mask.png",
        control_image=f"s3://{BUCKET}/edges/cat.png",
        controlnet="canny",
        style="oil",
        strength=0.5,
    )

    assert local.images == {
        "init_image": f"s3://{BUCKET}/campaign/spring/inpaint/cat.png",
        "mask_image": f"s3://{BUCKET}/campaign/shared/mask.png",
        "control_image": f"s3://{BUCKET}/edges/cat.png",
    }
    # Columns the pipeline does not know fill the workflow's placeholders (as text)
    assert (local.controlnet, local.columns) == ("canny", {"style": "oil", "strength": "0.5"})


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("https://example.com/cat.png", "no URLs are fetched"),
        ("http://169.254.169.254/latest/meta-data", "no URLs are fetched"),
        ("s3://someone-elses-bucket/cat.png", "no URLs are fetched"),
        ("../../../../cat.png", "leads outside the input bucket"),
        ("/etc/passwd", "starts with '/'"),
    ],
)
def test_an_image_anywhere_but_the_input_bucket_is_rejected(value, words):
    assert words in reason(init_image=value)


def test_a_relative_path_in_a_file_outside_the_input_bucket_asks_for_an_s3_uri():
    elsewhere = LocalRoute(enabled=True, bucket=BUCKET).for_file("imagepipe-output-123", "jobs/j/input.jsonl")

    assert f"give s3://{BUCKET}/<key>" in reason(elsewhere, init_image="cat.png")
    assert task(elsewhere, init_image=f"s3://{BUCKET}/cat.png").init_image == f"s3://{BUCKET}/cat.png"


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"mask_image": "mask.png"}, "a mask_image needs an init_image"),
        ({"control_image": "edges.png"}, "control_image and controlnet come together"),
        ({"controlnet": "canny", "backend": "local"}, "control_image and controlnet come together"),
        ({"init_image": "cat.png", "backend": "cloud"}, "backend=cloud cannot take init_image"),
        ({"workflow": "txt2img", "backend": "cloud"}, "backend=cloud cannot take workflow"),
        ({"backend": "gpu"}, "the backend 'gpu' is not one of cloud, local"),
        ({"init_image": "cat.png", "provider": "openai"}, "is a cloud API"),
        ({"workflow": "../../etc/passwd"}, "is not a workflow name"),
    ],
)
def test_columns_that_do_not_go_together_are_rejected_with_a_reason(values, words):
    assert words in reason(**values)


def test_a_local_row_on_a_stack_without_the_route_says_how_to_enable_it():
    assert reason(LocalRoute(), init_image="cat.png") == ROUTE_OFF
    assert reason(None, backend="local") == ROUTE_OFF
