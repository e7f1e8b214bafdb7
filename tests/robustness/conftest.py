"""Shared by the robustness suite (issue 15): how many tries each test makes, and where it records what it saw.

`make test` runs every test here with small counts; `make soak` sets SLIMLM_SOAK=1, which runs the same tests with
the large counts (and the tests marked `soak`, which only make sense long), and appends one JSON line per test to
runs/reliability.jsonl (or $SLIMLM_RELIABILITY_LOG); tests/robustness/report.py turns that into RELIABILITY.md's table.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

SOAK = os.environ.get("SLIMLM_SOAK", "") not in ("", "0")
LOG = Path(os.environ.get("SLIMLM_RELIABILITY_LOG", "runs/reliability.jsonl"))


def trials(ci: int, soak: int) -> int:
    """How many tries a test makes: `ci` under `make test`, `soak` under `make soak`."""
    return soak if SOAK else ci


def pytest_collection_modifyitems(config, items):
    if SOAK:
        return
    skip = pytest.mark.skip(reason="long run: `make soak` (SLIMLM_SOAK=1)")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def record(request):
    """record(kind=..., tried=N, failures=M, **more): one row of the reliability table for this test.

    `kind` names the class of fault ("fuzz: /v1/chat/completions", "kill -9: save_adapter", ...), `tried` how many
    inputs or trials ran, `failures` how many broke the test's property (the test asserts it is 0). Rows are written
    only under SLIMLM_SOAK (so `make test` leaves no files behind)."""

    def write(kind: str, tried: int, failures: int, **more) -> None:
        if not SOAK:
            return
        LOG.parent.mkdir(parents=True, exist_ok=True)
        row = {
            "test": request.node.nodeid,
            "kind": kind,
            "tried": tried,
            "failures": failures,
            **more,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        with open(LOG, "a") as f:
            f.write(json.dumps(row) + "\n")

    return write
