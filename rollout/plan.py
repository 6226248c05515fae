"""What a rollout or rollback intends for each node: pure functions of the node's state.

A node's status (what it booted, what is committed, what is staged, what a run left pending)
and the target give one `Action` with its reason, the way colmena's `Goal` names a deployment's
phase. Nothing here talks to a node, so every rule is a unit test away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from rollout.batch import BatchSpec, split
from rollout.node import NodeStatus


class Action(str, Enum):
    ACTIVATE = "activate"  # stage if missing, one-shot boot into the target, health gate, commit
    RESUME = "resume"      # booted into the target by an interrupted run: health gate, then commit
    SETTLED = "settled"    # booted, default and committed on the target: only the health gate
    FAIL = "fail"          # cannot be done; `error` says why

    @property
    def moves(self) -> bool:
        """The node boots (or already booted) into the target in this run: it takes a batch slot."""
        return self in (Action.ACTIVATE, Action.RESUME)


@dataclass(frozen=True)
class NodePlan:
    """What the run intends for one node, and why."""

    node: str
    from_id: str | None
    to_id: str
    action: Action
    status: NodeStatus
    error: str | None = None
    reason: str = ""
    # Bytes staging would send (plan output and journal); 0 when the image is already there.
    stage_bytes: int = 0

    def failed(self, error: str) -> NodePlan:
        """The same node, now impossible (e.g. staging failed)."""
        return NodePlan(self.node, self.from_id, self.to_id, Action.FAIL, self.status, error, self.reason,
                        self.stage_bytes)


_RESUME_REASON = "booted {} by an interrupted run, not committed: health gate, then commit"


def plan_rollout(st: NodeStatus, target: str, sha256: str, size: int) -> NodePlan:
    """Move a node to the release `target` (its image has `sha256` and `size` bytes)."""
    committed = st.committed or st.default
    stale = f"; clears the one-shot boot into {st.next} an interrupted run left" if st.next else ""
    if st.settled_on(target):
        return NodePlan(st.name, committed, target, Action.SETTLED, st,
                        reason=f"already booted and committed on {target}{stale}")
    if st.booted == target and st.booted != st.default:
        return NodePlan(st.name, committed, target, Action.RESUME, st, reason=_RESUME_REASON.format(target))
    have = st.image(target)
    if have is not None and have.sha256 == sha256:
        return NodePlan(st.name, committed, target, Action.ACTIVATE, st, reason=f"{target} already staged")
    return NodePlan(st.name, committed, target, Action.ACTIVATE, st, reason="stage, then activate", stage_bytes=size)


def plan_rollback(st: NodeStatus, to: str | None) -> NodePlan:
    """Move a node back to its previous image, or to `to`, which must be staged there."""
    committed = st.committed or st.default
    target = to or st.previous
    if target is None:
        return NodePlan(st.name, committed, "", Action.FAIL, st, "no previous image recorded on the node")
    if st.settled_on(target):
        return NodePlan(st.name, committed, target, Action.SETTLED, st,
                        reason=f"already booted and committed on {target}")
    if not st.has_image(target):
        return NodePlan(st.name, committed, target, Action.FAIL, st, f"{target} is not staged on the node")
    if st.booted == target and st.booted != st.default:
        return NodePlan(st.name, committed, target, Action.RESUME, st, reason=_RESUME_REASON.format(target))
    return NodePlan(st.name, committed, target, Action.ACTIVATE, st, reason=f"{target} is kept on the node")


def batches(plan: Sequence[NodePlan], spec: BatchSpec) -> list[list[NodePlan]]:
    """The moving nodes, in plan order, cut into batches: the canary first."""
    moving = [p for p in plan if p.action.moves]
    return split(moving, spec.sizes(len(moving))) if moving else []


def only_reads(plan: Sequence[NodePlan], bootstrap: str | None) -> bool:
    """Every node is settled on the target, with no one-shot entry to clear, no run-once step
    left (`bootstrap` is None) and no lock held: the run writes nothing to any node (a status and
    a health check each), so it takes no locks. A held lock still goes the usual way: refused, or
    taken over by the take-over rule."""
    return bootstrap is None and all(
        p.action is Action.SETTLED and p.status.next is None and p.status.lock is None for p in plan)


def bootstrap_node(plan: Sequence[NodePlan], spec: BatchSpec, where: Literal["first", "last"],
                   run_once_release: dict[str, str | None]) -> str | None:
    """The node that runs the run-once step: the first or last node this rollout activates.
    When nothing moves, the first or last settled node, if the step never ran there for this
    release (a run interrupted between its commit and the step). `run_once_release` maps a node
    to the release its run-once step last ran for."""
    moving = batches(plan, spec)
    if moving:
        return (moving[0][0] if where == "first" else moving[-1][-1]).node
    settled = [p for p in plan if p.action is Action.SETTLED]
    if not settled:
        return None
    p = settled[0] if where == "first" else settled[-1]
    return p.node if run_once_release.get(p.node) != p.to_id else None
