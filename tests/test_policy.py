from __future__ import annotations

import pytest

from rollout.policy import BatchOutcome, NodeResult, decide, exit_code, should_stop


def r(node: str, outcome: str, undone: bool = False) -> NodeResult:
    return NodeResult(node, outcome, "web-1.0", "web-1.1", undone=undone)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "failed, total, max_failures, stop",
    [(0, 10, 0, False), (1, 10, 0, True), (2, 10, 2, False), (3, 10, 2, True), (0, 0, 0, False)],
)
def test_exceeded_not_equalled_stops(failed: int, total: int, max_failures: int, stop: bool) -> None:
    assert should_stop(failed, total, max_failures) is stop


def test_default_first_failure_stops() -> None:
    assert should_stop(1, 100) is True
    assert should_stop(0, 100) is False


def test_batch_outcome_counts() -> None:
    b = BatchOutcome(1, {"a": r("a", "done"), "b": r("b", "rolled-back"), "c": r("c", "failed"),
                         "d": r("d", "skipped"), "e": r("e", "rolled-back", undone=True)})
    assert b.failed == ["b", "c"]
    assert b.succeeded == ["a", "d"]
    assert b.moved == ["a"]


def test_decide_judges_one_batch() -> None:
    b1 = BatchOutcome(1, {"a": r("a", "done"), "b": r("b", "rolled-back")})
    b2 = BatchOutcome(2, {"c": r("c", "done"), "d": r("d", "failed"), "e": r("e", "unreachable")})
    assert decide(b1, "1", "rollback-node") == "continue"
    assert decide(b2, "1", "rollback-node") == "stop"
    assert decide(b2, "1", "rollback-all") == "rollback-all"
    assert decide(b2, "2", "rollback-all") == "continue"
    # A share of the batch, rounded down as Ansible's max_fail_percentage compares: 2 of 3 is
    # beyond 66% (1.98 tolerated -> 1) and within 67% (2.01 -> 2).
    assert decide(b2, "66%", "rollback-node") == "stop"
    assert decide(b2, "67%", "rollback-node") == "continue"
    # Failures before any batch are judged against every selected node (`size`).
    assert decide(BatchOutcome(0, {"e": r("e", "unreachable")}), "10%", "rollback-node", size=10) == "continue"
    assert decide(BatchOutcome(0, {"e": r("e", "unreachable")}), "10%", "rollback-node", size=9) == "stop"


def test_a_failed_canary_stops_unless_allowed() -> None:
    canary = BatchOutcome(1, {"a": r("a", "rolled-back"), "b": r("b", "done")})
    assert decide(canary, "50%", "rollback-node") == "continue"
    assert decide(canary, "50%", "rollback-node", canary=True) == "stop"
    assert decide(canary, "50%", "rollback-all", canary=True) == "rollback-all"
    assert decide(canary, "50%", "rollback-node", canary=True, canary_failures_allowed=True) == "continue"
    assert decide(BatchOutcome(1, {"a": r("a", "done")}), "0", "rollback-node", canary=True) == "continue"


def test_exit_code() -> None:
    assert exit_code([r("a", "done"), r("b", "skipped")]) == 0
    assert exit_code([r("a", "planned")]) == 0
    assert exit_code([r("a", "done"), r("b", "rolled-back")]) == 3
    assert exit_code([r("a", "done"), r("b", "not-started")]) == 3
    assert exit_code([]) == 0
    assert exit_code([r("a", "unreachable"), r("b", "unreachable")]) == 4
    assert exit_code([r("a", "unreachable"), r("b", "done")]) == 3
    assert exit_code([r("a", "done"), r("b", "not-started")], approved=False) == 9
    assert exit_code([r("a", "rolled-back"), r("b", "not-started")], approved=False) == 3
    assert exit_code([r("a", "done")], approved=False) == 0


def test_node_result_to_dict() -> None:
    d = NodeResult("a", "done", "web-1.0", "web-1.1", 12.345, bytes_sent=5).to_dict()
    assert d["from"] == "web-1.0" and d["to"] == "web-1.1" and d["seconds"] == 12.3 and d["bytes_sent"] == 5
