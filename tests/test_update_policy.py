"""The failure policy end to end, against local nodes running the real node helper
(rollout.local, tests/local_fleet.py): a node out of reach is a failed node, --max-failures is
judged per batch, a failed canary stops, --pause is said as it runs, --approve waits after the
canary for the operator's answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from imagetool.cli import main
from imagetool.errors import UnreachableError
from imagetool.store import StoredRelease
from rollout.approval import approval_path
from rollout.journal import Journal, find_record
from rollout.node import HelperNode
from rollout.update import Rollout, RolloutResult
from tests.local_fleet import NEW, OLD, Fleet, actions, fast_boot_polls, fleet, machine, options, release, state  # noqa: F401 - fixtures

Event = tuple[str, str, str]


def unhealthy(node: HelperNode) -> None:
    """On NEW the node comes up degraded, with a failed unit: its health gate fails."""
    machine(node).system_state[NEW] = "degraded"
    machine(node).failed_units[NEW] = ["app.service"]


def untouched(node: HelperNode) -> bool:
    """Nothing was done on the node: never locked, sent the image or rebooted; on OLD."""
    return actions(node, "lock", "put", "set-next", "reboot") == [] and state(node).booted == OLD


def outcomes(result: RolloutResult) -> list[str]:
    return [r.outcome for r in result.nodes]


def cli_rollout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, release: StoredRelease, nodes: list[HelperNode],
                *args: str) -> tuple[int, dict, str]:
    """`imagetool rollout ... --json` over these local nodes (the inventory names them): exit code,
    JSON, what it said on stderr."""
    inv = tmp_path / "inv.yaml"
    inv.write_text("nodes:\n" + "".join(f"  {n.name}: {{host: 10.0.0.{i}}}\n" for i, n in enumerate(nodes, 1)))
    by_name = {n.name: n for n in nodes}
    monkeypatch.setattr("rollout.fleet.ssh_nodes", lambda specs, **kw: [by_name[s.name] for s in specs])
    monkeypatch.setenv("IMAGETOOL_STATE_DIR", str(tmp_path / "state"))
    r = CliRunner().invoke(main, ["rollout", NEW, "--store", str(release.manifest_path.parent), "-i", str(inv),
                                  "--health-timeout", "0", "--json", *args])
    return r.exit_code, json.loads(r.stdout), r.stderr


# --- a node out of reach is a failed node -------------------------------------------------------------


def test_an_unreachable_node_is_a_failed_node_and_the_others_go_on(
        release: StoredRelease, fleet: Fleet, tmp_path: Path) -> None:
    nodes = fleet(4)
    machine(nodes[2]).network_cut = True
    journal = Journal(tmp_path, "r-unreach")
    events: list[Event] = []
    result = Rollout(nodes, options(batches="1", max_failures="1", rollout_id="r-unreach"), journal=journal,
                     events=lambda *e: events.append(e)).run(release)
    journal.close()
    assert outcomes(result) == ["done", "done", "unreachable", "done"]
    assert result.exit_code == 3 and not result.stopped, result.to_dict()
    n3 = result.node("n3")
    assert n3.failed and "cannot connect" in (n3.error or "") and "nothing was done on it" in (n3.error or "")
    assert "n3" in (result.reason or "")
    machine(nodes[2]).network_cut = False
    assert untouched(nodes[2]) and state(nodes[2]).lock is None
    assert [state(n).committed for n in nodes] == [NEW, NEW, OLD, NEW]
    # The same outcome in the journal, the JSON and the events.
    assert find_record(tmp_path, "r-unreach").outcomes["n3"] == "unreachable"
    assert result.to_dict()["nodes"][2]["outcome"] == "unreachable"
    assert any(e[:2] == ("n3", "unreachable") for e in events)


def test_an_unreachable_node_beyond_the_budget_stops_before_anything_changed(
        release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(3)
    machine(nodes[1]).network_cut = True
    result = Rollout(nodes, options()).run(release)
    assert result.stopped and result.exit_code == 3
    assert outcomes(result) == ["not-started", "unreachable", "not-started"]
    assert "1 of 3 node(s) failed before any reboot, more than the 0 tolerated" in (result.reason or "")
    assert "before anything was changed" in (result.reason or "")
    machine(nodes[1]).network_cut = False
    assert all(untouched(n) for n in nodes)


def test_every_node_unreachable_exits_4(release: StoredRelease, fleet: Fleet, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = fleet(2)
    for n in nodes:
        machine(n).network_cut = True
    result = Rollout(nodes, options(max_failures="100%")).run(release)
    assert outcomes(result) == ["unreachable", "unreachable"] and result.exit_code == 4
    code, doc, _ = cli_rollout(monkeypatch, tmp_path, release, nodes)
    assert code == 4 and doc["exit_code"] == 4
    assert [n["outcome"] for n in doc["nodes"]] == ["unreachable", "unreachable"]
    assert "all 2 node(s) unreachable" in doc["reason"]


def test_a_node_gone_when_its_batch_starts_is_unreachable_and_untouched(
        release: StoredRelease, fleet: Fleet) -> None:
    """Reached at the start, gone when its one-shot boot is asked for (the transport's edge
    raises, as a cut connection does): nothing was done on it, the rollout goes on."""
    nodes = fleet(3)
    machine(nodes[1]).faults["set-next"] = UnreachableError("node n2: connection reset")
    result = Rollout(nodes, options(batches="1", max_failures="1")).run(release)
    assert outcomes(result) == ["done", "unreachable", "done"] and result.exit_code == 3
    assert "connection reset" in (result.node("n2").error or "")
    st = state(nodes[1])
    assert (st.booted, st.committed, st.next) == (OLD, OLD, None) and actions(nodes[1], "reboot") == []


def test_a_node_with_a_corrupt_boot_control_file_is_a_failed_node(release: StoredRelease, fleet: Fleet) -> None:
    """The node answers but cannot say its state: the same path as an unreachable node (failed,
    nothing done on it, the policy decides), with its own reason."""
    nodes = fleet(3)
    machine(nodes[2]).node_var.control.write_text("[1, 2")
    result = Rollout(nodes, options(batches="1", max_failures="1")).run(release)
    assert outcomes(result) == ["done", "done", "failed"] and result.exit_code == 3
    error = result.node("n3").error or ""
    assert error.startswith("cannot read its status: node n3: ") and "control.json" in error, error
    assert "nothing was done on it" in error
    assert actions(nodes[2], "lock", "put", "set-next", "reboot") == []


def test_a_corrupt_node_beyond_the_budget_stops_before_anything_changed(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(2)
    machine(nodes[1]).node_var.control.write_text("[1, 2")
    result = Rollout(nodes, options()).run(release)
    assert result.stopped and result.exit_code == 3 and outcomes(result) == ["not-started", "failed"]
    assert "before anything was changed" in (result.reason or "")
    assert all(actions(n, "lock", "put", "set-next") == [] for n in nodes)


# --- --max-failures per batch, the canary -----------------------------------------------------------------


def test_failures_spread_over_batches_within_each_batch_budget_go_on(release: StoredRelease, fleet: Fleet) -> None:
    """Three batches of two, one failure in each of the later two: two failures in all, more than
    a whole-run budget of one would allow, but no batch exceeds its own."""
    nodes = fleet(6)
    unhealthy(nodes[2])
    unhealthy(nodes[4])
    result = Rollout(nodes, options(batches="2", max_failures="1")).run(release)
    assert not result.stopped and result.exit_code == 3, result.to_dict()
    assert outcomes(result) == ["done", "done", "rolled-back", "done", "rolled-back", "done"]
    assert "no batch beyond what --max-failures 1 tolerates" in (result.reason or "")


def test_a_batch_beyond_its_budget_stops(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(6)
    unhealthy(nodes[2])
    unhealthy(nodes[3])
    result = Rollout(nodes, options(batches="2", max_failures="50%")).run(release)
    assert result.stopped and result.exit_code == 3
    assert outcomes(result) == ["done", "done", "rolled-back", "rolled-back", "not-started", "not-started"]
    assert "2 of 2 node(s) failed in batch 2, more than the 1 tolerated (--max-failures 50%, per batch)" in (
        result.reason or "")
    assert all(actions(n, "set-next") == [] and state(n).committed == OLD for n in nodes[4:])


def test_a_failed_canary_stops_even_within_the_budget(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(3)
    unhealthy(nodes[0])
    result = Rollout(nodes, options(batches="1", max_failures="1")).run(release)
    assert result.stopped and result.exit_code == 3
    assert outcomes(result) == ["rolled-back", "not-started", "not-started"]
    assert "failed in the canary batch" in (result.reason or "")
    assert all(actions(n, "set-next") == [] for n in nodes[1:])


def test_canary_failures_allowed_judges_the_canary_by_the_budget(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(3)
    unhealthy(nodes[0])
    result = Rollout(nodes, options(batches="1", max_failures="1", canary_failures_allowed=True)).run(release)
    assert not result.stopped and result.exit_code == 3
    assert outcomes(result) == ["rolled-back", "done", "done"]


# --- --pause ------------------------------------------------------------------------------------------------


def test_the_pause_is_said_as_it_runs(release: StoredRelease, fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rollout.update.PAUSE_TICK", 0.1)
    nodes = fleet(2)
    events: list[Event] = []
    Rollout(nodes, options(batches="1", pause=0.3), events=lambda *e: events.append(e)).run(release)
    waits = [d for node, step, d in events if step == "wait"]
    assert all(node == "*" for node, step, _ in events if step == "wait")
    assert waits == ["pausing 0.3s before batch 2 (Ctrl-C to stop)", "batch 2 starts in 0.2s (Ctrl-C to stop)",
                     "batch 2 starts in 0.1s (Ctrl-C to stop)"]
    # Said before the batch it waits for starts.
    assert events.index(("*", "wait", waits[-1])) < events.index(("n2", "batch", "2/2"))


def test_the_pause_shows_in_the_view(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a terminal a plain line; in a terminal the line under the table, with its age."""
    from rich.console import Console

    from imagetool.cli import view

    plain = view.LiveView(["n1"], "rollout")
    plain.interactive = False
    plain.event("*", "wait", "pausing 30s before batch 2 (Ctrl-C to stop)")
    assert "pausing 30s before batch 2 (Ctrl-C to stop)" in capsys.readouterr().err
    live = view.LiveView(["n1"], "rollout")
    live.event("*", "wait", "batch 2 starts in 20s (Ctrl-C to stop)")
    screen = Console(width=120, record=True)
    screen.print(live)
    assert "batch 2 starts in 20s (Ctrl-C to stop)" in screen.export_text()
    live.event("n1", "batch", "2/2")
    screen = Console(width=120, record=True)
    screen.print(live)
    assert "starts in" not in screen.export_text()


