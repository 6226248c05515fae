"""Journal, locks, reconcile, hooks and run-once of the rolling update, against local nodes running the
real node helper (rollout.local, tests/local_fleet.py)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from imagetool.errors import LockedError
from imagetool.store import StoredRelease
from rollout.hooks import Hooks, HookSpec, RunOnceSpec
from rollout.journal import Journal, find_record, list_records
from rollout.locks import LockClaim, this_process
from rollout.node import HelperError, HelperNode
from rollout.stage import needed_bytes, stage, stage_all
from rollout.update import Rollout
from tests.local_fleet import (  # noqa: F401 - fixtures
    NEW,
    OLD,
    Fleet,
    actions,
    clear_log,
    fast_boot_polls,
    fleet,
    machine,
    options,
    release,
    settle_on,
    state,
)

ME = "ops@controller"


def run(nodes: list[HelperNode], release: StoredRelease, journal_dir: Path | None = None, *,
        hooks: Hooks | None = None, **kw: object) -> object:
    opts = options(owner=ME, **kw)
    journal = Journal(journal_dir, opts.rollout_id or "r-test") if journal_dir else None
    try:
        return Rollout(nodes, opts, hooks=hooks, journal=journal).run(release)
    finally:
        if journal:
            journal.close()


def hold_lock(node: HelperNode, **lock: object) -> None:
    """A lock some other run took on the node (written as its helper writes it, with the time
    and pid that run had)."""
    machine(node).node_var.lock.write_text(json.dumps(lock))


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# --- journal ------------------------------------------------------------------------------------


def test_journal_records_every_step_and_the_end(release: StoredRelease, fleet: Fleet, tmp_path: Path) -> None:
    nodes = fleet(3)
    result = run(nodes, release, tmp_path, rollout_id="20261123T120000-aaaaaa", batches="1,2")
    rec = find_record(tmp_path, "20261123T120000")  # a unique prefix is enough
    assert rec.id == "20261123T120000-aaaaaa" and rec.kind == "rollout" and rec.target == NEW
    assert rec.state == "ok" and rec.exit_code == 0 and rec.nodes == ["n1", "n2", "n3"]
    assert rec.outcomes == {"n1": "done", "n2": "done", "n3": "done"}
    steps = [(e["node"], e["step"]) for e in rec.events if e["event"] == "step" and e["node"] == "n1"]
    for step in ("connect", "reconcile", "lock", "stage", "activate", "boot", "verify", "commit", "done"):
        assert ("n1", step) in steps
    plans = {e["node"]: e for e in rec.events if e["event"] == "plan"}
    assert plans["n2"]["action"] == "activate" and plans["n2"]["stage_bytes"] == needed_bytes(release, 0)
    assert result.exit_code == 0  # type: ignore[attr-defined]


def test_journal_of_a_killed_run_reads_as_interrupted(tmp_path: Path) -> None:
    j = Journal(tmp_path, "r-1")
    j.write("begin", kind="rollout", target=NEW, nodes=["n1"])
    j.step("n1", "activate", "next boot")
    j.close()
    with open(j.path, "a") as f:
        f.write('{"time": "2026-11-23T12:00:00Z", "event": "st')  # torn by power loss
    [rec] = list_records(tmp_path)
    assert rec.state == "interrupted" and rec.ended is None and len(rec.events) == 2


def test_journal_refuses_ids_that_are_paths(tmp_path: Path) -> None:
    from imagetool.errors import InputError

    for bad in ("../x", "a/b", "", "x" * 65, "a..b"):
        with pytest.raises(InputError):
            Journal(tmp_path, bad)
    with pytest.raises(InputError, match="no rollout"):
        find_record(tmp_path, "20990101")


# --- locks ----------------------------------------------------------------------------------------


def test_lock_of_another_run_is_refused_naming_its_holder(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(2)
    hold_lock(nodes[1], rollout="r-other", owner="dev@laptop", command="imagetool rollout x", pid=1,
              time=time.time() - 60)
    with pytest.raises(LockedError, match=r"node n2: locked by rollout r-other of dev@laptop.*--break-lock"):
        run(nodes, release)
    assert actions(nodes[0], "reboot", "put") == [] and state(nodes[0]).lock is None
    # --break-lock respects --lock-max-age ...
    with pytest.raises(LockedError, match=r"only 6\ds old"):
        run(nodes, release, break_lock=True)
    # ... and takes over an old enough lock, saying whose it broke.
    events: list[tuple[str, str, str]] = []
    opts = options(owner=ME, break_lock=True, lock_max_age=30)
    result = Rollout(nodes, opts, events=lambda *e: events.append(e)).run(release)
    assert result.exit_code == 0
    assert any(n == "n2" and s == "warning" and "broke the lock of rollout r-other of dev@laptop" in d
               for n, s, d in events)
    assert all(state(n).lock is None for n in nodes)


def holder(**changes: object) -> dict[str, object]:
    """This process's holder identity (tests run the controller here), with `changes`."""
    me = this_process()
    assert me is not None
    return {**me.to_dict(), **changes}


