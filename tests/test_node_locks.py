"""The node's rollout lock, on the real helper: lock, take-over and unlock are compare-and-swap
operations, so racing helpers (separate processes, started together) have exactly one winner, a
release never removes a lock taken over since, and no crash or corrupt file wedges the node.

The racers are real `imagetool-node` processes against one node directory. Each waits at a gate
(a file) and then runs the helper's main, so they hit the lock within a millisecond or so of each
other rather than one process start apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.test_node_helper import HELPER, NodeRoot

# Says it is ready, waits for the gate file, then runs the helper as its own __main__, exactly as
# on a node.
RACER = """
import os, runpy, sys, time
ready, gate, helper = sys.argv[1:4]
open(ready, "w").close()
deadline = time.monotonic() + 30
while not os.path.exists(gate) and time.monotonic() < deadline:
    time.sleep(0.0002)
sys.argv = [helper, *sys.argv[4:]]
runpy.run_path(helper, run_name="__main__")
"""


@pytest.fixture
def node(tmp_path: Path) -> NodeRoot:
    return NodeRoot(tmp_path / "node")


def race(node: NodeRoot, commands: Sequence[Sequence[str]], helper: Path = HELPER) -> list[dict[str, Any]]:
    """Run every command at once, each in its own helper process; their answers, in order."""
    gates = node.root / f"gates-{time.monotonic_ns()}"
    gates.mkdir()
    gate = gates / "open"
    env = {**os.environ, "IMAGETOOL_NODE_ROOT": str(node.root), "IMAGETOOL_NODE_BOOT_ID_FILE": str(node.boot_id)}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(gates / f"ready-{i}"), str(gate), str(helper), *cmd],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, cmd in enumerate(commands)]
    # Open the gate once every racer has started and waits at it.
    deadline = time.monotonic() + 30
    while len(list(gates.glob("ready-*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.001)
    gate.touch()
    answers = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        lines = out.strip().splitlines()
        answers.append(json.loads(lines[-1]) if lines else {"ok": False, "error": f"no answer: {err[-300:]}"})
    return answers


def lock_file(node: NodeRoot) -> dict[str, Any] | None:
    path = node.var / "lock"
    return json.loads(path.read_text()) if path.exists() else None


def take(node: NodeRoot, rollout: str, token: str, *extra: str, ok: bool = True) -> dict[str, Any]:
    return node.run("lock", rollout, "--owner", "ops@ctl", "--command", "imagetool rollout", "--token", token,
                    *extra, ok=ok)


# --- many at once: exactly one winner -----------------------------------------------------------------

ROUNDS, RACERS = 5, 8


def test_concurrent_takeovers_of_one_stale_lock_have_exactly_one_winner(node: NodeRoot) -> None:
    """ROUNDS rounds of RACERS controllers taking over the same stale lock at the same moment."""
    winners_per_round = []
    for r in range(ROUNDS):
        stale = take(node, f"r-stale{r}", f"stale-token-{r}", "--take-over-token",
                     (lock_file(node) or {}).get("token", "none0000"), ok=True)["lock"]
        answers = race(node, [["lock", f"r-{r}-{i}", "--owner", f"ctl{i}@x", "--token", f"token-{r}-{i:02d}",
                               "--take-over", stale["rollout"], "--take-over-token", stale["token"]]
                              for i in range(RACERS)])
        winners = [a for a in answers if a["ok"]]
        winners_per_round.append(len(winners))
        assert len(winners) == 1, answers
        assert winners[0]["broken"]["token"] == stale["token"]
        assert lock_file(node) == winners[0]["lock"], "the lock on disk is the winner's"
        assert all(a["error"].startswith("locked by rollout r-") for a in answers if not a["ok"]), answers
    assert winners_per_round == [1] * ROUNDS


def test_concurrent_first_locks_have_exactly_one_winner(node: NodeRoot) -> None:
    for r in range(ROUNDS):
        answers = race(node, [["lock", f"r-{r}-{i}", "--owner", "o@x", "--token", f"token-{r}-{i:02d}"]
                              for i in range(RACERS)])
        winners = [a for a in answers if a["ok"]]
        assert len(winners) == 1, answers
        assert lock_file(node) == winners[0]["lock"]
        node.run("unlock", winners[0]["lock"]["rollout"], "--token", winners[0]["lock"]["token"])


def test_two_controllers_with_the_same_rollout_id_do_not_both_hold_it(node: NodeRoot) -> None:
    for r in range(ROUNDS):
        answers = race(node, [["lock", "r-same", "--owner", "o@x", "--token", f"token-{r}-{i:02d}"]
                              for i in range(RACERS)])
        winners = [a for a in answers if a["ok"]]
        assert len(winners) == 1, answers
        assert all("another controller with the same rollout id" in a["error"] for a in answers if not a["ok"])
        node.run("unlock", "r-same", "--token", winners[0]["lock"]["token"])
    # One after the other: the holder's own token resumes; any other is refused.
    take(node, "r-same", "token-first")
    assert take(node, "r-same", "token-first")["resumed"] is True
    refused = take(node, "r-same", "token-second", ok=False)["error"]
    assert refused.startswith("locked by rollout r-same") and "same rollout id" in refused
    assert lock_file(node)["token"] == "token-first"  # type: ignore[index]


def test_an_unlock_racing_a_takeover_never_removes_the_new_lock(node: NodeRoot) -> None:
    """The old holder releases while another controller takes its lock over: whatever order the
    node sees them in, a take-over that answered ok leaves its lock in place."""
    for r in range(2 * ROUNDS):
        old = take(node, f"r-old{r}", f"old-token-{r:02d}")["lock"]
        unlock, lock = race(node, [
            ["unlock", old["rollout"], "--token", old["token"]],
            ["lock", f"r-new{r}", "--owner", "o@x", "--token", f"new-token-{r:02d}",
             "--take-over", old["rollout"], "--take-over-token", old["token"]],
        ])
        assert lock["ok"], lock
        assert lock_file(node) == lock["lock"], (unlock, lock)
        # Either the release came first (the take-over found the node free) or it was refused.
        assert (unlock["ok"] and lock["broken"] is None) or (not unlock["ok"] and lock["broken"]["rollout"] == old["rollout"])
        node.run("unlock", f"r-new{r}", "--token", f"new-token-{r:02d}")


def test_unlock_after_a_takeover_is_refused_and_leaves_the_lock(node: NodeRoot) -> None:
    old = take(node, "r-1", "token-one1")["lock"]
    take(node, "r-2", "token-two2", "--take-over", "r-1", "--take-over-token", old["token"])
    error = node.run("unlock", "r-1", "--token", "token-one1", ok=False)["error"]
    assert error.startswith("lock is held by rollout r-2")
    # The same rollout id taken over by another run of it: the stale token is refused too.
    take(node, "r-2", "token-2bis", "--take-over", "r-2", "--take-over-token", "token-two2")
    error = node.run("unlock", "r-2", "--token", "token-two2", ok=False)["error"]
    assert "held under another token" in error and "left in place" in error
    assert lock_file(node)["token"] == "token-2bis"  # type: ignore[index]
    # A take-over naming a lock that is no longer there changes nothing.
    error = take(node, "r-3", "token-3333", "--take-over-token", "token-two2", ok=False)["error"]
    assert error.startswith("locked by rollout r-2")
    node.run("unlock", "r-2", "--token", "token-2bis")
    assert node.run("status")["lock"] is None


# --- crashes and corrupt files ----------------------------------------------------------------------------


@pytest.mark.parametrize("content, why", [
    (b"", "is empty"),
    (b'{"rollout": "r-1", "ow', "is not valid JSON"),
    (b"\xff\xfe\x00garbage", "is not valid JSON"),
    (b"[]", "holds a JSON list, not an object"),
    (b'"r-1"', "holds a JSON str, not an object"),
    (b"null", "holds a JSON NoneType, not an object"),
    (b'{"owner": "a@b"}', "names no rollout"),
])
def test_an_unreadable_lock_is_reported_and_taken_over_by_the_normal_rules(node: NodeRoot, content: bytes,
                                                                             why: str) -> None:
    """What an older helper's crash between creating and writing the lock leaves (or a rotting
    disk): never a traceback, never a wedge; the lock is shown as unreadable and can be broken."""
    (node.var / "lock").write_bytes(content)
    held = node.run("status")["lock"]
    assert held["rollout"] is None and why in held["unreadable"] and held["token"].startswith("sha256-")
    assert isinstance(held["time"], float)
    refused = take(node, "r-2", "token-two2", ok=False)["error"]
    assert refused.startswith("locked by an unreadable lock file") and why in refused
    assert "unlocked" not in node.run("unlock", "r-2", "--token", "token-two2", ok=False)
    got = take(node, "r-2", "token-two2", "--take-over-token", held["token"])
    assert got["broken"]["unreadable"] == held["unreadable"]
    assert lock_file(node) == got["lock"]


def test_an_unreadable_lock_breaks_for_an_older_controller_by_age(node: NodeRoot) -> None:
    (node.var / "lock").write_bytes(b"")
    old = time.time() - 7200
    os.utime(node.var / "lock", (old, old))
    node.run("lock", "r-2", "--owner", "c@d", "--break-older-than", "10800", ok=False)
    assert node.run("lock", "r-2", "--owner", "c@d", "--break-older-than", "3600")["broken"]["unreadable"]


def test_a_writer_killed_mid_write_leaves_no_lock_and_no_wedge(node: NodeRoot) -> None:
    """This helper writes the lock to a temporary file and renames it into place, so a crash
    mid-write leaves only that temporary file: the node is not locked, and the next lock
    proceeds (and clears the leftover)."""
    leftover = node.var / ".lock.new-abc123"
    leftover.write_text('{"rollout": "r-1", "ow')
    assert node.run("status")["lock"] is None
    take(node, "r-2", "token-two2")
    assert not leftover.exists()
    assert lock_file(node)["rollout"] == "r-2"  # type: ignore[index]


def test_a_helper_killed_holding_the_guard_does_not_wedge(node: NodeRoot) -> None:
    """The guard is a flock(2): the kernel releases it when its holder dies, however it dies."""
    env = {**os.environ, "IMAGETOOL_NODE_ROOT": str(node.root)}
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(node.var / '.lock.guard')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        holder.kill()
        holder.wait(timeout=10)
    finally:
        if holder.poll() is None:
            holder.kill()
    take(node, "r-1", "token-one1")


# --- what older controllers and helpers wrote ----------------------------------------------------------------


def test_a_lock_without_a_token_keeps_the_older_controllers_rules(node: NodeRoot) -> None:
    """An older controller (protocol 2) sends no token: its lock resumes, is released and is taken
    over by rollout id, as before. The node still names such a lock by a digest of its bytes, so
    a newer controller takes it over by compare-and-swap too."""
    node.run("lock", "r-1", "--owner", "ops@ctl", "--pid", "4242")
    assert node.run("lock", "r-1", "--owner", "ops@ctl", "--pid", "4242")["resumed"] is True
    held = node.run("status")["lock"]
    assert held["pid"] == 4242 and held["token"].startswith("sha256-") and "token" not in lock_file(node)  # type: ignore[operator]
    # A newer controller's run of the same rollout id is another controller: refused.
    assert "same rollout id" in take(node, "r-1", "token-new1", ok=False)["error"]
    # Its tokened release of a lock it never took is refused; the older controller's goes through.
    assert "another token" in node.run("unlock", "r-1", "--token", "token-new1", ok=False)["error"]
    node.run("unlock", "r-1")
    node.run("lock", "r-1", "--owner", "ops@ctl")
    held = node.run("status")["lock"]
    got = take(node, "r-2", "token-two2", "--take-over", "r-1", "--take-over-token", held["token"])
    assert got["broken"]["rollout"] == "r-1"
    # ... and a lock with a token is not released by an older controller's unlock of its id.
    take(node, "r-3", "token-three", "--take-over-token", "token-two2")
    assert "another token" in node.run("unlock", "r-3", ok=False)["error"]


def test_bad_tokens_and_holders_are_refused(node: NodeRoot) -> None:
    assert "invalid lock token" in take(node, "r-1", "short", ok=False)["error"]
    assert "invalid lock token" in take(node, "r-1", "token-ok11", "--take-over-token", "a b c d e f", ok=False)["error"]
    assert "--holder" in take(node, "r-1", "token-ok11", "--holder", "[1, 2]", ok=False)["error"]
    assert "--holder" in take(node, "r-1", "token-ok11", "--holder", '{"a": [1]}', ok=False)["error"]
    assert not (node.var / "lock").exists()
    holder = {"boot_id": "b", "pid_ns": "pid:[1]", "pid": 7, "start": 99, "machine_id": "m"}
    take(node, "r-1", "token-ok11", "--holder", json.dumps(holder))
    assert node.run("status")["lock"]["holder"] == holder
