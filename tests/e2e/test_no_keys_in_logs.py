"""The API keys live only in the stack's secret: a whole local run - every function's log lines, moto's,
the results, the report, the manifest, the CLI's own output - never shows one, on success or on a refused
key. The keys the local stack stores in the secret are the emulators' demo keys, or the ones in the
environment for an API given by --api-url."""

import os
import subprocess
import sys

from imagepipe.contract import PROVIDER_NAMES
from imagepipe.providers import provider_class
from imagepipe_cli.emulators import EmulatorConfig, emulator_class
from imagepipe_cli.local.template import load_template, translate

from conftest import EXAMPLES, ROOT, TEMPLATE

DEMO_KEYS = {
    name: value
    for provider in PROVIDER_NAMES
    for name, value in emulator_class(provider).DEFAULT_KEYS.items()
}
KEY_NAMES = {name for provider in PROVIDER_NAMES for name in provider_class(provider).key_names}
# Keys no emulator knows: the API refuses them (401), and they must not show up either.
WRONG_KEYS = {
    "BAIDU_API_KEY": "wrong-client-id-7Qx2MzK9pL4vB8nR",
    "BAIDU_SECRET_KEY": "wrong-client-secret-Hs5Tw1Yc6Jd3Fg0A",
}
WRITTEN = ("results.jsonl", "results.csv", "manifest.json", "report.html")
FUNCTION_LOGS = (
    "CsvSplitterFunction.log",
    "ImageGeneratorFunction.log",
    "JobFinisherFunction.log",
    "moto.log",
)


def imagepipe(*args: str, keys: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # No key of the user's own: a provider with keys in the environment would be called on its public API.
    env = {name: value for name, value in os.environ.items() if name not in KEY_NAMES}
    env.update(keys or {})
    return subprocess.run(
        [sys.executable, "-m", "imagepipe_cli", *args, "--no-progress"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_no_key_anywhere(run: subprocess.CompletedProcess, out, keys: dict[str, str]) -> None:
    assert set(WRITTEN) <= {p.name for p in out.iterdir()}, run.stdout + run.stderr
    logs = {p.name for p in (out / "logs").iterdir()}
    assert set(FUNCTION_LOGS) <= logs, logs
    assert (out / "logs" / "ImageGeneratorFunction.log").stat().st_size > 0
    places = {"stdout": run.stdout.encode(), "stderr": run.stderr.encode()}
    for path in out.rglob("*"):
        if path.is_file():
            places[str(path.relative_to(out))] = path.read_bytes()
    for name, value in keys.items():
        needle = value.encode()
        leaks = [where for where, content in places.items() if needle in content]
        assert not leaks, f"{name} appears in {leaks}"


def test_a_run_on_every_api_never_shows_a_key(tmp_path):
    # Given a file for all four APIs, each on its emulator, whose demo keys are the ones in the secret
    run = imagepipe("run", str(EXAMPLES / "providers.csv"), "--out", str(tmp_path))

    # Then every row succeeded, and no key is in any log line, result, report, manifest or the output
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 succeeded, 0 failed" in run.stdout
    assert_no_key_anywhere(run, tmp_path, DEMO_KEYS)


def test_a_refused_key_is_reported_without_showing_it(tmp_path):
    # Given the legacy Baidu API at --api-url, with keys in the environment that it does not know
    with emulator_class("baidu-oauth")(EmulatorConfig()) as api:
        run = imagepipe(
            "run", str(EXAMPLES / "providers.csv"), "--out", str(tmp_path),
            "--provider", "baidu-oauth", "--api-url", api.base_url,
            keys=WRONG_KEYS,
        )  # fmt: skip
        token_requests = api.stats().get("token_requests", 0)

    # Then its row failed on the refused key (the others ran on their emulators) ...
    assert run.returncode == 1, run.stdout + run.stderr
    assert token_requests >= 1, "the keys from the environment were sent"
    results = (tmp_path / "results.jsonl").read_text()
    assert "check BAIDU_API_KEY / BAIDU_SECRET_KEY" in results
    assert "3 succeeded, 1 failed" in run.stdout
    # ... and neither those keys nor the other APIs' demo keys show anywhere
    assert_no_key_anywhere(run, tmp_path, {**WRONG_KEYS, **DEMO_KEYS})


def test_no_function_of_the_stack_gets_a_key_in_its_environment():
    # The environment each function is deployed with (Globals included), as CloudFormation gets it
    cfn = translate(load_template(TEMPLATE), {}, "us-east-1")
    functions = {
        n: r["Properties"] for n, r in cfn["Resources"].items() if r["Type"] == "AWS::Lambda::Function"
    }
    assert {"CsvSplitterFunction", "ImageGeneratorFunction", "JobFinisherFunction"} <= set(functions)
    for name, props in functions.items():
        variables = props.get("Environment", {}).get("Variables", {})
        assert not KEY_NAMES & set(variables), name
        text = repr(variables)
        for key in {**DEMO_KEYS, **WRONG_KEYS}.values():
            assert key not in text, name
