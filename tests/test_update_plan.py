"""The rolling update's orchestration against local nodes running the real node helper
(rollout.local, tests/local_fleet.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagetool.errors import InputError, LockedError
from imagetool.store import StoredRelease
from rollout.inventory import CheckSpec
from rollout.local import Action
from rollout.locks import LockClaim
from rollout.node import HelperNode
from rollout.update import Rollout, RolloutOptions, new_rollout_id
from tests.local_fleet import (  # noqa: F401 - fixtures
    NEW,
    OLD,
    Fleet,
    actions,
    boot_into,
    clear_log,
    fast_boot_polls,
    first,
    fleet,
    machine,
    options,
    release,
    state,
)


def test_rollout_id_format() -> None:
    rid = new_rollout_id(0)
    assert rid.startswith("19700101T000000-") and len(rid) == len("19700101T000000-") + 6


def test_canary_first_then_batches(release: StoredRelease, fleet: Fleet) -> None:
    log: list[Action] = []
    nodes = fleet(5, log)
    events: list[tuple[str, str, str]] = []
    result = Rollout(nodes, options(), events=lambda *e: events.append(e)).run(release)

    assert result.exit_code == 0 and not result.stopped
    assert [r.outcome for r in result.nodes] == ["done"] * 5
    assert result.batches == [["n1"], ["n2", "n3"], ["n4", "n5"]]
    # The canary is committed before any other node is asked to reboot.
    assert first(log, "n1", "commit") < min(first(log, f"n{i}", "set-next") for i in range(2, 6))
    # Batch 2 is committed before batch 3 starts.
    assert max(first(log, n, "commit") for n in ("n2", "n3")) < min(first(log, n, "set-next") for n in ("n4", "n5"))
    # Staging happens on every node before any reboot: it disturbs nothing.
    assert max(first(log, f"n{i}", "stage-commit") for i in range(1, 6)) < first(log, "n1", "reboot")
    size = release.manifest.image.size + release.manifest_path.stat().st_size
    for n in nodes:
        st = state(n)
        assert (st.booted, st.default, st.committed, st.previous) == (NEW, NEW, NEW, OLD)
        assert actions(n, "set-next", "reboot", "confirm", "commit") == [
            ("set-next", NEW), ("reboot", ""), ("confirm", NEW), ("commit", NEW)]
        assert st.lock is None
        assert result.node(n.name).bytes_sent == size
    assert result.bytes_sent == 5 * size
    assert ("n1", "done", f"{OLD} → {NEW}") in events


def test_batch_parallel_bounds_the_nodes_activating_at_once(release: StoredRelease, fleet: Fleet) -> None:
    log: list[Action] = []
    nodes = fleet(5, log)
    events: list[tuple[str, str, str]] = []
    result = Rollout(nodes, options(batches="1,4", batch_parallel=2), events=lambda *e: events.append(e)).run(release)

    assert result.exit_code == 0 and [r.outcome for r in result.nodes] == ["done"] * 5
    assert result.batches == [["n1"], ["n2", "n3", "n4", "n5"]]
    # A node is activating from its set-next to its commit; never more than two at once.
    active, most = set(), 0
    for a in log:
        if a.action == "set-next":
            active.add(a.node)
        elif a.action == "commit":
            active.discard(a.node)
        most = max(most, len(active))
    assert most == 2
    assert ("n3", "batch", "2/2, 2 of its 4 nodes at a time") in events


def test_batch_parallel_must_be_a_count() -> None:
    for bad in (0, 4097, 2.5, True, "8"):
        with pytest.raises(InputError, match="--batch-parallel"):
            RolloutOptions(batch_parallel=bad)  # type: ignore[arg-type]


def test_second_run_is_a_no_op(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(3)
    Rollout(nodes, options()).run(release)
    clear_log(nodes)
    result = Rollout(nodes, options()).run(release)
    assert [r.outcome for r in result.nodes] == ["skipped"] * 3
    assert result.exit_code == 0 and result.bytes_sent == 0
    for n in nodes:
        # Nothing is written, so no lock is taken either: a status and a health check.
        assert actions(n) == [("status", ""), ("health", NEW)]
        assert machine(n).boots == 2


def test_a_no_op_run_still_refuses_a_node_another_run_holds(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(2)
    Rollout(nodes, options()).run(release)
    nodes[1].lock(LockClaim("r-other", "x", "y", holder=None))
    clear_log(nodes)
    with pytest.raises(LockedError, match="node n2: locked by rollout r-other"):
        Rollout(nodes, options()).run(release)
    # The usual way: every lock taken before anything else, and the ones taken given back.
    assert [a for a, _ in actions(nodes[0], "lock", "unlock", "health")] == ["lock", "unlock"]
    assert state(nodes[0]).lock is None


def unhealthy(node: HelperNode, image: str) -> None:
    """On `image` the node comes up degraded, with a failed unit."""
    machine(node).system_state[image] = "degraded"
    machine(node).failed_units[image] = ["app.service"]


def test_canary_failure_stops_and_rolls_back(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(4)
    unhealthy(nodes[0], NEW)
    result = Rollout(nodes, options()).run(release)

    assert result.stopped and result.exit_code == 3
    assert [r.outcome for r in result.nodes] == ["rolled-back", "not-started", "not-started", "not-started"]
    assert "health gate failed" in (result.nodes[0].error or "")
    canary = nodes[0]
    st = state(canary)
    assert (st.booted, st.default, st.committed) == (OLD, OLD, OLD)
    # Rolled back: one-shot cleared, rebooted into the default, gate run on the old image.
    acts = actions(canary, "set-next", "reboot", "clear-next", "commit", "health")
    assert acts == [("set-next", NEW), ("reboot", ""), ("health", NEW), ("clear-next", ""), ("reboot", ""),
                    ("health", OLD), ("clear-next", "")]
    for n in nodes[1:]:
        assert actions(n, "set-next", "reboot") == [] and state(n).booted == OLD
    assert all(state(n).lock is None for n in nodes)


def test_max_failures_is_per_batch(release: StoredRelease, fleet: Fleet) -> None:
    """Batches of one tolerating one failure each: the failures of n2 and n4 together would exceed
    a whole-run budget of one, but no batch exceeds its own, so every node gets its turn."""
    nodes = fleet(5)
    unhealthy(nodes[1], NEW)
    unhealthy(nodes[3], NEW)
    result = Rollout(nodes, options(batches="1", max_failures="1")).run(release)
    assert [r.outcome for r in result.nodes] == ["done", "rolled-back", "done", "rolled-back", "done"]
    assert not result.stopped and result.exit_code == 3
    assert [state(n).committed for n in nodes] == [NEW, OLD, NEW, OLD, NEW]


def test_max_failures_percentage_of_the_batch(release: StoredRelease, fleet: Fleet) -> None:
    """10% of a batch of three tolerates no failure (rounded down): a failure there stops."""
    nodes = fleet(7)
    unhealthy(nodes[1], NEW)
    result = Rollout(nodes, options(batches="1,3", max_failures="10%")).run(release)
    assert result.stopped and result.exit_code == 3
    assert [r.outcome for r in result.nodes] == ["done", "rolled-back", "done", "done"] + ["not-started"] * 3
    assert "1 of 3 node(s) failed in batch 2, more than the 0 tolerated" in (result.reason or "")


def test_rollback_all_moves_every_moved_node_back(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(4)
    unhealthy(nodes[2], NEW)
    result = Rollout(nodes, options(batches="1,2", on_failure="rollback-all")).run(release)
    assert result.stopped and "rollback-all" in (result.reason or "")
    outcomes = {r.node: (r.outcome, r.undone) for r in result.nodes}
    assert outcomes == {"n1": ("rolled-back", True), "n2": ("rolled-back", True),
                        "n3": ("rolled-back", False), "n4": ("not-started", False)}
    for n in nodes:
        st = state(n)
        assert (st.booted, st.default, st.committed) == (OLD, OLD, OLD)
    # n1 was moved back by activating its previous image: committed, so NEW is now its previous.
    assert actions(nodes[0], "set-next") == [("set-next", NEW), ("set-next", OLD)]
    assert state(nodes[0]).previous == NEW


def test_rollback_node_leaves_moved_nodes(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(4)
    unhealthy(nodes[2], NEW)
    result = Rollout(nodes, options(batches="1,2")).run(release)
    assert [r.outcome for r in result.nodes] == ["done", "done", "rolled-back", "not-started"]
    assert [state(n).committed for n in nodes] == [NEW, NEW, OLD, OLD]


def test_node_that_never_comes_back_waits_for_dead_man_switch(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(2)
    machine(nodes[0]).hangs_on.add(NEW)
    result = Rollout(nodes, options(confirm_timeout=3, boot_timeout=1)).run(release)
    r = result.nodes[0]
    assert r.outcome == "rolled-back" and "not back with a new boot within 1s" in (r.error or "")
    assert actions(nodes[0], "wait-for-boot") == [("wait-for-boot", "1"), ("wait-for-boot", "4")]
    assert actions(nodes[0], "reset") == []
    st = state(nodes[0])
    assert (st.booted, st.committed) == (OLD, OLD)
    assert result.nodes[1].outcome == "not-started"


def test_node_that_never_comes_back_is_reset_out_of_band(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(2, reset=True)
    machine(nodes[0]).hangs_on.add(NEW)
    result = Rollout(nodes, options(boot_timeout=1)).run(release)
    assert result.nodes[0].outcome == "rolled-back"
    assert actions(nodes[0], "reset") == [("reset", "")]
    assert actions(nodes[0], "wait-for-boot") == [("wait-for-boot", "1"), ("wait-for-boot", "1")]
    assert state(nodes[0]).booted == OLD


def test_failed_rollback_is_failed(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(1)
    unhealthy(nodes[0], NEW)
    unhealthy(nodes[0], OLD)
    result = Rollout(nodes, options()).run(release)
    assert result.nodes[0].outcome == "failed"
    assert "putting it back failed" in (result.nodes[0].error or "")


def test_interrupted_rollout_releases_locks_and_resumes(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(4)
    machine(nodes[2]).faults["reboot"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        Rollout(nodes, options(batches="1")).run(release)
    assert all(state(n).lock is None for n in nodes)
    assert [state(n).committed for n in nodes] == [NEW, NEW, OLD, OLD]
    assert state(nodes[2]).next is None  # its one-shot entry was undone
    assert actions(nodes[3], "set-next") == []

    del machine(nodes[2]).faults["reboot"]
    clear_log(nodes)
    result = Rollout(nodes, options(batches="1")).run(release)
    assert [r.outcome for r in result.nodes] == ["skipped", "skipped", "done", "done"]
    assert actions(nodes[0], "put", "reboot") == [] and actions(nodes[1], "put", "reboot") == []
    assert actions(nodes[2], "put") == []  # staged by the first run
    assert all(state(n).committed == NEW for n in nodes)


def test_resume_from_trial_boot_goes_straight_to_the_gate(release: StoredRelease, fleet: Fleet) -> None:
    """A controller killed after the reboot: the node runs NEW on trial, locked by that rollout."""
    nodes = fleet(2)
    n = nodes[0]
    boot_into(n, release, "r-old")
    # Taken on another machine: nothing here can prove that controller gone.
    n.lock(LockClaim("r-old", "x", "y", holder=None))
    clear_log(nodes)
    with pytest.raises(LockedError, match="locked by rollout r-old"):
        Rollout(nodes, options()).run(release)
    assert state(nodes[1]).lock is None  # what was taken is given back
    # Its own id is no key to it: that controller may still be running.
    with pytest.raises(LockedError, match="locked by rollout r-old.*same rollout id.*--break-lock"):
        Rollout(nodes, options(rollout_id="r-old")).run(release)

    result = Rollout(nodes, options(rollout_id="r-old", break_lock=True, lock_max_age=0)).run(release)
    assert [r.outcome for r in result.nodes] == ["done", "done"]
    assert actions(n, "reboot", "set-next", "put") == []
    assert actions(n, "confirm", "commit") == [("confirm", NEW), ("commit", NEW)]
    st = state(n)
    assert (st.default, st.previous) == (NEW, OLD)


def test_not_enough_space_fails_before_any_reboot(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(3)

    def fill_disk(node: str, step: str, detail: str) -> None:
        # Something on n2 has filled its /var by the time staging starts.
        if node == "n2" and step == "stage" and detail == NEW:
            machine(nodes[1]).set_free_bytes(500)

    result = Rollout(nodes, options(), events=fill_disk).run(release)
    r = result.nodes[1]
    assert r.outcome == "failed" and "needs" in (r.error or "") and "500 B free" in (r.error or "")
    assert actions(nodes[1], "put") == []
    assert result.stopped and all(actions(n, "reboot") == [] for n in nodes)
    assert [x.outcome for x in result.nodes] == ["not-started", "failed", "not-started"]


def refuses_unsigned(node: HelperNode, key: Path) -> None:
    """The node trusts `key` (on its /var, as `imagetool disk --trusted-key` installs it), so it
    refuses the unsigned releases these tests roll out."""
    machine(node).node_var.install_trusted_keys([key])


def test_a_node_refusing_the_image_is_a_failed_node_of_the_rollout(
        release: StoredRelease, fleet: Fleet, keys: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Signature verification failing on one node fails that node (exit 3, as a failed health gate
    would), not the whole command (exit 5): the others go on as the batch policy says, and the
    refusing node, never sent the image nor rebooted, runs its committed image."""
    import json

    from click.testing import CliRunner

    from imagetool.cli import main

    nodes = fleet(4)
    refuses_unsigned(nodes[1], keys["release.pem"])
    result = Rollout(nodes, options(batches="1", max_failures="1")).run(release)
    assert result.exit_code == 3 and not result.stopped, result.to_dict()
    assert [r.outcome for r in result.nodes] == ["done", "failed", "done", "done"]
    error = result.node("n2").error or ""
    assert error.startswith("staging: verification failed: ") and "is not signed" in error, error
    assert "release.pem (/var)" in error and "n2" in (result.reason or "")
    refused = nodes[1]
    assert actions(refused, "put", "stage-commit", "set-next", "reboot") == []
    st = state(refused)
    assert (st.booted, st.default, st.committed, st.next) == (OLD, OLD, OLD, None)
    assert not st.has_image(NEW) and machine(refused).boots == 1 and st.lock is None
    assert [state(n).committed for n in nodes] == [NEW, OLD, NEW, NEW]

    # The command line says the same: exit 3 with the node's reason, not exit 5.
    inv = tmp_path / "inv.yaml"
    inv.write_text("nodes:\n" + "".join(f"  {n.name}: {{host: 10.0.0.{i}}}\n" for i, n in enumerate(nodes, 1)))
    by_name = {n.name: n for n in nodes}
    monkeypatch.setattr("rollout.fleet.ssh_nodes", lambda specs, **kw: [by_name[s.name] for s in specs])
    r = CliRunner().invoke(main, ["rollout", NEW, "--store", str(release.manifest_path.parent), "-i", str(inv),
                                  "--batch", "1", "--max-failures", "1", "--health-timeout", "0", "--json"])
    assert r.exit_code == 3, r.output
    doc = json.loads(r.stdout)
    assert [(n["node"], n["outcome"]) for n in doc["nodes"]] == [
        ("n1", "skipped"), ("n2", "failed"), ("n3", "skipped"), ("n4", "skipped")]
    assert "verification failed" in doc["nodes"][1]["error"] and doc["exit_code"] == 3


