"""The health gate: may this node, just booted into an image, be committed to it?

Three sources of checks, all of which must pass:
- the node helper's own `health` (systemd reached `running`, the release's services are active,
  the checks shipped inside the image in /usr/lib/imagetool/health.d);
- the inventory's `health_checks` (a command on the node, or tcp/http from the controller, which
  is what the node's clients will do);
- checks given on the command line (--check-http, --check-tcp, --check-command).

A freshly booted node is still settling, so the helper's health is retried for up to the gate's
timeout before it counts as failed; each extra check has its own retries and interval.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from tenacity import RetryError, Retrying, retry_if_result, stop_after_attempt, stop_after_delay, wait_fixed

from imagetool.errors import ImagetoolError, InputError, NodeError
from rollout.inventory import CheckSpec, NodeSpec
from rollout.node import Node

OUTPUT_LIMIT = 2000
# How long one helper `health` call may wait inside for systemd to settle before answering.
HELPER_WAIT = 10.0


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str = ""
    output: str = ""
    seconds: float = 0.0

    @classmethod
    def from_helper(cls, doc: dict[str, Any]) -> CheckResult:
        return cls(name=str(doc.get("name")), ok=bool(doc.get("ok")), detail=str(doc.get("detail") or ""),
                   output=str(doc.get("output") or ""), seconds=float(doc.get("seconds") or 0))


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


# --- command-line checks -------------------------------------------------------------------


def parse_check_http(arg: str, index: int = 0) -> CheckSpec:
    """--check-http URL[=STATUS], e.g. http://{host}:8080/health=204."""
    url, status = arg, 200
    m = re.match(r"^(.*)=(\d{3})$", arg)
    if m:
        url, status = m.group(1), int(m.group(2))
    if not re.match(r"^https?://", url):
        raise InputError(f"--check-http {arg!r}: expected an http:// or https:// URL, optionally =STATUS")
    if not 100 <= status <= 599:
        raise InputError(f"--check-http {arg!r}: {status} is not an HTTP status")
    return CheckSpec(name=f"cli-http-{index + 1}", kind="http", target=url, expect_status=status)


def parse_check_tcp(arg: str, index: int = 0) -> CheckSpec:
    """--check-tcp HOST:PORT, e.g. {host}:5432."""
    if not re.match(r"^.+:(\d+|\{[^}]+\})$", arg):
        raise InputError(f"--check-tcp {arg!r}: expected HOST:PORT, e.g. '{{host}}:22'")
    return CheckSpec(name=f"cli-tcp-{index + 1}", kind="tcp", target=arg)


def parse_check_command(arg: str, index: int = 0) -> CheckSpec:
    if not arg.strip():
        raise InputError("--check-command: the command is empty")
    return CheckSpec(name=f"cli-command-{index + 1}", kind="command", target=arg)


def cli_checks(http: tuple[str, ...] | list[str] = (), tcp: tuple[str, ...] | list[str] = (),
               command: tuple[str, ...] | list[str] = ()) -> list[CheckSpec]:
    return ([parse_check_http(a, i) for i, a in enumerate(http)]
            + [parse_check_tcp(a, i) for i, a in enumerate(tcp)]
            + [parse_check_command(a, i) for i, a in enumerate(command)])


# --- running checks --------------------------------------------------------------------------


def _tail(text: str) -> str:
    return text.strip()[-OUTPUT_LIMIT:]


def _attempt(node: Node, check: CheckSpec) -> CheckResult:
    start = time.monotonic()
    if check.kind == "command":
        try:
            r = node.run_shell(check.target, timeout=check.timeout)
            return CheckResult(check.name, r.ok, f"`{check.target}`: exit status {r.exit_status}",
                               _tail(r.stdout + r.stderr), time.monotonic() - start)
        except ImagetoolError as e:
            return CheckResult(check.name, False, f"`{check.target}`: {e}", "", time.monotonic() - start)
    if check.kind == "tcp":
        host, _, port = check.target.rpartition(":")
        host = host.strip("[]")
        try:
            with socket.create_connection((host, int(port)), timeout=check.timeout):
                pass
            return CheckResult(check.name, True, f"tcp {check.target}: connected", "", time.monotonic() - start)
        except (OSError, ValueError) as e:
            return CheckResult(check.name, False, f"tcp {check.target}: {e}", "", time.monotonic() - start)
    # http: urllib raises for >= 400, which may be the expected status.
    try:
        with urllib.request.urlopen(check.target, timeout=check.timeout) as resp:  # noqa: S310 - operator's URL
            status, body = resp.status, resp.read(OUTPUT_LIMIT).decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        status, body = e.code, (e.read(OUTPUT_LIMIT) or b"").decode("utf-8", "replace")
    except (OSError, ValueError) as e:
        return CheckResult(check.name, False, f"GET {check.target}: {getattr(e, 'reason', e)}", "",
                           time.monotonic() - start)
    ok = status == check.expect_status
    return CheckResult(check.name, ok, f"GET {check.target}: status {status} (expected {check.expect_status})",
                       "" if ok else _tail(body), time.monotonic() - start)


def run_check(node: Node, check: CheckSpec) -> CheckResult:
    """One check with its retries: passes on the first passing attempt."""
    try:
        return Retrying(
            stop=stop_after_attempt(max(1, check.retries)),
            wait=wait_fixed(check.interval),
            retry=retry_if_result(lambda r: not r.ok),
        )(_attempt, node, check)
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
