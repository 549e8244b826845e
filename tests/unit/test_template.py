"""What template.yaml promises a deployer: the queue, DLQ, triggers and outputs the pipeline relies on, and a
locked-down stack (least-privilege roles, TLS-only encrypted buckets, encrypted queues and table, retention)."""

import pytest

from imagepipe_cli.local.template import load_template, translate

from conftest import TEMPLATE


@pytest.fixture(scope="module")
def template():
    return load_template(TEMPLATE)


def test_a_task_is_never_redelivered_while_a_generator_may_still_run_it(template):
    # The generator's Timeout is a parameter; Lambda refuses a queue whose visibility timeout is shorter
    # than the function's, and AWS advises 6x the function timeout.
    queue = template.resources["TasksQueue"]["Properties"]
    assert template.function_property("ImageGeneratorFunction", "Timeout") == {
        "Ref": "GeneratorTimeoutSeconds"
    }
    timeout = template.parameter("GeneratorTimeoutSeconds")
    assert queue["VisibilityTimeout"] >= 6 * int(timeout["Default"])
    assert queue["VisibilityTimeout"] >= int(timeout["MaxValue"])


def test_the_dead_letter_queue_only_guards_against_crashes_and_poison_messages(template):
    redrive = template.resources["TasksQueue"]["Properties"]["RedrivePolicy"]
    assert redrive["deadLetterTargetArn"] == {"Fn::GetAtt": ["TasksDeadLetterQueue", "Arn"]}
    assert redrive["maxReceiveCount"] == {"Ref": "TaskMaxReceiveCount"}
    assert int(template.parameter("TaskMaxReceiveCount")["Default"]) >= 5  # AWS advises at least 5
    # the generator knows which delivery is the last one, to record the row failed rather than lose it
    env = template.function_property("ImageGeneratorFunction", "Environment")["Variables"]
    assert env["TASK_MAX_RECEIVE_COUNT"] == {"Ref": "TaskMaxReceiveCount"}


def test_failed_calls_are_retried_on_the_generators_own_schedule_within_a_window(template):
    env = template.function_property("ImageGeneratorFunction", "Environment")["Variables"]
    for name, variable in {
        "TaskMaxAttempts": "TASK_MAX_ATTEMPTS",
        "TaskRetryWindowSeconds": "TASK_RETRY_WINDOW_SECONDS",
        "RetryBaseDelaySeconds": "RETRY_BASE_DELAY_SECONDS",
        "RetryMaxDelaySeconds": "RETRY_MAX_DELAY_SECONDS",
    }.items():
        assert env[variable] == {"Ref": name}
    assert int(template.parameter("TaskMaxAttempts")["Default"]) >= 8
    assert int(template.parameter("TaskRetryWindowSeconds")["Default"]) >= 3600
    # a retry is a new message delayed by SQS, which delays at most 900 s
    assert int(template.parameter("RetryMaxDelaySeconds")["MaxValue"]) <= 900
    # when that message cannot be sent, the delivered one is made visible again after the backoff
    assert ("sqs:ChangeMessageVisibility", {"Fn::GetAtt": ["TasksQueue", "Arn"]}) in grants(
        template, "ImageGeneratorFunction"
    )


def test_the_generator_reports_partial_batch_failures_with_bounded_concurrency(template):
    (event,) = template.function_property("ImageGeneratorFunction", "Events").values()
    props = event["Properties"]
    assert event["Type"] == "SQS"
    assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert props["ScalingConfig"]["MaximumConcurrency"] == {"Ref": "GeneratorMaxConcurrency"}
    assert props["BatchSize"] == {"Ref": "GeneratorBatchSize"}


def test_only_csv_jsonl_and_json_uploads_trigger_the_splitter(template):
    events = template.function_property("CsvSplitterFunction", "Events").values()
    suffixes = {e["Properties"]["Filter"]["S3Key"]["Rules"][0]["Value"] for e in events if e["Type"] == "S3"}
    assert suffixes == {".csv", ".jsonl", ".json"}


