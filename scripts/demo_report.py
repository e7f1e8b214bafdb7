"""The demo's HTML report: one self-contained page (PNGs inlined as base64 data URIs, no external resources) with a
table of stage times and one section per stage holding its numbers, tables and plots; and a headless-Chromium check
that the page renders and its images decode.

This module knows nothing about slimlm: the demo's stages fill `StageResult`s, `write_report` turns them into HTML.
It is not part of the slimlm package (scripts/demo.py and tests/test_demo_report.py import it by path).
"""

from __future__ import annotations

import base64
import html
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Table:
    """A small table: a title, column names, and rows of cells (any value; floats are shown as given)."""

    title: str
    header: list[str]
    rows: list[list[Any]]


@dataclass
class StageResult:
    """What one demo stage did: its name, wall time, status, and the numbers, tables, plots and text it produced."""

    name: str
    title: str = ""  # one line: what the stage shows
    seconds: float = 0.0
    status: str = "ok"  # ok | skipped | failed
    note: str = ""  # why it was skipped, or the error it failed with
    numbers: dict[str, Any] = field(default_factory=dict)  # headline numbers, label -> value
    tables: list[Table] = field(default_factory=list)
    images: list[tuple[str, Path]] = field(default_factory=list)  # (caption, PNG file)
    lines: list[str] = field(default_factory=list)  # free text: requests and answers, commands, notes

    def table(self, title: str, header: list[str], rows: list[list[Any]]) -> None:
        self.tables.append(Table(title, header, rows))

    def image(self, caption: str, png: str | Path) -> None:
        """Attach a PNG if it exists (a stage whose plot was not written still reports its numbers)."""
        if Path(png).is_file():
            self.images.append((caption, Path(png)))


# The page writes into its own title whether every <img> decoded: `check_renders` reads it back from --dump-dom.
_CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.title = "images decoded " + ok + "/" + imgs.length;
  document.body.setAttribute("data-images-ok", ok === imgs.length ? "yes" : "no");
});
</script>"""

_STYLE = """<style>
body { font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
section { border-top: 2px solid #ddd; margin-top: 1.5em; }
.skipped { color: #a60; } .failed { color: #b00; font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; } figcaption { font-size: 0.9em; color: #555; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; white-space: pre-wrap; }
</style>"""


def write_report(
    stages: list[StageResult], out: Path, title: str = "slimlm demo", intro: list[str] | None = None
) -> Path:
    """Write the report of a demo run to `out` (one HTML file) and return its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    total = sum(s.seconds for s in stages)
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(title)}</title>",
        _STYLE,
        "</head><body>",
        f"<h1>{_e(title)}</h1>",
    ]
    parts += [f"<p>{_e(line)}</p>" for line in intro or []]
    parts.append(f"<p>Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {len(stages)} stages, {total:.0f} s in all.</p>")
    parts.append(_times_table(stages, total))
    parts += [_stage_section(s) for s in stages]
    parts += [_CHECK_SCRIPT, "</body></html>"]
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def _times_table(stages: list[StageResult], total: float) -> str:
    rows = [
        [
            f"<a href='#stage-{_slug(s.name)}'>{_e(s.name)}</a>",
            _status(s),
            f"{s.seconds:.1f}",
            f"{100 * s.seconds / total:.0f}%" if total else "-",
        ]
        for s in stages
    ]
    rows.append(["<b>total</b>", "", f"<b>{total:.1f}</b>", ""])
    return "<h2 id='stage-times'>Stage times</h2>" + _table_html(
        ["stage", "status", "seconds", "share"], rows, escape=False
    )


def _stage_section(s: StageResult) -> str:
    parts = [f"<section id='stage-{_slug(s.name)}'>", f"<h2>{_e(s.name)} <small>({s.seconds:.1f} s)</small></h2>"]
    if s.title:
        parts.append(f"<p>{_e(s.title)}</p>")
    if s.status != "ok":
        parts.append(f"<p class='{_e(s.status)}'>{_e(s.status)}: {_e(s.note)}</p>")
    if s.numbers:
        parts.append(_table_html(["number", "value"], [[k, _fmt(v)] for k, v in s.numbers.items()]))
    for t in s.tables:
        parts.append(f"<h3>{_e(t.title)}</h3>" + _table_html(t.header, [[_fmt(c) for c in r] for r in t.rows]))
    for caption, png in s.images:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        parts.append(
            f"<figure><img alt='{_e(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )
    if s.lines:
        parts.append("<pre>" + _e("\n".join(s.lines)) + "</pre>")
    parts.append("</section>")
    return "\n".join(parts)


def _table_html(header: list[str], rows: list[list[Any]], escape: bool = True) -> str:
    def cell(v: Any) -> str:
        text = _e(str(v)) if escape else str(v)
        return f"<td class='num'>{text}</td>" if _is_number(str(v)) else f"<td>{text}</td>"

    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _status(s: StageResult) -> str:
    return f"<span class='{_e(s.status)}'>{_e(s.status)}</span>"


def _is_number(text: str) -> bool:
    return re.fullmatch(r"[-+]?[\d,]*\.?\d+(e[-+]?\d+)?%?", text.strip()) is not None


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def bar_chart(path: Path, title: str, labels: list[str], values: list[float], unit: str) -> Path | None:
    """A horizontal bar chart PNG (e.g. decode tok/s per runtime); None where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(labels) + 1.2))
    bars = ax.barh(labels, values, color="#4a7bb7")
    ax.bar_label(bars, fmt="%.1f", padding=3)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def find_chromium() -> str | None:
    """The headless browser used by `check_renders`: Debian's chromium, or another Chrome on PATH."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def check_renders(report: Path, sections: list[str], timeout: float = 120) -> str:
    """Load the report in headless Chromium and check the DOM: every stage section is there and every image decoded.

    Returns a one-line summary; raises RuntimeError naming what is wrong (FileNotFoundError if no Chromium).
    """
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="slimlm-chromium-") as profile:
        # a throwaway profile: concurrent runs (a test and a demo) must not share Chromium's profile lock
        proc = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=5000",
                "--dump-dom",
                Path(report).resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    dom = proc.stdout
    if proc.returncode != 0 or "<body" not in dom:
        raise RuntimeError(f"chromium exited with status {proc.returncode}: {proc.stderr.strip()[-500:]}")
    missing = [name for name in sections if f'id="stage-{_slug(name)}"' not in dom]
    found = re.search(r"<title>images decoded (\d+)/(\d+)</title>", dom)
    problems = [f"missing sections: {', '.join(missing)}"] if missing else []
    if found is None:
        problems.append("the page's load script did not run (title not rewritten)")
    elif found.group(1) != found.group(2):
        problems.append(f"only {found.group(1)} of {found.group(2)} images decoded")
    if problems:
        raise RuntimeError(f"{report} does not render as expected: " + "; ".join(problems))
    return (
        f"rendered in headless Chromium: {len(sections)} stage sections, images decoded {found.group(1)}/"
        f"{found.group(2)}"
    )
