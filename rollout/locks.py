"""The rollout lock on each node: who holds it, and when a run may take it over.

The node helper keeps the lock (`lock`, `unlock`); the rule for taking over a lock another run
left is decided here, on the controller, as a pure function of the lock and the node's clock.
"""

from __future__ import annotations

import getpass
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from imagetool.systools import pid_alive


def new_rollout_id(now: float | None = None) -> str:
    """`YYYYmmddTHHMMSS-<6 hex>` in UTC: sorts by time, unique enough across controllers."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(3)


def default_owner() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name is not worth failing a rollout over
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def describe_lock(lock: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(lock.get("time") or 0)))
    pid = f", pid {lock['pid']}" if lock.get("pid") else ""
    return (f"rollout {lock.get('rollout')} of {lock.get('owner')}{pid} "
            f"({lock.get('command')!r}, since {since} UTC)")


def may_take_over(held: dict[str, Any], *, owner: str, node_time: float | None, break_lock: bool,
                  lock_max_age: float, alive: Callable[[int], bool] = pid_alive) -> tuple[str | None, str]:
    """May a run of `owner` take over the lock `held`? Returns (the rollout id to take over, or
    None, and why). A lock of this owner whose controller process is gone is taken over; any
    other only with `break_lock`, once it is `lock_max_age` seconds old by the node's clock."""
    pid = held.get("pid")
    if held.get("owner") == owner and isinstance(pid, int) and not alive(pid):
        return held.get("rollout"), f"its controller process {pid} on this machine is gone"
    age = max(0.0, (node_time or time.time()) - float(held.get("time") or 0))
    if break_lock and age >= lock_max_age:
        return held.get("rollout"), f"--break-lock: it is {age:.0f}s old (--lock-max-age {lock_max_age:g})"
    if break_lock:
        return None, (f"it is only {age:.0f}s old; --break-lock takes over locks older than "
                      f"--lock-max-age {lock_max_age:g}s")
    return None, (f"it is {age:.0f}s old; if that run is gone, pass --break-lock (locks older than "
                  f"--lock-max-age {lock_max_age:g}s) or --rollout-id {held.get('rollout')} to carry it on")
