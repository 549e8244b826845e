"""`make bench`: how long `imagepipe run` takes for N rows (emulator latency fixed), what an asynchronous
Atlas Cloud job costs in Lambda seconds and HTTP calls per image, how much memory the splitter needs for
a large file, and the brief's naive script on the same kind of emulator for comparison.

Figures are medians of --repeat runs on this machine, measured in one go; read the ratios, not the
absolute seconds (the machine is shared)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import httpx

from imagepipe_cli.emulators import EmulatorConfig, emulator_class
from imagepipe_cli.local.moto_server import MotoServer
from imagepipe_cli.local.stack import deploy_stack
from imagepipe_cli.local.template import load_template

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"


def write_csv(path: Path, rows: int, side: int = 1024) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("id,prompt,width,height\n")
        for i in range(1, rows + 1):
            handle.write(
                f'{i},"product shot {i}, a ceramic mug on a wooden table, soft light",{side},{side}\n'
            )
    return path


def bench_run(
    rows: int,
    latency_ms: float,
    concurrency: int | None,
    extra: tuple[str, ...] = (),
    env: dict | None = None,
) -> dict:
    """Wall time of the whole `imagepipe run` command, start-up included, and its run-stats.json."""
    with tempfile.TemporaryDirectory() as tmp:
        source = write_csv(Path(tmp) / f"bench-{rows}.csv", rows)
        args = [
            sys.executable,
            "-m",
            "imagepipe_cli",
            "run",
            str(source),
            "--out",
            str(Path(tmp) / "out"),
            "--no-progress",
            "--emulator-latency-ms",
            str(latency_ms),
        ]
        if concurrency:
            args += ["--concurrency", str(concurrency)]
        args += list(extra)
        started = time.monotonic()
        done = subprocess.run(
            args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}
        )
        seconds = time.monotonic() - started
        if done.returncode != 0:
            raise SystemExit(f"imagepipe run failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        results = [
            json.loads(line) for line in (Path(tmp) / "out" / "results.jsonl").read_text().splitlines()
        ]
        ok = sum(r["status"] == "succeeded" for r in results)
        stats = json.loads((Path(tmp) / "out" / "logs" / "run-stats.json").read_text())
    return {"rows": rows, "seconds": seconds, "succeeded": ok, "rows_per_s": rows / seconds, "stats": stats}


def bench_counters(rows: int) -> dict:
    """DynamoDB writes of one job, per item and per partition key (counted by the local moto server),
    scaled to a job making 1,000 images/s. DynamoDB serves about 1,000 writes/s per partition key."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "writes.tsv"
        run = bench_run(rows, 50.0, None, env={"IMAGEPIPE_DYNAMODB_WRITE_LOG": str(log)})
        writes = [line.split("\t") for line in log.read_text().splitlines()]
    images = run["succeeded"]
    per_item = Counter((pk, sk) for _, pk, sk in writes)
    per_key = Counter(pk for _, pk, _ in writes)
    (hot_item, hot_item_writes), (hot_key, hot_key_writes) = (
        per_item.most_common(1)[0],
        per_key.most_common(1)[0],
    )
    job_record = sum(n for (pk, sk), n in per_item.items() if sk == "JOB")
    counters = [n for (pk, sk), n in per_item.items() if sk == "COUNT"]
    scale = 1000 / images
    return {
        "rows": rows,
        "images": images,
        "writes": len(writes),
        "writes_per_image": len(writes) / images,
        "partition_keys": len(per_key),
        "hottest_item": f"{hot_item[0]} {hot_item[1]}",
        "hottest_item_writes": hot_item_writes,
        "hottest_key": hot_key,
        "hottest_key_writes": hot_key_writes,
        "job_record_writes": job_record,
        "counter_items": len(counters),
        "max_counter_item_writes": max(counters),
        "at_1000_images_s": {
            "hottest_item_writes_s": round(hot_item_writes * scale),
            "hottest_key_writes_s": round(hot_key_writes * scale),
            "counter_item_writes_s": round(max(counters) * scale),
            "job_record_writes_per_job": job_record,
        },
    }


