"""Reading input files row by row (imagepipe.rows): which rows become tasks, which are rejected and why."""

from __future__ import annotations

import json
import re
from typing import NamedTuple

import pytest

from imagepipe.contract import ImageTask
from imagepipe.rows import (
    MAX_ELEMENT_BYTES,
    InputBroken,
    InputUnreadable,
    JsonRows,
    RawRow,
    ReadReport,
    RowRejected,
    decode_lines,
    format_for_key,
    read_rows,
    row_id_of,
    split_lines,
    split_lines_at,
    text_lines_at,
    to_task,
    utf8_stream,
)

from conftest import EXAMPLES

JOB = "job-1"
HEADER = b"id,prompt,negative_prompt,width,height\n"


class Rejected(NamedTuple):
    number: int
    message: str


def chunked(data: bytes, size: int | None) -> list[bytes]:
    if size is None:
        return [data]
    return [data[i : i + size] for i in range(0, len(data), size)]


def read(data: bytes, fmt: str = "csv", chunk_size: int | None = None) -> tuple[list[RawRow], ReadReport]:
    """The raw rows of a file's bytes, read the way the splitter reads an S3 object."""
    report = ReadReport()
    rows = list(read_rows(decode_lines(split_lines(chunked(data, chunk_size))), fmt, report))
    return rows, report


def outcomes(
    data: bytes, fmt: str = "csv", chunk_size: int | None = None
) -> tuple[list[ImageTask | Rejected], ReadReport]:
    """Each row as its task, or as the rejection a user would see."""
    rows, report = read(data, fmt, chunk_size)
    results: list[ImageTask | Rejected] = []
    for row in rows:
        try:
            results.append(to_task(JOB, row))
        except RowRejected as exc:
            results.append(Rejected(row.number, str(exc)))
    return results, report


# --------------------------------------------------------------------------- CSV


def test_the_brief_csv_template_gives_one_task_per_row():
    # Given the brief's template: id,prompt,negative_prompt,width,height with every value quoted
    data = (EXAMPLES / "prompts.csv").read_bytes()

    # When it is read
    results, report = outcomes(data)

    # Then each row is a task with its id, prompt and size, numbered from 1 after the header
    assert [(t.row_id, t.row_number, t.prompt, t.width, t.height) for t in results] == [
        ("1", 1, "a cat on a table", 1024, 1024),
        ("2", 2, "a dog in a garden", 1024, 1024),
        ("3", 3, "a bird in a tree", 1024, 1024),
    ]
    assert all(t.job_id == JOB and t.negative_prompt == "" for t in results)
    assert (report.format, report.ignored_columns, report.blank_rows) == ("csv", [], 0)


def test_quoted_commas_and_a_newline_inside_a_quoted_prompt_stay_in_the_prompt():
    # Given prompts with commas and a line break, quoted
    data = HEADER + b'1,"a cat, black, on a mat","dogs, birds",512,768\n2,"first line\nsecond line",,,\n'

    # When read
    (cat, two_lines), _ = outcomes(data)

    # Then each quoted value is one field, and the two-line prompt is one row, not two
    assert (cat.prompt, cat.negative_prompt, cat.width, cat.height) == (
        "a cat, black, on a mat",
        "dogs, birds",
        512,
        768,
    )
    assert (two_lines.row_id, two_lines.row_number, two_lines.prompt) == ("2", 2, "first line\nsecond line")


def test_a_bom_and_a_header_in_another_case_with_spaces_are_accepted():
    # Given a file saved by Excel: UTF-8 BOM, CRLF, header in capitals with spaces around names
    data = b"\xef\xbb\xbf ID , Prompt ,NEGATIVE_PROMPT, Width,HEIGHT \r\nfox,a red fox,,256,128\r\n"

    # When read
    (task,), report = outcomes(data)

    # Then the columns are recognised (none of them ignored) and the row is a task
    assert (task.row_id, task.prompt, task.width, task.height) == ("fox", "a red fox", 256, 128)
    assert report.ignored_columns == []


