"""The health gate: may this node, just booted into an image, be committed to it?

Three sources of checks, all of which must pass:
- the node helper's own `health` (systemd reached `running`, the release's services are active,
  the checks shipped inside the image in /usr/lib/imagetool/health.d);
- the inventory's `health_checks` (a command on the node, or tcp/http from the controller, which
  is what the node's clients will do; the kinds are in rollout.checks);
- checks given on the command line (--check-http, --check-tcp, --check-command).

A freshly booted node is still settling, so the helper's health is retried for up to the gate's
timeout before it counts as failed; each extra check has its own retries and interval.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tenacity import RetryError, Retrying, retry_if_result, stop_after_attempt, stop_after_delay, wait_fixed

from imagetool.errors import ImagetoolError, NodeError
from rollout.checks import OUTPUT_LIMIT, CheckResult, CheckSpec, attempt
from rollout.node import Node
from rollout.nodespec import NodeSpec

# How long one helper `health` call may wait inside for systemd to settle before answering.
HELPER_WAIT = 10.0


@dataclass
class HealthReport:
    node: str
    healthy: bool
    checks: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failing(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "healthy": self.healthy, "seconds": round(self.seconds, 1),
                "checks": [c.__dict__ for c in self.checks]}


class HealthGateError(NodeError):
    """A node failed its health gate; the message names the failing checks and their output."""

    def __init__(self, report: HealthReport, timeout: float) -> None:
        lines = []
        for c in report.failing:
            line = f"{c.name}: {c.detail}" if c.detail else c.name
            if c.output:
                line += "\n    " + "\n    ".join(c.output[-OUTPUT_LIMIT:].splitlines()[-10:])
            lines.append(line)
        super().__init__(
            f"node {report.node}: health gate failed after {report.seconds:.0f}s "
            f"(timeout {timeout:g}s): " + "; ".join(lines)
        )
        self.report = report


@dataclass(frozen=True)
class HealthGate:
    """How to judge one node: the extra checks (already filled in per node is not required; the
    gate does it), how long the node may take to settle, and how often to ask again."""

    checks: tuple[CheckSpec, ...] = ()
    timeout: float = 120.0
    interval: float = 2.0


# --- running checks --------------------------------------------------------------------------


def run_check(node: Node, check: CheckSpec) -> CheckResult:
    """One check with its retries: passes on the first passing attempt."""
    try:
        return Retrying(
            stop=stop_after_attempt(max(1, check.retries)),
            wait=wait_fixed(check.interval),
            retry=retry_if_result(lambda r: not r.ok),
        )(attempt, node, check)
    except RetryError as e:
        return e.last_attempt.result()


def _helper_health(node: Node, wait: float) -> list[CheckResult]:
    try:
        doc = node.health(wait=wait)
    except ImagetoolError as e:
        return [CheckResult("node-helper", False, str(e))]
    checks = [CheckResult.from_helper(c) for c in doc.get("checks") or [] if isinstance(c, dict)]
    if not doc.get("healthy") and all(c.ok for c in checks):
        checks.append(CheckResult("node-helper", False, "the node reports itself unhealthy"))
    return checks


def check_node(node: Node, gate: HealthGate) -> HealthReport:
    """Run the gate on one node; raise HealthGateError if it does not pass within gate.timeout.

    Extra checks are filled in ({host}, {name}, ...) from the node's inventory entry when it has
    one (`node.spec`)."""
    spec: NodeSpec | None = getattr(node, "spec", None)
    start = time.monotonic()
    deadline = start + gate.timeout

    def helper_attempt() -> list[CheckResult]:
        remaining = max(0.0, deadline - time.monotonic())
        return _helper_health(node, min(HELPER_WAIT, remaining))

    try:
        helper = Retrying(
            stop=stop_after_delay(gate.timeout),
            wait=wait_fixed(gate.interval),
            retry=retry_if_result(lambda checks: not all(c.ok for c in checks)),
        )(helper_attempt)
    except RetryError as e:
        helper = e.last_attempt.result()
    checks = list(helper)
    if all(c.ok for c in helper):
        for check in gate.checks:
            checks.append(run_check(node, check.for_node(spec) if spec is not None else check))
    report = HealthReport(node=node.name, healthy=all(c.ok for c in checks), checks=checks,
                          seconds=time.monotonic() - start)
    if not report.healthy:
        raise HealthGateError(report, gate.timeout)
    return report
