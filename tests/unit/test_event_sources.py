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
