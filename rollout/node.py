"""The one interface the rollout talks to nodes through, and the node helper's client.

Shaped like colmena's `Host`: status, copy an image in, activate it with a reboot, wait for the
boot, check, commit. `HelperNode` drives the node helper (`imagetool-node`) over any
`Transport`: SSH in production (`ssh_nodes`), a directory on this machine running the very same
helper in unit tests and benches (`rollout.local.local_nodes`). Every helper command answers one
JSON object; `{"ok": false, "error": E}` becomes a `HelperError` naming node and E.
"""

from __future__ import annotations

import json
import logging
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
from tenacity.stop import stop_base

from imagetool import schema
from imagetool.errors import (
    HelperMissingError,
    HostKeyError,
    ImagetoolError,
    LockedError,
    NodeError,
    UnreachableError,
    VerificationError,
)
from imagetool.layout import NODE_INCOMING, image_paths
from imagetool.names import RELEASE_ID_RE
from imagetool.schema import Where
from imagetool.units import human_bytes
from rollout.locks import LockClaim
from rollout.nodespec import NodeSpec
from rollout.transport import CommandResult, ProgressFn, SSHTransport, Transport

HELPER = "imagetool-node"
# The helper protocol that can `receive` a transfer (what `become` stages through).
RECEIVE_PROTOCOL = 4
# Where images built with the imagetool-node element install it (a link to /usr/lib/imagetool/).
HELPER_PATH = "/usr/sbin/imagetool-node"
# The exit status of a command the node's shell cannot find.
COMMAND_NOT_FOUND = 127
# Seconds a helper command may take. Most answer at once; stage-commit hashes the whole image
# (a few seconds per GiB) and health runs the image's own checks.
QUICK_TIMEOUT = 60
STAGE_COMMIT_TIMEOUT = 900
TRANSFER_TIMEOUT = 3600
RESET_TIMEOUT = 120
BOOT_POLL_INTERVAL = 1.0

T = TypeVar("T")
N = TypeVar("N", bound="Node")

# Each helper command and transfer with its time, at debug level (`imagetool -v` shows them).
log = logging.getLogger(__name__)


class HelperError(NodeError):
    """The node helper refused or failed a command; `error` is the node's own words."""

    def __init__(self, node: str, command: str, error: str) -> None:
        super().__init__(f"node {node}: imagetool-node {command}: {error}", nodes=(node,))
        self.node = node
        self.command = command
        self.error = error


class NodeVerificationError(HelperError, VerificationError):
    """The node found an image, manifest or signature that does not check out (sha256 mismatch,
    bad or missing signature where it trusts keys): a verification failure, whichever side
    noticed it. Exit code 5 where it ends the command (`stage`); in a rollout or rollback it is
    that node's failure like any other (rollout.update, rollout.activation), and the run exits 3."""

    exit_code = VerificationError.exit_code


class CorruptNodeError(HelperError):
    """A file the node helper keeps (state, trial, boot control, release) is damaged: the node
    answered, so it is reachable, and what it needs is repair, not a retry."""


# The `kind` of a helper's refusal -> the error it stands for here.
HELPER_ERRORS: dict[str, type[HelperError]] = {"verification": NodeVerificationError, "corrupt": CorruptNodeError}


class BootTimeoutError(NodeError):
    """A node did not come back with a new boot within the time allowed."""


# --- the helper's answers as data -------------------------------------------------------------


@dataclass(frozen=True)
class NodeImage:
    """An image installed (staged) on a node."""

    id: str
    size: int
    sha256: str | None
    # Helpers of protocol 3 on: the manifest's signature verifies with a key the node trusts now
    # (`signed_by` names it). Older helpers said True for "a .sig file exists": see from_answer.
    signed: bool = False
    mtime: int = 0
    signed_by: str | None = None
    # "verified", "unsigned", "invalid", "unchecked" (the node trusts no key); None: not told.
    signature: str | None = None


@dataclass(frozen=True)
class TrustedKey:
    """A release signing key a node trusts: from its image (/etc) or its /var."""

    name: str
    where: str
    sha256: str
    pem: str | None = None  # stage-info hands out the public key itself

    @classmethod
    def from_answer(cls, doc: Any) -> TrustedKey | None:
        if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in ("name", "where", "sha256")):
            return None
        pem = doc.get("pem")
        return cls(name=doc["name"], where=doc["where"], sha256=doc["sha256"],
                   pem=pem if isinstance(pem, str) else None)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "where": self.where, "sha256": self.sha256}


