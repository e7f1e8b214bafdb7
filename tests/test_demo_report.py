"""The demo's HTML report (scripts/demo_report.py): self-contained, and it renders in headless Chromium with every
stage section present and every image decoded (skipped where no Chromium is installed)."""

from __future__ import annotations

import base64
import importlib.util
import struct
import sys
import zlib
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("demo_report", Path(__file__).parents[1] / "scripts" / "demo_report.py")
demo_report = importlib.util.module_from_spec(_SPEC)
sys.modules["demo_report"] = demo_report  # dataclasses resolve the module's annotations through sys.modules
_SPEC.loader.exec_module(demo_report)


def tiny_png(path: Path, width: int = 3, height: int = 2) -> Path:
    """A valid RGB PNG written by hand (no image library needed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    path.write_bytes(png)
    return path


def made_up_stages(tmp_path: Path, png: Path) -> list:
    fine = demo_report.StageResult("finetune", "LoRA on extract_json", seconds=61.5)
    fine.numbers.update({"base exact match": "0.0%", "tuned exact match": "93.8%", "steps": 12})
    fine.table("loss", ["step", "loss"], [[1, 0.47], [12, 0.02]])
    fine.image("training curve", png)
    fine.image("a plot that was never written", tmp_path / "missing.png")  # left out, not a broken <img>
    serve = demo_report.StageResult("serve", seconds=20.25)
    serve.lines += ["user> What is the capital of France? <script>", "assistant> Paris"]
    gguf = demo_report.StageResult("gguf", seconds=3.0, status="skipped", note="llama.cpp's library is not built")
    return [fine, serve, gguf]


def test_report_is_one_self_contained_file(tmp_path):
    png = tiny_png(tmp_path / "curve.png")
    stages = made_up_stages(tmp_path, png)
    out = demo_report.write_report(stages, tmp_path / "report.html", intro=["made-up numbers"])
    page = out.read_text()
    assert page.count("<img ") == 1
    assert "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode() in page
    assert "src='http" not in page and 'src="http' not in page and "<link" not in page
    for name in ("finetune", "serve", "gguf", "times"):
        assert f"id='stage-{name}'" in page
    assert "&lt;script&gt;" in page  # stage text is escaped, not run
    assert "84.8" in page  # the total of the stage times (61.5 + 20.25 + 3.0), in the times table
    assert "llama.cpp&#x27;s library is not built" in page


def test_report_renders_in_headless_chromium(tmp_path):
    if demo_report.find_chromium() is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium): the render check needs a browser")
    stages = made_up_stages(tmp_path, tiny_png(tmp_path / "curve.png"))
    out = demo_report.write_report(stages, tmp_path / "report.html")
    summary = demo_report.check_renders(out, [s.name for s in stages])
    assert "images decoded 1/1" in summary


def test_render_check_fails_on_a_broken_image_and_a_missing_section(tmp_path):
    if demo_report.find_chromium() is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium): the render check needs a browser")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    stage = demo_report.StageResult("chat", seconds=1.0)
    stage.image("broken", bad)
    out = demo_report.write_report([stage], tmp_path / "report.html")
    with pytest.raises(RuntimeError, match=r"only 0 of 1 images decoded"):
        demo_report.check_renders(out, ["chat"])
    with pytest.raises(RuntimeError, match=r"missing sections: serve"):
        demo_report.check_renders(out, ["chat", "serve"])
