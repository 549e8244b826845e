"""The job's visual report (imagepipe.report): untrusted text stays text, the summary says what happened,
and a real headless Chromium renders pages of cards and filters them from the URL fragment."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from imagepipe.report import render_report
from imagepipe_cli.emulators.base import render_png

EVIL_PROMPT = "</script><script>alert(1)</script>"
EVIL_ID = "a\"b'c<img src=x onerror=alert(1)>&amp;"


def make_job(**overrides: Any) -> dict:
    job = {
        "job_id": "job-2024-06-01",
        "status": "completed",
        "counts": {"total": 1234, "succeeded": 1200, "failed": 20, "rejected": 10, "cancelled": 4},
        "cost": 12.345,
        "created_at": "2024-06-01T09:12:03Z",
        "finished_at": "2024-06-01T09:19:45+00:00",
        "seconds": 462.4,
        "source": {"bucket": "acme-prompts", "key": "catalog/june.csv"},
        "provider": "openai",
        "model": "gpt-image-1",
    }
    job.update(overrides)
    return job


def make_row(i: int, status: str = "succeeded", **overrides: Any) -> dict:
    row = {
        "row": i,
        "id": f"row-{i:04d}",
        "status": status,
        "prompt": f"a lighthouse at dusk, variation {i}",
        "images": [f"images/row-{i:04d}.png"] if status == "succeeded" else [],
        "error": None if status == "succeeded" else {"type": "provider_error", "message": f"boom {i}"},
        "provider": "openai",
        "model": "gpt-image-1",
        "request_id": f"req_{i}",
        "cost": 0.042 if status == "succeeded" else 0.0,
        "attempts": 1,
        "seconds": 4.2,
    }
    row.update(overrides)
    return row


class Page(HTMLParser):
    """Elements of a report as the HTML parser sees them: script tags and their text, everything by id,
    the cards, and the visible text."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.by_id: dict[str, str] = {}
        self.cards: list[dict[str, str | None]] = []
        self.text: list[str] = []
        self._script: dict[str, str | None] | None = None
        self._script_text: list[str] = []
        self._open: list[tuple[str, str, list[str]]] = []  # (tag, id, text) for elements with an id
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "script":
            self._script, self._script_text = attributes, []
        if tag == "article" and "card" in (attributes.get("class") or "").split():
            self.cards.append(attributes)
        if attributes.get("id"):
            self._open.append((tag, attributes["id"] or "", []))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script" and self._script is not None:
            self.scripts.append((self._script, "".join(self._script_text)))
            self._script = None
        if self._open and self._open[-1][0] == tag:
            _, element_id, text = self._open.pop()
            self.by_id[element_id] = "".join(text).strip()

    def handle_data(self, data: str) -> None:
        if self._script is not None:
            self._script_text.append(data)
            return
        self.text.append(data)
        for _, _, text in self._open:
            text.append(data)

    @property
    def visible(self) -> str:
        return " ".join(" ".join(self.text).split())

    def rows_json(self) -> Any:
        (blob,) = [text for attrs, text in self.scripts if attrs.get("id") == "rows"]
        return json.loads(blob)


# ---- escaping: every user string is untrusted -------------------------------------------------------


def test_untrusted_text_cannot_break_out_and_the_rows_round_trip():
    rows = [
        make_row(0, prompt=EVIL_PROMPT),
        make_row(
            1, "failed", id=EVIL_ID, error={"type": "x</script>", "message": "<b>bold</b> & 'q' \"qq\""}
        ),
        make_row(2, prompt="unicode: 東京 café 🦊 \u2028 line \u2029 sep <!-- <script> -->", id="ünï\u00a0"),
        make_row(3, "rejected", id=None, prompt=None, images=[]),
        make_row(4, prompt="lone surrogate \ud800 here", images=["images/a b#c?.png", "javascript:alert(1)"]),
    ]
    job = make_job(
        job_id="<script>alert('job')</script>",
        source={"bucket": 'b"x', "key": "</script><script>alert(2)</script>"},
        provider="<i>p</i>",
    )
    html = render_report(job, iter(rows))
    html.encode("utf-8")  # writable as UTF-8 even with a lone surrogate in a prompt

    page = Page(html)
    assert [tag for tag, _ in page.tags].count("script") == 2
    assert [attrs.get("type") for attrs, _ in page.scripts] == ["application/json", None]
    assert page.rows_json() == rows
    # No row or job text became markup: no <img>, <i> or <b> element anywhere, one script per role.
    assert not [tag for tag, _ in page.tags if tag in {"i", "b"}]
    assert [attrs.get("id") for tag, attrs in page.tags if tag == "img"] == ["lb-img"]  # the lightbox's own
    blob = html.split('<script type="application/json" id="rows">', 1)[1].split("</script>", 1)[0]
    assert "<" not in blob and ">" not in blob and "&" not in blob
    assert "\u2028" not in blob and "\u2029" not in blob
    # The job's own strings are escaped text in the summary.
    assert "<script>alert('job')</script>" in page.visible
    assert 's3://b"x/</script><script>alert(2)</script>' in page.visible
    assert "<i>p</i>" in page.visible


