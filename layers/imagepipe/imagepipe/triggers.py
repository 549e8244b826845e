"""What an event asks the splitter to do: every trigger shape it may receive becomes a list of job requests.

Shapes are validated with Powertools' parser models, never read by hand, so a malformed event is one
TriggerError with a short reason instead of a KeyError deep in the handler:

- S3 notifications, direct or wrapped by SQS, SNS or SNS-then-SQS (keys are URL-encoded: decoded here);
- EventBridge "Object Created" from S3, direct or wrapped by SQS or SNS (keys are literal);
- a split's continuation (imagepipe.splitter.Continuation) on SplitContinuationQueue, which the splitter
  sends itself when it runs low on time: the rest of a file to split;
- EventBridge "ImageJob Requested": an object to split, or up to MAX_INLINE_ROWS rows - only from the stack's
  request source (JobRequestSource, default DEFAULT_REQUEST_SOURCE) and its own account: the stack's rule
  matches only those, and an event from anyone else that reaches the function another way (a broader rule,
  an SQS or SNS wrapper) is refused here too. Who may start paid jobs is decided by who may call
  events:PutEvents on the bus with that source (an IAM condition on events:source).

S3 events that call for no job - s3:TestEvent, events other than object creation, keys that are not
.csv/.jsonl/.json, objects in a bucket other than the stack's input bucket (a topic or queue shared with
other buckets) - are skipped and logged, not errors: bucket filters and EventBridge rules may be broader
than ours, and failing on them would only send harmless events to retries and the DLQ. An "ImageJob
Requested" naming another bucket is refused with its reason: the splitter may read only the input bucket,
so it would fail with AccessDenied on every retry and end in the DLQ.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.exceptions import InvalidModelTypeError
from aws_lambda_powertools.utilities.parser.models import (
    S3EventNotificationEventBridgeModel,
    S3Model,
    SnsModel,
    SnsNotificationModel,
    SqsModel,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imagepipe.contract import JOB_ID_PATTERN
from imagepipe.observability import logger
from imagepipe.rows import FORMATS
from imagepipe.splitter import CONTINUATION_KEY, Continuation

MAX_INLINE_ROWS = 500
JOB_REQUESTED = "ImageJob Requested"
DEFAULT_REQUEST_SOURCE = "imagepipe.requests"  # template parameter JobRequestSource
JOB_SUFFIXES = tuple(FORMATS)  # .csv, .jsonl, .json: what the splitter can read


class TriggerError(Exception):
    """The event cannot become a job; the message says why, in words a person can act on."""


@dataclass(frozen=True)
class ObjectRequest:
    """Split this S3 object. `source` is the service that handed the event to the splitter ("s3",
    "eventbridge", "sqs", "sns"; the outermost wrapper), or "request" for an ImageJob Requested event."""

    bucket: str
    key: str  # decoded: exactly the key to pass to GetObject
    etag: str | None
    version_id: str | None
    source: str
    job_id: str | None = None
    max_cost: float | None = None


@dataclass(frozen=True)
class InlineRequest:
    """Rows carried in an ImageJob Requested event, each a dict like one parsed JSONL line."""

    rows: list[dict]
    job_id: str | None
    max_cost: float | None
    source: str = "request"
    name: str = "inline"  # the stem of the job id


class JobDetail(BaseModel):
    """The detail of an "ImageJob Requested" event. Strict and closed: a mistyped or misspelt field
    (max_cost "5", "maxcost") must be refused, not leave the job silently without its cap."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    bucket: str | None = Field(None, min_length=1)
    key: str | None = None
    rows: list[dict[str, Any]] | None = None
    job_id: str | None = None
    max_cost: float | None = None
    name: str | None = Field(None, min_length=1, max_length=200)

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, value: str | None) -> str | None:
        # fullmatch: the pattern's "$" would also accept a trailing newline with re.match.
        if value is not None and not re.fullmatch(JOB_ID_PATTERN, value):
            raise ValueError(
                f"the job_id {reprlib.repr(value)} is not valid: use 1 to 80 letters, digits, '-' or '_', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("max_cost")
    @classmethod
    def _max_cost(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"the max_cost {value} is not valid: use a number of 0 or more")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> JobDetail:
        if self.rows is None and self.key is None:
            raise ValueError('the detail needs "key" (an object to split) or "rows" (prompts inline)')
        if self.rows is not None and (self.key is not None or self.bucket is not None):
            raise ValueError('the detail has both "rows" and "key"/"bucket": send one or the other')
        if self.rows is None and self.name is not None:
            raise ValueError('"name" goes only with "rows": a file\'s job is named after its key')
        if self.key is not None and not self.key.lower().endswith(JOB_SUFFIXES):
            raise ValueError(f"the key {reprlib.repr(self.key)} is not a .csv, .jsonl or .json file")
        if self.rows is not None and not self.rows:
            raise ValueError('"rows" is empty: send at least one row')
        if self.rows is not None and len(self.rows) > MAX_INLINE_ROWS:
            raise ValueError(
                f"the detail has {len(self.rows)} rows; at most {MAX_INLINE_ROWS} can be sent inline: "
                "upload a .csv, .jsonl or .json file to the input bucket instead"
            )
        return self


Request = ObjectRequest | InlineRequest | Continuation


@dataclass(frozen=True)
class _Accepts:
    default_bucket: str | None
    request_source: str
    account: str | None


def job_requests(
    event: Any,
    default_bucket: str | None = None,
    *,
    request_source: str = DEFAULT_REQUEST_SOURCE,
    account: str | None = None,
) -> list[Request]:
    """The jobs `event` asks for, in order ([] when it asks for none), or TriggerError.

    `default_bucket` is the stack's input bucket: where an ImageJob Requested detail's key lives when it
    names no bucket, and the only bucket an object may be split from (None: any). An
    ImageJob Requested event is taken only with `source` request_source and (when given) from `account`."""
    return _requests(event, (), _Accepts(default_bucket, request_source, account))


def _requests(event: Any, via: tuple[str, ...], accepts: _Accepts) -> list[Request]:
    # `via` lists the wrappers already opened: () for the Lambda event itself, ("sqs",) for an SQS
    # body, ("sqs", "sns") for an SNS notification inside one. Only real AWS nestings are accepted.
    if not isinstance(event, dict):
        raise TriggerError(f"unrecognised event: a JSON {type(event).__name__}, not an object")
    if event.get("Event") == "s3:TestEvent":
        # S3 sends this once when a notification is configured; there is no file to split.
        logger.info("skipping s3:TestEvent", extra={"bucket": str(event.get("Bucket"))})
        return []
    if "detail-type" in event:
        return _from_eventbridge(event, via, accepts)
    records = event.get("Records")
    if isinstance(records, list) and records and all(isinstance(r, dict) for r in records):
        # One Lambda event holds records of one source; compare them all (a value may be unhashable).
        kinds = [r.get("eventSource", r.get("EventSource")) for r in records]
        kind = kinds[0] if kinds.count(kinds[0]) == len(kinds) else None
        if kind == "aws:s3":
            return _from_s3(event, via, accepts)
        if kind == "aws:sqs" and not via:
            sqs = _parse(event, SqsModel, "SQS event")
            messages = [(f"SQS message {_short(r.messageId)}", r.body) for r in sqs.Records]
            return _unwrap(messages, ("sqs",), accepts)
        if kind == "aws:sns" and not via:
            sns = _parse(event, SnsModel, "SNS event")
            messages = [(f"SNS message {_short(r.Sns.MessageId)}", r.Sns.Message) for r in sns.Records]
            return _unwrap(messages, ("sns",), accepts)
    if via == ("sqs",) and CONTINUATION_KEY in event:
        return [_parse(event[CONTINUATION_KEY], Continuation, "split continuation")]
    if via == ("sqs",) and event.get("Type") == "Notification":
        # S3 -> SNS -> SQS without raw message delivery: the body is SNS's notification envelope.
        note = _parse(event, SnsNotificationModel, "SNS notification")
        return _unwrap([(f"SNS message {_short(note.MessageId)}", note.Message)], ("sqs", "sns"), accepts)
    raise TriggerError(f"unrecognised event: {_describe(event)}")


def _unwrap(messages: list[tuple[str, Any]], via: tuple[str, ...], accepts: _Accepts) -> list[Request]:
    found: list[Request] = []
    for label, text in messages:
        try:
            if not isinstance(text, str):
                raise TriggerError("the message is not text")
            try:
                inner = json.loads(text)
            except (ValueError, RecursionError):
                raise TriggerError("the message is not JSON") from None
            found += _requests(inner, via, accepts)
        except TriggerError as exc:
            # One bad message fails the whole event: name it, so it can be found in the queue or topic.
            raise TriggerError(f"{label}: {exc}") from None
    return found


def _from_s3(event: dict, via: tuple[str, ...], accepts: _Accepts) -> list[Request]:
    found = []
    for record in _parse(event, S3Model, "S3 notification").Records:
        obj = record.s3.object or record.s3.get_object
        if obj is None or not record.eventName.startswith("ObjectCreated"):
            logger.info("skipping S3 event: not an object creation", extra={"event_name": record.eventName})
            continue
        # S3 notifications URL-encode keys ("spring campaign.csv" arrives as "spring+campaign.csv").
        found.append((record.s3.bucket.name, unquote_plus(obj.key), obj.eTag, obj.versionId))
    return _objects(found, via[0] if via else "s3", accepts.default_bucket)


def _from_eventbridge(event: dict, via: tuple[str, ...], accepts: _Accepts) -> list[Request]:
    detail_type, source = event.get("detail-type"), event.get("source")
    if detail_type == JOB_REQUESTED:
        if source != accepts.request_source:
            raise TriggerError(
                f'"{JOB_REQUESTED}" from source {_name(source)} refused: this stack takes job requests only '
                f"from source {accepts.request_source!r} (JobRequestSource)"
            )
        if accepts.account is not None and event.get("account") != accepts.account:
            raise TriggerError(
                f'"{JOB_REQUESTED}" from account {_name(event.get("account"))} refused: this stack takes '
                "job requests only from its own account"
            )
        detail = _parse(event.get("detail"), JobDetail, f'"{JOB_REQUESTED}" detail')
        return [_job(detail, accepts.default_bucket)]
    if source == "aws.s3" and detail_type == "Object Created":
        s3 = _parse(event, S3EventNotificationEventBridgeModel, "S3 Object Created event")
        obj = s3.detail.object  # EventBridge keys are literal: no decoding
        return _objects(
            [(s3.detail.bucket.name, obj.key, obj.etag, obj.version_id)],
            via[0] if via else "eventbridge",
            accepts.default_bucket,
        )
    if source == "aws.s3":
        logger.info("skipping S3 event: not an object creation", extra={"detail_type": str(detail_type)})
        return []
    raise TriggerError(f"unrecognised event: detail-type {_name(detail_type)} from source {_name(source)}")


def _job(detail: JobDetail, default_bucket: str | None) -> Request:
    if detail.rows is not None:
        return InlineRequest(list(detail.rows), detail.job_id, detail.max_cost, name=detail.name or "inline")
    bucket = detail.bucket or default_bucket
    if not bucket:
        raise TriggerError(
            f'the "{JOB_REQUESTED}" detail names no bucket and there is no default: add "bucket"'
        )
    if default_bucket and bucket != default_bucket:
        raise TriggerError(
            f'"{JOB_REQUESTED}" for bucket {_name(bucket)} refused: this stack splits files only from its '
            f"input bucket {default_bucket!r} (the only one it may read): copy the file there, or leave "
            '"bucket" out'
        )
    return ObjectRequest(bucket, detail.key or "", None, None, "request", detail.job_id, detail.max_cost)


def _objects(
    found: list[tuple[str, str, str | None, str | None]], source: str, input_bucket: str | None
) -> list[Request]:
    requests: list[Request] = []
    for bucket, key, etag, version_id in found:
        if input_bucket and bucket != input_bucket:
            # A topic or queue of S3 events may carry other buckets' uploads: not ours to split (and not
            # readable: the splitter's role reads the input bucket only).
            logger.warning(
                "skipping object: not in this stack's input bucket",
                extra={"bucket": bucket, "key": key, "input_bucket": input_bucket},
            )
            continue
        if not key.lower().endswith(JOB_SUFFIXES):
            logger.info(
                "skipping object: not a .csv, .jsonl or .json file", extra={"bucket": bucket, "key": key}
            )
            continue
        requests.append(
            ObjectRequest(bucket, key, (etag or "").strip('"') or None, version_id or None, source)
        )
    return requests


def _parse(data: Any, model: type[BaseModel], what: str) -> Any:
    if not isinstance(data, dict):  # parse() would read a string as JSON: a detail must be an object
        raise TriggerError(f"invalid {what}: it must be a JSON object, not a {type(data).__name__}")
    try:
        return parse(event=data, model=model)
    except ValidationError as exc:
        raise TriggerError(f"invalid {what}: {_reason(exc)}") from None
    except (TypeError, AttributeError, ValueError, InvalidModelTypeError):
        # Some Powertools validators read the raw input first and fail this way on shapes they do
        # not expect (a record that is a string, an eventName that is a number).
        raise TriggerError(f"invalid {what}: it has the wrong shape") from None


def _reason(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    if error["type"] == "value_error":  # our own validators' messages, written for people
        return str(error["ctx"]["error"])
    where = ".".join(_short(str(part), 40) for part in error["loc"])
    message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
    return f"{where}: {message}" if where else message


def _describe(event: dict) -> str:
    """What an unrecognised event looked like, short enough for a log line or an error field."""
    seen = f"keys {reprlib.repr(sorted(map(str, event)))}"
    records = event.get("Records")
    if isinstance(records, list) and records and isinstance(records[0], dict):
        source = records[0].get("eventSource", records[0].get("EventSource"))
        seen += f", Records[0].eventSource {_name(source)}"
    return seen


def _name(value: Any) -> str:
    return reprlib.repr(value) if isinstance(value, str) else f"(a {type(value).__name__})"


def _short(text: str, limit: int = 100) -> str:
    # Ids and field names come from the event: cut them short and escape line breaks for one-line logs.
    return repr(text[:limit])[1:-1]
