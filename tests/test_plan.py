"""The pure planning rules: a node's status and the target give one action (rollout.plan)."""

from __future__ import annotations

from typing import Any

import pytest

from rollout.batch import BatchSpec
from rollout.locks import may_take_over
from rollout.node import NodeImage, NodeStatus
from rollout.plan import Action, batches, bootstrap_node, plan_rollback, plan_rollout

OLD, NEW = "web-1.0", "web-2.0"
SHA = "a" * 64


def status(name: str = "n1", **kw: Any) -> NodeStatus:
    fields: dict[str, Any] = dict(booted=OLD, default=OLD, next=None, committed=OLD, previous=None, boot_id="b1",
                                  images=(NodeImage(OLD, 100, "0" * 64),))
    fields.update(kw)
    return NodeStatus(name=name, **fields)


def test_a_node_on_the_target_only_needs_its_gate() -> None:
    p = plan_rollout(status(booted=NEW, default=NEW, committed=NEW), NEW, SHA, 100)
    assert p.action is Action.SETTLED and not p.action.moves and p.stage_bytes == 0
    assert p.reason == f"already booted and committed on {NEW}"


def test_a_settled_node_with_a_stale_one_shot_says_it_will_clear_it() -> None:
    p = plan_rollout(status(booted=NEW, default=NEW, committed=NEW, next=OLD), NEW, SHA, 100)
    assert p.action is Action.SETTLED and f"clears the one-shot boot into {OLD}" in p.reason


def test_booted_into_the_target_but_not_committed_resumes_at_the_gate() -> None:
    p = plan_rollout(status(booted=NEW), NEW, SHA, 100)
    assert p.action is Action.RESUME and p.action.moves and p.from_id == OLD


@pytest.mark.parametrize("staged_sha, stage_bytes", [(SHA, 0), ("b" * 64, 100), (None, 100)])
def test_activate_stages_unless_the_same_image_is_there(staged_sha: str | None, stage_bytes: int) -> None:
    images = (NodeImage(OLD, 100, "0" * 64),) + ((NodeImage(NEW, 100, staged_sha),) if staged_sha else ())
    p = plan_rollout(status(images=images), NEW, SHA, 100)
    assert p.action is Action.ACTIVATE and p.stage_bytes == stage_bytes


def test_rollback_needs_a_previous_image_staged_on_the_node() -> None:
    assert plan_rollback(status(), None).action is Action.FAIL
    p = plan_rollback(status(previous="web-0.9"), None)
    assert p.action is Action.FAIL and p.error == "web-0.9 is not staged on the node"
    images = (NodeImage(OLD, 100, None), NodeImage("web-0.9", 100, None))
    p = plan_rollback(status(previous="web-0.9", images=images), None)
    assert p.action is Action.ACTIVATE and p.to_id == "web-0.9" and p.from_id == OLD


def test_batches_take_only_moving_nodes_and_the_spec_is_of_them() -> None:
    plan = [plan_rollout(status(f"n{i}", booted=NEW, default=NEW, committed=NEW) if i % 2 else status(f"n{i}"),
                         NEW, SHA, 100) for i in range(1, 9)]
    got = batches(plan, BatchSpec.parse("1,50%"))
    assert [[p.node for p in b] for b in got] == [["n2"], ["n4", "n6"], ["n8"]]


def test_the_bootstrap_node_is_the_first_or_last_to_move() -> None:
    plan = [plan_rollout(status(f"n{i}"), NEW, SHA, 100) for i in range(1, 4)]
    spec = BatchSpec.parse("1")
    assert bootstrap_node(plan, spec, "first", {}) == "n1"
    assert bootstrap_node(plan, spec, "last", {}) == "n3"


def test_with_nothing_to_move_the_bootstrap_node_runs_only_a_step_left_undone() -> None:
    plan = [plan_rollout(status(f"n{i}", booted=NEW, default=NEW, committed=NEW), NEW, SHA, 100) for i in (1, 2)]
    spec = BatchSpec.parse("1")
    assert bootstrap_node(plan, spec, "first", {"n1": OLD}) == "n1"
    assert bootstrap_node(plan, spec, "first", {"n1": NEW}) is None


def test_a_failed_plan_keeps_what_it_was_about() -> None:
    p = plan_rollout(status(), NEW, SHA, 100).failed("staging: disk full")
    assert p.action is Action.FAIL and p.error == "staging: disk full" and p.to_id == NEW


LOCK = {"rollout": "r-old", "owner": "ops@ctl", "pid": 4242, "time": 1000.0, "command": "imagetool rollout"}


def test_a_lock_of_this_owner_whose_process_is_gone_is_taken_over() -> None:
    rid, why = may_take_over(LOCK, owner="ops@ctl", node_time=1010, break_lock=False, lock_max_age=3600,
                             alive=lambda pid: False)
    assert rid == "r-old" and "4242" in why


def test_a_live_or_foreign_lock_needs_break_lock_and_age() -> None:
    kw: dict[str, Any] = dict(node_time=1010.0, lock_max_age=3600.0, alive=lambda pid: True)
    assert may_take_over(LOCK, owner="ops@ctl", break_lock=False, **kw)[0] is None
    assert may_take_over(LOCK, owner="other@ctl", break_lock=True, **kw)[0] is None
    kw["node_time"] = 1000.0 + 3600
    assert may_take_over(LOCK, owner="other@ctl", break_lock=True, **kw)[0] == "r-old"
