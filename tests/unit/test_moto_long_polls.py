"""The local moto server answers ReceiveMessage with WaitTimeSeconds as SQS does (a long poll), without
holding up anyone else's requests while it waits; messages still come back when their visibility ends."""

from __future__ import annotations

import threading
import time

import boto3
import pytest

from imagepipe_cli.local.moto_server import MotoServer

WAIT_S = 20


@pytest.fixture
def moto(tmp_path):
    with MotoServer(log_path=tmp_path / "moto.log") as server:
        yield server


@pytest.fixture
def sqs(moto):
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    return session.client("sqs", endpoint_url=moto.url)


def long_poll(sqs, url: str, answers: list) -> threading.Thread:
    def receive() -> None:
        answers.extend(
            sqs.receive_message(
                QueueUrl=url, WaitTimeSeconds=WAIT_S, MessageSystemAttributeNames=["All"]
            ).get("Messages", [])
        )

    thread = threading.Thread(target=receive)
    thread.start()
    return thread


def test_a_long_poll_receives_a_message_sent_while_it_waits(sqs):
    url = sqs.create_queue(QueueName="waiting")["QueueUrl"]
    answers: list = []
    thread = long_poll(sqs, url, answers)

    # The send is served while the poll waits (a poll holding moto would keep it out until the wait ended,
    # and then answer empty).
    sqs.send_message(QueueUrl=url, MessageBody="task")
    thread.join()

    assert [m["Body"] for m in answers] == ["task"]


def test_a_message_whose_visibility_timeout_ends_comes_back_to_a_long_poll(sqs):
    url = sqs.create_queue(QueueName="redelivered")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="task")
    first = sqs.receive_message(QueueUrl=url, VisibilityTimeout=1)["Messages"]

    answers: list = []
    long_poll(sqs, url, answers).join()

    # At-least-once, as on AWS: the message that was never deleted is delivered again, counted.
    assert [m["MessageId"] for m in answers] == [first[0]["MessageId"]]
    assert answers[0]["Attributes"]["ApproximateReceiveCount"] == "2"


def test_stopping_long_polls_answers_a_waiting_poll_empty_before_its_wait_ends(moto, sqs):
    url = sqs.create_queue(QueueName="stopping")["QueueUrl"]
    answers: list = []
    thread = long_poll(sqs, url, answers)

    moto.stop_long_polls()
    thread.join(timeout=WAIT_S / 2)  # the answer comes at once, not at the end of the 20 s wait

    assert not thread.is_alive()
    assert answers == []
    # The server still answers receives (without waiting from then on: the pollers stop at once).
    sqs.send_message(QueueUrl=url, MessageBody="late")
    assert [m["Body"] for m in sqs.receive_message(QueueUrl=url, WaitTimeSeconds=WAIT_S)["Messages"]] == [
        "late"
    ]


def test_a_batch_of_three_wakes_three_of_ten_waiting_polls_each_with_one_message(sqs):
    url = sqs.create_queue(QueueName="fan-out")["QueueUrl"]
    answers: list = []
    threads = [long_poll(sqs, url, answers) for _ in range(10)]

    sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": f"t{i}"} for i in range(3)])
    deadline = time.monotonic() + WAIT_S / 2
    while sum(thread.is_alive() for thread in threads) > 7 and time.monotonic() < deadline:
        time.sleep(0.05)

    # As SQS: each message goes to one poll; the other seven polls still wait (for more, or the end).
    assert sorted(m["Body"] for m in answers) == ["t0", "t1", "t2"]
    assert sum(thread.is_alive() for thread in threads) == 7
    sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": f"u{i}"} for i in range(7)])
    for thread in threads:
        thread.join()
    assert len(answers) == 10


def test_a_delayed_message_reaches_a_poll_that_was_already_waiting(sqs):
    url = sqs.create_queue(QueueName="delayed")["QueueUrl"]
    answers: list = []
    thread = long_poll(sqs, url, answers)

    sqs.send_message(QueueUrl=url, MessageBody="later", DelaySeconds=2)
    thread.join()

    assert [m["Body"] for m in answers] == ["later"]


def test_a_message_moved_to_the_dead_letter_queue_reaches_a_poll_waiting_there(sqs):
    # moto moves it during a receive on the source queue: no send on the dead-letter queue announces it.
    dlq = sqs.create_queue(QueueName="dead")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    source = sqs.create_queue(
        QueueName="source",
        Attributes={"RedrivePolicy": f'{{"deadLetterTargetArn": "{dlq_arn}", "maxReceiveCount": "1"}}'},
    )["QueueUrl"]
    sqs.send_message(QueueUrl=source, MessageBody="poison")
    sqs.receive_message(QueueUrl=source, VisibilityTimeout=1)
    answers: list = []
    thread = long_poll(sqs, dlq, answers)

    time.sleep(1.5)  # its visibility timeout ends: the next receive moves it
    again = sqs.receive_message(QueueUrl=source).get("Messages", [])
    thread.join()

    assert [m["Body"] for m in answers] == ["poison"]
    assert again == []


def test_a_batch_of_delayed_messages_reaches_the_waiting_polls_when_due_and_not_before(sqs):
    # A send of delayed messages wakes no waiting poll (nothing is receivable yet): the queue's leading poll
    # sees when they are due and looks then.
    url = sqs.create_queue(QueueName="handed-back")["QueueUrl"]
    answers: list = []
    threads = [long_poll(sqs, url, answers) for _ in range(4)]  # one message each
    time.sleep(0.2)  # the polls are waiting

    sent = time.monotonic()
    sqs.send_message_batch(
        QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": f"d{i}", "DelaySeconds": 2} for i in range(3)]
    )
    sqs.send_message(QueueUrl=url, MessageBody="now")
    while not answers and time.monotonic() - sent < WAIT_S:
        time.sleep(0.02)
    first = list(answers)
    while len(answers) < 4 and time.monotonic() - sent < WAIT_S:
        time.sleep(0.02)
    received_all_s = time.monotonic() - sent
    for thread in threads:
        thread.join()

    assert [m["Body"] for m in first] == ["now"]  # the undelayed one at once, none of the delayed with it
    assert sorted(m["Body"] for m in answers) == ["d0", "d1", "d2", "now"]
    assert received_all_s >= 2.0  # never before their delay