def test_non_finite_numbers_still_make_valid_json():
    rows = [make_row(0, cost=float("nan"), seconds=float("inf"))]
    blob = Page(render_report(make_job(), rows))
    (text,) = [text for attrs, text in blob.scripts if attrs.get("id") == "rows"]

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    parsed = json.loads(text, parse_constant=no_constants)
    assert parsed[0]["cost"] is None and parsed[0]["seconds"] is None


# ---- the summary --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, label, tone",
    [
        ("completed", "Completed", "ok"),
        ("completed_with_failures", "Completed with failures", "warn"),
        ("failed", "Failed", "bad"),
        ("cancelled", "Cancelled", "mute"),
        ("running", "Running", "run"),
    ],
)
def test_status_badge(status, label, tone):
    page = Page(render_report(make_job(status=status), []))
    assert page.by_id["job-status"] == label
    (badge,) = [attrs for _, attrs in page.tags if attrs.get("id") == "job-status"]
    assert badge["class"] == f"badge {tone}"
    assert badge["data-status"] == status


def test_completed_with_failures_never_looks_like_success():
    page = Page(render_report(make_job(status="completed_with_failures"), []))
    (badge,) = [attrs for _, attrs in page.tags if attrs.get("id") == "job-status"]
    assert "ok" not in (badge["class"] or "").split()
    assert "completed with failures" in page.by_id["job-status"].lower()


def test_summary_shows_counts_cost_timing_source_and_engine():
    page = Page(render_report(make_job(), []))
    text = page.visible
    for shown in ("1,234 Total rows", "1,200 Succeeded", "20 Failed", "10 Rejected", "4 Cancelled"):
        assert shown in text
    assert "$12.35 Cost (USD)" in text
    assert "2024-06-01 09:12:03 UTC" in text and "2024-06-01 09:19:45 UTC" in text
    assert "7 min 42 s" in text
    assert "s3://acme-prompts/catalog/june.csv" in text
    assert "openai · gpt-image-1" in text
    assert "Job job-2024-06-01" in text


def test_a_running_job_shows_pending_rows_and_sub_cent_costs():
    job = make_job(
        status="running",
        counts={"total": 10, "succeeded": 3, "failed": 0, "rejected": 0, "cancelled": 0},
        cost=0.0042,
        finished_at=None,
        seconds=None,
        source=None,
        provider=None,
        model=None,
    )
    text = Page(render_report(job, [])).visible
    assert "7 Pending" in text
    assert "$0.0042 Cost (USD)" in text
    assert "Finished" not in text and "Duration" not in text and "Source" not in text


def test_without_js_the_summary_shows_and_a_note_says_cards_need_js():
    html = render_report(make_job(), [make_row(0)])
    note = html.split("<noscript>", 1)[1].split("</noscript>", 1)[0]
    assert "JavaScript" in note
    assert '<section id="browser" hidden>' in html
    assert "Total rows" in html.split("<noscript>", 1)[0]


def test_self_contained():
    html = render_report(make_job(), [make_row(i) for i in range(3)])
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    assert "<link" not in html and "@import" not in html and "url(" not in html


def test_100k_rows_render_fast():
    rows = [
        make_row(i, "succeeded" if i % 9 else "failed", prompt=f"a <cat> & dog {i} 東京")
        for i in range(100_000)
    ]
    started = time.perf_counter()
    html = render_report(make_job(), iter(rows))
    elapsed = time.perf_counter() - started
    assert elapsed < 5, f"render_report took {elapsed:.2f} s on 100,000 rows"
    assert html.count('"row":') == 100_000


# ---- a real browser -------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not on PATH (Debian: apt-get install chromium)"
)
ROWS_IN_BROWSER = 150


