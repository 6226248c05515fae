"""The fault matrix, for real on three lab nodes: a power cut at each of the node helper's
dangerous moments, a reset during the health gate, the network cut during staging and commit, the
controller killed during staging, two controllers racing, a staged image that rots, a host key
that changes mid-rollout, a node that never comes back, a corrupt file of the node's own.

Every test ends the same way (`assert_settled`): each node booted its committed image, which is
also its default and verifies, with no one-shot entry, no lock and every unit running; and the
controller's record of the last rollout matches what each node says it committed.

A power cut at an exact moment uses the helper's failpoints: `/run/imagetool/failpoint` names the
point, the helper stops there and says so, and the test pulls the plug (`lab kill`, then `lab
start`). The tests run in file order on one cluster, each moving one node between webapp-2 and
webapp-3 from wherever the previous test left it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time

import pytest
import yaml

from imagetool import lab
from imagetool.lab.container import run_in_container
from rollout.inventory import load_inventory
from rollout.journal import find_record, state_dir
from rollout.update import RolloutOptions, RolloutResult, run_rollout
from tests.conftest import REPO, TEST_STORE, host_side_booted, kill_controller_at, make_lab, node_status, wait_for
from tests.faults import fault

pytestmark = pytest.mark.lab

LAB = "itfault"
FAST = {"confirm_timeout": 30, "boot_timeout": 45, "health_timeout": 20}


@pytest.fixture(scope="module")
def cluster(release2, lab_root):
    yield from make_lab(LAB, 3, release2, lab_root)


@pytest.fixture(scope="module")
def pair(release2, release3):
    return {release2.id: release2, release3.id: release3}


# --- what every fault test ends with --------------------------------------------------------------------


def ssh(cluster, node: str, command: str, *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    r = subprocess.run(lab.ssh_argv(cluster, cluster.node(node), command), check=False, capture_output=True,
                       text=True, timeout=timeout)
    assert not check or r.returncode == 0, f"{node}: {command}: {r.stderr}{r.stdout}"
    return r


def assert_settled(cluster, *results: RolloutResult) -> dict[str, dict]:
    """Every node on a good committed image; the controller's records agree with the nodes."""
    states = {}
    for n in cluster.nodes:
        s = node_status(cluster, n)
        assert s["booted"] == s["default"] == s["committed"] and s["committed"], (n.name, s)
        assert s["next"] is None and s["lock"] is None, (n.name, s)
        # This boot is no trial, or a trial its rollout committed (the dead-man switch is off).
        assert s["trial"] is None or s["trial"].get("committed"), (n.name, s["trial"])
        assert s["system_state"] == "running", (n.name, s["system_state"])
        verify = ssh(cluster, n.name, f"imagetool-node verify {shlex.quote(s['committed'])}", check=False)
        assert verify.returncode == 0, f"{n.name}: its committed image does not verify: {verify.stdout}"
        states[n.name] = s
    for result in results:
        record = find_record(state_dir(), result.rollout_id)
        for r in result.nodes:
            assert record.outcomes.get(r.node) == r.outcome, (r.node, record.outcomes)
            s = states[r.node]
            if r.outcome == "done":
                assert s["committed"] == result.target and s["last_rollout"] == result.rollout_id, (r.node, s)
            elif r.outcome == "skipped":
                assert s["committed"] == result.target, (r.node, s)
            else:
                assert s["committed"] != result.target, f"{r.node} is {r.outcome} but committed the target"
    return states


def target_for(cluster, node: str, pair: dict) -> tuple:
    """(the release the node is not on, the one it is on)."""
    committed = node_status(cluster, cluster.node(node))["committed"]
    (other,) = [r for rid, r in pair.items() if rid != committed]
    return other, pair[committed]


def unstage(cluster, node: str, image_id: str) -> None:
    """Forget a non-committed image on the node, so the next rollout has to send it again."""
    ssh(cluster, node, f"rm -f /var/lib/imagetool/images/{image_id}.* /var/lib/imagetool/images/.incoming/*")


def rollout(cluster, release, node: str | None = None, inventory=None, **options) -> RolloutResult:
    opts = {"batches": "1", **FAST, **options}
    if node:
        opts["limit"] = [node]
    return run_rollout(release, load_inventory(inventory or cluster.inventory), RolloutOptions(**opts))


