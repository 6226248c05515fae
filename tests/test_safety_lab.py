"""Rollouts that survive operators and failures, for real on three lab nodes: plan, locks, hooks
and run-once, the dead-man switch under a network cut, a controller killed at each step, a /var
that fills up during staging, and gc.

The tests run in file order and share one cluster; each says what it starts from.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from imagetool import lab
from imagetool.cli import main
from rollout.inventory import load_inventory
from rollout.journal import find_record, state_dir
from rollout.update import RolloutOptions, run_rollout
from tests.conftest import TEST_STORE, host_side_booted, kill_controller_at, make_lab, node_status, wait_for
from tests.derive import derive_release
from tests.faults import fault

pytestmark = pytest.mark.lab

LAB = "itsafe"
# The dead-man switch must outlast boot plus the health gate; short, to keep the waits short.
FAST = dict(confirm_timeout=30, boot_timeout=45, health_timeout=20)


@pytest.fixture(scope="module")
def cluster(release1, lab_root):
    yield from make_lab(LAB, 3, release1, lab_root)


def variant(cluster, name: str, *, reset: bool = True, **extra) -> Path:
    """A copy of the lab's inventory (beside it, so relative key paths hold) with changes."""
    doc = yaml.safe_load(cluster.inventory.read_text())
    if not reset:
        doc["defaults"].pop("reset_command")
    doc.update(extra)
    path = cluster.dir / f"inventory-{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def ssh(cluster, node: str, *argv: str, shell: str | None = None) -> str:
    """Run argv (quoted) or a shell command line on the node over real SSH."""
    command = shell if shell is not None else shlex.join(argv)
    r = subprocess.run(lab.ssh_argv(cluster, cluster.node(node), command), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr + r.stdout
    return r.stdout


def state(cluster, node: str) -> dict:
    """What a rollout may change on a node: boot control, commit state, images, lock, boot id."""
    s = node_status(cluster, cluster.node(node))
    return {k: s[k] for k in ("booted", "default", "next", "committed", "previous", "boot_id", "lock", "trial",
                              "run_once", "last_rollout")} | {"images": sorted((i["id"], i["sha256"]) for i in s["images"])}


def states(cluster) -> dict:
    return {n.name: state(cluster, n.name) for n in cluster.nodes}


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


# --- plan ---------------------------------------------------------------------------------------------


def test_plan_changes_nothing(cluster, release1, release2):
    before = states(cluster)
    r = cli("plan", release2.id, "-i", str(cluster.inventory), "--store", str(TEST_STORE), "--batch", "1,2", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["dry_run"] and plan["batches"] == [["node1"], ["node2", "node3"]]
    for n in plan["nodes"]:
        assert n["outcome"] == "planned" and n["from"] == release1.id and n["to"] == release2.id
        # Each holds webapp-1, which the store has too: the estimate is the delta, not the image.
        assert 0 < n["stage_bytes"] <= 0.02 * release2.manifest.image.size, n
        assert f"stage (delta from {release1.id})" in n["detail"], n
    assert states(cluster) == before, "plan changed a node"
    # The human form says the same, with nothing sent.
    r = cli("plan", release2.id, "-i", str(cluster.inventory), "--store", str(TEST_STORE))
    words = " ".join(r.stdout.split())
    assert r.exit_code == 0 and "nothing was changed" in words and "activate" in words, r.output
    assert states(cluster) == before


# --- locks, hooks, run-once --------------------------------------------------------------------------------


@fault("A node is locked by another rollout (a foreign, stale lock)",
       "refused with exit 8 naming the holder, nothing touched; --break-lock takes it over and the rollout converges")
def test_locked_node_refuses_then_break_lock_takes_over_and_hooks_run(cluster, release1, release2, tmp_path):
    """r1 → r2 on all nodes, with a foreign lock on node3, hooks around every node and a run-once
    migration on the first."""
    ssh(cluster, "node3", "imagetool-node", "lock", "r-foreign", "--owner", "dev@elsewhere",
        "--command", "imagetool rollout webapp-9", "--pid", "1")
    before = states(cluster)
    hook_log = tmp_path / "hooks.log"
    record = f'echo "$IMAGETOOL_HOOK $IMAGETOOL_NODE $IMAGETOOL_HOST $IMAGETOOL_FROM $IMAGETOOL_RELEASE" >> {hook_log}'
    inv = variant(cluster, "hooks", hooks={
        "before_activate": [{"name": "drain", "run": record}],
        "after_commit": [{"name": "undrain", "run": record},
                         {"name": "mark", "where": "node", "run": 'echo "$IMAGETOOL_RELEASE" > /run/hook-mark'}],
    }, run_once={"name": "migrate", "where": "node", "node": "first",
                 "run": 'mkdir -p /var/lib/webapp && echo "$IMAGETOOL_RELEASE" >> /var/lib/webapp/migrations'})
    common = ["-i", str(inv), "--store", str(TEST_STORE), "--batch", "1,2", "--confirm-timeout", "60",
              "--health-timeout", "30"]

    r = cli("rollout", release2.id, *common)
    assert r.exit_code == 8, r.output
    assert "node node3: locked by rollout r-foreign of dev@elsewhere, pid 1" in r.output and "--break-lock" in r.output
    assert states(cluster) == before, "a refused rollout changed a node"
    assert not hook_log.exists()

    r = cli("rollout", release2.id, *common, "--break-lock", "--lock-max-age", "0", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert [n["outcome"] for n in result["nodes"]] == ["done"] * 3
    rec = find_record(state_dir(), result["rollout_id"])
    assert rec.state == "ok" and rec.resumes == ["r-foreign"]
    assert any(e.get("step") == "warning" and "broke the lock of rollout r-foreign of dev@elsewhere" in e["detail"]
               for e in rec.events)
    assert all(s["lock"] is None for s in states(cluster).values()), "locks released"

    lines = hook_log.read_text().splitlines()
    addr = {n.name: n.address for n in cluster.nodes}
    assert lines[:2] == [f"before_activate node1 {addr['node1']} {release1.id} {release2.id}",
                         f"after_commit node1 {addr['node1']} {release1.id} {release2.id}"]
    assert sorted(lines[2:]) == sorted(f"{hook} {n} {addr[n]} {release1.id} {release2.id}"
                                       for hook in ("before_activate", "after_commit") for n in ("node2", "node3"))
    for n in ("node1", "node2", "node3"):
        assert ssh(cluster, n, "cat", "/run/hook-mark").strip() == release2.id
    assert ssh(cluster, "node1", "cat", "/var/lib/webapp/migrations").split() == [release2.id]
    assert ssh(cluster, "node2", shell="ls /var/lib/webapp/migrations 2>/dev/null || true").strip() == ""
    assert state(cluster, "node1")["run_once"]["release"] == release2.id

    # The same rollout again: nothing moves, no hook runs, the migration is not run again.
    boots = {n: s["boot_id"] for n, s in states(cluster).items()}
    r = cli("rollout", release2.id, *common, "--json")
    assert r.exit_code == 0, r.output
    assert {n["outcome"] for n in json.loads(r.stdout)["nodes"]} == {"skipped"}
    assert len(hook_log.read_text().splitlines()) == 6
    assert ssh(cluster, "node1", "cat", "/var/lib/webapp/migrations").split() == [release2.id]
    assert {n: s["boot_id"] for n, s in states(cluster).items()} == boots

    r = cli("history", "--json")
    assert r.exit_code == 0 and result["rollout_id"] in [h["id"] for h in json.loads(r.stdout)]
    r = cli("history", result["rollout_id"], "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["outcomes"] == {"node1": "done", "node2": "done", "node3": "done"}


@fault("An after_commit hook fails on the canary",
       "the node is moved back to the image it had; the other nodes are only staged")
def test_failing_hook_rolls_the_node_back(cluster, release2, release3):
    """From all on r2: an after_commit hook that fails on node1 moves it back to r2."""
    inv = variant(cluster, "failing-hook", hooks={"after_commit": [
        {"name": "register", "run": 'echo "load balancer refused $IMAGETOOL_NODE" >&2; exit 4'}]})
    before = states(cluster)
    result = run_rollout(release3, load_inventory(inv), RolloutOptions(batches="1", **FAST))
    assert result.exit_code == 3, result.to_dict()
    canary = result.node("node1")
    assert canary.outcome == "rolled-back"
    assert "after_commit hook 'register' (controller) exited 4" in canary.error
    assert "load balancer refused node1" in canary.error
    s = node_status(cluster, cluster.nodes[0])
    assert (s["booted"], s["default"], s["committed"]) == (release2.id,) * 3 and s["system_state"] == "running"
    after = states(cluster)
    for n in ("node2", "node3"):  # staged (the rollout stages everywhere first), nothing else
        assert {**after[n], "images": None} == {**before[n], "images": None}, f"{n} was touched"


# --- the dead-man switch ------------------------------------------------------------------------------------


@fault("Network cut after the trial boot, before the controller confirms, with no out-of-band reset",
       "the node's own dead-man switch boots its committed image within confirm_timeout")
def test_network_cut_after_boot_the_node_returns_by_itself(cluster, release2, release3):
    """From all on r2: node1 boots r3 and loses its network before the controller can confirm.
    With no out-of-band reset, only the node's own dead-man switch can bring it back."""
    inv = load_inventory(variant(cluster, "no-reset", reset=False))
    cut_at: list[float] = []
    came_back: list[float] = []

    def events(node: str, step: str, detail: str) -> None:
        if node == "node1" and step == "verify" and detail == "health gate" and not cut_at:
            lab.cut(cluster, "node1")
            cut_at.append(time.monotonic())
            threading.Thread(target=heal_when_back, daemon=True).start()

    def heal_when_back() -> None:
        # Seen from the host while the node is cut off: its firmware boots r2 again.
        if wait_for(lambda: host_side_booted(cluster, "node1") == release2.id, 240, 0.5):
            came_back.append(time.monotonic())
        lab.heal(cluster, "node1")

    result = run_rollout(release3, inv, RolloutOptions(batches="1", limit=["node1"], **FAST), events=events)
    assert cut_at and came_back, "the cut happened and the node came back while cut"
    assert came_back[0] - cut_at[0] <= FAST["confirm_timeout"] + 30
    assert result.exit_code == 3 and result.node("node1").outcome == "rolled-back", result.to_dict()
    s = node_status(cluster, cluster.nodes[0])
    assert (s["booted"], s["committed"], s["next"]) == (release2.id, release2.id, None)
    assert s["system_state"] == "running"
    # The persistent journal kept the trial boot's own account of giving up.
    log = ssh(cluster, "node1", "journalctl", "-b", "-1", "-u", "imagetool-node-boot", "--no-pager")
    assert f"{release3.id} was not confirmed within 30s" in log

    # A re-run, network healthy, converges.
    result = run_rollout(release3, inv, RolloutOptions(batches="1", limit=["node1"], **FAST))
    assert result.exit_code == 0, result.to_dict()
    assert state(cluster, "node1")["committed"] == release3.id


# --- the controller killed at each step --------------------------------------------------------------------


@pytest.mark.parametrize("point", [
    pytest.param("after set-next", marks=fault("Controller killed (SIGKILL) after set-next, before the reboot",
                                               "the re-run takes the lock over and activates the node")),
    pytest.param("after reboot", marks=fault(
        "Controller killed (SIGKILL) while the node boots the new image",
        "nobody confirms: the node returns to its committed image; the re-run converges")),
    pytest.param("after health", marks=fault("Controller killed (SIGKILL) after the health gate, before commit",
                                             "the re-run resumes at the gate and commits without a reboot")),
    pytest.param("after commit", marks=fault("Controller killed (SIGKILL) after commit, before unlock",
                                             "the re-run finds the node done: skipped, no reboot")),
])
def test_controller_killed_then_rerun_converges(cluster, release2, release3, point):
    """node2 moves between r2 and r3; the controller is killed -9 at `point`, then the same
    command runs again and finishes the job from the node's real state."""
    node = "node2"
    start = state(cluster, node)
    target = release3 if start["committed"] == release2.id else release2
    step, prefix = {"after set-next": ("boot", "rebooting"), "after reboot": ("boot", "waiting"),
                    "after health": ("commit", ""), "after commit": ("done", "")}[point]
    kill_controller_at(cluster, target, node, step, prefix, FAST)
    if point == "after reboot":
        # The node is going down into the new image and nobody will confirm it: it comes back
        # on its committed image by itself.
        assert wait_for(lambda: (s := state_or_none(cluster, node)) is not None
                        and s["booted"] == start["committed"] and s["boot_id"] != start["boot_id"]
                        and s["trial"] is None, 180, 2), "the trial boot gave up and the node is back"
        trial = json.loads(ssh(cluster, node, "cat", "/var/lib/imagetool/boot/trial.json"))
        assert trial["id"] == target.id and trial["gave_up"] and not trial["confirmed"]
    caught = state(cluster, node)
    assert caught["lock"] is not None, "a killed controller leaves its lock behind"
    if point == "after set-next":
        assert caught["next"] == target.id and caught["booted"] == start["committed"]
    elif point == "after health":
        assert caught["booted"] == target.id and caught["committed"] == start["committed"]
    elif point == "after commit":
        assert caught["committed"] == target.id and caught["booted"] == target.id

    before_rerun = state(cluster, node)
    result = run_rollout(target, load_inventory(cluster.inventory), RolloutOptions(batches="1", limit=[node], **FAST))
    assert result.exit_code == 0, result.to_dict()
    end = state(cluster, node)
    assert (end["booted"], end["default"], end["committed"], end["next"]) == (target.id, target.id, target.id, None)
    assert end["lock"] is None
    assert node_status(cluster, cluster.node(node))["system_state"] == "running"
    outcome = result.node(node).outcome
    if point == "after commit":
        assert outcome == "skipped" and end["boot_id"] == before_rerun["boot_id"], "no reboot for a done node"
    elif point == "after health":
        assert outcome == "done" and end["boot_id"] == before_rerun["boot_id"], "resumed at the gate, no reboot"
    else:
        assert outcome == "done"
    rec = find_record(state_dir(), result.rollout_id)
    assert len(rec.resumes) == 1, "the dead controller's lock was taken over"
    assert find_record(state_dir(), rec.resumes[0]).state == "interrupted"


def state_or_none(cluster, node: str) -> dict | None:
    try:
        return state(cluster, node)
    except (AssertionError, subprocess.TimeoutExpired):
        return None


# --- a full disk during staging ------------------------------------------------------------------------------


@fault("/var is full before staging, or fills up during the transfer",
       "refused with the free space named; the partial transfer is removed; the node is untouched")
def test_var_full_during_staging(cluster, release2, test_store):
    """node3 (on r2) gets an image it does not have while its /var is, or becomes, full."""
    r4 = derive_release(test_store, release2, "4", lambda tree: (tree / "etc/webapp-4").write_text("4\n"))
    inv = load_inventory(cluster.inventory)
    before = state(cluster, "node3")
    try:
        lab.fill(cluster, "node3", leave=64 * 1024**2)
        result = run_rollout(r4, inv, RolloutOptions(batches="1", limit=["node3"], **FAST))
        assert result.exit_code == 3
        error = result.node("node3").error
        assert "not enough space to stage webapp-4" in error and "free in /var/lib/imagetool/images/.incoming" in error
        assert state(cluster, "node3") == before
        lab.unfill(cluster, "node3")

        class FillsUp:
            """Fills node3's /var as soon as the transfer is under way."""

            filled = False

            def stage_start(self, node, total):
                pass

            def stage_advance(self, node, done):
                if not self.filled and done > 16 * 1024**2:
                    lab.fill(cluster, "node3", leave=32 * 1024**2)
                    self.filled = True

            def stage_end(self, node, result):
                pass

        progress = FillsUp()
        # The whole image (--no-delta): webapp-4 is a small delta from what node3 holds.
        result = run_rollout(r4, inv, RolloutOptions(batches="1", limit=["node3"], delta=False, **FAST),
                             progress=progress)
        assert progress.filled and result.exit_code == 3, result.node("node3")
        error = result.node("node3").error
        assert "/var filled up while staging webapp-4" in error
        assert "partial transfer was removed" in error
        assert state(cluster, "node3") == before, "the running node is untouched"
        assert ssh(cluster, "node3", "ls", "/var/lib/imagetool/images/.incoming/").strip() == ""
        assert node_status(cluster, cluster.node("node3"))["system_state"] == "running"
    finally:
        lab.unfill(cluster, "node3")


def test_stage_alone_takes_the_node_lock(cluster, release2, test_store):
    r4 = derive_release(test_store, release2, "4", lambda tree: (tree / "etc/webapp-4").write_text("4\n"))
    ssh(cluster, "node2", "imagetool-node", "lock", "r-busy", "--owner", "ops@other", "--command", "imagetool rollout")
    before = state(cluster, "node2")
    r = cli("stage", r4.id, "-i", str(cluster.inventory), "--store", str(TEST_STORE), "--limit", "node2")
    assert r.exit_code == 8, r.output
    assert "locked by rollout r-busy of ops@other" in " ".join(r.output.split())
    assert state(cluster, "node2") == before
    ssh(cluster, "node2", "imagetool-node", "unlock", "r-busy")
    r = cli("stage", r4.id, "-i", str(cluster.inventory), "--store", str(TEST_STORE), "--limit", "node2", "--json")
    assert r.exit_code == 0, r.output
    after = state(cluster, "node2")
    assert after["lock"] is None and (r4.id, r4.manifest.image.sha256) in after["images"]
    assert {k: v for k, v in after.items() if k != "images"} == {
        k: v for k, v in before.items() if k not in ("images", "lock")} | {"lock": None}


# --- gc --------------------------------------------------------------------------------------------------------


def test_gc_keeps_what_it_must(cluster):
    before = {n.name: node_status(cluster, n) for n in cluster.nodes}
    r = cli("gc", "-i", str(cluster.inventory), "--keep", "0", "--json")
    assert r.exit_code == 0, r.output
    reports = {g["node"]: g for g in json.loads(r.stdout)["nodes"]}
    for name, s in before.items():
        must = {s["booted"], s["committed"], s["previous"]} - {None}
        left = {i["id"] for i in node_status(cluster, cluster.node(name))["images"]}
        assert must <= left, (name, must, left)
        assert left == must, f"{name}: gc --keep 0 leaves only what the node may boot"
        assert set(reports[name]["removed"]) == {i["id"] for i in s["images"]} - must
        for image in must:
            ssh(cluster, name, "imagetool-node", "verify", image)
    # The previous image still works: roll node1 back to it.
    s = before["node1"]
    r = cli("rollback", "-i", str(cluster.inventory), "--limit", "node1", "--health-timeout", "20",
            "--confirm-timeout", "30", "--json")
    assert r.exit_code == 0, r.output
    assert state(cluster, "node1")["committed"] == s["previous"]