_FINISHER_PROBE = r"""
import json, sys, time
from pathlib import Path
from imagepipe_cli.local.lambda_runtime import load_handler
handler = load_handler(Path(sys.argv[1]), "app.lambda_handler")
event = json.loads(sys.stdin.read())
class Context:
    function_name = "JobFinisherFunction"; memory_limit_in_mb = 2048; aws_request_id = "bench"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:bench"
    def get_remaining_time_in_millis(self): return 900000
started = time.monotonic()
result = handler(event, Context())
print(json.dumps({"seconds": time.monotonic() - started, "result": result}))
"""


@contextmanager
def bench_stack() -> Iterator[tuple[str, MotoServer, Any, Any]]:
    """A fresh stack from template.yaml on its own moto server: (temp folder, moto, session, stack)."""
    template = load_template(ROOT / "template.yaml")
    with tempfile.TemporaryDirectory() as tmp, MotoServer(Path(tmp) / "moto.log") as moto:
        session = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        )

        def client(name: str):
            return session.client(name, endpoint_url=moto.url)

        yield (
            tmp,
            moto,
            session,
            deploy_stack(client, template, stack_name="imagepipe-bench", parameters={}, region="us-east-1"),
        )


def run_probe(script: str, stack: Any, moto: MotoServer, function: str, event: dict) -> dict:
    """One invocation of `function`'s handler in its own process (its environment from the stack, AWS
    at moto); returns what `script` printed last, as JSON."""
    env = {
        **os.environ,
        **stack.functions[function].env,
        "AWS_ENDPOINT_URL": moto.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_LOG_LEVEL": "WARNING",
        "POWERTOOLS_METRICS_DISABLED": "true",
    }
    probe = subprocess.run(
        [sys.executable, "-c", script, str(stack.functions[function].code_dir)],
        input=json.dumps(event),
        capture_output=True,
        text=True,
        env=env,
    )
    if probe.returncode != 0:
        raise SystemExit(f"{function} probe failed:\n{probe.stderr[-3000:]}")
    return json.loads(probe.stdout.strip().splitlines()[-1])


def bench_finisher(rows: int) -> dict:
    """One JobFinisherFunction run on a job of `rows` finished rows (records made up front on moto
    server): results.jsonl, results.csv, report.html and manifest written, the event published."""
    from imagepipe.jobstate import SHARDS, shard_of

    with bench_stack() as (tmp, moto, session, stack):

        def client(name: str):
            return session.client(name, endpoint_url=moto.url)

        table = session.resource("dynamodb", endpoint_url=moto.url).Table(stack.outputs["JobsTableName"])
        bucket, job = stack.outputs["OutputBucketName"], "bench-finish"
        lines, started = [], time.monotonic()
        with table.batch_writer() as batch:
            for i in range(1, rows + 1):
                name = f"r{i}"
                lines.append(
                    json.dumps(
                        {
                            "row": i,
                            "id": name,
                            "name": name,
                            "status": "queued",
                            "provider": "atlascloud",
                            "model": "baidu/ERNIE-Image-Turbo/text-to-image",
                            "prompt": f"product shot {i}",
                        }
                    )
                )
                batch.put_item(
                    Item={
                        "pk": f"JOB#{job}#{shard_of(name):02d}",
                        "sk": f"TASK#{name}",
                        "status": "succeeded",
                        "name": name,
                        "id": name,
                        "row": i,
                        "images": [f"jobs/{job}/images/{name}.png"],
                        "provider": "atlascloud",
                        "model": "baidu/ERNIE-Image-Turbo/text-to-image",
                        "request_id": f"p{i}",
                        "cost": Decimal("0.003"),
                        "attempt": 1,
                        "seconds": Decimal("21.5"),
                        "answers_lost": 0,
                    }
                )
            for shard in range(SHARDS):
                batch.put_item(Item={"pk": f"JOB#{job}#{shard:02d}", "sk": "COUNT", "succeeded": 0})
        client("s3").put_object(Bucket=bucket, Key=f"jobs/{job}/rows.jsonl", Body="\n".join(lines).encode())
        table.put_item(
            Item={
                "pk": f"JOB#{job}",
                "sk": "JOB",
                "job_id": job,
                "status": "finishing",
                "queued": rows,
                "total": rows,
                "created_at": Decimal(str(time.time())),
                "rows_key": f"jobs/{job}/rows.jsonl",
            }
        )
        prepared = time.monotonic() - started
        event = {
            "Records": [
                {
                    "messageId": "bench",
                    "receiptHandle": "bench",
                    "body": json.dumps({"job_id": job}),
                    "attributes": {
                        "ApproximateReceiveCount": "1",
                        "SentTimestamp": "0",
                        "SenderId": "bench",
                        "ApproximateFirstReceiveTimestamp": "0",
                    },
                    "messageAttributes": {},
                    "md5OfBody": "",
                    "eventSource": "aws:sqs",
                    "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:FinisherQueue",
                    "awsRegion": "us-east-1",
                }
            ]
        }
        measured = run_probe(_FINISHER_PROBE, stack, moto, "JobFinisherFunction", event)
        head = client("s3").head_object(Bucket=bucket, Key=f"jobs/{job}/results.jsonl")
        final = table.get_item(Key={"pk": f"JOB#{job}", "sk": "JOB"})["Item"]["status"]
    return {
        "rows": rows,
        "seconds": measured["seconds"],
        "prepare_seconds": prepared,
        "results_mib": head["ContentLength"] / 2**20,
        "status": final,
    }


