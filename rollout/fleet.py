"""The inventory's nodes as a fleet: opened for one command and closed after, and their status.

Every command that works on nodes (rollout, rollback, status, stage, gc) opens them here, so
selection (`--limit`) and host-key policy are applied the same way, and every connection is
closed on every way out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from imagetool.errors import ImagetoolError, UnreachableError
from rollout.health import HealthGate, HealthReport, check_node
from rollout.hostpattern import select
from rollout.inventory import CheckSpec, Inventory
from rollout.node import Node, NodeStatus, for_each, ssh_nodes


@contextmanager
def open_nodes(inventory: Inventory, limit: list[str] | None = None, *,
               accept_new_host_keys: bool = False) -> Iterator[list[Node]]:
    """The inventory's nodes (`limit` selects some), closed when the block ends. A bad `limit`
    raises before anything is opened."""
    nodes: list[Node] = list(ssh_nodes(select(inventory.nodes, limit), accept_new_host_keys=accept_new_host_keys))
    try:
        yield nodes
    finally:
        for n in nodes:
            n.close()


@dataclass
class NodeReport:
    """`imagetool status` for one node: its status and health, or why they are unknown."""

    name: str
    status: NodeStatus | None = None
    health: HealthReport | None = None
    health_error: str | None = None
    error: str | None = None
    # Why the status is unknown, as an exception: an unreachable node and one that answered with
    # a damaged state file are different news (and exit codes).
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    @property
    def unreachable(self) -> bool:
        return self.status is None and isinstance(self.exception, UnreachableError)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status.to_dict() if self.status else None,
                "healthy": (self.health is not None) if self.status else None,
                "health": self.health.to_dict() if self.health else None,
                "health_error": self.health_error, "error": self.error, "unreachable": self.unreachable}


def fleet_status(nodes: Sequence[Node], *, checks: Sequence[CheckSpec] = (), health: bool = True,
                 parallel: int = 8) -> list[NodeReport]:
    """Status (and a one-shot health gate) of each node; a node that fails is reported, not raised."""
    gate = HealthGate(checks=tuple(checks), timeout=0, interval=0)

    def one(n: Node) -> NodeReport:
        rep = NodeReport(n.name)
        try:
            rep.status = n.status()
        except ImagetoolError as e:
            rep.error, rep.exception = str(e), e
            return rep
        if health:
            try:
                rep.health = check_node(n, gate)
            except ImagetoolError as e:
                rep.health_error = str(e)
        return rep

    got = for_each(list(nodes), one, parallel)
    return [v if isinstance(v, NodeReport) else NodeReport(k, error=f"{type(v).__name__}: {v}", exception=v)
            for k, v in got.items()]


def inventory_status(inventory: Inventory, *, limit: list[str] | None = None, accept_new_host_keys: bool = False,
                     health: bool = True, parallel: int = 8) -> list[NodeReport]:
    with open_nodes(inventory, limit, accept_new_host_keys=accept_new_host_keys) as nodes:
        return fleet_status(nodes, checks=inventory.health_checks, health=health, parallel=parallel)
