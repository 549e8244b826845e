"""The task message that crosses TasksQueue (imagepipe.contract) and the file names made from row ids."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import ValidationError

from imagepipe.contract import ImageTask, LocalOutcome, LocalOutcomeRecord, TaskRecord, safe_name

from conftest import load_event

SAFE = re.compile(r"[A-Za-z0-9_-]+")
TASK = {"job_id": "spring-campaign", "row_id": "1", "row_number": 1, "prompt": "a cat on a table"}


# --------------------------------------------------------------------------- safe_name


@pytest.mark.parametrize("row_id", ["1", "42", "cat_01", "Row-7", "a" * 80])
def test_a_simple_id_is_its_own_file_name(row_id):
    assert safe_name(row_id) == row_id


@pytest.mark.parametrize(
    ("row_id", "name"),
    [
        ("a b", "a_b-zbuhucfklvxnebcdfd5gu2l2xa"),
        ("../../etc/passwd", "etc_passwd-g5knnsz2hdqrqxs3hawv6pxt6e"),
        ("", "row-4oymiquy7qobjgx36tejs35zeq"),
        ("..", "row-l3a7pzya6n6d2czjqhieqvp4gq"),
        ("猫", "row-vail7bc2gbzyeemonzvo6inht4"),
    ],
)
def test_a_changed_id_gets_the_same_name_in_every_release(row_id, name):
    # Images and outcomes of earlier attempts are found by this name: it must not drift.
    assert safe_name(row_id) == name


def test_ids_that_differ_after_the_first_80_characters_get_different_names():
    # Given two long ids that only differ at the end
    first, second = "a" * 100 + "1", "a" * 100 + "2"

    # When named
    names = safe_name(first), safe_name(second)

    # Then both are shortened, and still distinct
    assert names[0] != names[1]
    assert all(len(name) == 80 + 1 + 26 and name.startswith("a" * 80) for name in names)


def test_a_name_is_only_letters_digits_underscore_and_dash_for_any_id():
    import hypothesis

    st = hypothesis.strategies

    @hypothesis.settings(database=None, max_examples=500, deadline=None)
    @hypothesis.given(st.text(st.characters(exclude_categories=())))  # lone surrogates included
    @hypothesis.example("../../etc/passwd")
    @hypothesis.example("")
    @hypothesis.example("..")
    @hypothesis.example(".")
    @hypothesis.example("/")
    @hypothesis.example("__--__")
    @hypothesis.example("\udcff")  # what an undecodable byte becomes
    def check(row_id: str) -> None:
        name = safe_name(row_id)

        # Never empty, never a path or a hidden file, the same every time
        assert SAFE.fullmatch(name), name
        assert "/" not in name and "." not in name
        assert safe_name(row_id) == name

    check()


def test_two_different_ids_never_share_a_name():
    import hypothesis

    st = hypothesis.strategies
    # Small alphabets so the generated pairs often collapse to the same slug, and ids that end like a
    # changed name ("-" and 26 base32 letters), some of them another generated id's name.
    ids = st.text(st.sampled_from("aB1 _-./é"), max_size=12) | st.text(max_size=12)
    hashed_like = st.builds(
        lambda start, tail: f"{start}-{tail}", ids, st.text("abyz27", min_size=26, max_size=26)
    )
    ids = ids | hashed_like | ids.map(safe_name)

    @hypothesis.settings(database=None, max_examples=500, deadline=None)
    @hypothesis.given(ids, ids)
    @hypothesis.example("a b", "a_b")
    @hypothesis.example("a/b", "a.b")
    @hypothesis.example("", "row")
    @hypothesis.example("x", "_x_")
    @hypothesis.example("且他", "丮俲")  # one name under a 32-bit hash
    @hypothesis.example("a b", safe_name("a b"))
    def check(first: str, second: str) -> None:
        hypothesis.assume(first != second)
        assert safe_name(first) != safe_name(second)

    check()


def _cjk(number: int) -> str:
    """A row id of CJK characters only (no ASCII letter or digit), one per number."""
    chars = ""
    while True:
        chars = chr(0x4E00 + number % 1000) + chars
        number //= 1000
        if not number:
            return chars


def test_100000_chinese_ids_get_100000_names():
    # Given 100,000 different ids with no ASCII letter or digit (every one needs a hash to be named);
    # a 32-bit hash gave two of them ("且他" and "丮俲") one name
    ids = [_cjk(number) for number in range(100_000)]
    assert len(set(ids)) == len(ids)

    # When named
    names = {safe_name(row_id) for row_id in ids}

    # Then no two share a name, and each keeps the readable start and 128 bits of hash
    assert len(names) == len(ids)
    assert all(re.fullmatch(r"row-[a-z2-7]{26}", name) for name in names)


def test_an_id_equal_to_another_ids_name_gets_a_name_of_its_own():
    # Given a crafted pair: one id, and a second id that is exactly the first one's name
    for row_id in ("且他", "a b", "x" * 100, "-row-"):
        crafted = safe_name(row_id)

        # Then the two rows get different names (else they share one task record and one image)
        assert safe_name(crafted) != crafted
        assert safe_name(crafted) != safe_name(row_id)


def test_an_id_that_looks_like_a_changed_name_does_not_take_that_name():
    # Given one row with id "a b" and another whose id is the name "a b" is given
    changed = safe_name("a b")

    # Then the two rows still get different names (else one image overwrites the other)
    assert safe_name(changed) != changed


def test_a_task_image_is_named_after_its_row_id():
    task = ImageTask(**{**TASK, "row_id": "cat photo #1"})

    assert task.image_name == safe_name("cat photo #1")
    assert SAFE.fullmatch(task.image_name)


# --------------------------------------------------------------------------- ImageTask


def test_a_task_without_size_or_count_asks_for_one_1024_square_image():
    task = ImageTask(**TASK)

    assert (task.version, task.width, task.height, task.n, task.negative_prompt, task.model) == (
        2,
        1024,
        1024,
        1,
        "",
        None,
    )
    assert task.provider == "atlascloud" and task.params == {} and task.prediction_id is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"version": 1}, "version"),
        ({"style": "oil"}, "style"),
        ({"provider": "midjourney"}, "provider"),
        ({"seed": -1}, "seed"),
        ({"width": 4096}, "width"),
        ({"height": 100}, "height"),
        ({"n": 11}, "n"),
        ({"job_id": "../other-job"}, "job_id"),
        ({"prompt": ""}, "prompt"),
    ],
    ids=[
        "version-1",
        "extra-field",
        "unknown-provider",
        "negative-seed",
        "width-4096",
        "height-not-multiple-of-8",
        "n-11",
        "job-id-path",
        "empty",
    ],
)
def test_a_message_that_is_not_a_valid_version_2_task_is_refused(change, field):
    with pytest.raises(ValidationError) as raised:
        ImageTask(**{**TASK, **change})

    assert [error["loc"] for error in raised.value.errors()] == [(field,)]


def test_a_task_comes_back_unchanged_from_its_queue_message():
    task = ImageTask(**{**TASK, "negative_prompt": "blurry", "width": 768, "height": 512, "n": 2})

    assert ImageTask.model_validate_json(task.model_dump_json()) == task


def test_the_sqs_records_lambda_receives_parse_into_tasks():
    # Given the SQS event Lambda gets for three queued rows (each body is JSON text)
    records = load_event("sqs_tasks.json")["Records"]

    # When each record is parsed
    parsed = [TaskRecord.model_validate(record) for record in records]

    # Then every body is a validated ImageTask, with its row's values
    assert all(isinstance(record.body, ImageTask) for record in parsed)
    dog = parsed[1]
    assert (dog.messageId, dog.body.row_id, dog.body.prompt, dog.body.seed) == (
        "059f36b4-87a3-44ab-83d2-661975951042",
        "2",
        "a dog in a garden",
        7,
    )
    assert (dog.body.width, dog.body.height, dog.body.job_id) == (1376, 768, "spring-campaign")
    assert {record.body.provider for record in parsed} == {"atlascloud"}
    assert [record.body.row_number for record in parsed] == [1, 2, 3]


@pytest.mark.parametrize(
    "body",
    ['{"version": 2, "something": "else"}', "a cat on a table", json.dumps({**TASK, "width": 4096})],
    ids=["version-2", "not-json", "width-4096"],
)
def test_an_sqs_record_whose_body_is_not_a_task_is_refused(body):
    record = {**load_event("sqs_tasks.json")["Records"][0], "body": body}

    with pytest.raises(ValidationError):
        TaskRecord.model_validate(record)


# --------------------------------------------------------------------------- the local route (issue 12)

LOCAL = {**TASK, "backend": "local", "provider": "comfyui"}
IMAGE = "s3://imagepipe-input-123/campaign/cat.png"


def test_a_queued_task_from_before_the_local_route_still_parses_as_a_cloud_task():
    # Given a message written by the previous release (no backend, workflow or image fields)
    record = load_event("sqs_tasks.json")["Records"][0]
    assert "backend" not in json.loads(record["body"])

    # When parsed
    task = TaskRecord.model_validate(record).body

    # Then it is a cloud task with nothing of the local route
    assert (task.version, task.backend, task.workflow, task.images, task.columns) == (
        2,
        "cloud",
        None,
        {},
        {},
    )


def test_a_local_task_comes_back_unchanged_from_its_queue_message():
    task = ImageTask(
        **LOCAL,
        workflow="inpaint",
        init_image=IMAGE,
        mask_image="s3://imagepipe-input-123/campaign/mask.png",
        columns={"style": "oil"},
    )

    again = ImageTask.model_validate_json(task.model_dump_json())

    assert again == task
    assert again.images == {"init_image": IMAGE, "mask_image": "s3://imagepipe-input-123/campaign/mask.png"}


@pytest.mark.parametrize(
    "change",
    [
        {"provider": "atlascloud"},
        {"backend": "cloud"},
        {"init_image": "https://example.com/cat.png"},
        {"init_image": "campaign/cat.png"},
        {"mask_image": IMAGE},
        {"control_image": IMAGE},
        {"controlnet": "canny"},
    ],
    ids=[
        "local-with-cloud-provider",
        "comfyui-on-cloud",
        "url",
        "not-a-uri",
        "mask-alone",
        "control-alone",
        "controlnet-alone",
    ],
)
def test_a_local_task_that_does_not_fit_its_route_is_refused(change):
    with pytest.raises(ValidationError):
        ImageTask(**{**LOCAL, **change})


@pytest.mark.parametrize(
    "change", [{"init_image": IMAGE}, {"workflow": "txt2img"}, {"columns": {"style": "oil"}}], ids=str
)
def test_a_cloud_task_never_carries_what_only_the_agent_can_use(change):
    with pytest.raises(ValidationError):
        ImageTask(**{**TASK, **change})


OUTCOME = {"job_id": "spring-campaign", "row_id": "1", "row_number": 1, "status": "succeeded"}


def test_an_outcome_record_parses_into_a_local_outcome():
    body = {
        **OUTCOME,
        "images": ["jobs/spring-campaign/images/1.png"],
        "prompt_id": "p-1",
        "gpu_seconds": 3.5,
    }
    record = {**load_event("sqs_tasks.json")["Records"][0], "body": json.dumps({**body, "agent": "v9"})}

    outcome = LocalOutcomeRecord.model_validate(record).body

    # An agent newer than the stack may add fields: they are ignored, the outcome still counts
    assert outcome == LocalOutcome(**body)
    assert (outcome.workflow, outcome.reason, outcome.gpu_seconds) == (None, None, 3.5)


@pytest.mark.parametrize(
    "change",
    [{}, {"status": "failed"}, {"status": "retry"}, {"gpu_seconds": -1, "images": ["k"]}],
    ids=["succeeded-without-images", "failed-without-reason", "unknown-status", "negative-gpu-seconds"],
)
def test_an_outcome_that_says_too_little_is_refused(change):
    with pytest.raises(ValidationError):
        LocalOutcome(**{**OUTCOME, **change})


def test_a_cloud_task_message_leaves_out_the_local_route_fields_so_an_older_generator_parses_it():
    from imagepipe.contract import LOCAL_FIELDS

    task = ImageTask(job_id="j1", row_id="r1", row_number=1, prompt="a mug", provider="qianfan")
    body = json.loads(task.body())

    assert not set(LOCAL_FIELDS) & set(body)
    assert ImageTask.model_validate_json(task.body()) == task