def bench_async_cost(rows: int, generation_s: float, batch_size: int) -> dict:
    """Atlas Cloud with a slow generation: Lambda seconds billed and HTTP calls made per image."""
    run = bench_run(
        rows, generation_s * 1000, None, ("--provider", "atlascloud", "--batch-size", str(batch_size))
    )
    generator = run["stats"]["functions"]["ImageGeneratorFunction"]
    api = run["stats"]["emulators"]["atlascloud"]
    images = max(1, api.get("images", 0))
    return {
        "rows": rows,
        "generation_s": generation_s,
        "batch_size": batch_size,
        "seconds": run["seconds"],
        "succeeded": run["succeeded"],
        "invocations": generator["invocations"],
        "billed_s_per_image": generator["billed_seconds"] / images,
        "submits_per_image": api.get("submits", 0) / images,
        "polls_per_image": api.get("polls", 0) / images,
        "downloads_per_image": api.get("downloads", 0) / images,
        "http_calls_per_image": (api.get("submits", 0) + api.get("polls", 0) + api.get("downloads", 0))
        / images,
    }


_SPLITTER_PROBE = r"""
import json, os, resource, sys, tracemalloc
from pathlib import Path
from imagepipe_cli.local.lambda_runtime import load_handler
from imagepipe_cli.local.event_sources import complete_s3_event
handler = load_handler(Path(sys.argv[1]), "app.lambda_handler")
import boto3
boto3.client("s3"); boto3.client("sqs")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
event = json.loads(sys.stdin.read())
class Context:
    function_name = "CsvSplitterFunction"; memory_limit_in_mb = 512; aws_request_id = "bench"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:bench"
    def get_remaining_time_in_millis(self): return 900000
result = handler(event, Context())
peak = tracemalloc.get_traced_memory()[1]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"job": result["jobs"][0], "rss_before_kib": before, "rss_peak_kib": after, "python_peak_bytes": peak}))
"""


