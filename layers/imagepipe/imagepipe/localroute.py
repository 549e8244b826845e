"""Which rows go to the local route (ComfyUI on the user's own GPU, through the agent) and what a local
task carries: the routing rule, the column combinations, and where a row's input images are.

The cloud APIs take no input image and no workflow, so a row with either goes to the local route, as does
a row that says `backend=local`. An image is read only from the stack's input bucket - a path relative to
the input file's folder, or an s3:// URI naming that bucket - so a row can never make the agent fetch a
URL (no SSRF) or read another bucket with the agent's credentials."""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any

from imagepipe.contract import BACKENDS, IMAGE_COLUMNS, LOCAL_PROVIDER, WORKFLOW_PATTERN

LOCAL_COLUMNS = (*IMAGE_COLUMNS, "controlnet", "workflow", "backend")
ROUTE_OFF = (
    "this row needs the local ComfyUI route; deploy with HybridMode=enabled (or run locally with --comfyui)"
)
MAX_KEY_BYTES = 1024  # S3's limit on a key


class LocalRowRejected(ValueError):
    """The row cannot go to the local route; the message says why (rows.to_task makes it a RowRejected)."""


@dataclass(frozen=True)
class LocalRoute:
    """The local route as one input file sees it: whether the stack has it, the stack's input bucket, and
    the input file's folder in that bucket (None: the file is elsewhere, so a relative path means nothing)."""

    enabled: bool = False
    bucket: str = ""
    folder: str | None = None

    def for_file(self, bucket: str, key: str) -> LocalRoute:
        folder = posixpath.dirname(key) if bucket == self.bucket else None
        return LocalRoute(self.enabled, self.bucket, folder)


def backend_of(given: dict[str, str]) -> str:
    """ "cloud" or "local" by the routing rule, from the row's LOCAL_COLUMNS (stripped text, "" if absent);
    LocalRowRejected for a row that asks for both."""
    chosen = given.get("backend", "").lower()
    if chosen and chosen not in BACKENDS:
        raise LocalRowRejected(f"the backend {chosen!r} is not one of {', '.join(BACKENDS)}")
    local_only = [name for name in (*IMAGE_COLUMNS, "workflow") if given.get(name)]
    if chosen == "cloud" and local_only:
        raise LocalRowRejected(
            f"backend=cloud cannot take {' or '.join(local_only)}: the cloud APIs take no input images or "
            "workflows; use backend=local or leave the backend column empty"
        )
    return "local" if chosen == "local" or local_only else "cloud"


def requested_backend(values: dict[str, Any]) -> str:
    """The route a row asked for, for the record of a row rejected before it became a task: never raises."""
    given = {name: value.strip() for name in LOCAL_COLUMNS if isinstance(value := values.get(name), str)}
    try:
        return backend_of(given)
    except LocalRowRejected:
        return "local" if given.get("backend", "").lower() != "cloud" else "cloud"


def local_fields(
    given: dict[str, str], provider: str, extra: dict[str, Any], route: LocalRoute
) -> dict[str, Any]:
    """The ImageTask fields of a local row (its provider is LOCAL_PROVIDER): backend, workflow, images (s3:// URIs), controlnet, and the
    row's `extra` columns for the workflow's placeholders."""
    if not route.enabled:
        raise LocalRowRejected(ROUTE_OFF)
    if provider and provider != LOCAL_PROVIDER:
        raise LocalRowRejected(
            f"the provider {provider!r} is a cloud API, but this row goes to the local ComfyUI route: leave "
            f"the provider empty (or {LOCAL_PROVIDER!r})"
        )
    workflow = given.get("workflow", "")
    if workflow and not re.match(WORKFLOW_PATTERN, workflow):
        raise LocalRowRejected(
            f"the workflow {workflow!r} is not a workflow name (up to 100 letters, digits, _ and -, e.g. inpaint)"
        )
    images = {name: _image(given.get(name, ""), name, route) for name in IMAGE_COLUMNS}
    controlnet = given.get("controlnet", "")
    if images["mask_image"] and not images["init_image"]:
        raise LocalRowRejected("a mask_image needs an init_image (the image to inpaint)")
    if bool(images["control_image"]) != bool(controlnet):
        raise LocalRowRejected(
            "control_image and controlnet come together: give both (e.g. controlnet=canny)"
        )
    return {
        "backend": "local",
        "workflow": workflow or None,
        "controlnet": controlnet or None,
        "columns": {name: _placeholder(value) for name, value in extra.items() if name and value is not None},
        **{name: uri or None for name, uri in images.items()},
    }


def _image(value: str, name: str, route: LocalRoute) -> str:
    """The s3:// URI of an image column's file in the input bucket ("" when the column is empty)."""
    if not value:
        return ""
    if value.startswith("s3://"):
        bucket, _, key = value.removeprefix("s3://").partition("/")
        if bucket != route.bucket or not key:
            raise LocalRowRejected(
                f"the {name} {value!r} is not a file in the stack's input bucket ({route.bucket}): only files "
                "there are read; no URLs are fetched"
            )
    elif "://" in value or value.lower().startswith(("http:", "https:", "file:", "data:")):
        raise LocalRowRejected(
            f"the {name} {value!r} is not a file in the input bucket: give a path relative to the input file "
            f"or s3://{route.bucket}/<key>; no URLs are fetched"
        )
    elif value.startswith("/"):
        raise LocalRowRejected(
            f"the {name} {value!r} starts with '/': give a path relative to the input file"
        )
    elif route.folder is None:
        raise LocalRowRejected(
            f"the {name} {value!r} is a relative path, but this input file is not in the input bucket: "
            f"give s3://{route.bucket}/<key>"
        )
    else:
        key = posixpath.normpath(posixpath.join(route.folder, value))
        if key == ".." or key.startswith("../") or key == ".":
            raise LocalRowRejected(f"the {name} {value!r} leads outside the input bucket")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise LocalRowRejected(f"the {name} is longer than S3's {MAX_KEY_BYTES:,}-byte key limit")
    return f"s3://{route.bucket}/{key}"


def _placeholder(value: Any) -> str:
    # A workflow's placeholders are filled with text; numbers and JSON values keep their JSON spelling.
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
