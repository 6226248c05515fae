"""The rolling update: stage everywhere, then activate batch by batch behind health gates.

Phases, in order (colmena's Goal, for a rollout):
  connect   open SSH to every selected node and read its status; a node unreachable (or whose
            status cannot be read) is a failed node nothing is done on: when those failures
            exceed what --max-failures tolerates of all selected nodes, the run stops here,
            before anything changed
  lock      take each node's rollout lock (released on every way out, Ctrl-C included); a lock
            left by a controller process provably gone (it ran in this very process table) is
            taken over, others need --break-lock; the node swaps only the lock judged here. A
            run that would write nothing (every node settled, nothing pending, no lock held)
            takes none: a no-op re-run is a status and a health check per node
  reconcile read each node's real state (booted, committed, one-shot pending, trial) and plan
            from it: skip nodes already on the image (committed and healthy), resume ones an
            interrupted run left booted on it, clear one-shot entries it left pending
  stage     copy the image to the nodes that lack it; nothing restarts
  activate  per batch, canary first: before_activate hooks, one-shot next boot into the image,
            reboot; after each batch the policy (rollout.policy.decide) judges that batch alone;
            with --approve the run waits after the canary for the operator (rollout.approval)
  boot      wait for the node to answer again with a new boot id, booted into the image
  verify    health gate
  commit    confirm the boot (disarms the dead-man switch), make the image the default, then
            after_commit hooks and, on the bootstrap node, the run-once step
  rollback  a node that failed anywhere after `activate` is put back on its committed image (and
            its after_rollback hooks run); with --on-failure rollback-all, every node this run
            moved goes back too

Every event goes to the rollout's journal (rollout.journal) as it happens, so a run killed with
-9 leaves a record up to its last step; the next run works from the nodes' real state.

The rooms: rollout.plan decides each node's action from its status (pure); rollout.activation
moves one node with its own undo stack; this module runs the phases and the batches, applying
rollout.policy to each batch's results (data, as fabric's GroupResult) to decide whether to go on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from imagetool.chunks import check_source
from imagetool.errors import ImagetoolError, InputError, LockedError, NodeError, UnreachableError, VerificationError
from imagetool.names import check_release_id
from imagetool.store import StoredRelease
from rollout.activation import Activator, Interrupted
from rollout.approval import Verdict, approval_path, forget, wait_for_answer
from rollout.batch import DEFAULT_BATCHES, BatchSpec, cover, parse_threshold, split
from rollout.checks import KINDS
from rollout.events import EventFn, Events, Step
from rollout.fleet import open_nodes
from rollout.health import HealthGate
from rollout.hooks import Hooks
from rollout.inventory import CheckSpec, Inventory
from rollout.journal import Journal, check_rollout_id, state_dir
from rollout.locks import LockClaim, default_owner, describe_lock, may_take_over, new_rollout_id
from rollout.node import GroupResult, Node, NodeStatus, for_each
from rollout.plan import Action, NodePlan, bootstrap_node, only_reads, plan_rollback, plan_rollout
from rollout.plan import batches as plan_batches
from rollout.policy import BatchOutcome, NodeResult, OnFailure, decide, exit_code
from rollout.stage import StageProgress, check_release_files, estimate, source_for, stage_all

__all__ = [
    "EventFn", "Interrupted", "Rollout", "RolloutOptions", "RolloutResult", "Step", "default_owner",
    "new_rollout_id", "run_rollback", "run_rollout",
]


# The largest value each option in seconds may take: a day for waits (a node that has not booted
# or settled in a day will not), ten years for lock ages (an old lock is still a lock).
LIMITS = {"pause": 86400.0, "confirm_timeout": 86400.0, "boot_timeout": 86400.0, "health_timeout": 86400.0,
          "health_interval": 3600.0, "lock_max_age": 10 * 365 * 86400.0}

# Seconds between the lines a --pause of up to two minutes prints while it runs (a minute beyond).
PAUSE_TICK = 10.0


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
    # Nodes staged (or connected to) at once.
    parallel: int = 4
    # Nodes of one batch that activate at once (Ansible's forks): a larger batch's other nodes
    # follow as these finish. It bounds the controller's threads and commands in flight, and so
    # its memory, whatever the batch size (a batch of 25% of 10,000 nodes).
    batch_parallel: int = 64
    # Stage by delta where a node holds images to take chunks from (imagetool.chunks).
    delta: bool = True
    # An HTTP(S) store (`imagetool publish`) the nodes pull the image from themselves.
    source: str | None = None
    dry_run: bool = False
    accept_new_host_keys: bool = False
    # The id of an interrupted rollout, to carry it on under that id. Its locks are still another
    # run's: taken over when that controller process is provably gone, else with --break-lock.
    rollout_id: str | None = None
    checks: list[CheckSpec] = field(default_factory=list)
    limit: list[str] | None = None
    owner: str = field(default_factory=default_owner)
    command: str = "imagetool rollout"
    # Take over locks of other runs once they are older than lock_max_age seconds. A lock left by
    # a controller process that provably no longer exists (it ran in this very process table)
    # is taken over without asking.
    break_lock: bool = False
    lock_max_age: float = 3600.0
    # Where the journal goes (default: rollout.journal.state_dir()).
    state_dir: str | None = None
    # Release signing keys (public, PEM) the operator trusts, beside the inventory's: a release
    # not signed by one of them is refused before any node is contacted.
    trusted_keys: list[Path] = field(default_factory=list)
    # A failure in the canary batch does not stop the run by itself: the canary is judged by
    # max_failures like any batch.
    canary_failures_allowed: bool = False
    # After the canary batch, wait for the operator's answer (rollout.approval); without one
    # within approve_timeout seconds (None: no limit) the run stops, it does not go on.
    approve: bool = False
    approve_timeout: float | None = None
    # `batches`, parsed once.
    batch_spec: BatchSpec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.on_failure not in ("rollback-node", "rollback-all"):
            raise InputError(f"--on-failure {self.on_failure!r}: expected rollback-node or rollback-all")
        for name, maximum in LIMITS.items():
            value = getattr(self, name)
            # nan compares false with everything and inf never runs out: either would switch the
            # dead-man switch or a wait off instead of setting it.
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not 0 <= value <= maximum):
                raise InputError(f"--{name.replace('_', '-')} {value!r}: expected seconds from 0 to {maximum:g}")
        if isinstance(self.parallel, bool) or not isinstance(self.parallel, int) or not 1 <= self.parallel <= 1024:
            raise InputError(f"--parallel {self.parallel!r}: expected 1 to 1024")
        bp = self.batch_parallel
        if isinstance(bp, bool) or not isinstance(bp, int) or not 1 <= bp <= 4096:
            raise InputError(f"--batch-parallel {bp!r}: expected 1 to 4096")
        # A node that confirms after its own dead-man switch fired has already gone back: the
        # switch must outlast booting plus the health gate.
        if self.confirm_timeout < self.health_timeout:
            raise InputError(
                f"--confirm-timeout {self.confirm_timeout:g} is shorter than --health-timeout "
                f"{self.health_timeout:g}: nodes would give up on the image before the gate could pass"
            )
        t = self.approve_timeout
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
                              or not 0 < t <= 7 * 86400):
            raise InputError(f"--approve-timeout {t!r}: expected seconds above 0, at most a week")
        self.batch_spec = BatchSpec.parse(self.batches)
        parse_threshold(self.max_failures, 1)
        if self.rollout_id is not None:
            check_rollout_id(self.rollout_id, "--rollout-id")
        if self.source is not None:
            self.source = check_source(self.source)


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
    # With --approve, the operator's answer after the canary: approved, rejected, timed-out.
    approval: Verdict | None = None
    # What sending every staged node its whole image would have cost: bytes_sent against this
    # says what delta staging saved.
    full_bytes: int = 0

    @property
    def exit_code(self) -> int:
        return exit_code(self.nodes, approved=self.approval in (None, "approved"))

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
            "approval": self.approval, "full_bytes": self.full_bytes,
            "batches": self.batches, "nodes": [r.to_dict() for r in self.nodes],
        }


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
        trusted_keys: Sequence[Path] = (),
    ) -> None:
        names = [n.name for n in nodes]
        if len(set(names)) != len(names):
            raise InputError(f"nodes named twice: {sorted({n for n in names if names.count(n) > 1})}")
        self.nodes = {n.name: n for n in nodes}
        self.options = options or RolloutOptions()
        self.rollout_id = self.options.rollout_id or new_rollout_id()
        self.hooks = hooks or Hooks()
        self.events = Events(journal, events)
        self._progress = progress
        self._cancel = threading.Event()
        # (target, images a node holds) -> estimate: a fleet holds few distinct image sets, and
        # each estimate reads the seeds' manifests from the store.
        self._estimates: dict[tuple[str, tuple[tuple[str, str | None], ...], bool], tuple[int, str]] = {}
        self._locked: list[Node] = []
        self._full_bytes = 0
        o = self.options
        self.approval_file = approval_path(state_dir(o.state_dir), self.rollout_id)
        self.trusted_keys = [*trusted_keys, *o.trusted_keys]
        # One acquisition of every node's lock: a second controller run with the same rollout id
        # has its own token, and takes these locks over only by the take-over rule.
        self._claim = LockClaim(self.rollout_id, o.owner, o.command)
        self.activator = Activator(
            rollout_id=self.rollout_id, hooks=self.hooks, events=self.events, cancel=self._cancel,
            gate=HealthGate(checks=tuple(checks) + tuple(o.checks), timeout=o.health_timeout,
                            interval=o.health_interval),
            confirm_timeout=o.confirm_timeout, boot_timeout=o.boot_timeout)

    # --- entry points --------------------------------------------------------------------

    def run(self, release: StoredRelease) -> RolloutResult:
        """Roll `release` out to every node."""
        return self._journaled("rollout", release.id, lambda: self._run(release))

    def check_release(self, release: StoredRelease) -> None:
        """Refuse a release that is not what it claims (size; signature where keys are trusted)
        before any node is contacted, so a refused release changes nothing anywhere."""
        key = check_release_files(release, self.trusted_keys)
        if key is not None:
            self.events.record("signature", release=release.id, key=key.name, key_sha256=key.sha256)

    def rollback(self, to: str | None = None) -> RolloutResult:
        """Every node back to its previous image (or to `to`, which must be staged there)."""
        if to is not None:
            check_release_id(to, where="--to")
        return self._journaled("rollback", to, lambda: self._rollback(to))

    def _journaled(self, kind: Literal["rollout", "rollback"], target: str | None,
                   fn: Callable[[], RolloutResult]) -> RolloutResult:
        o = self.options
        record = self.events.record
        if o.approve and not o.dry_run:
            forget(self.approval_file)  # an answer left from an earlier run under this id is not this run's
        record("begin", kind=kind, target=target, rollout=self.rollout_id, nodes=list(self.nodes),
               owner=o.owner, command=o.command, pid=os.getpid(), dry_run=o.dry_run,
               options={"batches": o.batches, "max_failures": o.max_failures, "on_failure": o.on_failure,
                        "confirm_timeout": o.confirm_timeout, "health_timeout": o.health_timeout,
                        "canary_failures_allowed": o.canary_failures_allowed, "approve": o.approve,
                        "approve_timeout": o.approve_timeout})
        try:
            result = fn()
        except BaseException as e:
            code = getattr(e, "exit_code", 130 if isinstance(e, KeyboardInterrupt) else 1)
            record("end", exit_code=code, reason=str(e) or type(e).__name__, error=type(e).__name__)
            raise
        record("end", exit_code=result.exit_code, reason=result.reason, bytes_sent=result.bytes_sent,
               seconds=round(result.seconds, 1), outcomes={r.node: r.outcome for r in result.nodes})
        return result

    def _run(self, release: StoredRelease) -> RolloutResult:
        start = time.monotonic()
        image = release.manifest.image
        self.check_release(release)
        statuses, lost = self._connect(release.id)
        if not self.options.dry_run and self._stops(lost):
            return self._stopped_at_start("rollout", release.id, statuses, lost, start)
        try:
            plan = [self._estimated(release, plan_rollout(statuses[name], release.id, image.sha256, image.size))
                    for name in statuses]
            bootstrap = self._bootstrap(plan)
            # A run that would only read (every node settled on the target) takes no locks.
            if not only_reads(plan, bootstrap):
                lost.update(self._lock_all(statuses, release.id))
                plan = [p for p in plan if p.node not in lost]
                bootstrap = self._bootstrap(plan)
            self._journal_plan(plan)
            before = {**lost, **self._settle(plan, bootstrap)}
            sent: dict[str, int] = {}
            if not self.options.dry_run:
                plan, unstaged, sent = self._stage(release, plan)
                before = {**before, **unstaged}
            return self._activate_all("rollout", release.id, plan, before, start, sent, bootstrap)
        finally:
            self._unlock_all()

    def _rollback(self, to: str | None) -> RolloutResult:
        start = time.monotonic()
        statuses, lost = self._connect(to)
        plan = [plan_rollback(statuses[name], to) for name in statuses]
        missing = [p for p in plan if p.action is Action.FAIL]
        if missing:
            raise InputError("cannot roll back: " + "; ".join(f"node {p.node}: {p.error}" for p in missing),
                             nodes=[p.node for p in missing])
        if not self.options.dry_run and self._stops(lost):
            return self._stopped_at_start("rollback", to, statuses, lost, start)
        try:
            if not only_reads(plan, None):
                lost.update(self._lock_all(statuses, to))
                plan = [p for p in plan if p.node not in lost]
            self._journal_plan(plan)
            before = {**lost, **self._settle(plan, None)}
            return self._activate_all("rollback", to, plan, before, start, {}, None)
        finally:
            self._unlock_all()

    def _for_each(self, names: Sequence[str], fn: Callable[[Node], Any], parallel: int) -> GroupResult:
        """fn over the named nodes in threads; Ctrl-C tells the workers to put their nodes back."""
        return for_each([self.nodes[n] for n in names], fn, parallel, on_interrupt=self._cancel.set)

    def _estimated(self, release: StoredRelease, p: NodePlan) -> NodePlan:
        """A node to stage, with what staging it would send: the delta from the images it holds."""
        if not p.stage_bytes:
            return p
        source = source_for(self.nodes[p.node], self.options.source, self.options.delta)
        if source:
            return dataclasses.replace(p, reason=f"pull from {source}, then activate")
        held = tuple(sorted((i.id, i.sha256) for i in p.status.images))
        key = (release.id, held, self.options.delta)
        if key not in self._estimates:
            self._estimates[key] = estimate(release, held, delta=self.options.delta)
        size, how = self._estimates[key]
        return dataclasses.replace(p, stage_bytes=size, reason=f"stage ({how}), then activate")

    # --- connect, lock --------------------------------------------------------------------

    def _connect(self, target: str | None) -> tuple[dict[str, NodeStatus], dict[str, NodeResult]]:
        """Every node's status, and a result for each node whose status could not be had: a node
        unreachable, or answering with a damaged file of its own, is a failed node (the policy
        decides whether the run goes on), and nothing is done on it."""
        for name in self.nodes:
            self.events.step(name, Step.CONNECT)
        got = self._for_each(list(self.nodes), lambda n: n.status(), self.options.parallel)
        lost: dict[str, NodeResult] = {}
        for name, e in got.failed.items():
            if isinstance(e, UnreachableError):
                lost[name] = self._unreachable(name, target, str(e))
            else:
                why = f"cannot read its status: {e}; nothing was done on it"
                self.events.step(name, Step.FAILED, why)
                lost[name] = NodeResult(name, "failed", None, target, error=why)
        statuses: dict[str, NodeStatus] = dict(got.succeeded.items())
        for name, st in statuses.items():
            trial = st.trial or {}
            self.events.step(name, Step.RECONCILE,
                             f"booted {st.booted}, committed {st.committed}, default {st.default}, "
                             f"one-shot {st.next or '-'}"
                             + (f", trial boot ({'confirmed' if trial.get('confirmed') else 'unconfirmed'})"
                                if trial else "")
                             + (f", locked by {st.lock.get('rollout')}" if st.lock else ""))
        return statuses, lost

    def _unreachable(self, name: str, target: str | None, error: str, committed: str | None = None) -> NodeResult:
        self.events.step(name, Step.UNREACHABLE, error)
        return NodeResult(name, "unreachable", committed, target, error=f"{error}; nothing was done on it")

    def _stops(self, before: dict[str, NodeResult]) -> bool:
        """The failures before any batch, judged against --max-failures of every selected node."""
        o = self.options
        return decide(BatchOutcome(0, before), o.max_failures, o.on_failure, size=len(self.nodes)) != "continue"

    def _before_reason(self, failed: int) -> str:
        o = self.options
        return (f"{failed} of {len(self.nodes)} node(s) failed before any reboot, more than the "
                f"{parse_threshold(o.max_failures, len(self.nodes))} tolerated (--max-failures {o.max_failures} "
                "of all selected nodes)")

    def _stopped_at_start(self, kind: Literal["rollout", "rollback"], target: str | None,
                          statuses: dict[str, NodeStatus], lost: dict[str, NodeResult], start: float) -> RolloutResult:
        """Too many nodes out of reach at the start: the run stops before locking anything."""
        results = dict(lost)
        for name, st in statuses.items():
            self.events.step(name, Step.NOT_STARTED, "the rollout stopped before anything was changed")
            results[name] = NodeResult(name, "not-started", st.committed or st.default, target,
                                       error="the rollout stopped before anything was changed")
        unreachable = sum(r.outcome == "unreachable" for r in lost.values())
        reason = self._before_reason(len(lost)) + ": stopped before anything was changed"
        if unreachable == len(self.nodes):
            reason = f"all {unreachable} node(s) unreachable, nothing was changed"
        return self._result(kind, target, [], results, [], True, reason, start)

    def _lock_all(self, statuses: dict[str, NodeStatus], target: str | None) -> dict[str, NodeResult]:
        """Lock every node that answered. One gone since is a failed node nothing is done on
        (returned as its result, and dropped from `statuses`); any other refusal stops the run."""
        if self.options.dry_run:
            return {}
        o = self.options

        claim = self._claim

        def lock(n: Node) -> None:
            st = statuses[n.name]
            held = st.lock
            take_over, why = None, ""
            if held and not claim.holds(held):
                ok, why = may_take_over(held, rollout_id=self.rollout_id, here=claim.holder, node_time=st.time,
                                        break_lock=o.break_lock, lock_max_age=o.lock_max_age)
                if not ok:
                    raise LockedError(f"node {n.name}: locked by {describe_lock(held)}; {why}", nodes=[n.name])
                take_over = held
            self.events.step(n.name, Step.LOCK, self.rollout_id)
            # The node swaps only the very lock judged here: one taken meanwhile is refused there.
            got = n.lock(claim, take_over=take_over)
            broken = got.get("broken")
            if broken:
                self.events.step(n.name, Step.WARNING, f"broke the lock of {describe_lock(broken)}: {why}")
                self.events.record("takeover", node=n.name, rollout=broken.get("rollout"), lock=broken, why=why)

        # Two controllers started together on the same nodes must not each lock half of them and
        # both give up: the first node by name is locked alone, before the others, so whoever gets
        # it goes on and the other stops there, holding nothing.
        names = sorted(statuses)
        got = self._for_each(names[:1], lock, o.parallel)
        if all(isinstance(e, UnreachableError) for e in got.failed.values()):
            got.update(self._for_each(names[1:], lock, o.parallel))
        failed, succeeded = got.failed, got.succeeded
        self._locked = [n for name, n in self.nodes.items() if name in succeeded]
        lost = {name: self._unreachable(name, target, str(e), statuses[name].committed or statuses[name].default)
                for name, e in failed.items() if isinstance(e, UnreachableError)}
        for name in lost:
            del statuses[name]
        errors = {name: e for name, e in failed.items() if name not in lost}
        if errors:
            cls = LockedError if any(isinstance(e, LockedError) for e in errors.values()) else NodeError
            raise cls("; ".join(str(e) for e in errors.values()) + " (nothing was changed)", nodes=list(errors))
        return lost

    def _unlock_all(self) -> None:
        locked, self._locked = self._locked, []

        def unlock(n: Node) -> None:
            n.unlock(self._claim)

        for name, e in for_each(locked, unlock, self.options.parallel).failed.items():
            self.events.step(name, Step.WARNING, f"could not release the lock: {e}")

    # --- plan, settle, stage -----------------------------------------------------------------

    def _bootstrap(self, plan: list[NodePlan]) -> str | None:
        once = self.hooks.run_once
        if once is None:
            return None
        last_ran = {p.node: (p.status.run_once or {}).get("release") for p in plan}
        return bootstrap_node(plan, self.options.batch_spec, once.node, last_ran)

    def _journal_plan(self, plan: list[NodePlan]) -> None:
        for p in plan:
            self.events.record("plan", node=p.node, action=p.action.value, from_id=p.from_id, to_id=p.to_id,
                               reason=p.reason or p.error, stage_bytes=p.stage_bytes)

    def _settle(self, plan: list[NodePlan], bootstrap: str | None) -> dict[str, NodeResult]:
        """Nodes already on the target only need their health confirmed: no bytes, no reboot.
        A one-shot entry an interrupted run left pending is cleared (it would fire on the next
        reboot), and a run-once step an interrupted run did not get to is run."""
        settled = {p.node: p for p in plan if p.action is Action.SETTLED}
        dry = self.options.dry_run
        gate = self.activator.gate
        if dry:
            # A dry run changes nothing, and a command check is a program run on the node that
            # could change anything: only the helper's read-only health and the controller's own
            # probes (tcp, http) are asked.
            gate = HealthGate(checks=tuple(c for c in gate.checks if not KINDS[c.kind].shell), timeout=0, interval=0)

        def check(node: Node) -> NodeResult:
            p = settled[node.name]
            start = time.monotonic()
            self.events.step(p.node, Step.VERIFY, f"already on {p.to_id}")
            try:
                if p.status.next and not dry:
                    self.events.step(p.node, Step.RECONCILE, f"clearing the one-shot boot into {p.status.next}")
                    node.clear_next()
                self.activator.health_gate(node, p.to_id, gate)
                if p.node == bootstrap and not dry:
                    self.activator.run_once(node, p.from_id, p.to_id)
            except ImagetoolError as e:
                self.events.step(p.node, Step.FAILED, str(e))
                return NodeResult(p.node, "failed", p.from_id, p.to_id, time.monotonic() - start,
                                  f"already on {p.to_id} but: {e}", detail=p.reason)
            detail = p.reason + ("; runs the run-once step an interrupted run left undone"
                                 if p.node == bootstrap else "")
            self.events.step(p.node, Step.SKIPPED, detail)
            return NodeResult(p.node, "skipped", p.from_id, p.to_id, time.monotonic() - start, detail=detail)

        got = self._for_each(list(settled), check, self.options.parallel)
        return {name: _result(settled[name], r) for name, r in got.items()}

    def _stage(self, release: StoredRelease,
               plan: list[NodePlan]) -> tuple[list[NodePlan], dict[str, NodeResult], dict[str, int]]:
        """Stage on the nodes that will activate. A node that cannot be staged has failed: its
        plan becomes FAIL and it has a result. Returns the plan, those results, and the bytes
        sent per node."""
        todo = [p.node for p in plan if p.action is Action.ACTIVATE]
        if not todo:
            return plan, {}, {}
        for name in todo:
            self.events.step(name, Step.STAGE, release.id)
        report = stage_all([self.nodes[n] for n in todo], release, self.options.parallel, self._progress,
                           delta=self.options.delta, source=self.options.source)
        self._full_bytes += sum(r.full_bytes for r in report.results.values() if r.mode)
        staged: list[NodePlan] = []
        failed: dict[str, NodeResult] = {}
        for p in plan:
            r = report.results.get(p.node)
            if r is not None and not r.ok:
                # A node that refuses the image (its keys, or the controller on its behalf) is a
                # failed node like any other: the batch policy decides, the rollout exits 3.
                why = ("staging: verification failed: " if isinstance(r.exception, VerificationError)
                       else "staging: ") + str(r.error)
                gone = isinstance(r.exception, UnreachableError)
                self.events.step(p.node, Step.UNREACHABLE if gone else Step.FAILED, why)
                failed[p.node] = NodeResult(p.node, "unreachable" if gone else "failed", p.from_id, p.to_id,
                                            r.seconds, why, r.bytes_sent)
                p = p.failed(why)
            elif r is not None:
                how = f" ({r.mode}, full {r.full_bytes} bytes)" if r.mode else ""
                self.events.step(p.node, Step.STAGE, f"{r.outcome}, {r.bytes_sent} bytes{how}")
            if r is not None:
                self.events.record("stage", **r.to_dict())
            staged.append(p)
        return staged, failed, {name: r.bytes_sent for name, r in report.results.items()}

    # --- batches -----------------------------------------------------------------------------

    def _activate_all(self, kind: Literal["rollout", "rollback"], target: str | None, plan: list[NodePlan],
                      before: dict[str, NodeResult], start: float, sent: dict[str, int],
                      bootstrap: str | None) -> RolloutResult:
        """The batch runner: each batch activates together, then the policy judges that batch
        alone: go on, stop, or move every node this run moved back. The failures before any
        batch (`before`: the results of the nodes settled, out of reach or not staged) are
        judged first, against every selected node. With --approve the run waits after the canary."""
        o = self.options
        results = dict(before)
        batches = plan_batches(plan, o.batch_spec)
        stopped, reason, approval = False, None, None
        decision = "stop" if self._stops(before) else "continue"

        if o.dry_run:
            once = self.hooks.run_once
            for i, batch in enumerate(batches, 1):
                for p in batch:
                    detail = p.reason + (f"; runs the run-once step {once.name!r}" if once and
                                         p.node == bootstrap else "")
                    self.events.step(p.node, Step.PLANNED, f"batch {i}: {p.from_id} → {p.to_id}: {detail}")
                    results[p.node] = NodeResult(p.node, "planned", p.from_id, p.to_id, batch=i,
                                                 detail=detail, stage_bytes=p.stage_bytes)
            failed = [r.node for r in before.values() if r.failed]
            if decision != "continue":
                reason = f"the rollout would stop before any reboot: {self._before_reason(len(failed))}"
            elif failed:
                reason = (f"{len(failed)} node(s) cannot take part ({', '.join(failed)}); within what --max-failures "
                          f"{o.max_failures} tolerates of all selected nodes, the rollout would go on without them")
            return self._result(kind, target, plan, results, batches, False, reason, start)

        batches_left = batches
        if decision != "continue":
            stopped = True
            reason = self._before_reason(sum(r.failed for r in before.values())) + ": stopped before any reboot"
        else:
            for i, batch in enumerate(batches, 1):
                batches_left = batches[i:]
                if i > 1 and o.pause:
                    self._pause(i)
                outcome = self._run_batch(batch, i, len(batches), bootstrap)
                for name, r in outcome.results.items():
                    r.bytes_sent += sent.get(name, 0)
                results.update(outcome.results)
                decision = decide(outcome, o.max_failures, o.on_failure, canary=i == 1,
                                  canary_failures_allowed=o.canary_failures_allowed)
                if decision != "continue":
                    stopped = True
                    reason = self._batch_reason(outcome, i)
                    break
                if i == 1 and o.approve and batches_left:
                    approval = self._await_approval(len(batches))
                    if approval != "approved":
                        stopped = True
                        reason = ("rejected by the operator after the canary" if approval == "rejected" else
                                  f"no approval within {o.approve_timeout:g}s after the canary (--approve-timeout)")
                        break
            else:
                batches_left = []
        for batch in batches_left:
            for p in batch:
                self.events.step(p.node, Step.NOT_STARTED, "the rollout stopped before this batch")
                results[p.node] = NodeResult(p.node, "not-started", p.from_id, p.to_id,
                                             error="the rollout stopped before this node's batch",
                                             bytes_sent=sent.get(p.node, 0))
        if stopped and decision == "rollback-all":
            results.update(self._rollback_moved(plan, results, batches))
            reason = f"{reason}; every node this run moved was rolled back (--on-failure rollback-all)"
        failed_nodes = [r.node for r in results.values() if r.failed]
        if reason is None and failed_nodes:
            reason = (f"{len(failed_nodes)} node(s) failed, no batch beyond what --max-failures "
                      f"{o.max_failures} tolerates: {', '.join(failed_nodes)}")
        result = self._result(kind, target, plan, results, batches, stopped, reason, start)
        result.approval = approval
        return result

    def _batch_reason(self, outcome: BatchOutcome, index: int) -> str:
        o = self.options
        failed, size = len(outcome.failed), len(outcome.results)
        tolerated = parse_threshold(o.max_failures, size)
        if index == 1 and not o.canary_failures_allowed and failed <= tolerated:
            return (f"{failed} node(s) failed in the canary batch: a failed canary stops the rollout "
                    "(--canary-failures-allowed judges it by --max-failures instead)")
        return (f"{failed} of {size} node(s) failed in batch {index}, more than the {tolerated} tolerated "
                f"(--max-failures {o.max_failures}, per batch)")

    def _pause(self, before: int) -> None:
        """--pause before a batch, said as it runs: at the start, then every PAUSE_TICK seconds
        (a minute for pauses over two), so a log shows the run is alive and what it waits for."""
        pause = self.options.pause
        tick = PAUSE_TICK if pause <= 120 else 60.0

        def say(detail: str) -> None:
            self.events.step("*", Step.WAIT, detail)

        say(f"pausing {pause:g}s before batch {before} (Ctrl-C to stop)")
        left = pause
        for mark in [tick * k for k in range(math.ceil(pause / tick) - 1, 0, -1)]:
            if self._cancel.wait(left - mark):
                raise Interrupted("interrupted by the operator")
            left = mark
            say(f"batch {before} starts in {mark:g}s (Ctrl-C to stop)")
        if self._cancel.wait(left):
            raise Interrupted("interrupted by the operator")

    def _await_approval(self, count: int) -> Verdict:
        """Wait, locks held, for the operator's answer after the canary (rollout.approval)."""
        o = self.options
        path = self.approval_file

        def say(detail: str) -> None:
            self.events.step("*", Step.APPROVE, detail)

        say(f"waiting for approval to go on after the canary (batches 2-{count} untouched, locks held): "
            f"`imagetool approve {self.rollout_id}` (or --reject), or write approve or reject into {path}"
            + (f"; stops after {o.approve_timeout:g}s without an answer" if o.approve_timeout else ""))

        def nap(seconds: float) -> None:
            self._cancel.wait(seconds)

        verdict = wait_for_answer(path, o.approve_timeout, say, sleep=nap)
        if self._cancel.is_set():
            raise Interrupted("interrupted by the operator")
        self.events.record("approval", verdict=verdict, path=str(path))
        say({"approved": "approved by the operator: going on", "rejected": "rejected by the operator: stopping",
             "timed-out": "no answer in time: stopping"}[verdict])
        return verdict

    def _run_batch(self, batch: list[NodePlan], index: int, count: int, bootstrap: str | None) -> BatchOutcome:
        at_once = min(len(batch), self.options.batch_parallel)
        detail = (f"{index}/{count}{' (canary)' if index == 1 and count > 1 else ''}"
                  f"{f', {at_once} of its {len(batch)} nodes at a time' if at_once < len(batch) else ''}")
        for p in batch:
            self.events.step(p.node, Step.BATCH, detail)
        plans = {p.node: p for p in batch}

        def one(node: Node) -> NodeResult:
            p = plans[node.name]
            r = self.activator.activate(node, p.to_id, p.from_id, resume=p.action is Action.RESUME,
                                        boot_id=p.status.boot_id, run_once=p.node == bootstrap)
            r.batch = index
            return r

        got = self._for_each(list(plans), one, at_once)
        return BatchOutcome(index=index, results={name: _result(plans[name], r) for name, r in got.items()})

    def _rollback_moved(self, plan: list[NodePlan], results: dict[str, NodeResult],
                        batches: list[list[NodePlan]]) -> dict[str, NodeResult]:
        """--on-failure rollback-all: every node this run moved goes back where it was, in
        batches of the same sizes. Returns the moved nodes' results as they now stand."""
        moved = [p for p in plan if p.node in results and results[p.node].outcome == "done"]
        if not moved:
            return {}
        now: dict[str, NodeResult] = {}
        sizes = cover([len(b) for b in batches] or [1], len(moved))
        for batch in split(moved, sizes):
            back = {p.node: p for p in batch}
            for p in batch:
                self.events.step(p.node, Step.ROLLBACK, f"rollback-all: back to {p.from_id}")

            def one(node: Node) -> NodeResult:
                p = back[node.name]  # noqa: B023 - runs within this iteration
                return self.activator.activate(node, p.from_id or "", p.to_id)

            for name, got in self._for_each(list(back), one, self.options.batch_parallel).items():
                p, orig = back[name], results[name]
                r = _result(p, got)
                seconds = orig.seconds + r.seconds
                if r.outcome == "done":
                    now[name] = replace(orig, outcome="rolled-back", undone=True, seconds=seconds,
                                        error="moved back by --on-failure rollback-all")
                else:
                    now[name] = replace(orig, outcome="failed", seconds=seconds,
                                        error=f"rollback-all could not move it back to {p.from_id}: {r.error}")
        return now

    def _result(self, kind: Literal["rollout", "rollback"], target: str | None, plan: list[NodePlan],
                results: dict[str, NodeResult], batches: list[list[NodePlan]], stopped: bool,
                reason: str | None, start: float) -> RolloutResult:
        plans = {p.node: p for p in plan}
        ordered = [results.get(name) or NodeResult(name, "failed", plans[name].from_id, plans[name].to_id,
                                                   error=plans[name].error)
                   for name in self.nodes]
        return RolloutResult(
            rollout_id=self.rollout_id, kind=kind, target=target, nodes=ordered,
            batches=[[p.node for p in b] for b in batches], stopped=stopped, reason=reason,
            dry_run=self.options.dry_run, seconds=time.monotonic() - start, full_bytes=self._full_bytes,
        )


