"""The rolling update: stage everywhere, then activate batch by batch behind health gates.

Phases, in order (colmena's Goal, for a rollout):
  connect   open SSH to every selected node and read its status; any node unreachable stops here,
            before anything changed
  lock      take each node's rollout lock (released on every way out, Ctrl-C included); a lock
            left by a controller process that is gone is taken over, others need --break-lock
  reconcile read each node's real state (booted, committed, one-shot pending, trial) and plan
            from it: skip nodes already on the image (committed and healthy), resume ones an
            interrupted run left booted on it, clear one-shot entries it left pending
  stage     copy the image to the nodes that lack it; nothing restarts
  activate  per batch, canary first: before_activate hooks, one-shot next boot into the image,
            reboot
  boot      wait for the node to answer again with a new boot id, booted into the image
  verify    health gate
  commit    confirm the boot (disarms the dead-man switch), make the image the default, then
            after_commit hooks and, on the bootstrap node, the run-once step
  rollback  a node that failed anywhere after `activate` is put back on its committed image (and
            its after_rollback hooks run); with --on-failure rollback-all, every node this run
            moved goes back too

Every event goes to the rollout's journal (rollout.journal) as it happens, so a run killed with
-9 leaves a record up to its last step; the next run works from the nodes' real state.

Every per-node step registers its undo (diskimage-builder's block_device style), unwound in
reverse when a later step fails. What happened to each node is data (policy.NodeResult); whether
to go on after a batch is policy.decide over it.
"""

from __future__ import annotations

import getpass
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Literal

from imagetool.errors import ImagetoolError, InputError, LockedError, NodeError, UnreachableError
from imagetool.names import check_release_id
from imagetool.systools import pid_alive
from imagetool.store import StoredRelease
from rollout.batch import DEFAULT_BATCHES, parse_batches, parse_threshold, split
from rollout.health import HealthGate, HealthReport, check_node
from rollout.hooks import Hooks, HookSpec, hook_env, run_hook
from rollout.inventory import CheckSpec, Inventory, select
from rollout.journal import Journal, check_rollout_id, state_dir
from rollout.node import GroupResult, Node, NodeStatus, for_each, ssh_nodes
from rollout.policy import BatchOutcome, NodeResult, OnFailure, decide, exit_code
from rollout.stage import StageProgress, stage_all

# (node, step, detail): called from worker threads, so a receiver must be thread-safe. Node "*"
# is about the whole rollout.
EventFn = Callable[[str, str, str], None]


class Step(str, Enum):
    CONNECT = "connect"
    LOCK = "lock"
    STAGE = "stage"
    PLAN = "plan"
    WAIT = "wait"          # pausing between batches (node "*")
    BATCH = "batch"        # a node's batch starts: detail "i/n", "(canary)" on the first
    ACTIVATE = "activate"
    BOOT = "boot"
    VERIFY = "verify"
    COMMIT = "commit"
    HOOK = "hook"
    RUN_ONCE = "run-once"
    RECONCILE = "reconcile"
    WARNING = "warning"
    ROLLBACK = "rollback"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"
    NOT_STARTED = "not-started"
    PLANNED = "planned"


class Interrupted(ImagetoolError):
    """The operator interrupted the rollout; nodes in flight were put back."""

    exit_code = 130


