"""The docs against the code: every module has its room in docs/architecture.md, every helper command
its row, docs/faults.md lists exactly the fault tests, and the README every environment variable."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs/architecture.md").read_text()
HELPER = (ROOT / "elements/imagetool-node/static/usr/lib/imagetool/imagetool-node").read_text()
README = (ROOT / "README.md").read_text()


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


def string_constants(source: str) -> dict[str, str]:
    """A module's top-level `NAME = "text"` assignments."""
    return {target.id: node.value.value for node in ast.parse(source).body if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            for target in node.targets if isinstance(target, ast.Name)}


def environment_reads(source: str, imported: dict[str, str]) -> set[str | None]:
    """The environment variables a module reads: os.environ.get/setdefault/pop, os.environ[...],
    `in os.environ` and os.getenv, by a literal name or a constant (its own, else one of `imported`),
    and every *_ENV constant of its own (read through a mapping handed over, as choose_accel does).
    None: a read this cannot name."""
    tree = ast.parse(source)
    own = string_constants(source)
    constants = {**imported, **own}
    names: set[str | None] = {value for name, value in own.items() if name.endswith("_ENV")}

    def name_of(node: ast.expr) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return constants.get(node.id) if isinstance(node, ast.Name) else None

    def is_os(node: ast.expr, attr: str) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.value, ast.Name)
                and node.value.id == "os")

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            f = node.func
            if (is_os(f.value, "environ") and f.attr in ("get", "setdefault", "pop")) or is_os(f, "getenv"):
                names.add(name_of(node.args[0]))
        elif isinstance(node, ast.Subscript) and is_os(node.value, "environ"):
            names.add(name_of(node.slice))
        elif isinstance(node, ast.Compare) and any(is_os(c, "environ") for c in node.comparators):
            names.add(name_of(node.left))
    return names


def readme_environment_tables() -> list[list[str]]:
    """The variables named in each table of the README's "Environment variables" section."""
    section = README.split("\n## Environment variables\n", 1)[1].split("\n## ", 1)[0]
    tables: list[list[str]] = []
    previous = ""
    for line in section.splitlines():
        if line.startswith("| variable |") and not previous.startswith("|"):
            tables.append([])
        elif m := re.match(r"^\| `([A-Z_]+)` \|", line):
            tables[-1].append(m.group(1))
        previous = line
    return tables


def test_the_readme_lists_every_environment_variable_the_code_reads() -> None:
    sources = [p for package in ("imagetool", "rollout") for p in sorted((ROOT / package).rglob("*.py"))]
    constants = {k: v for path in sources for k, v in string_constants(path.read_text()).items()}
    read: dict[str, str] = {}
    for path in sources:
        for name in environment_reads(path.read_text(), constants):
            assert name is not None, f"{path.relative_to(ROOT)} reads a variable this test cannot name"
            read.setdefault(name, str(path.relative_to(ROOT)))
    for name in environment_reads(HELPER, {}):
        assert name is not None, "the node helper reads a variable this test cannot name"
        read.setdefault(name, "the node helper")
    # The walk sees constants and mappings handed over, not only literal reads.
    assert {"IMAGETOOL_STORE", "IMAGETOOL_LAB_ACCEL", "IMAGETOOL_STATE_DIR", "IMAGETOOL_NODE_ROOT"} <= set(read)
    documented = readme_environment_tables()[0]
    missing = {name: where for name, where in read.items() if name not in documented}
    assert not missing, f"read by the code, not in README.md's Environment variables table: {missing}"
    assert set(documented) - set(read) == set(), "README.md's first environment table names variables nothing reads"
    assert len(documented) == len(set(documented)), "a variable is listed twice"


def test_the_readme_lists_the_tests_environment_variables() -> None:
    source = "".join(p.read_text() for p in sorted((ROOT / "tests").glob("*.py")))
    read = {n for n in environment_reads(source, {}) if n and n.startswith("IMAGETOOL_TEST_")}
    assert read, "no IMAGETOOL_TEST_* variable found in the tests"
    assert read <= set(readme_environment_tables()[1])
