"""ComfyUI workflows for `imagepipe agent`: the shipped set (plus a user's --workflows folder), the one a row
needs, and that workflow filled with the row's values."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

SHIPPED = ("txt2img", "inpaint", "controlnet", "ipadapter")
# Columns that name an input image; the agent uploads each one and fills in the name ComfyUI gave it.
IMAGE_COLUMNS = ("init_image", "mask_image", "control_image", "reference_image")
# Placeholders filled with numbers (ComfyUI refuses "42" where an INT is wanted).
INT_VALUES = frozenset({"seed", "width", "height", "steps", "n"})
FLOAT_VALUES = frozenset({"guidance", "control_strength", "reference_weight", "denoise"})
# What a placeholder gets when the row leaves its column blank. The seed default is per row (row_values).
DEFAULTS: dict[str, Any] = {
    "negative_prompt": "",
    "width": 1024,
    "height": 1024,
    "n": 1,
    "steps": 20,
    "guidance": 7.0,
    "control_strength": 1.0,
    "reference_weight": 1.0,
    "model": "sd_xl_base_1.0.safetensors",
    "controlnet_model": "diffusers_xl_canny_full.safetensors",
}
PLACEHOLDER = re.compile(r"^\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_WORKFLOW_BYTES = 4 << 20


class WorkflowError(ValueError):
    """A workflow cannot be used (or filled for this row); the message says why in one line."""


@dataclass(frozen=True)
class Workflow:
    name: str
    graph: dict[str, Any]  # ComfyUI API format: {node_id: {"class_type", "inputs"}}
    source: str  # "shipped" or the file it came from

    def placeholders(self) -> set[str]:
        found: set[str] = set()
        for node in self.graph.values():
            for value in node["inputs"].values():
                if isinstance(value, str) and (m := PLACEHOLDER.match(value)):
                    found.add(m.group(1))
        return found


def parse_workflow(text: str | bytes, name: str, source: str) -> Workflow:
    """One API-format workflow; a UI-format file (what ComfyUI's plain Save writes) is refused."""
    try:
        graph = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WorkflowError(f"workflow {name!r} ({source}) is not JSON: {exc}") from None
    if not isinstance(graph, dict) or not graph:
        raise WorkflowError(f"workflow {name!r} ({source}) is not a JSON object of nodes")
    if "nodes" in graph or "links" in graph:
        raise WorkflowError(
            f"workflow {name!r} ({source}) is in ComfyUI's UI format (it has 'nodes'/'links'): "
            "export it with Workflow > Export (API) instead"
        )
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise WorkflowError(f"workflow {name!r} ({source}): node {node_id!r} has no class_type")
        if not isinstance(node.get("inputs", {}), dict):
            raise WorkflowError(
                f"workflow {name!r} ({source}): node {node_id!r} has inputs that are not an object"
            )
        node.setdefault("inputs", {})
    if not any(node["class_type"] == "SaveImage" for node in graph.values()):
        raise WorkflowError(
            f"workflow {name!r} ({source}) has no SaveImage node: the agent collects only saved images"
        )
    return Workflow(name, graph, source)


class WorkflowSet:
    """The shipped workflows, with DIR/<name>.json from a --workflows folder added or replacing by name.
    Every file is read and checked here, so a bad one stops the agent at start, not at its thousandth row."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self._workflows: dict[str, Workflow] = {}
        shipped = resources.files("imagepipe_cli.workflows")
        for name in SHIPPED:
            self._workflows[name] = parse_workflow(
                shipped.joinpath(f"{name}.json").read_bytes(), name, "shipped"
            )
        if directory is not None:
            folder = Path(directory)
            if not folder.is_dir():
                raise WorkflowError(f"--workflows {folder}: not a folder")
            for path in sorted(folder.glob("*.json")):
                if not NAME.match(path.stem):
                    raise WorkflowError(
                        f"{path}: a workflow's file name may hold only letters, digits, '_', '-', '.'"
                    )
                if path.stat().st_size > MAX_WORKFLOW_BYTES:
                    raise WorkflowError(f"{path}: over {MAX_WORKFLOW_BYTES >> 20} MiB, not a workflow")
                self._workflows[path.stem] = parse_workflow(path.read_bytes(), path.stem, str(path))

    def names(self) -> list[str]:
        return sorted(self._workflows)

    def get(self, name: str) -> Workflow:
        if name not in self._workflows:
            raise WorkflowError(f"no workflow named {name!r}: the agent has {', '.join(self.names())}")
        return self._workflows[name]


def choose_workflow(fields: Mapping[str, Any]) -> str:
    """The workflow a row needs: the one its `workflow` column names, else the one its image columns call for."""

    def given(column: str) -> bool:
        value = fields.get(column)
        return value is not None and str(value).strip() != ""

    if given("workflow"):
        return str(fields["workflow"]).strip()
    if given("init_image") and given("mask_image"):
        return "inpaint"
    if given("init_image") or given("mask_image"):
        missing = "mask_image" if given("init_image") else "init_image"
        raise WorkflowError(f"inpainting needs both init_image and mask_image; this row has no {missing}")
    if given("control_image"):
        return "controlnet"
    if given("reference_image"):
        return "ipadapter"
    return "txt2img"


def row_values(
    job_id: str, row_id: str, fields: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """Placeholder values for one row: the defaults, then the row's non-blank columns. A row without a seed gets
    one made from its job and id, so running it again draws the same picture."""
    digest = hashlib.sha256(f"{job_id}\n{row_id}".encode("utf-8", "surrogatepass")).digest()
    values: dict[str, Any] = {**DEFAULTS, "seed": int.from_bytes(digest[:4], "big"), **defaults}
    for key, value in fields.items():
        if value is not None and not (isinstance(value, str) and not value.strip()):
            values[key] = value
    return values


def _typed(name: str, value: Any) -> Any:
    try:
        if name in INT_VALUES:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, bool) or not float(number).is_integer():
                raise ValueError
            return int(number)
        if name in FLOAT_VALUES:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
    except (TypeError, ValueError):
        kind = "a whole number" if name in INT_VALUES else "a number"
        raise WorkflowError(f"{name} must be {kind}, not {value!r}") from None
    return value if isinstance(value, str) else str(value)


def fill(workflow: Workflow, values: Mapping[str, Any], filename_prefix: str) -> dict[str, Any]:
    """A copy of the workflow with every "{{name}}" input set from values (numbers typed) and every SaveImage
    writing under filename_prefix. A placeholder with no value is an error naming it."""
    graph = copy.deepcopy(workflow.graph)
    for node in graph.values():
        inputs = node["inputs"]
        for key, value in inputs.items():
            if not isinstance(value, str) or not (m := PLACEHOLDER.match(value)):
                continue
            name = m.group(1)
            if values.get(name) is None:
                raise WorkflowError(
                    f"workflow {workflow.name!r} needs {{{{{name}}}}}, which this row does not give"
                )
            inputs[key] = _typed(name, values[name])
        if node["class_type"] == "SaveImage":
            inputs["filename_prefix"] = filename_prefix
    return graph
