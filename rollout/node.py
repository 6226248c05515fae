"""The one interface the rollout talks to nodes through, and the node helper's client.

Shaped like colmena's `Host`: status, copy an image in, activate it with a reboot, wait for the
boot, check, commit. `HelperNode` drives the node helper (`imagetool-node`) over any
`Transport`: SSH in production (`ssh_nodes`), a directory on this machine running the very same
helper in unit tests and benches (`rollout.local.local_nodes`). Every helper command answers one
JSON object; `{"ok": false, "error": E}` becomes a `HelperError` naming node and E.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from tenacity import RetryError, Retrying, retry_if_exception, stop_after_delay, stop_when_event_set, wait_fixed

from imagetool.errors import HostKeyError, ImagetoolError, LockedError, NodeError, UnreachableError
from imagetool.layout import NODE_INCOMING, image_paths
from rollout.locks import LockClaim
from rollout.nodespec import NodeSpec
from rollout.transport import CommandResult, ProgressFn, SSHTransport, Transport

HELPER = "imagetool-node"
# Seconds a helper command may take. Most answer at once; stage-commit hashes the whole image
# (a few seconds per GiB) and health runs the image's own checks.
QUICK_TIMEOUT = 60
STAGE_COMMIT_TIMEOUT = 900
TRANSFER_TIMEOUT = 3600
RESET_TIMEOUT = 120
BOOT_POLL_INTERVAL = 1.0

T = TypeVar("T")
N = TypeVar("N", bound="Node")


class HelperError(NodeError):
    """The node helper refused or failed a command; `error` is the node's own words."""

    def __init__(self, node: str, command: str, error: str) -> None:
        super().__init__(f"node {node}: imagetool-node {command}: {error}")
        self.node = node
        self.command = command
        self.error = error


class BootTimeoutError(NodeError):
    """A node did not come back with a new boot within the time allowed."""


# --- the helper's answers as data -------------------------------------------------------------


@dataclass(frozen=True)
class NodeImage:
    """An image installed (staged) on a node."""

    id: str
    size: int
    sha256: str | None
    signed: bool = False
    mtime: int = 0


def _lock_answer(lock: Any) -> dict[str, Any] | None:
    """The node's lock as a dict: an older helper passes on whatever JSON its lock file holds."""
    if lock is None or isinstance(lock, dict):
        return lock
    return {"rollout": None, "owner": None, "time": 0,
            "unreadable": f"the node's lock file holds a JSON {type(lock).__name__}, not an object"}


@dataclass(frozen=True)
class NodeStatus:
    """`imagetool-node status`: what the node booted, what it will boot, what it holds."""

    name: str
    booted: str | None
    default: str | None
    next: str | None
    committed: str | None
    previous: str | None
    boot_id: str
    images: tuple[NodeImage, ...] = ()
    free_bytes: int = 0
    lock: dict[str, Any] | None = None
    system_state: str = "unknown"
    trial: dict[str, Any] | None = None
    last_rollout: str | None = None
    hostname: str | None = None
    # The node's clock when it answered (lock ages are measured on it), and the run-once step
    # it last ran: {"release", "rollout", "time"}.
    time: float | None = None
    run_once: dict[str, Any] | None = None

    @classmethod
    def from_answer(cls, name: str, doc: dict[str, Any]) -> NodeStatus:
        images = tuple(
            NodeImage(id=i["id"], size=int(i.get("size") or 0), sha256=i.get("sha256"),
                      signed=bool(i.get("signed")), mtime=int(i.get("mtime") or 0))
            for i in doc.get("images") or [] if isinstance(i, dict) and i.get("id")
        )
        return cls(
            name=name,
            booted=doc.get("booted"),
            default=doc.get("default"),
            next=doc.get("next"),
            committed=doc.get("committed"),
            previous=doc.get("previous"),
            boot_id=str(doc.get("boot_id") or ""),
            images=images,
            free_bytes=int(doc.get("free_bytes") or 0),
            lock=_lock_answer(doc.get("lock")),
            system_state=str(doc.get("system_state") or "unknown"),
            trial=doc.get("trial"),
            last_rollout=doc.get("last_rollout"),
            hostname=doc.get("hostname"),
            time=float(doc["time"]) if isinstance(doc.get("time"), (int, float)) else None,
            run_once=doc.get("run_once") if isinstance(doc.get("run_once"), dict) else None,
        )

    def image(self, image_id: str) -> NodeImage | None:
        return next((i for i in self.images if i.id == image_id), None)

    def has_image(self, image_id: str) -> bool:
        return self.image(image_id) is not None

    def settled_on(self, image_id: str) -> bool:
        """Booted, default and committed all agree on `image_id`: nothing to activate."""
        return self.booted == image_id and self.default == image_id and self.committed == image_id

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "booted": self.booted, "default": self.default, "next": self.next,
            "committed": self.committed, "previous": self.previous, "boot_id": self.boot_id,
            "images": [i.__dict__ for i in self.images], "free_bytes": self.free_bytes,
            "lock": self.lock, "system_state": self.system_state, "trial": self.trial,
            "last_rollout": self.last_rollout, "hostname": self.hostname, "run_once": self.run_once,
        }