def _trusted_keys(value: Any) -> tuple[TrustedKey, ...] | None:
    """A helper's trusted key list; None when the helper does not tell (protocol < 3)."""
    if not isinstance(value, list):
        return None
    return tuple(k for k in (TrustedKey.from_answer(d) for d in value) if k is not None)


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
    # The release signing keys the node trusts; None: its helper does not say (protocol < 3).
    trusted_keys: tuple[TrustedKey, ...] | None = None

    @classmethod
    def from_answer(cls, name: str, doc: dict[str, Any]) -> NodeStatus:
        """The status answer, checked: its ids, numbers and records come from files on the node,
        and a damaged one is reported as a NodeError naming the node and the field, never a crash
        (nor a `nan` free space or clock that would make every comparison false)."""
        w = Where(f"node {name}: imagetool-node status", style="path", error=NodeError)
        # Before protocol 3 `signed` meant only that a .sig file existed; it is not shown as verified.
        verifies = int(doc.get("protocol") or 1) >= 3
        images = []
        for i, item in enumerate(_opt(doc, w, "images", schema.sequence) or []):
            wi = w / "images" / i
            schema.mapping(item, wi, optional=False)
            images.append(NodeImage(
                id=_release_id(item.get("id"), wi / "id"),
                size=_count(item.get("size") or 0, wi / "size"),
                sha256=_opt(item, wi, "sha256", _text),
                signed=verifies and item.get("signed") is True,
                mtime=int(_seconds(item.get("mtime") or 0, wi / "mtime")),
                signed_by=_opt(item, wi, "signed_by", _text) if verifies else None,
                signature=_opt(item, wi, "signature", _text) if verifies else None))
        t = _opt(doc, w, "time", _seconds)
        return cls(
            name=name,
            booted=_opt(doc, w, "booted", _release_id),
            default=_opt(doc, w, "default", _release_id),
            next=_opt(doc, w, "next", _release_id),
            committed=_opt(doc, w, "committed", _release_id),
            previous=_opt(doc, w, "previous", _release_id),
            boot_id=_opt(doc, w, "boot_id", _text) or "",
            images=tuple(images),
            free_bytes=_count(doc.get("free_bytes") or 0, w / "free_bytes"),
            lock=_lock_answer(doc.get("lock")),
            system_state=_opt(doc, w, "system_state", _text) or "unknown",
            trial=_opt(doc, w, "trial", schema.mapping),
            last_rollout=_opt(doc, w, "last_rollout", _text),
            hostname=_opt(doc, w, "hostname", _text),
            time=None if t is None else float(t),
            run_once=_opt(doc, w, "run_once", schema.mapping),
            trusted_keys=_trusted_keys(doc.get("trusted_keys")),
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
            "trusted_keys": None if self.trusted_keys is None else [k.to_dict() for k in self.trusted_keys],
        }


@dataclass(frozen=True)
class StageInfo:
    """`imagetool-node stage-info ID`: what a transfer of this image can skip."""

    present: bool
    sha256: str | None
    partial_bytes: int
    free_bytes: int
    incoming: str
    # The keys the node trusts, with their public PEM; None: its helper does not say (protocol < 3).
    trusted_keys: tuple[TrustedKey, ...] | None = None
    # Delta staging: can the node run casync, the images it holds {id: sha256}, and the sizes of
    # delta packs that arrived in part {file name: bytes}. A helper that does not say: no delta.
    casync: bool = False
    seeds: tuple[tuple[str, str], ...] = ()
    delta_partials: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_answer(cls, doc: dict[str, Any], name: str = "?") -> StageInfo:
        w = Where(f"node {name}: imagetool-node stage-info", style="path", error=NodeError)
        delta: dict[str, Any] = doc["delta"] if isinstance(doc.get("delta"), dict) else {}
        seeds: list[Any] = delta["seeds"] if isinstance(delta.get("seeds"), list) else []
        partials: dict[str, Any] = delta["partials"] if isinstance(delta.get("partials"), dict) else {}
        return cls(present=bool(doc.get("present")), sha256=_opt(doc, w, "sha256", _text),
                   partial_bytes=_count(doc.get("partial_bytes") or 0, w / "partial_bytes"),
                   free_bytes=_count(doc.get("free_bytes") or 0, w / "free_bytes"),
                   incoming=_opt(doc, w, "incoming", _text) or NODE_INCOMING,
                   trusted_keys=_trusted_keys(doc.get("trusted_keys")),
                   casync=delta.get("casync") is True,
                   seeds=tuple((_release_id(s.get("id"), w / "delta" / "seeds"), _text(s.get("sha256"), w / "delta"))
                               for s in seeds if isinstance(s, dict)),
                   delta_partials=tuple((_text(k, w / "delta"), _count(v, w / "delta" / "partials"))
                                        for k, v in partials.items()))