def test_a_file_without_a_prompt_column_is_unreadable_and_names_the_columns_found():
    with pytest.raises(InputUnreadable) as raised:
        read(b"id,text,width\n1,a cat,512\n")

    assert "no 'prompt' column" in str(raised.value)
    assert "found: id, text, width" in str(raised.value)


def test_an_empty_file_is_unreadable_and_says_a_header_is_expected():
    with pytest.raises(InputUnreadable, match="the file is empty: expected a header line"):
        read(b"")


def test_a_row_with_more_fields_than_the_header_is_rejected_with_a_hint_to_quote():
    # Given a prompt with a comma that was not quoted, between two good rows
    data = HEADER + b"1,a cat,,512,512\n2,a cat, black,,512,512\n3,a dog,,512,512\n"

    # When read
    results, _ = outcomes(data)

    # Then only that row is rejected, with the counts and what to do about it
    assert results[1] == Rejected(
        2, "the row has 6 fields but the header has 5 (quote prompts that contain commas)"
    )
    assert [r.row_id for r in (results[0], results[2])] == ["1", "3"]


def test_blank_lines_and_empty_rows_are_skipped_and_counted_not_rejected():
    # Given blank lines, a row of empty fields and a line of spaces between two rows
    data = HEADER + b"1,a cat,,,\n\n,,,,\n   \n2,a dog,,,\n"

    # When read
    results, report = outcomes(data)

    # Then there are two tasks, numbered as the 1st and 2nd rows, and three skipped lines
    assert [(t.row_id, t.row_number) for t in results] == [("1", 1), ("2", 2)]
    assert report.blank_rows == 3


def test_a_blank_width_or_height_means_1024():
    (task,), _ = outcomes(HEADER + b'1,a cat,,"",512\n')

    assert (task.width, task.height) == (1024, 512)


@pytest.mark.parametrize(
    ("width", "height", "message"),
    [
        ("wide", "512", "the width 'wide' is not a whole number of pixels"),
        ("-512", "512", "the width '-512' is not a whole number of pixels"),
        ("512.5", "512", "the width '512.5' is not a whole number of pixels"),
        ("99999", "512", "the width 99999 is out of range: use a multiple of 8 from 64 to 2048"),
        ("32", "512", "the width 32 is out of range"),
        ("512", "1020", "the height 1020 is out of range: use a multiple of 8"),
    ],
)
def test_a_size_that_is_not_a_usable_number_of_pixels_is_rejected_with_the_value(width, height, message):
    data = HEADER + f"1,a cat,,{width},{height}\n".encode()

    (result,), _ = outcomes(data)

    assert isinstance(result, Rejected)
    assert result.message.startswith(message)


def test_a_prompt_over_the_limit_is_rejected_and_one_at_the_limit_is_kept():
    # Given a 4,000-character prompt, a 4,001-character one, and a 4,001-character negative prompt
    data = HEADER + b"".join(
        [
            b"ok," + b"x" * 4000 + b",,,\n",
            b"long," + b"x" * 4001 + b",,,\n",
            b"neg,a cat," + b"y" * 4001 + b",,\n",
        ]
    )

    # When read
    (ok, long, neg), _ = outcomes(data)

    # Then the limit itself is fine and one more character is rejected with both numbers
    assert isinstance(ok, ImageTask) and len(ok.prompt) == 4000
    assert long == Rejected(2, "the prompt is 4001 characters; the limit is 4000")
    assert neg == Rejected(3, "the negative_prompt is 4001 characters; the limit is 4000")


def test_without_an_id_column_the_row_number_is_the_id():
    results, _ = outcomes(b"prompt,width\na cat,512\na dog,\n")

    assert [(t.row_id, t.image_name, t.width) for t in results] == [("1", "1", 512), ("2", "2", 1024)]


