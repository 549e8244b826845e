"""`make bench`: issue 11's table, measured in one go on this machine against the emulators, with the
brief's script (10 threads, a new token per image, no retries) side by side where it applies.

Each scenario runs the code as it is in the tree: `imagepipe run` as a process against a standalone
emulator (a real HTTP server in this process, which counts paid calls and 429s second by second), the
splitter through bench/splitter_bench.py, the generator's import in a fresh python3.12. One run each
unless --repeat says otherwise (then the median). Prints one markdown table, ready for the README, and
writes bench/out/results.json and bench/out/table.md.

    python bench/run_bench.py [--only rate,nolimit,async,splitter,coldstart] [--quick]"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagepipe_cli.emulators import EmulatorConfig, emulator_class
from imagepipe_cli.local.template import load_template

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
SCENARIOS = ("rate", "nolimit", "async", "splitter", "coldstart")
NOT_BUILT = "not built yet"


@dataclass
class Row:
    """One line of the table. `met` is judged on the imagepipe figure: True, False or None (no target)."""

    scenario: str
    measure: str
    target: str
    imagepipe: str
    brief: str = "n/a"
    met: bool | None = None


def verdict(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "-"}[met]


# --------------------------------------------------------------------------- runs


def write_csv(path: Path, rows: int) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("id,prompt\n")
        for i in range(1, rows + 1):
            handle.write(f"r{i},a product shot number {i}: a ceramic mug on a wooden table\n")
    return path


def imagepipe_run(
    rows: int, provider: str, args: list[str], emulator: Any = None, timeout: float = 1500
) -> dict:
    """`imagepipe run` on `rows` rows as a process; against `emulator` (standalone) when given, else the
    built-in one. Rows lost = rows that did not end succeeded (exit 1 is a figure here, not an error)."""
    env = {**os.environ, **(emulator.keys if emulator else {})}
    with tempfile.TemporaryDirectory() as tmp:
        source, out = write_csv(Path(tmp) / "bench.csv", rows), Path(tmp) / "out"
        command = [sys.executable, "-m", "imagepipe_cli", "run", str(source), "--out", str(out), "--no-progress",
                   "--provider", provider, *(["--api-url", emulator.base_url] if emulator else []), *args]  # fmt: skip
        started = time.monotonic()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        seconds = time.monotonic() - started
        results_file = out / "results.jsonl"
        if done.returncode not in (0, 1) or not results_file.exists():
            tail = (done.stderr or done.stdout)[-600:].strip().replace("\n", " | ")
            return {"error": f"exit {done.returncode}: {tail}"}
        results = [json.loads(line) for line in results_file.read_text().splitlines()]
        stats = json.loads((out / "logs" / "run-stats.json").read_text())
    succeeded = sum(r["status"] == "succeeded" for r in results)
    return {"seconds": seconds, "succeeded": succeeded, "lost": rows - succeeded, "stats": stats}


# The brief's batch_generate: a pool of 10 threads, a new OAuth token per image, no retries (a row whose
# call fails is logged and lost), files on local disk. Its own process, as imagepipe's is.
_BRIEF_SCRIPT = r"""
import base64, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import httpx
base_url, api_key, secret_key, rows, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]

def generate(i):
    try:
        with httpx.Client(timeout=60) as http:
            token = http.post(f"{base_url}/oauth/2.0/token", params={"grant_type": "client_credentials",
                              "client_id": api_key, "client_secret": secret_key}).json()["access_token"]
            answer = http.post(f"{base_url}/v1/images/generations", headers={"Authorization": f"Bearer {token}"},
                               json={"model": "ernie-image-8b", "prompt": f"a product shot number {i}", "n": 1,
                                     "size": "1024x1024", "response_format": "b64_json"}).json()
            Path(out, f"{i}.png").write_bytes(base64.b64decode(answer["data"][0]["b64_json"]))
    except Exception as failed:
        print(f"row {i} failed: {failed!r}", file=sys.stderr)

with ThreadPoolExecutor(max_workers=10) as pool:
    list(pool.map(generate, range(rows)))
