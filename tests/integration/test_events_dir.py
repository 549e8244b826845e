"""events/: one sample event per way a function of template.yaml is invoked, named as on the local stack
(`imagepipe up`, the tests' stack: stack imagepipe-local, account 123456789012, us-east-1), each fed here to
its function's handler on the stack from template.yaml - so `sam local invoke FUNCTION -e events/FILE` and
these tests see the same events, and a file that drifts from the code fails here."""

from __future__ import annotations

import json

import pytest

from imagepipe.contract import ImageTask
from imagepipe.triggers import InlineRequest, ObjectRequest, job_requests
from imagepipe_cli.local.lambda_runtime import InlineFunction
from imagepipe_cli.local.template import load_template

from conftest import EVENTS, REGION, TEMPLATE, load_event

SPLITTER = "CsvSplitterFunction"
# Every file in events/ and the function it is for.
FUNCTION_OF = {
    "s3_put_csv.json": SPLITTER,
    "s3_test_event.json": SPLITTER,
    "eventbridge_object_created.json": SPLITTER,
    "job_requested_object.json": SPLITTER,
    "job_requested_inline.json": SPLITTER,
    "sqs_wrapped_s3.json": SPLITTER,  # through S3EventsQueueArn
    "sns_wrapped_s3.json": SPLITTER,  # through S3EventsTopicArn
    "sqs_sns_wrapped_s3.json": SPLITTER,  # S3 -> SNS -> SQS, through S3EventsQueueArn
    "sqs_tasks.json": "ImageGeneratorFunction",
    "sqs_dead_letters.json": "DeadLetterRecorderFunction",
    "sqs_finisher.json": "JobFinisherFunction",
    "scheduled_sweep.json": "JobSweeperFunction",
    "sqs_local_outcomes.json": "LocalOutcomeRecorderFunction",  # HybridMode=enabled
}
# The upload events/s3_put_csv.json announces, made so the splitter queues exactly events/sqs_tasks.json.
CAMPAIGN = b"id,prompt,width,height,seed\n1,a cat on a table,,,\n2,a dog in a garden,1376,768,7\n3,a bird in a tree,,,\n"
JSONL = b'{"id": "lake", "prompt": "a calm lake"}\n'


def test_every_event_file_is_listed_here_for_a_function_of_the_template():
    names = sorted(path.name for path in EVENTS.glob("*.json"))
    assert names == sorted(FUNCTION_OF)
    functions = load_template(TEMPLATE).resources_of_type("AWS::Serverless::Function")
    assert set(FUNCTION_OF.values()) <= set(functions)
    # ... and every function that is not optional has at least one
    required = {name for name, resource in functions.items() if "Condition" not in resource}
    assert required <= set(FUNCTION_OF.values())


def test_the_events_name_the_local_stacks_resources_only():
    text = " ".join(path.read_text() for path in EVENTS.glob("*.json"))
    for name in ("imagepipe-input-", "InputEventsQueue", "imagepipe-uploads"):
        assert name not in text
    assert "imagepipe-local-input-123456789012-us-east-1" in text


def _upload(pipeline, event: dict) -> dict:
    """Upload the objects `event` names, and point a version id it names at the upload's."""
    text = json.dumps(event)
    for request in job_requests(event, default_bucket=pipeline.input_bucket):
        if isinstance(request, ObjectRequest):
            body = JSONL if request.key.endswith(".jsonl") else CAMPAIGN
            put = pipeline.client("s3").put_object(Bucket=request.bucket, Key=request.key, Body=body)
            if request.version_id:  # the splitter reads the version the event names: this upload's
                text = text.replace(request.version_id, put["VersionId"])
    return json.loads(text)


