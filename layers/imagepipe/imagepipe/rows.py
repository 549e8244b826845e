"""Reading an input file (CSV, JSONL or a JSON array) row by row, as a stream, and turning each row into a task
or a rejection.

Every row read from a stream knows where it ends (RawRow.end, a byte offset in the UTF-8 stream), so a split
can stop after any row and a later invocation can go on from there (imagepipe.splitter). A JSON array's rows
know it only when asked for (JsonRows.precise): finding it costs a byte-by-byte feed of the parser."""

from __future__ import annotations

import codecs
import csv
import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ijson
from pydantic import ValidationError

from imagepipe.contract import (
    DEFAULT_SIDE,
    LOCAL_PROVIDER,
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
from imagepipe.localroute import LOCAL_COLUMNS, LocalRoute, LocalRowRejected, backend_of, local_fields

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
    *LOCAL_COLUMNS,
)
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "json"}
FORMAT_LABELS = {"csv": "CSV", "jsonl": "JSONL", "json": "JSON"}
# A prompt is at most 4,000 characters; a field (a JSONL line) far larger than that is rejected, not a crash.
MAX_FIELD_CHARS = 1_000_000
csv.field_size_limit(MAX_FIELD_CHARS)
# A line longer than this is cut here (its row is rejected), so a file without line breaks cannot fill memory.
MAX_LINE_BYTES = 8 * 2**20
# The same bound for one element of a JSON array: the parser holds an element whole, so a larger one stops
# the read (a JSON array cannot be read on past an element it cannot hold).
MAX_ELEMENT_BYTES = MAX_LINE_BYTES
# Unknown column names: the first few are named (each cut short) in the job's warning, the rest counted, so
# a file with thousands of made-up columns cannot grow the job record past DynamoDB's 400 KB item limit.
MAX_NAMED_COLUMNS = 20
MAX_COLUMN_NAME_CHARS = 60
# Distinct unknown names counted at most (memory): past it the count says "more than".
MAX_COUNTED_COLUMNS = 100_000
# The id of a row that cannot be read is still reported when it can be made out and is at most this long.
MAX_REPORTED_ID_CHARS = 1000
# What is in the first bytes of a file decides how it is read: text (UTF-8, UTF-16/32) or refused as binary.
SNIFF_BYTES = 1024
# Files that are not text, known by their first bytes: what they are and what to upload instead.
_SIGNATURES = (
    (b"\x1f\x8b", "a gzip file", "upload the uncompressed {ext}"),
    (b"PK\x03\x04", "a zip file (an Excel .xlsx workbook is one)", "from Excel use Save As > CSV UTF-8"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an Excel .xls workbook", "from Excel use Save As > CSV UTF-8"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image", "upload the {ext} file of prompts"),
    (b"\xff\xd8\xff", "a JPEG image", "upload the {ext} file of prompts"),
    (b"GIF8", "a GIF image", "upload the {ext} file of prompts"),
    (b"%PDF-", "a PDF document", "upload the {ext} file of prompts"),
    (b"BZh", "a bzip2 file", "upload the uncompressed {ext}"),
    (b"\x28\xb5\x2f\xfd", "a zstd file", "upload the uncompressed {ext}"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "upload the uncompressed {ext}"),
)
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),  # before UTF-16 LE: its BOM starts the same way
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _undecodable(error: UnicodeError) -> tuple[str, int]:
    # A lone surrogate, like the ones surrogateescape leaves in UTF-8: the row holding it is rejected.
    return "\udcff", getattr(error, "end", 0)


codecs.register_error("imagepipe-undecodable", _undecodable)


class InputUnreadable(Exception):
    """The file as a whole cannot be read (no header, no prompt column, unknown format)."""


class InputBroken(InputUnreadable):
    """The file cannot be read past some point (a JSON array broken or cut short): the rows before it stand."""


class RowRejected(Exception):
    """This row cannot become a task; the message says why, in words a user can act on."""