def _opt(doc: dict[str, Any], w: Where, key: str, check: Callable[[Any, Where], T]) -> T | None:
    """doc[key] checked by `check`, or None when absent or null."""
    value = doc.get(key)
    return None if value is None else check(value, w / key)


def _release_id(value: Any, w: Where) -> str:
    return schema.string(value, w, RELEASE_ID_RE, "release id")


def _text(value: Any, w: Where) -> str:
    text = schema.string(value, w)
    if len(text) > 1000:
        raise w.error(f"{len(text)} characters long; expected a short text")
    return text


def _count(value: Any, w: Where) -> int:
    return schema.integer(value, w, minimum=0, what="a byte count")


def _seconds(value: Any, w: Where) -> float:
    # A clock or an mtime: finite and not before 1970.
    return schema.number(value, w, minimum=0)


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


def become_argv(spec: NodeSpec, argv: list[str]) -> list[str]:
    """argv as the node's login user runs it: as is, or through `sudo -n` (never a password
    prompt: there is no one to answer it) when the inventory says `become`.

    become_argv(NodeSpec("n", "h", user="deploy", become=True), ["imagetool-node", "status"])
      == ["sudo", "-n", "-u", "root", "--", "imagetool-node", "status"]
    """
    if not spec.become:
        return list(argv)
    return ["sudo", "-n", "-u", spec.become_user, "--", *argv]


def _check_sudo(spec: NodeSpec, stderr: str) -> None:
    """sudo -n refuses rather than prompt: say what the node's sudoers needs. A user sudo lets
    run anything hears when there is no helper to run (exit status 1, not the shell's 127)."""
    if "a password is required" in stderr:
        raise NodeError(
            f"node {spec.name}: sudo asks {spec.user!r} for a password to run {HELPER} as {spec.become_user!r} "
            f"(become); allow it without one in the node's sudoers, e.g. "
            f"`{spec.user} ALL=({spec.become_user}) NOPASSWD: {HELPER_PATH}` (sudo says the same when a rule "
            "names a helper the node lacks)", nodes=(spec.name,)
        )
    if f"sudo: {HELPER}: command not found" in stderr:
        raise _helper_missing(spec.name, f"sudo: `{HELPER}`: command not found")


