"""Uploading an input file with the images its rows name: `imagepipe run` and `submit` put each image
column's relative path at the same relative key next to the file's key, where the splitter looks for it,
and before the file, so the agent finds them when the file's rows arrive."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagepipe.contract import IMAGE_COLUMNS
from imagepipe.localroute import LOCAL_COLUMNS, LocalRowRejected, backend_of
from imagepipe.rows import InputUnreadable, ReadReport, decode_lines, format_for_key, read_rows, split_lines

READ_CHUNK = 256 * 1024


@dataclass
class InputImages:
    """What an input file asks of the local route: whether any row goes there, and the files to upload
    (bucket key relative to the file's folder -> the file here)."""

    local_rows: int = 0
    files: dict[str, Path] = field(default_factory=dict)


def input_images(path: Path) -> InputImages:
    """The local rows and referenced image files of an input file. A file that cannot be read has none:
    the splitter says what is wrong with it. A path that is not there, or leads above the input file's
    folder in the bucket, is not uploaded: its row fails or is rejected with the reason."""
    found = InputImages()
    try:
        with path.open("rb") as handle:
            chunks = iter(lambda: handle.read(READ_CHUNK), b"")
            for row in read_rows(decode_lines(split_lines(chunks)), format_for_key(path.name), ReadReport()):
                _look_at(row.values or {}, path.parent, found)
    except (InputUnreadable, OSError, UnicodeError):
        return found
    return found


def _look_at(values: dict[str, Any], folder: Path, found: InputImages) -> None:
    given = {name: str(values.get(name) or "").strip() for name in LOCAL_COLUMNS}
    try:
        local = backend_of(given) == "local"
    except LocalRowRejected:
        local = (
            True  # asks for both routes: the splitter rejects it, but only a stack with the route says why
        )
    if not local:
        return
    found.local_rows += 1
    for column in IMAGE_COLUMNS:
        value = given[column]
        if not value or "://" in value or value.startswith("/"):
            continue
        relative = posixpath.normpath(value.replace("\\", "/"))
        if relative.startswith(("../", "./")) or relative in ("..", "."):
            continue
        local_file = folder / relative
        if local_file.is_file():
            found.files[relative] = local_file


def upload_input(s3: Any, bucket: str, path: Path, key: str, extra_args: dict[str, Any]) -> InputImages:
    """The images first, then the input file (with extra_args: its metadata): the file's upload starts
    the job, and its local rows' images must be there by then."""
    images = input_images(path)
    folder = posixpath.dirname(key)
    for relative, local_file in sorted(images.files.items()):
        s3.upload_file(str(local_file), bucket, posixpath.join(folder, relative))
    s3.upload_file(str(path), bucket, key, ExtraArgs=extra_args)
    return images
