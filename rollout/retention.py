"""Image retention on the nodes: `imagetool gc`.

Each node keeps the image it booted, its committed (default) image, the previous one (the
rollback target), any image a one-shot boot is pending for, and the `keep` newest others (the
image staged for the next rollout, typically). The node helper decides what is protected from
its own boot control, so a stale view here cannot remove an image the node needs. gc takes the
node's rollout lock, so it never races a rollout that is staging or activating an image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from imagetool.errors import ImagetoolError
from rollout.fleet import open_nodes
from rollout.inventory import Inventory
from rollout.locks import default_owner, new_rollout_id
from rollout.node import Node, for_each, under_lock


@dataclass
class GcReport:
    node: str
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    protected: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    free_bytes: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect(nodes: Sequence[Node], *, keep: int = 1, incoming: bool = False, parallel: int = 8,
            owner: str | None = None) -> list[GcReport]:
    """gc on every node, each under its rollout lock; a node that fails is reported, not raised."""
    gc_id = "gc-" + new_rollout_id()
    who = owner or default_owner()

    def one(n: Node) -> GcReport:
        rep = GcReport(n.name)
        try:
            got = under_lock(n, gc_id, who, f"imagetool gc --keep {keep}",
                             lambda node: node.gc(keep=keep, incoming=incoming))
        except ImagetoolError as e:
            rep.error = str(e)
            return rep
        rep.removed = list(got.get("removed") or [])
        rep.kept = list(got.get("kept") or [])
        rep.protected = list(got.get("protected") or [])
        rep.freed_bytes = int(got.get("freed_bytes") or 0)
        rep.free_bytes = int(got.get("free_bytes") or 0)
        return rep

    got = for_each(list(nodes), one, parallel)
    return [v if isinstance(v, GcReport) else GcReport(k, error=str(v)) for k, v in got.items()]


def inventory_gc(inventory: Inventory, *, keep: int = 1, incoming: bool = False, limit: list[str] | None = None,
                 accept_new_host_keys: bool = False, parallel: int = 8) -> list[GcReport]:
    with open_nodes(inventory, limit, accept_new_host_keys=accept_new_host_keys) as nodes:
        return collect(nodes, keep=keep, incoming=incoming, parallel=parallel)
