"""The catalogue of bad input (docs/bad-input.md): malformed files and rows, each with what a user sees.

Every case goes through what the splitter runs on an upload - text_lines, read_rows, then its step for
each row (to_task, the duplicate-id check, the rows.jsonl line) - so an outcome here is the line of
rows.jsonl a user reads: queued, or rejected with the reason; or the reason the whole file failed."""

from __future__ import annotations

import codecs
import gzip
import io
import json
import posixpath
import time
import zipfile
from dataclasses import dataclass
from typing import Any

import pytest

from imagepipe.contract import safe_name
from imagepipe.finisher import csv_cell
from imagepipe.layout import JobLayout
from imagepipe.rows import MAX_LINE_BYTES, InputUnreadable, ReadReport, read_rows, text_lines
from imagepipe.splitstore import IdIndex
from imagepipe.splitter import READ_CHUNK, RowLog, SplitTarget, _split_row

JOB = "job-1"
CSV = b"id,prompt\n"
MB = 2**20


class _Sender:
    """Stands in for TaskSender: the tasks the splitter would put on TasksQueue."""

    def __init__(self) -> None:
        self.tasks: list[Any] = []

    def add(self, task: Any) -> None:
        self.tasks.append(task)


@dataclass
class Split:
    rows: list[dict[str, Any]]  # rows.jsonl, one dict per row
    tasks: list[Any]  # what was queued
    report: ReadReport


def chunks(data: bytes, size: int = READ_CHUNK) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def split(data: bytes, fmt: str = "csv") -> Split:
    """The file's bytes split the way split_object splits an S3 object (InputUnreadable as it raises)."""
    target = SplitTarget(queue_url="", output_bucket="", state=None, finisher_queue_url="")
    log, sender, report, seen = RowLog(), _Sender(), ReadReport(), IdIndex()
    for raw in read_rows(text_lines(chunks(data), fmt), fmt, report):
        _split_row(raw, JOB, seen, log, sender, target)  # type: ignore[arg-type]
    log.file.seek(0)
    rows = [json.loads(line) for line in log.file.read().splitlines()]
    return Split(rows, sender.tasks, report)


def outcome(data: bytes, fmt: str) -> list[tuple[str, Any, str]] | str:
    """(status, id, prompt when queued / reason when rejected) per row, or the file's error."""
    try:
        result = split(data, fmt)
    except InputUnreadable as exc:
        return f"file unreadable: {exc}"
    prompts = {task.row_number: task.prompt for task in result.tasks}
    return [
        (r["status"], r["id"], prompts[r["row"]] if r["status"] == "queued" else r["error"]["message"])
        for r in result.rows
    ]


def queued(row_id: str, prompt: str) -> tuple[str, str, str]:
    return ("queued", row_id, prompt)


def rejected(row_id: str | None, reason: str) -> tuple[str, str | None, str]:
    return ("rejected", row_id, reason)


def unreadable(reason: str) -> str:
    return f"file unreadable: {reason}"


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("xl/worksheets/sheet1.xml", "<worksheet/>")
    return buffer.getvalue()


def _jsonl(*objects: Any) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objects)


NOT_UTF8 = "the prompt is not valid UTF-8 text: save the file as UTF-8"
FIELD_LIMIT = (
    "the CSV row cannot be read: a field is longer than 1,000,000 characters (a prompt may have at most "
    '4000), or a quote (") is left open'
)
NEVER_CLOSED = 'the CSV row cannot be read: a quote (") is opened and never closed'
WIDTH_RANGE = "is out of range: use a multiple of 8 from 64 to 2048"
EXCEL = "from Excel use Save As > CSV UTF-8"
PARAMS = 'the params must be a JSON object, e.g. {"quality": "high"}'

