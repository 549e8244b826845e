"""Reading an input file (CSV or JSONL) row by row, as a stream, and turning each row into a task or a rejection."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from imagepipe.contract import (
    DEFAULT_SIDE,
    MAX_IMAGES_PER_ROW,
    MAX_PROMPT_CHARS,
    MAX_ROW_ID_CHARS,
    MAX_SIDE,
    MIN_SIDE,
    PROVIDER_NAMES,
    RESERVED_PARAMS,
    SIDE_STEP,
    ImageTask,
)

KNOWN_COLUMNS = (
    "id",
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "n",
    "provider",
    "model",
    "seed",
    "steps",
    "guidance",
    "params",
)
FORMATS = {".csv": "csv", ".jsonl": "jsonl"}
# A prompt is at most 4,000 characters; a field far larger than that is rejected, not a crash.
csv.field_size_limit(1_000_000)


class InputUnreadable(Exception):
    """The file as a whole cannot be read (no header, no prompt column, unknown format)."""


class RowRejected(Exception):
    """This row cannot become a task; the message says why, in words a user can act on."""


@dataclass(frozen=True)
class RawRow:
    number: int  # 1-based data row, header excluded
    values: dict[str, Any] | None  # None when the row could not be parsed at all
    problem: str | None = None


@dataclass
class ReadReport:
    """What the reader noticed about the file besides the rows."""

    format: str = "csv"
    ignored_columns: list[str] = field(default_factory=list)
    blank_rows: int = 0


def format_for_key(key: str) -> str:
    for suffix, fmt in FORMATS.items():
        if key.lower().endswith(suffix):
            return fmt
    raise InputUnreadable(f"unsupported file type for {key!r}: use a .csv or .jsonl file")


def split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines (ends kept) from a stream of byte chunks, holding at most one line in memory."""
    pending = b""
    for chunk in chunks:
        lines = (pending + chunk).splitlines(keepends=True)
        pending = lines.pop() if lines else b""
        yield from lines
    if pending:
        yield pending


def decode_lines(byte_lines: Iterable[bytes]) -> Iterator[str]:
    """Text lines from raw lines. Bytes that are not UTF-8 survive as lone surrogates so the
    row that holds them can be rejected, instead of the whole file failing."""
    first = True
    for raw in byte_lines:
        text = raw.decode("utf-8", errors="surrogateescape")
        if first:
            text = text.removeprefix("\ufeff")
            first = False
        yield text


def read_rows(lines: Iterable[str], fmt: str, report: ReadReport) -> Iterator[RawRow]:
    report.format = fmt
    if fmt == "csv":
        yield from _read_csv(lines, report)
    elif fmt == "jsonl":
        yield from _read_jsonl(lines, report)
    else:
        raise InputUnreadable(f"unsupported format {fmt!r}")


class _Tape:
    """The lines the CSV reader takes for the record being read, so a broken record can be
    read again from its second line (a field may span lines; an unclosed quote spans to the end)."""

    def __init__(self, lines: Iterable[str]) -> None:
        self._source = iter(lines)
        self._replay: list[str] = []
        self.taken: list[str] = []

    def __iter__(self) -> _Tape:
        return self

    def __next__(self) -> str:
        line = self._replay.pop() if self._replay else next(self._source)
        self.taken.append(line)
        return line

    def rewind_after_first(self) -> None:
        self._replay.extend(reversed(self.taken[1:]))
        self.taken = []


def _read_csv(lines: Iterable[str], report: ReadReport) -> Iterator[RawRow]:
    tape = _Tape(lines)
    # strict: a stray quote is an error on that row, not a prompt that swallows the rows after it.
    reader = csv.reader(tape, skipinitialspace=True, strict=True)
    header: list[str] | None = None
    number = 0
    while True:
        tape.taken = []
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if header is None:
                raise InputUnreadable(f"the CSV header cannot be read: {exc}") from None
            number += 1
            yield RawRow(number, None, f"the CSV row cannot be read: {exc}")
            # Only the record's first line is lost to the error; the lines it swallowed are read again.
            tape.rewind_after_first()
            reader = csv.reader(tape, skipinitialspace=True, strict=True)
            continue
        if header is None:
            if not any(value.strip() for value in fields):
                continue  # blank lines before the header
            header = [name.strip().lower() for name in fields]
            _check_header(header, report)
            continue
        if not any(value.strip() for value in fields):
            report.blank_rows += 1
            continue
        number += 1
        if len(fields) > len(header):
            yield RawRow(
                number,
                None,
                f"the row has {len(fields)} fields but the header has {len(header)} "
                "(quote prompts that contain commas)",
            )
            continue
        yield RawRow(number, dict(zip(header, fields, strict=False)))
    if header is None:
        raise InputUnreadable(
            "the file is empty: expected a header line such as id,prompt,negative_prompt,width,height"
        )


def _check_header(header: list[str], report: ReadReport) -> None:
    if "prompt" not in header:
        raise InputUnreadable(
            f"the CSV header has no 'prompt' column (found: {', '.join(header) or 'nothing'}); "
            "expected id,prompt,negative_prompt,width,height"
        )
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise InputUnreadable(f"the CSV header repeats column(s): {', '.join(duplicates)}")
    report.ignored_columns = [name for name in header if name not in KNOWN_COLUMNS]


def _read_jsonl(lines: Iterable[str], report: ReadReport) -> Iterator[RawRow]:
    number = 0
    ignored: set[str] = set()
    for line in lines:
        if not line.strip():
            report.blank_rows += 1
            continue
        number += 1
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield RawRow(number, None, f"the line is not valid JSON: {exc.msg} at column {exc.colno}")
            continue
        except (ValueError, RecursionError) as exc:  # huge integers, absurd nesting
            yield RawRow(number, None, f"the line cannot be read as JSON: {type(exc).__name__}")
            continue
        if not isinstance(value, dict):
            yield RawRow(number, None, f"the line is JSON but not an object (got {type(value).__name__})")
            continue
        ignored.update(k for k in value if k not in KNOWN_COLUMNS)
        yield RawRow(number, value)
    report.ignored_columns = sorted(ignored)