def chromium(*args: str, url: str) -> str:
    command = [
        CHROMIUM or "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--virtual-time-budget=5000",
        *args,
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def png(path: Path, i: int) -> None:
    # What the emulators make: a full-size palette PNG with the marker colour drawn in (browsers decode
    # such images more slowly than small icons, which is where an async-decoded thumbnail went blank).
    image = Image.open(io.BytesIO(render_png(f"row {i}", 1024, 1024))).convert("RGB")
    ImageDraw.Draw(image).ellipse([300, 300, 724, 724], fill=MARKER)
    image.quantize(64).save(path, compress_level=1)


# A colour no part of the page uses: pixels of it in a screenshot are thumbnails actually drawn.
MARKER = (255, 0, 255)


@pytest.fixture(scope="module")
def report_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    (folder / "images").mkdir()
    rows = []
    for i in range(ROWS_IN_BROWSER):
        status = ("succeeded",) * 7 + ("failed", "rejected", "cancelled")
        row = make_row(i, status[i % 10])
        if i == 3:
            row["prompt"] = EVIL_PROMPT
            row["id"] = EVIL_ID
        if row["status"] == "succeeded":
            names = [f"row-{i:04d}.png"] + ([f"row-{i:04d}.2.png"] if i % 14 == 0 else [])
            for name in names:
                png(folder / "images" / name, i)
            row["images"] = [f"images/{name}" for name in names]
        rows.append(row)
    job = make_job(
        status="completed_with_failures",
        counts={"total": 150, "succeeded": 105, "failed": 15, "rejected": 15, "cancelled": 15},
        cost=4.41,
    )
    path = folder / "report.html"
    path.write_text(render_report(job, rows), encoding="utf-8")
    return path


@needs_chromium
def test_each_card_shows_its_rows_backend_and_a_local_rows_workflow_prompt_id_and_gpu_time(tmp_path):
    rows = [
        make_row(1, provider="atlascloud", model="m1", backend="cloud"),
        make_row(
            2,
            provider="comfyui",
            model=None,
            backend="local",
            workflow="inpaint",
            prompt_id="imagepipe-hat-1",
            gpu_seconds=12.5,
            cost=0.0,
        ),
    ]
    page = tmp_path / "report.html"
    page.write_text(render_report(make_job(), rows), encoding="utf-8")

    text = Page(chromium("--dump-dom", url=page.as_uri())).visible

    assert "cloud · atlascloud · m1" in text
    assert "local ComfyUI · inpaint" in text and "prompt imagepipe-hat-1" in text and "12.5 GPU s" in text


@needs_chromium
def test_chromium_renders_the_first_page_of_cards(report_file):
    page = Page(chromium("--dump-dom", url=report_file.as_uri()))
    assert len(page.cards) == 100
    assert [card["data-row"] for card in page.cards] == [str(i) for i in range(100)]
    text = page.visible
    for i in (0, 1, 2, 50, 99):
        assert f"row-{i:04d}" in text
    assert "row-0100" not in text
    assert EVIL_ID in text and EVIL_PROMPT in text  # shown as text, not run
    assert "Page 1 of 2" in text
    assert "Showing 1–100 of 150 rows" in text
    lazy = [attrs for tag, attrs in page.tags if tag == "img" and attrs.get("loading") == "lazy"]
    assert len(lazy) == 70  # one thumbnail per succeeded row on the page
    assert lazy[0]["src"] == "images/row-0000.png"
    assert [
        attrs["href"] for tag, attrs in page.tags if tag == "a" and attrs.get("href", "").endswith(".2.png")
    ]
    assert [tag for tag, _ in page.tags].count("script") == 2  # nothing injected at run time


@needs_chromium
def test_chromium_screenshot_is_not_blank(report_file, tmp_path):
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,2000", url=report_file.as_uri())
    assert shot.exists()
    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 500
    # The thumbnails themselves are on screen (not blank boxes): thousands of pixels of their marker.
    marker_pixels = sum(count for count, colour in colours if colour == MARKER)
    assert marker_pixels > 20_000, marker_pixels


@needs_chromium
def test_the_url_fragment_filters_the_cards(report_file):
    page = Page(chromium("--dump-dom", url=report_file.as_uri() + "#status=failed"))
    assert len(page.cards) == 15
    assert {card["data-status"] for card in page.cards} == {"failed"}
    assert [card["data-row"] for card in page.cards] == [str(i) for i in range(7, 150, 10)]
    assert "Page 1 of 1" in page.visible

    page = Page(chromium("--dump-dom", url=report_file.as_uri() + "#q=VARIATION%2012&page=1"))
    assert [card["data-row"] for card in page.cards] == ["12"] + [str(i) for i in range(120, 130)]