def test_lock_left_by_a_dead_controller_here_is_taken_over(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(2)
    for n in nodes:
        hold_lock(n, rollout="r-killed", owner=ME, command="imagetool rollout", time=time.time(),
                  token="killed-token", holder=holder(pid=dead_pid()))
    events: list[tuple[str, str, str]] = []
    assert Rollout(nodes, options(owner=ME), events=lambda *e: events.append(e)).run(release).exit_code == 0
    assert sum("controller process" in d and "is gone" in d for _, s, d in events if s == "warning") == 2
    # A live process of the same owner is another run going on: refused.
    hold_lock(nodes[0], rollout="r-live", owner=ME, command="imagetool rollout", time=time.time(),
              token="live-token", holder=holder())
    with pytest.raises(LockedError, match="r-live.*still running here"):
        run(nodes, release)


def test_the_same_owner_on_another_machine_is_no_proof(release: StoredRelease, fleet: Fleet) -> None:
    """Same user@hostname, a pid that does not exist here: the lock was taken from another
    process table (another boot, machine or container), where that pid may well be running."""
    nodes = fleet(1)
    for other in ({"boot_id": "another-boot"}, {"pid_ns": "pid:[1]"}, {"machine_id": "a-clone"}):
        hold_lock(nodes[0], rollout="r-elsewhere", owner=ME, command="imagetool rollout", time=time.time(),
                  token="other-token", holder=holder(pid=dead_pid(), **other))
        with pytest.raises(LockedError, match="another machine, boot or container"):
            run(nodes, release)
    # An older controller's lock, owner and a dead pid only: no proof either.
    hold_lock(nodes[0], rollout="r-old-ctl", owner=ME, command="imagetool rollout", time=time.time(), pid=dead_pid())
    with pytest.raises(LockedError, match="does not say which process table"):
        run(nodes, release)
    assert state(nodes[0]).lock["rollout"] == "r-old-ctl"  # type: ignore[index]


def test_a_second_controller_with_the_same_rollout_id_is_refused(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(2)
    first = LockClaim("r-same", "ops@elsewhere", "imagetool rollout")  # a live run (this process)
    nodes[1].lock(first)
    with pytest.raises(LockedError, match="node n2: locked by rollout r-same.*same rollout id"):
        run(nodes, release, rollout_id="r-same")
    assert first.holds(state(nodes[1]).lock) and state(nodes[0]).lock is None
    # Told to, it takes the lock over, and the first run's release then leaves it alone.
    assert run(nodes, release, rollout_id="r-same", break_lock=True, lock_max_age=0).exit_code == 0  # type: ignore[attr-defined]
    nodes[1].lock(LockClaim("r-same", "ops@controller", "imagetool rollout"))
    with pytest.raises(HelperError, match="held under another token"):
        nodes[1].unlock(first)


def test_a_release_never_removes_a_lock_taken_over_meanwhile(release: StoredRelease, fleet: Fleet) -> None:
    """While the rollout runs, another controller takes n2's lock over (--break-lock): the
    rollout's release at the end is refused there and says so; the other run keeps its lock."""
    nodes = fleet(2)
    other = LockClaim("r-other", "dev@laptop", "imagetool rollout")
    events: list[tuple[str, str, str]] = []

    def on_event(node: str, step: str, detail: str) -> None:
        events.append((node, step, detail))
        if node == "n2" and step == "commit":
            nodes[1].lock(other, take_over=nodes[1].status().lock)

    result = Rollout(nodes, options(owner=ME), events=on_event).run(release)
    assert result.exit_code == 0
    assert other.holds(state(nodes[1]).lock) and state(nodes[0]).lock is None
    assert any(n == "n2" and s == "warning" and "could not release the lock" in d and "r-other" in d
               for n, s, d in events)


def test_an_unreadable_lock_file_is_named_and_broken_only_when_told(release: StoredRelease, fleet: Fleet) -> None:
    """What an older helper's crash between creating and writing the lock leaves."""
    nodes = fleet(2)
    machine(nodes[1]).node_var.lock.write_bytes(b"")
    assert (state(nodes[1]).lock or {})["unreadable"].endswith("lock is empty (a helper crashed while writing it?)")
    with pytest.raises(LockedError, match="node n2: locked by an unreadable lock file .*--break-lock"):
        run(nodes, release)
    assert run(nodes, release, break_lock=True, lock_max_age=0).exit_code == 0  # type: ignore[attr-defined]
    assert all(state(n).lock is None for n in nodes)


# --- reconcile ------------------------------------------------------------------------------------


def test_settled_node_with_a_stale_one_shot_entry_is_cleared(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(2)
    for n in nodes:
        settle_on(n, release)
    # An interrupted rollback had set the one-shot entry back to OLD on n2 and was killed.
    nodes[1].set_next(OLD, 300, "r-2")
    result = run(nodes, release)
    assert [r.outcome for r in result.nodes] == ["skipped", "skipped"]  # type: ignore[attr-defined]
    assert state(nodes[1]).next is None and actions(nodes[1], "reboot")[-1:] == [("reboot", "")]  # only the setup's
    assert actions(nodes[0], "clear-next") == []


def test_plan_changes_nothing_and_says_why(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(3)
    stage(nodes[0], release)

    def states() -> list[dict[str, object]]:
        return [{**n.status().to_dict(), "time": None} for n in nodes]

    before = states()
    clear_log(nodes)
    result = Rollout(nodes, options(dry_run=True, batches="1,2")).run(release)
    assert states() == before
    assert {a for n in nodes for a, _ in actions(n)} <= {"status", "run-shell", "health"}
    r1, r2, _ = result.nodes
    assert r1.outcome == "planned" and r1.stage_bytes == 0 and "already staged" in (r1.detail or "")
    assert r2.stage_bytes == needed_bytes(release, 0) and r2.batch == 2  # no seed: the whole image
    assert "stage (whole image)" in (r2.detail or "")


# --- hooks and run-once ------------------------------------------------------------------------------


def hooks(tmp_path: Path, *, fail_after: str | None = None, once: str | None = "first") -> Hooks:
    log = tmp_path / "hooks.log"
    rec = f'echo "$IMAGETOOL_HOOK $IMAGETOOL_NODE $IMAGETOOL_FROM $IMAGETOOL_RELEASE" >> {log}'
    fail = f'; test "$IMAGETOOL_NODE" != {fail_after}' if fail_after else ""
    return Hooks(
        before_activate=(HookSpec("drain", rec),),
        after_commit=(HookSpec("undrain", rec + fail),),
        after_rollback=(HookSpec("undrain-after-rollback", rec),),
        run_once=RunOnceSpec("migrate", rec, node=once) if once else None,  # type: ignore[arg-type]
    )


def hook_log(tmp_path: Path) -> list[str]:
    path = tmp_path / "hooks.log"
    return path.read_text().splitlines() if path.exists() else []


def test_hooks_wrap_each_activation_and_run_once_runs_on_the_first(release: StoredRelease, fleet: Fleet, tmp_path: Path) -> None:
    nodes = fleet(3)
    result = run(nodes, release, hooks=hooks(tmp_path), batches="1,2")
    assert result.exit_code == 0  # type: ignore[attr-defined]
    lines = hook_log(tmp_path)
    assert lines[:3] == [f"before_activate n1 {OLD} {NEW}", f"after_commit n1 {OLD} {NEW}", f"run_once n1 {OLD} {NEW}"]
    assert sorted(lines[3:]) == sorted([f"before_activate n2 {OLD} {NEW}", f"after_commit n2 {OLD} {NEW}",
                                        f"before_activate n3 {OLD} {NEW}", f"after_commit n3 {OLD} {NEW}"])
    run_once = state(nodes[0]).run_once or {}
    assert (run_once["release"], run_once["rollout"]) == (NEW, result.rollout_id)  # type: ignore[attr-defined]
    # The same rollout again: nothing moves, no hook runs, run-once is not repeated.
    (tmp_path / "hooks.log").unlink()
    again = run(nodes, release, hooks=hooks(tmp_path), batches="1,2")
    assert [r.outcome for r in again.nodes] == ["skipped"] * 3  # type: ignore[attr-defined]
    assert hook_log(tmp_path) == []


def test_run_once_on_the_last_node(release: StoredRelease, fleet: Fleet, tmp_path: Path) -> None:
    nodes = fleet(3)
    assert run(nodes, release, hooks=hooks(tmp_path, once="last"), batches="1,2").exit_code == 0  # type: ignore[attr-defined]
    assert [ln for ln in hook_log(tmp_path) if ln.startswith("run_once")] == [f"run_once n3 {OLD} {NEW}"]


def test_run_once_an_interrupted_run_missed_runs_on_the_settled_bootstrap_node(release: StoredRelease, fleet: Fleet,
                                                                               tmp_path: Path) -> None:
    nodes = fleet(2)
    for n in nodes:  # committed on NEW by a run killed before its run-once step
        settle_on(n, release)
    result = run(nodes, release, hooks=hooks(tmp_path))
    assert [r.outcome for r in result.nodes] == ["skipped", "skipped"]  # type: ignore[attr-defined]
    assert hook_log(tmp_path) == [f"run_once n1 {NEW} {NEW}"]
    run_once = state(nodes[0]).run_once
    assert run_once and run_once["release"] == NEW


def test_failing_before_hook_leaves_the_node_untouched(release: StoredRelease, fleet: Fleet, tmp_path: Path) -> None:
    nodes = fleet(2)
    h = Hooks(before_activate=(HookSpec("drain", "echo cannot drain >&2; exit 3"),),
              after_rollback=(HookSpec("undrain", f"echo undrain $IMAGETOOL_NODE >> {tmp_path}/log"),))
    result = run(nodes, release, hooks=h, batches="1")
    canary = result.node("n1")  # type: ignore[attr-defined]
    assert canary.outcome == "rolled-back" and "before_activate hook 'drain'" in canary.error
    assert "exited 3" in canary.error and "cannot drain" in canary.error
    assert actions(nodes[0], "set-next", "reboot") == [] and state(nodes[0]).booted == OLD
    assert result.node("n2").outcome == "not-started"  # type: ignore[attr-defined]
    assert (tmp_path / "log").read_text() == "undrain n1\n"


def test_failing_after_commit_hook_moves_the_node_back(release: StoredRelease, fleet: Fleet, tmp_path: Path) -> None:
    nodes = fleet(3)
    result = run(nodes, release, hooks=hooks(tmp_path, fail_after="n1", once=None), batches="1")
    canary = result.node("n1")  # type: ignore[attr-defined]
    assert canary.outcome == "rolled-back" and "after_commit hook 'undrain'" in canary.error
    n1 = state(nodes[0])
    assert (n1.booted, n1.default, n1.committed) == (OLD, OLD, OLD)
    assert [r.outcome for r in result.nodes[1:]] == ["not-started", "not-started"]  # type: ignore[attr-defined]
    assert hook_log(tmp_path)[-1] == f"after_rollback n1 {OLD} {NEW}"


def test_failing_run_once_fails_its_node(release: StoredRelease, fleet: Fleet, tmp_path: Path) -> None:
    nodes = fleet(2)
    h = Hooks(run_once=RunOnceSpec("migrate", "echo schema conflict; exit 1"))
    result = run(nodes, release, hooks=h, batches="1")
    assert result.node("n1").outcome == "rolled-back"  # type: ignore[attr-defined]
    assert "run_once hook 'migrate'" in result.node("n1").error  # type: ignore[attr-defined]
    st = state(nodes[0])
    assert st.booted == OLD and st.run_once is None


def test_node_hooks_run_over_ssh_with_the_environment(release: StoredRelease, fleet: Fleet, tmp_path: Path) -> None:
    nodes = fleet(1)
    h = Hooks(before_activate=(HookSpec("drain", "systemctl stop webapp", where="node", timeout=7),))
    assert run(nodes, release, hooks=h).exit_code == 0  # type: ignore[attr-defined]
    [(_, command)] = actions(nodes[0], "run-shell")
    assert "IMAGETOOL_NODE=n1" in command and "IMAGETOOL_HOOK=before_activate" in command
    assert command.endswith("timeout 7 /bin/sh -c 'systemctl stop webapp'")


def test_journal_file_is_json_lines(release: StoredRelease, fleet: Fleet, tmp_path: Path) -> None:
    run(fleet(1), release, tmp_path, rollout_id="r-json")
    lines = (tmp_path / "rollouts" / "r-json.jsonl").read_text().splitlines()
    docs = [json.loads(line) for line in lines]
    assert docs[0]["event"] == "begin" and docs[-1]["event"] == "end"
    assert all({"time", "event"} <= d.keys() for d in docs)
    assert all({"node", "step", "outcome", "detail"} <= d.keys() for d in docs if d["event"] == "step")


def test_disk_filling_up_during_staging_gives_the_space_back(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(2)
    machine(nodes[1]).disk_fills_after = 100  # something else fills /var while the image travels
    result = run(nodes, release)
    r = result.node("n2")  # type: ignore[attr-defined]
    assert r.outcome == "failed" and "/var filled up while staging" in r.error
    assert "partial transfer was removed" in r.error and "running image is untouched" in r.error
    assert actions(nodes[1], "stage-abort") == [("stage-abort", NEW)]
    assert all(actions(n, "reboot") == [] for n in nodes) and state(nodes[1]).booted == OLD


def test_staging_outside_a_rollout_takes_and_releases_each_node_lock(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(2)
    hold_lock(nodes[1], rollout="r-busy", owner="ops@other", command="imagetool rollout", time=0)
    report = stage_all(nodes, release, lock_as=("stage-1", ME, "imagetool stage"))
    assert report.results["n1"].ok and state(nodes[0]).lock is None
    assert actions(nodes[0], "lock", "unlock") == [("lock", "stage-1"), ("unlock", "stage-1")]
    failed = report.results["n2"]
    assert not failed.ok and "locked by rollout r-busy" in (failed.error or "")
    assert actions(nodes[1], "put") == [] and (state(nodes[1]).lock or {})["rollout"] == "r-busy"
