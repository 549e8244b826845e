"""What the local route (HybridMode, issue 12) adds to template.yaml, and what the agent on the user's GPU
machine may do with AWS: only take its tasks, read the rows' input images, write the rows' images and
report outcomes - never the provider keys, never JobsTable."""

import json

import boto3
import pytest
from moto import mock_aws

from imagepipe_cli.local.runtime import StackOptions, stack_parameters
from imagepipe_cli.local.stack import deploy_stack
from imagepipe_cli.local.template import load_template, translate

from conftest import TEMPLATE

OUTPUT_OBJECTS = "arn:${AWS::Partition}:s3:::${AWS::StackName}-output-${AWS::AccountId}-${AWS::Region}/"
INPUT_OBJECTS = "arn:${AWS::Partition}:s3:::${AWS::StackName}-input-${AWS::AccountId}-${AWS::Region}/"
HYBRID_RESOURCES = {
    "LocalTasksQueue",
    "LocalTasksDeadLetterQueue",
    "LocalOutcomesQueue",
    "LocalOutcomesDeadLetterQueue",
    "LocalOutcomeRecorderFunction",
    "AgentPolicy",
    "LocalTasksDeadLetterQueueAlarm",
    "LocalOutcomesDeadLetterQueueAlarm",
}


@pytest.fixture(scope="module")
def template():
    return load_template(TEMPLATE)


def _listed(value):
    return value if isinstance(value, list) else [value]


def agent_grants(template):
    document = template.resources["AgentPolicy"]["Properties"]["PolicyDocument"]
    return {
        (statement["Effect"], action, json.dumps(resource, sort_keys=True))
        for statement in document["Statement"]
        for action in _listed(statement["Action"])
        for resource in _listed(statement["Resource"])
    }


def test_the_agent_may_do_only_what_the_agent_needs(template):
    tasks, outcomes = (
        {"Fn::GetAtt": ["LocalTasksQueue", "Arn"]},
        {"Fn::GetAtt": ["LocalOutcomesQueue", "Arn"]},
    )
    expected = [
        *(
            ("Allow", f"sqs:{a}", tasks)
            for a in ("ReceiveMessage", "DeleteMessage", "ChangeMessageVisibility")
        ),
        ("Allow", "sqs:GetQueueAttributes", tasks),
        ("Allow", "sqs:SendMessage", outcomes),
        ("Allow", "s3:GetObject", {"Fn::Sub": INPUT_OBJECTS + "*"}),
        ("Allow", "s3:PutObject", {"Fn::Sub": OUTPUT_OBJECTS + "jobs/*/images/*"}),
        # the agent finds its queues and buckets in this stack's Outputs (imagepipe agent --stack NAME)
        ("Allow", "cloudformation:DescribeStacks", {"Ref": "AWS::StackId"}),
    ]

    assert agent_grants(template) == {(e, a, json.dumps(r, sort_keys=True)) for e, a, r in expected}


def test_the_agent_never_reaches_the_keys_secret_or_the_jobs_table(template):
    text = json.dumps(template.resources["AgentPolicy"])

    for forbidden in ("secretsmanager", "ProviderKeysSecret", "dynamodb", "JobsTable", "kms", '"*"'):
        assert forbidden not in text


def test_the_agents_queues_and_policy_are_the_stacks_outputs_when_the_route_is_on(template):
    outputs = template.body["Outputs"]
    for name, target in {
        "LocalTasksQueueUrl": "LocalTasksQueue",
        "LocalOutcomesQueueUrl": "LocalOutcomesQueue",
        "AgentPolicyArn": "AgentPolicy",
    }.items():
        assert (outputs[name]["Value"], outputs[name]["Condition"]) == ({"Ref": target}, "HybridEnabled")


