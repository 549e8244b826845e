"""The agent's workflows: the shipped set, a user's --workflows folder, choosing one per row, filling it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagepipe_cli.agent.workflows import (
    SHIPPED,
    WorkflowError,
    WorkflowSet,
    choose_workflow,
    fill,
    row_values,
)
from imagepipe_cli.emulators.base import EmulatorConfig, parse_fault
from imagepipe_cli.emulators.comfyui import ComfyUIEmulator

UI_FORMAT = {
    "last_node_id": 9,
    "last_link_id": 9,
    "nodes": [{"id": 3, "type": "KSampler", "widgets_values": [42, "fixed", 20, 8, "euler", "normal", 1]}],
    "links": [[1, 4, 0, 3, 0, "MODEL"]],
    "version": 0.4,
}


def invert(prefix: str = "mine") -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "{{init_image}}"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def test_the_shipped_workflows_are_api_format_and_pass_comfyuis_validation() -> None:
    # Given the shipped workflows filled for a row, and the emulator's copy of ComfyUI's object_info
    workflows = WorkflowSet()
    assert set(SHIPPED) <= set(workflows.names())
    comfy = ComfyUIEmulator()
    for name in ("init", "mask", "control", "reference"):
        comfy.add_input_image(f"{name}.png", b"png", "imagepipe/j")
    images = {
        "init_image": "imagepipe/j/init.png",
        "mask_image": "imagepipe/j/mask.png",
        "control_image": "imagepipe/j/control.png",
        "reference_image": "imagepipe/j/reference.png",
    }
    values = {**row_values("j", "r1", {"prompt": "a lighthouse"}, {}), **images}
    verdicts = {}
    for name in SHIPPED:
        ok, error, _, node_errors = comfy.validate_prompt(fill(workflows.get(name), values, "imagepipe/j/r1"))
        verdicts[name] = (ok, (error or {}).get("type"), node_errors)
    # Then ComfyUI would queue txt2img, inpaint and controlnet as they are
    assert verdicts["txt2img"] == (True, None, {})
    assert verdicts["inpaint"] == (True, None, {})
    assert verdicts["controlnet"] == (True, None, {})
    # and so would a ComfyUI with the ComfyUI_IPAdapter_plus custom nodes the ipadapter one
    assert verdicts["ipadapter"] == (True, None, {})
    # which a bare ComfyUI lacks
    bare = ComfyUIEmulator(
        EmulatorConfig(faults=(parse_fault("missing-node=IPAdapterAdvanced", ComfyUIEmulator.FAULTS),))
    )
    ipadapter = fill(workflows.get("ipadapter"), values, "imagepipe/j/r1")
    assert bare.validate_prompt(ipadapter)[1]["type"] == "missing_node_type"


def test_placeholders_are_filled_typed_and_every_saveimage_gets_the_rows_prefix() -> None:
    workflow = WorkflowSet().get("txt2img")
    fields = {"prompt": 123, "width": "768", "height": 512.0, "seed": "42", "guidance": "6.5", "steps": 30}
    graph = fill(workflow, row_values("job", "r7", fields, {}), "imagepipe/job/r7")
    latent, sampler = graph["5"]["inputs"], graph["3"]["inputs"]
    assert latent == {"width": 768, "height": 512, "batch_size": 1}
    assert all(type(v) is int for v in latent.values())
    assert sampler["seed"] == 42 and type(sampler["seed"]) is int
    assert sampler["cfg"] == 6.5 and type(sampler["cfg"]) is float
    assert sampler["steps"] == 30
    assert graph["6"]["inputs"]["text"] == "123"  # a prompt stays text
    assert graph["7"]["inputs"]["text"] == ""  # no negative prompt: empty, not an error
    assert graph["9"]["inputs"]["filename_prefix"] == "imagepipe/job/r7"
    assert workflow.graph["5"]["inputs"]["width"] == "{{width}}"  # the loaded workflow is not changed


def test_a_row_without_a_seed_gets_the_same_seed_every_time_and_rows_differ() -> None:
    one = row_values("job", "r1", {"prompt": "x"}, {})["seed"]
    assert one == row_values("job", "r1", {"prompt": "x", "seed": ""}, {})["seed"]
    assert one != row_values("job", "r2", {"prompt": "x"}, {})["seed"]


def test_a_bad_number_and_an_unfilled_placeholder_are_errors_naming_them(tmp_path: Path) -> None:
    workflow = WorkflowSet().get("txt2img")
    with pytest.raises(WorkflowError, match=r"^width must be a whole number, not 'wide'$"):
        fill(workflow, row_values("j", "r", {"prompt": "x", "width": "wide"}, {}), "p")
    with pytest.raises(WorkflowError, match="guidance must be a number"):
        fill(workflow, row_values("j", "r", {"prompt": "x", "guidance": "lots"}, {}), "p")
    with pytest.raises(WorkflowError, match=r"needs \{\{prompt\}\}"):
        fill(workflow, row_values("j", "r", {}, {}), "p")
    styled = invert()
    styled["2"]["inputs"]["style"] = "{{style}}"
    (tmp_path / "styled.json").write_text(json.dumps(styled))
    with pytest.raises(
        WorkflowError, match=r"workflow 'styled' needs \{\{style\}\}, which this row does not give"
    ):
        fill(WorkflowSet(tmp_path).get("styled"), {"init_image": "a.png"}, "p")


def test_a_workflows_folder_adds_and_replaces_by_file_name(tmp_path: Path) -> None:
    (tmp_path / "mine.json").write_text(json.dumps(invert()))
    (tmp_path / "txt2img.json").write_text(json.dumps(invert("replaced")))
    workflows = WorkflowSet(tmp_path)
    assert "mine" in workflows.names() and "inpaint" in workflows.names()
    assert workflows.get("txt2img").source == str(tmp_path / "txt2img.json")
    assert workflows.get("inpaint").source == "shipped"
    with pytest.raises(WorkflowError, match="no workflow named 'nope': the agent has controlnet, inpaint"):
        workflows.get("nope")


def test_a_ui_format_workflow_is_refused_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "saved.json").write_text(json.dumps(UI_FORMAT))
    with pytest.raises(WorkflowError) as caught:
        WorkflowSet(tmp_path)
    message = str(caught.value)
    assert "'saved'" in message and "UI format" in message and "Export (API)" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "is not JSON"),
        ("[1, 2]", "is not a JSON object of nodes"),
        ('{"1": {"inputs": {}}}', "node '1' has no class_type"),
        ('{"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}}}', "has no SaveImage node"),
    ],
)
def test_other_unusable_workflow_files_are_refused_in_one_line(
    tmp_path: Path, content: str, expected: str
) -> None:
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(WorkflowError, match=expected):
        WorkflowSet(tmp_path)


def test_the_rows_columns_choose_the_workflow_unless_it_names_one() -> None:
    assert choose_workflow({"prompt": "x"}) == "txt2img"
    assert choose_workflow({"prompt": "x", "init_image": "a.png", "mask_image": "m.png"}) == "inpaint"
    assert choose_workflow({"prompt": "x", "control_image": "edges.png"}) == "controlnet"
    assert choose_workflow({"prompt": "x", "reference_image": "style.png"}) == "ipadapter"
    assert choose_workflow({"prompt": "x", "control_image": "", "reference_image": None}) == "txt2img"
    assert choose_workflow({"prompt": "x", "control_image": "e.png", "workflow": " mine "}) == "mine"
    with pytest.raises(WorkflowError, match="this row has no mask_image"):
        choose_workflow({"prompt": "x", "init_image": "a.png"})