# --- --approve ---------------------------------------------------------------------------------------------


def approving(nodes: list[HelperNode], release: StoredRelease, tmp_path: Path, answer_with, **kw: object) -> tuple[
        RolloutResult, list[Event]]:
    """A rollout over `nodes` with --approve; `answer_with(path, rollout_id)` runs (in a thread) when
    the rollout says it waits. Its journal is in tmp_path."""
    events: list[Event] = []
    rid = "r-approve"
    path = approval_path(tmp_path, rid)
    journal = Journal(tmp_path, rid)

    def listen(node: str, step: str, detail: str) -> None:
        events.append((node, step, detail))
        if step == "approve" and detail.startswith("waiting") and answer_with is not None:
            threading.Thread(target=answer_with, args=(path, rid)).start()

    try:
        result = Rollout(nodes, options(batches="1", approve=True, state_dir=str(tmp_path), rollout_id=rid, **kw),
                         journal=journal, events=listen).run(release)
    finally:
        journal.close()
    return result, events


def test_approve_by_file(release: StoredRelease, fleet: Fleet, tmp_path: Path) -> None:
    nodes = fleet(3)
    seen: dict[str, object] = {}

    def ci_writes(path: Path, rid: str) -> None:
        # The canary is done and every node still locked while the rollout waits.
        seen["locks"] = [state(n).lock is not None for n in nodes]
        seen["committed"] = [state(n).committed for n in nodes]
        path.write_text("approve\n")

    result, events = approving(nodes, release, tmp_path, ci_writes)
    assert result.exit_code == 0 and result.approval == "approved", result.to_dict()
    assert outcomes(result) == ["done"] * 3
    assert seen == {"locks": [True, True, True], "committed": [NEW, OLD, OLD]}
    [waiting] = [d for n, s, d in events if s == "approve" and d.startswith("waiting")]
    assert "imagetool approve r-approve" in waiting and str(approval_path(tmp_path, "r-approve")) in waiting
    assert ("*", "approve", "approved by the operator: going on") in events
    assert not approval_path(tmp_path, "r-approve").exists()
    assert any(e.get("event") == "approval" and e.get("verdict") == "approved"
               for e in find_record(tmp_path, "r-approve").events)