@dataclass(frozen=True)
class RawRow:
    number: int  # 1-based data row, header excluded
    values: dict[str, Any] | None  # None when the row could not be parsed at all
    problem: str | None = None
    # A row that could not be parsed: its id as written, when that much of it could be read.
    readable_id: str | None = None
    # Where the row ends in the stream read (bytes), when known: a split can go on from there.
    end: int | None = None


@dataclass
class ReadReport:
    """What the reader noticed about the file besides the rows."""

    format: str = "csv"
    # The first MAX_NAMED_COLUMNS unknown column names (sorted, each cut to MAX_COLUMN_NAME_CHARS) ...
    ignored_columns: list[str] = field(default_factory=list)
    # ... and how many distinct unknown names there are in all (capped at MAX_COUNTED_COLUMNS).
    ignored_column_count: int = 0
    blank_rows: int = 0
    # Things noticed about the file as a whole that do not stop it (data after a JSON array's end).
    notes: list[str] = field(default_factory=list)
    # A CSV's header ends here (stream offset): a split going on mid-file reads the header from the start.
    header_end: int = 0

    def columns_warning(self) -> str | None:
        """The job's warning about unknown columns, of bounded length, or None."""
        if not self.ignored_column_count:
            return None
        text = f"extra column(s) echoed back in the results: {', '.join(self.ignored_columns)}"
        more = self.ignored_column_count - len(self.ignored_columns)
        if more > 0:
            at_least = "at least " if self.ignored_column_count >= MAX_COUNTED_COLUMNS else ""
            text += f" and {at_least}{more:,} more"
        return text


class UnknownColumns:
    """Unknown column names seen so far, in bounded memory: the first few kept, the rest counted by digest."""

    def __init__(self, named: Iterable[str] = (), seen: bytes = b"") -> None:
        self.named: list[str] = list(named)
        self._seen: set[bytes] = {seen[i : i + 16] for i in range(0, len(seen), 16)}

    def dump(self) -> tuple[list[str], bytes]:
        """What a later reader of the same file is created with (UnknownColumns(*dump)) to go on counting."""
        return list(self.named), b"".join(sorted(self._seen))

    def add(self, name: str) -> None:
        if len(self._seen) >= MAX_COUNTED_COLUMNS:
            return
        digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if digest in self._seen:
            return
        self._seen.add(digest)
        if len(self.named) < MAX_NAMED_COLUMNS:
            cut = name if len(name) <= MAX_COLUMN_NAME_CHARS else name[:MAX_COLUMN_NAME_CHARS] + "..."
            self.named.append(cut)

    def report(self, report: ReadReport) -> None:
        report.ignored_columns = sorted(self.named)
        report.ignored_column_count = len(self._seen)


def format_for_key(key: str) -> str:
    for suffix, fmt in FORMATS.items():
        if key.lower().endswith(suffix):
            return fmt
    raise InputUnreadable(f"unsupported file type for {key!r}: use a .csv, .jsonl or .json file")


def split_lines(chunks: Iterable[bytes], max_line: int | None = None) -> Iterator[bytes]:
    """Lines (ends kept) from a stream of byte chunks, holding at most one line in memory.

    With max_line, a longer line is cut to its first max_line bytes and a line end, and the rest of it
    is skipped as it arrives, so a file without line breaks is never held whole."""
    for line, _ in split_lines_at(chunks, max_line):
        yield line


