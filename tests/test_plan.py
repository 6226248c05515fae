"""The pure planning rules: a node's status and the target give one action (rollout.plan)."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

from rollout.batch import BatchSpec
from rollout.locks import Holder, LockClaim, describe_lock, holder_gone, may_take_over, process_start, this_process
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


HERE = Holder(boot_id="boot-a", pid_ns="pid:[4026531836]", pid=100, start=5000, machine_id="m-1")
HOLDER = Holder(boot_id="boot-a", pid_ns="pid:[4026531836]", pid=4242, start=1234, machine_id="m-1")
LOCK = {"rollout": "r-old", "owner": "ops@ctl", "time": 1000.0, "command": "imagetool rollout",
        "token": "t" * 32, "holder": HOLDER.to_dict()}


def take_over(held: dict[str, Any], *, here: Holder | None = HERE, start: int | None = None,
              **kw: Any) -> tuple[bool, str]:
    """may_take_over with the process table seen from `here` answering `start` for any pid."""
    args: dict[str, Any] = dict(rollout_id="r-new", node_time=1010.0, break_lock=False, lock_max_age=3600.0)
    return may_take_over(held, here=here, start_of=lambda pid: start, **{**args, **kw})


def test_a_lock_whose_controller_process_is_gone_from_this_process_table_is_taken_over() -> None:
    assert take_over(LOCK, start=None) == (True, "its controller process 4242 on this machine is gone")
    # The pid is another process's now (started at another time): gone too.
    ok, why = take_over(LOCK, start=9999)
    assert ok and "another process's now" in why
    # The same run id, provably dead: carried on without asking.
    assert take_over(LOCK, start=None, rollout_id="r-old")[0]


def test_a_running_holder_is_not_taken_over() -> None:
    ok, why = take_over(LOCK, start=1234)
    assert not ok and "its controller process 4242 is still running here" in why and "--break-lock" in why


@pytest.mark.parametrize("other", [
    {"boot_id": "boot-b"},              # another machine, or this one since a reboot (machine ids get cloned)
    {"pid_ns": "pid:[4026532999]"},     # another container on the same kernel: other pids
    {"machine_id": "m-2"},
])
def test_no_proof_from_another_process_table(other: dict[str, Any]) -> None:
    """A pid is only evidence in the process table it was seen in: one gone from here may be
    running there, however alike user@hostname are."""
    held = {**LOCK, "holder": {**HOLDER.to_dict(), **other}}
    ok, why = take_over(held, start=None)
    assert not ok and "another machine, boot or container" in why


@pytest.mark.parametrize("holder", [
    None, "x", {}, {**HOLDER.to_dict(), "pid": "4242"}, {**HOLDER.to_dict(), "start": None},
    {**HOLDER.to_dict(), "boot_id": ""}, {**HOLDER.to_dict(), "pid": True},
])
def test_no_proof_without_a_complete_holder(holder: Any) -> None:
    """An older controller's lock (owner and pid only), or a mangled holder: no proof, whoever
    the owner is and whatever that pid is doing here."""
    held = {**LOCK, "holder": holder, "pid": 4242}
    ok, why = take_over(held, start=None)
    assert not ok and "does not say which process table" in why
    assert not take_over(LOCK, here=None, start=None)[0]


def test_the_same_rollout_id_is_another_controller() -> None:
    ok, why = take_over(LOCK, start=1234, rollout_id="r-old")
    assert not ok and "same rollout id" in why


def test_break_lock_takes_over_an_old_enough_lock_of_anyone() -> None:
    assert not take_over(LOCK, start=1234, break_lock=True)[0]
    ok, why = take_over(LOCK, start=1234, break_lock=True, node_time=1000.0 + 3600)
    assert ok and why == "--break-lock: it is 3600s old (--lock-max-age 3600)"
    unreadable = {"rollout": None, "unreadable": "/var/lib/imagetool/lock is empty", "time": 1000.0,
                  "token": "sha256-00"}
    assert not take_over(unreadable)[0]
    assert take_over(unreadable, break_lock=True, lock_max_age=0)[0]
    assert describe_lock(unreadable).startswith("an unreadable lock file (/var/lib/imagetool/lock is empty;")
    # A time that is not a number is as old as it gets, never a crash.
    assert take_over({**LOCK, "time": "soon"}, start=1234, break_lock=True, node_time=1e9)[0]


def test_process_start_reads_this_process_table() -> None:
    me = this_process()
    assert me is not None and me.pid == os.getpid() and process_start(me.pid) == me.start
    assert holder_gone({"holder": me.to_dict()}, me)[0] is False
    # This pid, but started at another time: a later process that got the pid again.
    assert holder_gone({"holder": {**me.to_dict(), "start": me.start + 1}}, me)[0] is True
    finished = subprocess.Popen(["true"])
    finished.wait()
    assert process_start(finished.pid) is None
    assert holder_gone({"holder": {**me.to_dict(), "pid": finished.pid}}, me)[0] is True


def test_a_claim_holds_only_its_own_acquisition() -> None:
    claim = LockClaim("r-1", "ops@ctl", "imagetool rollout", holder=HERE)
    other = LockClaim("r-1", "ops@ctl", "imagetool rollout", holder=HERE)
    assert claim.token != other.token and len(claim.token) == 32
    assert claim.holds({"rollout": "r-1", "token": claim.token})
    assert not claim.holds({"rollout": "r-1", "token": other.token})
    assert not claim.holds(None) and not claim.holds({"rollout": "r-2", "token": claim.token})
