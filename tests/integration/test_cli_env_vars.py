"""`imagepipe env-vars` on the stack from template.yaml (moto): SAM CLI's --env-vars file holds every
function's environment as the stack resolved it, so a handler run with it and an event from events/ works
on that stack - what `sam local invoke FUNCTION -e events/FILE --env-vars FILE` does."""

from __future__ import annotations

import json
from dataclasses import replace

from imagepipe_cli.local.lambda_runtime import InlineFunction

from conftest import REGION, load_event


def test_the_file_holds_each_functions_resolved_environment_and_no_secret(pipeline, cli, tmp_path):
    # Given the stack, with its provider keys stored in its secret
    keys = json.loads(
        pipeline.client("secretsmanager").get_secret_value(
            SecretId=pipeline.stack.outputs["ProviderKeysSecretName"]
        )["SecretString"]
    )

    # When the user writes the env-vars file
    code, out, err = cli("env-vars", "--out", tmp_path / "env.json")

    # Then it has every function of the stack by its logical id, with the values the stack gave it - the
    # queue URLs and bucket names, not the logical ids SAM CLI would put there - and no key
    assert code == 0, err
    assert "sam local invoke CsvSplitterFunction -e events/s3_put_csv.json --env-vars" in out
    env = json.loads((tmp_path / "env.json").read_text())
    assert set(env) == set(pipeline.stack.functions)
    for logical_id, function in pipeline.stack.functions.items():
        assert env[logical_id] == function.env
    splitter = env["CsvSplitterFunction"]
    assert splitter["TASKS_QUEUE_URL"] == pipeline.tasks_queue
    assert splitter["INPUT_BUCKET"] == pipeline.input_bucket
    assert splitter["OUTPUT_BUCKET"] == pipeline.output_bucket
    text = (tmp_path / "env.json").read_text()
    assert keys and not any(value in text for value in keys.values())


def test_a_handler_run_with_the_file_and_an_event_from_events_dir_starts_the_job(pipeline, cli):
    # Given the file on standard output, and the upload events/s3_put_csv.json announces
    code, out, _ = cli("env-vars")
    env = json.loads(out)
    pipeline.client("s3").put_object(
        Bucket=pipeline.input_bucket, Key="inbox/spring campaign.csv", Body=b"id,prompt\n1,a cat on a table\n"
    )

    # When the splitter's handler runs with only the file's environment (as in sam local invoke)
    function = replace(pipeline.stack.functions["CsvSplitterFunction"], env={})
    answer = InlineFunction(function, REGION, env["CsvSplitterFunction"]).invoke(
        load_event("s3_put_csv.json")
    )

    # Then the job is split onto the stack's queue
    assert code == 0 and [job["status"] for job in answer["jobs"]] == ["split"]
    assert len(pipeline.queued_messages()) == 1


def test_a_stack_that_is_not_there_is_one_line(pipeline, cli):
    code, out, err = cli("env-vars", "--stack", "no-such-stack")

    assert code == 2 and "no-such-stack" in err and "not found" in err and out == ""