@pytest.mark.parametrize("name", sorted(n for n, f in FUNCTION_OF.items() if f == SPLITTER))
def test_each_splitter_event_starts_its_jobs_on_the_local_stack(pipeline, name):
    # Given the stack from template.yaml, and the objects the event names uploaded to its input bucket
    event = _upload(pipeline, load_event(name))
    wanted = job_requests(event, default_bucket=pipeline.input_bucket)

    # When the event reaches the splitter's handler
    answer = pipeline.splitter.invoke(event)

    # Then each object it names (all in this stack's input bucket) or its inline rows is a job; S3's test
    # event is none
    assert "ignored" not in answer
    assert all(r.bucket == pipeline.input_bucket for r in wanted if isinstance(r, ObjectRequest))
    assert [job["status"] for job in answer["jobs"]] == ["split"] * len(wanted)
    assert (name == "s3_test_event.json") == (wanted == [])
    assert any(isinstance(r, InlineRequest) for r in wanted) == (name == "job_requested_inline.json")


def test_one_job_through_the_events_of_every_other_function(pipeline_factory):
    # Given the stack, and the upload events/s3_put_csv.json announces (job id from its metadata)
    pipeline = pipeline_factory()
    pipeline.client("s3").put_object(
        Bucket=pipeline.input_bucket,
        Key="inbox/spring campaign.csv",
        Body=CAMPAIGN,
        Metadata={"job-id": "spring-campaign"},
    )

    # When the splitter gets events/s3_put_csv.json
    (split,) = pipeline.splitter.invoke(load_event("s3_put_csv.json"))["jobs"]

    # Then it queues exactly the tasks of events/sqs_tasks.json
    assert (split["job_id"], split["queued"]) == ("spring-campaign", 3)
    queued = sorted((ImageTask.model_validate_json(m["Body"]) for m in pipeline.queued_messages()), key=str)
    tasks = load_event("sqs_tasks.json")
    assert queued == sorted((ImageTask.model_validate_json(r["body"]) for r in tasks["Records"]), key=str)

    # ... the generator makes them (events/sqs_tasks.json)
    assert pipeline.generator.invoke(tasks) == {"batchItemFailures": []}
    assert pipeline.outcome("spring-campaign", "1")["status"] == "succeeded"

    # ... the dead-letter recorder keeps a task that reached the DLQ after it succeeded as it is
    assert pipeline.recorder.invoke(load_event("sqs_dead_letters.json")) == {"batchItemFailures": []}
    assert pipeline.outcome("spring-campaign", "1")["status"] == "succeeded"

    # ... the finisher writes the job's results (events/sqs_finisher.json)
    assert pipeline.finisher.invoke(load_event("sqs_finisher.json")) == {"batchItemFailures": []}
    assert pipeline.job("spring-campaign")["status"] == "completed"
    assert [r.status for r in pipeline.results("spring-campaign").rows] == ["succeeded"] * 3

    # ... and the sweeper's schedule finds nothing stuck (events/scheduled_sweep.json)
    sweeper = InlineFunction(pipeline.stack.functions["JobSweeperFunction"], REGION)
    assert sweeper.invoke(load_event("scheduled_sweep.json")) == {"stuck": []}


def test_the_agents_outcome_of_a_local_row_is_recorded(pipeline_factory):
    # Given a stack with the local route, and a job whose row runs on the user's ComfyUI (a workflow)
    pipeline = pipeline_factory(parameters={"HybridMode": "enabled"})
    pipeline.client("s3").put_object(
        Bucket=pipeline.input_bucket,
        Key="inbox/foxes.csv",
        Body=b"id,prompt,workflow\nfox,a fox in the snow,txt2img\n",
        Metadata={"job-id": "spring-local"},
    )
    event = load_event("s3_put_csv.json")
    event["Records"][0]["s3"]["object"]["key"] = "inbox/foxes.csv"
    assert pipeline.splitter.invoke(event)["jobs"][0]["queued"] == 1

    # When the agent's outcome (events/sqs_local_outcomes.json) reaches LocalOutcomeRecorderFunction
    recorder = InlineFunction(pipeline.stack.functions["LocalOutcomeRecorderFunction"], REGION)
    answer = recorder.invoke(load_event("sqs_local_outcomes.json"))

    # Then the row is recorded succeeded with its image, and its job, now done, goes to the finisher
    assert answer == {"batchItemFailures": []}
    outcome = pipeline.outcome("spring-local", "fox")
    assert outcome["status"] == "succeeded" and outcome["images"] == ["jobs/spring-local/images/fox.png"]
    assert pipeline.job("spring-local")["status"] == "finishing"
