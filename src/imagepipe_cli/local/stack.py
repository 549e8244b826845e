"""Creating the stack that template.yaml declares on moto (server or in-process) and reading it back
by its Outputs, functions and event source mappings - the way a deployed stack is found."""

from __future__ import annotations

import io
import json
import secrets
import string
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagepipe_cli.local.template import ARTIFACT_BUCKET, Template, translate

ClientFactory = Callable[[str], Any]


class StackError(Exception):
    """The local stack could not be created; the message says which resource and why."""


@dataclass(frozen=True)
class DeployedFunction:
    logical_id: str
    name: str
    code_dir: Path
    handler: str
    env: dict[str, str]
    timeout: int
    memory: int


@dataclass(frozen=True)
class QueueMapping:
    """An SQS event source mapping as the stack recorded it: what Lambda's poller would honour."""

    function: str  # logical id
    queue_arn: str
    queue_url: str
    batch_size: int
    max_concurrency: int
    report_batch_item_failures: bool


@dataclass(frozen=True)
class S3Trigger:
    function: str  # logical id
    bucket: str
    events: list[str]
    filter: dict[str, Any] | None


@dataclass
class LocalStack:
    name: str
    region: str
    outputs: dict[str, str]
    parameters: dict[str, str]
    functions: dict[str, DeployedFunction] = field(default_factory=dict)
    queue_mappings: list[QueueMapping] = field(default_factory=list)
    s3_triggers: list[S3Trigger] = field(default_factory=list)


def deploy_stack(
    client: ClientFactory, template: Template, *, stack_name: str, parameters: dict[str, str], region: str
) -> LocalStack:
    cfn_template = translate(template, parameters, region)
    _upload_code(client("s3"), template)
    cfn = client("cloudformation")
    cfn.create_stack(
        StackName=stack_name,
        TemplateBody=json.dumps(cfn_template),
        Parameters=[{"ParameterKey": k, "ParameterValue": str(v)} for k, v in parameters.items()],
        Capabilities=["CAPABILITY_IAM", "CAPABILITY_AUTO_EXPAND"],
    )
    stack = cfn.describe_stacks(StackName=stack_name)["Stacks"][0]
    if stack["StackStatus"] != "CREATE_COMPLETE":
        raise StackError(
            f"stack {stack_name} is {stack['StackStatus']}: {stack.get('StackStatusReason', '')}"
        )
    physical = {
        r["LogicalResourceId"]: r.get("PhysicalResourceId", "")
        for r in cfn.describe_stack_resources(StackName=stack_name)["StackResources"]
        if r.get("LogicalResourceId")
    }
    resolved = _parameter_values(template, parameters)
    _create_unsupported(client, cfn_template, physical, resolved)
    _schedules_match_only_their_own_events(client("events"))
    _version_buckets(client("s3"), cfn_template, physical)

    local = LocalStack(
        name=stack_name,
        region=region,
        outputs={o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])},
        parameters=resolved,
    )
    lam, sqs = client("lambda"), client("sqs")
    for logical_id in template.resources_of_type("AWS::Serverless::Function"):
        if logical_id not in physical:
            continue  # a function whose Condition does not hold: not made, on AWS either
        config = lam.get_function_configuration(FunctionName=physical[logical_id])
        local.functions[logical_id] = DeployedFunction(
            logical_id=logical_id,
            name=config["FunctionName"],
            code_dir=template.code_dir(logical_id),
            handler=config["Handler"],
            env={k: str(v) for k, v in config.get("Environment", {}).get("Variables", {}).items()},
            timeout=int(config.get("Timeout", 3)),
            memory=int(config.get("MemorySize", 128)),
        )
        for mapping in lam.list_event_source_mappings(FunctionName=config["FunctionName"])[
            "EventSourceMappings"
        ]:
            # Lambda's poller is played by the local runtime; left enabled, moto would try to run
            # the function in Docker as soon as a message arrives.
            lam.update_event_source_mapping(UUID=mapping["UUID"], Enabled=False)
            queue_name = mapping["EventSourceArn"].split(":")[-1]
            local.queue_mappings.append(
                QueueMapping(
                    function=logical_id,
                    queue_arn=mapping["EventSourceArn"],
                    queue_url=sqs.get_queue_url(QueueName=queue_name)["QueueUrl"],
                    batch_size=int(mapping.get("BatchSize", 10)),
                    max_concurrency=int(mapping.get("ScalingConfig", {}).get("MaximumConcurrency", 1000)),
                    report_batch_item_failures="ReportBatchItemFailures"
                    in mapping.get("FunctionResponseTypes", []),
                )
            )
        for event in (template.function_property(logical_id, "Events") or {}).values():
            if event.get("Type") == "S3":
                props = event["Properties"]
                events = props["Events"] if isinstance(props["Events"], list) else [props["Events"]]
                local.s3_triggers.append(
                    S3Trigger(logical_id, physical[props["Bucket"]["Ref"]], events, props.get("Filter"))
                )
    return local


def _upload_code(s3: Any, template: Template) -> None:
    """What `sam package` does: each function's and layer's folder, zipped, in an artifacts bucket."""
    s3.create_bucket(Bucket=ARTIFACT_BUCKET)
    kinds = ("AWS::Serverless::Function", "AWS::Serverless::LayerVersion")
    for logical_id in [name for kind in kinds for name in template.resources_of_type(kind)]:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            root = template.code_dir(logical_id)
            for path in sorted(root.rglob("*.py")):
                if "__pycache__" not in path.parts:
                    archive.write(path, path.relative_to(root).as_posix())
        s3.put_object(Bucket=ARTIFACT_BUCKET, Key=f"{logical_id}.zip", Body=buffer.getvalue())