# (case id, file bytes, format, expected outcome). The ids are the rows of docs/bad-input.md.
CATALOGUE = [
    # ------------------------------------------------------------------ encodings
    ("utf8-bom-crlf", codecs.BOM_UTF8 + "id,prompt\r\n1,café\r\n".encode(), "csv", [queued("1", "café")]),
    (
        "utf16-le-bom",
        "id,prompt\r\n1,café\r\n2,猫\r\n".encode("utf-16"),
        "csv",
        [queued("1", "café"), queued("2", "猫")],
    ),
    (
        "utf16-be-bom",
        codecs.BOM_UTF16_BE + "id,prompt\n1,café\n".encode("utf-16-be"),
        "csv",
        [queued("1", "café")],
    ),
    ("utf16-le-no-bom", "id,prompt\n1,café\n".encode("utf-16-le"), "csv", [queued("1", "café")]),
    (
        "utf16-jsonl",
        _jsonl({"id": "1", "prompt": "猫"}).decode().encode("utf-16"),
        "jsonl",
        [queued("1", "猫")],
    ),
    (
        "utf16-cut-in-half-a-character",
        "id,prompt\n1,a cat\n2,a dog".encode("utf-16")[:-1],
        "csv",
        [queued("1", "a cat"), rejected("2", NOT_UTF8)],
    ),
    ("utf32-bom", "id,prompt\n1,café\n".encode("utf-32"), "csv", [queued("1", "café")]),
    (
        "latin1-file",
        "id,prompt\n1,a cat\n2,café crème\n".encode("latin-1"),
        "csv",
        [queued("1", "a cat"), rejected("2", NOT_UTF8)],
    ),
    (
        "latin1-id",
        b"id,prompt\ncaf\xe9,a cup\n",
        "csv",
        [rejected("caf\udce9", "the id is not valid UTF-8 text: save the file as UTF-8")],
    ),
    (
        "cr-only-line-ends",
        b"id,prompt\r1,a cat\r2,a dog\r",
        "csv",
        [queued("1", "a cat"), queued("2", "a dog")],
    ),
    # ------------------------------------------------------------------ not text at all
    (
        "gzip-as-csv",
        gzip.compress(CSV + b"1,a cat\n"),
        "csv",
        unreadable("this is a gzip file, not a CSV file: upload the uncompressed .csv"),
    ),
    (
        "gzip-as-jsonl",
        gzip.compress(_jsonl({"prompt": "a cat"})),
        "jsonl",
        unreadable("this is a gzip file, not a JSONL file: upload the uncompressed .jsonl"),
    ),
    (
        "xlsx-as-csv",
        _zip(),
        "csv",
        unreadable(f"this is a zip file (an Excel .xlsx workbook is one), not a CSV file: {EXCEL}"),
    ),
    (
        "xls-as-csv",
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504),
        "csv",
        unreadable(f"this is an Excel .xls workbook, not a CSV file: {EXCEL}"),
    ),
    (
        "png-as-csv",
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64),
        "csv",
        unreadable("this is a PNG image, not a CSV file: upload the .csv file of prompts"),
    ),
    (
        "pdf-as-csv",
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
        "csv",
        unreadable("this is a PDF document, not a CSV file: upload the .csv file of prompts"),
    ),
    (
        "binary-with-nul-bytes",
        bytes(range(256)) * 8,
        "csv",
        unreadable(
            "this is not a CSV file: its first 1024 bytes hold 108 control bytes (such as NUL) that text "
            "does "
            "not have. Save the prompts as UTF-8 text and upload the .csv"
        ),
    ),
    # ------------------------------------------------------------------ NUL bytes in text
    (
        "nul-byte-in-a-csv-field",
        CSV + b"1,a\x00cat\n2,a dog\n",
        "csv",
        [rejected("1", "the prompt holds a NUL byte (\\x00): remove it from the file"), queued("2", "a dog")],
    ),
    (
        "nul-byte-in-an-id",
        CSV + b"a\x00b,a cat\n",
        "csv",
        [rejected("a\x00b", "the id holds a NUL byte (\\x00): remove it from the file")],
    ),
    (
        "nul-escape-in-jsonl",
        _jsonl({"id": "1", "prompt": "a\x00cat"}, {"id": "2", "prompt": "a dog"}),
        "jsonl",
        [rejected("1", "the prompt holds a NUL byte (\\x00): remove it from the file"), queued("2", "a dog")],
    ),
    (
        "raw-nul-byte-in-jsonl",
        b'{"id": "1", "prompt": "a\x00cat"}\n{"id": "2", "prompt": "a dog"}\n',
        "jsonl",
        [
            rejected("1", "the line is not valid JSON: Invalid control character at column 25"),
            queued("2", "a dog"),
        ],
    ),
    # ------------------------------------------------------------------ sizes of fields and lines
    (
        "10mb-csv-field",
        CSV + b"1," + b"x" * 10 * MB + b"\n2,a dog\n",
        "csv",
        [rejected("1", FIELD_LIMIT), queued("2", "a dog")],
    ),
    (
        "10mb-jsonl-prompt",
        _jsonl({"id": "1", "prompt": "x" * 10 * MB}, {"id": "2", "prompt": "a dog"}),
        "jsonl",
        [
            rejected("1", "the line is longer than 1,000,000 characters (a prompt may have at most 4000)"),
            queued("2", "a dog"),
        ],
    ),
    (
        "prompt-over-4000",
        CSV + b"1," + b"x" * 4001 + b"\n",
        "csv",
        [rejected("1", "the prompt is 4001 characters; the limit is 4000")],
    ),
    ("header-only", CSV, "csv", []),
    (
        "empty-file",
        b"",
        "csv",
        unreadable(
            "the file is empty: expected a header line such as id,prompt,negative_prompt,width,height"
        ),
    ),
    (
        "only-a-bom",
        codecs.BOM_UTF8,
        "csv",
        unreadable(
            "the file is empty: expected a header line such as id,prompt,negative_prompt,width,height"
        ),
    ),
    # ------------------------------------------------------------------ quotes
    (
        "quote-left-open",
        CSV + b'1,"a cat\n2,a dog\n3,a bird\n',
        "csv",
        [rejected("1", NEVER_CLOSED), queued("2", "a dog"), queued("3", "a bird")],
    ),
    (
        "quote-left-open-in-the-header",
        b'"id,prompt\n1,a cat\n',
        "csv",
        unreadable('the CSV header cannot be read: a quote (") is opened and never closed'),
    ),
    (
        "quote-closed-mid-field",
        CSV + b'1,"a" cat\n2,a dog\n',
        "csv",
        [
            rejected(
                "1",
                'the CSV row cannot be read: a quote (") ends in the middle of a field: '
                "quote the whole field, "
                'and write "" for a quote in it',
            ),
            queued("2", "a dog"),
        ],
    ),
    ("quotes-inside-an-unquoted-field", CSV + b'1,a "big" cat\n', "csv", [queued("1", 'a "big" cat')]),
    # ------------------------------------------------------------------ formula-looking cells
    ("formula-prompt", CSV + b"1,=cmd|' /C calc'!A0\n", "csv", [queued("1", "=cmd|' /C calc'!A0")]),
    (
        "formula-id",
        CSV + b"=1+1,a cat\n@SUM(A1),a dog\n",
        "csv",
        [queued("=1+1", "a cat"), queued("@SUM(A1)", "a dog")],
    ),
    # ------------------------------------------------------------------ ids
    (
        "id-with-dot-dot-slash",
        CSV + b"../../etc/passwd,a cat\n",
        "csv",
        [queued("../../etc/passwd", "a cat")],
    ),
    (
        "id-with-slash-and-spaces",
        CSV + b"a/b c,a cat\na_b_c,a dog\n",
        "csv",
        [queued("a/b c", "a cat"), queued("a_b_c", "a dog")],
    ),
    ("unicode-id", CSV + "猫🐱,a cat\n".encode(), "csv", [queued("猫🐱", "a cat")]),
    (
        "300-character-id",
        CSV + b"x" * 300 + b",a cat\n",
        "csv",
        [rejected("x" * 300, "the id is 300 characters; the limit is 256")],
    ),
    ("blank-id", CSV + b"  ,a cat\n", "csv", [rejected(None, "the id is empty")]),
    (
        "duplicate-ids",
        CSV + b"a,a cat\nb,a dog\n a ,a bird\n",
        "csv",
        [
            queued("a", "a cat"),
            queued("b", "a dog"),
            rejected("a", "duplicate id 'a': row 1 already uses it"),
        ],
    ),
    (
        "duplicate-ids-text-and-number-jsonl",
        _jsonl({"id": 7, "prompt": "a cat"}, {"id": "7", "prompt": "a dog"}),
        "jsonl",
        [queued("7", "a cat"), rejected("7", "duplicate id '7': row 1 already uses it")],
    ),
    # ------------------------------------------------------------------ sizes of images
    (
        "negative-width-csv",
        b"id,prompt,width\n1,a cat,-512\n",
        "csv",
        [rejected("1", "the width '-512' is not a whole number of pixels")],
    ),
    (
        "huge-width-csv",
        b"id,prompt,width\n1,a cat," + b"9" * 30 + b"\n",
        "csv",
        [rejected("1", f"the width {'9' * 30} {WIDTH_RANGE}")],
    ),
    (
        "negative-width-jsonl",
        _jsonl({"id": "1", "prompt": "a cat", "width": -512}),
        "jsonl",
        [rejected("1", f"the width -512 {WIDTH_RANGE}")],
    ),
    (
        "infinite-height-jsonl",
        b'{"id": "1", "prompt": "a cat", "height": 1e999}\n',
        "jsonl",
        [rejected("1", "the height must be a whole number of pixels")],
    ),
    (
        "huge-n-jsonl",
        _jsonl({"id": "1", "prompt": "a cat", "n": 10**30}),
        "jsonl",
        [rejected("1", f"the n {10**30} is out of range: use 1 to 10")],
    ),
    # ------------------------------------------------------------------ wrong JSON types
    (
        "width-as-text-jsonl",
        _jsonl({"id": "1", "prompt": "a cat", "width": "512"}),
        "jsonl",
        [queued("1", "a cat")],
    ),
    (
        "width-true-jsonl",
        _jsonl({"id": "1", "prompt": "a cat", "width": True}),
        "jsonl",
        [rejected("1", "the width must be a whole number of pixels")],
    ),
    (
        "prompt-a-number-jsonl",
        _jsonl({"id": "1", "prompt": 42}),
        "jsonl",
        [rejected("1", "the prompt must be text")],
    ),
    (
        "prompt-a-list-jsonl",
        _jsonl({"id": "1", "prompt": ["a", "cat"]}),
        "jsonl",
        [rejected("1", "the prompt must be text")],
    ),
    (
        "prompt-null-jsonl",
        _jsonl({"id": "1", "prompt": None}),
        "jsonl",
        [rejected("1", "the prompt is empty")],
    ),
    (
        "id-an-object-jsonl",
        _jsonl({"id": {"a": 1}, "prompt": "a cat"}),
        "jsonl",
        [rejected(None, "the id must be text or a whole number")],
    ),
    (
        "params-a-list-jsonl",
        _jsonl({"id": "1", "prompt": "a cat", "params": [1]}),
        "jsonl",
        [rejected("1", PARAMS)],
    ),
    (
        "lines-that-are-not-objects-jsonl",
        b'{"id": "1", "prompt": "a cat"}\n"a dog"\nnull\n',
        "jsonl",
        [
            queued("1", "a cat"),
            rejected(None, "the line is JSON but not an object (got str)"),
            rejected(None, "the line is JSON but not an object (got NoneType)"),
        ],
    ),
    # ------------------------------------------------------------------ the wrong kind of text file
    (
        "pretty-printed-json-as-jsonl",
        json.dumps([{"id": "1", "prompt": "a cat"}], indent=2).encode(),
        "jsonl",
        unreadable(
            "the file is not JSON Lines: it looks like one JSON document over many lines (the first line is "
            '\'[\'); write one JSON object per line, e.g. {"id": "1", "prompt": "a cat"}'
        ),
    ),
    (
        "csv-named-jsonl",
        CSV + b"1,a cat\n",
        "jsonl",
        unreadable("the file looks like a CSV (the first line is 'id,prompt'): name it .csv"),
    ),
    (
        "jsonl-named-csv",
        _jsonl({"id": "1", "prompt": "a cat"}),
        "csv",
        unreadable(
            "the file looks like JSON Lines, not a CSV (the first line is "
            '\'{"id": "1", "prompt": "a cat"}\'): name it .jsonl'
        ),
    ),
    (
        "semicolon-separated",
        b"id;prompt\n1;a cat\n",
        "csv",
        unreadable(
            "the CSV header has no 'prompt' column (found: id;prompt); the columns are separated by "
            "semicolons: save the file as CSV with commas (CSV UTF-8)"
        ),
    ),
    (
        "tab-separated",
        b"id\tprompt\n1\ta cat\n",
        "csv",
        unreadable(
            "the CSV header has no 'prompt' column (found: id\tprompt); the columns are separated by tabs: "
            "save the file as CSV with commas (CSV UTF-8)"
        ),
    ),
    (
        "header-repeats-a-column",
        b"id,prompt,Prompt\n1,a cat,a dog\n",
        "csv",
        unreadable("the CSV header repeats column(s): prompt"),
    ),
    (
        "spreadsheet-trailing-commas",
        b"id,prompt,,\n1,a cat,,\n2,a dog,,,,\n",
        "csv",
        [queued("1", "a cat"), queued("2", "a dog")],
    ),
    ("fewer-fields-than-the-header", b"id,prompt,width,height\n1,a cat\n", "csv", [queued("1", "a cat")]),
    (
        "more-fields-than-the-header",
        CSV + b"1,a cat, black\n",
        "csv",
        [rejected("1", "the row has 3 fields but the header has 2 (quote prompts that contain commas)")],
    ),
]


