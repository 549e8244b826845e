"""A job's visual report: one self-contained HTML contact sheet (report.html) beside the job's images/.

Nothing is loaded from the network: the CSS and the JS are inline and the fonts are the system's. The job
summary is plain HTML (it shows without JS); the rows are embedded once as JSON in
<script type="application/json" id="rows"> and the JS renders them a page of 100 cards at a time, so a job
of 100,000 rows keeps only one page of images in the DOM. The filter (status, text, page) lives in
location.hash, e.g. report.html#status=failed, so a view can be shared as a link.

Every string from a job or a row is untrusted: the HTML parts are escaped with html.escape, the JSON has
'<', '>' and '&' written as \\u escapes so no text can end the <script> element, and the JS puts row text in
the cards with textContent and setAttribute only (never innerHTML), and links only relative image paths.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from datetime import datetime
from html import escape
from typing import Any

__all__ = ["render_report"]

# Job status -> (badge class, label). completed_with_failures is amber and says so: never plain success.
_JOB_STATUS = {
    "completed": ("ok", "Completed"),
    "completed_with_failures": ("warn", "Completed with failures"),
    "failed": ("bad", "Failed"),
    "cancelled": ("mute", "Cancelled"),
    "running": ("run", "Running"),
}
_COUNT_TILES = (
    ("total", "Total rows", ""),
    ("succeeded", "Succeeded", "ok"),
    ("failed", "Failed", "bad"),
    ("rejected", "Rejected", "rej"),
    ("cancelled", "Cancelled", "mute"),
)

_JSON_ESCAPES = re.compile("[\u2028\u2029\ud800-\udfff]")
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str)


def render_report(job: dict, rows: Iterable[dict]) -> str:
    """The report.html of a job: `job` is its summary, `rows` the lines of its results.jsonl (image paths
    relative to the report). Linear in the rows; each row is encoded once."""
    parts: list[str] = []
    append = parts.append
    encode = _ENCODER.encode
    first = True
    for row in rows:
        if not first:
            append(",")
        first = False
        try:
            text = encode(row)
        except ValueError:  # NaN or infinity: invalid JSON for JSON.parse; written as null
            text = encode(_finite(row))
        text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        if _JSON_ESCAPES.search(text):
            text = _JSON_ESCAPES.sub(_json_escape, text)
        append(text)
    return "".join((_head(job), "[", *parts, "]", _TAIL))


def _json_escape(match: re.Match[str]) -> str:
    # Like '<' '>' '&' above, these stand only inside JSON strings, where \uXXXX means the same
    # character: U+2028/2029, and lone surrogates (which could not be written as UTF-8).
    return f"\\u{ord(match.group()):04x}"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _text(value: Any) -> str:
    return escape("" if value is None else str(value))


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def format_cost(value: Any) -> str:
    """USD with cents, and up to 4 decimals below a dollar (image prices are fractions of a cent)."""
    try:
        cost = float(value or 0)
    except (TypeError, ValueError):
        return "—"
    if not math.isfinite(cost):
        return "—"
    if cost == 0 or abs(cost) >= 1:
        return f"${cost:,.2f}"
    text = f"{cost:.4f}".rstrip("0")
    if len(text.split(".")[1]) < 2:
        text = f"{cost:.2f}"
    return f"${text}"


def format_seconds(value: Any) -> str | None:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s"


def format_time(value: Any) -> str | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    text = moment.strftime("%Y-%m-%d %H:%M:%S")
    offset = moment.utcoffset()
    if offset is None:
        return text
    if not offset:
        return f"{text} UTC"
    return f"{text} {moment.strftime('%z')}"


def _head(job: dict) -> str:
    job = job or {}
    job_id = _text(job.get("job_id"))
    status = str(job.get("status") or "unknown")
    badge_class, badge_label = _JOB_STATUS.get(status, ("mute", status.replace("_", " ").capitalize()))
    counts = job.get("counts") or {}
    total = _int(counts.get("total"))

    tiles = []
    for key, label, tone in _COUNT_TILES:
        value = _int(counts.get(key))
        tiles.append(
            f'<div class="tile {tone}"><div class="tile-v">{value:,}</div>'
            f'<div class="tile-k">{label}</div></div>'
        )
    done = sum(_int(counts.get(key)) for key in ("succeeded", "failed", "rejected", "cancelled"))
    pending = max(total - done, 0)
    if pending:
        tiles.append(
            f'<div class="tile run"><div class="tile-v">{pending:,}</div>'
            '<div class="tile-k">Pending</div></div>'
        )
    tiles.append(
        f'<div class="tile cost"><div class="tile-v">{escape(format_cost(job.get("cost")))}</div>'
        '<div class="tile-k">Cost (USD)</div></div>'
    )

    bar = []
    denominator = max(total, done, 1)
    for key, tone in (("succeeded", "ok"), ("failed", "bad"), ("rejected", "rej"), ("cancelled", "mute")):
        value = _int(counts.get(key))
        if value:
            bar.append(
                f'<span class="seg {tone}" style="width:{100 * value / denominator:.3f}%" '
                f'title="{key}: {value:,}"></span>'
            )
    progress = ""
    if bar:
        progress = f'<div class="bar" role="img" aria-label="rows by status">{"".join(bar)}</div>'

    facts = []
    provider, model = job.get("provider"), job.get("model")
    if provider or model:
        engine = " · ".join(_text(part) for part in (provider, model) if part)
        facts.append(("Provider · model", f'<span class="mono">{engine}</span>'))
    source = job.get("source")
    if isinstance(source, dict) and (source.get("bucket") or source.get("key")):
        where = f"s3://{source.get('bucket') or ''}/{source.get('key') or ''}"
        facts.append(("Source", f'<span class="mono">{_text(where)}</span>'))
    created, finished = format_time(job.get("created_at")), format_time(job.get("finished_at"))
    if created:
        facts.append(("Started", _text(created)))
    if finished:
        facts.append(("Finished", _text(finished)))
    duration = format_seconds(job.get("seconds"))
    if duration:
        facts.append(("Duration", _text(duration)))
    fact_html = "".join(f"<div><dt>{label}</dt><dd>{value}</dd></div>" for label, value in facts)

    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        f"<title>Job {job_id} · imagepipe report</title><style>{_CSS}</style></head><body>"
        '<header class="top"><div class="wrap">'
        '<div class="brand"><span class="logo" aria-hidden="true"></span>imagepipe'
        '<span class="brand-sub">Job report</span></div>'
        f'<div class="title-row"><h1><span class="h1-k">Job</span> <span class="mono">{job_id}</span></h1>'
        f'<span class="badge {badge_class}" id="job-status" data-status="{escape(status)}">'
        f"{escape(badge_label)}</span></div>"
        f'<dl class="facts">{fact_html}</dl>'
        "</div></header>"
        '<main class="wrap">'
        f'<section class="summary"><div class="tiles">{"".join(tiles)}</div>{progress}</section>'
        '<noscript><p class="note">The image cards need JavaScript: enable it to browse and filter the rows. '
        "Every row is also in results.jsonl beside this report.</p></noscript>"
        '<section id="browser" hidden>'
        '<div class="toolbar"><div class="filters" id="filters" role="group" aria-label="Filter by status">'
        "</div>"
        '<label class="search"><svg viewBox="0 0 20 20" aria-hidden="true"><circle cx="8.5" cy="8.5" r="5.5"/>'
        '<path d="M13 13l4.5 4.5"/></svg><input id="q" type="search" placeholder="Search id or prompt"'
        ' autocomplete="off" spellcheck="false" aria-label="Search id or prompt"></label></div>'
        '<div class="pagebar"><span class="shown" id="shown"></span>'
        '<nav class="pager" aria-label="Pages"></nav></div>'
        '<div class="grid" id="grid"></div>'
        '<div class="empty" id="empty" hidden><p>No rows match this filter.</p>'
        '<button type="button" id="clear">Show all rows</button></div>'
        '<div class="pagebar bottom"><span></span><nav class="pager" aria-label="Pages"></nav></div>'
        "</section></main>"
        '<footer class="wrap foot-note">Generated by imagepipe · images are in the images/ folder beside this'
        " report · every row is in results.jsonl</footer>"
        '<div id="lightbox" hidden><div class="lb-inner"><img id="lb-img" alt="">'
        '<div class="lb-bar"><div class="lb-cap" id="lb-cap"></div>'
        '<a id="lb-open" target="_blank" rel="noopener noreferrer">Open original</a>'
        '<button type="button" id="lb-close" aria-label="Close">Close</button></div></div></div>'
        '<script type="application/json" id="rows">'
    )


_CSS = """
:root{--bg:#f5f6f8;--panel:#fff;--line:#e3e6eb;--ink:#1b1f24;--ink2:#59626e;--ink3:#8a929c;
--ok:#1a7f4b;--ok-bg:#e5f5ec;--bad:#c0362c;--bad-bg:#fdeceb;--warn:#a15c00;--warn-bg:#fff1d6;
--rej:#7a4cc2;--rej-bg:#f1ebfb;--mute:#5f6873;--mute-bg:#eceef1;--run:#1f63c7;--run-bg:#e6effc;
--accent:#2f5bd8;--radius:10px}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 -apple-system,BlinkMacSystemFont,
"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans",sans-serif}
.wrap{max-width:1320px;margin:0 auto;padding:0 24px}
.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace}
.top{background:var(--panel);border-bottom:1px solid var(--line);padding:18px 0 16px}
.brand{display:flex;align-items:center;gap:8px;font-weight:650;color:var(--ink2);font-size:13px;
letter-spacing:.02em}
.logo{width:18px;height:18px;border-radius:5px;background:linear-gradient(135deg,#2f5bd8,#8a4fd8 60%,#e0567a)}
.brand-sub{font-weight:500;color:var(--ink3);padding-left:8px;margin-left:2px;border-left:1px solid var(--line)}
.title-row{display:flex;align-items:center;flex-wrap:wrap;gap:12px;margin:10px 0 12px}
h1{margin:0;font-size:22px;font-weight:650;word-break:break-all}
.h1-k{color:var(--ink3);font-weight:500}
.badge{display:inline-flex;align-items:center;gap:7px;padding:4px 11px 4px 10px;border-radius:999px;
font-size:13px;font-weight:600;border:1px solid transparent;white-space:nowrap}
.badge::before{content:"";width:8px;height:8px;border-radius:50%;background:currentColor}
.badge.ok{color:var(--ok);background:var(--ok-bg);border-color:#bfe3cf}
.badge.warn{color:var(--warn);background:var(--warn-bg);border-color:#f3d08a}
.badge.bad{color:var(--bad);background:var(--bad-bg);border-color:#f3c3bf}
.badge.mute{color:var(--mute);background:var(--mute-bg);border-color:#d8dce1}
.badge.run{color:var(--run);background:var(--run-bg);border-color:#bcd2f5}
.facts{display:flex;flex-wrap:wrap;gap:6px 28px;margin:0}
.facts div{min-width:0}
.facts dt{font-size:11px;text-transform:uppercase;letter-spacing:.06em;color:var(--ink3);font-weight:600}
.facts dd{margin:1px 0 0;color:var(--ink);word-break:break-all}
.summary{margin:20px 0 6px}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(140px,1fr));gap:12px}
.tile{background:var(--panel);border:1px solid var(--line);border-radius:var(--radius);padding:12px 14px;
border-top:3px solid var(--line)}
.tile-v{font-size:22px;font-weight:650;font-variant-numeric:tabular-nums}
.tile-k{font-size:12px;color:var(--ink2);margin-top:2px}
.tile.ok{border-top-color:var(--ok)}.tile.bad{border-top-color:var(--bad)}.tile.rej{border-top-color:var(--rej)}
.tile.mute{border-top-color:#aab1ba}.tile.run{border-top-color:var(--run)}.tile.cost{border-top-color:var(--ink)}
.bar{display:flex;height:8px;border-radius:99px;overflow:hidden;background:var(--line);margin-top:14px}
.seg{display:block;height:100%}
.seg.ok{background:var(--ok)}.seg.bad{background:var(--bad)}.seg.rej{background:var(--rej)}
.seg.mute{background:#aab1ba}
.note{background:var(--warn-bg);border:1px solid #f3d08a;color:#6b4300;padding:12px 14px;border-radius:8px}
.toolbar{display:flex;flex-wrap:wrap;align-items:center;justify-content:space-between;gap:12px;margin:20px 0 10px}
.filters{display:flex;flex-wrap:wrap;gap:6px}
.filters button{font:inherit;font-size:13px;display:inline-flex;align-items:center;gap:7px;cursor:pointer;
background:var(--panel);border:1px solid var(--line);color:var(--ink);padding:6px 12px;border-radius:8px}
.filters button:hover{border-color:#c5cad2}
.filters button .n{font-variant-numeric:tabular-nums;color:var(--ink2);font-size:12px;background:var(--bg);
padding:0 7px;border-radius:99px}
.filters button .dot{width:8px;height:8px;border-radius:50%;background:#aab1ba}
.filters button[aria-pressed="true"]{background:var(--ink);border-color:var(--ink);color:#fff}
.filters button[aria-pressed="true"] .n{background:rgba(255,255,255,.18);color:#fff}
.filters button.zero{color:var(--ink3)}
.dot.succeeded{background:var(--ok)!important}.dot.failed{background:var(--bad)!important}
.dot.rejected{background:var(--rej)!important}
.search{position:relative;display:flex;align-items:center}
.search svg{position:absolute;left:10px;width:16px;height:16px;fill:none;stroke:var(--ink3);stroke-width:1.8;
stroke-linecap:round}
.search input{font:inherit;width:300px;max-width:100%;padding:7px 12px 7px 32px;border:1px solid var(--line);
border-radius:8px;background:var(--panel);color:var(--ink);outline:none}
.search input:focus{border-color:var(--accent);box-shadow:0 0 0 3px rgba(47,91,216,.15)}
.pagebar{display:flex;align-items:center;justify-content:space-between;gap:12px;margin:8px 0 12px;
color:var(--ink2);font-size:13px}
.pagebar.bottom{margin:18px 0 8px}
.pager{display:flex;align-items:center;gap:8px}
.pager button{font:inherit;font-size:13px;cursor:pointer;background:var(--panel);border:1px solid var(--line);
color:var(--ink);padding:5px 11px;border-radius:7px}
.pager button:disabled{color:var(--ink3);cursor:default;background:transparent}
.pager .pos{font-variant-numeric:tabular-nums;min-width:90px;text-align:center}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:14px}
.card{background:var(--panel);border:1px solid var(--line);border-radius:var(--radius);overflow:hidden;
display:flex;flex-direction:column;min-width:0;transition:box-shadow .15s}
.card:hover{box-shadow:0 4px 16px rgba(20,30,50,.08)}
.thumb{display:block;aspect-ratio:1/1;background:#eef0f3;position:relative;overflow:hidden}
.thumb img{width:100%;height:100%;object-fit:cover;display:block}
a.thumb{cursor:zoom-in}
.thumb.empty{display:flex;flex-direction:column;align-items:center;justify-content:center;gap:6px;
color:var(--ink3);font-size:12px;background:repeating-linear-gradient(135deg,#f1f2f4 0 10px,#eceef1 10px 20px)}
.thumb.empty svg{width:30px;height:30px;fill:none;stroke:currentColor;stroke-width:1.5}
.thumb .count{position:absolute;right:8px;bottom:8px;background:rgba(20,24,30,.72);color:#fff;font-size:11px;
padding:2px 7px;border-radius:99px}
.cb{padding:10px 12px 12px;display:flex;flex-direction:column;gap:6px;flex:1;min-width:0}
.l1{display:flex;align-items:center;gap:6px;min-width:0}
.rowno{color:var(--ink3);font-size:12px;font-variant-numeric:tabular-nums}
.cid{font-weight:600;font-size:13px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;flex:1;min-width:0}
.pill{font-size:11px;font-weight:600;padding:1px 8px;border-radius:99px;white-space:nowrap;
color:var(--mute);background:var(--mute-bg)}
.pill.succeeded{color:var(--ok);background:var(--ok-bg)}.pill.failed{color:var(--bad);background:var(--bad-bg)}
.pill.rejected{color:var(--rej);background:var(--rej-bg)}
.prompt{margin:0;color:var(--ink2);font-size:13px;display:-webkit-box;-webkit-line-clamp:3;
-webkit-box-orient:vertical;overflow:hidden;overflow-wrap:anywhere}
.prompt.none{color:var(--ink3);font-style:italic}
.err{font-size:12px;color:var(--bad);background:var(--bad-bg);border-radius:6px;padding:6px 8px;
overflow-wrap:anywhere;display:-webkit-box;-webkit-line-clamp:4;-webkit-box-orient:vertical;overflow:hidden}
.err.rejected{color:#5b3596;background:var(--rej-bg)}.err.cancelled{color:var(--mute);background:var(--mute-bg)}
.err b{font-weight:650}
.extra{font-size:12px;color:var(--ink3);display:flex;flex-wrap:wrap;gap:4px 8px}
.extra a{color:var(--accent);text-decoration:none}.extra a:hover{text-decoration:underline}
.meta{margin-top:auto;padding-top:6px;border-top:1px solid #f0f1f4;font-size:12px;color:var(--ink3);
display:flex;flex-wrap:wrap;gap:2px 10px;overflow-wrap:anywhere}
.meta .c{color:var(--ink2);font-variant-numeric:tabular-nums;margin-left:auto}
.empty{text-align:center;color:var(--ink2);padding:40px 0}
.empty button{font:inherit;cursor:pointer;background:var(--panel);border:1px solid var(--line);color:var(--ink);
padding:6px 14px;border-radius:8px}
.foot-note{color:var(--ink3);font-size:12px;padding-top:10px;padding-bottom:28px}
#lightbox{position:fixed;inset:0;background:rgba(12,14,18,.86);display:flex;align-items:center;
justify-content:center;z-index:10;padding:24px}
#lightbox[hidden]{display:none}
.lb-inner{max-width:min(1100px,100%);max-height:100%;display:flex;flex-direction:column;gap:10px}
.lb-inner img{max-width:100%;max-height:calc(100vh - 120px);object-fit:contain;border-radius:6px;
background:#222;align-self:center}
.lb-bar{display:flex;align-items:center;gap:14px;color:#e8eaee;font-size:13px}
.lb-cap{flex:1;min-width:0;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.lb-bar a{color:#9fb8ff}
.lb-bar button{font:inherit;cursor:pointer;background:#2a2e36;color:#fff;border:1px solid #444a55;
border-radius:7px;padding:5px 12px}
@media (max-width:640px){.wrap{padding:0 14px}.search input{width:100%}.search{flex:1}}
"""

_JS = r"""
(function () {
  "use strict";
  var PAGE = 100;
  var KNOWN = ["succeeded", "failed", "rejected", "cancelled"];
  var LABEL = {succeeded: "Succeeded", failed: "Failed", rejected: "Rejected", cancelled: "Cancelled"};
  var rows;
  try { rows = JSON.parse(document.getElementById("rows").textContent); } catch (e) { rows = []; }
  if (!Array.isArray(rows)) rows = [];

  var browser = document.getElementById("browser");
  var grid = document.getElementById("grid");
  var filters = document.getElementById("filters");
  var input = document.getElementById("q");
  var shown = document.getElementById("shown");
  var empty = document.getElementById("empty");
  var pagers = document.querySelectorAll(".pager");
  var state = {status: "all", q: "", page: 1};
  var haystack = null, view = rows, viewKey = null;

  function str(v) { return v === null || v === undefined ? "" : String(v); }
  function statusOf(r) { return str(r && r.status) || "unknown"; }
  function el(tag, cls, text) {
    var n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined && text !== null) n.textContent = text;
    return n;
  }
  function cost(v) {
    var c = Number(v);
    if (!isFinite(c) || v === null || v === undefined) return "";
    if (c === 0 || Math.abs(c) >= 1) return "$" + c.toFixed(2);
    var t = c.toFixed(4).replace(/0+$/, "");
    if (t.split(".")[1].length < 2) t = c.toFixed(2);
    return "$" + t;
  }
  // Image paths are relative to the report; anything with a scheme or a host is not linked.
  function href(path) {
    var p = str(path);
    if (!p || /^[a-zA-Z][a-zA-Z0-9+.\-]*:/.test(p) || /^[\/\\]/.test(p)) return null;
    return p.split("/").map(function (s) {
      return s === "." || s === ".." ? s : encodeURIComponent(s);
    }).join("/");
  }

  // Status counts (all statuses, in a fixed order, then any others found).
  var counts = {all: rows.length}, order = KNOWN.slice();
  for (var i = 0; i < rows.length; i++) {
    var s = statusOf(rows[i]);
    if (!(s in counts)) { counts[s] = 0; if (order.indexOf(s) < 0) order.push(s); }
    counts[s]++;
  }
  ["all"].concat(order).forEach(function (s) {
    var b = el("button");
    b.type = "button";
    b.setAttribute("data-status", s);
    if (s !== "all") b.appendChild(el("span", "dot " + s));
    b.appendChild(el("span", "", s === "all" ? "All" : (LABEL[s] || s)));
    b.appendChild(el("span", "n", (counts[s] || 0).toLocaleString("en-US")));
    if (!counts[s]) b.classList.add("zero");
    b.addEventListener("click", function () { state.status = s; state.page = 1; commit(); });
    filters.appendChild(b);
  });

  function readHash() {
    var p = new URLSearchParams(location.hash.replace(/^#/, ""));
    var s = p.get("status") || "all";
    state.status = s === "all" || s in counts || KNOWN.indexOf(s) >= 0 ? s : "all";
    state.q = p.get("q") || "";
    state.page = Math.max(1, parseInt(p.get("page"), 10) || 1);
  }
  function writeHash() {
    var p = new URLSearchParams();
    if (state.status !== "all") p.set("status", state.status);
    if (state.q) p.set("q", state.q);
    if (state.page > 1) p.set("page", String(state.page));
    var h = p.toString();
    var url = h ? "#" + h : location.pathname + location.search;
    if (("#" + h) === location.hash || (!h && !location.hash)) return;
    try { history.replaceState(null, "", url); } catch (e) { location.hash = h; }
  }

  function filtered() {
    var key = state.status + "\u0000" + state.q;
    if (key === viewKey) return view;
    var q = state.q.trim().toLowerCase(), out = [];
    if (q && !haystack) {
      haystack = new Array(rows.length);
      for (var i = 0; i < rows.length; i++) {
        haystack[i] = (str(rows[i] && rows[i].id) + "\n" + str(rows[i] && rows[i].prompt)).toLowerCase();
      }
    }
    for (var j = 0; j < rows.length; j++) {
      if (state.status !== "all" && statusOf(rows[j]) !== state.status) continue;
      if (q && haystack[j].indexOf(q) < 0) continue;
      out.push(rows[j]);
    }
    view = out; viewKey = key;
    return out;
  }

  function card(r) {
    var status = statusOf(r);
    var images = Array.isArray(r.images) ? r.images : [];
    var c = el("article", "card");
    c.setAttribute("data-row", str(r.row));
    c.setAttribute("data-status", status);
    var id = str(r.id), prompt = str(r.prompt);
    var first = images.length ? href(images[0]) : null;
    var thumb;
    if (first) {
      thumb = el("a", "thumb");
      thumb.setAttribute("href", first);
      thumb.setAttribute("target", "_blank");
      thumb.setAttribute("rel", "noopener");
      thumb.setAttribute("data-lightbox", "");
      var img = el("img");
      img.setAttribute("loading", "lazy");
      img.setAttribute("alt", id || prompt.slice(0, 120));
      img.setAttribute("src", first);
      thumb.appendChild(img);
      if (images.length > 1) thumb.appendChild(el("span", "count", images.length + " images"));
    } else {
      thumb = el("div", "thumb empty");
      thumb.innerHTML = '<svg viewBox="0 0 24 24" aria-hidden="true"><rect x="3" y="4" width="18" height="16" ' +
        'rx="2"/><path d="M3 16l5-5 4 4 3-3 6 6"/><circle cx="16" cy="9" r="1.5"/></svg>';
      thumb.appendChild(el("span", "", "No image"));
    }
    c.appendChild(thumb);

    var b = el("div", "cb");
    var l1 = el("div", "l1");
    l1.appendChild(el("span", "rowno", "#" + str(r.row)));
    var cid = el("span", "cid mono", id || "—");
    cid.setAttribute("title", id);
    l1.appendChild(cid);
    l1.appendChild(el("span", "pill " + status, LABEL[status] || status));
    b.appendChild(l1);

    var p = el("p", prompt ? "prompt" : "prompt none", prompt || "no prompt");
    if (prompt) p.setAttribute("title", prompt);
    b.appendChild(p);

    if (status !== "succeeded" && r.error) {
      var e = el("div", "err " + status);
      var et = str(r.error.type), em = str(r.error.message);
      if (et) e.appendChild(el("b", "", et + (em ? ": " : "")));
      e.appendChild(document.createTextNode(em));
      e.setAttribute("title", (et ? et + ": " : "") + em);
      b.appendChild(e);
    }
    if (images.length > 1) {
      var x = el("div", "extra");
      x.appendChild(el("span", "", "More:"));
      for (var k = 1; k < images.length; k++) {
        var u = href(images[k]);
        if (!u) continue;
        var a = el("a", "", "image " + (k + 1));
        a.setAttribute("href", u);
        a.setAttribute("target", "_blank");
        a.setAttribute("rel", "noopener");
        a.setAttribute("data-lightbox", "");
        x.appendChild(a);
      }
      b.appendChild(x);
    }
    var m = el("div", "meta");
    var local = r.backend === "local";
    var eng = (local ? ["local ComfyUI", str(r.workflow)] : ["cloud", str(r.provider), str(r.model)])
      .filter(Boolean).join(" · ");
    if (eng) m.appendChild(el("span", "backend", eng));
    if (local && r.prompt_id) m.appendChild(el("span", "mono", "prompt " + str(r.prompt_id)));
    if (local && Number(r.gpu_seconds) > 0) m.appendChild(el("span", "", Number(r.gpu_seconds).toFixed(1) + " GPU s"));
    var tries = Number(r.attempts);
    if (tries > 1) m.appendChild(el("span", "", tries + " attempts"));
    var cs = cost(r.cost);
    if (cs) m.appendChild(el("span", "c", cs));
    if (m.childNodes.length) b.appendChild(m);
    c.appendChild(b);
    c._row = r;
    return c;
  }

  function render() {
    var list = filtered();
    var pages = Math.max(1, Math.ceil(list.length / PAGE));
    if (state.page > pages) state.page = pages;
    var start = (state.page - 1) * PAGE, end = Math.min(start + PAGE, list.length);
    var frag = document.createDocumentFragment();
    for (var i = start; i < end; i++) frag.appendChild(card(list[i]));
    grid.textContent = "";
    grid.appendChild(frag);
    empty.hidden = list.length > 0;
    var n = function (x) { return x.toLocaleString("en-US"); };
    shown.textContent = !list.length ? "0 matching rows" : "Showing " + n(start + 1) + "–" + n(end) + " of " +
      n(list.length) + (list.length === rows.length ? " rows" : " matching rows");
    Array.prototype.forEach.call(pagers, function (nav) {
      nav.textContent = "";
      var prev = el("button", "prev", "‹ Previous"), next = el("button", "next", "Next ›");
      prev.type = next.type = "button";
      prev.disabled = state.page <= 1;
      next.disabled = state.page >= pages;
      prev.addEventListener("click", function () { go(state.page - 1, nav); });
      next.addEventListener("click", function () { go(state.page + 1, nav); });
      nav.appendChild(prev);
      nav.appendChild(el("span", "pos", "Page " + state.page + " of " + pages));
      nav.appendChild(next);
    });
    Array.prototype.forEach.call(filters.children, function (b) {
      b.setAttribute("aria-pressed", b.getAttribute("data-status") === state.status ? "true" : "false");
    });
    if (input.value !== state.q && document.activeElement !== input) input.value = state.q;
  }
  function go(page, from) {
    state.page = page;
    commit();
    if (from && from.parentNode.classList.contains("bottom")) browser.scrollIntoView();
  }
  function commit() { writeHash(); render(); }

  var timer = null;
  input.addEventListener("input", function () {
    clearTimeout(timer);
    timer = setTimeout(function () { state.q = input.value; state.page = 1; commit(); }, 150);
  });
  document.getElementById("clear").addEventListener("click", function () {
    state = {status: "all", q: "", page: 1};
    input.value = "";
    commit();
  });
  window.addEventListener("hashchange", function () { readHash(); render(); });

  // Lightbox: a plain click on a thumbnail shows the full image; other clicks open it as a link.
  var lb = document.getElementById("lightbox"), lbImg = document.getElementById("lb-img");
  var lbCap = document.getElementById("lb-cap"), lbOpen = document.getElementById("lb-open");
  function closeLb() { lb.hidden = true; lbImg.removeAttribute("src"); }
  grid.addEventListener("click", function (ev) {
    var a = ev.target.closest && ev.target.closest("a[data-lightbox]");
    if (!a || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
    ev.preventDefault();
    var c = a.closest(".card"), r = (c && c._row) || {};
    lbImg.setAttribute("src", a.getAttribute("href"));
    lbImg.setAttribute("alt", str(r.id));
    lbOpen.setAttribute("href", a.getAttribute("href"));
    lbCap.textContent = [str(r.id), str(r.prompt)].filter(Boolean).join(" — ");
    lb.hidden = false;
  });
  lb.addEventListener("click", function (ev) {
    if (ev.target === lb || ev.target.id === "lb-close") closeLb();
  });
  document.addEventListener("keydown", function (ev) { if (ev.key === "Escape" && !lb.hidden) closeLb(); });

  readHash();
  input.value = state.q;
  browser.hidden = false;
  render();
})();
"""

_TAIL = f"</script><script>{_JS}</script></body></html>\n"
