"""ImageGeneratorFunction on the stack from template.yaml (in-process moto) against the Atlas emulator."""

import copy
import io
import json

from PIL import Image

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


def test_a_partial_batch_failure_reports_only_the_failed_message(pipeline_factory):
    # Given the API is briefly unavailable for one prompt
    pipeline = pipeline_factory("flaky=unlucky:1")
    event = sqs_event(pipeline, row2="an unlucky dog")

    # When the batch is processed
    response = pipeline.generator.invoke(event)

    # Then only that message goes back to the queue; the other two are done
    assert response == {"batchItemFailures": [{"itemIdentifier": event["Records"][1]["messageId"]}]}
    keys = {
        o["Key"] for o in pipeline.client("s3").list_objects_v2(Bucket=pipeline.output_bucket)["Contents"]
    }
    assert "jobs/spring-campaign/images/1.png" in keys and "jobs/spring-campaign/images/3.png" in keys
    assert "jobs/spring-campaign/images/2.png" not in keys


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


def test_the_last_failed_attempt_records_the_failure_and_still_returns_the_message(pipeline_factory):
    # Given a task on its final attempt (ApproximateReceiveCount == maxReceiveCount) that fails again
    pipeline = pipeline_factory("fail=doomed")
    event = sqs_event(pipeline, receive_count=3, row3="a doomed bird")

    response = pipeline.generator.invoke(event)

    # Then SQS gets it back (so it moves to the DLQ) and the failure is already on record
    assert response == {"batchItemFailures": [{"itemIdentifier": event["Records"][2]["messageId"]}]}
    record = pipeline.outcome("spring-campaign", "3")
    assert (
        record["status"] == "failed" and record["attempt"] == 3 and "HTTP 500" in record["error"]["message"]
    )


def test_a_message_that_is_not_a_task_fails_alone(pipeline):
    event = sqs_event(pipeline)
    event["Records"][0]["body"] = '{"version": 2, "something": "else"}'

    response = pipeline.generator.invoke(event)

    assert response == {"batchItemFailures": [{"itemIdentifier": event["Records"][0]["messageId"]}]}