@dataclass(frozen=True)
class StageInfo:
    """`imagetool-node stage-info ID`: what a transfer of this image can skip."""

    present: bool
    sha256: str | None
    partial_bytes: int
    free_bytes: int
    incoming: str

    @classmethod
    def from_answer(cls, doc: dict[str, Any]) -> StageInfo:
        return cls(present=bool(doc.get("present")), sha256=doc.get("sha256"),
                   partial_bytes=int(doc.get("partial_bytes") or 0), free_bytes=int(doc.get("free_bytes") or 0),
                   incoming=str(doc.get("incoming") or NODE_INCOMING))


# --- command builders (pure; tested against exact lists) -------------------------------------


def _option_value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def helper_argv(command: str, /, *args: str, **options: Any) -> list[str]:
    """The argv of one helper command: positional arguments, then `--long-option value` pairs in
    the order given. None leaves an option out; True is a bare flag; False leaves it out.

    helper_argv("set-next", "web-1.0", confirm_timeout=30, rollout="r-1")
      == ["imagetool-node", "set-next", "web-1.0", "--confirm-timeout", "30", "--rollout", "r-1"]
    """
    argv = [HELPER, command, *args]
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        else:
            text = _option_value(value)
            # argparse would read a value that starts with '-' as the next option.
            argv.extend([f"{flag}={text}"] if text.startswith("-") else [flag, text])
    return argv


def incoming_paths(incoming: str, image_id: str) -> dict[str, str]:
    """Where the three files of a release go while they travel (the helper's .incoming)."""
    return image_paths(incoming, image_id)


def parse_answer(node: str, command: str, result: CommandResult) -> dict[str, Any]:
    """The helper's one JSON object from a command's output, or the error it stands for."""
    doc: Any = None
    for line in reversed(result.stdout.strip().splitlines()):
        try:
            doc = json.loads(line)
            break
        except ValueError:
            continue
    if not isinstance(doc, dict):
        if result.exit_status == 127:
            raise NodeError(f"node {node}: {HELPER} is not installed (was the image built with the "
                            f"imagetool-node element?)")
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-10:])
        raise NodeError(f"node {node}: {HELPER} {command} gave no answer (exit status {result.exit_status})"
                        + (f":\n{tail}" if tail else ""))
    if not doc.get("ok"):
        raise HelperError(node, command, str(doc.get("error") or f"failed with exit status {result.exit_status}"))
    return doc


# --- the interface ----------------------------------------------------------------------------

@runtime_checkable
class Node(Protocol):
    """What the rollout needs from a node; all waits are bounded by the timeouts given."""

    spec: NodeSpec

    @property
    def name(self) -> str: ...

    @property
    def can_reset(self) -> bool: ...

    def status(self) -> NodeStatus: ...

    def stage_info(self, image_id: str) -> StageInfo: ...

    def put(self, local: Path, remote: str, offset: int = 0, progress: ProgressFn | None = None) -> int: ...

    def stage_commit(self, image_id: str) -> dict[str, Any]: ...

    def stage_abort(self, image_id: str) -> dict[str, Any]: ...

    def set_next(self, image_id: str, confirm_timeout: float, rollout_id: str | None) -> None: ...

    def clear_next(self) -> None: ...

    def reboot(self) -> str: ...

    def wait_for_boot(self, old_boot_id: str | None, timeout: float,
                      cancel: threading.Event | None = None) -> NodeStatus: ...

    def health(self, wait: float = 0) -> dict[str, Any]: ...

    def run_shell(self, command: str, timeout: float) -> CommandResult: ...

    def confirm(self, image_id: str) -> None: ...

    def commit(self, image_id: str, rollout_id: str | None) -> None: ...

    def lock(self, claim: LockClaim, *, take_over: dict[str, Any] | None = None) -> dict[str, Any]: ...

    def unlock(self, claim: LockClaim) -> None: ...

    def gc(self, keep: int = 0, incoming: bool = False) -> dict[str, Any]: ...

    def ran_once(self, image_id: str, rollout_id: str) -> None: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


def _retry_boot_wait(exc: BaseException) -> bool:
    # A changed host key after a reboot is an answer, not a node still booting.
    if isinstance(exc, HostKeyError):
        return False
    return isinstance(exc, (UnreachableError, NodeError, _SameBoot))


class _SameBoot(Exception):
    pass


