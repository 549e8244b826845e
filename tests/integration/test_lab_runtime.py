"""The local runtime plays Lambda and EventBridge as AWS does: Timeout enforced, schedules fired, the stack
configured like `sam deploy` (parameter overrides, samconfig.toml)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from imagepipe_cli.local.event_sources import EventBridgeRules
from imagepipe_cli.local.lambda_runtime import FunctionError, ProcessFunction
from imagepipe_cli.local.stack import DeployedFunction

SLOW_FUNCTION = """
import os, time

INVOCATIONS = 0  # module state: lives as long as the execution environment


def handler(event, context):
    global INVOCATIONS
    INVOCATIONS += 1
    time.sleep(event.get("sleep", 0))
    return {"pid": os.getpid(), "invocations": INVOCATIONS, "left_ms": context.get_remaining_time_in_millis()}
"""


@pytest.fixture
def slow_function(tmp_path: Path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "app.py").write_text(SLOW_FUNCTION)
    fn = DeployedFunction("SlowFunction", "slow", code, "app.handler", {}, timeout=2, memory=128)
    function = ProcessFunction(
        fn, concurrency=1, env_overrides={}, log_path=tmp_path / "slow.log", region="us-east-1"
    )
    yield function, tmp_path / "slow.log"
    function.close()


def test_an_invocation_past_the_functions_timeout_is_killed_like_lambda_does(slow_function):
    function, log = slow_function
    warm = function.invoke({})

    with pytest.raises(FunctionError) as caught:
        function.invoke({"sleep": 30})

    assert caught.value.error_type == "Sandbox.Timedout"
    assert str(caught.value).endswith("Task timed out after 2.00 seconds")
    assert "Task timed out after 2.00 seconds" in log.read_text()
    assert (function.timeouts, function.failures) == (1, 1)
    # The killed environment is gone: the next invocation gets a new one (a cold start), whose module state is new
    after = function.invoke({})
    assert after["pid"] != warm["pid"] and after["invocations"] == 1
    assert function.cold_starts == 2


def test_an_invocation_within_its_timeout_keeps_its_warm_environment(slow_function):
    function, _ = slow_function
    first = function.invoke({"sleep": 0.5})
    second = function.invoke({})

    assert second["pid"] == first["pid"] and second["invocations"] == 2
    assert 0 < first["left_ms"] <= 2000
    assert function.timeouts == 0 and function.cold_starts == 1


def test_each_environments_init_phase_is_billed_once_beside_its_invocations(tmp_path: Path):
    # Lambda bills the init phase of on-demand functions (since August 2025): an environment that takes
    # 0.6 s to import its handler bills that once, then only its invocations.
    code = tmp_path / "code"
    code.mkdir()
    (code / "app.py").write_text("import time\ntime.sleep(0.6)\n" + SLOW_FUNCTION)
    fn = DeployedFunction("SlowInit", "slow-init", code, "app.handler", {}, timeout=5, memory=128)
    function = ProcessFunction(
        fn, concurrency=1, env_overrides={}, log_path=tmp_path / "l.log", region="us-east-1"
    )
    try:
        function.invoke({"sleep": 0.2})
        function.invoke({"sleep": 0.2})
    finally:
        function.close()

    assert function.cold_starts == 1
    assert function.init_s >= 0.6
    assert function.billed_s >= function.init_s + 2 * 0.2


class _Recorder:
    def __init__(self, fail_times: int = 0):
        self.events: list[dict] = []
        self.fail_times = fail_times

    def invoke(self, event):
        self.events.append(event)
        if len(self.events) <= self.fail_times:
            raise FunctionError("Sweeper", "RuntimeError", "not yet")
        return {"swept": 0}


@pytest.mark.parametrize("fail_times", [0, 2])
def test_a_scheduled_rule_fires_its_function_as_eventbridge_does(fail_times):
    with mock_aws():
        events = boto3.client("events", region_name="us-east-1")
        sqs = boto3.client("sqs", region_name="us-east-1")
        rule_arn = events.put_rule(Name="sweep", ScheduleExpression="rate(5 minutes)", State="ENABLED")[
            "RuleArn"
        ]
        events.put_targets(
            Rule="sweep",
            Targets=[{"Id": "fn", "Arn": "arn:aws:lambda:us-east-1:123456789012:function:imagepipe-sweeper"}],
        )
        sweeper = _Recorder(fail_times)
        rules = EventBridgeRules(events, sqs, {"Sweeper": sweeper}, {"imagepipe-sweeper": "Sweeper"})
        rules.setup()
        assert [(s.rule, s.period_s) for s in rules.schedules] == [("sweep", 300)]

        rules.start_schedules(first_after_s=0)
        try:
            deliveries = []
            deadline = time.monotonic() + 30
            while not deliveries and time.monotonic() < deadline:
                deliveries = rules.poll_once()
                time.sleep(0.1)
        finally:
            rules.stop_schedules()

    (delivery,) = deliveries
    assert delivery.function == "Sweeper" and delivery.error is None
    event = sweeper.events[-1]
    assert (event["source"], event["detail-type"], event["resources"]) == (
        "aws.events",
        "Scheduled Event",
        [rule_arn],
    )
    # An asynchronous invocation: a failed one is tried twice more, the same event
    assert len(sweeper.events) == 1 + fail_times
    assert all(e == event for e in sweeper.events)


def test_a_file_with_only_a_header_fails_its_job_and_imagepipe_run_exits_1(tmp_path, capsys):
    from imagepipe_cli import cli

    empty = tmp_path / "empty.csv"
    empty.write_text("id,prompt\n", encoding="utf-8")
    out = tmp_path / "out"

    code = cli.main(
        [
            "run",
            str(empty),
            "--out",
            str(out),
            "--no-progress",
            "--visibility-timeout",
            "5",
            "--chaos",
            "ddb-throttle=0.01,sqs-error=0.01",
        ]
    )

    printed = capsys.readouterr()
    assert code == 1, printed.err
    assert "failed - 0 rows" in printed.out and "the file has no rows" in printed.out
    assert "Traceback" not in printed.err
    # The one timing shortcut is said in the header, and the chaos is counted in run-stats.json
    assert (
        "queues: visibility timeout shortened to 5 s (--visibility-timeout); AWS waits 1800 s" in printed.out
    )
    chaos = json.loads((out / "logs" / "run-stats.json").read_text())["chaos"]
    assert {"ddb-conflict", "ddb-throttle", "stale-read", "s3-error", "sqs-error"} <= set(chaos)


@pytest.mark.parametrize(
    ("status", "rows", "code"),
    [
        ("completed", [{"status": "succeeded"}], 0),
        ("completed_with_failures", [{"status": "succeeded"}, {"status": "failed"}], 1),
        ("failed", [], 1),
        ("failed", [{"status": "rejected"}], 1),
        ("cancelled", [{"status": "cancelled"}], 1),
    ],
)
def test_imagepipe_run_exits_0_only_when_the_job_completed_with_every_row(status, rows, code):
    from imagepipe_cli.local.runner import exit_code

    assert exit_code({"status": status}, rows) == code


def test_started_event_deliveries_reach_the_function_as_events_arrive_on_long_polls(moto_server):
    # `imagepipe run` and `up` start the deliveries: an EventBridge event reaches its function without anyone
    # polling for it, and an idle delivery queue is one waiting receive, not one every quarter second.
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    events = session.client("events", endpoint_url=moto_server.url)
    sqs = session.client("sqs", endpoint_url=moto_server.url)
    receives: list[str] = []
    sqs.meta.events.register("before-call.sqs.ReceiveMessage", lambda **kw: receives.append("receive"))
    events.put_rule(
        Name="requested", EventPattern=json.dumps({"source": ["test.deliveries"]}), State="ENABLED"
    )
    events.put_targets(
        Rule="requested",
        Targets=[{"Id": "fn", "Arn": "arn:aws:lambda:us-east-1:123456789012:function:imagepipe-splitter"}],
    )
    splitter = _Recorder()
    rules = EventBridgeRules(events, sqs, {"Splitter": splitter}, {"imagepipe-splitter": "Splitter"})
    rules.setup()
    rules.start(wait_s=2)
    try:
        time.sleep(3)
        idle_receives = len(receives)
        events.put_events(
            Entries=[{"Source": "test.deliveries", "DetailType": "ImageJob Requested", "Detail": "{}"}]
        )
        delivered = []
        deadline = time.monotonic() + 10
        while not delivered and time.monotonic() < deadline:  # nobody receives here: only hands over
            time.sleep(0.05)
            delivered += rules.poll_once()
    finally:
        rules.stop()

    assert idle_receives <= 3  # 3 s idle: long polls of 2 s (short polls every 0.25 s would be 12)
    (event,) = splitter.events
    assert event["source"] == "test.deliveries" and event["detail-type"] == "ImageJob Requested"
    assert [(d.function, d.error) for d in delivered] == [("Splitter", None)]
    assert rules.poll_once() == [] and rules.fatal is None  # handed over once