def test_every_function_shares_one_layer_built_for_its_runtime(template):
    layer = template.resources["SharedLayer"]
    runtime = template.body["Globals"]["Function"]["Runtime"]
    assert runtime in {"python3.12", "python3.13"}
    assert template.body["Globals"]["Function"]["Layers"] == [{"Ref": "SharedLayer"}]
    # sam build runs the layer's Makefile (SAM's python build without the runtime's botocore): for that runtime
    assert layer["Metadata"]["BuildMethod"] == "makefile"
    makefile = (TEMPLATE.parent / layer["Properties"]["ContentUri"] / "Makefile").read_text()
    assert "build-SharedLayer:" in makefile
    assert f"PYTHON ?= {runtime}\n" in makefile
    assert f"--python-version {runtime.removeprefix('python')} " in makefile


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
    assert secret["SecretString"] == "{}", "no key is ever written into the template"
    assert template.body["Globals"]["Function"]["Environment"]["Variables"]["PROVIDER_KEYS_SECRET"] == {
        "Ref": "ProviderKeysSecretName"
    }
    for function in ("CsvSplitterFunction", "ImageGeneratorFunction"):
        assert {
            "Effect": "Allow",
            "Action": ["secretsmanager:GetSecretValue"],
            "Resource": [{"Ref": "ProviderKeysSecret"}],
        } in statements(template, function)
    # the one function with no use for the keys cannot read them
    assert not any(
        a.startswith("secretsmanager:")
        for s in statements(template, "JobFinisherFunction")
        for a in s["Action"]
    )


def test_no_function_has_an_api_key_in_its_environment(template):
    for function in functions(template):
        env = template.function_property(function, "Environment")["Variables"]
        env = {**template.body["Globals"]["Function"]["Environment"]["Variables"], **env}
        assert not set(KEY_NAMES) & set(env), f"{function}: an API key must never be an environment variable"
        for name, value in env.items():
            assert not name.endswith(("_API_KEY", "_SECRET_KEY", "_TOKEN", "_PASSWORD")), (function, name)
            assert isinstance(value, dict) or len(str(value)) < 16 or "/" in str(value), (function, name)


def test_the_generator_can_keep_task_state_and_hand_predictions_back_to_the_queue(template):
    env = template.function_property("ImageGeneratorFunction", "Environment")["Variables"]
    assert template.body["Globals"]["Function"]["Environment"]["Variables"]["JOBS_TABLE"] == {
        "Ref": "JobsTable"
    }
    assert env["TASKS_QUEUE_URL"] == {"Ref": "TasksQueue"}
    granted = grants(template, "ImageGeneratorFunction")
    table = {"Fn::GetAtt": ["JobsTable", "Arn"]}
    # UpdateItem also authorises the two updates of finish()'s TransactWriteItems
    for action in ("dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:BatchGetItem"):
        assert (action, table) in granted
    assert ("sqs:SendMessage", {"Fn::GetAtt": ["TasksQueue", "Arn"]}) in granted
    table = template.resources["JobsTable"]["Properties"]
    assert table["SSESpecification"] == {"SSEEnabled": True}
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}


def test_a_handed_back_prediction_waits_no_longer_than_sqs_allows(template):
    assert int(template.parameter("PollDelaySeconds")["MaxValue"]) <= 900  # SQS DelaySeconds limit


def test_a_claim_to_call_the_api_is_stale_only_after_the_invocation_that_made_it_is_gone(template):
    # The generator derives the claim's lifetime from its own Timeout (plus a minute), never a copy of it.
    env = template.function_property("ImageGeneratorFunction", "Environment")["Variables"]
    assert env["GENERATOR_TIMEOUT_SECONDS"] == template.function_property("ImageGeneratorFunction", "Timeout")
    assert "CLAIM_STALE_SECONDS" not in env