@pytest.mark.parametrize(
    ("data", "fmt", "expected"), [pytest.param(*case[1:], id=case[0]) for case in CATALOGUE]
)
def test_each_bad_input_gives_the_outcome_in_the_catalogue(data, fmt, expected):
    # Given a malformed file (or a file with a malformed row)
    # When the splitter reads it
    result = outcome(data, fmt)

    # Then the file fails with the reason, or each row is queued or rejected with the reason, as catalogued
    assert result == expected


def test_the_catalogue_has_at_least_30_distinct_cases():
    names = [case[0] for case in CATALOGUE]
    assert len(names) == len(set(names)) >= 30


HOSTILE_IDS = [
    "../../etc/passwd",
    "..",
    ".",
    "/",
    "/absolute/path",
    "a/b",
    "a\\b",
    "a b",
    "a_b",
    " spaced out ",
    "tab\tid",
    "line\nbreak",
    "猫",
    "🐱",
    "Ωmega",
    "x" * 256,
    "y" * 256,
    "=cmd|' /C calc'!A0",
    "%2e%2e%2f",
    "jobs/other-job/images/x",
    "row-0123abcd",
    "CON",
    ".hidden",
    "name.png",
]


def test_an_image_key_stays_inside_the_jobs_images_prefix_whatever_the_id():
    # Given rows with ids that are paths, traversals, spaces, unicode, 256 characters or formulas
    data = _jsonl(*({"id": row_id, "prompt": "a cat"} for row_id in HOSTILE_IDS))

    # When the file is split
    result = split(data, "jsonl")

    # Then every row is queued, and every image key (first and tenth image) is a plain name under
    # jobs/<job>/images/: no '..', no '/', no spaces, and no two ids share a name
    layout = JobLayout(JOB)
    assert [r["status"] for r in result.rows] == ["queued"] * len(HOSTILE_IDS)
    names = [task.image_name for task in result.tasks]
    assert names == [safe_name(row_id.strip()) for row_id in HOSTILE_IDS]
    assert len(set(names)) == len(names)
    for name in names:
        assert ".." not in name and "/" not in name and " " not in name and "." not in name
        for index in (0, 9):
            key = layout.image_key(name, index, "png")
            assert key.startswith(f"jobs/{JOB}/images/") and posixpath.normpath(key) == key
            assert posixpath.dirname(key) == f"jobs/{JOB}/images"


