"""Every event the splitter may receive becomes job requests (imagepipe.triggers), or one TriggerError."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagepipe import triggers
from imagepipe.triggers import (
    MAX_INLINE_ROWS,
    InlineRequest,
    ObjectRequest,
    TriggerError,
    job_requests,
)

EVENTS = Path(__file__).resolve().parents[2] / "events"
# Every event in events/ names the local stack's input bucket (`imagepipe up`, the tests' stack).
BUCKET = LOCAL_BUCKET = "imagepipe-local-input-123456789012-us-east-1"
KEY = "inbox/spring campaign.csv"
ETAG = "0f343b0931126a20f133d67c2b018a3b"
SAMPLES = [
    "s3_put_csv.json",
    "s3_test_event.json",
    "eventbridge_object_created.json",
    "sqs_wrapped_s3.json",
    "sns_wrapped_s3.json",
    "sqs_sns_wrapped_s3.json",
    "job_requested_object.json",
    "job_requested_inline.json",
]


def load_event(name: str) -> dict:
    return json.loads((EVENTS / name).read_text())


class FakeLogger:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict]] = []

    def info(self, message: str, extra: dict | None = None) -> None:
        self.lines.append((message, extra or {}))

    warning = info


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> FakeLogger:
    fake = FakeLogger()
    monkeypatch.setattr(triggers, "logger", fake)
    return fake


def s3_event(key: str, event_name: str = "ObjectCreated:Put") -> dict:
    event = load_event("s3_put_csv.json")
    event["Records"][0]["eventName"] = event_name
    event["Records"][0]["s3"]["object"]["key"] = key
    return event


def eventbridge_event(key: str, detail_type: str = "Object Created") -> dict:
    event = load_event("eventbridge_object_created.json")
    event["detail-type"] = detail_type
    event["detail"]["object"]["key"] = key
    return event


def job_event(detail: Any) -> dict:
    event = load_event("job_requested_object.json")
    event["detail"] = detail
    return event


def in_sqs(*bodies: dict) -> dict:
    event = load_event("sqs_wrapped_s3.json")
    template = event["Records"][0]
    event["Records"] = [
        {**template, "messageId": f"m{i}", "body": json.dumps(body)} for i, body in enumerate(bodies, 1)
    ]
    return event


def error_of(event: Any, **kwargs: Any) -> str:
    with pytest.raises(TriggerError) as caught:
        job_requests(event, **kwargs)
    return str(caught.value)


# --- S3 notifications ------------------------------------------------------------------------------


def test_an_s3_notification_asks_to_split_the_uploaded_object():
    # Given the S3 notification for an upload of "spring campaign.csv" (key sent as "spring+campaign.csv")
    event = load_event("s3_put_csv.json")

    # When it is read
    requests = job_requests(event)

    # Then it asks for that object, key decoded, with its ETag
    assert requests == [
        ObjectRequest(
            bucket=LOCAL_BUCKET,
            key=KEY,
            etag="d41d8cd98f00b204e9800998ecf8427e",
            version_id=None,
            source="s3",
        )
    ]


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("inbox/spring+campaign.csv", "inbox/spring campaign.csv"),
        ("inbox/c%2B%2B+prompts.csv", "inbox/c++ prompts.csv"),
        ("inbox/caf%C3%A9+%281%29.jsonl", "inbox/café (1).jsonl"),
        ("inbox/100%25.csv", "inbox/100%.csv"),
    ],
)
def test_s3_notification_keys_are_url_decoded(sent: str, stored: str):
    # Given a notification whose key S3 URL-encoded ('+' for space, %2B for '+')
    # When it is read
    [request] = job_requests(s3_event(sent))
    # Then the request carries the key exactly as stored
    assert request.key == stored


def test_the_s3_test_event_asks_for_nothing(log: FakeLogger):
    # Given the s3:TestEvent S3 sends when a notification is configured
    # When it is read
    # Then there is nothing to do, and the skip is logged
    assert job_requests(load_event("s3_test_event.json")) == []
    assert log.lines[0][0] == "skipping s3:TestEvent"


@pytest.mark.parametrize("key", ["inbox/readme.txt", "inbox/image.png", "inbox/prompts.csv.bak", "inbox/"])
def test_s3_objects_that_are_not_csv_or_jsonl_are_skipped_without_error(key: str, log: FakeLogger):
    # Given a notification for an object the splitter cannot read (the bucket's filter was broader)
    # When it is read
    # Then no job is asked for, no error is raised, and the skipped key is logged
    assert job_requests(s3_event(key)) == []
    assert log.lines == [
        ("skipping object: not a .csv, .jsonl or .json file", {"bucket": LOCAL_BUCKET, "key": key})
    ]


@pytest.mark.parametrize("key", ["inbox/PROMPTS.CSV", "inbox/prompts.Jsonl", "prompts.jsonl"])
def test_csv_and_jsonl_suffixes_are_recognised_in_any_case(key: str):
    assert [request.key for request in job_requests(s3_event(key))] == [key]


def test_s3_events_other_than_object_creation_are_skipped(log: FakeLogger):
    # Given an ObjectRemoved notification for a CSV (a notification configured for more than uploads)
    event = s3_event("inbox/old.csv", event_name="ObjectRemoved:Delete")
    # When it is read
    # Then there is nothing to split
    assert job_requests(event) == []
    assert log.lines[0][1] == {"event_name": "ObjectRemoved:Delete"}


# --- EventBridge "Object Created" ------------------------------------------------------------------


def test_an_eventbridge_object_created_event_asks_to_split_the_object():
    # Given S3's EventBridge event for a versioned upload
    # When it is read
    # Then it asks for that object version, with its ETag
    assert job_requests(load_event("eventbridge_object_created.json")) == [
        ObjectRequest(BUCKET, KEY, ETAG, "IYV3p45BT0ac8hjHg1houSdS1a.Mro8e", "eventbridge")
    ]


@pytest.mark.parametrize("key", ["inbox/a+b.csv", "inbox/c%2B%2B.csv", "inbox/spring campaign.csv"])
def test_eventbridge_keys_are_taken_literally(key: str):
    # Given an EventBridge event (EventBridge does not URL-encode keys)
    # When it is read
    [request] = job_requests(eventbridge_event(key))
    # Then '+' and '%2B' stay as they are
    assert request.key == key


def test_eventbridge_objects_that_are_not_csv_or_jsonl_are_skipped(log: FakeLogger):
    assert job_requests(eventbridge_event("inbox/photo.png")) == []
    assert log.lines[0][1]["key"] == "inbox/photo.png"


def test_other_s3_eventbridge_events_are_skipped(log: FakeLogger):
    # Given an "Object Deleted" event that a broad rule (source aws.s3) forwarded
    # When it is read
    # Then there is nothing to split
    assert job_requests(eventbridge_event(KEY, detail_type="Object Deleted")) == []
    assert log.lines[0][1] == {"detail_type": "Object Deleted"}


# --- SQS and SNS wrappers --------------------------------------------------------------------------


def test_s3_notifications_delivered_through_sqs_ask_for_each_object_and_skip_the_test_event():
    # Given an SQS batch: S3's test event, then two uploads ('+' for space, %2B for '+')
    # When it is read
    requests = job_requests(load_event("sqs_wrapped_s3.json"))
    # Then the test event is skipped and both uploads are asked for, decoded, in order
    assert [(r.key, r.source) for r in requests] == [(KEY, "sqs"), ("inbox/c++ prompts.jsonl", "sqs")]
    assert requests[0] == ObjectRequest(BUCKET, KEY, ETAG, None, "sqs")


def test_eventbridge_events_delivered_through_sqs_keep_their_keys_literal():
    # Given an EventBridge rule whose target is an SQS queue
    event = in_sqs(eventbridge_event("inbox/a+b.csv"))
    # When it is read
    # Then the object is asked for, key undecoded, as delivered by SQS
    assert job_requests(event) == [
        ObjectRequest(BUCKET, "inbox/a+b.csv", ETAG, "IYV3p45BT0ac8hjHg1houSdS1a.Mro8e", "sqs")
    ]


def test_job_requests_delivered_through_sqs_are_requests():
    [request] = job_requests(in_sqs(load_event("job_requested_object.json")))
    assert request.source == "request" and request.job_id == "spring-campaign-2026"


def test_s3_notifications_delivered_through_sns_ask_for_the_object():
    # Given S3 -> SNS -> Lambda
    # When it is read
    # Then the object is asked for, key decoded
    assert job_requests(load_event("sns_wrapped_s3.json")) == [ObjectRequest(BUCKET, KEY, ETAG, None, "sns")]


def test_s3_notifications_delivered_through_sns_then_sqs_ask_for_the_object():
    # Given S3 -> SNS -> SQS -> Lambda without raw message delivery (the body is SNS's envelope)
    # When it is read
    # Then the object is asked for, key decoded
    assert job_requests(load_event("sqs_sns_wrapped_s3.json")) == [
        ObjectRequest(BUCKET, KEY, ETAG, None, "sqs")
    ]


def test_eventbridge_events_delivered_through_sns_keep_their_keys_literal():
    event = load_event("sns_wrapped_s3.json")
    event["Records"][0]["Sns"]["Message"] = json.dumps(eventbridge_event("inbox/a+b.jsonl"))
    [request] = job_requests(event)
    assert (request.key, request.source) == ("inbox/a+b.jsonl", "sns")


def test_an_s3_test_event_delivered_through_sns_asks_for_nothing():
    event = load_event("sns_wrapped_s3.json")
    event["Records"][0]["Sns"]["Message"] = json.dumps(load_event("s3_test_event.json"))
    assert job_requests(event) == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("not json", "the message is not JSON"),
        ("[1, 2]", "unrecognised event: a JSON list"),
        (json.dumps({"version": 2, "job_id": "j", "prompt": "a cat"}), "unrecognised event: keys"),
    ],
)
def test_a_bad_sqs_message_is_named_in_the_error(body: str, reason: str):
    # Given a batch whose second message is not an event the splitter knows
    event = in_sqs(load_event("s3_put_csv.json"), {})
    event["Records"][1]["body"] = body
    # When it is read
    message = error_of(event)
    # Then the error names the message and says what is wrong with it
    assert message.startswith("SQS message m2: ") and reason in message


def test_an_sqs_message_cannot_wrap_another_sqs_event():
    message = error_of(in_sqs(load_event("sqs_wrapped_s3.json")))
    assert "unrecognised event" in message and "aws:sqs" in message


def test_an_sns_envelope_is_accepted_only_inside_sqs():
    envelope = json.loads(load_event("sqs_sns_wrapped_s3.json")["Records"][0]["body"])
    assert "unrecognised event" in error_of(envelope)


# --- ImageJob Requested --------------------------------------------------------------------------------


def test_a_job_request_for_an_object_carries_its_job_id_and_cost_cap():
    # Given an "ImageJob Requested" event naming an object, a job id and a cost cap
    # When it is read
    # Then it asks for that object with them
    assert job_requests(load_event("job_requested_object.json")) == [
        ObjectRequest(BUCKET, KEY, None, None, "request", job_id="spring-campaign-2026", max_cost=12.5)
    ]


def test_a_job_request_for_another_bucket_is_refused_with_the_reason():
    # Given an "ImageJob Requested" naming a bucket that is not the stack's input bucket (the only one the
    # splitter may read: it would fail with AccessDenied on every retry and end in the DLQ)
    event = job_event({"bucket": "someone-elses-bucket", "key": "inbox/x.csv"})

    # When it is read by the stack's splitter
    message = error_of(event, default_bucket=BUCKET)

    # Then it is refused, saying which bucket is taken and what to do
    assert message.startswith("\"ImageJob Requested\" for bucket 'someone-elses-bucket' refused")
    assert BUCKET in message and "copy the file there" in message
    # ... and naming the input bucket itself is fine
    [request] = job_requests(job_event({"bucket": BUCKET, "key": "inbox/x.csv"}), default_bucket=BUCKET)
    assert request.bucket == BUCKET


@pytest.mark.parametrize("name", ["sqs_wrapped_s3.json", "sns_wrapped_s3.json", "sqs_sns_wrapped_s3.json"])
def test_wrapped_s3_events_of_another_bucket_are_skipped_and_logged(name: str, log: FakeLogger):
    # Given a queue or topic that also carries another bucket's uploads
    event = json.loads(json.dumps(load_event(name)).replace(BUCKET, "someone-elses-bucket"))

    # When the stack's splitter reads it
    requests = job_requests(event, default_bucket=BUCKET)

    # Then nothing is asked for (no error: the rest of a batch goes on), and the log says why
    assert requests == []
    assert (
        "skipping object: not in this stack's input bucket",
        {"bucket": "someone-elses-bucket", "key": KEY, "input_bucket": BUCKET},
    ) in log.lines
    # ... while the same events for the input bucket ask for their objects
    assert job_requests(load_event(name), default_bucket=BUCKET)


def test_a_job_request_without_a_bucket_uses_the_default_bucket():
    [request] = job_requests(job_event({"key": "inbox/x.jsonl"}), default_bucket=BUCKET)
    assert request == ObjectRequest(BUCKET, "inbox/x.jsonl", None, None, "request")


def test_a_job_request_without_a_bucket_or_default_is_refused():
    assert 'add "bucket"' in error_of(job_event({"key": "inbox/x.csv"}))


def test_a_job_request_with_inline_rows_carries_them():
    # Given an "ImageJob Requested" event with three rows inline
    event = load_event("job_requested_inline.json")
    # When it is read
    [request] = job_requests(event)
    # Then the rows are passed on as sent, with the job's name, id and cap
    assert request == InlineRequest(
        rows=event["detail"]["rows"], job_id="spring-teaser-1", max_cost=0.5, name="spring teaser"
    )
    assert request.source == "request"


def test_inline_rows_without_a_name_are_named_inline():
    [request] = job_requests(job_event({"rows": [{"prompt": "a cat"}], "max_cost": 1}))
    assert request == InlineRequest(rows=[{"prompt": "a cat"}], job_id=None, max_cost=1.0, name="inline")


def test_up_to_500_inline_rows_are_accepted_and_more_are_refused():
    rows = [{"id": str(i), "prompt": "a cat"} for i in range(MAX_INLINE_ROWS + 1)]
    [request] = job_requests(job_event({"rows": rows[:MAX_INLINE_ROWS]}))
    assert len(request.rows) == MAX_INLINE_ROWS
    message = error_of(job_event({"rows": rows}))
    assert "501 rows" in message and "upload a .csv, .jsonl or .json file" in message


@pytest.mark.parametrize(
    ("detail", "reason"),
    [
        ({}, 'needs "key"'),
        ({"bucket": BUCKET}, 'needs "key"'),
        ({"job_id": "j", "max_cost": 1}, 'needs "key"'),
        ({"key": KEY, "rows": [{"prompt": "a"}]}, 'both "rows" and "key"'),
        ({"bucket": BUCKET, "rows": [{"prompt": "a"}]}, 'both "rows" and "key"'),
        ({"key": KEY, "name": "x"}, '"name" goes only with "rows"'),
        ({"key": "inbox/photo.png"}, "is not a .csv, .jsonl or .json file"),
        ({"rows": []}, '"rows" is empty'),
        ({"rows": "id,prompt\n1,a cat"}, "rows: Input should be a valid list"),
        ({"rows": [{"prompt": "a"}, "b"]}, "rows.1: Input should be a valid dictionary"),
        ({"key": 5}, "key: Input should be a valid string"),
        ({"bucket": "", "key": KEY}, "bucket: String should have at least 1 character"),
        ({"key": KEY, "max_cost": "5"}, "max_cost: Input should be a valid number"),
        ({"key": KEY, "max_cost": True}, "max_cost: Input should be a valid number"),
        ({"key": KEY, "max_cost": -0.01}, "the max_cost -0.01 is not valid"),
        ({"key": KEY, "max_cost": math.inf}, "the max_cost inf is not valid"),
        ({"key": KEY, "max_cost": math.nan}, "the max_cost nan is not valid"),
        ({"key": KEY, "job_id": 7}, "job_id: Input should be a valid string"),
        ({"key": KEY, "job_id": "spring campaign"}, "the job_id 'spring campaign' is not valid"),
        ({"key": KEY, "job_id": "-spring"}, "the job_id '-spring' is not valid"),
        ({"key": KEY, "job_id": "spring\n"}, "the job_id 'spring\\n' is not valid"),
        ({"key": KEY, "job_id": "x" * 81}, "is not valid: use 1 to 80 letters"),
        ({"key": KEY, "maxcost": 5}, "maxcost: unknown field"),
        ("spring campaign.csv", "it must be a JSON object, not a str"),
        ('{"key": "x.csv"}', "it must be a JSON object, not a str"),
        (None, "it must be a JSON object, not a NoneType"),
    ],
)
def test_a_malformed_job_request_is_refused_with_its_reason(detail: Any, reason: str):
    # Given an "ImageJob Requested" event whose detail is malformed
    # When it is read
    message = error_of(job_event(detail), default_bucket=BUCKET)
    # Then the error names the event kind and says what to fix, on one line
    assert message.startswith('invalid "ImageJob Requested" detail: ')
    assert reason in message and "\n" not in message


def test_a_job_request_from_the_stacks_request_source_and_account_is_accepted():
    event = load_event("job_requested_object.json")
    assert event["source"] == triggers.DEFAULT_REQUEST_SOURCE == "imagepipe.requests"
    assert job_requests(event, account="123456789012")[0].source == "request"
    event["source"] = "com.example.campaigns"
    assert job_requests(event, request_source="com.example.campaigns")[0].key == KEY


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"source": "aws.s3"}, "from source 'aws.s3' refused"),
        ({"source": "com.example.campaigns"}, "from source 'com.example.campaigns' refused"),
        ({"source": None}, "from source (a NoneType) refused"),
        ({"account": "999999999999"}, "from account '999999999999' refused"),
    ],
)
def test_a_job_request_from_another_source_or_account_starts_no_job(change: dict, named: str):
    # Given an "ImageJob Requested" event put on the bus by someone else (issue 10, defect 11: anyone who
    # could put events on the default bus started paid jobs)
    event = {**load_event("job_requested_inline.json"), **change}

    # When the splitter reads it, directly or wrapped in an SQS message
    direct = error_of(event, account="123456789012")
    wrapped = error_of(in_sqs(event), account="123456789012")

    # Then it is refused with the reason, and no job is asked for
    assert named in direct and named in wrapped
    assert "imagepipe.requests" in direct or "its own account" in direct


# --- Anything else -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "named"),
    [
        ({}, "keys []"),
        ({"hello": "world"}, "keys ['hello']"),
        ({"Records": []}, "keys ['Records']"),
        ({"Records": [{"eventSource": "aws:kinesis", "kinesis": {}}]}, "eventSource 'aws:kinesis'"),
        ({"Records": [{"eventSource": "aws:s3"}, {"eventSource": "aws:sqs"}]}, "eventSource 'aws:s3'"),
        ({"detail-type": "Scheduled Event", "source": "aws.events", "detail": {}}, "'Scheduled Event'"),
        ({"detail-type": "Object Created", "source": "aws.glacier"}, "from source 'aws.glacier'"),
        ([{"Records": []}], "a JSON list"),
        ("s3://bucket/key.csv", "a JSON str"),
        (None, "a JSON NoneType"),
    ],
)
def test_an_unrecognised_event_is_refused_naming_what_was_seen(event: Any, named: str):
    message = error_of(event)
    assert message.startswith("unrecognised event: ") and named in message
    assert len(message) < 200


def test_the_generator_s_task_queue_event_is_not_a_trigger():
    message = error_of(load_event("sqs_tasks.json"))
    assert message.startswith("SQS message 059f36b4-87a3-44ab-83d2-661975951041: unrecognised event: keys [")


@pytest.mark.parametrize(
    "damage",
    [
        lambda e: e["Records"][0].pop("s3"),
        lambda e: e["Records"][0].update(s3="a string"),  # Powertools' own validator fails on this
        lambda e: e["Records"][0].update(eventName=5),
        lambda e: e["Records"][0]["s3"]["object"].pop("eTag"),
        lambda e: e["Records"][0]["s3"].update(object=None),
        lambda e: e["Records"].append("not a record"),
    ],
)
def test_a_damaged_s3_notification_is_a_trigger_error_not_a_traceback(damage):
    event = load_event("s3_put_csv.json")
    damage(event)
    assert error_of(event).startswith(("invalid S3 notification: ", "unrecognised event: "))


def test_a_damaged_sns_envelope_inside_sqs_is_a_trigger_error():
    event = load_event("sqs_sns_wrapped_s3.json")
    body = json.loads(event["Records"][0]["body"])
    del body["TopicArn"]
    event["Records"][0]["body"] = json.dumps(body)
    assert error_of(event).endswith("invalid SNS notification: TopicArn: Field required")


def test_a_damaged_eventbridge_object_created_event_is_a_trigger_error():
    event = load_event("eventbridge_object_created.json")
    del event["detail"]["bucket"]
    assert error_of(event) == "invalid S3 Object Created event: detail.bucket: Field required"


# --- Properties ----------------------------------------------------------------------------------------

WORDS = st.sampled_from(
    ["Records", "eventSource", "EventSource", "detail-type", "detail", "source", "Event", "Type", "body"]
    + ["Message", "Sns", "s3", "object", "key", "bucket", "rows", "job_id", "max_cost", "name"]
    + ["aws:s3", "aws:sqs", "aws:sns", "aws.s3", "s3:TestEvent", "Notification", "Object Created"]
    + ["ImageJob Requested", "x.csv", "{}", "[]"]
)
LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | WORDS
JSONISH = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(WORDS | st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=25,
)
SAMPLE_EVENTS = {name: load_event(name) for name in SAMPLES}


def read(event: Any) -> list | TriggerError:
    try:
        requests = job_requests(event, default_bucket=BUCKET)
    except TriggerError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 600, str(exc)
        return exc
    assert all(isinstance(r, (ObjectRequest, InlineRequest)) for r in requests)
    return requests


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=st.dictionaries(WORDS | st.text(max_size=8), JSONISH, max_size=6))
def test_any_json_object_gives_requests_or_a_trigger_error(event: dict):
    read(event)


def mutate(data: st.DataObject, value: Any) -> Any:
    """The value with one node somewhere inside it replaced, removed or (in a JSON string) damaged."""
    if isinstance(value, dict) and value and data.draw(st.integers(0, 3)):
        key = data.draw(st.sampled_from(sorted(value)))
        if data.draw(st.integers(0, 4)) == 0:
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: mutate(data, value[key])}
    if isinstance(value, list) and value and data.draw(st.integers(0, 3)):
        index = data.draw(st.integers(0, len(value) - 1))
        return [*value[:index], mutate(data, value[index]), *value[index + 1 :]]
    if isinstance(value, str) and value.startswith("{") and data.draw(st.integers(0, 3)):
        return json.dumps(mutate(data, json.loads(value)))
    return data.draw(JSONISH)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(SAMPLES), data=st.data())
def test_any_damage_to_a_real_event_gives_requests_or_a_trigger_error(name: str, data: st.DataObject):
    read(mutate(data, copy.deepcopy(SAMPLE_EVENTS[name])))
