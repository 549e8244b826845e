"""The local moto server's speed-ups change how fast moto answers, never what it answers."""

from __future__ import annotations

import boto3
import pytest
from moto import mock_aws

from imagepipe.jobstate import JobState
from imagepipe_cli.local.moto_server import (
    speed_up_http_headers,
    speed_up_moto_condition_expressions,
    speed_up_moto_dispatch,
    speed_up_moto_dynamodb,
    speed_up_moto_dynamodb_answers,
    speed_up_moto_update_expressions,
)

from conftest import create_jobs_table


@pytest.fixture
def state(monkeypatch):
    from moto.dynamodb import models

    # Undo the patch after the test, whatever speed_up_moto_dynamodb replaced.
    monkeypatch.setattr(
        models.DynamoDBBackend, "transact_write_items", models.DynamoDBBackend.transact_write_items
    )
    speed_up_moto_dynamodb()
    with mock_aws():
        table = create_jobs_table(boto3.resource("dynamodb", region_name="us-east-1"))
        yield JobState(table)


def test_a_transaction_whose_condition_fails_changes_nothing(state):
    # Given a finished task, counted once
    assert state.finish("job", "a", "succeeded", {"cost": 0.5})

    # When a duplicate tries to finish it again (its counter update comes after the failed condition)
    assert not state.finish("job", "a", "failed", {"cost": 0.5})

    # Then neither the task nor its counter moved
    counts = state.counts("job")
    assert (counts.succeeded, counts.failed, counts.cost) == (1, 0, 0.5)
    (outcome,) = state.outcomes("job")
    assert outcome["status"] == "succeeded"


def test_a_first_transaction_creates_both_items(state):
    assert state.finish("job", "b", "failed", {"cost": 0.0, "answers_lost": 2})

    counts = state.counts("job")
    assert (counts.failed, counts.answers_lost) == (1, 2)


@pytest.fixture
def table(monkeypatch):
    from moto.dynamodb.parsing import ast_nodes, expressions, validators

    # Undo the patches after the test, whatever speed_up_moto_update_expressions replaced.
    monkeypatch.setattr(expressions.UpdateExpressionParser, "make", expressions.UpdateExpressionParser.make)
    monkeypatch.setattr(validators, "deepcopy", validators.deepcopy)
    for name in ("nodes_to_be_processed", "traverse_node_recursively"):
        monkeypatch.setattr(ast_nodes.DepthFirstTraverser, name, getattr(ast_nodes.DepthFirstTraverser, name))
    for name in ("__init__", "validate"):
        monkeypatch.setattr(validators.Validator, name, getattr(validators.Validator, name))
    speed_up_moto_update_expressions()
    with mock_aws():
        yield create_jobs_table(boto3.resource("dynamodb", region_name="us-east-1"))


def test_one_update_expression_for_many_items_writes_each_its_own_values(table):
    expression = "SET #s = :s, cost = :c ADD tries :one REMOVE reserved"
    for name, status in (("a", "succeeded"), ("b", "failed"), ("a", "failed")):
        table.update_item(
            Key={"pk": "job", "sk": name},
            UpdateExpression=expression,
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={":s": status, ":c": len(name) + len(status), ":one": 1},
        )

    a = table.get_item(Key={"pk": "job", "sk": "a"})["Item"]
    b = table.get_item(Key={"pk": "job", "sk": "b"})["Item"]
    assert (a["status"], a["cost"], a["tries"]) == ("failed", 7, 2)
    assert (b["status"], b["cost"], b["tries"]) == ("failed", 7, 1)


def test_an_invalid_update_expression_is_refused_every_time(table):
    from botocore.exceptions import ClientError

    def update(expression: str, names: dict[str, str]) -> None:
        values = {":v": "x", ":w": "y"} if ":w" in expression else {":v": "x"}
        table.update_item(
            Key={"pk": "job", "sk": "a"},
            UpdateExpression=expression,
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )

    for _ in range(2):
        with pytest.raises(ClientError, match="Two document paths overlap"):
            update("SET #a = :v, #a = :w", {"#a": "status"})
    # An expression that passed with one name is still checked when the name is another: the table's key.
    update("SET #a = :v", {"#a": "status"})
    with pytest.raises(ClientError, match="part of the key"):
        update("SET #a = :v", {"#a": "sk"})
    assert table.get_item(Key={"pk": "job", "sk": "a"})["Item"]["status"] == "x"


