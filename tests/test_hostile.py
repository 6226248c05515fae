"""Bad input and damaged state met by the controller: refused or reported clearly, never a
traceback, never a command run where nothing should change (issue 11). Local nodes run the real
node helper (rollout.local, tests/local_fleet.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from imagetool.cli import main
from imagetool.errors import InputError, NodeError, VerificationError
from imagetool.store import StoredRelease
from rollout.checks import CheckSpec
from rollout.fleet import fleet_status
from rollout.journal import Journal, list_records, read_record
from rollout.node import CorruptNodeError, NodeStatus
from rollout.stage import stage_all
from rollout.update import Rollout
from tests.local_fleet import NEW, Fleet, actions, fast_boot_polls, fleet, machine, options, release, settle_on  # noqa: F401 - fixtures

STATUS = {"ok": True, "booted": "web-1.0", "default": "web-1.0", "committed": "web-1.0", "boot_id": "b1",
          "images": [{"id": "web-1.0", "size": 10, "sha256": "0" * 64, "mtime": 1}], "free_bytes": 100, "time": 1.0}


# --- what the controller reads from a node -------------------------------------------------------


@pytest.mark.parametrize("change, field", [
    ({"free_bytes": float("nan")}, "free_bytes"),
    ({"free_bytes": -1}, "free_bytes"),
    ({"time": float("inf")}, "time"),
    ({"booted": "[/x]"}, "booted"),
    ({"committed": 7}, "committed"),
    # A lock that is not an object is an unreadable lock (rollout.node._lock_answer) that take-over can break.
    ({"trial": "yes"}, "trial"),
    ({"images": [{"id": "web-1.0", "size": "big"}]}, "images.0.size"),
    ({"images": {"id": "x"}}, "images"),
])
def test_a_damaged_status_answer_is_a_node_error_naming_the_field(change: dict, field: str) -> None:
    with pytest.raises(NodeError, match=rf"node n1: imagetool-node status: {field}: "):
        NodeStatus.from_answer("n1", {**STATUS, **change})
    assert NodeStatus.from_answer("n1", STATUS).free_bytes == 100


def test_a_corrupt_state_file_is_reported_as_corrupt_not_unreachable(fleet: Fleet) -> None:
    [n] = fleet(1)
    machine(n).node_var.state.write_text("[]")
    with pytest.raises(CorruptNodeError, match="state.json is not a JSON object"):
        n.status()
    [report] = fleet_status([n], health=False)
    assert report.status is None and not report.unreachable
    assert "state.json is not a JSON object" in (report.error or "")


def test_a_node_side_sha256_mismatch_is_a_verification_error(release: StoredRelease, fleet: Fleet) -> None:
    [n] = fleet(1)
    data = bytearray(release.squashfs_path.read_bytes())
    data[10] ^= 0xFF  # the store's copy rots; same size, so only the node's hash notices
    release.squashfs_path.write_bytes(bytes(data))
    report = stage_all([n], release)
    error = report.results["n1"].exception
    assert isinstance(error, VerificationError) and error.exit_code == 5, error
    assert "sha256 mismatch" in str(error)


# --- plan changes nothing ---------------------------------------------------------------------


def test_plan_runs_no_command_on_a_node(release: StoredRelease, fleet: Fleet, tmp_path: Path) -> None:
    nodes = fleet(2)
    settle_on(nodes[0], release)  # settled: plan asks its health
    pwned = tmp_path / "pwned"
    check = CheckSpec(name="app", kind="command", target=f"touch {pwned}")
    result = Rollout(nodes, options(dry_run=True), checks=[check]).run(release)
    assert result.exit_code == 0
    assert actions(nodes[0], "run-shell") == [] and actions(nodes[1], "run-shell") == []
    assert not pwned.exists()


# --- the journal --------------------------------------------------------------------------------


def test_a_failed_plan_is_listed_as_failed(release: StoredRelease, fleet: Fleet, tmp_path: Path) -> None:
    nodes = fleet(2)
    machine(nodes[1]).power_off()
    journal = Journal(tmp_path, "r-plan")
    plan = Rollout(nodes, options(dry_run=True), journal=journal).run(release)
    journal.close()
    assert [r.outcome for r in plan.nodes] == ["planned", "unreachable"] and plan.exit_code == 3
    [rec] = list_records(tmp_path)
    assert rec.dry_run and rec.state == "exit 3 (dry run)" and rec.outcomes["n2"] == "unreachable"
    machine(nodes[1]).power_on()


def test_rollback_to_a_path_leaves_no_journal(fleet: Fleet, tmp_path: Path) -> None:
    nodes = fleet(1)
    journal = Journal(tmp_path, "r-back")
    with pytest.raises(InputError, match="--to"):
        Rollout(nodes, options(), journal=journal).rollback(to="../x")
    journal.close()
    assert not (tmp_path / "rollouts" / "r-back.jsonl").exists()
    assert list_records(tmp_path) == []


def test_journals_that_are_damaged_read_clearly(tmp_path: Path) -> None:
    root = tmp_path / "rollouts"
    (root / "r-dir.jsonl").mkdir(parents=True)
    (root / "r-bad.jsonl").write_text(
        '{"event": "begin", "nodes": 5, "kind": ["x"], "time": 3}\n[1]\n"x"\n'
        + "{" * 10 + "\n" + '{"event": "end", "exit_code": "no", "time": 4}\n')
    [rec] = list_records(tmp_path)
    assert rec.nodes == [] and rec.state == "exit 1"
    with pytest.raises(InputError, match="is a directory"):
        read_record(root / "r-dir.jsonl")
    r = CliRunner().invoke(main, ["history", "r-dir"], env={"IMAGETOOL_STATE_DIR": str(tmp_path)})
    assert r.exit_code == 2 and "is a directory" in r.output and "Traceback" not in r.output


# --- untrusted text in the terminal ---------------------------------------------------------------


def test_history_shows_markup_from_a_journal_as_text(tmp_path: Path) -> None:
    root = tmp_path / "rollouts"
    root.mkdir()
    events = [
        {"event": "begin", "kind": "rollout[/x]", "target": "[link=https://evil.example]web[/link]",
         "nodes": ["n1"], "owner": "[bold red]me", "command": "imagetool [/]", "time": "2026-01-01T00:00:00Z"},
        {"event": "step", "node": "n1[/x]", "step": "[/step]", "outcome": "failed", "detail": "[/detail]\x1b]8;;x"},
        {"event": "end", "exit_code": 3, "reason": "[/reason]", "time": "2026-01-01T00:00:01Z"},
    ]
    (root / "r-1.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    env = {"IMAGETOOL_STATE_DIR": str(tmp_path), "COLUMNS": "300"}
    listed = CliRunner().invoke(main, ["history"], env=env)
    assert listed.exit_code == 0, listed.output
    assert "[link=https://evil.example]web[/link]" in listed.output
    shown = CliRunner().invoke(main, ["history", "r-1"], env=env)
    assert shown.exit_code == 0, shown.output
    assert "[/reason]" in shown.output and "[/detail]" in shown.output and "\x1b" not in shown.output


def test_status_shows_a_damaged_node_as_an_error_not_unreachable(fleet: Fleet, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    [n] = fleet(1)
    machine(n).node_var.state.write_text('"[/x]"')
    inv = tmp_path / "inv.yaml"
    inv.write_text("nodes:\n  n1: {host: 10.0.0.1}\n")
    monkeypatch.setattr("rollout.fleet.ssh_nodes", lambda specs, **kw: [n])
    r = CliRunner().invoke(main, ["status", "-i", str(inv), "--no-health"], env={"COLUMNS": "300"})
    assert r.exit_code == 1, r.output
    assert "unreachable" not in r.output and "error" in r.output and "state.json" in r.output


def test_images_show_and_list_show_manifest_markup_as_text(tmp_path: Path) -> None:
    from tests.samples import make_release

    stored = make_release(tmp_path / "store", "web", "2.0")
    doc = json.loads(stored.manifest_path.read_text())
    doc["built_at"] = "[/x][link=https://evil.example]click[/link]"
    doc["builder"]["imagetool"] = "[bold]9[/bold]\x1b[2J"
    stored.manifest_path.write_text(json.dumps(doc))
    env = {"COLUMNS": "300"}
    for args in (["images", "show", "web-2.0"], ["images", "list"]):
        r = CliRunner().invoke(main, [*args, "--store", str(tmp_path / "store")], env=env)
        assert r.exit_code == 0, (args, r.output)
        assert "[/x][link=https://evil.example]click[/link]" in r.output and "\x1b" not in r.output


@pytest.mark.parametrize("content", ["{broken", "[]", '{"name": "x"}', ('{"name": 1, "subnet": "a", "bridge": "b", '
                                      '"gateway": "c", "release": "d"}')])
def test_a_damaged_lab_record_is_a_clear_error(tmp_path: Path, content: str) -> None:
    lab = tmp_path / "labs" / "t1"
    lab.mkdir(parents=True)
    (lab / "lab.json").write_text(content)
    r = CliRunner().invoke(main, ["lab", "status", "--lab", "t1", "--lab-dir", str(tmp_path / "labs")])
    assert r.exit_code == 2 and "lab.json" in r.output and "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_the_lab_record_up_writes_is_the_one_load_lab_accepts(tmp_path: Path) -> None:
    # A lab's own record once failed its own validation (every `lab reset` then exited 2).
    from imagetool.lab.model import Lab, load_lab, save_lab_record

    d = tmp_path / "labs" / "t1"
    (d / "nodes").mkdir(parents=True)
    lab = Lab(name="t1", dir=d, subnet="10.250.7.0/24", bridge="itl0000br", gateway="10.250.7.1", release="web-1",
              accel="tcg")
    save_lab_record(lab, accel_reason="probe: KVM unavailable")
    back = load_lab("t1", tmp_path / "labs")
    assert (back.name, back.subnet, back.gateway, back.release, back.accel) == ("t1", "10.250.7.0/24", "10.250.7.1",
                                                                               "web-1", "tcg")
