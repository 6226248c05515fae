"""Hooks: operator commands run around each node's activation, and once per rollout.

Per node, at three points (declared in the inventory's `hooks:`):
  before_activate  before the node is touched: drain it from a load balancer, migrate work off
  after_commit     once it is committed on the new image and healthy: put it back in service
  after_rollback   once a failed node is back on its committed image and healthy: put it back

Once per rollout (`run_once:`), on the bootstrap node, the first or the last one activated,
right after its after_commit hooks: cluster-wide steps such as a schema migration. The node
records that it ran it for the release, so a re-run of the same rollout does not run it again.

A hook runs on the controller (`where: controller`, a shell command with the node in its
environment) or on the node (`where: node`, over the rollout's SSH connection). Either way it gets:

  IMAGETOOL_HOOK        before_activate | after_commit | after_rollback | run_once
  IMAGETOOL_NODE        the node's inventory name
  IMAGETOOL_HOST        its address (IMAGETOOL_PORT, IMAGETOOL_USER too)
  IMAGETOOL_ROLLOUT_ID  the rollout's id
  IMAGETOOL_RELEASE     the image being activated (for after_rollback: the one that failed)
  IMAGETOOL_FROM        the image the node was committed on before
  IMAGETOOL_VAR_<NAME>  each of the node's inventory vars (name upper-cased, '-' and '.' as '_')

A hook that exits non-zero or outlasts its timeout fails the node exactly like a failing health
gate, and the node is put back on its committed image.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from imagetool.errors import ImagetoolError, NodeError

if TYPE_CHECKING:
    from rollout.node import Node
    from rollout.nodespec import NodeSpec

HOOK_POINTS: tuple[str, ...] = ("before_activate", "after_commit", "after_rollback")
Where = Literal["controller", "node"]
OUTPUT_TAIL = 2000


class HookError(NodeError):
    """A hook failed: the node fails like on a failing health gate."""


@dataclass(frozen=True)
class HookSpec:
    name: str
    run: str
    where: Where = "controller"
    timeout: float = 300.0


@dataclass(frozen=True)
class RunOnceSpec(HookSpec):
    # Which node runs it: the first one activated (it then runs before the rest of the cluster
    # moves) or the last one (after the whole cluster is on the new image).
    node: Literal["first", "last"] = "first"


@dataclass(frozen=True)
class Hooks:
    before_activate: tuple[HookSpec, ...] = ()
    after_commit: tuple[HookSpec, ...] = ()
    after_rollback: tuple[HookSpec, ...] = ()
    run_once: RunOnceSpec | None = None

    def at(self, point: str) -> tuple[HookSpec, ...]:
        return getattr(self, point)


def _var_name(name: str) -> str:
    return "IMAGETOOL_VAR_" + re.sub(r"[^A-Za-z0-9_]", "_", name).upper()


def hook_env(spec: NodeSpec, point: str, *, rollout_id: str, release: str | None,
             from_id: str | None) -> dict[str, str]:
    env = {
        "IMAGETOOL_HOOK": point,
        "IMAGETOOL_NODE": spec.name,
        "IMAGETOOL_HOST": spec.host,
        "IMAGETOOL_PORT": str(spec.port),
        "IMAGETOOL_USER": spec.user,
        "IMAGETOOL_ROLLOUT_ID": rollout_id,
        "IMAGETOOL_RELEASE": release or "",
        "IMAGETOOL_FROM": from_id or "",
    }
    for k, v in spec.vars.items():
        env[_var_name(str(k))] = v if isinstance(v, str) else str(v)
    return env


@dataclass
class HookResult:
    hook: str
    point: str
    where: Where
    exit_status: int | None
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


def run_hook(hook: HookSpec, point: str, node: Node, env: dict[str, str]) -> HookResult:
    """Run one hook for `node`; raises HookError naming the hook with its output when it fails."""
    start = time.monotonic()
    where: Where = hook.where
    if where == "controller":
        try:
            r = subprocess.run(["/bin/sh", "-c", hook.run], env={**os.environ, **env}, capture_output=True,
                               text=True, timeout=hook.timeout, stdin=subprocess.DEVNULL)
            status, output = r.returncode, r.stdout + r.stderr
        except subprocess.TimeoutExpired as e:
            status = None
            output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        except OSError as e:
            status, output = 127, str(e)
    else:
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        # `timeout` on the node: a remote command cannot be killed from here (see transport).
        command = f"export {exports}; timeout {hook.timeout:g} /bin/sh -c {shlex.quote(hook.run)}"
        try:
            res = node.run_shell(command, timeout=hook.timeout + 15)
            status, output = res.exit_status, res.stdout + res.stderr
            if status == 124:  # coreutils timeout
                status = None
        except ImagetoolError as e:
            status, output = None, str(e)
    result = HookResult(hook.name, point, where, status, output.strip()[-OUTPUT_TAIL:], time.monotonic() - start)
    if not result.ok:
        why = f"timed out after {hook.timeout:g}s" if status is None else f"exited {status}"
        tail = f":\n    {result.output.replace(chr(10), chr(10) + '    ')}" if result.output else ""
        raise HookError(f"node {node.name}: {point} hook {hook.name!r} ({where}) {why}{tail}")
    return result