def test_reject_by_file_stops_with_later_nodes_untouched(release: StoredRelease, fleet: Fleet, tmp_path: Path) -> None:
    nodes = fleet(3)
    result, _ = approving(nodes, release, tmp_path, lambda path, rid: path.write_text("reject"))
    assert result.stopped and result.approval == "rejected" and result.exit_code == 9
    assert outcomes(result) == ["done", "not-started", "not-started"]
    assert result.reason == "rejected by the operator after the canary"
    assert all(untouched_but_locked_once(n) for n in nodes[1:])
    assert all(state(n).lock is None for n in nodes)


def untouched_but_locked_once(node: HelperNode) -> bool:
    """Staged and locked (the rollout's first phases), then let go: never rebooted, still on OLD."""
    return actions(node, "set-next", "reboot") == [] and state(node).committed == OLD


def test_approve_from_another_process(release: StoredRelease, fleet: Fleet, tmp_path: Path) -> None:
    nodes = fleet(2)
    answers: list[subprocess.CompletedProcess[str]] = []

    def operator(path: Path, rid: str) -> None:
        env = {**os.environ, "IMAGETOOL_STATE_DIR": str(tmp_path)}
        answers.append(subprocess.run([sys.executable, "-m", "imagetool", "approve", rid], env=env,
                                      capture_output=True, text=True, timeout=60, check=False))

    result, _ = approving(nodes, release, tmp_path, operator)
    assert answers[0].returncode == 0 and "approved: rollout r-approve" in answers[0].stderr, answers[0]
    assert result.exit_code == 0 and outcomes(result) == ["done", "done"]