def converge(cluster, release, node: str, **options) -> RolloutResult:
    """The operator runs the same rollout again: it must finish the job.

    A lock an earlier run of this test left (it could not unlock a node that was down) is released
    first: a new controller process takes such a lock over by itself, but this is the same process,
    still alive, and the lock rightly names it."""
    lock = node_status(cluster, cluster.node(node))["lock"]
    if lock is not None and find_record(state_dir(), lock["rollout"]).ended:
        ssh(cluster, node, f"imagetool-node unlock {shlex.quote(lock['rollout'])} --token {shlex.quote(lock['token'])}")
    result = rollout(cluster, release, node, **options)
    assert result.exit_code == 0, result.to_dict()
    assert result.node(node).outcome in ("done", "skipped")
    return result


# --- a power cut at an exact moment -------------------------------------------------------------------------


def arm(cluster, node: str, point: str) -> None:
    ssh(cluster, node, f"mkdir -p /run/imagetool && rm -f /run/imagetool/failpoint.reached && "
                       f"echo {shlex.quote(point)} > /run/imagetool/failpoint")


def power_cut_at(cluster, node: str, point: str, timeout: float = 300, armed: bool = True) -> threading.Thread:
    """Arm `point` on the node (unless the caller arms it later: a reboot empties /run); a thread
    pulls the plug when the helper reaches it and powers the node on again. Join the thread to
    know it happened."""
    if armed:
        arm(cluster, node, point)
    reached: list[bool] = []

    def watch() -> None:
        if wait_for(lambda: ssh(cluster, node, "test -f /run/imagetool/failpoint.reached", check=False,
                                timeout=10).returncode == 0, timeout, 0.5):
            reached.append(True)
            lab.kill(cluster, node)
            lab.start(cluster, node)

    thread = threading.Thread(target=watch, daemon=True)
    thread.reached = reached  # type: ignore[attr-defined]
    thread.start()
    return thread


def wait_up(cluster, node: str, timeout: float = 300) -> None:
    assert wait_for(lambda: ssh(cluster, node, "systemctl is-system-running --wait", check=False,
                                timeout=90).stdout.strip() == "running", timeout, 1), f"{node} did not come back"


@pytest.mark.parametrize("point", [
    pytest.param("stage-commit:moved-squashfs", marks=fault(
        "Power cut during stage-commit, after the image file was moved into place and before its manifest",
        "node on its committed image; the half-installed image is not listed; the re-run stages it again")),
    pytest.param("stage-commit:moved-manifest", marks=fault(
        "Power cut during stage-commit, after the last rename, before the controller heard back",
        "node on its committed image; the re-run finds the image staged and does not send it again")),
])
def test_power_cut_during_stage_commit(cluster, pair, point):
    node = "node1"
    target, current = target_for(cluster, node, pair)
    unstage(cluster, node, target.id)
    cut = power_cut_at(cluster, node, point)
    result = rollout(cluster, target, node)
    cut.join(timeout=300)
    assert cut.reached, f"the helper never reached {point}"
    assert result.exit_code != 0 and result.node(node).outcome in ("failed", "unreachable"), result.to_dict()
    wait_up(cluster, node)
    s = node_status(cluster, cluster.node(node))
    assert (s["booted"], s["committed"]) == (current.id, current.id)
    listed = {i["id"] for i in s["images"]}
    assert (target.id in listed) == (point == "stage-commit:moved-manifest"), listed
    again = converge(cluster, target, node)
    if point == "stage-commit:moved-manifest":
        assert again.bytes_sent == 0, "a staged image was sent again"
    else:
        assert again.bytes_sent > 0, "the half-installed image was sent again"
    assert_settled(cluster, again)


