"""The local moto server keeps a client's connection open across calls, as AWS does (werkzeug's development
server closed it after every request: a TCP connection, a server thread and a botocore connection set-up
per AWS call), and each answer on a kept connection is whole and the client's next request is not lost."""

from __future__ import annotations

import http.client
import io

import boto3
import pytest
import urllib3.util.connection


@pytest.fixture
def connections(monkeypatch):
    """How many TCP connections botocore opens."""
    opened: list[tuple] = []
    create = urllib3.util.connection.create_connection

    def counting(address, *args, **kwargs):
        opened.append(address)
        return create(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", counting)
    return opened


def client(moto_server, service: str):
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    return session.client(service, endpoint_url=moto_server.url)


def test_one_client_makes_its_calls_on_one_connection_and_every_answer_is_whole(moto_server, connections):
    s3, sqs = client(moto_server, "s3"), client(moto_server, "sqs")
    s3.create_bucket(Bucket="kept")
    big = bytes(range(256)) * 12_000  # 3 MB: botocore asks Expect: 100-continue
    for i in range(20):
        s3.put_object(Bucket="kept", Key=f"k{i}", Body=b"x" * i)
    s3.put_object(Bucket="kept", Key="big", Body=big)
    s3.upload_fileobj(io.BytesIO(b"streamed"), "kept", "streamed")  # an unseekable upload, chunked or not
    head = s3.head_object(Bucket="kept", Key="big")  # a length and no body: the next answer must not eat it
    missing = s3.list_objects_v2(Bucket="kept", Prefix="nothing-")
    url = sqs.create_queue(QueueName="kept")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="task")

    assert head["ContentLength"] == len(big)
    assert s3.get_object(Bucket="kept", Key="big")["Body"].read() == big
    assert s3.get_object(Bucket="kept", Key="k7")["Body"].read() == b"x" * 7
    assert s3.get_object(Bucket="kept", Key="streamed")["Body"].read() == b"streamed"
    assert missing["KeyCount"] == 0
    assert [m["Body"] for m in sqs.receive_message(QueueUrl=url)["Messages"]] == ["task"]
    # one connection per client (S3's and SQS's), not one per call
    assert len(connections) == 2


def test_a_request_body_moto_does_not_read_does_not_spill_into_the_next_request(moto_server):
    conn = http.client.HTTPConnection(moto_server.host, moto_server.port, timeout=10)
    conn.request("GET", "/moto-api/", body=b"left unread " * 1000)
    first = conn.getresponse()
    first.read()
    sock = conn.sock
    assert sock is not None  # not closed by the answer
    conn.request("GET", "/moto-api/")
    second = conn.getresponse()
    second.read()

    assert (first.status, second.status) == (200, 200)
    assert conn.sock is sock  # the same connection: the server kept it open
    conn.close()


def test_a_client_that_asks_to_close_is_answered_and_closed(moto_server):
    conn = http.client.HTTPConnection(moto_server.host, moto_server.port, timeout=10)
    conn.request("GET", "/moto-api/", headers={"Connection": "close"})
    answer = conn.getresponse()
    answer.read()

    assert answer.status == 200
    assert answer.getheader("Connection") == "close"
    assert conn.sock is None  # http.client closed it, as the answer said