def bench_splitter_memory(rows: int) -> dict:
    """Peak memory of one splitter invocation on a `rows`-row file, against moto server, while a
    consumer keeps the queue short (moto's SendMessage slows with queue depth; Lambda's pollers
    drain the queue the same way on AWS)."""
    with bench_stack() as (tmp, moto, session, stack):

        def client(name: str):
            return session.client(name, endpoint_url=moto.url)

        source = write_csv(Path(tmp) / "big.csv", rows)
        file_mib = source.stat().st_size / 2**20
        key = "inbox/big.csv"
        client("s3").upload_file(str(source), stack.outputs["InputBucketName"], key)
        event = json.loads((ROOT / "events" / "s3_put_csv.json").read_text())
        record = event["Records"][0]["s3"]
        record["bucket"]["name"] = stack.outputs["InputBucketName"]
        record["object"]["key"] = key

        stop = threading.Event()
        consumed = [0]

        def consume() -> None:
            sqs = client("sqs")
            url = stack.outputs["TasksQueueUrl"]
            while not stop.is_set():
                # no long polls: the local moto serves one request at a time
                messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get(
                    "Messages", []
                )
                if not messages:
                    stop.wait(0.05)
                if messages:
                    sqs.delete_message_batch(
                        QueueUrl=url,
                        Entries=[
                            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                            for i, m in enumerate(messages)
                        ],
                    )
                    consumed[0] += len(messages)

        consumers = [threading.Thread(target=consume, daemon=True) for _ in range(4)]
        for thread in consumers:
            thread.start()
        started = time.monotonic()
        try:
            measured = run_probe(_SPLITTER_PROBE, stack, moto, "CsvSplitterFunction", event)
        finally:
            seconds = time.monotonic() - started
            stop.set()
            for thread in consumers:
                thread.join()
    return {
        "rows": rows,
        "file_mib": file_mib,
        "queued": measured["job"]["queued"],
        "seconds": seconds,
        "rss_peak_mib": measured["rss_peak_kib"] / 1024,
        "rss_growth_mib": (measured["rss_peak_kib"] - measured["rss_before_kib"]) / 1024,
        "python_peak_mib": measured["python_peak_bytes"] / 2**20,
    }


