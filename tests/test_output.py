"""The output contract of the command line: --json on every command, JSON error objects, -q/-v,
plain progress lines in logs, status exit codes, a node without its helper, binary units.

Commands that touch nodes run against local machines (rollout.local: the real node helper against
directories), reached through the inventory the way production reaches them over SSH."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from imagetool.cli import main
from imagetool.cli.common import NORMAL, verbosity
from imagetool.cli.view import LiveView, _Speed
from imagetool.errors import HelperMissingError
from imagetool.store import StoredRelease
from imagetool.units import human_bytes
from rollout.local import LocalMachine, local_nodes
from rollout.node import HELPER_PATH, HelperNode
from rollout.update import Rollout
from tests.local_fleet import NEW, OLD, Fleet, fast_boot_polls, fleet, machine, options, release, state  # noqa: F401 - fixtures

# Groups only dispatch to their commands; --json belongs to the commands that do something.
GROUPS_WITHOUT_JSON = {"", "images", "lab"}


@pytest.fixture(autouse=True)
def normal_output() -> Iterator[None]:
    # -v attaches a log handler for its run; a test calling views directly starts from NORMAL.
    verbosity.set(NORMAL)
    yield
    verbosity.set(NORMAL)


def commands(group: click.Group = main, prefix: str = "") -> dict[str, click.Command]:
    """Every command in click's tree, by its path ("lab reset"); groups included."""
    found: dict[str, click.Command] = {prefix: group}
    for name, cmd in group.commands.items():
        path = f"{prefix} {name}".strip()
        if isinstance(cmd, click.Group):
            found.update(commands(cmd, path))
        else:
            found[path] = cmd
    return found


def test_every_command_has_json() -> None:
    tree = commands()
    assert {"keygen", "status", "lab up", "lab down", "lab status", "lab reset", "lab kill", "lab start", "lab cut",
            "lab heal", "lab fill", "lab unfill"} <= set(tree)
    missing = [path for path, cmd in tree.items() if path not in GROUPS_WITHOUT_JSON
               and not any(isinstance(p, click.Option) and "--json" in p.opts for p in cmd.params)]
    assert missing == []
    assert {p.name for p in main.params} >= {"quiet", "verbose"}
    assert set(GROUPS_WITHOUT_JSON) == {path for path, cmd in tree.items() if isinstance(cmd, click.Group)}


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "300", **(env or {})})


def json_out(r: Result) -> object:
    """stdout is exactly one JSON document."""
    return json.loads(r.stdout)


@pytest.fixture
def inventory(tmp_path: Path, fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[HelperNode]]:
    """An inventory of three nodes, reached as the local machines n1..n3 (on OLD)."""
    nodes = fleet(3)
    inv = tmp_path / "inv.yaml"
    inv.write_text("nodes:\n" + "".join(f"  {n.name}: {{host: 10.0.0.{i}}}\n" for i, n in enumerate(nodes, 1)))
    by_name = {n.name: n for n in nodes}
    monkeypatch.setattr("rollout.fleet.ssh_nodes", lambda specs, **kw: [by_name[s.name] for s in specs])
    return inv, nodes


