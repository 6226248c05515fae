"""One node's activation: one-shot boot into the target, health gate, commit; undone on failure.

Each step registers its undo as it succeeds (diskimage-builder's block_device style); a failure
anywhere unwinds them newest first, so the node ends on its committed image, checked by the same
health gate. What became of the node is returned as data (policy.NodeResult), never raised:
the batch runner decides what the rollout does about it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from imagetool.errors import ImagetoolError, NodeError, UnreachableError, VerificationError
from rollout.events import Events, Step
from rollout.health import HealthGate, HealthGateError, HealthReport, check_node
from rollout.hooks import Hooks, HookSpec, hook_env, run_hook
from rollout.node import Node, NodeStatus
from rollout.policy import NodeResult


class Interrupted(ImagetoolError):
    """The operator interrupted the rollout; nodes in flight were put back."""

    kind = "interrupted"
    exit_code = 130


class UndoStack:
    """Undo steps registered as a node's activation proceeds, run newest first on failure."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, fn: Callable[[], None]) -> None:
        self._steps.append((what, fn))

    def clear(self) -> None:
        self._steps.clear()

    @property
    def empty(self) -> bool:
        return not self._steps

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


@dataclass
class Activator:
    """What every activation of one run shares: its id, timeouts, gate, hooks, events, and the
    operator's Ctrl-C (`cancel`), which each step checks before it starts."""

    rollout_id: str
    gate: HealthGate
    hooks: Hooks
    events: Events
    cancel: threading.Event
    confirm_timeout: float
    boot_timeout: float

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Interrupted("interrupted by the operator")

    # --- one node ---------------------------------------------------------------------------

    def activate(self, node: Node, target: str, committed: str | None, *, resume: bool = False,
                 boot_id: str | None = None, run_once: bool = False) -> NodeResult:
        """Move one node to `target`; on any failure put it back on `committed`. With `resume`,
        the node is already booted into `target` (an interrupted run): straight to the gate.
        `run_once`: this node runs the run-once step after its commit."""
        start = time.monotonic()
        undo = UndoStack()
        boot = _Boot(boot_id)
        name = node.name
        step = self.events.step
        try:
            self.check_cancel()
            if resume:
                # Booted into the target by an interrupted run, not yet committed: the dead-man
                # switch may be ticking, so go straight to the gate.
                undo.push(f"boot {committed} again", lambda: self.recover(node, committed, boot))
            else:
                self.run_hooks("before_activate", node, target, committed)
                step(name, Step.ACTIVATE, f"next boot: {target}")
                node.set_next(target, self.confirm_timeout, self.rollout_id)
                undo.push("clear the next boot", node.clear_next)
                self.check_cancel()
                step(name, Step.BOOT, "rebooting")
                boot.id = node.reboot()
                undo.push(f"boot {committed} again", lambda: self.recover(node, committed, boot))
                step(name, Step.BOOT, f"waiting up to {self.boot_timeout:g}s for the new boot")
                st = node.wait_for_boot(boot.id, self.boot_timeout, self.cancel)
                boot.id = st.boot_id
                self.check_cancel()
                if st.booted != target:
                    raise NodeError(f"node {name}: booted {st.booted} instead of {target}")
            step(name, Step.VERIFY, "health gate")
            self.health_gate(node, target)
            self.check_cancel()
            step(name, Step.COMMIT, target)
            node.confirm(target)
            node.commit(target, self.rollout_id)
            undo.clear()
            # Committed: from here a failure (a hook, the run-once step) means a full move back.
            undo.push(f"move back to {committed}", lambda: self.move_back(node, committed, target, boot))
            self.run_hooks("after_commit", node, target, committed)
            if run_once:
                self.run_once(node, committed, target)
            undo.clear()
            step(name, Step.DONE, f"{committed} → {target}")
            return NodeResult(name, "done", committed, target, time.monotonic() - start)
        except BaseException as e:
            # Unreachable before its boot was touched: nothing to put back on the node.
            unreached = isinstance(e, UnreachableError) and undo.empty
            step(name, Step.ROLLBACK, f"{e}")
            problems = undo.unwind()
            if not isinstance(e, Exception):
                raise
            if not problems and self.hooks.after_rollback:
                try:
                    self.run_hooks("after_rollback", node, target, committed)
                except ImagetoolError as hook_error:
                    problems.append(str(hook_error))
            # The node refusing the image (set-next re-verifies it) is this node's failure, not
            # the rollout's: said as such, and left to the batch policy.
            why = f"verification failed: {e}" if isinstance(e, VerificationError) else str(e)
            if problems:
                step(name, Step.FAILED, "; ".join(problems))
                return NodeResult(name, "failed", committed, target, time.monotonic() - start,
                                  f"{why}; putting it back failed: {'; '.join(problems)}")
            if unreached:
                step(name, Step.UNREACHABLE, why)
                return NodeResult(name, "unreachable", committed, target, time.monotonic() - start,
                                  f"{why}; nothing was done on it")
            step(name, Step.ROLLED_BACK, f"back on {committed}")
            return NodeResult(name, "rolled-back", committed, target, time.monotonic() - start, why)

    def health_gate(self, node: Node, image: str | None, gate: HealthGate | None = None) -> HealthReport:
        """The gate (this run's, or `gate`), its evidence journaled as a `health` event whether it
        passes or not: every check with its detail, and the output of the failing ones."""
        try:
            report = check_node(node, gate or self.gate)
        except HealthGateError as e:
            self._journal_health(e.report, image)
            raise
        self._journal_health(report, image)
        return report

    def _journal_health(self, report: HealthReport, image: str | None) -> None:
        self.events.record("health", node=report.node, image=image, healthy=report.healthy,
                           seconds=round(report.seconds, 2),
                           checks=[{"name": c.name, "ok": c.ok, "detail": c.detail, "output": "" if c.ok else c.output}
                                   for c in report.checks])

    def recover(self, node: Node, committed: str | None, boot: _Boot) -> None:
        """Put a node whose activation failed back on its committed image, and check it."""
        name = node.name
        if committed is None:
            raise NodeError(f"node {name}: no committed image to go back to")
        self.events.step(name, Step.ROLLBACK, f"back to {committed}")
        try:
            st: NodeStatus | None = node.status()
        except ImagetoolError:
            st = None
        if st is None:
            if node.can_reset:
                self.events.step(name, Step.ROLLBACK, "unreachable: resetting it out of band")
                node.reset()
                wait = self.boot_timeout
            else:
                wait = self.confirm_timeout + self.boot_timeout
                self.events.step(name, Step.ROLLBACK, f"unreachable: waiting up to {wait:g}s for its dead-man switch")
            st = node.wait_for_boot(boot.id, wait)
            boot.id = st.boot_id
        if st.booted != committed:
            # Reachable but on the target (or late to come up into it): the one-shot entry is
            # spent, so a plain reboot lands on the default.
            node.clear_next()
            self.events.step(name, Step.ROLLBACK, f"rebooting into {committed}")
            old = node.reboot()
            st = node.wait_for_boot(old, self.boot_timeout)
            boot.id = st.boot_id
        elif st.next is not None:
            node.clear_next()
        if st.booted != committed:
            raise NodeError(f"node {name}: booted {st.booted} after the rollback, not {committed}")
        self.events.step(name, Step.VERIFY, f"health gate on {committed}")
        self.health_gate(node, committed)

    def move_back(self, node: Node, committed: str | None, target: str, boot: _Boot) -> None:
        """A node already committed on `target` whose after_commit hook or run-once step failed
        goes back to `committed`: the same activation the other way, without hooks."""
        name = node.name
        if committed is None or committed == target:
            raise NodeError(f"node {name}: no other committed image to move back to")
        self.events.step(name, Step.ROLLBACK, f"moving back to {committed}")
        node.set_next(committed, self.confirm_timeout, self.rollout_id)
        old = node.reboot()
        st = node.wait_for_boot(old, self.boot_timeout)
        boot.id = st.boot_id
        if st.booted != committed:
            raise NodeError(f"node {name}: booted {st.booted} when moving back, not {committed}")
        self.events.step(name, Step.VERIFY, f"health gate on {committed}")
        self.health_gate(node, committed)
        node.confirm(committed)
        node.commit(committed, self.rollout_id)

    # --- hooks ------------------------------------------------------------------------------

    def run_hooks(self, point: str, node: Node, target: str, committed: str | None) -> None:
        for hook in self.hooks.at(point):
            self.check_cancel()
            self.events.step(node.name, Step.HOOK, f"{point}: {hook.name} ({hook.where})")
            self._run_hook(hook, point, node, target, committed)

    def run_once(self, node: Node, committed: str | None, target: str) -> None:
        once = self.hooks.run_once
        assert once is not None
        self.events.step(node.name, Step.RUN_ONCE, f"{once.name} ({once.where})")
        self._run_hook(once, "run_once", node, target, committed)
        node.ran_once(target, self.rollout_id)

    def _run_hook(self, hook: HookSpec, point: str, node: Node, target: str, committed: str | None) -> None:
        env = hook_env(node.spec, point, rollout_id=self.rollout_id, release=target, from_id=committed)
        r = run_hook(hook, point, node, env)
        self.events.record("hook", node=node.name, point=point, hook=hook.name, where=hook.where,
                           exit_status=r.exit_status, seconds=round(r.seconds, 2), output=r.output[-500:])


class _Boot:
    """The boot id a node's activation last saw (its undo steps wait for a boot after it)."""

    def __init__(self, boot_id: str | None) -> None:
        self.id = boot_id