def bench_brief_script(rows: int, latency_ms: float) -> dict:
    """The brief's batch_generate: a thread pool of 10, a new OAuth token per image, files on local disk
    (against the emulator of the brief's shape, /v1/images/generations)."""
    emulator_type = emulator_class("baidu-oauth")
    with (
        emulator_type(EmulatorConfig(latency_ms=latency_ms)) as emulator,
        tempfile.TemporaryDirectory() as tmp,
    ):
        import base64

        def generate(i: int) -> None:
            with httpx.Client() as http:
                token = http.post(
                    f"{emulator.base_url}/oauth/2.0/token",
                    params={
                        "grant_type": "client_credentials",
                        "client_id": emulator.keys["BAIDU_API_KEY"],
                        "client_secret": emulator.keys["BAIDU_SECRET_KEY"],
                    },
                ).json()
                answer = http.post(
                    f"{emulator.base_url}/v1/images/generations",
                    headers={"Authorization": f"Bearer {token['access_token']}"},
                    json={
                        "model": "ernie-image-8b",
                        "prompt": f"product shot {i}",
                        "n": 1,
                        "size": "1024x1024",
                        "response_format": "b64_json",
                    },
                ).json()
                Path(tmp, f"{i}.png").write_bytes(base64.b64decode(answer["data"][0]["b64_json"]))

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=10) as pool:
            list(pool.map(generate, range(rows)))
        seconds = time.monotonic() - started
        stats = emulator.stats()
    return {
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "http_calls_per_image": (stats["token_requests"] + stats["requests"]) / rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--rows", default="1000,10000", help="row counts for `imagepipe run` (comma-separated)"
    )
    parser.add_argument("--splitter-rows", type=int, default=100_000)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=1, help="runs per size; the median is reported")
    parser.add_argument("--async-rows", type=int, default=100, help="rows for the Atlas Cloud cost run")
    parser.add_argument(
        "--generation-s", type=float, default=20.0, help="Atlas Cloud emulated generation time"
    )
    parser.add_argument("--counter-rows", type=int, default=1000, help="rows for the DynamoDB write count")
    parser.add_argument("--finisher-rows", type=int, default=100_000, help="rows for the finisher run")
    parser.add_argument(
        "--skip", default="", help="comma-separated: run,async,counters,finisher,splitter,brief"
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    OUT.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "latency_ms": args.latency_ms,
        "cpus": os.cpu_count(),
        "runs": [],
        "brief": [],
        "splitter": None,
        "async": None,
        "counters": None,
        "finisher": None,
    }

    for rows in [int(r) for r in args.rows.split(",") if r and "run" not in skip]:
        # The brief's API shape (a token, then one synchronous call per image) on both sides: like for like.
        same_api = ("--provider", "baidu-oauth")
        runs = [bench_run(rows, args.latency_ms, args.concurrency, same_api) for _ in range(args.repeat)]
        for r in runs:
            r.pop("stats")
        median = statistics.median(r["seconds"] for r in runs)
        report["runs"].append(
            {
                "rows": rows,
                "median_seconds": median,
                "rows_per_s": rows / median,
                "succeeded": runs[0]["succeeded"],
                "all": [r["seconds"] for r in runs],
            }
        )
        print(f"imagepipe run, {rows} rows: {median:.1f} s ({rows / median:.0f} rows/s)", flush=True)
        if "brief" not in skip:
            brief = [bench_brief_script(rows, args.latency_ms) for _ in range(args.repeat)]
            b_median = statistics.median(b["seconds"] for b in brief)
            report["brief"].append(
                {
                    "rows": rows,
                    "median_seconds": b_median,
                    "http_calls_per_image": brief[0]["http_calls_per_image"],
                }
            )
            print(
                f"brief's script, {rows} rows: {b_median:.1f} s, "
                f"{brief[0]['http_calls_per_image']:.0f} HTTP calls per image",
                flush=True,
            )
    if "async" not in skip:
        report["async"] = a = bench_async_cost(args.async_rows, args.generation_s, 10)
        print(
            f"atlascloud, {a['rows']} rows, {a['generation_s']:g} s generation, batches of {a['batch_size']}: "
            f"{a['billed_s_per_image']:.2f} Lambda s billed per image; HTTP calls per image "
            f"{a['http_calls_per_image']:.2f} ({a['submits_per_image']:.2f} submits + {a['polls_per_image']:.2f} polls "
            f"+ {a['downloads_per_image']:.2f} downloads); {a['invocations']} invocations, {a['seconds']:.0f} s",
            flush=True,
        )
    if "counters" not in skip:
        report["counters"] = c = bench_counters(args.counter_rows)
        hot = c["at_1000_images_s"]
        print(
            f"DynamoDB writes, {c['images']} images: {c['writes_per_image']:.2f} writes per image over "
            f"{c['partition_keys']} partition keys; hottest key {c['hottest_key_writes']} writes, hottest item "
            f"{c['hottest_item_writes']} ({c['hottest_item']}), job record {c['job_record_writes']}; at 1,000 images/s: "
            f"hottest key {hot['hottest_key_writes_s']} writes/s, a counter item {hot['counter_item_writes_s']} writes/s",
            flush=True,
        )
    if "finisher" not in skip:
        report["finisher"] = f = bench_finisher(args.finisher_rows)
        print(
            f"finisher, {f['rows']} rows: results written in {f['seconds']:.1f} s "
            f"(results.jsonl {f['results_mib']:.1f} MiB, status {f['status']})",
            flush=True,
        )
    if "splitter" not in skip:
        report["splitter"] = bench_splitter_memory(args.splitter_rows)
        s = report["splitter"]
        print(
            f"splitter, {s['rows']} rows ({s['file_mib']:.1f} MiB): peak RSS {s['rss_peak_mib']:.0f} MiB "
            f"(+{s['rss_growth_mib']:.0f} MiB during the invocation; Python heap peak {s['python_peak_mib']:.1f} MiB), "
            f"{s['seconds']:.0f} s",
            flush=True,
        )
    (OUT / "results.json").write_text(json.dumps(report, indent=2))
    print(f"written: {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