def test_a_refusing_canary_stops_the_rollout_before_any_reboot(
        release: StoredRelease, fleet: Fleet, keys: dict[str, Path]) -> None:
    """No failure tolerated (the default): the refusal stops the rollout like any failed node."""
    nodes = fleet(3)
    refuses_unsigned(nodes[0], keys["release.pem"])
    result = Rollout(nodes, options()).run(release)
    assert result.stopped and result.exit_code == 3
    assert [r.outcome for r in result.nodes] == ["failed", "not-started", "not-started"]
    assert "verification failed" in (result.nodes[0].error or "")
    assert all(actions(n, "set-next", "reboot") == [] and state(n).booted == OLD for n in nodes)


def test_a_node_refusing_the_image_at_its_one_shot_boot_stays_on_its_committed_image(
        release: StoredRelease, fleet: Fleet, keys: dict[str, Path]) -> None:
    """The node's keys changed after staging: set-next re-verifies and refuses. That node failed
    (and is where it was), the rollout goes on, exit 3."""
    nodes = fleet(3)
    canary = nodes[0]
    set_next = canary.set_next

    def keys_arrive_first(image_id: str, *args: object, **kw: object) -> object:
        refuses_unsigned(canary, keys["release.pem"])
        return set_next(image_id, *args, **kw)  # type: ignore[arg-type]

    canary.set_next = keys_arrive_first  # type: ignore[method-assign]
    # A failed canary stops by default; here it is judged by --max-failures like the others.
    result = Rollout(nodes, options(batches="1", max_failures="1", canary_failures_allowed=True)).run(release)
    assert result.exit_code == 3 and not result.stopped, result.to_dict()
    r = result.node("n1")
    assert r.failed and r.outcome == "rolled-back", r
    assert (r.error or "").startswith("verification failed: node n1: imagetool-node set-next: "), r.error
    assert "not signed" in (r.error or "")
    st = state(canary)
    assert (st.booted, st.default, st.committed, st.next) == (OLD, OLD, OLD, None)
    assert actions(canary, "reboot") == [] and machine(canary).boots == 1
    assert [x.outcome for x in result.nodes[1:]] == ["done", "done"]