@pytest.mark.parametrize("point", [
    pytest.param("set-next:metadata-written", marks=fault(
        "Power cut during set-next, after the one-shot metadata, before the one-shot entry",
        "node boots its committed image again (no one-shot was armed); the re-run activates it")),
    pytest.param("commit:state-written", marks=fault(
        "Power cut between commit's two writes (state.json written, boot default not yet moved)",
        "node boots its old default and its record reads the commit as undone; the re-run activates and commits")),
])
def test_power_cut_during_activation(cluster, pair, point):
    node = "node2"
    target, current = target_for(cluster, node, pair)
    # commit runs in the new boot, whose /run is new: arm it there, once the gate starts.
    in_new_boot = point.startswith("commit:")
    cut = power_cut_at(cluster, node, point, armed=not in_new_boot)

    def events(n: str, step: str, detail: str) -> None:
        if in_new_boot and n == node and step == "verify" and detail == "health gate":
            arm(cluster, node, point)

    inv = load_inventory(cluster.inventory)
    result = run_rollout(target, inv, RolloutOptions(batches="1", limit=[node], **FAST), events=events)
    cut.join(timeout=300)
    assert cut.reached, f"the helper never reached {point}"
    assert result.exit_code != 0, result.to_dict()
    assert result.node(node).outcome in ("failed", "rolled-back"), result.to_dict()
    wait_up(cluster, node)
    s = node_status(cluster, cluster.node(node))
    assert (s["booted"], s["default"], s["next"]) == (current.id, current.id, None), s
    again = converge(cluster, target, node)
    assert again.node(node).outcome == "done"
    assert_settled(cluster, again)


@fault("Hard reset of the node during its health gate",
       "the one-shot is spent, the node boots its committed image; the node is rolled back; the re-run converges")
def test_reset_during_the_health_gate(cluster, pair):
    node = "node3"
    target, current = target_for(cluster, node, pair)
    done: list[bool] = []

    def events(n: str, step: str, detail: str) -> None:
        if n == node and step == "verify" and detail == "health gate" and not done:
            done.append(True)
            lab.reset(cluster, node)

    inv = load_inventory(cluster.inventory)
    result = run_rollout(target, inv, RolloutOptions(batches="1", limit=[node], **FAST), events=events)
    assert done and result.exit_code == 3, result.to_dict()
    assert result.node(node).outcome == "rolled-back", result.to_dict()
    assert node_status(cluster, cluster.node(node))["committed"] == current.id
    assert_settled(cluster, result)
    assert_settled(cluster, converge(cluster, target, node))


# --- the network cut ----------------------------------------------------------------------------------------------


class OnceBytesSent:
    """Progress receiver: runs `act(node)` once, when more than `after` bytes went to `node`."""

    def __init__(self, node: str, after: int, act) -> None:
        self.node, self.after, self.act = node, after, act
        self.done = False

    def stage_start(self, node, total):
        pass

    def stage_advance(self, node, done):
        if node == self.node and not self.done and done > self.after:
            self.done = True
            self.act(node)

    def stage_end(self, node, result):
        pass


@fault("Network cut for 20 s in the middle of staging",
       "node untouched on its committed image; the partial transfer is kept and the re-run resumes it")
def test_network_cut_during_staging(cluster, pair):
    node = "node1"
    target, current = target_for(cluster, node, pair)
    unstage(cluster, node, target.id)
    def cut_for_20s(n: str) -> None:
        lab.cut(cluster, n)
        threading.Timer(20, lab.heal, (cluster, n)).start()

    cut = OnceBytesSent(node, 32 * 1024**2, cut_for_20s)
    inv = load_inventory(cluster.inventory)
    # The whole image (--no-delta), so there is a long transfer to cut and a partial file to resume.
    result = run_rollout(target, inv, RolloutOptions(batches="1", limit=[node], delta=False, **FAST), progress=cut)
    assert cut.done
    time.sleep(max(0, 21 - 0))  # the heal timer has run
    if result.exit_code == 0:
        # The transport reconnected within its retries and resumed by itself.
        assert result.node(node).outcome == "done"
        assert result.bytes_sent < 2 * target.manifest.image.size
        assert_settled(cluster, result)
        return
    assert result.node(node).outcome in ("failed", "unreachable"), result.to_dict()
    s = node_status(cluster, cluster.node(node))
    assert s["committed"] == current.id and target.id not in {i["id"] for i in s["images"]}
    again = converge(cluster, target, node, delta=False)
    assert again.bytes_sent < target.manifest.image.size, "the re-run resumed the partial transfer"
    assert_settled(cluster, again)


@fault("Power cut in the middle of staging",
       "node boots its committed image; the partial transfer survives on /var and the re-run resumes it")
