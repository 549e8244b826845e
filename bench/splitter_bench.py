"""The splitter on a big file: peak RSS, rows/s, SQS calls per row and continuations (issue 11).

bench_splitter(rows) splits an N-row CSV with CsvSplitterFunction's real handler in a child process (its
environment from the stack, AWS at a moto server deployed from template.yaml), then plays Lambda's poller for
SplitContinuationQueue - each continuation is another invocation of the handler in the same process, as in a
warm execution environment - until the job is split. Every invocation has `invocation_s` seconds of
(remaining) time, 120 s by default rather than the 900 s Timeout, so a million rows go through several
hand-overs on this machine.

Moto's SQS slows down as a queue fills (see src/imagepipe_cli/local/moto_server.py), so the TasksQueue's
SendMessageBatch calls are answered in the child process by a botocore `before-call` hook - they never reach
moto - which counts them and checks that every row's task is sent exactly once. Every other call (S3, the
job record in DynamoDB, the continuation messages on SplitContinuationQueue, the finisher hand-off) goes to
moto, and every SQS call the handler makes counts in "SQS calls per row".

    .venv/bin/python bench/splitter_bench.py 100000 1000000
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REGION = "us-east-1"

_CHILD = r"""
import json, resource, sys, threading, time, uuid
from pathlib import Path

import boto3
from botocore.awsrequest import AWSResponse

from imagepipe_cli.local.event_sources import lambda_sqs_event
from imagepipe_cli.local.lambda_runtime import load_handler

setup = json.loads(sys.stdin.read())
rows, tasks_url = setup["rows"], setup["tasks_url"]
sent = bytearray(rows + 1)  # how many times each row's task was sent
counts = {"sqs_calls": 0, "task_batches": 0, "tasks": 0, "twice": 0}
lock = threading.Lock()
polling = threading.Event()  # the poller's own calls (between invocations) are not the handler's


def answer_tasks(params, **_):
    # Every SQS call the handler makes is counted; the TasksQueue's batches are answered here.
    body = params.get("body") or b"{}"
    request = json.loads(body) if body[:1] in (b"{", "{") else {}
    if polling.is_set():
        return None
    with lock:
        counts["sqs_calls"] += 1
        if request.get("QueueUrl") != tasks_url or "Entries" not in request:
            return None
        counts["task_batches"] += 1
        for entry in request["Entries"]:
            row = json.loads(entry["MessageBody"])["row_number"]
            counts["tasks"] += 1
            counts["twice"] += sent[row] > 0
            sent[row] = min(sent[row] + 1, 255)
    successful = [{"Id": e["Id"], "MessageId": str(uuid.uuid4()), "MD5OfMessageBody": ""} for e in request["Entries"]]
    return AWSResponse(tasks_url, 200, {}, None), {"Successful": successful, "Failed": [], "ResponseMetadata": {}}


boto3.setup_default_session()
boto3.DEFAULT_SESSION.events.register("before-call.sqs", answer_tasks)
handler = load_handler(Path(setup["code_dir"]), "app.lambda_handler")
# The same session as the handler's clients: its service models are loaded once, as in Lambda.
poller_sqs = boto3.client("sqs")
table = boto3.resource("dynamodb").Table(setup["jobs_table"])
baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class Context:
    function_name = "CsvSplitterFunction"
    memory_limit_in_mb = 1024
    aws_request_id = "bench"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:bench"

    def __init__(self):
        self.deadline = time.monotonic() + setup["invocation_s"]

    def get_remaining_time_in_millis(self):
        return int((self.deadline - time.monotonic()) * 1000)


started = time.monotonic()
first = handler(setup["event"], Context())["jobs"][0]
invocations = 1
while True:
    polling.set()
    messages = poller_sqs.receive_message(
        QueueUrl=setup["continuation_url"], MaxNumberOfMessages=1, MessageSystemAttributeNames=["All"]
    ).get("Messages", [])
    if messages:
        poller_sqs.delete_message(QueueUrl=setup["continuation_url"], ReceiptHandle=messages[0]["ReceiptHandle"])
    polling.clear()
    if not messages:
        break
    handler(lambda_sqs_event(messages, setup["continuation_arn"], "us-east-1"), Context())
    invocations += 1