def test_the_template_translates_to_cloudformation_with_the_sqs_mapping(template):
    cfn = translate(template, {}, "us-east-1")
    kinds = {r["Type"] for r in cfn["Resources"].values()}
    assert {"AWS::Lambda::Function", "AWS::Lambda::EventSourceMapping", "AWS::Lambda::LayerVersion"} <= kinds


def test_the_slowest_task_of_a_batch_still_fits_in_the_generator_timeout(template):
    # The tasks of a batch run side by side; the slowest makes at most two calls (the second after
    # re-reading a refused key), each also cut to the invocation's time left. A batch that outlives the
    # function loses its progress.
    env = template.function_property("ImageGeneratorFunction", "Environment")["Variables"]
    assert env["HTTP_TIMEOUT_SECONDS"] == {"Ref": "ProviderHttpTimeoutSeconds"}
    http = int(template.parameter("ProviderHttpTimeoutSeconds")["Default"])
    assert 2 * http < int(template.parameter("GeneratorTimeoutSeconds")["Default"])


# ---------------------------------------------------------------- the locked-down stack

FUNCTION = "AWS::Serverless::Function"
OUTPUT_OBJECTS = "arn:${AWS::Partition}:s3:::${AWS::StackName}-output-${AWS::AccountId}-${AWS::Region}/"
INPUT_OBJECTS = "arn:${AWS::Partition}:s3:::${AWS::StackName}-input-${AWS::AccountId}-${AWS::Region}/"
# What SAM itself attaches: logs, X-Ray (Tracing: Active) and, for SQS events, the poller's permissions.
SAM_MANAGED = {"AWSLambdaBasicExecutionRole", "AWSXrayWriteOnlyAccess", "AWSLambdaSQSQueueExecutionRole"}


def functions(template):
    return sorted(template.resources_of_type(FUNCTION))


def _listed(value):
    return value if isinstance(value, list) else [value]


def statements(template, function):
    """The function's own policy statements, Action and Resource always lists. Each policy must be a plain
    statement list: a SAM policy template (S3CrudPolicy, DynamoDBCrudPolicy...) grants more than is used."""
    found = []
    for policy in template.resources[function]["Properties"].get("Policies", []):
        assert isinstance(policy, dict) and set(policy) <= {"Version", "Statement"}, (
            f"{function}: {policy} is not an explicit statement list"
        )
        for statement in policy["Statement"]:
            if "Fn::If" in statement:  # a grant made only under a condition: checked as if it holds
                statement = statement["Fn::If"][1]
            found.append(
                {
                    "Effect": statement["Effect"],
                    "Action": _listed(statement["Action"]),
                    "Resource": _listed(statement["Resource"]),
                }
            )
    return found


def grants(template, function):
    """(action, resource) pairs the function is allowed, resources as written in the template."""
    return [
        (action, resource)
        for s in statements(template, function)
        if s["Effect"] == "Allow"
        for action in s["Action"]
        for resource in s["Resource"]
    ]


def _sub(resource):
    return resource["Fn::Sub"] if isinstance(resource, dict) and "Fn::Sub" in resource else None


def test_every_function_names_each_action_and_resource_it_may_use(template):
    for function in functions(template):
        for statement in statements(template, function):
            assert statement["Effect"] == "Allow"
            for action in statement["Action"]:
                assert "*" not in action, f"{function}: wildcard action {action}"
            for resource in statement["Resource"]:
                assert resource != "*", f"{function}: a statement on every resource"


def test_the_roles_sam_makes_have_no_wildcard_action_and_only_sams_managed_policies(template):
    cfn = translate(template, {}, "us-east-1")
    roles = {name: r["Properties"] for name, r in cfn["Resources"].items() if r["Type"] == "AWS::IAM::Role"}
    assert len(roles) == len(functions(template))
    for name, role in roles.items():
        managed = {arn.rsplit("/", 1)[-1] for arn in role.get("ManagedPolicyArns", [])}
        assert managed <= SAM_MANAGED, (name, managed - SAM_MANAGED)
        for policy in role.get("Policies", []):
            for statement in policy["PolicyDocument"]["Statement"]:
                statement = statement["Fn::If"][1] if "Fn::If" in statement else statement
                actions = _listed(statement["Action"])
                assert not [a for a in actions if "*" in a], (name, policy["PolicyName"], actions)
                assert "*" not in _listed(statement["Resource"]), (name, policy["PolicyName"])


