"""Fleets of local machines (rollout.local) for unit tests of the rollout: real node helpers
against temporary directories, every node installed on OLD, all sharing one log of what was done
to them so tests can assert the order of things across nodes."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imagetool.store import StoredRelease
from rollout.local import Action, LocalMachine, LocalTransport, local_nodes
from rollout.node import HelperNode, NodeStatus
from rollout.stage import stage
from rollout.update import RolloutOptions
from tests.samples import make_release

OLD, NEW = "web-1.0", "web-1.1"
Fleet = Callable[..., list[HelperNode]]


@pytest.fixture(autouse=True)
def fast_boot_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    # Local machines reboot at once; poll for the new boot often rather than every second.
    monkeypatch.setattr("rollout.node.BOOT_POLL_INTERVAL", 0.02)


@pytest.fixture
def release(tmp_path: Path) -> StoredRelease:
    """NEW, the release being rolled out."""
    return make_release(tmp_path / "store", "web", "1.1", b"x" * 1000)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """fleet(n, log=None, reset=False): n local nodes n1..n<n>, each installed with OLD,
    committed and booted. Their machines are powered off after the test."""
    old = make_release(tmp_path / "store", "web", "1.0", b"o" * 1000)
    made: list[LocalMachine] = []
    count = itertools.count(1)

    def make(n: int, log: list[Action] | None = None, *, reset: bool = False) -> list[HelperNode]:
        log = [] if log is None else log
        base = tmp_path / f"fleet{next(count)}"
        machines = [LocalMachine(base / f"n{i}", log=log, timer_delay=0) for i in range(1, n + 1)]
        for m in machines:
            made.append(m)
            m.install_release(old, commit=True)
            m.power_on()
        nodes = local_nodes(machines, reset=reset)
        for node in nodes:
            _record_boot_waits(node)
        return nodes

    yield make
    for m in made:
        m.power_off()


def _record_boot_waits(node: HelperNode) -> None:
    """Log each wait for a boot with its timeout, as ("wait-for-boot", seconds)."""
    wait = node.wait_for_boot

    def recorded(old_boot_id: str | None, timeout: float, cancel: Any = None) -> NodeStatus:
        machine(node).record("wait-for-boot", f"{timeout:g}")
        return wait(old_boot_id, timeout, cancel)

    node.wait_for_boot = recorded  # type: ignore[method-assign]


def options(**kw: object) -> RolloutOptions:
    base: dict[str, object] = {"health_timeout": 0, "health_interval": 0, "batches": "1,50%"}
    base.update(kw)
    return RolloutOptions(**base)  # type: ignore[arg-type]


def machine(node: HelperNode) -> LocalMachine:
    assert isinstance(node.transport, LocalTransport)
    return node.transport.machine


def state(node: HelperNode) -> NodeStatus:
    """The node's status as its helper reports it, read on its console (not logged)."""
    return NodeStatus.from_answer(node.name, machine(node).inspect())


def actions(node: HelperNode, *names: str) -> list[tuple[str, str]]:
    """(action, argument) done to the node, in order; a health check names the image it ran on."""
    return [(a.action, (a.booted or "") if a.action == "health" else a.arg)
            for a in machine(node).log if a.node == node.name and (not names or a.action in names)]


def first(log: list[Action], node: str, action: str) -> int:
    return next(i for i, a in enumerate(log) if a.node == node and a.action == action)


def clear_log(nodes: list[HelperNode]) -> None:
    for n in nodes:
        machine(n).log.clear()


def settle_on(node: HelperNode, release: StoredRelease, rollout_id: str = "r-1") -> None:
    """Take the node to `release` by hand, through its helper: stage, one-shot boot, confirm,
    commit (what a finished rollout leaves)."""
    boot_into(node, release, rollout_id)
    node.confirm(release.id)
    node.commit(release.id, rollout_id)


def boot_into(node: HelperNode, release: StoredRelease, rollout_id: str, confirm_timeout: float = 300) -> None:
    """Stage `release` and boot it once, unconfirmed (a trial boot)."""
    stage(node, release)
    node.set_next(release.id, confirm_timeout, rollout_id)
    old = node.reboot()
    node.wait_for_boot(old, 10)