def _helper_missing(node: str, why: str) -> HelperMissingError:
    # SSH worked and the shell answered: the node is reachable, it just is not an imagetool
    # node (or its image lacks the imagetool-node element).
    return HelperMissingError(
        f"node {node}: node helper missing at {HELPER_PATH} ({why}); install the node from an imagetool image "
        "(`imagetool disk`, or an image built with the imagetool-node element)", nodes=(node,))


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
        if result.exit_status == COMMAND_NOT_FOUND:
            raise _helper_missing(node, f"`{HELPER}`: command not found, exit status {COMMAND_NOT_FOUND}")
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-10:])
        raise NodeError(f"node {node}: {HELPER} {command} gave no answer (exit status {result.exit_status})"
                        + (f":\n{tail}" if tail else ""), nodes=(node,))
    if not doc.get("ok"):
        error_class = HELPER_ERRORS.get(str(doc.get("kind")), HelperError)
        raise error_class(node, command, str(doc.get("error") or f"failed with exit status {result.exit_status}"))
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

    def stage_delta(self, image_id: str, seeds: Sequence[str], *, pack: str | None = None, source: str | None = None,
                    timeout: float | None = None) -> dict[str, Any]: ...

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
        return self._run(command, helper_argv(command, *args, **options), timeout)

    def _run(self, command: str, helper: list[str], timeout: float) -> dict[str, Any]:
        """Run one helper argv (through sudo for `become`) and parse its answer."""
        argv = become_argv(self.spec, helper)
        started = time.monotonic()
        result = self.transport.run(argv, timeout=timeout)
        log.debug("node %s: %s: exit status %d in %.2fs", self.name, shlex.join(argv), result.exit_status,
                  time.monotonic() - started)
        if self.spec.become:
            _check_sudo(self.spec, result.stderr)
        return parse_answer(self.name, command, result)

    # --- what the node is ----------------------------------------------------------------

    def status(self, timeout: float = QUICK_TIMEOUT) -> NodeStatus:
        doc = self._call("status", timeout=timeout)
        self._protocol = schema.integer(doc.get("protocol") or 1, Where(f"node {self.name}: imagetool-node status",
                                                                        ("protocol",), style="path", error=NodeError))
        return NodeStatus.from_answer(self.name, doc)

    # --- staging -----------------------------------------------------------------------------

    def stage_info(self, image_id: str) -> StageInfo:
        return StageInfo.from_answer(self._call("stage-info", image_id), self.name)

    def put(self, local: Path, remote: str, offset: int = 0, progress: ProgressFn | None = None) -> int:
        receiver = None
        if self.spec.become:
            # The login user cannot write /var/lib/imagetool: the helper receives the bytes as root.
            if self.protocol < RECEIVE_PROTOCOL:
                raise NodeError(f"node {self.name}: its {HELPER} (protocol {self.protocol}) cannot receive a "
                                f"transfer for `become` (needs protocol {RECEIVE_PROTOCOL}): stage as root, or "
                                "update its image", nodes=(self.name,))
            # Its answer goes to stderr, which is what a failed transfer reports.
            receive = helper_argv("receive", remote, offset=offset or None)
            receiver = shlex.join(become_argv(self.spec, receive)) + " >&2"
        started = time.monotonic()
        try:
            sent = self.transport.put_file(Path(local), remote, offset=offset, progress=progress,
                                           timeout=TRANSFER_TIMEOUT, receiver=receiver)
        except NodeError as e:
            if self.spec.become:
                _check_sudo(self.spec, str(e))
            raise
        log.debug("node %s: sent %s to %s (from byte %d%s): %s in %.2fs", self.name, local, remote, offset,
                  f", through {HELPER} receive" if receiver else "", human_bytes(sent), time.monotonic() - started)
        return sent

    def stage_commit(self, image_id: str) -> dict[str, Any]:
        return self._call("stage-commit", image_id, timeout=STAGE_COMMIT_TIMEOUT)

    def stage_abort(self, image_id: str) -> dict[str, Any]:
        return self._call("stage-abort", image_id)

    def stage_delta(self, image_id: str, seeds: Sequence[str], *, pack: str | None = None, source: str | None = None,
                    timeout: float | None = None) -> dict[str, Any]:
        """Rebuild the image in .incoming from `seeds` plus a pushed `pack` or an HTTP `source`."""
        argv = helper_argv("stage-delta", image_id, pack=pack, source=source, timeout=timeout)
        for seed in seeds:
            argv += ["--seed", seed]
        wait = STAGE_COMMIT_TIMEOUT if timeout is None else timeout + QUICK_TIMEOUT
        return self._run("stage-delta", argv, wait)

    # --- boot control --------------------------------------------------------------------

    def set_next(self, image_id: str, confirm_timeout: float, rollout_id: str | None) -> None:
        self._call("set-next", image_id, confirm_timeout=confirm_timeout, rollout=rollout_id)

    def clear_next(self) -> None:
        self._call("clear-next")

    def reboot(self) -> str:
        """Ask the node to reboot (a second later, so the answer gets out); returns the boot id
        it is leaving, which `wait_for_boot` waits to see replaced."""
        doc = self._call("reboot")
        return _text(doc.get("boot_id"), Where(f"node {self.name}: imagetool-node reboot", ("boot_id",),
                                               style="path", error=NodeError))

    def wait_for_boot(self, old_boot_id: str | None, timeout: float,
                      cancel: threading.Event | None = None) -> NodeStatus:
        """Reconnect until the node answers `status` with a boot id other than `old_boot_id`."""
        stop: stop_base = stop_after_delay(timeout)
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
                raise _SameBoot
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
        started = time.monotonic()
        result = self.transport.run_shell(command, timeout=timeout)
        log.debug("node %s: sh -c %s: exit status %d in %.2fs", self.name, shlex.quote(command), result.exit_status,
                  time.monotonic() - started)
        return result

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
    "BootTimeoutError", "CorruptNodeError", "GroupResult", "HelperError", "NodeVerificationError", "HelperNode", "Node",
    "NodeImage", "NodeStatus",
    "StageInfo", "become_argv", "for_each", "helper_argv", "incoming_paths", "parse_answer", "ssh_nodes",
]