def _result(p: NodePlan, got: NodeResult | BaseException) -> NodeResult:
    """A worker's answer as a NodeResult: an unexpected exception is that node's failure."""
    if isinstance(got, NodeResult):
        return got
    return NodeResult(p.node, "failed", p.from_id, p.to_id, error=f"{type(got).__name__}: {got}")


# --- from an inventory ---------------------------------------------------------------------------


def _on_inventory(inventory: Inventory, options: RolloutOptions | None, act: Callable[[Rollout], RolloutResult],
                  events: EventFn | None, progress: StageProgress | None = None) -> RolloutResult:
    """A journaled Rollout over the inventory's nodes (options.limit selects some), closed after.
    The rollout id is fixed first, so the journal is named before anything happens."""
    options = options or RolloutOptions()
    # A bad --limit fails in open_nodes, before any journal exists.
    with open_nodes(inventory, options.limit, accept_new_host_keys=options.accept_new_host_keys) as nodes:
        if options.rollout_id is None:
            options = replace(options, rollout_id=new_rollout_id())
        assert options.rollout_id is not None
        journal = Journal(state_dir(options.state_dir), options.rollout_id)
        try:
            return act(Rollout(nodes, options, checks=inventory.health_checks, hooks=inventory.hooks, events=events,
                               progress=progress, journal=journal, trusted_keys=inventory.trusted_keys))
        finally:
            journal.close()


def run_rollout(release: StoredRelease, inventory: Inventory, options: RolloutOptions | None = None, *,
                events: EventFn | None = None, progress: StageProgress | None = None) -> RolloutResult:
    """Roll `release` out to the inventory's nodes, journaled."""
    return _on_inventory(inventory, options, lambda r: r.run(release), events, progress)


def run_rollback(inventory: Inventory, options: RolloutOptions | None = None, *, to: str | None = None,
                 events: EventFn | None = None) -> RolloutResult:
    """Roll the inventory's nodes back to their previous image (or to `to`), journaled."""
    if to is not None:
        check_release_id(to, where="--to")  # before anything, journal included, exists
    return _on_inventory(inventory, options, lambda r: r.rollback(to), events)