"""


def brief_script(rows: int, emulator: Any) -> dict:
    """The brief's script against `emulator` (the brief's API shape); rows lost = rows without an image."""
    with tempfile.TemporaryDirectory() as tmp:
        keys = (emulator.keys["BAIDU_API_KEY"], emulator.keys["BAIDU_SECRET_KEY"])
        started = time.monotonic()
        subprocess.run(
            [sys.executable, "-c", _BRIEF_SCRIPT, emulator.base_url, *keys, str(rows), tmp],
            capture_output=True, check=True, timeout=1500,
        )  # fmt: skip
        seconds = time.monotonic() - started
        made = len(list(Path(tmp).glob("*.png")))
    return {"seconds": seconds, "succeeded": made, "lost": rows - made}


def api_figures(emulator: Any, rate: float | None = None) -> dict:
    """What the emulator saw: images/s over the generation phase (its first to last paid call), the share
    of generation calls refused by its rate limit, HTTP calls per image, and when the paid rate first held
    0.95 R for 5 seconds running (seconds from the first generation call)."""
    stats, timeline = emulator.stats(), emulator.per_second()
    paid, images = stats.get("paid", 0), stats.get("images", 0)
    first, last = timeline["first"].get("paid"), timeline["last"].get("paid")
    phase = (last - first) if first is not None and last is not None and last > first else None
    calls = stats.get("requests", 0) + stats.get("token_requests", 0) + stats.get("downloads", 0)
    figures = {
        "paid": paid,
        "images": images,
        "generation_s": phase,
        "images_per_s": (paid - 1) / phase if phase else None,  # intervals between the first and last
        "share_429": stats.get("rate_limited", 0) / stats["requests"] if stats.get("requests") else 0.0,
        "http_calls_per_image": calls / images if images else None,
        "per_second_paid": timeline["paid"],
        "per_second_429": timeline["rate_limited"],
        "offset": timeline["offset"],
        "last_paid_s": last,
    }
    if rate:
        window, per_s = 5, timeline["paid"]
        figures["reached_095_at_s"] = next(
            (s for s in range(len(per_s) - window + 1) if sum(per_s[s : s + window]) >= 0.95 * rate * window),
            None,
        )
    return figures


def template_parameters() -> set[str]:
    return set(load_template(ROOT / "template.yaml").body.get("Parameters", {}))


# --------------------------------------------------------------------------- scenarios


def scenario_rate(args: argparse.Namespace, report: dict) -> list[Row]:
    rate, rows, latency = args.rate, args.rate_rows, 300.0
    title = f"limit R = {rate:g} req/s, {latency:.0f} ms, {rows:,} rows"
    config = EmulatorConfig(rate_limit=rate, latency_ms=latency)
    runs: dict[str, dict] = {}
    with emulator_class("baidu-oauth")(config) as api:
        runs["brief"] = {**brief_script(rows, api), **api_figures(api, rate)}
    print(f"  brief's script: {summary(runs['brief'])}", flush=True)
    override = f"{args.limit_parameter}={args.limit_value.format(rate=f'{rate:g}')}"
    # The shared limiter's switch, when the template has one: on for both (adaptive = on, with no limit given).
    switch = args.limiter_switch.partition("=")[0]
    known = template_parameters()
    on = [args.limiter_switch] if switch and switch in known else []
    variants = {"configured": on + [override], "adaptive": on}
    for name, overrides in variants.items():
        if name == "configured" and args.limit_parameter not in known:
            runs[name] = {"error": f"{NOT_BUILT} (no {args.limit_parameter} in template.yaml)"}
        else:
            with emulator_class("qianfan")(config) as api:
                run = imagepipe_run(
                    rows, "qianfan", ["--parameter-overrides", *overrides] if overrides else [], api
                )
                runs[name] = {**run, **api_figures(api, rate)} if "error" not in run else run
        runs[name].pop("stats", None)
        print(f"  imagepipe, limit {name}: {summary(runs[name])}", flush=True)
    report["rate"] = runs
    brief = runs["brief"]
    out: list[Row] = []
    for name, label in (
        ("configured", f"limit configured ({' '.join(variants['configured'])})"),
        ("adaptive", f"limit unknown: adaptive only ({' '.join(variants['adaptive']) or 'no override'})"),
    ):
        run, scenario = runs[name], f"{title}; imagepipe {label}"
        if "error" in run:
            out.append(Row(scenario, "images/s ÷ R, 429 share, rows lost", "", run["error"], "", None))
            continue
        fraction = run["images_per_s"] / rate if run["images_per_s"] else 0.0
        out += [
            Row(scenario, "images/s ÷ R (first to last paid call)", "≥ 0.95", f"{fraction:.2f}",
                fmt_fraction(brief, rate), fraction >= 0.95),
            Row(scenario, "calls answered 429", "< 3 %", f"{run['share_429']:.0%}",
                f"{brief['share_429']:.0%}", run["share_429"] < 0.03),
            Row(scenario, "rows lost", "0", f"{run['lost']}", f"{brief['lost']}", run["lost"] == 0),
        ]  # fmt: skip
        if name == "adaptive":  # the target allows it 30 s to find R: the whole phase is shown, not judged
            out[-3].met, at, after = None, run.get("reached_095_at_s"), rate_after(run, 30.0)
            out += [
                Row(scenario, "images/s ÷ R from 30 s after the first call to the last paid call", "≥ 0.95",
                    fmt(after and after / rate, "", 2), "n/a", after is not None and after / rate >= 0.95),
                Row(scenario, "time to 0.95 R held for 5 s (from the first call)", "≤ 30 s",
                    "never" if at is None else f"{at} s", "n/a", at is not None and at <= 30),
            ]  # fmt: skip
    return out


def rate_after(run: dict, t0: float) -> float | None:
    """Paid calls per second from t0 s after the first call to the last paid one (whole seconds from t0)."""
    first_second = math.ceil(t0 + run["offset"])
    start, paid = first_second - run["offset"], sum(run["per_second_paid"][first_second:])
    span = (run["last_paid_s"] or 0.0) - start
    return paid / span if span > 1.0 else None


def fmt_fraction(run: dict, rate: float) -> str:
    return f"{run['images_per_s'] / rate:.2f}" if run.get("images_per_s") else "0"


def summary(run: dict) -> str:
    if "error" in run:
        return run["error"]
    keys = ("seconds", "succeeded", "lost", "paid", "generation_s", "images_per_s", "share_429",
            "http_calls_per_image", "billed_s_per_image", "reached_095_at_s")  # fmt: skip
    return ", ".join(
        f"{k} {run[k]:.3g}" if isinstance(run[k], float) else f"{k} {run[k]}" for k in keys if k in run
    )


def scenario_nolimit(args: argparse.Namespace, report: dict) -> list[Row]:
    rows, latency = args.nolimit_rows, 200.0
    title = f"no limit, 10 in flight, {latency:.0f} ms, {rows:,} rows (Baidu OAuth API, the brief's)"
    # 10 calls in flight: 10 generator invocations of one task each.
    flags = ["--concurrency", "10", "--batch-size", "1"]
    mine, brief = [], []
    for _ in range(args.repeat):
        with emulator_class("baidu-oauth")(EmulatorConfig(latency_ms=latency)) as api:
            run = imagepipe_run(rows, "baidu-oauth", flags, api)
            if "error" in run:
                report["nolimit"] = run
                return [Row(title, "wall-time ratio imagepipe / brief", "≤ 1.15", run["error"], "", None)]
            run.pop("stats")
            mine.append({**run, **api_figures(api)})
        with emulator_class("baidu-oauth")(EmulatorConfig(latency_ms=latency)) as api:
            brief.append({**brief_script(rows, api), **api_figures(api)})
        print(f"  imagepipe: {summary(mine[-1])}\n  brief's script: {summary(brief[-1])}", flush=True)
    report["nolimit"] = {"imagepipe": mine, "brief": brief}

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] or 0.0 for r in runs)

    phase_mine, phase_brief = median(mine, "generation_s"), median(brief, "generation_s")
    wall_mine, wall_brief = median(mine, "seconds"), median(brief, "seconds")
    calls_mine, calls_brief = median(mine, "http_calls_per_image"), median(brief, "http_calls_per_image")
    ratio = phase_mine / phase_brief if phase_brief else float("inf")
    runs = f"median of {args.repeat}" if args.repeat > 1 else "one run"
    return [
        Row(title, f"wall-time ratio imagepipe / brief, first to last paid call ({runs})", "≤ 1.15",
            f"{ratio:.2f} ({phase_mine:.1f} s)", f"1 ({phase_brief:.1f} s)", ratio <= 1.15),
        Row(title, "whole command, start-up and finish included", "-", f"{wall_mine:.1f} s "
            f"({wall_mine / wall_brief:.2f}×)", f"{wall_brief:.1f} s", None),
        Row(title, "HTTP calls per image (tokens included)", "1.0", f"{calls_mine:.2f}", f"{calls_brief:.2f}",
            round(calls_mine, 1) <= 1.0),
    ]  # fmt: skip


def scenario_async(args: argparse.Namespace, report: dict) -> list[Row]:
    """Twice: at the template's batch and concurrency (10 generator environments, each a process, beside moto
    server and the emulator on this machine's cores), and at --concurrency 2, where the environments are not
    waiting on the machine: Lambda seconds are wall time, so a crowded laptop bills waiting for a CPU too."""
    rows, generation_s = args.async_rows, 20.0
    out: list[Row] = []
    report["async"] = {}
    for label, flags in (
        ("template's batch and concurrency", []),
        ("--concurrency 2", ["--concurrency", "2"]),
    ):
        title = f"Atlas Cloud, {generation_s:g} s generations, {rows:,} rows ({label})"
        with emulator_class("atlascloud")(EmulatorConfig(latency_ms=generation_s * 1000)) as api:
            run = imagepipe_run(rows, "atlascloud", flags, api)
            if "error" not in run:
                generator = run.pop("stats")["functions"]["ImageGeneratorFunction"]
                stats = api.stats()
                images = max(1, stats.get("images", 0))
                # Lambda bills each environment's init phase: the local one is forked from a process that
                # has imported boto3 and the rest already, so each cold start is billed at the init a fresh
                # process takes here (generator_init) instead.
                init = generator_init(args, report).get("median_s")
                handler_s = generator["billed_seconds"] - generator["init_seconds"]
                if init is None:  # never billed as 0: the row says why there is no figure
                    run["error"] = "the generator's init could not be measured (see the cold start row)"
                    init = 0.0
                run.update(
                    billed_s_per_image=(handler_s + generator["cold_starts"] * init) / images,
                    handler_s_per_image=handler_s / images,
                    cold_starts=generator["cold_starts"],
                    init_s=init,
                    invocations=generator["invocations"],
                    http_calls_per_image=sum(stats.get(k, 0) for k in ("submits", "polls", "downloads"))
                    / images,
                    calls={k: stats.get(k, 0) / images for k in ("submits", "polls", "downloads")},
                )
        report["async"][label] = run
        print(f"  imagepipe ({label}): {summary(run)}", flush=True)
        if "error" in run:
            out.append(Row(title, "Lambda seconds billed per image", "≤ 0.15", run["error"], "n/a", None))
            continue
        calls = " + ".join(f"{v:.2f} {k}" for k, v in run["calls"].items())
        out += [
            Row(title, "Lambda seconds billed per image (handler + init phases)", "≤ 0.15",
                f"{run['billed_s_per_image']:.3f} ({run['handler_s_per_image']:.3f} + {run['cold_starts']} cold starts"
                f" × {run['init_s'] * 1000:.0f} ms)", "n/a", run["billed_s_per_image"] <= 0.15),
            Row(title, "HTTP calls per image", "≤ 3.2", f"{run['http_calls_per_image']:.2f} ({calls})", "n/a",
                run["http_calls_per_image"] <= 3.2),
        ]  # fmt: skip
    return out


def scenario_splitter(args: argparse.Namespace, report: dict) -> list[Row]:
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from splitter_bench import bench_splitter  # built beside this file; read as it lands
    except ImportError as missing:
        report["splitter"] = {"error": f"{NOT_BUILT}: {missing}"}
        return [Row("splitter", "peak RSS, rows/s, SQS calls per row, continuations", "", NOT_BUILT)]
    out, report["splitter"] = [], {}
    for rows in args.splitter_rows:
        title = f"splitter, {rows:,} rows"
        try:
            found = bench_splitter(rows)
        except Exception as failed:  # one broken scenario must not lose the rest of the table
            report["splitter"][rows] = {"error": repr(failed)}
            out.append(Row(title, "peak RSS, rows/s, SQS calls per row", "", f"failed: {failed!r}"[:200]))
            continue
        report["splitter"][rows] = found
        print(f"  {title}: {found}", flush=True)
        rss, speed = pick(found, "peak_rss", "rss"), pick(found, "rows_per_s", "rows/s", "per_s")
        sqs, more = pick(found, "sqs"), pick(found, "continuation")
        out += [
            Row(title, "peak RSS", "< 200 MB", fmt(rss, " MB"), "n/a", rss is not None and rss < 200),
            Row(title, "rows/s", "-", fmt(speed, "", 0), "n/a", None),
            Row(title, "SQS calls per row", "≤ 0.1", fmt(sqs, "", 3), "n/a", sqs is not None and sqs <= 0.1),
            Row(title, "continuations", "as many as it needs", fmt(more, "", 0), "n/a", None),
        ]
    return out


def pick(found: dict, *names: str) -> float | None:
    """The first figure whose key contains one of `names` (splitter_bench's keys are its own)."""
    for name in names:
        for key, value in found.items():
            if name in key.lower() and isinstance(value, int | float):
                return float(value)
    return None


def fmt(value: float | None, unit: str, digits: int = 1) -> str:
    return "?" if value is None else f"{value:,.{digits}f}{unit}"


_IMPORT_PROBE = (
    "import time; t = time.perf_counter(); import app; assert app._task_processor.cache_info().currsize == 1; "
    "print(time.perf_counter() - t)"
)
# The settings the stack gives the function (no AWS call is made at init: its clients are only made), so the
# import runs the whole init phase - the clients, the connection pool and the keys' provider included.
_INIT_ENV = {
    "OUTPUT_BUCKET": "out", "TASKS_QUEUE_URL": "http://localhost/q", "FINISHER_QUEUE_URL": "http://localhost/f",
    "JOBS_TABLE": "jobs", "PROVIDER_KEYS_SECRET": "keys", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
}  # fmt: skip


def generator_init(args: argparse.Namespace, report: dict) -> dict:
    """The generator's init in a fresh process, as Lambda's does it (the import, which makes its clients): its
    layer and boto3 only, tracing on (Lambda's environment: LAMBDA_TASK_ROOT set), no bytecode written (/opt is
    read-only). Measured once per bench run; the Atlas scenario bills it per cold start."""
    if "coldstart" in report:
        return report["coldstart"]
    build = ROOT / ".aws-sam" / "build"
    py312 = next(iter(sorted(glob.glob("/root/.pyenv/versions/3.12*/bin/python3.12"))), None)
    py312 = py312 or shutil.which("python3.12")
    built = (build / "ImageGeneratorFunction" / "app.py").exists() and (
        ROOT / ".aws-sam/lambda-runtime"
    ).is_dir()
    if built and py312:
        cwd, python = build / "ImageGeneratorFunction", py312
        path, where = "../SharedLayer/python:../../lambda-runtime", "python3.12, `make build`'s output"
    else:
        cwd, python = ROOT / "functions" / "image_generator", str(ROOT / ".venv" / "bin" / "python")
        path, where = str(ROOT / "layers" / "imagepipe"), "source tree, the venv's python (no `make build`)"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1",
           "AWS_DEFAULT_REGION": "us-east-1", "LAMBDA_TASK_ROOT": str(cwd), "POWERTOOLS_SERVICE_NAME": "imagepipe",
           **_INIT_ENV}  # fmt: skip
    seconds = []
    for _ in range(args.coldstart_runs):
        probe = subprocess.run(
            [python, "-c", _IMPORT_PROBE], cwd=cwd, env=env, capture_output=True, text=True
        )
        if probe.returncode != 0:
            report["coldstart"] = {"error": probe.stderr[-2000:]}
            return report["coldstart"]
        seconds.append(float(probe.stdout.strip().splitlines()[-1]))
    layer = build / "SharedLayer"
    layer_mb = du(layer) / 1e6 if built and layer.is_dir() else None
    report["coldstart"] = {"where": where, "import_s": seconds, "median_s": statistics.median(seconds),
                           "layer_mb": layer_mb}  # fmt: skip
    print(f"  init: {[round(s * 1000) for s in seconds]} ms; layer {layer_mb} MB ({where})", flush=True)
    return report["coldstart"]