def test_power_cut_during_staging(cluster, pair):
    node = "node3"
    target, current = target_for(cluster, node, pair)
    unstage(cluster, node, target.id)
    def power_cycle(n: str) -> None:
        lab.kill(cluster, n)
        lab.start(cluster, n)

    cut = OnceBytesSent(node, 48 * 1024**2, power_cycle)
    inv = load_inventory(cluster.inventory)
    result = run_rollout(target, inv, RolloutOptions(batches="1", limit=[node], delta=False, **FAST), progress=cut)
    assert cut.done and result.exit_code != 0 and result.node(node).outcome in ("failed", "unreachable"), result.to_dict()
    wait_up(cluster, node)
    s = node_status(cluster, cluster.node(node))
    assert (s["booted"], s["committed"]) == (current.id, current.id) and target.id not in {i["id"] for i in s["images"]}
    assert s["lock"] is None or s["lock"]["rollout"] == result.rollout_id  # unlock may have met a node that was down
    again = converge(cluster, target, node, delta=False)
    assert again.bytes_sent < target.manifest.image.size, "the re-run resumed the partial transfer"
    assert_settled(cluster, again)


@fault("Network cut for 20 s just as the controller commits",
       "the node, confirmed, stays on the new image uncommitted; the re-run resumes at the gate and commits it")
def test_network_cut_during_commit(cluster, pair):
    node = "node2"
    target, _ = target_for(cluster, node, pair)
    cut: list[bool] = []

    def events(n: str, step: str, detail: str) -> None:
        if n == node and step == "commit" and not cut:
            cut.append(True)
            lab.cut(cluster, node)
            threading.Timer(20, lab.heal, (cluster, node)).start()

    inv = load_inventory(cluster.inventory)
    result = run_rollout(target, inv, RolloutOptions(batches="1", limit=[node], **FAST), events=events)
    assert cut
    time.sleep(21)
    if result.exit_code != 0:
        assert result.node(node).outcome in ("failed", "rolled-back"), result.to_dict()
        result = converge(cluster, target, node)
    assert_settled(cluster, result)
    assert node_status(cluster, cluster.node(node))["committed"] == target.id


# --- the controller ---------------------------------------------------------------------------------------------


@fault("Controller killed (SIGKILL) in the middle of staging",
       "node untouched; its lock is left; the re-run takes the dead controller's lock over and resumes the transfer")
def test_controller_killed_during_staging(cluster, pair):
    node = "node3"
    target, current = target_for(cluster, node, pair)
    unstage(cluster, node, target.id)
    kill_controller_at(cluster, target, node, "transfer", str(64 * 1024**2), {**FAST, "delta": False})
    s = node_status(cluster, cluster.node(node))
    assert s["lock"] is not None and s["committed"] == current.id and s["next"] is None
    again = converge(cluster, target, node, delta=False)
    assert again.bytes_sent < target.manifest.image.size, "the re-run resumed the partial transfer"
    record = find_record(state_dir(), again.rollout_id)
    assert len(record.resumes) == 1, "the dead controller's lock was taken over"
    assert_settled(cluster, again)


@fault("Two controllers start the same rollout on the same nodes at once",
       "each node is moved by exactly one of them; the other is refused by the node lock (exit 8) or finds it done")