def test_dynamodb_answers_are_the_same_json_as_moto_writes_them(monkeypatch):
    from moto.core.responses import ActionResult
    from moto.dynamodb import responses

    monkeypatch.setattr(responses.DynamoResult, "execute_result", ActionResult.execute_result)
    item = {
        "pk": {"S": "job"},
        "sk": {"S": "a"},
        "n": {"N": "1.5"},
        "bin": {"B": b"\x00\xff"},
        "bins": {"BS": [b"\x01", b"\x02"]},
        "nums": {"NS": ["1", "2"]},
        "list": {"L": [{"S": "x"}, {"NULL": True}, {"BOOL": False}, {"L": []}, {"M": {}}]},
        "map": {"M": {"z": {"SS": ["a", "b"]}}},
    }
    calls = [
        ("get_item", {"Key": {"pk": {"S": "job"}, "sk": {"S": "a"}}, "ConsistentRead": True}),
        ("get_item", {"Key": {"pk": {"S": "job"}, "sk": {"S": "missing"}}}),
        ("query", {"KeyConditionExpression": "pk = :p", "ExpressionAttributeValues": {":p": {"S": "job"}}}),
        ("query", {"KeyConditionExpression": "pk = :p", "ExpressionAttributeValues": {":p": {"S": "job"}}, "Limit": 1}),
        ("scan", {"ReturnConsumedCapacity": "TOTAL"}),
        ("update_item", {"Key": {"pk": {"S": "job"}, "sk": {"S": "a"}}, "UpdateExpression": "SET q = :v",
                         "ExpressionAttributeValues": {":v": {"S": "w"}}, "ReturnValues": "ALL_NEW"}),
    ]  # fmt: skip

    def answers() -> list[dict]:
        with mock_aws():
            client = boto3.client("dynamodb", region_name="us-east-1")
            table = create_jobs_table(boto3.resource("dynamodb", region_name="us-east-1")).name
            client.put_item(TableName=table, Item=item)
            client.put_item(TableName=table, Item={**item, "sk": {"S": "b"}})
            got = [getattr(client, name)(TableName=table, **args) for name, args in calls]
            keys = [{"pk": {"S": "job"}, "sk": {"S": s}} for s in ("a", "b", "missing")]
            got.append(client.batch_get_item(RequestItems={table: {"Keys": keys, "ConsistentRead": True}}))
        for answer in got:
            answer.pop("ResponseMetadata")
        return got

    as_moto_writes_them = answers()
    speed_up_moto_dynamodb_answers()

    assert answers() == as_moto_writes_them
    assert as_moto_writes_them[0]["Item"]["bins"] == {"BS": [b"\x01", b"\x02"]}


def test_every_service_still_finds_its_actions_with_the_listing_kept(monkeypatch):
    from moto.core import responses

    monkeypatch.setattr(responses, "method_names_from_class", responses.method_names_from_class)
    speed_up_moto_dispatch()
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        for _ in range(2):  # the second time from the kept listing
            url = sqs.create_queue(QueueName="q")["QueueUrl"]
            sqs.send_message(QueueUrl=url, MessageBody="task")
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="dispatch")
        s3.put_object(Bucket="dispatch", Key="k", Body=b"v")
        received = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
        body = s3.get_object(Bucket="dispatch", Key="k")["Body"].read()

    assert [m["Body"] for m in received] == ["task", "task"]
    assert body == b"v"


def test_a_condition_expression_decides_anew_for_each_request(monkeypatch):
    from botocore.exceptions import ClientError
    from moto.dynamodb.comparisons import ConditionExpressionParser

    monkeypatch.setattr(
        ConditionExpressionParser,
        "_lex_condition_expression",
        ConditionExpressionParser._lex_condition_expression,
    )
    speed_up_moto_condition_expressions()
    with mock_aws():
        table = create_jobs_table(boto3.resource("dynamodb", region_name="us-east-1"))

        def claim(name: str, holder: str) -> bool:
            try:
                table.update_item(
                    Key={"pk": "job", "sk": name},
                    UpdateExpression="SET holder = :h",
                    ConditionExpression="attribute_not_exists(pk) OR holder = :h",
                    ExpressionAttributeValues={":h": holder},
                )
                return True
            except ClientError as exc:
                assert exc.response["Error"]["Code"] == "ConditionalCheckFailedException"
                return False

        # The same text each time, with other values and other items: each request is judged on its own.
        claims = [claim("a", "x"), claim("a", "y"), claim("a", "x"), claim("b", "y")]
        assert claims == [True, False, True, True]
        for _ in range(2):  # a text that does not lex is refused every time (moto 5.2.5 raises, a 500 served)
            with pytest.raises((ClientError, ValueError), match="Cannot parse condition"):
                table.update_item(
                    Key={"pk": "job", "sk": "a"},
                    UpdateExpression="SET holder = :h",
                    ConditionExpression="holder = :h AND ~",
                    ExpressionAttributeValues={":h": "x"},
                )


@pytest.mark.parametrize(
    "head",
    [
        # as botocore sends them
        b"Host: 127.0.0.1:5000\r\nAccept-Encoding: identity\r\nX-Amz-Target: DynamoDB_20120810.UpdateItem\r\n"
        b"Content-Type: application/x-amz-json-1.0\r\nAuthorization: AWS4-HMAC-SHA256 Credential=x/20261204/"
        b"us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=ab\r\nContent-Length: 2\r\n\r\n",
        # a header twice, an empty value, spaces around a value, no space after the colon
        b"X-Amz-Meta-A: 1\r\nX-Amz-Meta-A: 2\r\nX-Empty:\r\nX-Spaced:   v  \r\nX-Tight:v\r\n\r\n",
        # what only the email parser reads: a folded line, a line without a colon, a space before the colon
        b"X-Long: one\r\n two\r\nHost: h\r\n\r\n",
        b"Host: h\r\nnot a header\r\n\r\n",
        b"X-Odd : v\r\n\r\n",
    ],
)
def test_request_headers_read_as_the_email_parser_reads_them(monkeypatch, head):
    import http.client
    import io

    monkeypatch.setattr(http.client, "parse_headers", http.client.parse_headers)
    expected = http.client.parse_headers(io.BytesIO(head + b"{}"))
    speed_up_http_headers()
    stream = io.BytesIO(head + b"{}")
    got = http.client.parse_headers(stream)

    assert type(got) is type(expected)
    assert got.items() == expected.items()
    assert stream.read() == b"{}"  # the body is left where it starts