def test_a_formula_kept_as_text_is_neutralised_for_a_spreadsheet():
    # Given formula-looking prompts and ids, kept as text in the tasks
    result = split(CSV + b"=1+1,=cmd|' /C calc'!A0\n@x,+1\n-1,-a cat\n")

    # Then they are queued unchanged, and results.csv writes each with a leading quote
    cells = [(task.row_id, task.prompt) for task in result.tasks]
    assert cells == [("=1+1", "=cmd|' /C calc'!A0"), ("@x", "+1"), ("-1", "-a cat")]
    assert [csv_cell(text) for cell in cells for text in cell] == [
        "'=1+1",
        "'=cmd|' /C calc'!A0",
        "'@x",
        "'+1",
        "'-1",
        "'-a cat",
    ]


@pytest.mark.parametrize(
    ("data", "fmt", "expected"),
    [
        pytest.param(CSV + b"\n" * 2_000_000, "csv", ([], 2_000_000), id="header-and-2M-blank-lines"),
        pytest.param(CSV + b"\r\n" * 2_000_000, "csv", ([], 2_000_000), id="header-and-2M-blank-crlf-lines"),
        pytest.param(b"\n" * 2_000_000, "jsonl", ([], 2_000_000), id="2M-blank-jsonl-lines"),
        pytest.param(
            b"\n" * 2_000_000,
            "csv",
            "the file is empty: expected a header line such as id,prompt,negative_prompt,width,height",
            id="2M-blank-lines-no-header",
        ),
    ],
)
def test_two_million_blank_lines_finish_quickly_with_no_rows(data, fmt, expected):
    # Given a file of 2,000,000 blank lines (with a header, or without)
    started = time.perf_counter()

    # When it is split
    try:
        result = split(data, fmt)
        seen: Any = (result.rows, result.report.blank_rows)
    except InputUnreadable as exc:
        seen = str(exc)
    seconds = time.perf_counter() - started

    # Then it is over in seconds: no rows and the blank lines counted; without a header, "the file is empty"
    assert seen == expected
    assert seconds < 10, f"2M blank lines took {seconds:.1f} s"