def test_an_empty_id_is_rejected_and_a_rejected_row_keeps_the_id_it_was_written_with():
    # Given a row with an empty id and a row with an id but an impossible width
    data = HEADER + b" ,a cat,,,\ncat-7,a cat,,wide,\n"

    # When read
    rows, _ = read(data)
    results, _ = outcomes(data)

    # Then both are rejected; the second is reported under its id, the first under none
    assert results == [
        Rejected(1, "the id is empty"),
        Rejected(2, "the width 'wide' is not a whole number of pixels"),
    ]
    assert [row_id_of(row) for row in rows] == [None, "cat-7"]


def test_a_row_that_is_not_utf8_is_rejected_and_the_rows_around_it_are_read():
    # Given a file where one row was saved as Latin-1 (é, è) and one holds a stray 0xFF byte
    data = HEADER + b"1,a cat,,,\n2,caf\xe9 cr\xe8me,,,\n3,a dog,\xff,,\n4,a bird,,,\n"

    # When read
    results, _ = outcomes(data)

    # Then those two rows are rejected with a message about the encoding; the others are tasks
    assert results[1] == Rejected(2, "the prompt is not valid UTF-8 text: save the file as UTF-8")
    assert results[2] == Rejected(3, "the negative_prompt is not valid UTF-8 text: save the file as UTF-8")
    assert [(t.row_id, t.prompt) for t in (results[0], results[3])] == [("1", "a cat"), ("4", "a bird")]


def test_a_width_with_a_superscript_digit_is_rejected_not_a_crash():
    # Given a width typed as "512²" (str.isdigit() is True for superscripts)
    data = HEADER + "1,a cat,,512²,512\n".encode()

    # When read, Then the row is rejected like any other non-number (not a crash of the whole file)
    (result,), _ = outcomes(data)
    assert result == Rejected(1, "the width '512²' is not a whole number of pixels")


def test_an_unbalanced_quote_does_not_silently_swallow_the_following_rows():
    # Given a prompt whose opening quote is never closed, followed by two good rows
    data = HEADER + b'1,"a cat on a table,,512,512\n2,a dog,,512,512\n3,a bird,,512,512\n'

    # When read
    results, _ = outcomes(data)

    # Then the broken row is rejected; it does not become one task holding the other rows as its prompt
    assert all("\n" not in r.prompt for r in results if isinstance(r, ImageTask))
    assert isinstance(results[0], Rejected)
    # and the rows after it are still read, each as itself
    assert [r.prompt for r in results[1:]] == ["a dog", "a bird"]


def test_a_stray_quote_loses_only_its_own_row_even_with_multiline_prompts_after_it():
    data = HEADER + b'1,"never closed,,512,512\n2,fine,,512,512\n3,"two\nlines",,512,512\n'

    results, _ = outcomes(data)

    assert isinstance(results[0], Rejected)
    assert [r.prompt for r in results[1:]] == ["fine", "two\nlines"]


def test_spaces_after_commas_work_in_rows_as_they_do_in_the_header():
    # Given a hand-written file with a space after each comma, prompts quoted
    data = (
        b"id, prompt, negative_prompt, width, height\n"
        b'1, "a cat, black", "", 512, 512\n'
        b'2, "a dog", , 512, 512\n'
    )

    # When read
    results, _ = outcomes(data)

    # Then the prompts are the quoted text, without the quote characters
    assert [getattr(r, "prompt", r) for r in results] == ["a cat, black", "a dog"]


# --------------------------------------------------------------------------- bytes to lines


def test_lines_cut_anywhere_between_chunks_give_the_same_rows():
    # Given a CRLF file with multi-byte characters (é, ☕)
    data = 'id,prompt\r\n1,café ☕\r\n2,"two\r\nlines"\r\n3,thé\r\n'.encode()
    whole, _ = outcomes(data)

    # When the bytes arrive with a CRLF split between two chunks
    cut = data.index(b"\r\n") + 1
    split_crlf = list(split_lines([data[:cut], data[cut:]]))

    # Then the lines are the same as unsplit, and so are the rows read one byte at a time
    assert split_crlf == [
        b"id,prompt\r\n",
        "1,café ☕\r\n".encode(),
        b'2,"two\r\n',
        b'lines"\r\n',
        "3,thé\r\n".encode(),
    ]
    for size in (1, 2, 5):
        assert outcomes(data, chunk_size=size)[0] == whole
    assert [t.prompt for t in whole] == ["café ☕", "two\r\nlines", "thé"]


