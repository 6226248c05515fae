"""The docs against the code: every module has its room in docs/architecture.md, every helper command
its row, and docs/faults.md lists exactly the fault tests."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs/architecture.md").read_text()
HELPER = (ROOT / "elements/imagetool-node/static/usr/lib/imagetool/imagetool-node").read_text()


def test_every_module_is_on_the_map() -> None:
    for package in ("imagetool", "rollout", "imagetool/lab", "imagetool/cli"):
        for path in sorted((ROOT / package).glob("*.py")):
            if path.name in ("__init__.py", "__main__.py"):
                continue
            name = path.stem
            assert f"`{name}.py`" in DOC or f"`{name}`" in DOC, f"{package}/{path.name} is not in docs/architecture.md"


def test_the_protocol_table_lists_exactly_the_helpers_commands() -> None:
    commands = set(re.findall(r'sub\.add_parser\("([a-z-]+)"\)', HELPER))
    rows = set(re.findall(r"^\| `([a-z-]+)[ `]", DOC, re.MULTILINE))
    assert commands, "no commands found in the helper"
    assert commands - rows == set(), "helper commands missing from the protocol table"
    files_and_modules = {r for r in rows if r not in commands and ("/" in r or r.endswith(".py"))}
    assert rows - commands - files_and_modules == set(), "the protocol table names commands the helper lacks"


def test_the_fault_matrix_is_the_tests_own() -> None:
    from tests.faults import matrix, table

    doc = (ROOT / "docs/faults.md").read_text()
    documented = re.search(r"<!-- fault-matrix:start[^>]*-->\n(.*)<!-- fault-matrix:end -->", doc, re.DOTALL)
    assert documented, "docs/faults.md lost its fault-matrix markers"
    rows = matrix()
    assert documented.group(1) == table(rows), "docs/faults.md differs from the tests: run `python -m tests.faults`"
    assert len({r["scenario"] for r in rows}) == len(rows), "two tests claim the same scenario"
    assert len(rows) >= 30
    assert all(r["runs_on"] in ("lab", "vm") for r in rows), "a fault scenario must run on real nodes"
