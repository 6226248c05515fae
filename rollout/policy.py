"""What happened to each node, and what the rollout does about it: small pure functions.

A batch's outcome is data in the shape of fabric's GroupResult (every node with its result, a
failure included), so deciding whether to go on is a function of counts that tests can call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from rollout.batch import parse_threshold

# What became of one node in a rollout or rollback:
#   done         activated (or rolled back) to the target image, healthy, committed
#   skipped      already on the target image, committed and healthy: nothing touched
#   failed       did not reach the target, and putting it back did not work either (or could not
#                be tried): look at this node
#   rolled-back  did not reach the target (or was moved and then undone by rollback-all) and is
#                back on the image it had, healthy
#   unreachable  could not be reached (at the start, or before anything was done to it): nothing
#                was done on it; a failed node like the others for the policy
#   not-started  the rollout stopped before this node's batch
#   planned      dry run: would be activated
Outcome = Literal["done", "skipped", "failed", "rolled-back", "unreachable", "not-started", "planned"]
OnFailure = Literal["rollback-node", "rollback-all"]

# Outcomes that count against --max-failures: a node rolled back after failing its health gate
# still failed, however well the rollback went, and so did one that could not be reached.
FAILED_OUTCOMES = ("failed", "rolled-back", "unreachable")
OK_OUTCOMES = ("done", "skipped", "planned")


@dataclass
class NodeResult:
    node: str
    outcome: Outcome
    from_id: str | None
    to_id: str | None
    seconds: float = 0.0
    error: str | None = None
    bytes_sent: int = 0
    batch: int | None = None
    # Set by rollback-all on a node this rollout had moved: the outcome became "rolled-back" but
    # the node itself did nothing wrong.
    undone: bool = False
    # Why the rollout did what it did with this node (the plan's reason), and for a dry run the
    # bytes staging would send.
    detail: str | None = None
    stage_bytes: int = 0

    @property
    def failed(self) -> bool:
        return self.outcome in FAILED_OUTCOMES and not self.undone

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["from"] = d.pop("from_id")
        d["to"] = d.pop("to_id")
        d["seconds"] = round(self.seconds, 1)
        return d


@dataclass
class BatchOutcome:
    """One batch: every node of it with its result."""

    index: int
    results: dict[str, NodeResult] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [name for name, r in self.results.items() if r.failed]

    @property
    def succeeded(self) -> list[str]:
        return [name for name, r in self.results.items() if r.outcome in OK_OUTCOMES]

    @property
    def moved(self) -> list[str]:
        """Nodes this batch moved to the target image (the ones rollback-all would move back)."""
        return [name for name, r in self.results.items() if r.outcome == "done"]


def should_stop(failed_count: int, size: int, max_failures: str | int = "0") -> bool:
    """Stop once a batch's failures exceed what it tolerates; reaching it exactly goes on."""
    if size <= 0:
        return False
    return failed_count > parse_threshold(max_failures, size)


Decision = Literal["continue", "stop", "rollback-all"]


def decide(batch: BatchOutcome, max_failures: str | int, on_failure: OnFailure, *, canary: bool = False,
           canary_failures_allowed: bool = False, size: int | None = None) -> Decision:
    """After one batch: go on, stop (each failed node was already put back), or undo every move.

    Judged per batch, as Ansible's max_fail_percentage: a fleet-wide budget would let a run spend
    it all on the canary and carry on. Any failure in the canary batch stops, unless the operator
    allowed it (then the canary is judged like any batch). `size`: the batch's size when it is
    not the number of its results (the failures before the first batch are judged against every
    selected node)."""
    failed = len(batch.failed)
    n = len(batch.results) if size is None else size
    if (canary and failed and not canary_failures_allowed) or should_stop(failed, n, max_failures):
        return "rollback-all" if on_failure == "rollback-all" else "stop"
    return "continue"


def exit_code(results: list[NodeResult], *, approved: bool = True) -> int:
    """0 when every node is done, skipped or (dry run) planned; 4 when every node was unreachable;
    3 when nodes failed; 9 when none failed but the operator did not approve going on after the
    canary (rejected, or the approval timed out); 3 when anything else happened."""
    if results and all(r.outcome == "unreachable" for r in results):
        return 4
    if all(r.outcome in OK_OUTCOMES for r in results):
        return 0
    if not approved and not any(r.failed for r in results):
        return 9
    return 3