def test_every_part_of_the_local_route_exists_only_with_hybrid_mode_enabled(template):
    cfn = translate(template, {"HybridMode": "enabled"}, "us-east-1")

    # Every resource of the route is made under HybridEnabled (SAM passes it on to what it generates)
    conditional = {name for name, r in cfn["Resources"].items() if r.get("Condition") == "HybridEnabled"}
    assert conditional >= HYBRID_RESOURCES
    assert template.parameter("HybridMode")["Default"] == "disabled"
    splitter_env = template.resources["CsvSplitterFunction"]["Properties"]["Environment"]["Variables"]
    assert splitter_env["LOCAL_TASKS_QUEUE_URL"] == {
        "Fn::If": ["HybridEnabled", {"Ref": "LocalTasksQueue"}, ""]
    }


def test_the_outcome_recorder_keeps_the_job_books_and_nothing_more(template):
    recorder = template.resources["LocalOutcomeRecorderFunction"]["Properties"]
    grants = {
        (action, json.dumps(resource))
        for statement in recorder["Policies"][0]["Statement"]
        for action in _listed(statement["Action"])
        for resource in _listed(statement["Resource"])
    }
    table, finisher = {"Fn::GetAtt": ["JobsTable", "Arn"]}, {"Fn::GetAtt": ["FinisherQueue", "Arn"]}
    assert grants == {
        *((f"dynamodb:{a}", json.dumps(table)) for a in ("GetItem", "UpdateItem", "BatchGetItem")),
        ("sqs:SendMessage", json.dumps(finisher)),
    }
    # It takes the agents' outcomes, and the local tasks no agent finished (to record them failed)
    queues = {name: e["Properties"]["Queue"]["Fn::GetAtt"][0] for name, e in recorder["Events"].items()}
    assert queues == {"Outcomes": "LocalOutcomesQueue", "DeadTasks": "LocalTasksDeadLetterQueue"}
    for event in recorder["Events"].values():
        assert event["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]


# --------------------------------------------------------------------------- the local runtime


@pytest.mark.parametrize("mode", ["enabled", "disabled"])
def test_the_local_stack_has_the_route_exactly_when_hybrid_mode_is_enabled(mode):
    # `imagepipe run --parameter-overrides HybridMode=...` deploys the stack from these parameters
    parameters = stack_parameters(
        load_template(TEMPLATE), StackOptions(parameter_overrides=[f"HybridMode={mode}"])
    )
    with mock_aws():
        session = boto3.session.Session(region_name="us-east-1")
        stack = deploy_stack(
            lambda name: session.client(name, region_name="us-east-1"),
            load_template(TEMPLATE),
            stack_name="hybrid",
            parameters=parameters,
            region="us-east-1",
        )
        queues = session.client("sqs").list_queues().get("QueueUrls", [])

    splitter = stack.functions["CsvSplitterFunction"].env
    recorder = [m for m in stack.queue_mappings if m.function == "LocalOutcomeRecorderFunction"]
    if mode == "disabled":
        assert "LocalOutcomeRecorderFunction" not in stack.functions and not recorder
        assert "LOCAL_TASKS_QUEUE_URL" not in splitter or splitter["LOCAL_TASKS_QUEUE_URL"] == ""
        assert not [q for q in queues if "Local" in q] and "AgentPolicyArn" not in stack.outputs
        return
    # The agent's queues, found through the stack's outputs, and the splitter sends to the same one
    assert {stack.outputs["LocalTasksQueueUrl"], stack.outputs["LocalOutcomesQueueUrl"]} <= set(queues)
    assert splitter["LOCAL_TASKS_QUEUE_URL"] == stack.outputs["LocalTasksQueueUrl"]
    assert stack.outputs["AgentPolicyArn"].startswith("arn:aws:iam::")
    # Lambda's poller for the recorder is played by the runtime like any other SQS event source
    assert sorted((m.queue_url, m.report_batch_item_failures) for m in recorder) == sorted(
        [
            (stack.outputs["LocalOutcomesQueueUrl"], True),
            (stack.outputs["LocalTasksDeadLetterQueueUrl"], True),
        ]
    )