def split_lines_at(chunks: Iterable[bytes], max_line: int | None = None) -> Iterator[tuple[bytes, int]]:
    """split_lines, each line with the stream offset just past its end (a cut line: past the end of all of
    it, so reading on from there starts at the next line)."""
    pending, end = b"", 0  # bytes not yet yielded; the stream offset where they start
    cut: bytes | None = None  # a long line's first max_line bytes, yielded when its end comes
    for chunk in chunks:
        lines = (pending + chunk).splitlines(keepends=True)
        # The last piece is kept back even when whole: a "\r" may be followed by the "\n" of a "\r\n".
        pending = lines.pop() if lines else b""
        for line in lines:
            end += len(line)
            if cut is not None:
                yield cut + b"\n", end
                cut = None
            else:
                yield (line if max_line is None else _cut(line, max_line)), end
        if max_line is not None and (cut is not None or len(pending.rstrip(b"\r\n")) > max_line):
            cut = pending[:max_line] if cut is None else cut
            if pending.endswith(b"\n"):
                end += len(pending)
                yield cut + b"\n", end
                cut, pending = None, b""
            else:  # the rest of the long line is dropped as it comes; a final "\r" waits for its "\n"
                keep = pending[-1:] if pending.endswith(b"\r") else b""
                end += len(pending) - len(keep)
                pending = keep
    if pending or cut is not None:
        end += len(pending)
        if cut is not None:
            yield cut + b"\n", end
        else:
            yield (pending if max_line is None else _cut(pending, max_line)), end


def _cut(line: bytes, max_line: int) -> bytes:
    body = line.rstrip(b"\r\n")
    return line if len(body) <= max_line else body[:max_line] + b"\n"


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


def text_lines(chunks: Iterable[bytes], fmt: str) -> Iterator[str]:
    """The text lines of a file's bytes, as the splitter reads them: UTF-8 (with or without a BOM), or
    UTF-16/UTF-32 with a BOM, or UTF-16 without one (known by its NUL bytes), recoded to UTF-8. A file
    that is not text (gzip, xlsx, an image ...) is InputUnreadable before any row is read."""
    _, stream = utf8_stream(chunks, fmt)
    for line, _ in text_lines_at(stream):
        yield line


def utf8_stream(
    chunks: Iterable[bytes], fmt: str, encoding: str | None = None
) -> tuple[str, Iterator[bytes]]:
    """The file's encoding (sniffed from its first bytes unless given) and its bytes as UTF-8: what does not
    decode becomes a lone surrogate, so its row is rejected. InputUnreadable for a file that is not text."""
    source = iter(chunks)
    head = b""
    if encoding is None:
        for chunk in source:
            head += chunk
            if len(head) >= SNIFF_BYTES:
                break
        encoding = _sniff(head, fmt)
    stream: Iterator[bytes] = itertools.chain([head], source)
    if encoding != "utf-8":
        stream = _recode(stream, encoding)
    return encoding, stream


def text_lines_at(utf8: Iterable[bytes]) -> Iterator[tuple[str, int]]:
    """Text lines of a UTF-8 stream, each with the stream offset past its end (long lines cut)."""
    lines = split_lines_at(utf8, MAX_LINE_BYTES)
    ends: list[int] = []

    def bare() -> Iterator[bytes]:
        for line, end in lines:
            ends.append(end)
            yield line

    for text in decode_lines(bare()):
        yield text, ends.pop()


