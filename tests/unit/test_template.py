"""What template.yaml promises a deployer: the queue, DLQ, triggers and outputs the pipeline relies on."""

import pytest

from imagepipe_cli.local.template import load_template, translate

from conftest import TEMPLATE


@pytest.fixture(scope="module")
def template():
    return load_template(TEMPLATE)


def test_a_task_is_never_redelivered_while_a_generator_may_still_run_it(template):
    # AWS advises a visibility timeout of at least 6x the function timeout for SQS-driven functions.
    queue = template.resources["TasksQueue"]["Properties"]
    generator_timeout = template.function_property("ImageGeneratorFunction", "Timeout")
    assert queue["VisibilityTimeout"] >= 6 * generator_timeout


def test_failing_tasks_go_to_the_dead_letter_queue_after_the_configured_attempts(template):
    redrive = template.resources["TasksQueue"]["Properties"]["RedrivePolicy"]
    assert redrive["deadLetterTargetArn"] == {"Fn::GetAtt": ["TasksDeadLetterQueue", "Arn"]}
    assert redrive["maxReceiveCount"] == {"Ref": "TaskMaxReceiveCount"}
    # the generator knows which attempt is the last one, to record the failure's reason
    env = template.function_property("ImageGeneratorFunction", "Environment")["Variables"]
    assert env["TASK_MAX_RECEIVE_COUNT"] == {"Ref": "TaskMaxReceiveCount"}


def test_the_generator_reports_partial_batch_failures_with_bounded_concurrency(template):
    (event,) = template.function_property("ImageGeneratorFunction", "Events").values()
    props = event["Properties"]
    assert event["Type"] == "SQS"
    assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert props["ScalingConfig"]["MaximumConcurrency"] == {"Ref": "GeneratorMaxConcurrency"}
    assert props["BatchSize"] == {"Ref": "GeneratorBatchSize"}


def test_only_csv_and_jsonl_uploads_trigger_the_splitter(template):
    events = template.function_property("CsvSplitterFunction", "Events").values()
    suffixes = {e["Properties"]["Filter"]["S3Key"]["Rules"][0]["Value"] for e in events if e["Type"] == "S3"}
    assert suffixes == {".csv", ".jsonl"}


def test_both_functions_share_one_layer_built_by_sam(template):
    layer = template.resources["SharedLayer"]
    assert layer["Metadata"]["BuildMethod"] == template.body["Globals"]["Function"]["Runtime"]
    assert template.body["Globals"]["Function"]["Runtime"] in {"python3.12", "python3.13"}
    assert template.body["Globals"]["Function"]["Layers"] == [{"Ref": "SharedLayer"}]


def test_every_bucket_and_queue_is_findable_by_its_output(template):
    outputs = template.body["Outputs"]
    for name in ("InputBucketName", "OutputBucketName", "TasksQueueUrl", "TasksDeadLetterQueueUrl"):
        assert name in outputs
    referenced = {o["Value"]["Ref"] for o in outputs.values() if "Ref" in o["Value"]}
    buckets_and_queues = {
        name for name, r in template.resources.items() if r["Type"] in {"AWS::S3::Bucket", "AWS::SQS::Queue"}
    }
    assert buckets_and_queues <= referenced


KEY_NAMES = ("ATLASCLOUD_API_KEY", "QIANFAN_API_KEY", "OPENAI_API_KEY", "BAIDU_API_KEY", "BAIDU_SECRET_KEY")


def test_the_api_keys_live_only_in_a_secret_that_both_functions_may_read(template):
    secret = template.resources["ProviderKeysSecret"]["Properties"]
    assert secret["Name"] == {"Ref": "ProviderKeysSecretName"}
    assert template.body["Globals"]["Function"]["Environment"]["Variables"]["PROVIDER_KEYS_SECRET"] == {
        "Ref": "ProviderKeysSecretName"
    }
    for function in ("CsvSplitterFunction", "ImageGeneratorFunction"):
        env = template.function_property(function, "Environment")["Variables"]
        assert not set(KEY_NAMES) & set(env), "an API key must never be an environment variable"
        policies = template.resources[function]["Properties"]["Policies"]
        assert {
            "AWSSecretsManagerGetSecretValuePolicy": {"SecretArn": {"Ref": "ProviderKeysSecret"}}
        } in policies


def test_the_generator_can_keep_task_state_and_hand_predictions_back_to_the_queue(template):
    env = template.function_property("ImageGeneratorFunction", "Environment")["Variables"]
    assert template.body["Globals"]["Function"]["Environment"]["Variables"]["JOBS_TABLE"] == {
        "Ref": "JobsTable"
    }
    assert env["TASKS_QUEUE_URL"] == {"Ref": "TasksQueue"}
    policies = template.resources["ImageGeneratorFunction"]["Properties"]["Policies"]
    assert {"DynamoDBCrudPolicy": {"TableName": {"Ref": "JobsTable"}}} in policies
    assert {"SQSSendMessagePolicy": {"QueueName": {"Fn::GetAtt": ["TasksQueue", "QueueName"]}}} in policies
    table = template.resources["JobsTable"]["Properties"]
    assert table["SSESpecification"] == {"SSEEnabled": True}
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}


def test_a_handed_back_prediction_waits_no_longer_than_sqs_allows(template):
    assert int(template.parameter("PollDelaySeconds")["MaxValue"]) <= 900  # SQS DelaySeconds limit


def test_a_claim_to_call_the_api_is_stale_only_after_the_invocation_that_made_it_is_gone(template):
    env = template.function_property("ImageGeneratorFunction", "Environment")["Variables"]
    assert float(env["CLAIM_STALE_SECONDS"]) >= template.function_property(
        "ImageGeneratorFunction", "Timeout"
    )


def test_the_template_translates_to_cloudformation_with_the_sqs_mapping(template):
    cfn = translate(template, {}, "us-east-1")
    kinds = {r["Type"] for r in cfn["Resources"].values()}
    assert {"AWS::Lambda::Function", "AWS::Lambda::EventSourceMapping", "AWS::Lambda::LayerVersion"} <= kinds


def test_the_slowest_task_of_a_batch_still_fits_in_the_generator_timeout(template):
    # The tasks of a batch run side by side; the slowest makes at most two calls (the second after
    # re-reading a refused key). A batch that outlives the function loses its progress.
    env = template.function_property("ImageGeneratorFunction", "Environment")["Variables"]
    timeout = template.function_property("ImageGeneratorFunction", "Timeout")
    assert 2 * float(env["HTTP_TIMEOUT_SECONDS"]) < timeout