def test_json_from_every_command(tmp_path: Path, release: StoredRelease,
                                 inventory: tuple[Path, list[HelperNode]]) -> None:
    """Each command with --json prints one JSON document: its result, or an error object where it
    cannot run here (lab commands without a lab, build without a release file)."""
    inv = str(inventory[0])
    store = str(release.manifest_path.parent)
    labs = ["--lab", "none", "--lab-dir", str(tmp_path / "labs")]
    fast = ["--health-timeout", "0"]
    runs = {
        "build": ["build", str(tmp_path / "missing.yaml"), "--store", store],
        "keygen": ["keygen", "--private", str(tmp_path / "k.key"), "--public", str(tmp_path / "k.pub")],
        "verify": ["verify", NEW, "--store", store],
        "images list": ["images", "list", "--store", store],
        "images show": ["images", "show", NEW, "--store", store],
        "diff": ["diff", NEW, NEW, "--store", store],
        "disk": ["disk", "web-9.9", "-o", str(tmp_path / "d.raw"), "--store", store],
        "publish": ["publish", NEW, "--to", str(tmp_path / "www"), "--store", store],
        "stage": ["stage", NEW, "-i", inv, "--store", store],
        "plan": ["plan", NEW, "-i", inv, "--store", store],
        "rollout": ["rollout", NEW, "-i", inv, "--store", store, "--batch", "3", *fast],
        "rollback": ["rollback", "-i", inv, "--limit", "n1", *fast],
        "gc": ["gc", "-i", inv],
        "history": ["history"],
        "approve": ["approve", "no-such-rollout"],
        "report": ["report", "no-such-rollout", "-o", str(tmp_path / "report.html")],
        "status": ["status", "-i", inv],
        "lab up": ["lab", "up", "--release", "web-9.9", "--store", store, *labs],
        "lab status": ["lab", "status", *labs],
        "lab down": ["lab", "down", *labs],
        "lab fill": ["lab", "fill", "node1", *labs],
        **{f"lab {a}": ["lab", a, "node1", *labs] for a in ("reset", "kill", "start", "cut", "heal", "unfill")},
    }
    assert set(runs) == set(commands()) - GROUPS_WITHOUT_JSON, "a new command needs a run here"
    env = {"IMAGETOOL_STATE_DIR": str(tmp_path / "state")}
    for path, args in runs.items():
        r = invoke(*args, "--json", env=env)
        doc = json_out(r)
        if r.exit_code == 0:
            assert not (isinstance(doc, dict) and "error" in doc), (path, doc)
        else:
            assert isinstance(doc, dict) and doc["error"]["code"] == r.exit_code, (path, r.output)
            assert doc["error"]["message"] in r.stderr, path
    assert "no lab named 'none'" in invoke("lab", "reset", "node1", *labs, "--json").stderr
    # The lab's node commands name the node their error is about.
    (tmp_path / "labs/empty").mkdir(parents=True)
    (tmp_path / "labs/empty/lab.json").write_text(json.dumps(
        {"name": "empty", "subnet": "10.250.9.0/24", "bridge": "itb9", "gateway": "10.250.9.1", "release": NEW}))
    for action in ("reset", "fill"):
        r = invoke("lab", action, "node1", "--lab", "empty", "--lab-dir", str(tmp_path / "labs"), "--json")
        assert r.exit_code == 2
        assert json_out(r) == {"error": {"code": 2, "kind": "not-found", "nodes": ["node1"],
                                         "message": "lab empty has no node 'node1' (nodes: )"}}


def test_json_error_for_bad_input() -> None:
    r = invoke("rollout", "--json")
    assert r.exit_code == 2
    assert json_out(r) == {"error": {"code": 2, "kind": "usage", "message": "Missing argument 'RELEASE'.", "nodes": []}}
    assert "Missing argument 'RELEASE'" in r.stderr  # click's own usage message, as without --json
    r = invoke("status", "--json", "--parallel", "0", "-i", "x.yaml")
    assert r.exit_code == 2 and json_out(r)["error"]["kind"] == "usage"  # type: ignore[index]
    assert "--parallel" in json_out(r)["error"]["message"]  # type: ignore[index]
    r = invoke("rollout", "--no-such-option")
    assert r.exit_code == 2 and r.stdout == ""  # no --json, no JSON


def test_json_error_for_an_unknown_release(tmp_path: Path, release: StoredRelease) -> None:
    r = invoke("verify", "web-7.7", "--store", str(release.manifest_path.parent), "--json")
    assert r.exit_code == 2
    error = json_out(r)["error"]  # type: ignore[index]
    assert error["kind"] == "not-found" and "web-7.7" in error["message"] and error["nodes"] == []
    assert "error: " in r.stderr and "web-7.7" in r.stderr


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_json_error_for_an_unreachable_node(tmp_path: Path, release: StoredRelease) -> None:
    """Real SSH to 127.0.0.1 on a port nobody listens on: refused at once, exit 4."""
    inv = tmp_path / "inv.yaml"
    inv.write_text(f"nodes:\n  far: {{host: 127.0.0.1, port: {closed_port()}}}\n")
    r = invoke("status", "-i", str(inv), "--json")
    assert r.exit_code == 4, r.output
    doc = json_out(r)
    assert doc["error"]["kind"] == "unreachable" and doc["error"]["nodes"] == ["far"]  # type: ignore[index]
    assert "connection refused" in doc["error"]["message"]  # type: ignore[index]
    assert doc["nodes"][0]["unreachable"] is True  # type: ignore[index]  # the result is in the same document

    r = invoke("stage", release.id, "-i", str(inv), "--store", str(release.manifest_path.parent), "--json")
    assert r.exit_code == 4
    doc = json_out(r)
    assert doc["error"]["nodes"] == ["far"] and doc["nodes"][0]["outcome"] == "failed"  # type: ignore[index]

    r = invoke("rollout", release.id, "-i", str(inv), "--store", str(release.manifest_path.parent), "--json",
               env={"IMAGETOOL_STATE_DIR": str(tmp_path / "state")})
    assert r.exit_code == 4
    assert json_out(r)["error"] == {  # type: ignore[index]
        "code": 4, "kind": "unreachable", "nodes": ["far"], "message": json_out(r)["error"]["message"]}  # type: ignore[index]


