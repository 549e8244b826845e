"""Lambda's rules for SQS events and partial batch responses, as the local runtime plays them."""

from aws_lambda_powertools.utilities.parser.models import SqsModel

from imagepipe_cli.local.event_sources import complete_s3_event, failed_message_ids, lambda_sqs_event

IDS = ["m1", "m2", "m3"]


def test_only_the_reported_messages_go_back_to_the_queue():
    response = {"batchItemFailures": [{"itemIdentifier": "m2"}]}
    assert failed_message_ids(response, IDS, report_batch_item_failures=True) == {"m2"}


def test_an_empty_or_missing_failure_list_means_the_whole_batch_succeeded():
    assert failed_message_ids({"batchItemFailures": []}, IDS, True) == set()
    assert failed_message_ids(None, IDS, True) == set()


def test_a_malformed_failure_entry_fails_the_whole_batch_as_lambda_does():
    assert failed_message_ids({"batchItemFailures": [{"itemIdentifier": ""}]}, IDS, True) == set(IDS)
    assert failed_message_ids({"batchItemFailures": [{"itemIdentifier": "other"}]}, IDS, True) == set(IDS)


def test_without_report_batch_item_failures_a_returned_list_is_ignored():
    assert failed_message_ids({"batchItemFailures": [{"itemIdentifier": "m1"}]}, IDS, False) == set()


def test_the_event_built_from_receive_message_is_a_valid_lambda_sqs_event():
    message = {
        "MessageId": "m1",
        "ReceiptHandle": "rh",
        "Body": '{"x": 1}',
        "MD5OfBody": "abc",
        "Attributes": {
            "ApproximateReceiveCount": "2",
            "SentTimestamp": "1",
            "SenderId": "me",
            "ApproximateFirstReceiveTimestamp": "2",
        },
        "MessageAttributes": {"kind": {"StringValue": "task", "DataType": "String"}},
    }
    event = lambda_sqs_event([message], "arn:aws:sqs:us-east-1:123456789012:q", "us-east-1")

    parsed = SqsModel.model_validate(event)
    record = parsed.Records[0]
    assert record.messageId == "m1" and record.attributes.ApproximateReceiveCount == "2"
    assert record.messageAttributes["kind"].stringValue == "task"


def test_moto_s3_events_are_completed_with_the_fields_aws_always_sends():
    event = {"Records": [{"s3": {"bucket": {"name": "b"}, "object": {"key": "k", "size": 1, "eTag": "e"}}}]}
    record = complete_s3_event(event)["Records"][0]
    assert record["userIdentity"]["principalId"]
    assert record["s3"]["bucket"]["ownerIdentity"]["principalId"]
    assert record["s3"]["object"]["sequencer"]


# --- SQS's own timing: a failed message waits out the queue's VisibilityTimeout -------------------------

import time  # noqa: E402

import boto3  # noqa: E402
import pytest  # noqa: E402
from moto import mock_aws  # noqa: E402

from imagepipe_cli.local.event_sources import Chaos, SqsPoller, schedule_period_s  # noqa: E402
from imagepipe_cli.local.lambda_runtime import FunctionError  # noqa: E402
from imagepipe_cli.local.stack import QueueMapping  # noqa: E402


class _Failing:
    def __init__(self, answer=None):
        self.calls, self.answer = 0, answer

    def invoke(self, event):
        self.calls += 1
        if self.answer is None:
            raise FunctionError("Fn", "RuntimeError", "boom")
        return self.answer(event)


@pytest.fixture
def queue():
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        url = sqs.create_queue(QueueName="tasks", Attributes={"VisibilityTimeout": "30"})["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        yield sqs, QueueMapping("Fn", arn, url, 10, 2, True)


def _visible_again_after(sqs, url, seconds: float) -> list[dict]:
    time.sleep(seconds)
    return sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages", [])


@pytest.mark.parametrize(
    "function",
    [
        pytest.param(_Failing(), id="function-error"),
        pytest.param(
            _Failing(
                lambda e: {"batchItemFailures": [{"itemIdentifier": r["messageId"]} for r in e["Records"]]}
            ),
            id="batch-item-failure",
        ),
    ],
)
def test_a_failed_message_comes_back_only_after_the_queues_visibility_timeout(queue, function):
    sqs, mapping = queue
    sqs.send_message(QueueUrl=mapping.queue_url, MessageBody="task")
    poller = SqsPoller(sqs, mapping, function, region="us-east-1")

    assert poller.poll_once() == 1

    # Not after a second or two (the old local liberty), but only when the queue's 30 s are over, as on AWS
    assert _visible_again_after(sqs, mapping.queue_url, 2.5) == []
    attributes = sqs.get_queue_attributes(
        QueueUrl=mapping.queue_url, AttributeNames=["ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    assert attributes["ApproximateNumberOfMessagesNotVisible"] == "1"  # still in flight, not lost
    assert poller.stats.returned == 1 and poller.stats.deleted == 0


def test_a_failed_message_comes_back_when_a_shortened_visibility_timeout_ends(queue):
    sqs, mapping = queue
    sqs.set_queue_attributes(QueueUrl=mapping.queue_url, Attributes={"VisibilityTimeout": "1"})
    sqs.send_message(QueueUrl=mapping.queue_url, MessageBody="task")
    SqsPoller(sqs, mapping, _Failing(), region="us-east-1").poll_once()

    (again,) = _visible_again_after(sqs, mapping.queue_url, 2.5)
    assert again["Body"] == "task"


def test_a_throttled_invocation_leaves_its_messages_to_the_visibility_timeout(queue):
    sqs, mapping = queue
    sqs.send_message(QueueUrl=mapping.queue_url, MessageBody="task")
    function = _Failing(lambda e: None)
    poller = SqsPoller(sqs, mapping, function, region="us-east-1", chaos=Chaos(throttle=1.0))

    poller.poll_once()

    assert function.calls == 0 and poller.stats.throttled == 1
    assert _visible_again_after(sqs, mapping.queue_url, 2.5) == []


def test_chaos_specs_take_the_aws_kinds_and_hand_them_to_the_moto_server():
    chaos = Chaos.parse("redeliver=0.2,ddb-conflict=0.05,stale-read=0.1,s3-error=0.02,sqs-error=0.02")

    assert chaos.aws_spec() == {"ddb-conflict": 0.05, "stale-read": 0.1, "s3-error": 0.02, "sqs-error": 0.02}
    assert str(chaos) == "redeliver=0.2,ddb-conflict=0.05,stale-read=0.1,s3-error=0.02,sqs-error=0.02"
    with pytest.raises(ValueError, match="unknown chaos"):
        Chaos.parse("ddb-melt=0.1")


def test_schedule_expressions_the_local_runtime_fires():
    assert schedule_period_s("rate(5 minutes)") == 300
    assert schedule_period_s("rate(1 hour)") == 3600
    assert schedule_period_s("rate(1 day)") == 86400
    assert schedule_period_s("cron(0 12 * * ? *)") is None
    assert schedule_period_s("") is None
