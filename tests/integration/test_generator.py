"""ImageGeneratorFunction on the stack from template.yaml (in-process moto) against the Atlas emulator."""

import copy
import io
import json
import time

from PIL import Image

from imagepipe_cli.local.event_sources import lambda_sqs_event

from conftest import load_event


def sqs_event(pipeline, receive_count: int = 1, **prompts: str) -> dict:
    """events/sqs_tasks.json, optionally with other prompts per row id and another receive count."""
    event = copy.deepcopy(load_event("sqs_tasks.json"))
    for record in event["Records"]:
        task = json.loads(record["body"])
        task["prompt"] = prompts.get(f"row{task['row_id']}", task["prompt"])
        record["body"] = json.dumps(task)
        record["attributes"]["ApproximateReceiveCount"] = str(receive_count)
    return event


def image(pipeline, key: str) -> Image.Image:
    body = pipeline.client("s3").get_object(Bucket=pipeline.output_bucket, Key=key)["Body"].read()
    return Image.open(io.BytesIO(body))


def test_a_batch_becomes_one_png_per_task_in_the_jobs_prefix(pipeline):
    response = pipeline.generator.invoke(sqs_event(pipeline))

    assert response == {"batchItemFailures": []}
    assert image(pipeline, "jobs/spring-campaign/images/1.png").size == (1024, 1024)
    assert image(pipeline, "jobs/spring-campaign/images/2.png").size == (1376, 768)
    assert image(pipeline, "jobs/spring-campaign/images/3.png").format == "PNG"


def test_one_oauth_token_serves_every_batch_of_a_warm_function(pipeline_factory):
    # Given a stack whose default provider is the OAuth one (token, then one call per image)
    pipeline = pipeline_factory(provider="baidu-oauth")
    first, second = sqs_event(pipeline), sqs_event(pipeline)
    for event in (first, second):
        for record in event["Records"]:
            body = json.loads(record["body"])
            record["body"] = json.dumps({**body, "provider": "baidu-oauth"})

    # When two batches of three run on the same warm function
    pipeline.generator.invoke(first)
    pipeline.generator.invoke(second)

    # Then one token request served all six images (the second batch's duplicates made no new calls)
    stats = pipeline.emulator.stats()
    assert stats["requests"] == 3
    assert stats["token_requests"] == 1