def test_split_lines_gives_the_same_lines_however_the_bytes_are_chunked():
    import hypothesis

    st = hypothesis.strategies
    pieces = st.sampled_from([b"a", b",", b'"', b"\r", b"\n", b"\r\n", "é".encode(), b"\xff", b""])

    @hypothesis.settings(database=None, max_examples=300, deadline=None)
    @hypothesis.given(data=st.lists(pieces, max_size=40).map(b"".join), cuts=st.lists(st.integers(0, 80)))
    def check(data: bytes, cuts: list[int]) -> None:
        bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
        chunks = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]

        lines = list(split_lines(chunks))

        assert lines == list(split_lines([data]))
        assert b"".join(lines) == data
        for line in lines[:-1]:
            assert line.endswith((b"\n", b"\r"))
        for line in lines:
            body = line.removesuffix(b"\n").removesuffix(b"\r")
            assert b"\r" not in body and b"\n" not in body

    check()


# --------------------------------------------------------------------------- JSONL


def test_jsonl_objects_with_numbers_and_whole_number_ids_become_tasks():
    # Given the example JSONL plus a line with a numeric id and a float height
    data = (EXAMPLES / "prompts.jsonl").read_bytes() + b'{"id": 7, "prompt": "a robot", "height": 512.0}\n'

    # When read
    results, report = outcomes(data, "jsonl")

    # Then every line is a task; numbers are sizes, the numeric id is text
    assert [(t.row_id, t.width, t.height, t.negative_prompt, t.provider) for t in results] == [
        ("sunrise", 1376, 768, "", "atlascloud"),
        ("teapot", 1024, 1024, "text, watermark", "baidu-oauth"),
        ("7", 1024, 512, "", "atlascloud"),
    ]
    assert results[1].steps == 30
    assert report.format == "jsonl"


def test_a_jsonl_line_that_is_not_a_json_object_is_rejected_and_the_others_are_read():
    # Given a trailing comma on line 2 and an array on line 3, between good lines
    data = (
        b'{"id": "a", "prompt": "one"}\n'
        b'{"id": "b", "prompt": "two",}\n'
        b"[1, 2]\n"
        b"\n"
        b'{"id": "c", "prompt": "three"}\n'
    )

    # When read
    results, report = outcomes(data, "jsonl")

    # Then each bad line is rejected with what is wrong; the blank line is only counted
    assert results[1] == Rejected(
        2, "the line is not valid JSON: Expecting property name enclosed in double quotes at column 29"
    )
    assert results[2] == Rejected(3, "the line is JSON but not an object (got list)")
    assert [(t.row_id, t.row_number) for t in (results[0], results[3])] == [("a", 1), ("c", 4)]
    assert report.blank_rows == 1


def test_a_jsonl_id_that_is_not_text_or_a_whole_number_is_rejected():
    results, _ = outcomes(b'{"id": 1.5, "prompt": "a"}\n{"id": true, "prompt": "b"}\n', "jsonl")

    assert [r.message for r in results] == ["the id must be text or a whole number"] * 2


@pytest.mark.parametrize(
    "line",
    [b"[" * 100_000, b'{"id": "big", "prompt": "a", "width": ' + b"9" * 5000 + b"}"],
    ids=["deeply-nested", "5000-digit-number"],
)
def test_a_jsonl_line_the_json_parser_gives_up_on_is_rejected_alone(line):
    # Given one pathological line between two good ones
    data = b'{"id": "a", "prompt": "one"}\n' + line + b'\n{"id": "c", "prompt": "three"}\n'

    # When read
    results, _ = outcomes(data, "jsonl")

    # Then that line is rejected and the others are tasks
    assert isinstance(results[1], Rejected)
    assert [getattr(r, "row_id", None) for r in results] == ["a", None, "c"]