def test_two_controllers_race(cluster, pair):
    target, _ = target_for(cluster, "node1", pair)
    for n in ("node2", "node3"):  # the whole cluster on one release first
        if node_status(cluster, cluster.node(n))["committed"] != target_for(cluster, "node1", pair)[1].id:
            converge(cluster, target_for(cluster, "node1", pair)[1], n)
    argv = [sys.executable, "-m", "imagetool", "rollout", target.id, "-i", str(cluster.inventory), "--store",
            str(TEST_STORE), "--batch", "3", "--confirm-timeout", "30", "--health-timeout", "20", "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes in ([0, 0], [0, 8]), (codes, [o[1][-1500:] for o in outs])
    done = {}
    for (stdout, _), p in zip(outs, procs, strict=True):
        if p.returncode == 0:
            for r in json.loads(stdout)["nodes"]:
                if r["outcome"] == "done":
                    assert r["node"] not in done, f"{r['node']} was moved by both controllers"
                    done[r["node"]] = True
        else:
            assert "locked by rollout" in " ".join((stdout + _).split()), _
    states = assert_settled(cluster)
    assert {s["committed"] for s in states.values()} == {target.id}


# --- the node's own files ------------------------------------------------------------------------------------------


@fault("The staged image rots on the node's disk between staging and activation",
       "set-next refuses it (sha256 mismatch) and drops it; the node stays on its committed image; "
       "the re-run sends it again")
def test_staged_image_corrupted_before_activation(cluster, pair):
    node = "node1"
    target, current = target_for(cluster, node, pair)
    unstage(cluster, node, target.id)
    r = subprocess.run([sys.executable, "-m", "imagetool", "stage", target.id, "-i", str(cluster.inventory),
                        "--store", str(TEST_STORE), "--limit", node], cwd=REPO, check=False,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    ssh(cluster, node, f"printf 'rot' | dd of=/var/lib/imagetool/images/{target.id}.squashfs bs=1 seek=1048576 "
                       "conv=notrunc status=none")
    result = rollout(cluster, target, node)
    assert result.exit_code == 3 and result.node(node).outcome in ("failed", "rolled-back"), result.to_dict()
    assert f"{target.id}: sha256 mismatch" in result.node(node).error, result.node(node).error
    assert node_status(cluster, cluster.node(node))["committed"] == current.id
    assert_settled(cluster, result)
    again = converge(cluster, target, node)
    assert again.bytes_sent > 0, "the rotten image was replaced, not trusted"
    assert_settled(cluster, again)


@fault("A node's boot control file (control.json) is corrupt when the rollout starts",
       "the node is a failed node naming the file, nothing done on it; no failure tolerated (the default), the "
       "rollout stops before anything changed (exit 3), no node touched; fixed, the re-run converges")
def test_corrupt_control_file(cluster, pair):
    target, current = target_for(cluster, "node1", pair)
    for n in ("node2", "node3"):
        if node_status(cluster, cluster.node(n))["committed"] != current.id:
            converge(cluster, current, n)
    control = "/var/lib/imagetool/boot/control.json"
    saved = ssh(cluster, "node3", f"cat {control}").stdout
    before = {n.name: node_status(cluster, n) for n in cluster.nodes[:2]}
    ssh(cluster, "node3", f"echo '[1, 2' > {control}")
    try:
        refused = rollout(cluster, target, None, batches="1,2")
        assert refused.exit_code == 3 and refused.stopped, refused.to_dict()
        assert [r.outcome for r in refused.nodes] == ["not-started", "not-started", "failed"], refused.to_dict()
        error = refused.node("node3").error or ""
        assert "node node3: " in error and "control.json is not valid JSON" in error, error
        assert "nothing was done on it" in error and "before anything was changed" in (refused.reason or "")
        for n in cluster.nodes[:2]:
            after = node_status(cluster, n)
            assert {k: after[k] for k in ("boot_id", "committed", "next", "lock")} == {
                k: before[n.name][k] for k in ("boot_id", "committed", "next", "lock")}
    finally:
        ssh(cluster, "node3", f"cat > {control} <<'EOF'\n{saved}EOF")
    assert_settled(cluster, refused)
    result = rollout(cluster, target, None, batches="1,2")
    assert result.exit_code == 0, result.to_dict()
    assert_settled(cluster, result)


# --- nodes that go away ---------------------------------------------------------------------------------------


@fault("A node is powered off when the rollout starts",
       "the node is unreachable, a failed node nothing is done on (its outcome `unreachable`; exit 4 as it is "
       "every selected node); powered on, it runs its committed image")
def test_node_down_at_the_start(cluster, pair):
    node = "node2"
    target, current = target_for(cluster, node, pair)
    lab.kill(cluster, node)
    try:
        result = rollout(cluster, target, node)
    finally:
        lab.start(cluster, node)
    assert result.exit_code == 4 and result.stopped, result.to_dict()
    r = result.node(node)
    assert r.outcome == "unreachable" and re.search(rf"node {node} \(.*\): cannot connect", r.error or ""), r
    wait_up(cluster, node)
    assert node_status(cluster, cluster.node(node))["committed"] == current.id
    assert_settled(cluster, result)
    assert_settled(cluster, converge(cluster, target, node))


def variant(cluster, name: str, **defaults) -> os.PathLike:
    doc = yaml.safe_load(cluster.inventory.read_text())
    doc["defaults"].update(defaults)
    path = cluster.dir / f"inventory-{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@fault("A node dies during its trial boot and never comes back (its reset_command fails)",
       "the node is failed with the reset's error; powered on, it boots the still-armed one-shot, which nobody "
       "confirms, and its dead-man switch brings it back to its committed image; its lock waits for the next run")
def test_node_never_comes_back(cluster, pair):
    node = "node3"
    target, current = target_for(cluster, node, pair)
    inv = variant(cluster, "dead-reset", reset_command="sh -c 'echo no power controller answers >&2; exit 1'")
    killed: list[bool] = []

    def events(n: str, step: str, detail: str) -> None:
        if n == node and step == "boot" and detail.startswith("waiting") and not killed:
            killed.append(True)
            lab.kill(cluster, node)

    result = run_rollout(target, load_inventory(inv), RolloutOptions(batches="1", limit=[node], **FAST),
                         events=events)
    assert killed and result.exit_code == 3, result.to_dict()
    r = result.node(node)
    assert r.outcome == "failed" and "no power controller answers" in r.error, r
    # Killed before its reboot, the node still had the one-shot armed: powered on, it boots the
    # target, nobody confirms it, and its dead-man switch brings it back.
    lab.start(cluster, node)
    assert wait_for(lambda: host_side_booted(cluster, node) == current.id and not trial_pending(cluster, node),
                    FAST["confirm_timeout"] + 120, 2), "the node did not come back to its committed image"
    wait_up(cluster, node)
    s = node_status(cluster, cluster.node(node))
    assert (s["booted"], s["committed"]) == (current.id, current.id), s
    # Its lock stays: the controller could not reach it to unlock. A new run takes it over.
    assert s["lock"]["rollout"] == result.rollout_id
    assert_settled(cluster, converge(cluster, target, node))


@fault("The node's SSH host key changes in the middle of its activation",
       "the controller refuses to talk to it (host key changed) and trusts nothing it says; the node's dead-man "
       "switch brings it back to its committed image")
def test_host_key_changed_mid_rollout(cluster, pair):
    node = "node1"
    target, current = target_for(cluster, node, pair)
    keydir = cluster.node_dir(node) / "var/lib/ssh"
    saved = {p.name: p.read_bytes() for p in keydir.glob("ssh_host_ed25519_key*")}
    inv = variant(cluster, "no-reset-hostkey")
    doc = yaml.safe_load(inv.read_text())
    doc["defaults"].pop("reset_command", None)
    inv.write_text(yaml.safe_dump(doc, sort_keys=False))
    swapped: list[bool] = []

    def events(n: str, step: str, detail: str) -> None:
        if n == node and step == "boot" and detail == "rebooting" and not swapped:
            swapped.append(True)
            for p in keydir.glob("ssh_host_ed25519_key*"):
                p.unlink()
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keydir / "ssh_host_ed25519_key")],
                           check=True)

    try:
        result = run_rollout(target, load_inventory(inv), RolloutOptions(batches="1", limit=[node], **FAST),
                             events=events)
        assert swapped and result.exit_code == 3, result.to_dict()
        r = result.node(node)
        assert r.outcome == "failed" and "host key changed" in r.error.lower(), r
        # Seen from the host (its console, not its SSH): the trial boot gave up and the node is back.
        assert wait_for(lambda: host_side_booted(cluster, node) == current.id
                        and lab_trial_gave_up(cluster, node, target.id), 180, 2)
    finally:
        for name, data in saved.items():
            (keydir / name).write_bytes(data)
        # sshd holds the host keys it loaded at its start (OpenSSH 9.8 and later pass them from the
        # listener to each session): the node's sshd, started in the boot above, still serves the
        # swapped key until it restarts. Restart it from the host side, as its console would.
        run_in_container(cluster, node, ["systemctl", "try-restart", "ssh.service"], timeout=120)
    wait_up(cluster, node)
    assert node_status(cluster, cluster.node(node))["committed"] == current.id
    assert_settled(cluster, converge(cluster, target, node))


def lab_trial_gave_up(cluster, node: str, image_id: str) -> bool:
    trial = cluster.node_dir(node) / "var/lib/imagetool/boot/trial.json"
    try:
        doc = json.loads(trial.read_text())
    except (OSError, ValueError):
        return False
    return doc.get("id") == image_id and bool(doc.get("gave_up"))


def trial_pending(cluster, node: str) -> bool:
    """The node's current boot is a trial nobody confirmed yet (seen from the host)."""
    control = cluster.node_dir(node) / "var/lib/imagetool/boot/control.json"
    try:
        doc = json.loads(control.read_text())
    except (OSError, ValueError):
        return True
    return host_side_booted(cluster, node) != doc.get("default")