def delayed_tasks(pipeline) -> int:
    attrs = pipeline.client("sqs").get_queue_attributes(
        QueueUrl=pipeline.tasks_queue, AttributeNames=["ApproximateNumberOfMessagesDelayed"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessagesDelayed"])


def test_a_transient_failure_is_sent_again_after_a_backoff_and_the_batch_succeeds(pipeline_factory):
    # Given the API is briefly unavailable for one prompt
    pipeline = pipeline_factory("flaky=unlucky:1")
    event = sqs_event(pipeline, row2="an unlucky dog")

    # When the batch is processed
    response = pipeline.generator.invoke(event)

    # Then no message goes back to wait out the queue's visibility timeout: the failed task is a new
    # message delayed by its backoff, carrying its first failure; the other two are done
    assert response == {"batchItemFailures": []}
    assert delayed_tasks(pipeline) == 1
    keys = {
        o["Key"] for o in pipeline.client("s3").list_objects_v2(Bucket=pipeline.output_bucket)["Contents"]
    }
    assert "jobs/spring-campaign/images/1.png" in keys and "jobs/spring-campaign/images/3.png" in keys
    assert "jobs/spring-campaign/images/2.png" not in keys
    time.sleep(2.5)  # RetryBaseDelaySeconds (2): the first retry waits 1 to 2 s
    (retry,) = pipeline.queued_messages()
    task = json.loads(retry["Body"])
    assert task["row_id"] == "2" and task["attempts"] == 1 and task["first_failed_at"]
    assert retry["Attributes"]["ApproximateReceiveCount"] == "1"


def test_an_api_refusal_is_final_and_recorded_failed_with_the_reason(pipeline_factory):
    pipeline = pipeline_factory("refuse=forbidden")

    response = pipeline.generator.invoke(sqs_event(pipeline, row1="a forbidden scene"))

    # Trying again cannot help, so the message is not returned to the queue...
    assert response == {"batchItemFailures": []}
    # ...and the row's outcome says why it failed
    record = pipeline.outcome("spring-campaign", "1")
    assert record["status"] == "failed"
    assert record["error"]["type"] == "moderation"
    assert "content moderation" in record["error"]["message"]


def with_attempts(event: dict, index: int, attempts: int) -> dict:
    record = event["Records"][index]
    record["body"] = json.dumps(
        {**json.loads(record["body"]), "attempts": attempts, "first_failed_at": time.time()}
    )
    return event


def test_the_last_attempt_records_the_failure_with_its_error_and_nothing_goes_back(pipeline_factory):
    # Given a task on its last attempt (TaskMaxAttempts 8: seven transient failures so far) that fails again
    pipeline = pipeline_factory("fail=doomed")
    event = with_attempts(sqs_event(pipeline, row3="a doomed bird"), 2, 7)

    response = pipeline.generator.invoke(event)

    # Then the row ends failed with the API's error, and no message is left to reach the dead-letter queue
    assert response == {"batchItemFailures": []}
    record = pipeline.outcome("spring-campaign", "3")
    assert record["status"] == "failed" and record["attempt"] == 8
    assert (
        "HTTP 500" in record["error"]["message"]
        and "gave up after 8 attempt(s)" in record["error"]["message"]
    )
    assert pipeline.queued_messages() == [] and delayed_tasks(pipeline) == 0


def test_an_aws_failure_comes_back_soon_and_on_the_last_delivery_the_row_ends_failed(pipeline_factory):
    # Given the images cannot be stored (the output bucket is gone)
    pipeline = pipeline_factory(parameters={"RetryBaseDelaySeconds": "0"})
    pipeline.client("s3").delete_bucket(Bucket=pipeline.output_bucket)
    body = sqs_event(pipeline)["Records"][0]["body"]
    pipeline.client("sqs").send_message(QueueUrl=pipeline.tasks_queue, MessageBody=body)

    # When a delivery that is not the message's last fails on it
    (message,) = pipeline.queued_messages()
    event = lambda_sqs_event([message], pipeline.mapping().queue_arn, "us-east-1")
    response = pipeline.generator.invoke(event)

    # Then the message comes back after a backoff (here 0 s), not the queue's 30-minute visibility timeout
    assert response == {"batchItemFailures": [{"itemIdentifier": message["MessageId"]}]}
    (again,) = pipeline.queued_messages()
    assert again["Attributes"]["ApproximateReceiveCount"] == "2"

    # And on its last delivery (TaskMaxReceiveCount) the row ends failed with what went wrong, not lost
    event = lambda_sqs_event([again], pipeline.mapping().queue_arn, "us-east-1")
    event["Records"][0]["attributes"]["ApproximateReceiveCount"] = pipeline.stack.parameters[
        "TaskMaxReceiveCount"
    ]
    assert pipeline.generator.invoke(event) == {"batchItemFailures": []}
    record = pipeline.outcome("spring-campaign", "1")
    assert record["status"] == "failed" and record["error"]["type"] == "internal"
    assert "NoSuchBucket" in record["error"]["message"]


def test_a_message_that_is_not_a_task_fails_alone(pipeline):
    event = sqs_event(pipeline)
    event["Records"][0]["body"] = '{"version": 2, "something": "else"}'

    response = pipeline.generator.invoke(event)

    assert response == {"batchItemFailures": [{"itemIdentifier": event["Records"][0]["messageId"]}]}


def emf_records(text: str) -> list[dict]:
    """The CloudWatch embedded-metric records a function printed."""
    records = []
    for line in text.splitlines():
        if line.startswith("{") and '"_aws"' in line:
            records.append(json.loads(line))
    return records


def test_the_metrics_say_per_provider_how_many_images_and_what_they_cost(pipeline_factory, capsys):
    # Given a batch where one prompt is rate-limited once
    pipeline = pipeline_factory("rate-limit=busy:1")
    capsys.readouterr()

    pipeline.generator.invoke(sqs_event(pipeline, row2="a busy dog"))

    # Then the batch's metrics carry the provider as a dimension: images made, their cost, the 429
    (record,) = [r for r in emf_records(capsys.readouterr().out) if r.get("provider") == "atlascloud"]
    (directive,) = record["_aws"]["CloudWatchMetrics"]
    assert ["provider", "service"] in [sorted(d) for d in directive["Dimensions"]]
    assert record["ImagesGenerated"] == [2.0]
    assert record["RateLimited"] == [1.0]
    assert record["Cost"][0] > 0


def ten_task_event(pipeline) -> dict:
    """events/sqs_tasks.json's first task, ten times over as rows 1-10 of one job."""
    event = sqs_event(pipeline)
    first = event["Records"][0]
    event["Records"] = []
    for row in range(1, 11):
        record = copy.deepcopy(first)
        record["messageId"] = f"{first['messageId'][:-2]}{row:02d}"
        task = json.loads(record["body"])
        record["body"] = json.dumps(
            {**task, "row_id": str(row), "row_number": row, "prompt": f"a cat, take {row}"}
        )
        event["Records"].append(record)
    return event


def test_a_cold_batch_of_ten_reads_the_keys_secret_once_and_the_job_record_once(pipeline, monkeypatch):
    # Given a new execution environment (no secrets provider, nothing cached) whose secret takes a while to
    # read - long enough for all ten of a batch's task threads to ask for the keys while it is being read
    import botocore.client
    from aws_lambda_powertools.utilities.parameters.base import DEFAULT_PROVIDERS

    monkeypatch.delitem(DEFAULT_PROVIDERS, "secrets", raising=False)
    calls: list[tuple[str, dict]] = []
    real_call = botocore.client.BaseClient._make_api_call

    def counted(client, operation, params):
        calls.append((operation, params))
        if operation == "GetSecretValue":
            time.sleep(0.5)
        return real_call(client, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", counted)

    # When a batch of ten tasks of one job runs
    response = pipeline.generator.invoke(ten_task_event(pipeline))

    # Then all ten images are made, from one read of the secret and one read of the job record (with the
    # provider's stop) - not one per task thread
    assert response == {"batchItemFailures": []}
    assert len(pipeline.client("s3").list_objects_v2(Bucket=pipeline.output_bucket)["Contents"]) == 10
    assert [op for op, _ in calls].count("GetSecretValue") == 1
    job_reads = [
        params
        for op, params in calls
        if op == "BatchGetItem"
        and any(
            key["sk"] == "STOP#atlascloud" for keys in params["RequestItems"].values() for key in keys["Keys"]
        )
    ]
    assert len(job_reads) == 1