def test_a_jsonl_prompt_with_an_escaped_lone_surrogate_is_rejected_not_a_crash():
    # Given valid JSON whose prompt escapes half of a surrogate pair
    data = b'{"id": "x", "prompt": "a \\ud800 b"}\n{"id": "y", "prompt": "fine"}\n'

    # When read, Then the row is rejected and the next one is a task
    results, _ = outcomes(data, "jsonl")
    assert isinstance(results[0], Rejected)
    assert results[1].row_id == "y"


def test_columns_the_pipeline_does_not_use_are_reported_not_fatal():
    # Given extra keys in JSONL lines and an extra column in a CSV
    jsonl = b'{"prompt": "a", "seed": 1}\n{"prompt": "b", "style": "oil", "mood": 2}\n'
    csv_data = b"id,prompt,notes\n1,a cat,remember the hat\n"

    # When both are read
    jsonl_results, jsonl_report = outcomes(jsonl, "jsonl")
    csv_results, csv_report = outcomes(csv_data)

    # Then the rows are tasks and the unknown names are listed once each
    assert jsonl_report.ignored_columns == ["mood", "style"]
    assert csv_report.ignored_columns == ["notes"]
    assert all(isinstance(r, ImageTask) for r in jsonl_results + csv_results)


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("key", "fmt"),
    [
        ("inbox/spring.csv", "csv"),
        ("inbox/SPRING.CSV", "csv"),
        ("inbox/spring.JSONL", "jsonl"),
        ("inbox/spring.json", "json"),
    ],
)
def test_the_format_comes_from_the_file_extension_in_any_case(key, fmt):
    assert format_for_key(key) == fmt


def test_another_file_type_is_unreadable_and_says_which_types_work():
    with pytest.raises(InputUnreadable, match=r"'inbox/prompts.txt': use a \.csv, \.jsonl or \.json file"):
        format_for_key("inbox/prompts.txt")


# --------------------------------------------------------------------------- per-row parameters


def test_per_row_parameters_map_onto_the_task():
    # Given a row that sets every optional column
    data = (
        b"id,prompt,provider,model,n,seed,steps,guidance,params\n"
        b'1,a fox,qianfan,flux.1-schnell,2,42,8,3.5,"{""style"": ""vivid""}"\n'
        b"2,a hare,,,,,,,\n"
    )

    # When read
    (fox, hare), _ = outcomes(data)

    # Then each value is on the task; blank columns fall back to the stack's defaults
    assert (fox.provider, fox.model, fox.n, fox.seed, fox.steps, fox.guidance, fox.params) == (
        "qianfan",
        "flux.1-schnell",
        2,
        42,
        8,
        3.5,
        {"style": "vivid"},
    )
    assert (hare.provider, hare.model, hare.n, hare.seed, hare.params) == ("atlascloud", None, 1, None, {})


@pytest.mark.parametrize(
    ("columns", "values", "reason"),
    [
        ("seed", "-3", "the seed '-3' is not a whole number"),
        ("seed", "99999999999", "the seed 99999999999 is out of range"),
        ("steps", "0", "the steps 0 is out of range"),
        ("n", "11", "the n 11 is out of range"),
        ("guidance", "lots", "the guidance 'lots' is not a number"),
        ("guidance", "nan", "out of range"),
        ("params", '"[1, 2]"', "the params must be a JSON object"),
        ("params", '"{not json"', "the params must be a JSON object"),
        ("params", '"{""model"": ""x""}"', "the params cannot set model"),
        ("provider", "dall-e", "the provider 'dall-e' is not one of"),
    ],
)
def test_a_bad_per_row_parameter_rejects_only_that_row_with_the_reason(columns, values, reason):
    data = f"id,prompt,{columns}\nbad,a fox,{values}\ngood,a hare,\n".encode()

    (bad, good), _ = outcomes(data)

    assert isinstance(bad, Rejected) and reason in bad.message
    assert isinstance(good, ImageTask)