def scenario_coldstart(args: argparse.Namespace, report: dict) -> list[Row]:
    init = generator_init(args, report)
    if "error" in init:
        failed = init["error"].strip()[-160:]
        return [Row("generator cold start", "import app", "", f"failed: {failed}")]
    seconds, layer_mb, where = init["import_s"], init["layer_mb"], init["where"]
    median_ms, best_ms = statistics.median(seconds) * 1000, min(seconds) * 1000
    title = f"generator cold start ({where}, tracing on)"
    return [
        Row(title, f"init: import of functions/image_generator/app.py, its clients made: median of {len(seconds)} (best)",
            "small (no figure in the issue)", f"{median_ms:.0f} ms ({best_ms:.0f} ms)"),
        Row(title, "layer unzipped: its files' total size", "< 250 MB (Lambda's limit)",
            "needs `make build`" if layer_mb is None else f"{layer_mb:.1f} MB", "n/a",
            None if layer_mb is None else layer_mb < 250),
    ]  # fmt: skip


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


# --------------------------------------------------------------------------- table


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        models = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    cpu = models[0] if models else cpu
    return (f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")  # fmt: skip


def table(rows: list[Row], header: str) -> str:
    lines = [
        header,
        "",
        "| scenario | measure | target | imagepipe | brief's script | met |",
        "|---|---|---|---|---|---|",
    ]
    previous = None
    for row in rows:
        scenario = row.scenario if row.scenario != previous else "″"
        previous = row.scenario
        cells = (scenario, row.measure, row.target, row.imagepipe, row.brief, verdict(row.met))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated: " + ",".join(SCENARIOS))
    parser.add_argument(
        "--quick", action="store_true", help="a tenth of the rows: checks the harness, not the figures"
    )
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--rate-rows", type=int, default=900)
    parser.add_argument(
        "--limit-parameter", default="ProviderRateLimits", help="the template's rate-limit parameter"
    )
    parser.add_argument("--limit-value", default="qianfan={rate}", help="its value ({rate} is --rate)")
    parser.add_argument(
        "--limiter-switch", default="SharedRateLimiter=true", help="the override that turns the limiter on"
    )
    parser.add_argument("--nolimit-rows", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of the no-limit scenario (median)")
    parser.add_argument("--async-rows", type=int, default=200)
    parser.add_argument("--splitter-rows", default="100000,1000000")
    parser.add_argument("--coldstart-runs", type=int, default=5)
    args = parser.parse_args()  # fmt: skip
    args.splitter_rows = [int(n) for n in args.splitter_rows.split(",") if n]
    if args.quick:
        args.rate_rows, args.nolimit_rows, args.async_rows, args.repeat = 200, 200, 40, 1
        args.splitter_rows = [10_000]
    chosen = [s for s in args.only.split(",") if s]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}: use {', '.join(SCENARIOS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    rows: list[Row] = []
    started, load_at_start = time.monotonic(), os.getloadavg()[0]
    for name in SCENARIOS:
        if name not in chosen:
            continue
        print(f"{name} ...", flush=True)
        began = time.monotonic()
        try:
            rows += globals()[f"scenario_{name}"](args, report)
        except Exception as failed:  # one broken scenario must not lose the rest of the table
            report[name] = {"error": repr(failed)}
            rows.append(Row(name, "the scenario", "", f"failed: {failed!r}"[:300], "", None))
        print(f"{name}: {time.monotonic() - began:.0f} s", flush=True)
    # The machine is shared: its load says whether the figures are worth reading (2 cores at load 10 are not).
    load = f"load average {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    header = (f"`make bench` on {report['machine']}; {time.monotonic() - started:.0f} s in all, {load}"
              f"{' (--quick: a tenth of the rows, not the figures)' if args.quick else ''}.")  # fmt: skip
    text = table(rows, header)
    (OUT / "results.json").write_text(json.dumps(report, indent=1, default=str))
    (OUT / "table.md").write_text(text + "\n")
    print("\n" + text + "\n\nwritten: bench/out/table.md, bench/out/results.json", flush=True)


if __name__ == "__main__":
    main()