@dataclass(frozen=True)
class RowDefaults:
    """What a row without the column gets: the stack's default provider and model."""

    provider: str = "atlascloud"
    model: str | None = None


def to_task(job_id: str, row: RawRow, defaults: RowDefaults | None = None) -> ImageTask:
    """The validated task for a row, or RowRejected with the reason."""
    defaults = defaults or RowDefaults()
    if row.values is None:
        raise RowRejected(row.problem or "the row cannot be read")
    values = row.values
    for name, value in values.items():
        if isinstance(value, str) and _has_undecodable_bytes(value):
            raise RowRejected(f"the {name} is not valid UTF-8 text: save the file as UTF-8")
    row_id = _row_id(values, row.number)
    prompt = _text(values.get("prompt"), "prompt")
    if not prompt:
        raise RowRejected("the prompt is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RowRejected(f"the prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    negative = _text(values.get("negative_prompt"), "negative_prompt")
    if len(negative) > MAX_PROMPT_CHARS:
        raise RowRejected(
            f"the negative_prompt is {len(negative)} characters; the limit is {MAX_PROMPT_CHARS}"
        )
    width, height = _side(values.get("width"), "width"), _side(values.get("height"), "height")
    provider = _text(values.get("provider"), "provider").lower() or defaults.provider
    if provider not in PROVIDER_NAMES:
        raise RowRejected(f"the provider {provider!r} is not one of {', '.join(PROVIDER_NAMES)}")
    model = _text(values.get("model"), "model") or (defaults.model if provider == defaults.provider else None)
    try:
        return ImageTask(
            job_id=job_id,
            row_id=row_id,
            row_number=row.number,
            prompt=prompt,
            negative_prompt=negative,
            width=width,
            height=height,
            n=_whole(values.get("n"), "n", 1, MAX_IMAGES_PER_ROW) or 1,
            provider=provider,
            model=model or None,
            seed=_whole(values.get("seed"), "seed", 0, 2**32 - 1),
            steps=_whole(values.get("steps"), "steps", 1, 200),
            guidance=_number(values.get("guidance"), "guidance", 0, 50),
            params=_params(values.get("params")),
        )
    except ValidationError as exc:  # anything the checks above did not foresee is still this row's problem
        first = exc.errors()[0]
        raise RowRejected(f"the {'.'.join(map(str, first['loc']))} is not valid: {first['msg']}") from None


def _params(value: Any) -> dict[str, Any]:
    """The params column: a JSON object (text in a CSV, an object in JSONL) merged into the request."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise RowRejected('the params must be a JSON object, e.g. {"quality": "high"}') from None
    if not isinstance(value, dict):
        raise RowRejected('the params must be a JSON object, e.g. {"quality": "high"}')
    reserved = [key for key in RESERVED_PARAMS if key in value]
    if reserved:
        raise RowRejected(f"the params cannot set {', '.join(reserved)}: use the column of that name")
    if len(json.dumps(value)) > 16_000:
        raise RowRejected("the params are longer than 16,000 characters")
    return value


def _whole(value: Any, name: str, low: int, high: int) -> int | None:
    """An optional whole number in [low, high]; None when blank."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise RowRejected(f"the {name} {value!r} is not a whole number")
    if not low <= value <= high:
        raise RowRejected(f"the {name} {value} is out of range: use {low} to {high}")
    return value


def _number(value: Any, name: str, low: float, high: float) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise RowRejected(f"the {name} must be a number")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise RowRejected(f"the {name} {value!r} is not a number") from None
    if not low <= number <= high:  # also rejects nan
        raise RowRejected(f"the {name} {value} is out of range: use {low:g} to {high:g}")
    return number


def row_id_of(row: RawRow) -> str | None:
    """The row's id as written, for reporting a rejected row (None when there is none)."""
    if row.values is None:
        return None
    value = row.values.get("id")
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    text = str(value).strip()
    return text or None


def _row_id(values: dict[str, Any], number: int) -> str:
    if "id" not in values:
        return str(number)  # no id column: the row number is the id
    value = values["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowRejected("the id must be text or a whole number")
    text = str(value).strip()
    if not text:
        raise RowRejected("the id is empty")
    if len(text) > MAX_ROW_ID_CHARS:
        raise RowRejected(f"the id is {len(text)} characters; the limit is {MAX_ROW_ID_CHARS}")
    return text


def _text(value: Any, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowRejected(f"the {name} must be text")
    return value.strip()


def _side(value: Any, name: str) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        return DEFAULT_SIDE
    if isinstance(value, bool):
        raise RowRejected(f"the {name} must be a whole number of pixels")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()):
            raise RowRejected(f"the {name} {text!r} is not a whole number of pixels")
        value = int(text)
    if not isinstance(value, int):
        raise RowRejected(f"the {name} must be a whole number of pixels")
    if not MIN_SIDE <= value <= MAX_SIDE or value % SIDE_STEP:
        raise RowRejected(
            f"the {name} {value} is out of range: use a multiple of {SIDE_STEP} from {MIN_SIDE} to {MAX_SIDE}"
        )
    return value


def _has_undecodable_bytes(text: str) -> bool:
    # Undecodable bytes arrive as \udc80-\udcff; JSON can also spell lone surrogates out.
    return not text.isascii() and any("\ud800" <= ch <= "\udfff" for ch in text)
