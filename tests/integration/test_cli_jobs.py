"""`imagepipe submit/status/results/cancel/retry/redrive` against the stack from template.yaml on moto."""

from __future__ import annotations

import copy
import io
import json
import re
import threading
from pathlib import Path
from urllib.parse import quote_plus

import boto3
import botocore.session
import pytest

from imagepipe_cli import jobs
from imagepipe_cli.cli import build_parser
from imagepipe_cli.local.event_sources import lambda_sqs_event

from conftest import load_event

STACK = "imagepipe-local"


@pytest.fixture
def cli(cli, monkeypatch):
    """conftest's cli, with --wait polling quickly."""
    monkeypatch.setattr(jobs, "POLL_S", 0.05)
    return cli


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def trigger(pipeline, key: str) -> dict:
    """What S3 does after an upload: the splitter gets the object's event."""
    head = pipeline.client("s3").head_object(Bucket=pipeline.input_bucket, Key=key)
    event = copy.deepcopy(load_event("s3_put_csv.json"))
    record = event["Records"][0]["s3"]
    record["bucket"]["name"] = pipeline.input_bucket
    record["object"].update(key=quote_plus(key), size=head["ContentLength"], eTag=head["ETag"].strip('"'))
    return pipeline.splitter.invoke(event)["jobs"][0]


def submitted(pipeline, cli, path: Path, *flags: str) -> str:
    """Submit the file, let the stack split it, and return the job id the user was given."""
    code, out, _ = cli("submit", path, *flags)
    assert code == 0
    job_id = out.splitlines()[0]
    trigger(pipeline, f"inbox/{path.stem}{path.suffix.lower()}")
    return job_id


def test_submit_uploads_the_file_to_the_inbox_with_its_job_id_and_budget(pipeline, cli, tmp_path):
    # Given a file whose suffix is upper case
    path = write(tmp_path, "Spring.CSV", "id,prompt\na,a calm lake\n")

    # When it is submitted with a budget
    code, out, err = cli("submit", path, "--max-cost", "0.5")

    # Then the job id is alone on stdout's first line, and the upload carries it and the budget
    assert code == 0
    job_id = out.splitlines()[0]
    assert re.fullmatch(r"Spring-\d{8}-\d{6}-[0-9a-f]{4}", job_id)
    assert f"imagepipe status {job_id}" in err
    head = pipeline.client("s3").head_object(Bucket=pipeline.input_bucket, Key="inbox/Spring.csv")
    assert head["Metadata"] == {"job-id": job_id, "max-cost": "0.5"}
    # And the stack splits it into that job, with that budget
    assert trigger(pipeline, "inbox/Spring.csv")["job_id"] == job_id
    assert pipeline.job(job_id)["max_cost"] == 0.5


@pytest.mark.parametrize(
    ("name", "message"),
    [("missing.csv", "missing.csv: no such file"), ("notes.txt", "only takes .csv, .jsonl and .json files")],
)
def test_submit_of_a_file_the_stack_cannot_take_is_one_line_and_exit_2(cli, tmp_path, name, message):
    # Given a file that does not exist, or one of another type
    if name.endswith(".txt"):
        write(tmp_path, name, "prompt\na cat\n")

    # When it is submitted
    code, out, err = cli("submit", tmp_path / name)

    # Then nothing is uploaded and the user reads one line
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and message in err


def test_submit_to_a_stack_that_does_not_exist_is_one_line_and_exit_2(pipeline, cli, tmp_path):
    path = write(tmp_path, "a.csv", "prompt\na cat\n")

    code, out, err = cli("submit", path, "--stack", "nope")

    assert code == 2 and out == ""
    assert err.splitlines() == [
        "imagepipe: error: stack 'nope' not found in region us-east-1 (use --stack NAME or IMAGEPIPE_STACK)"
    ]