def _sniff(head: bytes, fmt: str) -> str:
    """The encoding of a file from its first bytes, or InputUnreadable saying what the file is instead."""
    label, ext = FORMAT_LABELS.get(fmt, fmt), f".{fmt}"
    head = head[:SNIFF_BYTES]
    for signature, what, advice in _SIGNATURES:
        if head.startswith(signature):
            raise InputUnreadable(f"this is {what}, not a {label} file: {advice.format(ext=ext)}")
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding
    # UTF-16 without a BOM: the header is ASCII, so every other byte is NUL.
    sample = head[: min(len(head), 64) // 2 * 2]
    pairs = len(sample) // 2
    if pairs >= 4:
        for encoding, text, nul in (
            ("utf-16-le", sample[0::2], sample[1::2]),
            ("utf-16-be", sample[1::2], sample[0::2]),
        ):
            if nul.count(0) >= pairs * 3 // 4 and text.count(0) == 0:
                return encoding
    controls = sum(1 for byte in head if byte < 0x20 and byte not in b"\t\n\x0b\x0c\r")
    if controls >= max(16, len(head) // 20):
        raise InputUnreadable(
            f"this is not a {label} file: its first {len(head)} bytes hold {controls} control bytes "
            f"(such as NUL) that text does not have. Save the prompts as UTF-8 text and upload the {ext}"
        )
    return "utf-8"


def _recode(chunks: Iterable[bytes], encoding: str) -> Iterator[bytes]:
    """UTF-16/32 as UTF-8 bytes; what does not decode becomes a lone surrogate, so its row is rejected."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="imagepipe-undecodable")
    for chunk in chunks:
        yield decoder.decode(chunk).encode("utf-8", "surrogatepass")
    yield decoder.decode(b"", final=True).encode("utf-8", "surrogatepass")


Line = str | tuple[str, int]  # a text line, or one with its end offset (text_lines_at)


def read_rows(
    lines: Iterable[Line],
    fmt: str,
    report: ReadReport,
    *,
    first_number: int = 0,
    unknown: UnknownColumns | None = None,
) -> Iterator[RawRow]:
    """The rows of a file's text lines. `first_number`: rows before these (a split going on mid-file);
    `unknown`: the JSONL keys not known, seen before it."""
    report.format = fmt
    if fmt == "csv":
        yield from _read_csv(lines, report, first_number)
    elif fmt == "jsonl":
        yield from _read_jsonl(lines, report, first_number, unknown or UnknownColumns())
    elif fmt == "json":
        data = (
            (line if isinstance(line, str) else line[0]).encode("utf-8", "surrogatepass") for line in lines
        )
        yield from JsonRows(data, report, first_number=first_number, unknown=unknown)
    else:
        raise InputUnreadable(f"unsupported format {fmt!r}")


def _line(item: Line) -> tuple[str, int | None]:
    return (item, None) if isinstance(item, str) else item


class _Tape:
    """The lines the CSV reader takes for the record being read, so a broken record can be
    read again from its second line (a field may span lines; an unclosed quote spans to the end)."""

    def __init__(self, lines: Iterable[Line]) -> None:
        self._source = iter(lines)
        self._replay: list[tuple[str, int | None]] = []
        self._taken: list[tuple[str, int | None]] = []
        self.end: int | None = None  # where the last line taken ends

    def __iter__(self) -> _Tape:
        return self

    def __next__(self) -> str:
        line = self._replay.pop() if self._replay else _line(next(self._source))
        self._taken.append(line)
        self.end = line[1]
        return line[0]

    @property
    def taken(self) -> list[str]:
        return [text for text, _ in self._taken]

    def new_record(self) -> None:
        self._taken = []

    def rewind_after_first(self) -> None:
        """Only the record's first line is used up (its end is where the record ends)."""
        if self._taken:
            self.end = self._taken[0][1]
        self._replay.extend(reversed(self._taken[1:]))
        self._taken = []


def _read_csv(lines: Iterable[Line], report: ReadReport, number: int = 0) -> Iterator[RawRow]:
    tape = _Tape(lines)
    # strict: a stray quote is an error on that row, not a prompt that swallows the rows after it.
    reader = csv.reader(tape, skipinitialspace=True, strict=True)
    header: list[str] | None = None
    id_column: int | None = None
    while True:
        tape.new_record()
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if header is None:
                _check_not_jsonl(tape.taken)
                raise InputUnreadable(f"the CSV header cannot be read: {_csv_problem(exc)}") from None
            number += 1
            first = tape.taken[0] if tape.taken else ""
            # Only the record's first line is lost to the error; the lines it swallowed are read again.
            tape.rewind_after_first()
            yield RawRow(
                number,
                None,
                f"the CSV row cannot be read: {_csv_problem(exc)}",
                _csv_id(first, id_column),
                end=tape.end,
            )
            reader = csv.reader(tape, skipinitialspace=True, strict=True)
            continue
        if header is None:
            if not any(value.strip() for value in fields):
                continue  # blank lines before the header
            header = [name.strip().lower() for name in fields]
            if "prompt" not in header:
                _check_not_jsonl(tape.taken)
            _check_header(header, report)
            id_column = header.index("id") if "id" in header else None
            report.header_end = tape.end or 0
            continue
        if not any(value.strip() for value in fields):
            report.blank_rows += 1
            continue
        number += 1
        if len(fields) > len(header) and any(value.strip() for value in fields[len(header) :]):
            yield RawRow(
                number,
                None,
                f"the row has {len(fields)} fields but the header has {len(header)} "
                "(quote prompts that contain commas)",
                _readable_id(fields[id_column]) if id_column is not None else None,
                end=tape.end,
            )
            continue
        # Columns without a name (the trailing commas a spreadsheet leaves) are not read.
        values = {name: value for name, value in zip(header, fields, strict=False) if name}
        yield RawRow(number, values, end=tape.end)
    if header is None:
        raise InputUnreadable(
            "the file is empty: expected a header line such as id,prompt,negative_prompt,width,height"
        )


def _csv_problem(exc: csv.Error) -> str:
    """The csv module's complaint in words a user can act on."""
    text = str(exc)
    if "field larger than field limit" in text:
        return (
            f"a field is longer than {MAX_FIELD_CHARS:,} characters (a prompt may have at most "
            f'{MAX_PROMPT_CHARS}), or a quote (") is left open'
        )
    if "unexpected end of data" in text:
        return 'a quote (") is opened and never closed'
    if "expected after" in text:
        return (
            'a quote (") ends in the middle of a field: quote the whole field, and write "" for a quote in it'
        )
    return text


def _check_header(header: list[str], report: ReadReport) -> None:
    if "prompt" not in header:
        found = ", ".join(header) or "nothing"
        found = found if len(found) <= 200 else found[:200] + "..."
        raise InputUnreadable(
            f"the CSV header has no 'prompt' column (found: {found}); {_header_hint(header)}"
        )
    named = [name for name in header if name]
    counts: dict[str, int] = {}
    for name in named:
        counts[name] = counts.get(name, 0) + 1
    duplicates = sorted(name for name, count in counts.items() if count > 1)
    if duplicates:
        shown = ", ".join(_cut_name(name) for name in duplicates[:MAX_NAMED_COLUMNS])
        more = (
            f" and {len(duplicates) - MAX_NAMED_COLUMNS:,} more"
            if len(duplicates) > MAX_NAMED_COLUMNS
            else ""
        )
        raise InputUnreadable(f"the CSV header repeats column(s): {shown}{more}")
    unknown = UnknownColumns()
    for name in named:
        if name not in KNOWN_COLUMNS:
            unknown.add(name)
    unknown.report(report)


def _cut_name(name: str) -> str:
    return name if len(name) <= MAX_COLUMN_NAME_CHARS else name[:MAX_COLUMN_NAME_CHARS] + "..."


# One CSV field at the start of `line` (after skipinitialspace's blanks): quoted, or plain up to a comma.
_CSV_FIELD = re.compile(r'[ ]*(?:"((?:[^"]|"")*)"|([^,"\r\n]*))(,|\r?\n|\Z)')


def _csv_id(line: str, id_column: int | None) -> str | None:
    """The id field of a CSV record that cannot be read as a whole (a field over the size limit, a quote
    left open later in the row), read from the record's first line when the fields up to it are whole."""
    if id_column is None:
        return None
    position = 0
    for index in range(id_column + 1):
        match = _CSV_FIELD.match(line, position)
        if match is None:
            return None
        if index == id_column:
            quoted, plain = match.group(1), match.group(2)
            return _readable_id(quoted.replace('""', '"') if quoted is not None else plain)
        if match.group(3) != ",":
            return None  # the line ends before the id column
        position = match.end()
    return None


def _readable_id(value: Any) -> str | None:
    """An id as a rejected row reports it: text or a whole number, stripped, not empty, not huge."""
    if value is None or isinstance(value, (dict, list, bool, float)):
        return None
    text = str(value).strip()
    return text if text and len(text) <= MAX_REPORTED_ID_CHARS else None


def _check_not_jsonl(lines: list[str]) -> None:
    first = lines[0].strip() if lines else ""
    if first.startswith(("{", "[")):
        shown = first if len(first) <= 60 else first[:60] + "..."
        raise InputUnreadable(
            f"the file looks like JSON Lines, not a CSV (the first line is {shown!r}): name it .jsonl"
        )


def _header_hint(header: list[str]) -> str:
    first = header[0] if header else ""
    for separator, name in ((";", "semicolons"), ("\t", "tabs")):
        if separator in first and "prompt" in first:
            return f"the columns are separated by {name}: save the file as CSV with commas (CSV UTF-8)"
    return "expected id,prompt,negative_prompt,width,height"


def _read_jsonl(
    lines: Iterable[Line], report: ReadReport, number: int, unknown: UnknownColumns
) -> Iterator[RawRow]:
    for item in lines:
        line, end = _line(item)
        if not line.strip():
            report.blank_rows += 1
            continue
        number += 1
        if len(line) > MAX_FIELD_CHARS:
            yield RawRow(
                number,
                None,
                f"the line is longer than {MAX_FIELD_CHARS:,} characters (a prompt may have at most "
                f"{MAX_PROMPT_CHARS})",
                _jsonl_id(line),
                end=end,
            )
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == 1:
                _check_first_jsonl_line(line)
            message = exc.msg.removesuffix(" at")  # "Invalid control character at"
            yield RawRow(
                number,
                None,
                f"the line is not valid JSON: {message} at column {exc.colno}",
                _jsonl_id(line),
                end=end,
            )
            continue
        except (ValueError, RecursionError) as exc:  # huge integers, absurd nesting
            yield RawRow(
                number,
                None,
                f"the line cannot be read as JSON: {type(exc).__name__}",
                _jsonl_id(line),
                end=end,
            )
            continue
        if not isinstance(value, dict):
            problem = f"the line is JSON but not an object (got {type(value).__name__})"
            yield RawRow(number, None, problem, end=end)
            continue
        for name in value:
            if name not in KNOWN_COLUMNS:
                unknown.add(name)
        yield RawRow(number, value, end=end)
    unknown.report(report)


_JSON_DECODER = json.JSONDecoder()
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _jsonl_id(line: str) -> str | None:
    """The "id" of a JSONL line that cannot be read as a whole (too long, cut, a bad value after the id):
    the object's members are read one by one from the start until "id" is found; None when a member
    before it cannot be read."""
    try:
        position = _JSON_SPACE.match(line, 0).end()  # type: ignore[union-attr]
        if line[position : position + 1] != "{":
            return None
        position += 1
        while True:
            position = _JSON_SPACE.match(line, position).end()  # type: ignore[union-attr]
            if line[position : position + 1] != '"':
                return None
            key, position = json.decoder.scanstring(line, position + 1)  # type: ignore[attr-defined]
            position = _JSON_SPACE.match(line, position).end()  # type: ignore[union-attr]
            if line[position : position + 1] != ":":
                return None
            position = _JSON_SPACE.match(line, position + 1).end()  # type: ignore[union-attr]
            value, position = _JSON_DECODER.raw_decode(line, position)
            if key == "id":
                return _readable_id(value)
            position = _JSON_SPACE.match(line, position).end()  # type: ignore[union-attr]
            if line[position : position + 1] != ",":
                return None
            position += 1
    except (ValueError, RecursionError):
        return None


def _check_first_jsonl_line(line: str) -> None:
    """A first line that is not JSON tells the file is something else: say what, instead of rejecting
    every line."""
    text = line.strip()
    shown = text if len(text) <= 60 else text[:60] + "..."
    if text == "{" or text.startswith("["):  # a broken object on one line is only that row's problem
        raise InputUnreadable(
            f"the file is not JSON Lines: it looks like one JSON document over many lines (the first line "
            f'is {shown!r}); write one JSON object per line, e.g. {{"id": "1", "prompt": "a cat"}}'
        )
    if "prompt" in text.lower() and "," in text and not text.startswith("{"):
        raise InputUnreadable(f"the file looks like a CSV (the first line is {shown!r}): name it .csv")


def _send(parser: Any, data: bytes | None) -> Exception | None:
    """Give the parser more of the file (None: the end of it); its complaint, if any, is returned so the
    rows it completed before it are still read."""
    try:
        if data is None:
            parser.close()
        else:
            parser.send(data)
    except ijson.JSONError as exc:
        return exc
    return None


_JSON_BLANK = b" \t\n\r"  # JSON's whitespace: what may stand around an array's elements
_JSON_EXAMPLE = '[{"id": "1", "prompt": "a cat"}, {"id": "2", "prompt": "a dog"}]'


class JsonRows:
    """The rows of a JSON array of objects, read as a stream by ijson (its yajl2_c parser when the wheel
    has it, pure Python otherwise): one element held at a time, never the file.

    `resume`: the stream starts just after an element (where an earlier split stopped); the parser is
    given "[" and what follows the next comma. A row knows where it ends (RawRow.end, an offset in the
    stream given) only after precise(): from then on the parser is fed a byte at a time, so the caller
    calls it when it wants to stop, and stops at the first row with an end."""

    def __init__(
        self,
        chunks: Iterable[bytes],
        report: ReadReport,
        *,
        first_number: int = 0,
        unknown: UnknownColumns | None = None,
        resume: bool = False,
        base: int = 0,
    ) -> None:
        self._chunks, self._report, self._resume = chunks, report, resume
        self._number = first_number
        self._unknown = unknown or UnknownColumns()
        self._precise = False
        self._base = base  # the stream's offset in the file, for messages
        self.end = 0  # how much of the stream the parser has been given

    def precise(self) -> None:
        self._precise = True

    def __iter__(self) -> Iterator[RawRow]:
        self._report.format = "json"
        out = ijson.sendable_list()
        parser = ijson.items_coro(out, "item", use_float=True)
        since = 0  # the start of the piece in which the last element ended: the next one starts after it
        started = False
        for chunk in self._chunks:
            if not started:
                chunk, started = self._start(chunk, parser)
            step = 1 if self._precise else max(len(chunk), 1)
            for at in range(0, len(chunk), step):
                piece = chunk[at : at + step]
                error = _send(parser, piece)
                self.end += len(piece)
                if out:
                    items = list(out)
                    del out[:]
                    for index, item in enumerate(items):
                        exact = step == 1 and index == len(items) - 1 and error is None
                        yield self._row(item, self.end - since, self.end if exact else None)
                    since = self.end - len(piece)
                elif self.end - since > MAX_ELEMENT_BYTES:
                    raise (InputBroken if self._number else InputUnreadable)(
                        f"row {self._number + 1:,} of the JSON array is longer than {MAX_ELEMENT_BYTES:,} "
                        f"bytes (a prompt may have at most {MAX_PROMPT_CHARS} characters)"
                    )
                if error is not None:
                    self._broken(error)
                    return
        if not started:
            raise InputUnreadable(f"the file is empty: expected a JSON array of rows such as {_JSON_EXAMPLE}")
        error = _send(parser, None)
        for item in list(out):
            yield self._row(item, 0, None)
        if error is not None:
            self._broken(error)
            return
        self._unknown.report(self._report)

    def _start(self, chunk: bytes, parser: Any) -> tuple[bytes, bool]:
        """The chunk from where the parser starts, and whether it has started (only blanks so far: not)."""
        if not self._resume and self.end == 0 and chunk.startswith(codecs.BOM_UTF8):
            chunk, self.end = chunk[3:], 3  # the BOM counts in the offsets, not in the JSON
        stripped = chunk.lstrip(_JSON_BLANK)
        self.end += len(chunk) - len(stripped)
        if not stripped:
            return b"", False
        first = stripped[:1]
        if self._resume:
            parser.send(b"[")
            if first == b",":
                self.end += 1
                return stripped[1:], True
            return stripped, True
        if first != b"[":
            shown = stripped[:40].decode("utf-8", "replace")
            if first == b"{":
                raise InputUnreadable(
                    f"the file is one JSON object, not an array of rows (it starts with {shown!r}): write the "
                    f"rows as {_JSON_EXAMPLE}, or one object per line in a .jsonl file"
                )
            raise InputUnreadable(
                f"the file is not a JSON array of rows (it starts with {shown!r}): expected {_JSON_EXAMPLE}"
            )
        return stripped, True

    def _row(self, item: Any, span: int, end: int | None) -> RawRow:
        self._number += 1
        if not isinstance(item, dict):
            kind = "an array" if isinstance(item, list) else type(item).__name__
            return RawRow(self._number, None, f"the element is JSON but not an object (got {kind})", end=end)
        # The element's size is known only roughly (chunks); measured when it may be over the limit.
        if span > MAX_FIELD_CHARS and len(json.dumps(item)) > MAX_FIELD_CHARS:
            return RawRow(
                self._number,
                None,
                f"the element is longer than {MAX_FIELD_CHARS:,} characters (a prompt may have at most "
                f"{MAX_PROMPT_CHARS})",
                _readable_id(item.get("id")),
                end=end,
            )
        for name in item:
            if name not in KNOWN_COLUMNS:
                self._unknown.add(name)
        return RawRow(self._number, item, end=end)

    def _broken(self, exc: Exception) -> None:
        """What a parser error means for the split: a note (data after the array), or InputBroken (the rows
        read so far stand), or InputUnreadable (no row could be read)."""
        self._unknown.report(self._report)
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0].removeprefix("parse error: ")
        if "trailing garbage" in text or "Additional data" in text:
            self._report.notes.append("the file has data after the JSON array's closing ]: it was not read")
            return
        if "premature EOF" in text or "Incomplete" in text:
            reason = f"the file ends before the JSON array is closed (after row {self._number:,}): it was cut short"
        else:
            where = f"before byte {self._base + self.end:,} (row {self._number + 1:,})"
            reason = f"the JSON is not valid {where}: {text}"
        if self._number == 0:
            raise InputUnreadable(reason) from None
        raise InputBroken(f"{reason}; the rows after it were not read") from None


@dataclass(frozen=True)
class RowDefaults:
    """What a row without the column gets: the stack's default provider and model."""

    provider: str = "atlascloud"
    model: str | None = None


def to_task(
    job_id: str, row: RawRow, defaults: RowDefaults | None = None, route: LocalRoute | None = None
) -> ImageTask:
    """The validated task for a row, or RowRejected with the reason. `route`: the local route as this
    file sees it (imagepipe.localroute); without it a row that needs the route is rejected."""
    defaults = defaults or RowDefaults()
    if row.values is None:
        raise RowRejected(row.problem or "the row cannot be read")
    values = row.values
    for name, value in values.items():
        if isinstance(value, str) and _has_undecodable_bytes(value):
            raise RowRejected(f"the {name} is not valid UTF-8 text: save the file as UTF-8")
        if isinstance(value, str) and "\x00" in value:
            raise RowRejected(f"the {name} holds a NUL byte (\\x00): remove it from the file")
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
    given = {name: _text(values.get(name), name) for name in LOCAL_COLUMNS}
    provider = _text(values.get("provider"), "provider").lower()
    try:
        extra = {name: value for name, value in values.items() if name not in KNOWN_COLUMNS}
        local = (
            local_fields(given, provider, extra, route or LocalRoute())
            if backend_of(given) == "local"
            else {}
        )
    except LocalRowRejected as exc:
        raise RowRejected(str(exc)) from None
    provider = LOCAL_PROVIDER if local else provider or defaults.provider
    if provider not in PROVIDER_NAMES and not local:
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
            **local,
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
        return row.readable_id
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