def test_the_generator_may_only_put_images_under_jobs(template):
    s3 = [(a, r) for a, r in grants(template, "ImageGeneratorFunction") if a.startswith("s3:")]
    assert s3 == [("s3:PutObject", {"Fn::Sub": OUTPUT_OBJECTS + "jobs/*/images/*"})]


def test_every_object_grant_is_under_jobs_of_the_output_bucket_or_reads_an_upload(template):
    for function in functions(template):
        for action, resource in grants(template, function):
            if not action.startswith("s3:"):
                continue
            path = _sub(resource)
            assert path, f"{function}: {action} on {resource}"
            if path.startswith(INPUT_OBJECTS):
                # the splitter reads an upload as the version its S3 event names (s3:GetObjectVersion)
                assert function == "CsvSplitterFunction"
                assert action in {"s3:GetObject", "s3:GetObjectVersion"}, (function, action)
            else:
                assert path.startswith(OUTPUT_OBJECTS + "jobs/"), (function, action, path)
            if action == "s3:DeleteObject":
                # the splitter's scratch parts of a split (id index, parts of rows.jsonl), never a record
                assert (function, path) == ("CsvSplitterFunction", OUTPUT_OBJECTS + "jobs/*/split/*")
                continue
            # object actions only: nobody may list, delete, or change a bucket's policy, ACLs or lifecycle
            assert action in {
                "s3:GetObject",
                "s3:GetObjectVersion",
                "s3:PutObject",
                "s3:AbortMultipartUpload",
            }, (
                function,
                action,
            )


def test_large_uploads_may_clean_up_their_parts(template):
    # upload_fileobj sends a big rows.jsonl / results file in parts (s3:PutObject) and aborts them on failure
    for function in ("CsvSplitterFunction", "JobFinisherFunction"):
        granted = grants(template, function)
        jobs = {"Fn::Sub": OUTPUT_OBJECTS + "jobs/*"}
        assert ("s3:PutObject", jobs) in granted and ("s3:AbortMultipartUpload", jobs) in granted


def test_the_finisher_publishes_only_to_the_default_bus(template):
    events = [(a, r) for a, r in grants(template, "JobFinisherFunction") if a.startswith("events:")]
    assert events == [
        (
            "events:PutEvents",
            {"Fn::Sub": "arn:${AWS::Partition}:events:${AWS::Region}:${AWS::AccountId}:event-bus/default"},
        )
    ]
    env = template.function_property("JobFinisherFunction", "Environment")["Variables"]
    assert env["EVENT_BUS_NAME"] == "default"