def test_a_failed_rollout_has_its_result_and_the_error_in_one_document(
        release: StoredRelease, inventory: tuple[Path, list[HelperNode]], tmp_path: Path) -> None:
    inv, nodes = inventory
    machine(nodes[0]).system_state[NEW] = "degraded"
    r = invoke("rollout", NEW, "-i", str(inv), "--store", str(release.manifest_path.parent), "--health-timeout", "0",
               "--json", env={"IMAGETOOL_STATE_DIR": str(tmp_path / "state")})
    assert r.exit_code == 3
    doc = json_out(r)
    assert doc["exit_code"] == 3 and doc["error"]["kind"] == "rollout-failed"  # type: ignore[index]
    assert doc["error"]["nodes"] == ["n1", "n2", "n3"]  # type: ignore[index]  # canary rolled back, others not started
    assert [n["outcome"] for n in doc["nodes"]] == ["rolled-back", "not-started", "not-started"]  # type: ignore[index]


# --- -q / -v ----------------------------------------------------------------------------------------------


def test_quiet_verbose_and_normal(release: StoredRelease, inventory: tuple[Path, list[HelperNode]],
                                  tmp_path: Path) -> None:
    inv, _ = inventory
    env = {"IMAGETOOL_STATE_DIR": str(tmp_path / "state")}
    rollout = ["rollout", NEW, "-i", str(inv), "--store", str(release.manifest_path.parent), "--health-timeout", "0"]

    quiet = invoke("-q", *rollout, "--batch", "1", env=env)
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout == ""  # no table
    [summary] = quiet.stderr.splitlines()
    assert summary.startswith("3 done in ") and "KiB (100.0%) sent; journal: imagetool history" in summary

    again = invoke("-q", *rollout, "--json", env=env)
    assert again.exit_code == 0 and again.stderr == ""
    assert [n["outcome"] for n in json_out(again)["nodes"]] == ["skipped"] * 3  # type: ignore[index]

    normal = invoke("status", "-i", str(inv))
    assert normal.exit_code == 0 and "healthy" in normal.stdout and "debug:" not in normal.stderr
    assert normal.stderr.splitlines()[-1] == "3 nodes: 3 healthy"

    verbose = invoke("-v", "status", "-i", str(inv), "--limit", "n2")
    assert verbose.exit_code == 0, verbose.output
    assert "debug: node n2: imagetool-node status: exit status 0 in " in verbose.stderr
    assert "debug: node n2: imagetool-node health" in verbose.stderr

    quiet_status = invoke("-q", "status", "-i", str(inv))
    assert quiet_status.stdout == "" and quiet_status.stderr == "3 nodes: 3 healthy\n"

    both = invoke("-q", "-v", "status", "-i", str(inv), "--json")
    assert both.exit_code == 2 and json_out(both)["error"]["kind"] == "usage"  # type: ignore[index]


def test_quiet_json_errors_say_nothing_on_stderr(release: StoredRelease) -> None:
    r = invoke("-q", "verify", "web-7.7", "--store", str(release.manifest_path.parent), "--json")
    assert r.exit_code == 2 and r.stderr == "" and json_out(r)["error"]["kind"] == "not-found"  # type: ignore[index]
    r = invoke("-q", "verify", "web-7.7", "--store", str(release.manifest_path.parent))
    assert r.exit_code == 2 and r.stderr.startswith("error: ")  # errors are never quiet without --json


# --- progress in logs -----------------------------------------------------------------------------------------