def new_rollout_id(now: float | None = None) -> str:
    """`YYYYmmddTHHMMSS-<6 hex>` in UTC: sorts by time, unique enough across controllers."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(3)


def describe_lock(lock: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(lock.get("time") or 0)))
    pid = f", pid {lock['pid']}" if lock.get("pid") else ""
    return (f"rollout {lock.get('rollout')} of {lock.get('owner')}{pid} "
            f"({lock.get('command')!r}, since {since} UTC)")


def default_owner() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name is not worth failing a rollout over
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass
class RolloutOptions:
    batches: str = DEFAULT_BATCHES
    pause: float = 0.0
    max_failures: str = "0"
    on_failure: OnFailure = "rollback-node"
    confirm_timeout: float = 300.0
    boot_timeout: float = 180.0
    health_timeout: float = 120.0
    # Seconds between asking a settling node for its health again.
    health_interval: float = 2.0
    # Nodes staged (or connected to) at once; a batch's nodes always activate together.
    parallel: int = 4
    dry_run: bool = False
    accept_new_host_keys: bool = False
    # Pass the id of an interrupted rollout to take over its locks and carry on.
    rollout_id: str | None = None
    checks: list[CheckSpec] = field(default_factory=list)
    limit: list[str] | None = None
    owner: str = field(default_factory=default_owner)
    command: str = "imagetool rollout"
    # Take over locks of other runs once they are older than lock_max_age seconds. A lock left by
    # a controller process on this machine that no longer exists is taken over without asking.
    break_lock: bool = False
    lock_max_age: float = 3600.0
    # Where the journal goes (default: rollout.journal.state_dir()).
    state_dir: str | None = None

    def __post_init__(self) -> None:
        if self.on_failure not in ("rollback-node", "rollback-all"):
            raise InputError(f"--on-failure {self.on_failure!r}: expected rollback-node or rollback-all")
        for name in ("pause", "confirm_timeout", "boot_timeout", "health_timeout", "health_interval", "lock_max_age"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name.replace('_', '-')}: must not be negative")
        if self.parallel < 1:
            raise InputError("--parallel: must be at least 1")
        # A node that confirms after its own dead-man switch fired has already gone back: the
        # switch must outlast booting plus the health gate.
        if self.confirm_timeout < self.health_timeout:
            raise InputError(
                f"--confirm-timeout {self.confirm_timeout:g} is shorter than --health-timeout "
                f"{self.health_timeout:g}: nodes would give up on the image before the gate could pass"
            )
        parse_batches(self.batches, 1)
        parse_threshold(self.max_failures, 1)
        if self.rollout_id is not None:
            check_rollout_id(self.rollout_id, "--rollout-id")


@dataclass
class RolloutResult:
    rollout_id: str
    kind: Literal["rollout", "rollback"]
    target: str | None
    nodes: list[NodeResult]
    batches: list[list[str]] = field(default_factory=list)
    stopped: bool = False
    reason: str | None = None
    dry_run: bool = False
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return exit_code(self.nodes)

    @property
    def bytes_sent(self) -> int:
        return sum(r.bytes_sent for r in self.nodes)

    def node(self, name: str) -> NodeResult:
        return next(r for r in self.nodes if r.node == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rollout_id": self.rollout_id, "kind": self.kind, "target": self.target,
            "exit_code": self.exit_code, "stopped": self.stopped, "reason": self.reason,
            "dry_run": self.dry_run, "seconds": round(self.seconds, 1), "bytes_sent": self.bytes_sent,
            "batches": self.batches, "nodes": [r.to_dict() for r in self.nodes],
        }


@dataclass
class PlanItem:
    """What the rollout intends for one node."""

    node: Node
    from_id: str | None
    to_id: str
    # activate: set-next + reboot; resume: already booted into to_id (an interrupted run), go on
    # from the health gate; settled: already there, only check health; fail: cannot be done
    action: Literal["activate", "resume", "settled", "fail"]
    status: NodeStatus
    error: str | None = None
    # Why this action, in words, and the bytes staging would send (plan and journal).
    reason: str = ""
    stage_bytes: int = 0


class UndoStack:
    """Undo steps registered as a node's activation proceeds, run newest first on failure."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, fn: Callable[[], None]) -> None:
        self._steps.append((what, fn))

    def clear(self) -> None:
        self._steps.clear()

    def unwind(self) -> list[str]:
        """Run every undo step, newest first; a failing step does not stop the others.
        Returns what went wrong (empty: all undone)."""
        errors: list[str] = []
        while self._steps:
            what, fn = self._steps.pop()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - collected and reported with the node
                errors.append(f"{what}: {e}")
        return errors


class _Activation:
    """The mutable facts one node's activation learns on the way (for its undo steps)."""

    def __init__(self, boot_id: str | None) -> None:
        self.boot_id = boot_id


