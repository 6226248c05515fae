"""The rollout lock on each node: who holds it, and when a run may take it over.

The node helper keeps the lock and changes it only by compare-and-swap (`lock --token`,
`--take-over-token`, `unlock --token`); whether a run may take over a lock another run left is
decided here, on the controller, as a pure function of the lock, this process's identity and the
node's clock.

A lock is taken over without asking only on proof that its controller process is gone: the lock
records the holder's process table (kernel boot id and pid namespace), pid and the process's start
time, and a controller that shares that very process table sees the pid gone or reused. A name
such as user@hostname proves nothing (two machines can share it), and neither does a pid seen
from another machine or container.
"""

from __future__ import annotations

import getpass
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

PROC = "/proc"
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def new_rollout_id(now: float | None = None) -> str:
    """`YYYYmmddTHHMMSS-<6 hex>` in UTC: sorts by time, unique enough across controllers."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(3)


def new_lock_token() -> str:
    """Names one acquisition of node locks: 128 random bits, so no two runs share one."""
    return secrets.token_hex(16)


def default_owner() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name is not worth failing a rollout over
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


# --- who holds a lock ---------------------------------------------------------------------------


def _positive_int(value: object) -> TypeGuard[int]:
    """A pid or a process start time as a lock file records it (JSON: a bool is no number here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class Holder:
    """The controller process holding a lock, named so that its end can be proven.

    `boot_id` and `pid_ns` together name one process table (a kernel boot and a pid namespace in
    it; a container shares the host's boot id but not its pids). `start` (clock ticks after
    boot, /proc/PID/stat field 22) tells the process from a later one that got its pid again.
    `machine_id` is for the operator's eyes and one more thing that must match."""

    boot_id: str
    pid_ns: str
    pid: int
    start: int
    machine_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"boot_id": self.boot_id, "pid_ns": self.pid_ns, "pid": self.pid, "start": self.start,
                "machine_id": self.machine_id}

    @classmethod
    def from_dict(cls, doc: Any) -> Holder | None:
        """The holder a lock records, or None when it records none that could prove anything."""
        if not isinstance(doc, dict):
            return None
        boot_id, pid_ns, pid, start = (doc.get(k) for k in ("boot_id", "pid_ns", "pid", "start"))
        if not (isinstance(boot_id, str) and boot_id and isinstance(pid_ns, str) and pid_ns):
            return None
        if not (_positive_int(pid) and _positive_int(start)):
            return None
        machine_id = doc.get("machine_id")
        return cls(boot_id, pid_ns, pid, start, machine_id if isinstance(machine_id, str) else "")

    def same_process_table(self, other: Holder) -> bool:
        return (self.boot_id, self.pid_ns, self.machine_id) == (other.boot_id, other.pid_ns, other.machine_id)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def process_start(pid: int, proc: str = PROC) -> int | None:
    """When process `pid` of this pid namespace started (clock ticks after boot), or None when
    there is no such process."""
    stat = _read(f"{proc}/{pid}/stat")
    if not stat or ")" not in stat:
        return None
    # Field 2 (the command) is in parentheses and may itself hold spaces and ')'.
    fields = stat.rsplit(")", 1)[1].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def this_process(proc: str = PROC, machine_id_files: tuple[str, ...] = MACHINE_ID_FILES) -> Holder | None:
    """This process as a lock holder, or None where /proc cannot tell (then no later run can
    prove it gone, and its locks are broken only with --break-lock)."""
    boot_id = _read(f"{proc}/sys/kernel/random/boot_id")
    try:
        pid_ns = os.readlink(f"{proc}/self/ns/pid")
    except OSError:
        return None
    pid = os.getpid()
    start = process_start(pid, proc)
    if not boot_id or start is None:
        return None
    machine_id = next((m for m in map(_read, machine_id_files) if m and m != "uninitialized"), "")
    return Holder(boot_id=boot_id, pid_ns=pid_ns, pid=pid, start=start, machine_id=machine_id)


@dataclass(frozen=True)
class LockClaim:
    """What one run presents to take, keep and release node locks: its rollout id, a token naming
    this very acquisition (a second controller with the same rollout id has another) and who
    holds it."""

    rollout: str
    owner: str
    command: str
    token: str = field(default_factory=new_lock_token)
    holder: Holder | None = field(default_factory=this_process)

    def holds(self, lock: dict[str, Any] | None) -> bool:
        """Is `lock` (as a node reports it) this claim's own acquisition?"""
        return bool(lock) and lock.get("rollout") == self.rollout and lock.get("token") == self.token  # type: ignore[union-attr]


# --- the take-over rule --------------------------------------------------------------------------


def lock_time(lock: dict[str, Any]) -> float:
    t = lock.get("time")
    return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) else 0.0


def describe_lock(lock: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(lock_time(lock)))
    if lock.get("unreadable"):
        return f"an unreadable lock file ({lock['unreadable']}; last written {since} UTC)"
    holder = Holder.from_dict(lock.get("holder"))
    pid = holder.pid if holder else lock.get("pid")
    where = f" on machine {holder.machine_id[:12]}" if holder and holder.machine_id else ""
    return (f"rollout {lock.get('rollout')} of {lock.get('owner')}" + (f", pid {pid}{where}" if pid else "")
            + f" ({lock.get('command')!r}, since {since} UTC)")


def holder_gone(held: dict[str, Any], here: Holder | None,
                start_of: Callable[[int], int | None] = process_start) -> tuple[bool | None, str]:
    """Is the controller process holding `held` gone? True (proven), False (it runs), or None
    (cannot tell from here), and why. Proof needs this very process table: the same boot and pid
    namespace (and machine id) as this process, where the pid is gone or started at another time."""
    holder = Holder.from_dict(held.get("holder"))
    if holder is None:
        return None, "the lock does not say which process table its controller ran in"
    if here is None:
        return None, "this controller cannot name its own process table"
    if not holder.same_process_table(here):
        return None, "its controller ran on another machine, boot or container"
    start = start_of(holder.pid)
    if start == holder.start:
        return False, f"its controller process {holder.pid} is still running here"
    if start is None:
        return True, f"its controller process {holder.pid} on this machine is gone"
    return True, f"its controller process {holder.pid} on this machine is gone (the pid is another process's now)"


def may_take_over(held: dict[str, Any], *, rollout_id: str, here: Holder | None, node_time: float | None,
                  break_lock: bool, lock_max_age: float,
                  start_of: Callable[[int], int | None] = process_start) -> tuple[bool, str]:
    """May the run `rollout_id` (its process being `here`) take over the lock `held`, which is
    not its own acquisition? Returns (whether, why). A lock whose controller process is proven
    gone is taken over; any other only with `break_lock`, once it is `lock_max_age` seconds old
    by the node's clock. A run with the same rollout id is another controller like any other."""
    gone, why_gone = holder_gone(held, here, start_of)
    if gone:
        return True, why_gone
    age = max(0.0, (node_time or time.time()) - lock_time(held))
    if break_lock and age >= lock_max_age:
        return True, f"--break-lock: it is {age:.0f}s old (--lock-max-age {lock_max_age:g})"
    same = " and runs with the same rollout id" if held.get("rollout") == rollout_id else ""
    if break_lock:
        return False, (f"{why_gone}{same}; it is only {age:.0f}s old, and --break-lock takes over locks older "
                       f"than --lock-max-age {lock_max_age:g}s")
    hint = "if that run is gone" if gone is None else "to take it from that run anyway"
    return False, (f"{why_gone}{same}; it is {age:.0f}s old; {hint}, pass --break-lock "
                   f"(locks older than --lock-max-age {lock_max_age:g}s)")
