"""S3 events wrapped in SQS (template parameter S3EventsQueueArn), on the stack from template.yaml: the queue
is wired to the splitter only when given, and an upload's event sent to it becomes a job - only for an object
in the stack's input bucket. The topic (S3EventsTopicArn) is checked in tests/unit/test_template.py: moto's
CloudFormation cannot make an SNS subscription."""

from __future__ import annotations

import json

from imagepipe_cli.local.event_sources import SqsPoller

from conftest import REGION, load_event

# The name events/sqs_wrapped_s3.json and events/sqs_sns_wrapped_s3.json were delivered from.
UPLOAD_EVENTS_QUEUE = "imagepipe-local-upload-events"


def _queue(pipeline_factory_client) -> tuple[str, str]:
    sqs = pipeline_factory_client("sqs")
    # As the parameter asks: at least the splitter's Timeout (900 s).
    url = sqs.create_queue(QueueName=UPLOAD_EVENTS_QUEUE, Attributes={"VisibilityTimeout": "900"})["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return url, arn


def _client(name: str):
    import boto3

    return boto3.client(name, region_name=REGION)


def test_without_the_parameter_the_splitter_reads_only_its_own_continuation_queue(pipeline):
    splitter_queues = [
        m.queue_arn for m in pipeline.stack.queue_mappings if m.function == "CsvSplitterFunction"
    ]
    assert [arn.rsplit(":", 1)[-1] for arn in splitter_queues] == [
        pipeline.stack.outputs["SplitContinuationQueueUrl"].rsplit("/", 1)[-1]
    ]
    role = pipeline.client("lambda").get_function(FunctionName=pipeline.splitter.function.name)
    assert UPLOAD_EVENTS_QUEUE not in json.dumps(_role_policies(pipeline, role))


def _role_policies(pipeline, function: dict) -> list:
    iam = pipeline.client("iam")
    role = function["Configuration"]["Role"].rsplit("/", 1)[-1]
    return [
        iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"]
        for name in iam.list_role_policies(RoleName=role)["PolicyNames"]
    ]


def test_an_upload_event_sent_to_the_queue_becomes_a_job_and_another_buckets_is_skipped(pipeline_factory):
    # Given a queue of S3 events, named to the stack by S3EventsQueueArn
    url, arn = _queue(_client)
    pipeline = pipeline_factory(parameters={"S3EventsQueueArn": arn})
    (mapping,) = [m for m in pipeline.stack.queue_mappings if m.queue_arn == arn]
    assert (mapping.function, mapping.batch_size) == ("CsvSplitterFunction", 1)
    function = pipeline.client("lambda").get_function(FunctionName=pipeline.splitter.function.name)
    granted = json.dumps(_role_policies(pipeline, function))
    assert arn in granted and "sqs:ReceiveMessage" in granted

    # When S3 sends it an upload's notification, and another bucket's upload comes the same way
    event = pipeline.upload("inbox/spring campaign.csv", b"id,prompt\nhero,a field of tulips\n")
    sqs = pipeline.client("sqs")
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(event))
    foreign = json.loads(json.dumps(event))
    foreign["Records"][0]["s3"]["bucket"]["name"] = "someone-elses-bucket"
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(foreign))
    poller = SqsPoller(sqs, mapping, pipeline.splitter, region=REGION)
    assert poller.poll_once() == 1 and poller.poll_once() == 1

    # Then the upload is one job, started by the queue, and the other bucket's event is let go: no job, no
    # retry, nothing left in the queue
    (job_id,) = pipeline.state.recent_jobs(10)
    job = pipeline.job(job_id)
    assert job["source"]["trigger"] == "sqs" and job["source"]["bucket"] == pipeline.input_bucket
    assert [json.loads(m["Body"])["row_id"] for m in pipeline.queued_messages()] == ["hero"]
    assert poller.stats.returned == 0 and pipeline.queued_messages(url) == []


def test_the_wrapped_events_in_events_dir_name_that_queue():
    for name in ("sqs_wrapped_s3.json", "sqs_sns_wrapped_s3.json"):
        arns = {r["eventSourceARN"] for r in load_event(name)["Records"]}
        assert arns == {f"arn:aws:sqs:{REGION}:123456789012:{UPLOAD_EVENTS_QUEUE}"}