class Rollout:
    """One rollout or rollback over a set of nodes. Use `run(release)` or `rollback(to)`."""

    def __init__(
        self,
        nodes: Sequence[Node],
        options: RolloutOptions | None = None,
        *,
        checks: Sequence[CheckSpec] = (),
        hooks: Hooks | None = None,
        events: EventFn | None = None,
        progress: StageProgress | None = None,
        journal: Journal | None = None,
    ) -> None:
        names = [n.name for n in nodes]
        if len(set(names)) != len(names):
            raise InputError(f"nodes named twice: {sorted({n for n in names if names.count(n) > 1})}")
        self.nodes = list(nodes)
        self.options = options or RolloutOptions()
        self.rollout_id = self.options.rollout_id or new_rollout_id()
        self.gate = HealthGate(checks=tuple(checks) + tuple(self.options.checks),
                               timeout=self.options.health_timeout, interval=self.options.health_interval)
        self.hooks = hooks or Hooks()
        self.journal = journal
        self._events = events
        self._progress = progress
        self._cancel = threading.Event()
        self._locked: list[Node] = []
        self._kind: Literal["rollout", "rollback"] = "rollout"
        # The node that runs the run-once step in this rollout, if any.
        self._bootstrap: str | None = None

    # --- events --------------------------------------------------------------------------

    def emit(self, node: str, step: Step | str, detail: str = "") -> None:
        name = step.value if isinstance(step, Step) else step
        if self.journal is not None:
            try:
                self.journal.step(node, name, detail)
            except OSError:
                pass  # a full controller disk must not strand nodes mid-activation
        if self._events is None:
            return
        try:
            self._events(node, name, detail)
        except Exception:  # noqa: BLE001 - a broken display must not break a rollout
            pass

    def _record(self, event: str, **fields: Any) -> None:
        if self.journal is not None:
            try:
                self.journal.write(event, **fields)
            except OSError:
                pass

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Interrupted("interrupted by the operator")

    # --- entry points --------------------------------------------------------------------

    def run(self, release: StoredRelease) -> RolloutResult:
        """Roll `release` out to every node."""
        return self._journaled("rollout", release.id, lambda: self._run(release))

    def rollback(self, to: str | None = None) -> RolloutResult:
        """Every node back to its previous image (or to `to`, which must be staged there)."""
        if to is not None:
            check_release_id(to, where="--to")
        return self._journaled("rollback", to, lambda: self._rollback(to))

    def _journaled(self, kind: Literal["rollout", "rollback"], target: str | None,
                   fn: Callable[[], RolloutResult]) -> RolloutResult:
        self._kind = kind
        o = self.options
        self._record("begin", kind=kind, target=target, rollout=self.rollout_id, nodes=[n.name for n in self.nodes],
                     owner=o.owner, command=o.command, pid=os.getpid(), dry_run=o.dry_run,
                     options={"batches": o.batches, "max_failures": o.max_failures, "on_failure": o.on_failure,
                              "confirm_timeout": o.confirm_timeout, "health_timeout": o.health_timeout})
        try:
            result = fn()
        except BaseException as e:
            code = getattr(e, "exit_code", 130 if isinstance(e, KeyboardInterrupt) else 1)
            self._record("end", exit_code=code, reason=str(e) or type(e).__name__, error=type(e).__name__)
            raise
        self._record("end", exit_code=result.exit_code, reason=result.reason, bytes_sent=result.bytes_sent,
                     seconds=round(result.seconds, 1), outcomes={r.node: r.outcome for r in result.nodes})
        return result

    def _run(self, release: StoredRelease) -> RolloutResult:
        start = time.monotonic()
        target = release.id
        statuses = self._connect()
        try:
            self._lock_all(statuses)
            plan = [self._plan_rollout(n, statuses[n.name], release) for n in self.nodes]
            self._choose_bootstrap(plan)
            self._journal_plan(plan)
            results = self._settle(plan)
            sent = {} if self.options.dry_run else self._stage(release, plan, results)
            return self._activate_all("rollout", target, plan, results, start, sent)
        finally:
            self._unlock_all()

    def _rollback(self, to: str | None) -> RolloutResult:
        start = time.monotonic()
        statuses = self._connect()
        plan = [self._plan_rollback(n, statuses[n.name], to) for n in self.nodes]
        missing = [p for p in plan if p.action == "fail"]
        if missing:
            raise InputError("cannot roll back: " + "; ".join(f"node {p.node.name}: {p.error}" for p in missing))
        try:
            self._lock_all(statuses)
            self._journal_plan(plan)
            results = self._settle(plan)
            return self._activate_all("rollback", to, plan, results, start, {})
        finally:
            self._unlock_all()

    # --- connect, lock --------------------------------------------------------------------

    def _connect(self) -> dict[str, NodeStatus]:
        for n in self.nodes:
            self.emit(n.name, Step.CONNECT)
        got = for_each(self.nodes, lambda n: n.status(), self.options.parallel)
        failed = got.failed
        unreachable = {k: e for k, e in failed.items() if isinstance(e, UnreachableError)}
        if unreachable:
            raise UnreachableError(
                f"{len(unreachable)} of {len(self.nodes)} nodes unreachable, nothing was changed: "
                + "; ".join(str(e) for e in unreachable.values())
            )
        if failed:
            raise NodeError("cannot read the status of "
                            + "; ".join(str(e) for e in failed.values()) + " (nothing was changed)")
        statuses: dict[str, NodeStatus] = dict(got.items())
        for name, st in statuses.items():
            trial = st.trial or {}
            self.emit(name, Step.RECONCILE,
                      f"booted {st.booted}, committed {st.committed}, default {st.default}, "
                      f"one-shot {st.next or '-'}"
                      + (f", trial boot ({'confirmed' if trial.get('confirmed') else 'unconfirmed'})" if trial else "")
                      + (f", locked by {st.lock.get('rollout')}" if st.lock else ""))
        return statuses

    def _takeover(self, held: dict[str, Any], st: NodeStatus) -> tuple[str | None, str]:
        """May this run take over `held`? Returns (the rollout id to take over or None, why)."""
        o = self.options
        pid = held.get("pid")
        if held.get("owner") == o.owner and isinstance(pid, int) and not pid_alive(pid):
            return held.get("rollout"), f"its controller process {pid} on this machine is gone"
        age = max(0.0, (st.time or time.time()) - float(held.get("time") or 0))
        if o.break_lock and age >= o.lock_max_age:
            return held.get("rollout"), f"--break-lock: it is {age:.0f}s old (--lock-max-age {o.lock_max_age:g})"
        if o.break_lock:
            return None, (f"it is only {age:.0f}s old; --break-lock takes over locks older than "
                          f"--lock-max-age {o.lock_max_age:g}s")
        return None, (f"it is {age:.0f}s old; if that run is gone, pass --break-lock (locks older than "
                      f"--lock-max-age {o.lock_max_age:g}s) or --rollout-id {held.get('rollout')} to carry it on")

    def _lock_all(self, statuses: dict[str, NodeStatus]) -> None:
        if self.options.dry_run:
            return
        o = self.options

        def lock(n: Node) -> None:
            st = statuses[n.name]
            held = st.lock
            take_over, why = None, ""
            if held and held.get("rollout") != self.rollout_id:
                take_over, why = self._takeover(held, st)
                if take_over is None:
                    raise LockedError(f"node {n.name}: locked by {describe_lock(held)}; {why}")
            self.emit(n.name, Step.LOCK, self.rollout_id)
            got = n.lock(self.rollout_id, o.owner, o.command, take_over=take_over, pid=os.getpid())
            broken = got.get("broken")
            if broken:
                self.emit(n.name, Step.WARNING, f"broke the lock of {describe_lock(broken)}: {why}")
                self._record("takeover", node=n.name, rollout=broken.get("rollout"), lock=broken, why=why)

        got: GroupResult = for_each(self.nodes, lock, o.parallel)
        self._locked = [n for n in self.nodes if n.name in got.succeeded]
        if got.failed:
            errors = got.failed
            cls = LockedError if any(isinstance(e, LockedError) for e in errors.values()) else NodeError
            raise cls("; ".join(str(e) for e in errors.values()) + " (nothing was changed)")

    def _unlock_all(self) -> None:
        locked, self._locked = self._locked, []

        def unlock(n: Node) -> None:
            n.unlock(self.rollout_id)

        for name, e in for_each(locked, unlock, self.options.parallel).failed.items():
            self.emit(name, Step.WARNING, f"could not release the lock: {e}")

    # --- planning --------------------------------------------------------------------------

    def _plan_rollout(self, node: Node, st: NodeStatus, release: StoredRelease) -> PlanItem:
        committed = st.committed or st.default
        target = release.id
        stale = f"; clears the one-shot boot into {st.next} an interrupted run left" if st.next else ""
        if st.settled_on(target):
            return PlanItem(node, committed, target, "settled", st,
                            reason=f"already booted and committed on {target}{stale}")
        if st.booted == target and st.booted != st.default:
            return PlanItem(node, committed, target, "resume", st,
                            reason=f"booted {target} by an interrupted run, not committed: health gate, then commit")
        have = st.image(target)
        if have is not None and have.sha256 == release.manifest.image.sha256:
            return PlanItem(node, committed, target, "activate", st, reason=f"{target} already staged")
        size = release.manifest.image.size
        return PlanItem(node, committed, target, "activate", st, reason="stage, then activate", stage_bytes=size)

    def _plan_rollback(self, node: Node, st: NodeStatus, to: str | None) -> PlanItem:
        committed = st.committed or st.default
        target = to or st.previous
        if target is None:
            return PlanItem(node, committed, "", "fail", st, "no previous image recorded on the node")
        if st.settled_on(target):
            return PlanItem(node, committed, target, "settled", st, reason=f"already booted and committed on {target}")
        if not st.has_image(target):
            return PlanItem(node, committed, target, "fail", st, f"{target} is not staged on the node")
        if st.booted == target and st.booted != st.default:
            return PlanItem(node, committed, target, "resume", st,
                            reason=f"booted {target} by an interrupted run, not committed: health gate, then commit")
        return PlanItem(node, committed, target, "activate", st, reason=f"{target} is kept on the node")

    def _journal_plan(self, plan: list[PlanItem]) -> None:
        for p in plan:
            self._record("plan", node=p.node.name, action=p.action, from_id=p.from_id, to_id=p.to_id,
                         reason=p.reason or p.error, stage_bytes=p.stage_bytes)

    def _settle(self, plan: list[PlanItem]) -> dict[str, NodeResult]:
        """Nodes already on the target only need their health confirmed: no bytes, no reboot.
        A one-shot entry an interrupted run left pending is cleared (it would fire on the next
        reboot), and a run-once step an interrupted run did not get to is run."""
        results: dict[str, NodeResult] = {}
        settled = [p for p in plan if p.action == "settled"]
        dry = self.options.dry_run
        gate = HealthGate(checks=self.gate.checks, timeout=0, interval=0) if dry else self.gate

        def check(p: PlanItem) -> NodeResult:
            start = time.monotonic()
            name = p.node.name
            self.emit(name, Step.VERIFY, f"already on {p.to_id}")
            try:
                if p.status.next and not dry:
                    self.emit(name, Step.RECONCILE, f"clearing the one-shot boot into {p.status.next}")
                    p.node.clear_next()
                check_node(p.node, gate)
                if name == self._bootstrap and not dry:
                    self._run_once(p.node, p.from_id, p.to_id)
            except ImagetoolError as e:
                self.emit(name, Step.FAILED, str(e))
                return NodeResult(name, "failed", p.from_id, p.to_id, time.monotonic() - start,
                                  f"already on {p.to_id} but: {e}", detail=p.reason)
            detail = p.reason + ("; runs the run-once step an interrupted run left undone"
                                 if name == self._bootstrap else "")
            self.emit(name, Step.SKIPPED, detail)
            return NodeResult(name, "skipped", p.from_id, p.to_id, time.monotonic() - start, detail=detail)

        for p, r in zip(settled, self._map(check, settled, self.options.parallel)):
            results[p.node.name] = r
        return results

    def _stage(self, release: StoredRelease, plan: list[PlanItem], results: dict[str, NodeResult]) -> dict[str, int]:
        """Stage on the nodes that will activate; a node that cannot be staged has failed.
        Returns the bytes sent per node."""
        todo = [p for p in plan if p.action == "activate"]
        if not todo:
            return {}
        for p in todo:
            self.emit(p.node.name, Step.STAGE, release.id)
        report = stage_all([p.node for p in todo], release, self.options.parallel, self._progress)
        for p in todo:
            r = report.results[p.node.name]
            if not r.ok:
                self.emit(p.node.name, Step.FAILED, f"staging: {r.error}")
                results[p.node.name] = NodeResult(p.node.name, "failed", p.from_id, p.to_id, r.seconds,
                                                  f"staging: {r.error}", r.bytes_sent)
                p.action = "fail"
            else:
                self.emit(p.node.name, Step.STAGE, f"{r.outcome}, {r.bytes_sent} bytes")
        return {name: r.bytes_sent for name, r in report.results.items()}

    # --- activation -------------------------------------------------------------------------

    def _activate_all(self, kind: Literal["rollout", "rollback"], target: str | None, plan: list[PlanItem],
                      results: dict[str, NodeResult], start: float, sent: dict[str, int]) -> RolloutResult:
        o = self.options
        total = len(self.nodes)
        max_failures = parse_threshold(o.max_failures, total)
        todo = [p for p in plan if p.action in ("activate", "resume")]
        batches = split(todo, parse_batches(o.batches, len(todo))) if todo else []
        once = self.hooks.run_once
        outcome = BatchOutcome(index=0, results=dict(results))
        done_batches: list[BatchOutcome] = [outcome]
        stopped, reason = False, None

        if o.dry_run:
            for i, batch in enumerate(batches, 1):
                for p in batch:
                    detail = p.reason + (f"; runs the run-once step {once.name!r}" if once and
                                         p.node.name == self._bootstrap else "")
                    self.emit(p.node.name, Step.PLANNED, f"batch {i}: {p.from_id} → {p.to_id}: {detail}")
                    results[p.node.name] = NodeResult(p.node.name, "planned", p.from_id, p.to_id, batch=i,
                                                      detail=detail, stage_bytes=p.stage_bytes)
            return self._result(kind, target, plan, results, batches, False, None, start)

        decision = decide(done_batches, total, max_failures, o.on_failure)
        if decision != "continue":
            stopped, reason = True, f"{len(outcome.failed)} node(s) failed before activation: stopped before any reboot"
            batches_left = batches
        else:
            batches_left = []
            for i, batch in enumerate(batches, 1):
                if i > 1 and o.pause:
                    self.emit("*", Step.WAIT, f"pausing {o.pause:g}s before batch {i}")
                    if self._cancel.wait(o.pause):
                        raise Interrupted("interrupted by the operator")
                for p in batch:
                    self.emit(p.node.name, Step.BATCH,
                              f"{i}/{len(batches)}{' (canary)' if i == 1 and len(batches) > 1 else ''}")
                b = BatchOutcome(index=i)
                for p, r in zip(batch, self._run_batch(batch, i)):
                    r.bytes_sent += sent.get(p.node.name, 0)
                    b.results[p.node.name] = r
                    results[p.node.name] = r
                done_batches.append(b)
                decision = decide(done_batches, total, max_failures, o.on_failure)
                if decision != "continue":
                    failed = sum(len(x.failed) for x in done_batches)
                    stopped = True
                    reason = (f"{failed} node(s) failed in batch {i} or before, more than the "
                              f"{max_failures} tolerated (--max-failures {o.max_failures})")
                    batches_left = batches[i:]
                    break
        for batch in batches_left:
            for p in batch:
                self.emit(p.node.name, Step.NOT_STARTED, "the rollout stopped before this batch")
                results[p.node.name] = NodeResult(p.node.name, "not-started", p.from_id, p.to_id,
                                                  error="the rollout stopped before this node's batch",
                                                  bytes_sent=sent.get(p.node.name, 0))
        if stopped and decision == "rollback-all":
            self._rollback_moved(plan, results, batches)
            reason = f"{reason}; every node this run moved was rolled back (--on-failure rollback-all)"
        failed = [r.node for r in results.values() if r.failed]
        if reason is None and failed:
            reason = (f"{len(failed)} node(s) failed, within the {max_failures} tolerated: "
                      f"{', '.join(failed)}")
        return self._result(kind, target, plan, results, batches, stopped, reason, start)

    def _result(self, kind: Literal["rollout", "rollback"], target: str | None, plan: list[PlanItem],
                results: dict[str, NodeResult], batches: list[list[PlanItem]], stopped: bool,
                reason: str | None, start: float) -> RolloutResult:
        ordered = []
        for p in plan:
            r = results.get(p.node.name)
            if r is None:  # a "fail" plan item never got a result: cannot happen for rollouts
                r = NodeResult(p.node.name, "failed", p.from_id, p.to_id, error=p.error)
            ordered.append(r)
        return RolloutResult(
            rollout_id=self.rollout_id, kind=kind, target=target, nodes=ordered,
            batches=[[p.node.name for p in b] for b in batches], stopped=stopped, reason=reason,
            dry_run=self.options.dry_run, seconds=time.monotonic() - start,
        )

    def _run_batch(self, batch: list[PlanItem], index: int) -> list[NodeResult]:
        def one(p: PlanItem) -> NodeResult:
            r = self._activate(p.node, p.to_id, p.from_id, resume=p.action == "resume",
                               boot_id=p.status.boot_id)
            r.batch = index
            return r

        return self._map(one, batch, len(batch))

    def _map(self, fn: Callable[[PlanItem], NodeResult], items: list[PlanItem], workers: int) -> list[NodeResult]:
        """fn over items in threads. On Ctrl-C, tell the workers to stop and put their nodes back,
        wait for them, then let the interrupt go on (the locks are released further up)."""
        if not items:
            return []
        pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(items))))
        try:
            futures = [pool.submit(fn, item) for item in items]
            return [f.result() for f in futures]
        except BaseException:
            self._cancel.set()
            raise
        finally:
            pool.shutdown(wait=True)

    def _gate(self, node: Node) -> HealthReport:
        return check_node(node, self.gate)

    def _activate(self, node: Node, target: str, committed: str | None, *, resume: bool,
                  boot_id: str | None) -> NodeResult:
        """Move one node to `target`; on any failure put it back on `committed`."""
        o = self.options
        start = time.monotonic()
        undo = UndoStack()
        act = _Activation(boot_id)
        name = node.name
        try:
            self._check_cancel()
            if resume:
                # Booted into the target by an interrupted run, not yet committed: the dead-man
                # switch may be ticking, so go straight to the gate.
                undo.push(f"boot {committed} again", lambda: self._recover(node, committed, target, act))
            else:
                self._run_hooks("before_activate", node, target, committed)
                self.emit(name, Step.ACTIVATE, f"next boot: {target}")
                node.set_next(target, o.confirm_timeout, self.rollout_id)
                undo.push("clear the next boot", node.clear_next)
                self._check_cancel()
                self.emit(name, Step.BOOT, "rebooting")
                act.boot_id = node.reboot()
                undo.push(f"boot {committed} again", lambda: self._recover(node, committed, target, act))
                self.emit(name, Step.BOOT, f"waiting up to {o.boot_timeout:g}s for the new boot")
                st = node.wait_for_boot(act.boot_id, o.boot_timeout, self._cancel)
                act.boot_id = st.boot_id
                self._check_cancel()
                if st.booted != target:
                    raise NodeError(f"node {name}: booted {st.booted} instead of {target}")
            self.emit(name, Step.VERIFY, "health gate")
            self._gate(node)
            self._check_cancel()
            self.emit(name, Step.COMMIT, target)
            node.confirm(target)
            node.commit(target, self.rollout_id)
            undo.clear()
            # Committed: from here a failure (a hook, the run-once step) means a full move back.
            undo.push(f"move back to {committed}", lambda: self._move_back(node, committed, target, act))
            self._run_hooks("after_commit", node, target, committed)
            if name == self._bootstrap:
                self._run_once(node, committed, target)
            undo.clear()
            self.emit(name, Step.DONE, f"{committed} → {target}")
            return NodeResult(name, "done", committed, target, time.monotonic() - start)
        except BaseException as e:
            self.emit(name, Step.ROLLBACK, f"{e}")
            problems = undo.unwind()
            if not isinstance(e, Exception):
                raise
            if not problems and self.hooks.after_rollback:
                try:
                    self._run_hooks("after_rollback", node, target, committed)
                except ImagetoolError as hook_error:
                    problems.append(str(hook_error))
            if problems:
                self.emit(name, Step.FAILED, "; ".join(problems))
                return NodeResult(name, "failed", committed, target, time.monotonic() - start,
                                  f"{e}; putting it back failed: {'; '.join(problems)}")
            self.emit(name, Step.ROLLED_BACK, f"back on {committed}")
            return NodeResult(name, "rolled-back", committed, target, time.monotonic() - start, str(e))

    # --- hooks -------------------------------------------------------------------------------

    def _run_hooks(self, point: str, node: Node, target: str, committed: str | None) -> None:
        for hook in self.hooks.at(point):
            self._check_cancel()
            self.emit(node.name, Step.HOOK, f"{point}: {hook.name} ({hook.where})")
            self._run_hook(hook, point, node, target, committed)

    def _run_hook(self, hook: HookSpec, point: str, node: Node, target: str, committed: str | None) -> None:
        env = hook_env(node.spec, point, rollout_id=self.rollout_id, release=target, from_id=committed)
        r = run_hook(hook, point, node, env)
        self._record("hook", node=node.name, point=point, hook=hook.name, where=hook.where,
                     exit_status=r.exit_status, seconds=round(r.seconds, 2), output=r.output[-500:])

    def _choose_bootstrap(self, plan: list[PlanItem]) -> None:
        """The node that runs the run-once step: the first or last node this rollout activates.
        When it moves nothing, the first or last settled node, if the step never ran there for
        this release (a run interrupted between its commit and the step)."""
        once = self.hooks.run_once
        if self._kind != "rollout" or once is None:
            return
        moving = [p for p in plan if p.action in ("activate", "resume")]
        if moving:
            batches = split(moving, parse_batches(self.options.batches, len(moving)))
            self._bootstrap = (batches[0][0] if once.node == "first" else batches[-1][-1]).node.name
            return
        settled = [p for p in plan if p.action == "settled"]
        if settled:
            p = settled[0] if once.node == "first" else settled[-1]
            if (p.status.run_once or {}).get("release") != p.to_id:
                self._bootstrap = p.node.name

    def _run_once(self, node: Node, committed: str | None, target: str) -> None:
        once = self.hooks.run_once
        assert once is not None
        self.emit(node.name, Step.RUN_ONCE, f"{once.name} ({once.where})")
        self._run_hook(once, "run_once", node, target, committed)
        node.ran_once(target, self.rollout_id)

    def _recover(self, node: Node, committed: str | None, target: str, act: _Activation) -> None:
        """Put a node whose activation failed back on its committed image, and check it."""
        o = self.options
        name = node.name
        if committed is None:
            raise NodeError(f"node {name}: no committed image to go back to")
        self.emit(name, Step.ROLLBACK, f"back to {committed}")
        try:
            st: NodeStatus | None = node.status()
        except ImagetoolError:
            st = None
        if st is None:
            if node.can_reset:
                self.emit(name, Step.ROLLBACK, "unreachable: resetting it out of band")
                node.reset()
                wait = o.boot_timeout
            else:
                wait = o.confirm_timeout + o.boot_timeout
                self.emit(name, Step.ROLLBACK, f"unreachable: waiting up to {wait:g}s for its dead-man switch")
            st = node.wait_for_boot(act.boot_id, wait)
            act.boot_id = st.boot_id
        if st.booted != committed:
            # Reachable but on the target (or late to come up into it): the one-shot entry is
            # spent, so a plain reboot lands on the default.
            node.clear_next()
            self.emit(name, Step.ROLLBACK, f"rebooting into {committed}")
            old = node.reboot()
            st = node.wait_for_boot(old, o.boot_timeout)
            act.boot_id = st.boot_id
        elif st.next is not None:
            node.clear_next()
        if st.booted != committed:
            raise NodeError(f"node {name}: booted {st.booted} after the rollback, not {committed}")
        self.emit(name, Step.VERIFY, f"health gate on {committed}")
        self._gate(node)

    def _move_back(self, node: Node, committed: str | None, target: str, act: _Activation) -> None:
        """A node already committed on `target` whose after_commit hook or run-once step failed
        goes back to `committed`: the same activation the other way, without hooks."""
        o = self.options
        name = node.name
        if committed is None or committed == target:
            raise NodeError(f"node {name}: no other committed image to move back to")
        self.emit(name, Step.ROLLBACK, f"moving back to {committed}")
        node.set_next(committed, o.confirm_timeout, self.rollout_id)
        old = node.reboot()
        st = node.wait_for_boot(old, o.boot_timeout)
        act.boot_id = st.boot_id
        if st.booted != committed:
            raise NodeError(f"node {name}: booted {st.booted} when moving back, not {committed}")
        self.emit(name, Step.VERIFY, f"health gate on {committed}")
        self._gate(node)
        node.confirm(committed)
        node.commit(committed, self.rollout_id)

    def _rollback_moved(self, plan: list[PlanItem], results: dict[str, NodeResult],
                        batches: list[list[PlanItem]]) -> None:
        """--on-failure rollback-all: every node this run moved goes back where it was, in
        batches of the same sizes."""
        moved = [p for p in plan if results.get(p.node.name) and results[p.node.name].outcome == "done"]
        if not moved:
            return
        back = [PlanItem(p.node, p.to_id, p.from_id or "", "activate", p.status) for p in moved]
        sizes = [len(b) for b in batches]
        sizes_for_back = parse_batches(",".join(str(s) for s in sizes) or "1", len(back))
        for batch in split(back, sizes_for_back):
            for p in batch:
                self.emit(p.node.name, Step.ROLLBACK, f"rollback-all: back to {p.to_id}")

            def one(p: PlanItem) -> NodeResult:
                return self._activate(p.node, p.to_id, p.from_id, resume=False, boot_id=None)

            for p, r in zip(batch, self._map(one, batch, len(batch))):
                orig = results[p.node.name]
                if r.outcome == "done":
                    orig.outcome, orig.undone = "rolled-back", True
                    orig.error = "moved back by --on-failure rollback-all"
                else:
                    orig.outcome = "failed"
                    orig.error = f"rollback-all could not move it back to {p.to_id}: {r.error}"
                orig.seconds += r.seconds


