"""What happened to each node, and what the rollout does about it: small pure functions.

A batch's outcome is data in the shape of fabric's GroupResult (every node with its result, a
failure included), so deciding whether to go on is a function of counts that tests can call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# What became of one node in a rollout or rollback:
#   done         activated (or rolled back) to the target image, healthy, committed
#   skipped      already on the target image, committed and healthy: nothing touched
#   failed       did not reach the target, and putting it back did not work either (or could not
#                be tried): look at this node
#   rolled-back  did not reach the target (or was moved and then undone by rollback-all) and is
#                back on the image it had, healthy
#   not-started  the rollout stopped before this node's batch
#   planned      dry run: would be activated
Outcome = Literal["done", "skipped", "failed", "rolled-back", "not-started", "planned"]
OnFailure = Literal["rollback-node", "rollback-all"]

# Outcomes that count against --max-failures: a node rolled back after failing its health gate
# still failed, however well the rollback went.
FAILED_OUTCOMES = ("failed", "rolled-back")
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


def should_stop(failed_count: int, total: int, max_failures: int = 0) -> bool:
    """Stop once failures exceed the tolerated number; reaching it exactly goes on.

    Counted over the whole rollout, not per batch: a fleet-wide budget cannot be spent again by
    every batch. `total` is there for callers that reason in shares; with max_failures already
    resolved from a percentage (batch.parse_threshold) it only bounds the check.
    """
    if total <= 0:
        return False
    return failed_count > max_failures


Decision = Literal["continue", "stop", "rollback-all"]


def decide(batches: list[BatchOutcome], total: int, max_failures: int, on_failure: OnFailure) -> Decision:
    """After a batch: go on, stop (each failed node was already put back), or undo every move."""
    failed = sum(len(b.failed) for b in batches)
    if not should_stop(failed, total, max_failures):
        return "continue"
    return "rollback-all" if on_failure == "rollback-all" else "stop"


def exit_code(results: list[NodeResult]) -> int:
    """0 when every node is done, skipped or (dry run) planned; 3 when anything else happened."""
    return 0 if all(r.outcome in OK_OUTCOMES for r in results) else 3