@pytest.mark.parametrize(
    ("data", "fmt", "expected"),
    [
        pytest.param(
            b"id,prompt\nhuge," + b"x" * 1_100_000 + b"\n", "csv", "huge", id="csv-field-over-limit"
        ),
        pytest.param(b'prompt,id\n"a, b",second,"open\n', "csv", "second", id="csv-id-not-first"),
        pytest.param(b'id,prompt\n"quo""ted",a,b\n', "csv", 'quo"ted', id="csv-too-many-fields"),
        pytest.param(
            b"prompt,id\n" + b"x" * 1_100_000 + b",late\n", "csv", "late", id="csv-id-after-long-field"
        ),
        pytest.param(
            b'{"id": 42, "prompt": "' + b"x" * 1_100_000 + b'"}\n', "jsonl", "42", id="jsonl-line-over-limit"
        ),
        pytest.param(
            b'{"n": [1, {"id": 3}], "id": "kept", "prompt": tru}\n', "jsonl", "kept", id="jsonl-bad-later"
        ),
        pytest.param(b'{"prompt": tru, "id": "late"}\n', "jsonl", None, id="jsonl-id-after-bad-value"),
        pytest.param(
            b'{"id": "' + b"i" * 2000 + b'", "prompt": tru}\n', "jsonl", None, id="jsonl-id-too-long"
        ),
    ],
)
def test_a_row_that_cannot_be_read_keeps_its_id_when_the_id_can_be(data: bytes, fmt: str, expected):
    # Given a row that cannot be read as a whole (issue 10, defect 13: rejected with id null)
    (row,), _ = read(data, fmt)

    # Then it is rejected, and reported under its id when that much of it is readable
    assert row.values is None and row.problem
    assert row_id_of(row) == expected


def test_thousands_of_unknown_columns_are_reported_in_bounded_space():
    # Given a JSONL file whose rows bring 5,000 distinct unknown keys, some very long
    lines = [
        '{"prompt": "a", ' + ", ".join(f'"{"k" * 500}{i}-{j}": 1' for j in range(50)) + "}"
        for i in range(100)
    ]

    # When it is read
    _, report = read("\n".join(lines).encode(), "jsonl")

    # Then 20 names are kept, each cut short, and the rest counted
    assert report.ignored_column_count == 5000 and len(report.ignored_columns) == 20
    assert all(len(name) <= 63 for name in report.ignored_columns)
    warning = report.columns_warning()
    assert warning is not None and warning.endswith("and 4,980 more") and len(warning) < 2000


# --------------------------------------------------------------------------- reading on from a row's end
# A split that runs low on time stops after a row and a later invocation reads on from that row's end
# (imagepipe.splitter): what it reads must be exactly the rest of the file's rows.


def _rows_from(data: bytes, fmt: str, first: int = 0, size: int = 7) -> list[RawRow]:
    _, stream = utf8_stream(chunked(data, size), fmt)
    return list(read_rows(text_lines_at(stream), fmt, ReadReport(), first_number=first))


def _same(rows: list[RawRow]) -> list[tuple]:
    return [(r.number, r.values, r.problem, r.readable_id) for r in rows]


CSV_TRICKY = (
    b"id,prompt,note\r\n"
    b'a,"a cat, on a mat",x\r\n'
    b'b,"a prompt\nover two lines",y\n'
    b"\n"
    b'c,"an open quote,z\n'
    b"d,a dog,w\n" + b"e," + b"long " * 40 + b",v\n" + b"f,last row without a line end"
)
JSONL_TRICKY = (
    b'{"id": "a", "prompt": "a cat"}\n\n{"id": "b", "prompt": "cut\n[1, 2]\n{"id": "c", "prompt": "x"}'
)