class HelperNode:
    """A node driven through its helper, reached over a `Transport`."""

    def __init__(self, spec: NodeSpec, transport: Transport) -> None:
        self.spec = spec
        self.transport = transport
        # The helper's protocol, learned from its status answer (None: not asked yet): a node
        # still on an image from before this controller gets only what its helper understands.
        self._protocol: int | None = None

    def __repr__(self) -> str:
        return f"HelperNode({self.spec.name})"

    @property
    def protocol(self) -> int:
        """The helper's protocol; asks the node (`status`) when it has not answered one yet, so
        a command that depends on it never guesses from what happened to be called before."""
        if self._protocol is None:
            self.status()
        assert self._protocol is not None
        return self._protocol

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def can_reset(self) -> bool:
        return bool(self.spec.reset_command)

    def _call(self, command: str, /, *args: str, timeout: float = QUICK_TIMEOUT, **options: Any) -> dict[str, Any]:
        result = self.transport.run(helper_argv(command, *args, **options), timeout=timeout)
        return parse_answer(self.name, command, result)

    # --- what the node is ----------------------------------------------------------------

    def status(self, timeout: float = QUICK_TIMEOUT) -> NodeStatus:
        doc = self._call("status", timeout=timeout)
        self._protocol = int(doc.get("protocol") or 1)
        return NodeStatus.from_answer(self.name, doc)

    # --- staging -----------------------------------------------------------------------------

    def stage_info(self, image_id: str) -> StageInfo:
        return StageInfo.from_answer(self._call("stage-info", image_id))

    def put(self, local: Path, remote: str, offset: int = 0, progress: ProgressFn | None = None) -> int:
        return self.transport.put_file(Path(local), remote, offset=offset, progress=progress, timeout=TRANSFER_TIMEOUT)

    def stage_commit(self, image_id: str) -> dict[str, Any]:
        return self._call("stage-commit", image_id, timeout=STAGE_COMMIT_TIMEOUT)

    def stage_abort(self, image_id: str) -> dict[str, Any]:
        return self._call("stage-abort", image_id)

    # --- boot control --------------------------------------------------------------------

    def set_next(self, image_id: str, confirm_timeout: float, rollout_id: str | None) -> None:
        self._call("set-next", image_id, confirm_timeout=confirm_timeout, rollout=rollout_id)

    def clear_next(self) -> None:
        self._call("clear-next")

    def reboot(self) -> str:
        """Ask the node to reboot (a second later, so the answer gets out); returns the boot id
        it is leaving, which `wait_for_boot` waits to see replaced."""
        return str(self._call("reboot")["boot_id"])

    def wait_for_boot(self, old_boot_id: str | None, timeout: float,
                      cancel: threading.Event | None = None) -> NodeStatus:
        """Reconnect until the node answers `status` with a boot id other than `old_boot_id`."""
        stop = stop_after_delay(timeout)
        if cancel is not None:
            stop = stop | stop_when_event_set(cancel)

        deadline = time.monotonic() + timeout

        def attempt() -> NodeStatus:
            # Bound each attempt by what is left, so the whole wait ends near `timeout` rather
            # than a full connect-retry budget and command timeout later.
            remaining = max(1.0, deadline - time.monotonic())
            try:
                if not self.transport.connected:
                    self.transport.reconnect(min(remaining, self.transport.connect_timeout))
                st = self.status(timeout=min(remaining, QUICK_TIMEOUT))
            except BaseException:
                # The old connection dies with the old boot; the next attempt opens a fresh one.
                self.transport.close()
                raise
            if st.boot_id == old_boot_id:
                raise _SameBoot()
            return st

        try:
            return Retrying(stop=stop, wait=wait_fixed(BOOT_POLL_INTERVAL),
                            retry=retry_if_exception(_retry_boot_wait))(attempt)
        except RetryError as e:
            last = e.last_attempt.exception()
            why = "still on the old boot" if isinstance(last, _SameBoot) else str(last)
            raise BootTimeoutError(f"node {self.name}: not back with a new boot within {timeout:g}s ({why})") from None

    # --- activation --------------------------------------------------------------------------

    def health(self, wait: float = 0) -> dict[str, Any]:
        # The node's own checks have their own timeouts; allow for them on top of the wait.
        return self._call("health", wait=wait or None, timeout=QUICK_TIMEOUT + wait)

    def run_shell(self, command: str, timeout: float) -> CommandResult:
        return self.transport.run_shell(command, timeout=timeout)

    def confirm(self, image_id: str) -> None:
        self._call("confirm", image_id)

    def commit(self, image_id: str, rollout_id: str | None) -> None:
        self._call("commit", image_id, rollout=rollout_id)

    # --- housekeeping -------------------------------------------------------------------------

    def lock(self, claim: LockClaim, *, take_over: dict[str, Any] | None = None) -> dict[str, Any]:
        """Take the node's rollout lock for `claim`; `take_over` is the held lock (as `status`
        showed it) to replace, and only that one: if the node holds another by now, nothing
        changes and LockedError says who holds it."""
        options: dict[str, Any] = {"owner": claim.owner, "command": claim.command}
        held = take_over or {}
        if self.protocol >= 3:
            holder = claim.holder.to_dict() if claim.holder else None
            options.update(token=claim.token,
                           holder=json.dumps(holder, sort_keys=True, separators=(",", ":")) if holder else None,
                           take_over=held.get("rollout") if take_over else None,
                           take_over_token=held.get("token") if take_over else None)
        elif self.protocol == 2:  # compares the rollout id only, and keeps no token
            options.update(take_over=held.get("rollout") if take_over else None,
                           pid=claim.holder.pid if claim.holder else os.getpid())
        else:  # an older helper knows only age: break whatever lock it holds
            options.update(break_older_than=0 if take_over else None)
        try:
            return self._call("lock", claim.rollout, **options)
        except HelperError as e:
            if e.error.startswith("locked"):
                raise LockedError(f"node {self.name}: {e.error}") from None
            raise

    def unlock(self, claim: LockClaim) -> None:
        """Release the lock if it is still `claim`'s own acquisition; one taken over since stays."""
        self._call("unlock", claim.rollout, token=claim.token if self.protocol >= 3 else None)

    def gc(self, keep: int = 0, incoming: bool = False) -> dict[str, Any]:
        return self._call("gc", keep=keep, incoming=incoming)

    def ran_once(self, image_id: str, rollout_id: str) -> None:
        self._call("ran-once", image_id, rollout=rollout_id)

    def reset(self) -> None:
        """Out-of-band reset from the controller (the inventory's reset_command)."""
        argv = self.spec.reset_argv()
        if not argv:
            raise NodeError(f"node {self.name}: no reset_command in the inventory")
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=RESET_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NodeError(f"node {self.name}: reset command {shlex.join(argv)} failed: {e}") from None
        if r.returncode != 0:
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-10:])
            raise NodeError(f"node {self.name}: reset command {shlex.join(argv)} exited {r.returncode}"
                            + (f":\n{tail}" if tail else ""))

    def close(self) -> None:
        self.transport.close()