# --- from an inventory ---------------------------------------------------------------------------


def _nodes(inventory: Inventory, options: RolloutOptions) -> list[Node]:
    specs = select(inventory.nodes, options.limit)
    return list(ssh_nodes(specs, accept_new_host_keys=options.accept_new_host_keys))


def _journal(options: RolloutOptions) -> tuple[RolloutOptions, Journal]:
    """Fix the rollout id now, so the journal is named before anything happens."""
    if options.rollout_id is None:
        options = replace(options, rollout_id=new_rollout_id())
    assert options.rollout_id is not None
    return options, Journal(state_dir(options.state_dir), options.rollout_id)


def _on_inventory(inventory: Inventory, options: RolloutOptions | None, act: Callable[[Rollout], RolloutResult],
                  events: EventFn | None, progress: StageProgress | None = None) -> RolloutResult:
    """A journaled Rollout over the inventory's nodes (options.limit selects some), closed after."""
    options = options or RolloutOptions()
    nodes = _nodes(inventory, options)  # a bad --limit fails here, before any journal exists
    options, journal = _journal(options)
    try:
        return act(Rollout(nodes, options, checks=inventory.health_checks, hooks=inventory.hooks, events=events,
                           progress=progress, journal=journal))
    finally:
        journal.close()
        for n in nodes:
            n.close()


