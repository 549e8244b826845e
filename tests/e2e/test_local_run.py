"""`imagepipe run` as a user runs it: a real process, moto server over HTTP, the emulator over HTTP."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from conftest import EXAMPLES, ROOT


def imagepipe(*args: str, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imagepipe_cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def read_results(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_the_brief_csv_becomes_one_png_per_row_and_a_results_line_per_row(tmp_path):
    # When a user runs the main job on the example file
    run = imagepipe("run", str(EXAMPLES / "prompts.csv"), "--out", str(tmp_path), "--no-progress")

    # Then it exits 0, says it used the emulator, and every row has its image
    assert run.returncode == 0, run.stderr
    assert "EMULATOR" in run.stdout
    assert "3 succeeded, 0 failed, 0 rejected" in run.stdout
    results = read_results(tmp_path)
    assert [(r["id"], r["status"], r["error"]) for r in results] == [
        ("1", "succeeded", None),
        ("2", "succeeded", None),
        ("3", "succeeded", None),
    ]
    for result in results:
        (path,) = result["images"]
        with Image.open(tmp_path / path) as image:
            assert (image.format, image.size) == ("PNG", (1024, 1024))
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["1.png", "2.png", "3.png"]


def test_keys_in_the_environment_never_make_the_demo_pay(tmp_path):
    # Given a user with real-looking keys for every provider exported in their shell
    keys = {
        "ATLASCLOUD_API_KEY": "apikey-of-a-real-account",
        "QIANFAN_API_KEY": "bce-v3/ALTAK-real/secret",
        "OPENAI_API_KEY": "sk-real",
        "BAIDU_API_KEY": "real",
        "BAIDU_SECRET_KEY": "real",
    }

    # When they run what `make demo` runs (the file with a row for each provider, too)
    demo = imagepipe(
        "run", "examples/prompts.csv", "--out", str(tmp_path / "demo"), "--no-progress",
        env={**os.environ, **keys},
    )  # fmt: skip
    every = imagepipe(
        "run", "examples/providers.csv", "--out", str(tmp_path / "every"), "--no-progress",
        env={**os.environ, **keys},
    )  # fmt: skip

    # Then every API was its emulator, the header says so and that the keys were not used, and the rows
    # were made (this machine has no route to the real APIs: a paid call would have failed its row)
    assert demo.returncode == 0 and every.returncode == 0, demo.stdout + demo.stderr + every.stderr
    for run in (demo, every):
        apis = [line for line in run.stdout.splitlines() if line.startswith("image API ")]
        assert len(apis) == 4 and all("EMULATOR" in line and "REAL" not in line for line in apis), apis
        assert all("set but not used: --live calls the real API" in line for line in apis), apis
    assert "3 succeeded, 0 failed" in demo.stdout and "4 succeeded, 0 failed" in every.stdout


def test_bad_rows_and_api_failures_are_reported_and_the_exit_code_is_1(tmp_path):
    # Given a file with a rejected row, a refused prompt and a prompt the API always fails
    source = tmp_path / "mixed.csv"
    source.write_text(
        "id,prompt,negative_prompt,width,height\n"
        "good,a lighthouse at dusk,,1024,1024\n"
        "tiny,a small thing,,10,10\n"
        "nope,a forbidden picture,,1024,1024\n"
        "doom,a doomed ship,,1024,1024\n"
    )
    out = tmp_path / "out"

    run = imagepipe(
        "run", str(source), "--out", str(out), "--no-progress",
        "--emulator-fault", "refuse=forbidden", "--emulator-fault", "fail=doomed",
        # 3 calls for a row that always fails, not the template's 8 (whose backoff alone is minutes)
        "--parameter-overrides", "TaskMaxAttempts=3",
    )  # fmt: skip

    assert run.returncode == 1, run.stderr
    statuses = {r["id"]: (r["status"], r["error"] and r["error"]["type"]) for r in read_results(out)}
    assert statuses == {
        "good": ("succeeded", None),
        "tiny": ("rejected", "rejected"),
        "nope": ("failed", "moderation"),
        "doom": ("failed", "unavailable"),  # after its 3 attempts
    }
    assert "row 2 (id 'tiny'): rejected: the width 10 is out of range" in run.stdout


def test_an_unreadable_file_exits_2_with_one_line_and_no_traceback(tmp_path):
    source = tmp_path / "notes.csv"
    source.write_text("title,description\nhello,world\n")

    run = imagepipe("run", str(source), "--out", str(tmp_path / "out"), "--no-progress")

    assert run.returncode == 2
    assert "no 'prompt' column" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout


def test_misuse_exits_2_with_a_reason_and_no_traceback(tmp_path):
    cases = [
        (["run", str(tmp_path / "missing.csv")], "no such file"),
        (["run", str(EXAMPLES / "prompts.csv"), "--concurrency", "0"], "must be at least 1"),
        (["run", str(EXAMPLES / "prompts.csv"), "--batch-size", "many"], "is not a whole number"),
        (["run", str(EXAMPLES / "prompts.csv"), "--emulator-fault", "explode"], "unknown fault"),
        (["run", str(ROOT / "pyproject.toml")], "only takes .csv, .jsonl and .json"),
        (["run", str(EXAMPLES / "prompts.csv"), "--out", str(ROOT / "pyproject.toml")], "is not a folder"),
        (["emulator", "--port", "99999"], "not a port number"),
        (["run", str(EXAMPLES / "prompts.csv"), "--provider", "dalle"], "invalid choice"),
        (["run", str(EXAMPLES / "prompts.csv"), "--api-url", "ftp://x"], "must start with http"),
        (
            ["run", str(EXAMPLES / "prompts.csv"), "--provider", "openai", "--api-url", "http://127.0.0.1:9"],
            "set OPENAI_API_KEY",
        ),
        (["emulator", "--provider", "qianfan", "--fault", "nsfw=x"], "unknown fault"),
        (
            ["run", str(EXAMPLES / "prompts.csv"), "--batch-size", "11", "--out", str(tmp_path)],
            "between 1 and 10",
        ),
    ]
    for args, reason in cases:
        run = imagepipe(*args)
        assert run.returncode == 2, (args, run.stderr)
        assert reason in run.stderr, (args, run.stderr)
        assert "Traceback" not in run.stderr


def test_a_file_that_mixes_all_four_providers_runs_end_to_end(tmp_path):
    # Given a file whose provider column names each API (no keys set: each runs on its emulator)
    run = imagepipe("run", str(EXAMPLES / "providers.csv"), "--out", str(tmp_path), "--no-progress")

    # Then every row was made by its own provider, and results say who made it, with what and for how much
    assert run.returncode == 0, run.stdout + run.stderr
    results = {r["id"]: r for r in read_results(tmp_path)}
    assert {r["provider"] for r in results.values()} == {"atlascloud", "qianfan", "openai", "baidu-oauth"}
    assert results["ernie"]["model"] == "baidu/ERNIE-Image-Turbo/text-to-image"
    assert results["openai"]["model"] == "gpt-image-1" and len(results["openai"]["images"]) == 2
    for row in results.values():
        assert row["status"] == "succeeded", row
        assert row["request_id"] and row["cost"] > 0
        for path in row["images"]:
            with Image.open(tmp_path / path) as image:
                assert image.size[0] > 0
    with Image.open(tmp_path / results["ernie"]["images"][0]) as image:
        assert image.size == (1376, 768)
    for name in ("atlascloud", "qianfan", "openai", "baidu-oauth"):
        assert f"image API {name}" in run.stdout


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="chromium is not on PATH (make test installs it)"
)
def test_the_report_of_a_run_shows_the_images_in_a_browser(tmp_path):
    # Given a finished run
    run = imagepipe("run", str(EXAMPLES / "prompts.csv"), "--out", str(tmp_path), "--no-progress")
    assert run.returncode == 0, run.stderr

    # When its report.html is opened in headless Chromium
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--virtual-time-budget=5000", f"--screenshot={shot}",
            "--window-size=1280,1100", (tmp_path / "report.html").as_uri(),
        ],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip

    # Then every row's card is there and its thumbnail is drawn: each image's main colour fills part
    # of the screenshot
    with Image.open(shot) as page:
        colours = dict((colour, count) for count, colour in page.convert("RGB").getcolors(1 << 22))
    for row in read_results(tmp_path):
        with Image.open(tmp_path / row["images"][0]) as image:
            _, main = max(image.convert("RGB").getcolors(1 << 22))
        assert colours.get(main, 0) > 2_000, (row["id"], main)