def under_lock(node: Node, lock_id: str, owner: str, command: str, fn: Callable[[Node], T]) -> T:
    """fn(node) while holding the node's rollout lock: work outside a rollout (stage, gc) must
    not race one. A held lock raises LockedError naming its holder; the lock is released after."""
    # The claim names this process, so a later run here can see it gone and take the lock over.
    claim = LockClaim(lock_id, owner, command)
    node.lock(claim)
    try:
        result = fn(node)
    except BaseException:
        try:
            node.unlock(claim)
        except ImagetoolError:
            pass  # the original failure is the news
        raise
    node.unlock(claim)
    return result


def ssh_nodes(specs: Iterable[NodeSpec], *, accept_new_host_keys: bool = False) -> list[HelperNode]:
    """The inventory's nodes, reached over SSH."""
    return [HelperNode(s, SSHTransport(s, accept_new_host_keys=accept_new_host_keys)) for s in specs]


# --- many nodes at once -------------------------------------------------------------------------


class GroupResult(dict[str, Any]):
    """Node name -> what `fn` returned, or the exception it raised (fabric's GroupResult)."""

    @property
    def succeeded(self) -> dict[str, Any]:
        return {k: v for k, v in self.items() if not isinstance(v, BaseException)}

    @property
    def failed(self) -> dict[str, BaseException]:
        return {k: v for k, v in self.items() if isinstance(v, BaseException)}


def for_each(nodes: Sequence[N], fn: Callable[[N], T], parallel: int = 8, *,
             on_interrupt: Callable[[], None] | None = None) -> GroupResult:
    """Run fn on every node in threads; an exception is that node's result, Ctrl-C is not: it
    calls `on_interrupt` (to tell the workers to stop), waits for them, and goes on up."""
    out = GroupResult()
    if not nodes:
        return out
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(nodes)))) as pool:
        futures = {node.name: pool.submit(fn, node) for node in nodes}
        for name, fut in futures.items():
            try:
                out[name] = fut.result()
            except Exception as e:  # noqa: BLE001 - a node's failure is data here
                out[name] = e
            except BaseException:
                if on_interrupt is not None:
                    on_interrupt()
                raise
    return GroupResult({n.name: out[n.name] for n in nodes})


__all__ = [
    "BootTimeoutError", "GroupResult", "HelperError", "HelperNode", "Node", "NodeImage", "NodeStatus",
    "StageInfo", "for_each", "helper_argv", "incoming_paths", "parse_answer", "ssh_nodes",
]
