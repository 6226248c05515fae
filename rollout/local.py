"""Nodes on this machine: the real node helper against a directory, power and firmware played here.

A `LocalMachine` is one node as a directory. Its root is what the helper sees as `/`
(`IMAGETOOL_NODE_ROOT`); the node's rules (boot control, trial boots, confirm, commit, locks, gc,
verification) are the helper's own, run as a subprocess of the very file images ship. Only what
surrounds the helper is played here, the way the lab firmware and systemd play it on a lab node:

- power and firmware: booting chooses the image from boot control exactly as the lab firmware
  does (imagetool.layout: consume the one-shot `next`, else the default), makes a new boot id,
  puts the booted image's release.json in place and starts `imagetool-node boot` in the
  background (imagetool-node-boot.service: the dead-man switch);
- systemd: `systemctl`, `systemd-run` and `journalctl` on the node's PATH are small shims that
  answer from files this machine writes at each boot and record what would change the machine
  (a reboot, a timer) for it to carry out;
- the disk: the helper's free space is the machine's /var size less what /var holds.

The machine carries out what was asked (timers, reboots, a reset) whenever anyone looks at it,
so it needs no thread of its own; a node nobody talks to does not need to have rebooted yet.

Faults are knobs at this edge only (power, network, boot hangs, system state, a crashing command,
a filling disk): they emulate the machine and the network, never the helper's rules.

`LocalTransport` is the `Transport` to such a machine; `local_nodes` gives `HelperNode`s over
them, the same client production drives over SSH.

    <dir>/root/            the node's / as its helper sees it (/var/lib/imagetool, /etc/imagetool)
    <dir>/boot_id          /proc/sys/kernel/random/boot_id
    <dir>/bin/             imagetool-node (the real helper, with this machine's root and disk),
                           systemctl, systemd-run, journalctl
    <dir>/image-bin/       programs of the booted image (knob), on PATH after bin/
    <dir>/run/             volatile, emptied at each boot: system state, failed units, timers,
                           power requests
    <dir>/power/reset      touched by the reset command: an out-of-band reset
    <dir>/disk.json        the /var disk: {"size": bytes, "others": bytes other programs use}
    <dir>/console.log      the machine's boots and the dead-man switch's output
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from imagetool.errors import InputError, NodeError, UnreachableError
from imagetool.layout import NODE_VAR, RELEASE_JSON, NodeVar
from rollout.node import HelperNode
from rollout.nodespec import NodeSpec
from rollout.transport import CommandResult, CommandTimeoutError, ProgressFn, upload_command

HELPER_FILE = Path(__file__).resolve().parent.parent / "elements/imagetool-node/static/usr/lib/imagetool/imagetool-node"
DEFAULT_VAR_SIZE = 10**12
READ_BLOCK = 4 * 1024 * 1024
# How long a boot may take to reach the point where the dead-man switch has looked at it.
BOOT_SETTLE_TIMEOUT = 30.0

# The helper, run against this machine. Its free space is the machine's /var disk: the same sum
# as LocalMachine.free_bytes (this file runs in the helper's process, so it has its own copy).
_LAUNCHER = '''#!{python} -IS
# imagetool-node on a local machine: the real helper against this machine's root and /var disk.
# Written by rollout.local.
import json, os, sys
MACHINE = {machine!r}
HELPER = {helper!r}
VAR = os.path.join(MACHINE, "root", "var")
os.environ["IMAGETOOL_NODE_ROOT"] = os.path.join(MACHINE, "root")
os.environ["IMAGETOOL_NODE_BOOT_ID_FILE"] = os.path.join(MACHINE, "boot_id")
_statvfs = os.statvfs


def statvfs(path):
    if not os.path.abspath(path).startswith(VAR):
        return _statvfs(path)
    with open(os.path.join(MACHINE, "disk.json")) as f:
        disk = json.load(f)
    used = 0
    for d, _, files in os.walk(VAR):
        for name in files:
            try:
                used += os.lstat(os.path.join(d, name)).st_size
            except OSError:
                pass
    free = max(0, disk["size"] - used - disk["others"])
    return os.statvfs_result((4096, 1, disk["size"], free, free, 0, 0, 0, 0, 255))


os.statvfs = statvfs
# Bytecode of the helper kept here, not beside the helper (its directory ships in images).
sys.pycache_prefix = os.path.join(MACHINE, ".pycache")
sys.argv[0] = HELPER
import importlib.machinery, importlib.util
loader = importlib.machinery.SourceFileLoader("__main__", HELPER)
spec = importlib.util.spec_from_loader("__main__", loader)
module = importlib.util.module_from_spec(spec)
sys.modules["__main__"] = module
loader.exec_module(module)
'''

_SYSTEMCTL = '''#!/bin/sh
# systemctl on a local machine (rollout.local): answers from files the machine wrote at boot and
# records a reboot for the machine to carry out.
run={run}
case "$1" in
is-system-running)
    state=$(cat "$run/system-state" 2>/dev/null || echo offline)
    echo "$state"
    [ "$state" = running ] ;;
is-active)
    if grep -qxF "$2" "$run/failed-units" 2>/dev/null; then echo failed; exit 3; fi
    echo active ;;
--failed)
    if [ -f "$run/failed-units" ]; then
        while read -r unit; do echo "$unit loaded failed failed $unit"; done < "$run/failed-units"
    fi ;;
reboot|poweroff|halt)
    echo "$*" >> "$run/power-request" ;;
esac
exit 0
'''

_SYSTEMD_RUN = '''#!/bin/sh
# systemd-run on a local machine (rollout.local): a transient timer, one argument a line, that the
# machine runs when it is due.
mkdir -p {run}/timers
f={run}/timers/$(date +%s%N).$$
printf '%s\\n' "$@" > "$f.tmp" && mv "$f.tmp" "$f"
'''

_JOURNALCTL = '''#!/bin/sh
# journalctl on a local machine (rollout.local): it keeps no journal.
exit 0
'''


@dataclass(frozen=True)
class Action:
    """One thing done to or by a local machine, in the order it happened (across machines when
    they share a log): a helper command, "put", "run-shell", "boot" or "reset"."""

    node: str
    action: str
    arg: str = ""
    # The image the machine was running at the time.
    booted: str | None = None


_MACHINES: weakref.WeakSet[LocalMachine] = weakref.WeakSet()


@atexit.register
def _power_off_all() -> None:
    # A dead-man switch must not outlive the test or bench that started its machine.
    for m in list(_MACHINES):
        m.power_off()


class LocalMachine:
    """One node as a directory on this machine, with its power, firmware and systemd played here."""

    def __init__(self, directory: Path, name: str | None = None, *, log: list[Action] | None = None,
                 helper: Path = HELPER_FILE, var_size: int = DEFAULT_VAR_SIZE,
                 timer_delay: float | None = None) -> None:
        self.dir = Path(directory).resolve()
        self.name = name or self.dir.name
        self.log: list[Action] = log if log is not None else []
        self.helper = Path(helper)
        # Seconds before a timer (systemd-run --on-active=N, e.g. the helper's delayed reboot)
        # is due; None: N, as asked.
        self.timer_delay = timer_delay
        self.lock = threading.RLock()

        # --- knobs: the machine and its network, never the helper's rules -----------------
        # `systemctl is-system-running` per booted image (default "running"), and failed units.
        self.system_state: dict[str, str] = {}
        self.failed_units: dict[str, list[str]] = {}
        # Images whose boot never reaches sshd: unreachable, yet their dead-man switch runs.
        self.hangs_on: set[str] = set()
        # Programs the booted image has (image id, or None for every image) -> name -> sh script.
        self.programs: dict[str | None, dict[str, str]] = {}
        # Before a helper command ("status", "reboot", ...), "put" or "run-shell" reaches the
        # node: an exception is raised (a connection cut, an operator's Ctrl-C); a string is
        # what a command that crashes prints on stderr (exit status 1, no answer).
        self.faults: dict[str, BaseException | str] = {}
        # The network to the node is cut (the node itself runs on).
        self.network_cut = False
        # Another program fills /var once this many more bytes were written by a transfer.
        self.disk_fills_after: int | None = None

        # --- what the machine is doing -------------------------------------------------------
        self.powered = False
        self.booted: str | None = None
        self.boot_id: str | None = None
        self.boots = 0
        self._hung = False
        self._deadman: subprocess.Popen[bytes] | None = None

        self.root = self.dir / "root"
        self.node_var = NodeVar(self.root / NODE_VAR.lstrip("/"))
        self.bin = self.dir / "bin"
        self.image_bin = self.dir / "image-bin"
        self.run_dir = self.dir / "run"
        self.power_dir = self.dir / "power"
        for d in (self.root / "etc/imagetool", self.root / "usr/lib/imagetool/health.d", self.bin, self.image_bin,
                  self.run_dir, self.power_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.node_var.make_dirs()
        self._disk = {"size": var_size, "others": 0}
        self._write_disk()
        self._write_programs()
        _MACHINES.add(self)

    def __repr__(self) -> str:
        return f"LocalMachine({self.name}, {str(self.dir)!r})"

    # --- setting it up ---------------------------------------------------------------------

    def _write_programs(self) -> None:
        run = shlex.quote(str(self.run_dir))
        files = {
            "imagetool-node": _LAUNCHER.format(python=sys.executable, machine=str(self.dir), helper=str(self.helper)),
            "systemctl": _SYSTEMCTL.format(run=run),
            "systemd-run": _SYSTEMD_RUN.format(run=run),
            "journalctl": _JOURNALCTL,
        }
        if not self.helper.is_file():
            # A machine whose image lacks the node helper: nothing on its PATH answers to it.
            del files["imagetool-node"]
        for name, text in files.items():
            path = self.bin / name
            path.write_text(text)
            path.chmod(0o755)

    def install(self, image_id: str, squashfs: Path, manifest: Path, sig: Path | None = None, *,
                commit: bool = False) -> None:
        """Put an image on the node's /var, as the installer (or an earlier staging) did; with
        `commit`, it is the committed default, as on a freshly installed node."""
        self.node_var.install_image(image_id, squashfs, manifest, sig)
        if commit:
            self.node_var.write_lab_control(default=image_id)
            self.node_var.write_state(committed=image_id)

    def install_release(self, release: object, *, commit: bool = False) -> None:
        """install() from a StoredRelease."""
        self.install(release.id, release.squashfs_path, release.manifest_path,  # type: ignore[attr-defined]
                     release.sig_path, commit=commit)  # type: ignore[attr-defined]

    def env(self) -> dict[str, str]:
        """The environment of commands on the node: its own programs first on PATH."""
        return {**os.environ, "PATH": f"{self.bin}:{self.image_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                "IMAGETOOL_NODE_ROOT": str(self.root), "IMAGETOOL_NODE_BOOT_ID_FILE": str(self.dir / "boot_id")}

    @property
    def reset_command(self) -> str:
        """An out-of-band reset, as an inventory's reset_command (the machine carries it out)."""
        return shlex.join(["touch", str(self.power_dir / "reset")])

    def spec(self, *, reset: bool = True) -> NodeSpec:
        return NodeSpec(name=self.name, host="127.0.0.1", reset_command=self.reset_command if reset else None)

    def node_path(self, path: str) -> Path | None:
        """Where a path on the node is here. The helper runs with IMAGETOOL_NODE_ROOT, so the
        paths it answers with (stage-info's incoming) are already below the root; other absolute
        paths are taken from the node's /. None: not a path on the node."""
        if not path.startswith("/"):
            return None
        p = Path(path).resolve()
        if self.root in p.parents:
            return p
        p = (self.root / path.lstrip("/")).resolve()
        return p if self.root in p.parents else None

    # --- the disk ----------------------------------------------------------------------------

    @property
    def var_size(self) -> int:
        return int(self._disk["size"])

    @var_size.setter
    def var_size(self, size: int) -> None:
        self._disk["size"] = size
        self._write_disk()

    def set_free_bytes(self, free: int) -> None:
        """Make /var have exactly `free` bytes left, as if other programs had filled the rest."""
        self._disk["others"] = max(0, self.var_size - self._var_used() - free)
        self._write_disk()

    def _write_disk(self) -> None:
        (self.dir / "disk.json").write_text(json.dumps(self._disk) + "\n")

    def _var_used(self) -> int:
        used = 0
        for d, _, files in os.walk(self.node_var.var):
            for name in files:
                try:
                    used += os.lstat(os.path.join(d, name)).st_size
                except OSError:
                    pass
        return used

    def free_bytes(self) -> int:
        return max(0, self.var_size - self._var_used() - int(self._disk["others"]))

    # --- power and firmware ------------------------------------------------------------------

    def power_on(self) -> None:
        with self.lock:
            if not self.powered:
                self.powered = True
                self._boot()

    def power_off(self) -> None:
        """Pull the plug: everything running on the node stops; /var keeps what was written."""
        with self.lock:
            self._stop()
            self.powered = False
            self.booted = None

    def reset(self) -> None:
        """A hard reset now (what the reset command asks for, carried out at once)."""
        with self.lock:
            self.record("reset")
            self.powered = True
            self._boot()

    @property
    def reachable(self) -> bool:
        return self.powered and not self._hung and not self.network_cut and self.booted is not None

    def advance(self) -> None:
        """Carry out what the node and its operator asked for by now: an out-of-band reset, the
        timers that are due, a reboot or power-off."""
        with self.lock:
            reset = self.power_dir / "reset"
            if reset.exists():
                reset.unlink()
                self.reset()
            if not self.powered:
                return
            self._run_due_timers()
            request = self.run_dir / "power-request"
            if request.exists():
                verb = request.read_text().split()[0] if request.read_text().split() else "reboot"
                request.unlink()
                if verb in ("poweroff", "halt"):
                    self._console(f"{verb}")
                    self.power_off()
                else:
                    self._boot()

    def _run_due_timers(self) -> None:
        timers = self.run_dir / "timers"
        if not timers.is_dir():
            return
        for path in sorted(timers.iterdir()):
            if path.name.endswith(".tmp"):
                continue
            delay, command = _parse_systemd_run(path.read_text().splitlines())
            if self.timer_delay is not None:
                delay = self.timer_delay
            if time.time() < path.stat().st_mtime + delay:
                continue
            path.unlink()
            if command:
                r = subprocess.run(command, env=self.env(), cwd=self.root, capture_output=True, text=True, timeout=60)
                self._console(f"timer {shlex.join(command)}: exit status {r.returncode} {r.stderr.strip()}")

    def _boot(self) -> None:
        """What the firmware and systemd do at a (re)boot."""
        self._stop()
        image = self.node_var.choose_boot(self._console)
        self.boots += 1
        self.boot_id = str(uuid.uuid4())
        (self.dir / "boot_id").write_text(self.boot_id + "\n")
        self.booted = image
        self._hung = False
        self.record("boot", image or "")
        release = self.root / RELEASE_JSON
        if image is None:
            self._console("halted: nothing to boot")
            release.unlink(missing_ok=True)
            return
        self._console(f"booting {image}")
        release.write_text(json.dumps(self._release_json(image), indent=2, sort_keys=True) + "\n")
        (self.run_dir / "system-state").write_text(self.system_state.get(image, "running") + "\n")
        (self.run_dir / "failed-units").write_text("".join(u + "\n" for u in self.failed_units.get(image, [])))
        for name, script in {**self.programs.get(None, {}), **self.programs.get(image, {})}.items():
            path = self.image_bin / name
            path.write_text("#!/bin/sh\n" + script + "\n")
            path.chmod(0o755)
        self._start_deadman()
        self._hung = image in self.hangs_on

    def _release_json(self, image: str) -> dict[str, object]:
        """/etc/imagetool/release.json of the image, from its manifest (what the build wrote)."""
        try:
            m = json.loads(self.node_var.image_file(image, "manifest").read_text())
        except (OSError, ValueError):
            return {}
        return {"name": m.get("name"), "version": m.get("version"), "services": list(m.get("services") or []),
                "release_sha256": m.get("release_sha256")}

    def _start_deadman(self) -> None:
        """imagetool-node-boot.service: the dead-man switch, in the background. The boot counts
        as done once it has looked at this boot (written its trial, or found none to watch)."""
        if not (self.bin / "imagetool-node").exists():
            return  # no helper, no dead-man switch
        with open(self.dir / "console.log", "ab") as console:
            self._deadman = subprocess.Popen([str(self.bin / "imagetool-node"), "boot"], env=self.env(), cwd=self.root,
                                             stdin=subprocess.DEVNULL, stdout=console, stderr=console,
                                             start_new_session=True)
        proc, boot_id, trial = self._deadman, self.boot_id, self.node_var.trial

        def looked() -> bool:
            if proc.poll() is not None:
                return True
            try:
                return json.loads(trial.read_text()).get("boot_id") == boot_id
            except (OSError, ValueError, AttributeError):
                return False

        Retrying(stop=stop_after_delay(BOOT_SETTLE_TIMEOUT), wait=wait_fixed(0.005),
                 retry=retry_if_result(lambda done: not done), retry_error_callback=lambda _: False)(looked)

    def _stop(self) -> None:
        """Everything of the current boot ends: its processes and its volatile state."""
        proc, self._deadman = self._deadman, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
        for d in (self.run_dir, self.image_bin):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()

    # --- observing -----------------------------------------------------------------------------

    def record(self, action: str, arg: str = "") -> None:
        self.log.append(Action(self.name, action, arg, self.booted))

    def actions(self, *names: str) -> list[tuple[str, str]]:
        """(action, arg) of this machine, in order; only `names` if given."""
        return [(a.action, a.arg) for a in self.log if a.node == self.name and (not names or a.action in names)]

    def inspect(self) -> dict[str, object]:
        """The helper's status, read on the node's console (not over the transport, not logged)."""
        with self.lock:
            self.advance()
            if self.booted is None:
                raise NodeError(f"node {self.name}: not running")
            r = subprocess.run([str(self.bin / "imagetool-node"), "status"], env=self.env(), cwd=self.root,
                               capture_output=True, text=True, timeout=60)
            return json.loads(r.stdout)

    def _console(self, msg: str) -> None:
        with open(self.dir / "console.log", "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} machine[{self.name}]: {msg}\n")


