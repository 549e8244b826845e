"""What the local runtime's environments are forked from (imagepipe_cli.local.preload): botocore's data parsed
once and shared by every session, with each session's calls unchanged; bytecode kept outside the sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SESSIONS = """
import json, os, boto3
if os.environ.get("PRELOAD"):
    import imagepipe_cli.local.preload
def session(region):
    return boto3.session.Session(region_name=region, aws_access_key_id="x", aws_secret_access_key="x")
eu, ap = session("eu-west-1"), session("ap-southeast-2")
sqs_eu, sqs_ap = eu.client("sqs"), ap.client("sqs")
table = ap.resource("dynamodb").Table("jobs")
print(json.dumps({
    "shared": sqs_eu.meta.service_model._service_description is sqs_ap.meta.service_model._service_description,
    "eu": sqs_eu.meta.endpoint_url,
    "ap": sqs_ap.meta.endpoint_url,
    "table": table.meta.client.meta.endpoint_url,
    "s3": eu.client("s3").generate_presigned_url("get_object", Params={"Bucket": "b", "Key": "k"}, ExpiresIn=60)
    .split("&Signature")[0].split("?")[0],
    "s3_ap": ap.client("s3", config=boto3.session.Config(s3={"addressing_style": "virtual"})).meta.endpoint_url,
}))
"""


def run(script: str, env: dict[str, str], cwd: Path | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    done = subprocess.run(
        [sys.executable, "-c", script], env={**clean, **env}, cwd=cwd, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_sessions_share_the_parsed_data_and_each_still_calls_its_own_region():
    shared = json.loads(run(SESSIONS, {"PRELOAD": "1"}).strip().splitlines()[-1])
    alone = json.loads(run(SESSIONS, {}).strip().splitlines()[-1])

    assert shared.pop("shared") and not alone.pop("shared")  # parsed once, not once per session
    assert shared == alone  # and every endpoint and URL as botocore makes it without the preload
    assert shared["eu"] == "https://sqs.eu-west-1.amazonaws.com"
    assert shared["ap"] == "https://sqs.ap-southeast-2.amazonaws.com"
    assert shared["table"] == "https://dynamodb.ap-southeast-2.amazonaws.com"


def test_bytecode_is_kept_outside_the_sources_when_python_is_told_not_to_write_it(tmp_path):
    code = tmp_path / "function"
    code.mkdir()
    (code / "handler_module.py").write_text("VALUE = 42\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    script = "import imagepipe_cli.local.preload, sys; sys.path.insert(0, '.'); import handler_module"

    run(script, {"PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": str(cache)}, cwd=code)

    assert not (code / "__pycache__").exists()  # nothing beside the sources
    assert list(cache.rglob("handler_module*.pyc"))  # the next environment reads it instead of compiling


TLS = """
import json, ssl, httpx
from imagepipe_cli.local import preload
def context(client):
    return client._transport._pool._ssl_context
ahead = [context for _, context in preload._made_ahead]
first, second, unverified = httpx.Client(), httpx.Client(), httpx.Client(verify=False)
def shape(ctx):
    return {"verify_mode": int(ctx.verify_mode), "check_hostname": ctx.check_hostname,
            "cas": len(ctx.get_ca_certs()), "minimum": str(ctx.minimum_version)}
print(json.dumps({
    "first": shape(context(first)), "second": shape(context(second)), "unverified": shape(context(unverified)),
    "own": len({id(context(c)) for c in (first, second, unverified)}),
    "first_was_made_ahead": [id(c) for c in ahead] == [id(context(first))],
}))
"""


def test_the_first_httpx_client_gets_a_tls_context_made_ahead_that_verifies_as_httpx_default_does():
    shared = json.loads(run(TLS, {}).strip().splitlines()[-1])

    assert shared["first_was_made_ahead"]
    assert shared["own"] == 3  # every client its own context (httpcore sets ALPN on it per connection)
    assert shared["first"] == shared["second"]  # the one made ahead is httpx's default: certifi's CAs
    assert shared["first"]["verify_mode"] == 2 and shared["first"]["check_hostname"] is True
    assert shared["first"]["cas"] > 100
    assert shared["unverified"]["verify_mode"] == 0  # verify=False still gets what it asked for
