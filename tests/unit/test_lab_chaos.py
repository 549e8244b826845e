"""The local moto server fails the way AWS fails (`imagepipe run --chaos`): what boto3 sees is what AWS sends."""

from __future__ import annotations

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

REGION = "us-east-1"


@pytest.fixture
def client(moto_server):
    def make(name: str, attempts: int = 1):
        session = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
        )
        config = Config(retries={"mode": "standard", "max_attempts": attempts})
        return session.client(name, endpoint_url=moto_server.url, config=config)

    yield make
    moto_server.set_chaos({})


@pytest.fixture
def table(client, request):
    name = request.node.name.replace("[", "-").replace("]", "")[:200]
    ddb = client("dynamodb")
    ddb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    return name


def test_a_transaction_conflict_reaches_boto3_as_aws_sends_it_and_writes_nothing(moto_server, client, table):
    ddb = client("dynamodb", attempts=5)
    moto_server.set_chaos({"ddb-conflict": 1.0})

    with pytest.raises(ClientError) as caught:
        ddb.transact_write_items(
            TransactItems=[
                {"Put": {"TableName": table, "Item": {"pk": {"S": "a"}}}},
                {"Put": {"TableName": table, "Item": {"pk": {"S": "b"}}}},
            ]
        )

    error = caught.value.response
    assert error["Error"]["Code"] == "TransactionCanceledException"
    codes = [reason["Code"] for reason in error["CancellationReasons"]]
    assert sorted(codes) == ["None", "TransactionConflict"]
    assert caught.value.response["ResponseMetadata"]["RetryAttempts"] == 0  # botocore does not retry it
    moto_server.set_chaos({})
    assert ddb.scan(TableName=table, ConsistentRead=True)["Items"] == []
    assert moto_server.chaos_injected()["ddb-conflict"] == 1


def test_throttling_is_retried_by_botocore_and_every_write_lands(moto_server, client, table):
    ddb = client("dynamodb", attempts=10)
    moto_server.set_chaos({"ddb-throttle": 0.3, "seed": 7})

    retried = 0
    for index in range(20):
        response = ddb.put_item(TableName=table, Item={"pk": {"S": f"item-{index}"}})
        retried += response["ResponseMetadata"]["RetryAttempts"]

    injected = moto_server.chaos_injected()["ddb-throttle"]
    moto_server.set_chaos({})
    assert injected > 0 and retried == injected
    assert len(ddb.scan(TableName=table, ConsistentRead=True)["Items"]) == 20


def test_a_throttled_call_without_retries_is_one_of_the_two_throttling_errors(moto_server, client, table):
    ddb = client("dynamodb", attempts=1)
    moto_server.set_chaos({"ddb-throttle": 1.0})

    with pytest.raises(ClientError) as caught:
        ddb.get_item(TableName=table, Key={"pk": {"S": "x"}})

    assert caught.value.response["Error"]["Code"] in {
        "ThrottlingException",
        "ProvisionedThroughputExceededException",
    }


def test_an_eventually_consistent_read_may_see_the_item_before_the_last_write(moto_server, client, table):
    ddb = client("dynamodb")
    ddb.put_item(TableName=table, Item={"pk": {"S": "job"}, "status": {"S": "running"}})
    moto_server.set_chaos({"stale-read": 1.0})
    key = {"pk": {"S": "job"}}
    assert ddb.get_item(TableName=table, Key=key)["Item"]["status"]["S"] == "running"

    ddb.put_item(TableName=table, Item={"pk": {"S": "job"}, "status": {"S": "completed"}})

    eventual = ddb.get_item(TableName=table, Key=key)["Item"]["status"]["S"]
    consistent = ddb.get_item(TableName=table, Key=key, ConsistentRead=True)["Item"]["status"]["S"]
    assert eventual == "running"  # the state before the write, as AWS may answer for a second or so
    assert consistent == "completed"  # a strongly consistent read never is stale
    queried = ddb.query(
        TableName=table,
        KeyConditionExpression="pk = :pk",
        ExpressionAttributeValues={":pk": {"S": "job"}},
        ConsistentRead=True,
    )
    assert queried["Items"][0]["status"]["S"] == "completed"
    assert moto_server.chaos_injected()["stale-read"] >= 1


def test_without_stale_read_chaos_every_read_sees_the_last_write(moto_server, client, table):
    ddb = client("dynamodb")
    key = {"pk": {"S": "job"}}
    ddb.put_item(TableName=table, Item={**key, "status": {"S": "running"}})
    ddb.get_item(TableName=table, Key=key)
    ddb.put_item(TableName=table, Item={**key, "status": {"S": "completed"}})

    assert ddb.get_item(TableName=table, Key=key)["Item"]["status"]["S"] == "completed"


def test_an_s3_error_reaches_the_client_as_internal_error_or_slow_down_and_stores_nothing(
    moto_server, client
):
    s3 = client("s3")
    s3.create_bucket(Bucket="chaos-s3")
    moto_server.set_chaos({"s3-error": 1.0})

    with pytest.raises(ClientError) as caught:
        s3.put_object(Bucket="chaos-s3", Key="a.txt", Body=b"x")

    response = caught.value.response
    assert (response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]) in {
        ("InternalError", 500),
        ("SlowDown", 503),
    }
    moto_server.set_chaos({})
    assert s3.list_objects_v2(Bucket="chaos-s3").get("KeyCount") == 0


def test_an_sqs_error_reaches_the_client_as_internal_error_and_sends_nothing(moto_server, client):
    sqs = client("sqs")
    url = sqs.create_queue(QueueName="chaos-sqs")["QueueUrl"]
    assert sqs.meta.service_model.protocol == "json"  # boto3 here speaks SQS's JSON protocol
    moto_server.set_chaos({"sqs-error": 1.0})

    with pytest.raises(ClientError) as caught:
        sqs.send_message(QueueUrl=url, MessageBody="task")

    response = caught.value.response
    assert (response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]) == (
        "InternalError",
        500,
    )
    assert sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages") is None  # receives unaffected
    moto_server.set_chaos({})
    assert sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages") is None


def test_an_unknown_chaos_kind_is_refused(moto_server):
    import httpx

    answer = httpx.post(f"{moto_server.url}/_imagepipe/chaos", json={"ddb-melt": 1})
    assert answer.status_code == 400