def test_reject_with_the_approve_command_then_it_refuses_an_ended_rollout(
        release: StoredRelease, fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = fleet(2)
    monkeypatch.setenv("IMAGETOOL_STATE_DIR", str(tmp_path))
    got: list[int] = []

    def operator(path: Path, rid: str) -> None:
        got.append(CliRunner().invoke(main, ["approve", rid, "--reject"]).exit_code)

    result, _ = approving(nodes, release, tmp_path, operator)
    assert got == [0] and result.exit_code == 9 and outcomes(result) == ["done", "not-started"]
    late = CliRunner().invoke(main, ["approve", "r-approve"])
    assert late.exit_code == 2 and "has ended" in late.output
    # A rollout still running, but without --approve, waits for no answer.
    plain_journal = Journal(tmp_path, "r-plain")
    plain_journal.write("begin", kind="rollout", options={"approve": False})
    plain_journal.close()
    plain = CliRunner().invoke(main, ["approve", "r-plain"])
    assert plain.exit_code == 2 and "runs without --approve" in plain.output
    assert not approval_path(tmp_path, "r-plain").exists()


def test_no_answer_within_the_timeout_stops(release: StoredRelease, fleet: Fleet, tmp_path: Path) -> None:
    nodes = fleet(2)
    result, events = approving(nodes, release, tmp_path, None, approve_timeout=0.5)
    assert result.stopped and result.approval == "timed-out" and result.exit_code == 9
    assert outcomes(result) == ["done", "not-started"]
    assert "no approval within 0.5s after the canary (--approve-timeout)" == result.reason
    assert ("*", "approve", "no answer in time: stopping") in events
    assert all(state(n).lock is None for n in nodes)


def test_a_failure_outweighs_a_rejection(release: StoredRelease, fleet: Fleet, tmp_path: Path) -> None:
    """A canary failure allowed by the operator, then a rejection: nodes failed, exit 3."""
    nodes = fleet(3)
    unhealthy(nodes[0])
    result, _ = approving(nodes, release, tmp_path, lambda path, rid: path.write_text("reject"),
                          max_failures="1", canary_failures_allowed=True)
    assert result.approval == "rejected" and result.exit_code == 3
    assert outcomes(result) == ["rolled-back", "not-started", "not-started"]


def test_ctrl_c_while_waiting_releases_the_locks(release: StoredRelease, fleet: Fleet, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = fleet(2)

    def operator_presses_ctrl_c(path: Path) -> str | None:
        raise KeyboardInterrupt

    monkeypatch.setattr("rollout.approval.read_answer", operator_presses_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        approving(nodes, release, tmp_path, None)
    assert all(state(n).lock is None for n in nodes)
    assert [state(n).committed for n in nodes] == [NEW, OLD]


@pytest.mark.parametrize("typed, verdict", [("y\n", "approved"), ("n\n", "rejected")])
def test_answered_at_the_rollouts_own_terminal(release: StoredRelease, fleet: Fleet, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, typed: str, verdict: str) -> None:
    """With a terminal on stdin the command asks y/n itself and writes the answer where every
    answer goes."""
    import io

    from imagetool.cli import nodes as cli_nodes
    from imagetool.cli.view import LiveView

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal(typed))
    nodes = fleet(2)
    opts = options(batches="1", approve=True, state_dir=str(tmp_path))
    view = LiveView([n.name for n in nodes], "rollout")
    listener = cli_nodes._asking(view, opts)
    assert opts.rollout_id is not None  # fixed before the run, so the answer file is known
    result = Rollout(nodes, opts, events=listener).run(release)
    assert result.approval == verdict
    assert outcomes(result) == (["done", "done"] if verdict == "approved" else ["done", "not-started"])


def test_a_plan_shows_unreachable_nodes_and_what_the_rollout_would_do(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(3)
    machine(nodes[1]).network_cut = True
    plan = Rollout(nodes, options(dry_run=True)).run(release)
    assert outcomes(plan) == ["planned", "unreachable", "planned"] and plan.exit_code == 3
    assert (plan.reason or "").startswith("the rollout would stop before any reboot: 1 of 3 node(s) failed")
    within = Rollout(nodes, options(dry_run=True, max_failures="1")).run(release)
    assert "the rollout would go on without them" in (within.reason or "") and "n2" in (within.reason or "")


def test_a_rollback_goes_on_without_an_unreachable_node(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(3)
    assert Rollout(nodes, options()).run(release).exit_code == 0
    machine(nodes[1]).network_cut = True
    result = Rollout(nodes, options(batches="1", max_failures="1")).rollback()
    assert outcomes(result) == ["done", "unreachable", "done"] and result.exit_code == 3
    machine(nodes[1]).network_cut = False
    assert [state(n).committed for n in nodes] == [OLD, NEW, OLD]


def test_the_command_exits_9_when_rejected(release: StoredRelease, fleet: Fleet, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """No terminal (CI): the command prints how to approve, and a rejection written into the
    approval file ends it with exit 9, the later nodes untouched."""
    from tests.conftest import wait_for

    nodes = fleet(2)
    journal = tmp_path / "state/rollouts/r-ci.jsonl"

    def ci_job() -> None:
        assert wait_for(lambda: journal.exists() and '"step": "approve"' in journal.read_text(), 120, 0.1)
        approval_path(tmp_path / "state", "r-ci").write_text("reject\n")

    job = threading.Thread(target=ci_job)
    job.start()
    code, doc, said = cli_rollout(monkeypatch, tmp_path, release, nodes, "--batch", "1", "--approve",
                                  "--rollout-id", "r-ci")
    job.join()
    assert code == 9 and doc["exit_code"] == 9 and doc["approval"] == "rejected", doc
    assert "imagetool approve r-ci" in said and str(approval_path(tmp_path / "state", "r-ci")) in said, said
    assert "rejected by the operator after the canary" in said
    assert [n["outcome"] for n in doc["nodes"]] == ["done", "not-started"]


def test_approve_timeout_must_be_a_positive_number_of_seconds() -> None:
    from imagetool.errors import InputError
    from rollout.update import RolloutOptions

    for bad in (0, -1, float("nan"), float("inf"), True):
        with pytest.raises(InputError, match="--approve-timeout"):
            RolloutOptions(approve=True, approve_timeout=bad)  # type: ignore[arg-type]