def _parse_systemd_run(argv: list[str]) -> tuple[float, list[str]]:
    """(seconds until due, command) of a systemd-run call."""
    delay = 0.0
    takes_value = {"--unit", "-u", "--description", "--property", "-p", "--timer-property", "--on-active",
                   "--on-calendar", "--slice", "--uid", "--gid", "--setenv", "-E"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-"):
            break
        name, eq, value = arg.partition("=")
        if not eq and name in takes_value:
            i += 1
            value = argv[i] if i < len(argv) else ""
        if name == "--on-active":
            try:
                delay = float(value.rstrip("s"))
            except ValueError:
                delay = 0.0
        i += 1
    return delay, argv[i:]


class LocalTransport:
    """The Transport to a LocalMachine. A "connection" belongs to one boot of the machine: after
    a reboot the next command finds it lost, as over SSH."""

    def __init__(self, machine: LocalMachine, connect_timeout: float = 10.0) -> None:
        self.machine = machine
        self.connect_timeout = connect_timeout
        self._boot: str | None = None

    def __repr__(self) -> str:
        return f"LocalTransport({self.machine.name})"

    @property
    def label(self) -> str:
        return f"{self.machine.name} (local {self.machine.dir})"

    @property
    def connected(self) -> bool:
        return self._boot is not None

    def reconnect(self, timeout: float) -> None:
        with self.machine.lock:
            self._boot = None
            self._open()

    def close(self) -> None:
        self._boot = None

    def _open(self) -> None:
        """Reach the machine (carrying out what it was asked first); call with its lock held."""
        m = self.machine
        m.advance()
        if not m.reachable:
            self._boot = None
            raise UnreachableError(f"node {self.label}: cannot connect: connection timed out")
        if self._boot is None:
            self._boot = m.boot_id
        elif self._boot != m.boot_id:
            self._boot = None
            raise UnreachableError(f"node {self.label}: connection lost: the node rebooted")

    def _arrive(self, action: str, arg: str) -> str | None:
        """Log what reaches the node; raise its fault, or return the crash text of one."""
        self.machine.record(action, arg)
        fault = self.machine.faults.get(action)
        if isinstance(fault, BaseException):
            raise fault
        return fault

    def _result(self, command: str, status: int, stdout: str, stderr: str) -> CommandResult:
        return CommandResult(command=command, exit_status=status, stdout=stdout, stderr=stderr,
                             host=f"local:{self.machine.dir}", name=self.machine.name)

    def run(self, argv: list[str], *, timeout: float = 60, input: bytes | None = None,
            check: bool = False) -> CommandResult:
        if not isinstance(argv, (list, tuple)) or not argv or not all(isinstance(a, str) for a in argv):
            raise InputError(f"node {self.label}: run() needs a non-empty list of strings, got {argv!r}")
        command = shlex.join(argv)
        with self.machine.lock:
            self._open()
            if argv[0] == "imagetool-node" and len(argv) > 1:
                action = argv[1]
                arg = argv[2] if len(argv) > 2 and not argv[2].startswith("-") else ""
            else:
                action, arg = argv[0], shlex.join(argv[1:])
            crash = self._arrive(action, arg)
            result = (self._result(command, 1, "", crash) if crash is not None
                      else self._exec(list(argv), command, timeout, input))
        if check:
            result.check("command")
        return result

    def run_shell(self, script: str, *, timeout: float = 60, check: bool = False) -> CommandResult:
        with self.machine.lock:
            self._open()
            crash = self._arrive("run-shell", script)
            result = (self._result(script, 1, "", crash) if crash is not None
                      else self._exec(["/bin/sh", "-c", script], script, timeout, None))
        if check:
            result.check("command")
        return result

    def _exec(self, argv: list[str], command: str, timeout: float, input: bytes | None) -> CommandResult:
        m = self.machine
        try:
            r = subprocess.run(argv, env=m.env(), cwd=m.root, input=input, capture_output=True, timeout=timeout)
        except FileNotFoundError:
            return self._result(command, 127, "", f"sh: 1: {argv[0]}: not found\n")
        except subprocess.TimeoutExpired:
            raise CommandTimeoutError(f"node {self.label}: `{command}` did not finish within {timeout:g}s") from None
        return self._result(command, r.returncode, r.stdout.decode("utf-8", "replace"),
                            r.stderr.decode("utf-8", "replace"))

    def put_file(self, local: Path, remote: str, *, offset: int = 0, progress: ProgressFn | None = None,
                 timeout: float = 600, receiver: str | None = None) -> int:
        """Append local[offset:] to `remote` on the node (offset 0 truncates), as SSHTransport
        does with `cat`: same errors, same count of bytes sent, /var's free space respected."""
        if receiver is not None:
            raise NotImplementedError("a local machine has no login user to become another")
        local = Path(local)
        size, command = upload_command(local, remote, offset)
        m = self.machine
        with m.lock:
            self._open()
            crash = self._arrive("put", remote)
            target = m.node_path(remote)
            if crash is not None or target is None or not target.parent.is_dir():
                why = crash or f"sh: 1: cannot create {remote}: Directory nonexistent"
                self._result(command, 2, "", why).check(f"writing {remote}")
            assert target is not None  # check() raised above otherwise
            room = m.free_bytes()
            fills = m.disk_fills_after is not None and m.disk_fills_after < room
            if fills:
                room = m.disk_fills_after or 0
            deadline = time.monotonic() + timeout
            sent = 0
            with open(local, "rb") as src, open(target, "ab" if offset else "wb") as dst:
                src.seek(offset)
                while block := src.read(READ_BLOCK):
                    if time.monotonic() > deadline:
                        raise CommandTimeoutError(
                            f"node {self.label}: sending {local} to {remote} did not finish within {timeout:g}s "
                            f"({sent} of {size - offset} bytes sent)")
                    fits = block[:max(0, room - sent)]
                    dst.write(fits)
                    sent += len(fits)
                    if len(fits) < len(block):
                        dst.flush()
                        if fills:
                            m.disk_fills_after = None
                            m.set_free_bytes(0)
                        raise NodeError(f"node {self.label}: `{command}` stopped reading after {sent} bytes "
                                        "(exit status 1): cat: write error: No space left on device")
                    if progress is not None:
                        progress(sent)
        return sent


def local_nodes(machines: Iterable[LocalMachine], *, reset: bool = True) -> list[HelperNode]:
    """Nodes on this machine, driven through their helper like any other (`reset`: their
    inventory entry has a reset command, the machine's out-of-band reset)."""
    return [HelperNode(m.spec(reset=reset), LocalTransport(m)) for m in machines]


__all__ = ["Action", "HELPER_FILE", "LocalMachine", "LocalTransport", "local_nodes"]