def test_no_aws_credentials_is_one_line_and_exit_2(cli, tmp_path, monkeypatch):
    # Given no credentials anywhere boto3 looks (and a loopback endpoint, so nothing can reach AWS)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")

    code, out, err = cli("status")

    assert code == 2 and out == ""
    assert err.splitlines() == [
        "imagepipe: error: no AWS credentials found: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    ]


def test_run_and_emulator_are_still_there():
    parser = build_parser()

    assert parser.parse_args(["run", "examples/prompts.csv"]).command == "run"
    assert parser.parse_args(["emulator", "--port", "0"]).command == "emulator"


def test_dry_run_checks_every_row_without_any_aws_call(cli, tmp_path, monkeypatch):
    # Given no AWS at all: no credentials, an endpoint nobody listens on, and no client may even be made
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")

    def no_aws(*args, **kwargs):
        raise AssertionError("the dry run made an AWS client")

    monkeypatch.setattr(botocore.session.Session, "create_client", no_aws)
    monkeypatch.setattr(boto3.session.Session, "client", no_aws)
    # And a file with two good rows and three the splitter would reject, one of them only by its provider
    path = write(
        tmp_path,
        "mixed.csv",
        "id,prompt,width,height,provider,n\n"
        "a,a calm lake,1024,1024,,1\n"
        "b,a wide sea,4096,512,,1\n"
        "a,the same id again,1024,1024,,1\n"
        "c,a landscape,1024,768,,1\n"
        "d,a red fox,1024,1024,openai,2\n",
    )

    # When it is dry-run
    code, out, err = cli("submit", "--dry-run", path)

    # Then the user sees the counts, each rejected row with its reason, and an estimated cost
    assert code == 1, err
    lines = out.splitlines()
    assert lines[0] == f"{path}: 5 rows (csv) - 2 would be queued, 3 would be rejected"
    assert lines[1].startswith("  row 2 (id 'b'): the width 4096 is out of range")
    assert lines[2] == "  row 3 (id 'a'): duplicate id 'a': row 1 already uses it"
    assert lines[3].startswith(
        "  row 4 (id 'c'): atlascloud baidu/ERNIE-Image-Turbo/text-to-image takes only"
    )
    # 1 Atlas Cloud image at $0.003 + 2 OpenAI images at $0.04 (template.yaml's PricePerImage default)
    assert lines[4] == "estimated cost: $0.0830 (atlascloud: 1 image(s) x $0.003; openai: 2 image(s) x $0.04)"
    assert "an estimate" in out
    assert "API keys are checked on the stack, not here" in out


def test_dry_run_checks_local_comfyui_rows_by_the_splitters_rules_and_prices_only_cloud_rows(cli, tmp_path):
    # Given a mixed file: a plain row, two good local rows, one image given as a URL, one mask without an image
    path = write(
        tmp_path,
        "hybrid.csv",
        "id,prompt,init_image,mask_image,control_image,controlnet\n"
        "plain,a calm lake,,,,\n"
        "door,a green door,house.png,door-mask.png,,\n"
        "edges,a skyline,,,s3://my-input/edges.png,canny\n"
        "url,a url,https://example.com/x.png,,,\n"
        "mask,a mask alone,,door-mask.png,,\n",
    )

    code, out, err = cli("submit", "--dry-run", path)

    # Then the local rows are checked as the splitter checks them (not all rejected for want of the stack's route)
    assert code == 1, err
    lines = out.splitlines()
    assert lines[0] == f"{path}: 5 rows (csv) - 3 would be queued, 2 would be rejected"
    assert "row 4 (id 'url')" in lines[1] and "no URLs are fetched" in lines[1]
    assert "row 5 (id 'mask')" in lines[2] and "needs an init_image" in lines[2]
    # And the estimate counts the one cloud image; the local ones cost no API dollars
    assert lines[3] == "estimated cost: $0.0030 (atlascloud: 1 image(s) x $0.003)"
    assert "2 row(s) go to the local ComfyUI route: the stack needs HybridMode=enabled" in out


def test_dry_run_lists_the_first_20_rejected_rows_and_says_how_many_more(cli, tmp_path):
    path = write(tmp_path, "empty.jsonl", '{"prompt": ""}\n' * 25 + '{"prompt": "a cat"}\n')

    code, out, _ = cli("submit", "--dry-run", path)

    assert code == 1
    assert out.splitlines()[0].endswith("26 rows (jsonl) - 1 would be queued, 25 would be rejected")
    assert out.count("the prompt is empty") == 20
    assert "  ... and 5 more" in out.splitlines()


def test_dry_run_of_a_file_that_cannot_be_read_is_exit_2(cli, tmp_path):
    path = write(tmp_path, "noprompt.csv", "id,text\n1,a cat\n")

    code, out, err = cli("submit", "--dry-run", path)

    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and "no 'prompt' column" in err


def test_dry_run_rejects_what_the_splitter_rejects(pipeline, cli, tmp_path):
    # Given a file with rows of every kind the splitter rejects (the stack has Atlas Cloud's key)
    path = write(
        tmp_path,
        "parity.csv",
        "id,prompt,width,height,n,params\n"
        "ok,a calm lake,1376,768,2,\n"
        ",no id,1024,1024,1,\n"
        "ok,again,1024,1024,1,\n"
        "odd,a fox,1000,1024,1,\n"
        "big,a fox,1024,1024,5,\n"
        "p,a fox,1024,1024,1,not json\n"
        'q,"unclosed,1024,1024,1,\n',
    )

    # When it is dry-run, and also split by the stack
    _, out, _ = cli("submit", "--dry-run", path)
    job = pipeline.split("inbox/parity.csv", path.read_bytes())

    # Then both name the same rows, with the same reasons
    dry = [line.strip() for line in out.splitlines() if line.startswith("  row ")]
    split = [
        f"row {r.row}" + (f" (id {r.id!r})" if r.id is not None else "") + f": {r.error['message']}"
        for r in pipeline.split_rows(job["job_id"])
        if r.status == "rejected"
    ]
    assert dry == split and len(split) == 6


def test_status_of_a_running_then_a_finished_job_and_the_recent_jobs(pipeline, cli, tmp_path):
    # Given a job split but not yet worked on
    path = write(tmp_path, "two.csv", "id,prompt\na,a calm lake\nb,a quiet forest\n")
    job_id = submitted(pipeline, cli, path, "--job-id", "two-1", "--max-cost", "2")

    # When the user asks for its status
    code, out, _ = cli("status", job_id)

    # Then it is running, with live counts and no results yet
    assert code == 0
    assert out.splitlines() == [
        "job two-1: running",
        "  rows:     2 - so far 0 succeeded, 0 failed, 0 rejected, 0 cancelled; 2 still to make",
        "  cost:     $0.0000 so far (max $2)",
        f"  created:  {pipeline.job(job_id)['created_iso']}   finished: -",
        f"  source:   s3://{pipeline.input_bucket}/inbox/two.csv",
        "  provider: atlascloud, its default model (rows without a provider column)",
        "  results:  written when the job finishes",
    ]

    # When the job has finished
    pipeline.drain_all()
    code, out, _ = cli("status", job_id)

    # Then it is completed, with its final counts, cost and where the results are
    assert code == 0
    lines = out.splitlines()
    assert lines[:3] == [
        "job two-1: completed",
        "  rows:     2 - 2 succeeded, 0 failed, 0 rejected, 0 cancelled",
        "  cost:     $0.0060 (max $2)",
    ]
    assert lines[-2:] == [
        f"  results:  s3://{pipeline.output_bucket}/jobs/two-1/ (results.jsonl, results.csv, report.html, images/)",
        "            imagepipe results two-1 --out DIR",
    ]
    # And --json gives the record
    _, out, _ = cli("status", job_id, "--json")
    assert json.loads(out)["summary"]["counts"]["succeeded"] == 2

    # When the user lists the recent jobs
    code, out, _ = cli("status")

    # Then the job is a row of the table
    header, row = out.splitlines()
    assert header.split() == ["JOB", "STATUS", "DONE/TOTAL", "COST", "CREATED"]
    assert row.split()[:4] == ["two-1", "completed", "2/2", "$0.0060"]


def test_status_of_an_unknown_job_is_exit_1(pipeline, cli):
    code, out, err = cli("status", "nope")

    assert code == 1 and out == ""
    assert err.splitlines() == [
        "imagepipe: error: no job 'nope' on stack imagepipe-local (imagepipe status lists them)"
    ]


def test_results_downloads_the_files_and_images_of_a_finished_job(pipeline, cli, tmp_path):
    # Given a job that is not finished yet
    path = write(tmp_path, "pics.csv", "id,prompt,n\na,a calm lake,2\nb,a quiet forest,1\n")
    job_id = submitted(pipeline, cli, path)
    folder = tmp_path / "out"

    # When its results are asked for too early
    code, out, err = cli("results", job_id, "--out", folder)

    # Then the user is told to wait, in one line
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and "its results are written when it finishes" in err

    # When it has finished
    pipeline.drain_all()
    code, out, _ = cli("results", job_id, "--out", folder)

    # Then DIR holds what `imagepipe run` leaves: the results files, the report and every image
    assert code == 0
    assert out.splitlines()[0] == f"job {job_id}: completed - 2 rows, 3 image(s) downloaded"
    for name in ("results.jsonl", "results.csv", "report.html", "manifest.json"):
        assert (folder / name).is_file()
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    images = [image for row in rows for image in row["images"]]
    assert images == ["images/a.png", "images/a.2.png", "images/b.png"]
    assert all((folder / image).stat().st_size > 0 for image in images)


def test_cancel_stops_a_job_whose_rows_are_not_made_yet(pipeline, cli, tmp_path):
    # Given a job whose tasks wait on the queue
    path = write(tmp_path, "three.csv", "id,prompt\na,a calm lake\nb,a quiet forest\nc,a red fox\n")
    job_id = submitted(pipeline, cli, path)

    # When the user cancels it
    code, out, _ = cli("cancel", job_id)

    # Then they are told what happens next, and the job record says so
    assert code == 0
    assert out.splitlines()[:3] == [
        f"cancel requested for job {job_id} (it was running)",
        "  no more paid calls are made for it; its rows not yet made end cancelled",
        "  predictions already submitted are still collected (they are paid for already)",
    ]
    assert pipeline.job(job_id)["cancel_requested"] is True
    _, out, _ = cli("status", job_id)
    assert out.splitlines()[0] == f"job {job_id}: running (cancel requested)"

    # When the queue is worked off
    pipeline.drain_all()

    # Then no image was paid for, every row ended cancelled, and so did the job
    assert pipeline.emulator.stats().get("submits", 0) == 0
    results = pipeline.results(job_id)
    assert results.status == "cancelled"
    assert [r.status for r in results.rows] == ["cancelled"] * 3
    # And a finished job cannot be cancelled again
    code, out, err = cli("cancel", job_id)
    assert code == 1 and err.splitlines() == [
        f"imagepipe: error: job {job_id} is already cancelled: nothing to cancel"
    ]


def test_retry_starts_a_job_of_only_the_failed_rows_linked_to_the_old_one(pipeline_factory, cli, tmp_path):
    # Given a finished job (rows numbered, no id column) whose second row failed (on its one attempt)
    pipeline = pipeline_factory("fail=doomed", parameters={"TaskMaxAttempts": "1"})
    path = write(
        tmp_path, "ships.csv", "prompt,width\na calm lake,1024\na doomed ship,1024\na quiet forest,1024\n"
    )
    old = submitted(pipeline, cli, path, "--max-cost", "1")
    pipeline.drain_all()
    _, out, _ = cli("status", old)
    assert out.splitlines()[0] == f"job {old}: completed with failures"

    # When the user retries it
    code, out, err = cli("retry", old)

    # Then a new job id is printed, and its file holds only the failed row, with its old id
    assert code == 0
    new = out.splitlines()[0]
    assert new == f"{old}-retry-1"
    assert "1 row(s) of job" in err and "(1 failed, 0 cancelled)" in err
    key = f"inbox/retries/{new}.jsonl"
    obj = pipeline.client("s3").get_object(Bucket=pipeline.input_bucket, Key=key)
    assert [json.loads(line) for line in obj["Body"].read().decode().splitlines()] == [
        {"prompt": "a doomed ship", "width": "1024", "id": "2"}
    ]
    assert obj["Metadata"] == {"job-id": new, "parent-job": old, "max-cost": "1"}

    # And the stack makes it a job of that one row, whose record names the old job
    assert trigger(pipeline, key)["job_id"] == new
    assert pipeline.job(new)["parent_job"] == old
    assert [(r.row, r.id, r.status) for r in pipeline.split_rows(new)] == [(1, "2", "queued")]
    _, out, _ = cli("status", new)
    assert f"  retry of: {old}" in out.splitlines()

    # And another retry takes the next free number
    _, out, _ = cli("retry", old)
    assert out.splitlines()[0] == f"{old}-retry-2"


def test_retry_of_a_job_without_failures_has_nothing_to_do(pipeline, cli, tmp_path):
    job_id = submitted(pipeline, cli, write(tmp_path, "ok.csv", "prompt\na calm lake\n"))
    pipeline.drain_all()

    code, out, err = cli("retry", job_id)

    assert code == 0 and err == ""
    assert out == f"nothing to retry: no row of job {job_id} failed or was cancelled\n"


def test_submit_wait_follows_the_job_to_its_end(pipeline, cli, tmp_path):
    # Given the stack at work in the background (here: the splitter and Lambda's pollers)
    path = write(tmp_path, "wait.jsonl", '{"id": "a", "prompt": "a calm lake"}\n')
    errors: list[BaseException] = []

    def stack_at_work() -> None:
        import time

        s3 = pipeline.client("s3")
        try:
            for _ in range(200):
                if s3.list_objects_v2(Bucket=pipeline.input_bucket, Prefix="inbox/").get("KeyCount"):
                    break
                time.sleep(0.05)
            trigger(pipeline, "inbox/wait.jsonl")
            pipeline.drain_all()
        except BaseException as exc:  # seen by the test, not lost in the thread
            errors.append(exc)

    worker = threading.Thread(target=stack_at_work)
    worker.start()

    # When the user submits and waits (its own streams: the handlers log to stdout meanwhile)
    out_stream, err_stream = io.StringIO(), io.StringIO()
    args = build_parser().parse_args(["submit", str(path), "--job-id", "wait-1", "--wait"])
    code = jobs.run_command(args, out_stream, err_stream)
    worker.join()
    out, err = out_stream.getvalue(), err_stream.getvalue()

    # Then the id comes first, the final status, counts, cost and results location after it
    assert not errors
    assert code == 0
    lines = out.splitlines()
    assert lines[:4] == [
        "wait-1",
        "job wait-1: completed",
        "  rows:     1 - 1 succeeded, 0 failed, 0 rejected, 0 cancelled",
        "  cost:     $0.0030 (no max cost)",
    ]
    assert lines[-2].startswith(f"  results:  s3://{pipeline.output_bucket}/jobs/wait-1/")
    assert "1/1 rows" in err  # the progress bar's last line


def test_a_task_that_dies_in_the_dead_letter_queue_ends_failed_and_redrive_makes_it(pipeline_factory, cli):
    # Given a row whose invocations kept crashing: its message ends in the dead-letter queue with no outcome
    pipeline = pipeline_factory(provider="qianfan")
    pipeline.split("inbox/dl.csv", b"id,prompt\nok,a calm lake\ncrash,a crashing wave\n", job_id="dl")
    messages = {json.loads(m["Body"])["row_id"]: m for m in pipeline.queued_messages()}
    sqs = pipeline.client("sqs")
    sqs.send_message(QueueUrl=pipeline.dead_letter_queue, MessageBody=messages["crash"]["Body"])
    pipeline.generator.invoke(lambda_sqs_event([messages["ok"]], pipeline.mapping().queue_arn, "us-east-1"))

    # When the dead-letter recorder sees it, the job still finishes, the row failed with a reason
    results = pipeline.results("dl")
    assert results.status == "completed_with_failures"
    crash = next(r for r in results.rows if r.id == "crash")
    assert crash.status == "failed" and crash.error["type"] == "dead_letter"
    assert "dead-letter queue" in crash.error["message"]

    # And when the user redrives it, the row is made, and the job's counts and results say so
    code, out, _ = cli("redrive", "dl")
    assert code == 0 and "job dl: 1 dead-lettered row(s) queued again" in out
    results = pipeline.results("dl")
    assert results.status == "completed"
    assert [r.status for r in results.rows] == ["succeeded", "succeeded"]
    counts = pipeline.state.counts("dl")
    assert (counts.succeeded, counts.failed) == (2, 0)
    assert pipeline.emulator.paid_for("a crashing wave") == 1
    # A second redrive finds nothing left to do
    code, out, _ = cli("redrive", "dl")
    assert code == 0 and "redrove 0 row(s)" in out


def dead_lettered_job(pipeline, job_id: str) -> None:
    """A finished job whose row "crash" ended failed in the dead-letter queue (and row "ok" succeeded)."""
    pipeline.split(
        f"inbox/{job_id}.csv", b"id,prompt\nok,a calm lake\ncrash,a crashing wave\n", job_id=job_id
    )
    messages = {json.loads(m["Body"])["row_id"]: m for m in pipeline.queued_messages()}
    sqs = pipeline.client("sqs")
    sqs.send_message(QueueUrl=pipeline.dead_letter_queue, MessageBody=messages["crash"]["Body"])
    pipeline.generator.invoke(lambda_sqs_event([messages["ok"]], pipeline.mapping().queue_arn, "us-east-1"))
    assert pipeline.results(job_id).status == "completed_with_failures"


class SendSpy:
    """The CLI's SQS client: what the job's status was at each send to TasksQueue; `fail` sends fail."""

    def __init__(self, client, pipeline, job_id: str, fail: int = 0) -> None:
        self._client, self._pipeline, self._job_id, self.fail = client, pipeline, job_id, fail
        self.statuses: list[str] = []

    def __getattr__(self, name):
        return getattr(self._client, name)

    def send_message(self, **request):
        if request["QueueUrl"] == self._pipeline.tasks_queue:
            self.statuses.append(self._pipeline.job(self._job_id)["status"])
            if self.fail:
                self.fail -= 1
                raise botocore.exceptions.ClientError(
                    {"Error": {"Code": "InternalError", "Message": "internal error"}}, "SendMessage"
                )
        return self._client.send_message(**request)


def spy_on_sends(monkeypatch, pipeline, job_id: str, fail: int = 0) -> SendSpy:
    from imagepipe_cli.stackref import Stack

    spy = SendSpy(pipeline.client("sqs"), pipeline, job_id, fail)
    client = Stack.client
    monkeypatch.setattr(Stack, "client", lambda self, name: spy if name == "sqs" else client(self, name))
    return spy


def test_redrive_reopens_the_job_before_it_sends_a_row(pipeline_factory, cli, monkeypatch):
    # Given a finished job with a dead-lettered row
    pipeline = pipeline_factory(provider="qianfan")
    dead_lettered_job(pipeline, "reopen")
    spy = spy_on_sends(monkeypatch, pipeline, "reopen")

    # When it is redriven, the job is already running when the row is sent (a row made at once would
    # otherwise find its job finished, and the job would stay running for ever)
    code, _, _ = cli("redrive", "reopen")
    assert code == 0 and spy.statuses == ["running"]
    assert pipeline.results("reopen").status == "completed"


def test_a_redrive_that_stopped_before_sending_is_completed_by_the_next_one(
    pipeline_factory, cli, monkeypatch
):
    # Given a redrive whose send fails (after it took the row back)
    pipeline = pipeline_factory(provider="qianfan")
    dead_lettered_job(pipeline, "halfway")
    spy_on_sends(monkeypatch, pipeline, "halfway", fail=1)
    code, _, err = cli("redrive", "halfway")
    assert code == 2 and "internal error" in err

    # When the user runs it again, the row is sent, made, and the job finishes with it
    code, out, _ = cli("redrive", "halfway")
    assert code == 0 and "job halfway: 1 dead-lettered row(s) queued again" in out
    results = pipeline.results("halfway")
    assert results.status == "completed"
    assert [r.status for r in results.rows] == ["succeeded", "succeeded"]
    assert pipeline.emulator.paid_for("a crashing wave") == 1


def test_a_redriven_row_whose_prediction_is_on_record_is_resumed_never_paid_again(pipeline_factory, cli):
    # Given an Atlas row whose prediction was submitted (paid), then recorded failed from the dead-letter queue
    pipeline = pipeline_factory(
        latency_ms=1500, parameters={"PollBudgetSeconds": "0", "PollDelaySeconds": "1"}
    )
    pipeline.split("inbox/paid.csv", b"id,prompt\np,a lighthouse at dusk\n", job_id="paid")
    (message,) = pipeline.queued_messages()
    pipeline.generator.invoke(lambda_sqs_event([message], pipeline.mapping().queue_arn, "us-east-1"))
    pipeline.client("sqs").purge_queue(QueueUrl=pipeline.tasks_queue)  # its handed-back message is lost
    state = pipeline.state
    failed = {"name": "p", "id": "p", "row": 1, "images": [], "error": {"type": "timeout", "message": "lost"}}
    assert state.finish("paid", "p", "failed", failed)
    state.keep_dead_letter("paid", "p", message["Body"])
    state.hand_to_finisher(pipeline.client("sqs"), pipeline.stack.outputs["FinisherQueueUrl"], ["paid"])
    assert pipeline.results("paid").status == "failed"
    assert pipeline.emulator.stats()["submits"] == 1

    # When the user redrives it
    code, out, _ = cli("redrive", "paid")

    # Then its prediction is resumed: the row has its image and nothing was submitted (paid) again
    assert code == 0 and "1 resuming the prediction already paid for" in out
    results = pipeline.results("paid")
    assert results.status == "completed" and [r.status for r in results.rows] == ["succeeded"]
    assert pipeline.emulator.stats()["submits"] == 1
