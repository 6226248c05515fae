"""Real rollouts for the report's tests: local machines running the real node helper
(rollout.local), journaled like any run, so the report is drawn from journals a rollout wrote.

    python -m tests.report_runs BASE STATE_DIR ROLLOUT_ID

runs the interrupted one: the controller kills itself (kill -9: no end in the journal, no unlock)
the moment node n3 starts its commit, while n2, in the same batch, is still in its health gate.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from imagetool.store import StoredRelease
from rollout.checks import CheckSpec
from rollout.journal import Journal
from rollout.local import LocalMachine, local_nodes
from rollout.node import HelperNode
from rollout.update import Rollout, RolloutOptions, RolloutResult
from tests.samples import make_release

OLD, NEW = "web-1.0", "web-1.1"
# What a node's check prints when it fails: text that would end the SVG and run a script if the
# report did not escape it.
HOSTILE = "<script>alert('pwned')</script></svg><b>&amp; not bold</b>"
# The inventory's command check: `app-check` is a program of the booted image.
APP_CHECK = CheckSpec(name="app", kind="command", target="app-check", retries=1, interval=0, timeout=30)


def releases(store: Path) -> tuple[StoredRelease, StoredRelease]:
    """OLD and NEW in one store; NEW upgrades bash, adds curl and drops nano."""
    old = make_release(store, "web", "1.0", b"o" * 1000, packages={"bash": "5.2.15-2", "nano": "7.2-1"})
    new = make_release(store, "web", "1.1", b"n" * 3000, packages={"bash": "5.2.15-2+b2", "curl": "7.88.1-10"})
    return old, new


def machines(base: Path, count: int, old: StoredRelease) -> list[LocalMachine]:
    """`count` local machines n1..n<count> on OLD, whose `app-check` passes unless a test says not."""
    made = []
    for i in range(1, count + 1):
        m = LocalMachine(base / f"n{i}", timer_delay=0)
        m.install_release(old, commit=True)
        m.programs[None] = {"app-check": "echo app ok"}
        m.power_on()
        made.append(m)
    return made


def run(nodes: list[HelperNode], release: StoredRelease, state_dir: Path, rollout_id: str,
            events: object = None, **options: object) -> RolloutResult:
    opts = RolloutOptions(**{"health_timeout": 0, "health_interval": 0, "confirm_timeout": 30,
                             "rollout_id": rollout_id, **options})  # type: ignore[arg-type]
    journal = Journal(state_dir, rollout_id)
    try:
        return Rollout(nodes, opts, checks=[APP_CHECK], journal=journal, events=events).run(release)  # type: ignore[arg-type]
    finally:
        journal.close()


def failing_rollout(base: Path, state_dir: Path, rollout_id: str) -> tuple[RolloutResult, list[LocalMachine]]:
    """Four nodes in batches 1,1,2; n3's `app-check` fails on NEW with HOSTILE output, so n3 is
    rolled back; one failure is tolerated, so the others are done."""
    old, new = releases(base / "store")
    fleet = machines(base, 4, old)
    fleet[2].programs[NEW] = {"app-check": f"echo {HOSTILE!r}; echo 'second line' >&2; exit 1"}
    result = run(local_nodes(fleet), new, state_dir, rollout_id, batches="1,1,2", max_failures="1")
    return result, fleet


def rollback(machines: list[LocalMachine], state_dir: Path, rollout_id: str) -> RolloutResult:
    """`imagetool rollback` of these machines to their previous image, journaled."""
    journal = Journal(state_dir, rollout_id)
    opts = RolloutOptions(health_timeout=0, health_interval=0, rollout_id=rollout_id, command="imagetool rollback")
    try:
        return Rollout(local_nodes(machines), opts, checks=[APP_CHECK], journal=journal).rollback()
    finally:
        journal.close()


def killed_rollout(base: Path, state_dir: Path, rollout_id: str) -> None:
    """Three nodes in batches 1,2; n2's check takes 10 s on NEW; n3 starts its gate once n2 is in
    its own, and the controller is killed when n3 commits, with n2 still in its gate."""
    old, new = releases(base / "store")
    fleet = machines(base, 3, old)
    fleet[1].programs[NEW] = {"app-check": "sleep 10; echo slow"}
    n2_in_gate = threading.Event()

    def events(node: str, step: str, detail: str) -> None:
        # Called in the node's own worker thread, right after the event is journaled.
        if node == "n2" and step == "verify":
            n2_in_gate.set()
        if node == "n3" and step == "verify":
            n2_in_gate.wait(60)
        if node == "n3" and step == "commit":
            # The machines' dead-man switches outlive the controller, as on real nodes: say where
            # they are, for the test to power the machines off after.
            pids = [m._deadman.pid for m in fleet if m._deadman is not None and m._deadman.poll() is None]
            (base / "deadman.pids").write_text("".join(f"{pid}\n" for pid in pids))
            os.kill(os.getpid(), signal.SIGKILL)

    run(local_nodes(fleet), new, state_dir, rollout_id, events=events, batches="1,2")
    raise SystemExit("the controller was not killed")


if __name__ == "__main__":
    import rollout.node

    rollout.node.BOOT_POLL_INTERVAL = 0.02  # local machines reboot at once
    base_dir, state, rid = sys.argv[1:]
    killed_rollout(Path(base_dir), Path(state), rid)
