"""RELIABILITY.md's table from a soak run: `python tests/robustness/report.py runs/reliability.jsonl [--update FILE]`.

Reads the rows the robustness suite's `record` fixture wrote (one JSON object per test: kind, tried, failures,
test, and whatever else the test measured), and prints one Markdown table row per fault class: the inputs or trials
tried, how many broke the test's property (a 5xx, a crash, a lost write, a leak, a broken state), and the test.
Rows of the same class and test (several soak runs appended to one log) are summed. With --update FILE, the table
replaces the part of FILE between the `<!-- reliability-table -->` and `<!-- /reliability-table -->` markers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BEGIN, END = "<!-- reliability-table -->", "<!-- /reliability-table -->"
CORE = ("test", "kind", "tried", "failures", "time")


def read_rows(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:  # a run killed mid-write leaves a cut last line: say so, keep the rest
            print(f"{path}:{n}: skipped a line that is not JSON ({e.msg})", file=sys.stderr)
    return rows


def merge(rows: list[dict]) -> list[dict]:
    """One row per (kind, test), in first-seen order: tried and failures summed, the last run's extras kept."""
    merged: dict[tuple, dict] = {}
    for row in rows:
        key = (row.get("kind", "?"), row.get("test", "?"))
        if key in merged:
            merged[key]["tried"] += row.get("tried", 0)
            merged[key]["failures"] += row.get("failures", 0)
            merged[key]["runs"] += 1
            merged[key]["extra"] = _extra(row)
        else:
            merged[key] = {
                "kind": key[0],
                "test": key[1],
                "tried": row.get("tried", 0),
                "failures": row.get("failures", 0),
                "runs": 1,
                "extra": _extra(row),
            }
    return list(merged.values())


def _extra(row: dict) -> str:
    return "; ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in row.items() if k not in CORE)


def table(rows: list[dict]) -> str:
    lines = ["| Fault class | Inputs / trials | Failures | Test | Measured |", "|---|---:|---:|---|---|"]
    for r in merge(rows):
        test = r["test"].removeprefix("tests/robustness/")
        lines.append(f"| {_cell(r['kind'])} | {r['tried']} | {r['failures']} | `{_cell(test)}` | {_cell(r['extra'])} |")
    total = sum(r.get("tried", 0) for r in rows), sum(r.get("failures", 0) for r in rows)
    lines.append(f"| **all** | **{total[0]}** | **{total[1]}** | | |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def update(file: Path, body: str) -> None:
    text = file.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{file} has no {BEGIN} ... {END} section to replace")
    head, rest = text.split(BEGIN, 1)
    file.write_text(f"{head}{BEGIN}\n{body}\n{END}{rest.split(END, 1)[1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="the JSON-lines log (runs/reliability.jsonl)")
    parser.add_argument("--update", type=Path, metavar="FILE", help="replace the table section in FILE")
    args = parser.parse_args(argv)
    if not args.log.is_file():
        print(
            f"{args.log} does not exist: run `make soak` first (it writes one row per robustness test)", file=sys.stderr
        )
        return 2
    rows = read_rows(args.log)
    if not rows:
        print(f"{args.log} holds no rows", file=sys.stderr)
        return 2
    body = table(rows)
    print(body)
    if args.update:
        update(args.update, body)
        print(f"updated {args.update}", file=sys.stderr)
    return 1 if any(r.get("failures", 0) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