seconds = time.monotonic() - started
polling.set()
job = table.get_item(Key={"pk": f"JOB#{first['job_id']}", "sk": "JOB"}, ConsistentRead=True)["Item"]
print(json.dumps({
    "seconds": seconds,
    "invocations": invocations,
    "status": job["status"],
    "total": int(job.get("total", 0)),
    "queued": int(job.get("queued", 0)),
    "rows_never_sent": sum(1 for n in sent[1:] if n == 0),
    "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "baseline_kib": baseline_kib,
    **counts,
}))
"""


def write_rows(path: Path, rows: int) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("id,prompt\n")
        for i in range(1, rows + 1):
            handle.write(f"r{i},a product shot number {i}: a ceramic mug on a wooden table\n")
    return path


def bench_splitter(rows: int, invocation_s: float = 120.0) -> dict[str, Any]:
    """Split a `rows`-row CSV through as many invocations of `invocation_s` seconds as it takes; returns
    peak RSS (MB), rows/s, SQS calls per row, continuations, and whether every row was queued exactly once."""
    import boto3

    from imagepipe_cli.local.moto_server import MotoServer
    from imagepipe_cli.local.stack import deploy_stack
    from imagepipe_cli.local.template import load_template

    with tempfile.TemporaryDirectory() as tmp, MotoServer(Path(tmp) / "moto.log") as moto:
        session = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
        )

        def client(name: str) -> Any:
            return session.client(name, endpoint_url=moto.url)

        stack = deploy_stack(
            client,
            load_template(ROOT / "template.yaml"),
            stack_name="imagepipe-bench",
            parameters={},
            region=REGION,
        )
        client("secretsmanager").put_secret_value(
            SecretId=stack.outputs["ProviderKeysSecretName"],
            SecretString=json.dumps({"ATLASCLOUD_API_KEY": "bench"}),
        )
        source = write_rows(Path(tmp) / "big.csv", rows)
        file_mib = source.stat().st_size / 2**20
        key = "inbox/big.csv"
        client("s3").upload_file(str(source), stack.outputs["InputBucketName"], key)
        event = json.loads((ROOT / "events" / "s3_put_csv.json").read_text())
        record = event["Records"][0]["s3"]
        record["bucket"]["name"] = stack.outputs["InputBucketName"]
        record["object"]["key"] = key
        continuation_url = stack.outputs["SplitContinuationQueueUrl"]
        function = stack.functions["CsvSplitterFunction"]
        setup = {
            "rows": rows,
            "event": event,
            "code_dir": str(function.code_dir),
            "tasks_url": stack.outputs["TasksQueueUrl"],
            "continuation_url": continuation_url,
            "continuation_arn": client("sqs").get_queue_attributes(
                QueueUrl=continuation_url, AttributeNames=["QueueArn"]
            )["Attributes"]["QueueArn"],
            "jobs_table": stack.outputs["JobsTableName"],
            "invocation_s": invocation_s,
        }
        env = {
            **os.environ,
            **function.env,
            "AWS_ENDPOINT_URL": moto.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "POWERTOOLS_TRACE_DISABLED": "true",
            "POWERTOOLS_LOG_LEVEL": "WARNING",
            "POWERTOOLS_METRICS_DISABLED": "true",
        }
        child = subprocess.run(
            [sys.executable, "-c", _CHILD], input=json.dumps(setup), capture_output=True, text=True, env=env
        )
        if child.returncode != 0:
            raise RuntimeError(f"the splitter's process failed:\n{child.stderr[-3000:]}")
        found = json.loads(child.stdout.strip().splitlines()[-1])
    return {
        "rows": rows,
        "file_mib": round(file_mib, 1),
        "peak_rss_mb": round(found["peak_rss_kib"] / 1024, 1),
        # the process after importing the handler and making its clients, before the first row
        "baseline_rss_mb": round(found["baseline_kib"] / 1024, 1),
        "rows_per_s": round(rows / found["seconds"]),
        "sqs_calls_per_row": round(found["sqs_calls"] / rows, 4),
        "continuations": found["invocations"] - 1,
        "invocation_s": invocation_s,
        "seconds": round(found["seconds"], 1),
        "status": found["status"],
        "queued": found["queued"],
        "tasks_sent": found["tasks"],
        "sent_twice": found["twice"],
        "never_sent": found["rows_never_sent"],
    }


if __name__ == "__main__":
    for count in [int(arg) for arg in sys.argv[1:]] or [100_000, 1_000_000]:
        print(json.dumps(bench_splitter(count)), flush=True)
