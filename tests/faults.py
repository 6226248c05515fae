"""The fault matrix: each test marked `fault(scenario, end_state)` is one fault scenario, run for real.

    python -m tests.faults            prints the matrix as the Markdown table docs/faults.md carries
    python -m tests.faults --json     ... as JSON (what tests/test_docs.py compares against the docs)

The table is made from the tests' own markers, so a scenario cannot be listed without a test, and a
test cannot prove a scenario the table does not list.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def fault(scenario: str, end_state: str) -> pytest.MarkDecorator:
    """Mark a test (or one pytest.param) as the proof of one fault scenario."""
    return pytest.mark.fault(scenario, end_state)


class _Collector:
    def __init__(self) -> None:
        self.rows: list[dict[str, str]] = []

    def pytest_collection_modifyitems(self, items) -> None:
        for item in items:
            mark = item.get_closest_marker("fault")
            if mark is None:
                continue
            where = "vm" if item.get_closest_marker("vm") else "lab" if item.get_closest_marker("lab") else "local"
            self.rows.append({"scenario": mark.args[0], "end_state": mark.args[1], "test": item.nodeid,
                              "runs_on": where})


def matrix() -> list[dict[str, str]]:
    """Every fault-marked test of the suite, in collection order (file order, then test order)."""
    collector = _Collector()
    with contextlib.redirect_stdout(io.StringIO()):
        code = pytest.main(["--collect-only", "-qq", "-p", "no:cacheprovider", str(REPO / "tests")],
                           plugins=[collector])
    if code != 0:
        raise RuntimeError(f"collecting the tests failed (pytest exit {code})")
    return collector.rows


def table(rows: list[dict[str, str]]) -> str:
    lines = ["| # | Fault | Expected end state | Runs on | Test |", "|---|---|---|---|---|"]
    for i, row in enumerate(rows, 1):
        cells = [str(i), row["scenario"], row["end_state"], row["runs_on"], f"`{row['test']}`"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    rows = matrix()
    sys.stdout.write(json.dumps(rows, indent=2) + "\n" if "--json" in sys.argv[1:] else table(rows))
