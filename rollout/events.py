"""A run's steps as they happen: to the journal (for the record) and to the operator's display.

Neither may break a rollout: a full controller disk or a broken display is swallowed here, so a
node mid-activation is never stranded by the bookkeeping about it.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

from rollout.journal import Journal

# (node, step, detail): called from worker threads, so a receiver must be thread-safe. Node "*"
# is about the whole rollout.
EventFn = Callable[[str, str, str], None]


class Step(str, Enum):
    CONNECT = "connect"
    LOCK = "lock"
    STAGE = "stage"
    WAIT = "wait"          # pausing between batches (node "*"): at the start, then every 10 s or minute
    APPROVE = "approve"    # waiting for the operator after the canary, and the answer (node "*")
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
    UNREACHABLE = "unreachable"
    NOT_STARTED = "not-started"
    PLANNED = "planned"


class Events:
    """Steps go to the journal as `step` events and to `listener`; other events only to the journal."""

    def __init__(self, journal: Journal | None = None, listener: EventFn | None = None) -> None:
        self.journal = journal
        self.listener = listener

    def step(self, node: str, step: Step | str, detail: str = "") -> None:
        name = step.value if isinstance(step, Step) else step
        if self.journal is not None:
            try:
                self.journal.step(node, name, detail)
            except OSError:
                pass
        if self.listener is None:
            return
        try:
            self.listener(node, name, detail)
        except Exception:  # noqa: BLE001 - a broken display must not break a rollout
            pass

    def record(self, event: str, **fields: Any) -> None:
        if self.journal is not None:
            try:
                self.journal.write(event, **fields)
            except OSError:
                pass