@pytest.mark.parametrize(("fmt", "data"), [("csv", CSV_TRICKY), ("jsonl", JSONL_TRICKY)])
def test_reading_on_from_any_rows_end_gives_exactly_the_rows_after_it(fmt, data):
    whole = _rows_from(data, fmt)
    assert all(r.end is not None for r in whole) and len(whole) >= 4
    header = ReadReport()
    _, stream = utf8_stream([data], fmt)
    list(read_rows(text_lines_at(stream), fmt, header))
    for row in whole:
        # What a continuation reads: the CSV header again, then the file from the row's end
        rest = data[: header.header_end] + data[row.end :]
        after = _rows_from(rest, fmt, first=row.number)
        assert _same(after) == _same(whole[row.number :]), row.number


def test_line_ends_count_every_byte_also_of_a_cut_line():
    data = b"short\r\n" + b"x" * 50 + b"\r\nend\n" + b"y" * 30
    for size in (1, 3, 8, 64):
        lines = list(split_lines_at(chunked(data, size), max_line=10))
        assert [end for _, end in lines] == [7, 59, 63, 93]
        assert [line for line, _ in lines] == [b"short\r\n", b"x" * 10 + b"\n", b"end\n", b"y" * 10 + b"\n"]


JSON_ROWS = [
    {"id": "a", "prompt": "a cat", "tag": "x"},
    {"id": "b", "prompt": 'a {brace} and a "quote" ]'},
    7,
    [1, 2],
    {"id": "c", "prompt": "", "params": {"quality": "high"}},
    {"id": "d", "prompt": "last"},
]


def test_a_json_array_is_read_like_the_same_objects_in_jsonl():
    as_json = json.dumps(JSON_ROWS, indent=2).encode()
    as_jsonl = b"".join(json.dumps(row).encode() + b"\n" for row in JSON_ROWS)
    json_report, jsonl_report = ReadReport(), ReadReport()
    from_json = list(JsonRows(chunked(as_json, 5), json_report))
    _, stream = utf8_stream([as_jsonl], "jsonl")
    from_jsonl = list(read_rows(text_lines_at(stream), "jsonl", jsonl_report))

    assert [(r.number, r.values) for r in from_json] == [(r.number, r.values) for r in from_jsonl]
    assert [r.problem for r in from_json][2:4] == [
        "the element is JSON but not an object (got int)",
        "the element is JSON but not an object (got an array)",
    ]
    assert json_report.ignored_columns == jsonl_report.ignored_columns == ["tag"]


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_read_on_from_where_a_precise_read_stopped_gives_exactly_the_rest(indent):
    data = json.dumps(JSON_ROWS, indent=indent).encode()
    whole = list(JsonRows([data], ReadReport()))
    for stop_after in range(len(JSON_ROWS)):
        # A reader asked for precise ends after `stop_after` rows stops at the first row that has one
        reader = JsonRows(chunked(data, 16), ReadReport())
        read = []
        for row in reader:
            read.append(row)
            if len(read) >= stop_after:
                reader.precise()
            if len(read) >= stop_after and row.end is not None:
                break
        last = read[-1]
        # ... and a reader resuming from that end reads exactly the rows after it
        rest = list(
            JsonRows(chunked(data[last.end :], 16), ReadReport(), first_number=last.number, resume=True)
        )
        assert [(r.number, r.values, r.problem) for r in read + rest] == [
            (r.number, r.values, r.problem) for r in whole
        ]


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", InputUnreadable, "the file is empty"),
        (b'{"id": "1"}', InputUnreadable, "the file is one JSON object, not an array of rows"),
        (b"\xef\xbb\xbf  [1", InputBroken, "the file ends before the JSON array is closed (after row 1)"),
        (b'[{"id": "1"}, {"id": 2,, }]', InputBroken, "the JSON is not valid before byte"),
        (b'[{"a": "' + b"x" * (MAX_ELEMENT_BYTES + 10), InputUnreadable, "row 1 of the JSON array is longer"),
    ],
)
def test_a_json_file_that_is_not_an_array_of_rows_says_what_is_wrong(data, error, message):
    with pytest.raises(error, match=re.escape(message)):
        list(JsonRows(chunked(data, 256 * 1024), ReadReport()))
