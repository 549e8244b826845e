"""The generator with the shared rate limiter on (SharedRateLimiter, ProviderRateLimits), on the stack from
template.yaml (in-process moto) against the Qianfan emulator: a throttled task waits for its token."""

from __future__ import annotations

import copy
import json
import time

import pytest

from imagepipe_cli.local.runtime import RuntimeSetupError, StackOptions, stack_parameters
from imagepipe_cli.local.template import load_template

from conftest import TEMPLATE, load_event

LIMITED = {"SharedRateLimiter": "true", "ProviderRateLimits": "qianfan=2"}


def one_task(row: str = "1", prompt: str = "a lighthouse at dusk") -> dict:
    event = copy.deepcopy(load_event("sqs_tasks.json"))
    record = event["Records"][0]
    task = {**json.loads(record["body"]), "provider": "qianfan", "prompt": prompt, "row_id": row}
    record["body"] = json.dumps(task)
    event["Records"] = [record]
    return event


def schedule(pipeline, key: str = "qianfan") -> dict:
    ddb = pipeline.client("dynamodb")
    return ddb.get_item(
        TableName=pipeline.stack.outputs["JobsTableName"],
        Key={"pk": {"S": f"RATE#{key}"}, "sk": {"S": "LIMIT"}},
    ).get("Item", {})


def hold_schedule(pipeline, until: float, key: str = "qianfan") -> None:
    """Every token of `key` handed out until `until` (other instances' calls are ahead in line)."""
    pipeline.client("dynamodb").put_item(
        TableName=pipeline.stack.outputs["JobsTableName"],
        Item={
            "pk": {"S": f"RATE#{key}"},
            "sk": {"S": "LIMIT"},
            "tat": {"N": f"{until:.6f}"},
            "born": {"N": f"{time.time():.6f}"},
            "n": {"N": "100"},
        },
    )


def test_a_task_whose_token_is_taken_for_a_moment_waits_for_it_and_succeeds_on_its_first_attempt(
    pipeline_factory,
):
    # Given the limiter on at 2 calls/s for qianfan, and the next few seconds' tokens taken (longer than a
    # cold start on a busy machine, so the task surely asks while they are)
    pipeline = pipeline_factory(provider="qianfan", parameters=LIMITED)
    free_at = time.time() + 5.0
    hold_schedule(pipeline, free_at)

    # When a task arrives
    response = pipeline.generator.invoke(one_task())

    # Then it waited for the next token (no 429 asked for, no retry sent) and made its image once
    assert response == {"batchItemFailures": []}
    outcome = pipeline.outcome("spring-campaign", "1")
    assert outcome["status"] == "succeeded"
    assert outcome["attempt"] == 1 and outcome["throttles"] == 0
    stats = pipeline.emulator.stats()
    assert stats["paid"] == 1 and stats.get("rate_limited", 0) == 0
    assert pipeline.queued_messages() == []
    # ...on the slot after those taken: the schedule moved on by one step (0.5 s at 2 calls/s)
    assert float(schedule(pipeline)["tat"]["N"]) == pytest.approx(free_at + 0.5, abs=1e-3)


def test_a_task_that_cannot_get_a_token_before_its_deadline_comes_back_later_without_an_attempt(
    pipeline_factory,
):
    # Given the schedule handed out for the next ten minutes (longer than one invocation may wait)
    pipeline = pipeline_factory(provider="qianfan", parameters=LIMITED)
    hold_schedule(pipeline, time.time() + 600)

    # When a task arrives
    response = pipeline.generator.invoke(one_task())

    # Then nothing was sent to the API, nothing was claimed, and the task is a new delayed message with
    # no attempt or rate-limit answer counted
    assert response == {"batchItemFailures": []}
    assert pipeline.emulator.stats().get("paid", 0) == 0
    assert pipeline.state.task("spring-campaign", "1") is None
    attrs = pipeline.client("sqs").get_queue_attributes(
        QueueUrl=pipeline.tasks_queue, AttributeNames=["ApproximateNumberOfMessagesDelayed"]
    )["Attributes"]
    assert attrs["ApproximateNumberOfMessagesDelayed"] == "1"


def test_a_submit_refused_for_its_rate_waits_for_the_next_token_and_succeeds_in_the_same_invocation(
    pipeline_factory,
):
    # Given the limiter on, and a provider that refuses the row's first call for its rate
    pipeline = pipeline_factory("rate-limit=lighthouse:1", provider="qianfan", parameters=LIMITED)
    # (after a call it took: with one refusal as its only answer, Google SRE's guard would hold half the
    # next calls back in the instance)
    pipeline.generator.invoke(one_task("0", prompt="a harbour at noon"))

    # When the task arrives
    response = pipeline.generator.invoke(one_task("1"))

    # Then it waited for another token (the limiter heard the refusal) and made its image then: no retry
    # message, no rate-limit answer counted on the row, paid once
    assert response == {"batchItemFailures": []}
    outcome = pipeline.outcome("spring-campaign", "1")
    assert outcome["status"] == "succeeded" and outcome["throttles"] == 0
    stats = pipeline.emulator.stats()
    assert stats["paid"] == 2  # the harbour and the lighthouse, once each (its first call was refused)
    assert pipeline.queued_messages() == []


def test_a_refusal_for_the_rate_lowers_the_shared_rate_below_the_configured_one(pipeline_factory):
    # Given a configured limit the provider does not keep to (it allows far fewer calls)
    pipeline = pipeline_factory(provider="qianfan", parameters=LIMITED, rate_limit=0.01)
    pipeline.generator.invoke(one_task("1"))  # the emulator's one burst token

    # When the next call is refused for its rate
    pipeline.generator.invoke(one_task("2"))

    # Then the row is retried later as before (a rate-limit answer, not an attempt), and the schedule
    # now paces below the configured 2 calls/s
    time.sleep(2.5)  # RetryBaseDelaySeconds (2): the first retry waits 1 to 2 s
    (retry,) = pipeline.queued_messages()
    assert json.loads(retry["Body"])["throttles"] == 1
    item = schedule(pipeline)
    assert float(item["w_max"]["N"]) < 2.0 and "cut_at" in item


def test_a_bad_provider_rate_limits_value_is_refused_before_anything_runs():
    template = load_template(TEMPLATE)
    with pytest.raises(RuntimeSetupError) as caught:
        stack_parameters(template, StackOptions(parameter_overrides=["ProviderRateLimits=qianfan=fast"]))
    message = str(caught.value)
    assert "ProviderRateLimits='qianfan=fast'" in message and "\n" not in message