def test_a_file_without_a_line_break_is_read_in_bounded_memory_and_its_row_rejected():
    # Given a 64 MB file that is one line (the header, then a row that never ends), read in S3's chunks
    def body():
        yield CSV + b"1,"
        for _ in range(64 * MB // READ_CHUNK):
            yield b"x" * READ_CHUNK

    # When its lines are read
    longest, rows = 0, []
    report = ReadReport()
    lines = text_lines(body(), "csv")

    def measured():
        nonlocal longest
        for line in lines:
            longest = max(longest, len(line))
            yield line

    rows = list(read_rows(measured(), "csv", report))

    # Then no line held is longer than the cap, and the row is rejected for its size
    assert longest <= MAX_LINE_BYTES + 1
    assert [(r.number, r.problem) for r in rows] == [(1, FIELD_LIMIT)]


def test_cutting_long_lines_keeps_every_other_line_as_it_was():
    import hypothesis

    from imagepipe.rows import split_lines

    st = hypothesis.strategies
    pieces = st.sampled_from([b"a", b"bb", b"cccccccc", b"\r", b"\n", b"\r\n"])

    @hypothesis.settings(database=None, max_examples=300, deadline=None)
    @hypothesis.given(data=st.lists(pieces, max_size=40).map(b"".join), size=st.integers(1, 9))
    def check(data: bytes, size: int) -> None:
        # Given any bytes, in chunks of any size, and lines of at most 6 bytes kept
        whole = list(split_lines([data]))

        # When they are split with the cap
        cut = list(split_lines(chunks(data, size), max_line=6))

        # Then the lines that fit are as before, and each longer one is its first 6 bytes and a line end
        assert cut == [line if len(line.rstrip(b"\r\n")) <= 6 else line[:6] + b"\n" for line in whole]

    check()