def _parameter_values(template: Template, given: dict[str, str]) -> dict[str, str]:
    values = {
        name: str(spec.get("Default", "")) for name, spec in template.body.get("Parameters", {}).items()
    }
    values.update({k: str(v) for k, v in given.items()})
    return values


def _create_unsupported(
    client: ClientFactory, cfn_template: dict[str, Any], physical: dict[str, str], params: dict[str, str]
) -> None:
    """moto's CloudFormation skips some resource types; create those from the template's own
    Properties so the local stack still has every resource the template declares."""
    conditions = cfn_template.get("Conditions", {})
    for logical_id, resource in cfn_template.get("Resources", {}).items():
        if logical_id in physical:
            continue
        if "Condition" in resource and not _holds(conditions, resource["Condition"], params):
            continue  # not made on AWS either (e.g. S3EventsQueueMapping without S3EventsQueueArn)
        kind, props = resource["Type"], resource.get("Properties", {})
        if kind == "AWS::S3::BucketPolicy":
            # Deliberately not made locally: the policies deny requests without TLS, and the local AWS is
            # plain HTTP on loopback. They are checked where they matter: cfn-lint, checkov, the template tests.
            continue
        if kind == "AWS::CloudWatch::Alarm":
            # Not made locally either: nothing locally sends CloudWatch metrics (Powertools' metrics go to the
            # log as EMF). The alarms are checked by cfn-lint, checkov and tests/unit/test_template.py.
            continue
        if kind == "AWS::SecretsManager::Secret":
            value = props.get("SecretString")
            client("secretsmanager").create_secret(
                Name=_resolve(props["Name"], params, logical_id),
                Description=props.get("Description", ""),
                SecretString=value
                if isinstance(value, str)
                else _generated_secret(props.get("GenerateSecretString", {})),
            )
        else:
            raise StackError(
                f"moto cannot create {logical_id} ({kind}) and imagepipe does not create it either"
            )


def _version_buckets(s3: Any, cfn_template: dict[str, Any], physical: dict[str, str]) -> None:
    """moto's CloudFormation makes a bucket without its VersioningConfiguration: apply it, so an upload
    overwritten or deleted keeps its versions locally as on AWS (and S3 events carry a versionId)."""
    for logical_id, resource in cfn_template.get("Resources", {}).items():
        status = resource.get("Properties", {}).get("VersioningConfiguration", {}).get("Status")
        if resource["Type"] == "AWS::S3::Bucket" and status and logical_id in physical:
            s3.put_bucket_versioning(Bucket=physical[logical_id], VersioningConfiguration={"Status": status})


def _schedules_match_only_their_own_events(events: Any) -> None:
    """A schedule rule (JobSweeperFunction's) has no event pattern, and moto matches a rule without one to
    every PutEvents - on AWS it gets only its own "Scheduled Event"s. Give it the pattern of exactly those,
    so the stack's own events ("ImageJob Completed") do not reach it locally."""
    for rule in events.list_rules().get("Rules", []):
        if rule.get("ScheduleExpression") and not rule.get("EventPattern"):
            pattern = {
                "source": ["aws.events"],
                "detail-type": ["Scheduled Event"],
                "resources": [rule["Arn"]],
            }
            events.put_rule(
                Name=rule["Name"],
                ScheduleExpression=rule["ScheduleExpression"],
                EventPattern=json.dumps(pattern),
                State=rule.get("State", "ENABLED"),
                **({"Description": rule["Description"]} if rule.get("Description") else {}),
            )


def _holds(conditions: dict[str, Any], name: str, params: dict[str, str]) -> bool:
    """A template condition's value for these parameters (the functions conditions may use on parameters)."""

    def value(node: Any) -> Any:
        if isinstance(node, dict) and len(node) == 1:
            ((fn, arg),) = node.items()
            if fn == "Ref":
                return params[arg]
            if fn == "Condition":
                return value(conditions[arg])
            if fn == "Fn::Equals":
                return str(value(arg[0])) == str(value(arg[1]))
            if fn == "Fn::Not":
                return not value(arg[0])
            if fn == "Fn::And":
                return all(value(a) for a in arg)
            if fn == "Fn::Or":
                return any(value(a) for a in arg)
        if isinstance(node, dict):
            raise StackError(f"condition {name}: cannot evaluate {node!r} locally")
        return node

    return bool(value(conditions[name]))


def _resolve(value: Any, params: dict[str, str], logical_id: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and set(value) == {"Ref"} and value["Ref"] in params:
        return params[value["Ref"]]
    raise StackError(f"{logical_id}: cannot resolve {value!r} locally")


def _generated_secret(spec: dict[str, Any]) -> str:
    """What CloudFormation's GenerateSecretString makes: the template plus one random string."""
    template = json.loads(spec.get("SecretStringTemplate", "{}"))
    alphabet = string.ascii_letters + string.digits
    if key := spec.get("GenerateStringKey"):
        template[key] = "".join(secrets.choice(alphabet) for _ in range(int(spec.get("PasswordLength", 32))))
    return json.dumps(template)
