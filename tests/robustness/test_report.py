"""tests/robustness/report.py: the soak log -> RELIABILITY.md's table."""

from __future__ import annotations

import json

from .report import BEGIN, END, main


def test_report_table_sums_rows_skips_a_cut_line_and_updates_the_section(tmp_path, capsys):
    log = tmp_path / "reliability.jsonl"
    rows = [
        {
            "test": "tests/robustness/test_a.py::test_x",
            "kind": "fuzz: POST /v1/x",
            "tried": 10,
            "failures": 0,
            "statuses": {"200": 4, "400": 6},
            "time": "t",
        },
        {
            "test": "tests/robustness/test_a.py::test_x",
            "kind": "fuzz: POST /v1/x",
            "tried": 5,
            "failures": 1,
            "time": "t",
        },
        {"test": "tests/robustness/test_b.py::test_y", "kind": "kill -9: save | load", "tried": 3, "failures": 0},
    ]
    log.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"test": "cut')
    doc = tmp_path / "RELIABILITY.md"
    doc.write_text(f"# R\n\n{BEGIN}\nold\n{END}\ntail\n")
    assert main([str(log), "--update", str(doc)]) == 1  # a failure was recorded
    out = capsys.readouterr()
    assert "not JSON" in out.err
    assert "| fuzz: POST /v1/x | 15 | 1 | `test_a.py::test_x` |" in out.out
    assert "kill -9: save \\| load" in out.out and "| **all** | **18** | **1** |" in out.out
    text = doc.read_text()
    assert "old" not in text and text.endswith(f"{END}\ntail\n") and "| 15 | 1 |" in text


def test_report_without_a_log_says_what_to_run(tmp_path, capsys):
    assert main([str(tmp_path / "none.jsonl")]) == 2
    assert "make soak" in capsys.readouterr().err