def run_rollout(release: StoredRelease, inventory: Inventory, options: RolloutOptions | None = None, *,
                events: EventFn | None = None, progress: StageProgress | None = None) -> RolloutResult:
    """Roll `release` out to the inventory's nodes, journaled."""
    return _on_inventory(inventory, options, lambda r: r.run(release), events, progress)


def run_rollback(inventory: Inventory, options: RolloutOptions | None = None, *, to: str | None = None,
                 events: EventFn | None = None) -> RolloutResult:
    """Roll the inventory's nodes back to their previous image (or to `to`), journaled."""
    return _on_inventory(inventory, options, lambda r: r.rollback(to), events)


@dataclass
class NodeReport:
    """`imagetool status` for one node: its status and health, or why they are unknown."""

    name: str
    status: NodeStatus | None = None
    health: HealthReport | None = None
    health_error: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status.to_dict() if self.status else None,
                "healthy": (self.health is not None) if self.status else None,
                "health": self.health.to_dict() if self.health else None,
                "health_error": self.health_error, "error": self.error}


def fleet_status(nodes: Sequence[Node], *, checks: Sequence[CheckSpec] = (), health: bool = True,
                 parallel: int = 8) -> list[NodeReport]:
    """Status (and a one-shot health gate) of each node; a node that fails is reported, not raised."""
    gate = HealthGate(checks=tuple(checks), timeout=0, interval=0)

    def one(n: Node) -> NodeReport:
        rep = NodeReport(n.name)
        try:
            rep.status = n.status()
        except ImagetoolError as e:
            rep.error = str(e)
            return rep
        if health:
            try:
                rep.health = check_node(n, gate)
            except ImagetoolError as e:
                rep.health_error = str(e)
        return rep

    got = for_each(list(nodes), one, parallel)
    return [v if isinstance(v, NodeReport) else NodeReport(k, error=str(v)) for k, v in got.items()]


def inventory_status(inventory: Inventory, *, limit: list[str] | None = None, accept_new_host_keys: bool = False,
                     health: bool = True, parallel: int = 8) -> list[NodeReport]:
    nodes = ssh_nodes(select(inventory.nodes, limit), accept_new_host_keys=accept_new_host_keys)
    try:
        return fleet_status(nodes, checks=inventory.health_checks, health=health, parallel=parallel)
    finally:
        for n in nodes:
            n.close()