def test_partial_transfer_resumes(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(1)
    incoming = machine(nodes[0]).node_var.incoming
    incoming.mkdir(parents=True, exist_ok=True)
    (incoming / "web-1.1.squashfs").write_bytes(release.squashfs_path.read_bytes()[:400])
    result = Rollout(nodes, options()).run(release)
    assert result.nodes[0].bytes_sent == 600 + release.manifest_path.stat().st_size
    assert state(nodes[0]).committed == NEW


def test_dry_run_changes_nothing(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(3)
    result = Rollout(nodes, options(dry_run=True)).run(release)
    assert [r.outcome for r in result.nodes] == ["planned"] * 3 and result.exit_code == 0
    assert [r.batch for r in result.nodes] == [1, 2, 3]
    for n in nodes:
        assert actions(n, "lock", "put", "set-next", "reboot") == []


def test_inventory_command_check_is_part_of_the_gate(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(2)
    check = CheckSpec(name="app", kind="command", target="curl -f localhost", retries=2, interval=0)
    machine(nodes[0]).programs.update({None: {"curl": "exit 0"}, NEW: {"curl": "exit 7"}})
    result = Rollout(nodes, options(), checks=[check]).run(release)
    assert result.nodes[0].outcome == "rolled-back"
    assert "app: `curl -f localhost`: exit status 7" in (result.nodes[0].error or "")
    assert actions(nodes[0], "run-shell") == [("run-shell", "curl -f localhost")] * 3  # 2 tries on NEW, 1 on OLD

    # Failing on the old image too: the node could not be put back in a healthy state.
    nodes = fleet(1)
    machine(nodes[0]).programs[None] = {"curl": "exit 7"}
    result = Rollout(nodes, options(), checks=[check]).run(release)
    assert result.nodes[0].outcome == "failed"


def test_rollback_to_previous(release: StoredRelease, fleet: Fleet) -> None:
    nodes = fleet(3)
    Rollout(nodes, options()).run(release)
    clear_log(nodes)
    result = Rollout(nodes, options()).rollback()
    assert result.kind == "rollback" and result.exit_code == 0
    assert [(r.from_id, r.to_id, r.outcome) for r in result.nodes] == [(NEW, OLD, "done")] * 3
    for n in nodes:
        st = state(n)
        assert (st.booted, st.committed, st.previous) == (OLD, OLD, NEW)
        assert actions(n, "put") == []
    # Named target: already there, so nothing happens.
    again = Rollout(nodes, options()).rollback(to=OLD)
    assert [r.outcome for r in again.nodes] == ["skipped"] * 3


def test_rollback_refuses_missing_image_before_changing_anything(fleet: Fleet) -> None:
    nodes = fleet(2)
    with pytest.raises(InputError, match="node n1: no previous image"):
        Rollout(nodes, options()).rollback()
    with pytest.raises(InputError, match="node n1: web-0.5 is not staged"):
        Rollout(nodes, options()).rollback(to="web-0.5")
    assert all(actions(n, "lock", "set-next") == [] for n in nodes)


def test_options_validated() -> None:
    with pytest.raises(InputError, match="--batch"):
        RolloutOptions(batches="0")
    with pytest.raises(InputError, match="--max-failures"):
        RolloutOptions(max_failures="lots")
    with pytest.raises(InputError, match="--on-failure"):
        RolloutOptions(on_failure="panic")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="shorter than --health-timeout"):
        RolloutOptions(confirm_timeout=60, health_timeout=120)


def test_cli_rollout_and_rollback(release: StoredRelease, fleet: Fleet, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from click.testing import CliRunner

    from imagetool.cli import main

    inv = tmp_path / "inv.yaml"
    inv.write_text("nodes:\n  n1: {host: 10.0.0.1}\n  n2: {host: 10.0.0.2, groups: [web]}\n")
    nodes = {n.name: n for n in fleet(2)}
    monkeypatch.setattr("rollout.fleet.ssh_nodes", lambda specs, **kw: [nodes[s.name] for s in specs])
    store = str(release.manifest_path.parent)
    common = ["-i", str(inv), "--health-timeout", "0", "--json"]

    r = CliRunner().invoke(main, ["rollout", "web-1.1", "--store", store, "--batch", "1", *common])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [(n["node"], n["outcome"], n["batch"]) for n in doc["nodes"]] == [("n1", "done", 1), ("n2", "done", 2)]

    unhealthy(nodes["n2"], OLD)
    r = CliRunner().invoke(main, ["rollback", "--limit", "web", *common])
    assert r.exit_code == 3
    doc = json.loads(r.stdout)
    assert [(n["node"], n["outcome"]) for n in doc["nodes"]] == [("n2", "rolled-back")]
    assert state(nodes["n2"]).committed == NEW and state(nodes["n1"]).committed == NEW

    r = CliRunner().invoke(main, ["rollout", "web-1.1", "--store", store, "--batch", "0", *common])
    assert r.exit_code == 2 and "--batch" in r.output


@pytest.mark.parametrize("field", ["confirm_timeout", "boot_timeout", "health_timeout", "pause", "lock_max_age",
                                   "health_interval"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 1e12])
def test_option_seconds_are_finite_and_in_range(field: str, value: float) -> None:
    with pytest.raises(InputError, match="--" + field.replace("_", "-") + ".*expected seconds"):
        RolloutOptions(**{field: value, **({"confirm_timeout": 86400.0} if field == "health_timeout" else {})})


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e400", "x"])
def test_cli_refuses_timeouts_that_are_not_finite(value: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from imagetool.cli import main

    inv = tmp_path / "inv.yaml"
    inv.write_text("nodes:\n  n1: {host: 10.0.0.1}\n")
    for option in ("--confirm-timeout", "--boot-timeout", "--health-timeout", "--pause", "--lock-max-age"):
        r = CliRunner().invoke(main, ["rollback", "-i", str(inv), option, value])
        assert r.exit_code == 2 and "number of seconds" in r.output, (option, r.output)


@pytest.mark.parametrize("size", ["infG", "nan", "0", "-1G"])
def test_cli_refuses_sizes_that_are_not_sizes(size: str) -> None:
    import click

    from imagetool.cli.common import parse_size

    with pytest.raises(click.BadParameter):
        parse_size(size)