def test_progress_lines_when_stderr_is_not_a_terminal(release: StoredRelease, fleet: Fleet,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A real rollout's events drive the view: a line per event, a stage line as each node is
    staged, and while nothing happens (the pause between batches) a heartbeat line."""
    monkeypatch.setattr("imagetool.cli.common.PROGRESS_INTERVAL", 0.05)
    nodes = fleet(3)
    with LiveView([n.name for n in nodes], f"rollout {NEW}") as view:
        result = Rollout(nodes, options(batches="1,2", pause=0.5), events=view.event, progress=view).run(release)
    assert result.exit_code == 0
    err = capsys.readouterr().err
    lines = err.splitlines()
    size = human_bytes(3 * release.manifest.image.size)
    assert any(line.endswith(f"stage: 3/3 nodes, {size} of {size}, " + line.rsplit(", ", 1)[-1])
               and line.endswith("/s") for line in lines), err
    assert any("stage: 1/3 nodes, " in line for line in lines)
    assert any("n1" in line and "batch" in line and "1/2 (canary)" in line for line in lines)
    assert any("*" in line and "pausing 0.5s before batch 2" in line for line in lines)
    # Heartbeats during the pause: where every node is.
    assert any(f"rollout {NEW}: " in line and "1 done" in line for line in lines), err
    assert "MB" not in err and "kB" not in err


def test_progress_is_silent_with_quiet(release: StoredRelease, fleet: Fleet, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("imagetool.cli.common.PROGRESS_INTERVAL", 0.05)
    verbosity.set(0)
    nodes = fleet(2)
    with LiveView([n.name for n in nodes], "rollout") as view:
        Rollout(nodes, options(pause=0.2), events=view.event, progress=view).run(release)
    assert capsys.readouterr().err == ""


def test_stage_command_progress_lines(release: StoredRelease, inventory: tuple[Path, list[HelperNode]]) -> None:
    inv, _ = inventory
    r = invoke("stage", NEW, "-i", str(inv), "--store", str(release.manifest_path.parent))
    assert r.exit_code == 0, r.output
    assert f"staged, {human_bytes(r_bytes(release))}" in r.stderr
    size = human_bytes(3 * release.manifest.image.size)
    assert f"stage: 3/3 nodes, {size} of {size}, " in r.stderr
    total = human_bytes(3 * r_bytes(release))
    assert r.stderr.splitlines()[-1] == f"stage {NEW}: 3 staged, {total} of {total} (100.0%) sent"


def r_bytes(release: StoredRelease) -> int:
    """What staging a release sends one node: image and manifest."""
    return release.manifest.image.size + release.manifest_path.stat().st_size


# --- status exit codes ------------------------------------------------------------------------------------------


def test_status_exit_codes(inventory: tuple[Path, list[HelperNode]]) -> None:
    inv, nodes = inventory
    assert invoke("status", "-i", str(inv)).exit_code == 0

    machine(nodes[1]).system_state[OLD] = "degraded"
    machine(nodes[1]).reset()
    r = invoke("status", "-i", str(inv), "--json")
    assert r.exit_code == 3
    assert json_out(r)["error"]["kind"] == "unhealthy" and json_out(r)["error"]["nodes"] == ["n2"]  # type: ignore[index]
    assert invoke("status", "-i", str(inv), "--no-health").exit_code == 0  # no health asked, none judged

    machine(nodes[2]).network_cut = True
    r = invoke("status", "-i", str(inv))
    assert r.exit_code == 4, r.output  # unreachable wins over unhealthy
    assert "n3" in r.stderr and "unreachable" in r.stdout
    assert r.stderr.splitlines()[-2] == "3 nodes: 1 healthy, 1 unhealthy, 1 unreachable"


# --- a node without its helper ------------------------------------------------------------------------------


def test_a_node_without_the_helper_is_reported_as_such(tmp_path: Path, release: StoredRelease,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The node is up and its shell answers, but `imagetool-node: not found` (exit 127): reported
    as a missing helper, not as "unreachable"."""
    m = LocalMachine(tmp_path / "bare", helper=tmp_path / "no-such-helper")
    m.install_release(release, commit=True)
    m.power_on()
    try:
        [node] = local_nodes([m])
        with pytest.raises(HelperMissingError, match=f"node bare: node helper missing at {HELPER_PATH}.*install the "
                                                     "node from an imagetool image"):
            node.status()

        inv = tmp_path / "inv.yaml"
        inv.write_text("nodes:\n  bare: {host: 10.0.0.9}\n")
        monkeypatch.setattr("rollout.fleet.ssh_nodes", lambda specs, **kw: [node])
        r = invoke("status", "-i", str(inv), "--json")
        assert r.exit_code == 1
        error = json_out(r)["error"]  # type: ignore[index]
        assert error["kind"] == "helper-missing" and error["nodes"] == ["bare"]
        assert "unreachable" not in error["message"] and "node helper missing" in error["message"]
        r = invoke("status", "-i", str(inv))
        assert "helper missing" in r.stdout and "unreachable" not in r.output
    finally:
        m.power_off()


# --- units ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "text"), [(None, "-"), (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
                                         (1536, "1.5 KiB"), (748 * 1024**2, "748.0 MiB"), (3 * 1024**3, "3.0 GiB"),
                                         (2 * 1024**5, "2048.0 TiB")])
def test_human_bytes_is_binary(n: int | None, text: str) -> None:
    assert human_bytes(n) == text


def test_terminal_transfer_display_is_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a terminal the live view's transfer columns count in MiB, as everything else does."""
    import io
    import re

    from rich.console import Console

    buf = io.StringIO()
    monkeypatch.setattr("imagetool.cli.view.console", Console(file=buf, force_terminal=True, width=160))
    view = LiveView(["n1"], "stage")
    assert view.interactive
    with view:
        view.stage_start("n1", 3 * 1024**2)
        view.stage_advance("n1", 1024**2)
        view.stage_advance("n1", 2 * 1024**2)
        view.live.refresh()
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buf.getvalue())
    assert "2.0/3.0 MiB" in text and "MB" not in text
    task = view.progress.tasks[0]
    task.finished_speed = 1.5 * 1024**2
    assert _Speed().render(task).plain == "1.5 MiB/s"