def test_both_buckets_block_public_access_and_encrypt_by_default(template):
    for name, bucket in template.resources_of_type("AWS::S3::Bucket").items():
        props = bucket["Properties"]
        assert set(props["PublicAccessBlockConfiguration"].values()) == {True}, name
        assert len(props["PublicAccessBlockConfiguration"]) == 4, name
        (rule,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
        assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in {"AES256", "aws:kms"}, name


def test_both_buckets_refuse_every_request_without_tls(template):
    policies = {
        p["Properties"]["Bucket"]["Ref"]: p["Properties"]["PolicyDocument"]
        for p in template.resources_of_type("AWS::S3::BucketPolicy").values()
    }
    assert (
        set(policies) == set(template.resources_of_type("AWS::S3::Bucket")) == {"InputBucket", "OutputBucket"}
    )
    for bucket, document in policies.items():
        assert {
            "Sid": "DenyInsecureTransport",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "s3:*",
            "Resource": [{"Fn::GetAtt": [bucket, "Arn"]}, {"Fn::Sub": "${" + bucket + ".Arn}/*"}],
            "Condition": {"Bool": {"aws:SecureTransport": "false"}},
        } in document["Statement"]


def test_the_input_bucket_keeps_versions_and_drops_replaced_ones_after_the_retention(template):
    props = template.resources["InputBucket"]["Properties"]
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    rules = props["LifecycleConfiguration"]["Rules"]
    (conditional,) = [r["Fn::If"] for r in rules if "Fn::If" in r]
    condition, rule, otherwise = conditional
    assert condition == "ExpireOldJobs" and otherwise == {"Ref": "AWS::NoValue"}
    assert rule["NoncurrentVersionExpiration"] == {"NoncurrentDays": {"Ref": "JobRetentionDays"}}
    assert "ExpirationInDays" not in rule, "the current version of an upload is never expired"


def test_old_jobs_expire_after_job_retention_days_and_0_keeps_them(template):
    parameter = template.parameter("JobRetentionDays")
    assert (parameter["Type"], parameter["Default"], parameter["MinValue"]) == ("Number", 90, 0)
    assert "0 keeps them forever" in " ".join(parameter["Description"].split())
    assert template.body["Conditions"]["ExpireOldJobs"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "JobRetentionDays"}, "0"]}]
    }
    rules = template.resources["OutputBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    (conditional,) = [r["Fn::If"] for r in rules if "Fn::If" in r]
    assert conditional == [
        "ExpireOldJobs",
        {
            "Id": "ExpireOldJobs",
            "Status": "Enabled",
            "Prefix": "jobs/",
            "ExpirationInDays": {"Ref": "JobRetentionDays"},
        },
        {"Ref": "AWS::NoValue"},
    ]
    # and neither bucket keeps the parts of an upload that never finished
    for bucket in ("InputBucket", "OutputBucket"):
        rules = template.resources[bucket]["Properties"]["LifecycleConfiguration"]["Rules"]
        assert any("AbortIncompleteMultipartUpload" in r for r in rules), bucket


def test_the_queues_and_the_table_are_encrypted_at_rest(template):
    for name, queue in template.resources_of_type("AWS::SQS::Queue").items():
        props = queue["Properties"]
        assert props.get("SqsManagedSseEnabled") is True or "KmsMasterKeyId" in props, name
    assert template.resources["JobsTable"]["Properties"]["SSESpecification"] == {"SSEEnabled": True}


def test_an_upload_event_the_splitter_keeps_failing_on_is_kept(template):
    dlq = template.function_property("CsvSplitterFunction", "DeadLetterQueue")
    assert dlq == {"Type": "SQS", "TargetArn": {"Fn::GetAtt": ["SplitterDeadLetterQueue", "Arn"]}}


def test_every_skipped_checkov_check_says_why(template):
    skipped = 0
    for name, resource in template.resources.items():
        for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", []):
            assert set(skip) == {"id", "comment"}, (name, skip)
            assert skip["id"].startswith("CKV_"), (name, skip)
            assert len(skip["comment"].split()) >= 8, f"{name} skips {skip['id']} without a reason"
            skipped += 1
    assert skipped


# ---------------------------------------------------------------------------------------- operations


ALARM = "AWS::CloudWatch::Alarm"


def alarms(template):
    return template.resources_of_type(ALARM)


def test_every_dead_letter_queue_has_an_alarm_on_messages_waiting_in_it(template):
    watched = {
        a["Properties"]["Dimensions"][0]["Value"]["Fn::GetAtt"][0]
        for a in alarms(template).values()
        if a["Properties"]["Namespace"] == "AWS/SQS"
    }
    assert watched == {
        "TasksDeadLetterQueue",
        "SplitterDeadLetterQueue",
        "FinisherDeadLetterQueue",
        "LocalTasksDeadLetterQueue",
        "LocalOutcomesDeadLetterQueue",
    }
    for alarm in alarms(template).values():
        p = alarm["Properties"]
        if p["Namespace"] == "AWS/SQS":
            assert p["MetricName"] == "ApproximateNumberOfMessagesVisible"
            assert (p["ComparisonOperator"], p["Threshold"]) == ("GreaterThanThreshold", 0)


def test_the_metric_alarms_watch_the_names_and_dimensions_powertools_sends(template):
    # Powertools sends each metric to POWERTOOLS_METRICS_NAMESPACE with the dimension service =
    # POWERTOOLS_SERVICE_NAME; an alarm matches a metric only with all of its dimensions.
    env = template.body["Globals"]["Function"]["Environment"]["Variables"]
    namespace, service = env["POWERTOOLS_METRICS_NAMESPACE"], env["POWERTOOLS_SERVICE_NAME"]
    own = [a["Properties"] for a in alarms(template).values() if a["Properties"]["Namespace"] == namespace]
    names = {p["MetricName"] for p in own}
    assert {"JobsStuck", "ProviderStopped", "TasksDeadLettered", "DeadLettersUnreadable"} <= names
    for p in own:
        assert {"Name": "service", "Value": service} in p["Dimensions"]
    # ProviderStopped has the dimension provider too: one alarm for each provider the stack can call
    providers = template.parameter("DefaultProvider")["AllowedValues"]
    stopped = [p for p in own if p["MetricName"] == "ProviderStopped"]
    assert sorted(d["Value"] for p in stopped for d in p["Dimensions"] if d["Name"] == "provider") == sorted(
        providers
    )


def test_the_alarms_notify_the_alarm_topic_only_when_one_is_given(template):
    assert template.parameter("AlarmTopicArn")["Default"] == ""
    expected = {"Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}
    for name, alarm in alarms(template).items():
        assert alarm["Properties"]["AlarmActions"] == expected, name
        assert alarm["Properties"]["TreatMissingData"] == "notBreaching", name


def test_the_sweeper_runs_on_a_schedule_and_may_only_read_jobs_and_hand_them_to_the_finisher(template):
    (event,) = template.function_property("JobSweeperFunction", "Events").values()
    assert event["Type"] == "Schedule"
    assert event["Properties"]["Schedule"] == {"Fn::Sub": "rate(${SweepIntervalMinutes} minutes)"}
    assert sorted(grants(template, "JobSweeperFunction")) == sorted(
        [
            ("dynamodb:GetItem", {"Fn::GetAtt": ["JobsTable", "Arn"]}),
            ("dynamodb:BatchGetItem", {"Fn::GetAtt": ["JobsTable", "Arn"]}),
            ("dynamodb:Query", {"Fn::GetAtt": ["JobsTable", "Arn"]}),
            ("dynamodb:UpdateItem", {"Fn::GetAtt": ["JobsTable", "Arn"]}),
            ("dynamodb:PutItem", {"Fn::GetAtt": ["JobsTable", "Arn"]}),
            ("sqs:SendMessage", {"Fn::GetAtt": ["FinisherQueue", "Arn"]}),
        ],
        key=str,
    )
    # Its one PutItem is its cursor; its updates touch only job records
    policy = template.resources["JobSweeperFunction"]["Properties"]["Policies"][0]["Statement"]
    keys = {s["Sid"]: s.get("Condition") for s in policy}
    assert keys["KeepCursor"] == {"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": ["SWEEP"]}}
    assert keys["NoteJobs"] == {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": ["JOB#*"]}}


def test_the_sweeper_waits_out_the_functions_that_may_still_hold_a_job(template):
    env = template.function_property("JobSweeperFunction", "Environment")["Variables"]
    assert env["GENERATOR_TIMEOUT_SECONDS"] == {"Ref": "GeneratorTimeoutSeconds"}
    assert int(env["FINISHER_TIMEOUT_SECONDS"]) == template.function_property(
        "JobFinisherFunction", "Timeout"
    )


def test_the_dead_letter_recorder_may_send_a_paid_prediction_back_to_be_resumed(template):
    assert ("sqs:SendMessage", {"Fn::GetAtt": ["TasksQueue", "Arn"]}) in grants(
        template, "DeadLetterRecorderFunction"
    )
    env = template.function_property("DeadLetterRecorderFunction", "Environment")["Variables"]
    assert env["TASKS_QUEUE_URL"] == {"Ref": "TasksQueue"}
    assert env["MAX_GENERATION_SECONDS"] == {"Ref": "MaxGenerationSeconds"}


def test_a_queue_or_topic_of_s3_events_is_wired_to_the_splitter_only_when_given(template):
    # Both are optional parameters, empty by default, each a plain ARN
    for name, service in (("S3EventsQueueArn", "sqs"), ("S3EventsTopicArn", "sns")):
        parameter = template.parameter(name)
        assert parameter["Default"] == ""
        assert f":{service}:" in parameter["AllowedPattern"]
    conditions = template.body["Conditions"]
    assert conditions["HasS3EventsQueue"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "S3EventsQueueArn"}, ""]}]}
    assert conditions["HasS3EventsTopic"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "S3EventsTopicArn"}, ""]}]}
    # The queue: an event source mapping on the splitter, one upload per invocation, made only when set,
    # and the three actions Lambda's poller needs on that queue - under the same condition
    mapping = template.resources["S3EventsQueueMapping"]
    assert mapping["Condition"] == "HasS3EventsQueue"
    assert mapping["Properties"]["EventSourceArn"] == {"Ref": "S3EventsQueueArn"}
    assert mapping["Properties"]["FunctionName"] == {"Ref": "CsvSplitterFunction"}
    assert mapping["Properties"]["BatchSize"] == 1
    policy = template.resources["CsvSplitterFunction"]["Properties"]["Policies"][0]["Statement"]
    (conditional,) = [s["Fn::If"] for s in policy if "Fn::If" in s]
    assert conditional[0] == "HasS3EventsQueue" and conditional[2] == {"Ref": "AWS::NoValue"}
    assert sorted(conditional[1]["Action"]) == [
        "sqs:DeleteMessage",
        "sqs:GetQueueAttributes",
        "sqs:ReceiveMessage",
    ]
    assert conditional[1]["Resource"] == {"Ref": "S3EventsQueueArn"}
    # The topic: a subscription of the splitter and SNS's permission to invoke it, for that topic only
    subscription = template.resources["S3EventsTopicSubscription"]
    permission = template.resources["S3EventsTopicPermission"]
    assert subscription["Condition"] == permission["Condition"] == "HasS3EventsTopic"
    assert subscription["Properties"]["Protocol"] == "lambda"
    assert subscription["Properties"]["Endpoint"] == {"Fn::GetAtt": ["CsvSplitterFunction", "Arn"]}
    assert permission["Properties"]["Principal"] == "sns.amazonaws.com"
    assert permission["Properties"]["SourceArn"] == {"Ref": "S3EventsTopicArn"}
    # Whatever delivers them, only the input bucket's objects are split (the splitter checks the bucket)
    env = template.function_property("CsvSplitterFunction", "Environment")["Variables"]
    assert env["INPUT_BUCKET"] == {"Fn::Sub": "${AWS::StackName}-input-${AWS::AccountId}-${AWS::Region}"}


def test_job_records_are_kept_as_long_as_the_files_by_the_same_parameter(template):
    # The buckets' lifecycle and every function's record TTL (imagepipe.jobstate) read JobRetentionDays
    env = template.body["Globals"]["Function"]["Environment"]["Variables"]
    assert env["JOB_RETENTION_DAYS"] == {"Ref": "JobRetentionDays"}
    for function in functions(template):
        own = (template.resources[function]["Properties"].get("Environment") or {}).get("Variables", {})
        assert "JOB_RETENTION_DAYS" not in own, f"{function} overrides the retention"
