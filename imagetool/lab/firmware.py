"""The lab's bootloader: one supervisor process per node plays the node's firmware.

It reads the node's boot control (/var/lib/imagetool/boot/control.json on the node's /var),
consumes a one-shot `next` entry the way `grub-reboot` does (cleared before the boot, so a failed
boot falls back to the default on the next one), loop-mounts that image read-only and boots it with
systemd-nspawn. When the container reboots (nspawn exits 133) it boots again the same way; a
power-off ends the node. Signals from `imagetool lab`: SIGUSR1 = hard reset, SIGTERM = power cut.

Run as `python -m imagetool.lab.firmware LAB_DIR NODE`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from imagetool.layout import NodeVar

NSPAWN_REBOOT = 133
# Each node's container gets a cgroup of its own under this name in every hierarchy that
# systemd uses. With --keep-unit and no systemd on the host, nspawn puts the container's
# "payload" cgroup under the cgroup it was started in: the same one for every node, so two nodes
# booting at once ran their units in the same cgroups and killed each other's processes (seen:
# systemd-user-sessions, systemd-tmpfiles-setup-dev, the reboot unit failing now and then).
CGROUP_ROOT = "imagetool-lab"
# A node whose image keeps dying right after boot is halted rather than looping forever.
CRASH_LOOP_LIMIT = 5
CRASH_LOOP_WINDOW = 60.0


class Firmware:
    def __init__(self, lab_dir: Path, node: str) -> None:
        self.lab_dir = lab_dir
        self.node = node
        self.node_dir = lab_dir / "nodes" / node
        self.var = self.node_dir / "var"
        self.node_var = NodeVar(self.var)
        self.root = self.node_dir / "root"
        self.info = json.loads((self.node_dir / "node.json").read_text())
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.power_off = False
        self.crashes: list[float] = []

    # -- boot control, exactly as a bootloader sees it (imagetool.layout knows its format)

    def choose_image(self) -> str | None:
        return self.node_var.choose_boot(self.log)

    def image_file(self, image_id: str) -> Path:
        return self.node_var.image_file(image_id)

    # -- one boot

    def boot(self, image_id: str) -> int:
        self.root.mkdir(exist_ok=True)
        subprocess.run(["mount", "-o", "loop,ro", str(self.image_file(image_id)), str(self.root)], check=True)
        (self.node_dir / "booted").write_text(json.dumps({"image": image_id, "time": time.time()}) + "\n")
        self.log(f"booting {image_id}")
        try:
            argv = [
                "systemd-nspawn", "--boot", "--read-only", "--register=no", "--keep-unit",
                f"--network-namespace-path=/run/netns/{self.info['netns']}",
                "-D", str(self.root), f"--bind={self.var}:/var",
                f"--machine={self.node}", f"--uuid={self.info['machine_uuid']}",
                "--resolv-conf=off", "--timezone=off", "--link-journal=no", "--console=pipe",
                "--kill-signal=SIGRTMIN+3",
            ]
            groups = node_cgroups(self.lab_dir.name, self.node)
            for g in groups:
                g.mkdir(parents=True, exist_ok=True)

            def enter_own_cgroup() -> None:  # in the child, before exec
                for g in groups:
                    (g / "cgroup.procs").write_text(f"{os.getpid()}\n")

            with open(self.node_dir / "console.log", "ab") as console:
                self.nspawn = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=console,
                                               preexec_fn=enter_own_cgroup)
                (self.node_dir / "nspawn.pid").write_text(f"{self.nspawn.pid}\n")
                rc = self.nspawn.wait()
            return rc
        finally:
            self.nspawn = None
            (self.node_dir / "booted").unlink(missing_ok=True)
            (self.node_dir / "nspawn.pid").unlink(missing_ok=True)
            subprocess.run(["umount", str(self.root)], capture_output=True)

    def hard_stop(self) -> None:
        """Pull the plug: kill the container's init, which takes every process in it along."""
        proc = self.nspawn
        if proc is None:
            return
        for pid in container_inits(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        signal.signal(signal.SIGUSR1, lambda *_: self.hard_stop())

        def power_cut(*_: object) -> None:
            self.power_off = True
            self.hard_stop()

        signal.signal(signal.SIGTERM, power_cut)
        signal.signal(signal.SIGINT, power_cut)
        while not self.power_off:
            image = self.choose_image()
            if image is None:
                self.log("halted: nothing to boot")
                return 1
            rc = self.boot(image)
            if self.power_off:
                break
            if rc == 0:
                self.log("powered off")
                return 0
            if rc != NSPAWN_REBOOT:
                # A reset or a crash: the machine restarts, as one with a watchdog would.
                now = time.monotonic()
                self.crashes = [t for t in self.crashes if now - t < CRASH_LOOP_WINDOW] + [now]
                self.log(f"{image} stopped with status {rc}; restarting")
                if len(self.crashes) >= CRASH_LOOP_LIMIT:
                    self.log("halted: crash loop")
                    return 1
            else:
                self.log("reboot")
        self.log("power cut")
        return 0

    def log(self, msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} firmware[{self.node}]: {msg}", flush=True)


def cgroup_hierarchies() -> list[Path]:
    """Mount points of the hierarchies systemd manages: cgroup2, and v1's name=systemd."""
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        sep = fields.index("-")
        fstype, options = fields[sep + 1], fields[sep + 3].split(",")
        if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in options):
            found.append(Path(fields[4]))
    return found


def node_cgroups(lab: str, node: str) -> list[Path]:
    return [h / CGROUP_ROOT / f"{lab}-{node}" for h in cgroup_hierarchies()]


def lab_cgroups(lab: str) -> list[Path]:
    """The cgroups of every node of `lab`, in every hierarchy."""
    return [p for h in cgroup_hierarchies() for p in (h / CGROUP_ROOT).glob(f"{lab}-*")]


def remove_cgroups(lab: str) -> int:
    """Remove the lab's cgroups (once their processes are gone), innermost first."""
    removed = 0
    for top in lab_cgroups(lab):
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except OSError:
                pass
        try:
            top.rmdir()
            removed += 1
        except OSError:
            pass
    return removed


def container_inits(nspawn_pid: int) -> list[int]:
    """The container's PID 1 is a direct child of systemd-nspawn."""
    children: list[int] = []
    try:
        for task in os.listdir(f"/proc/{nspawn_pid}/task"):
            with open(f"/proc/{nspawn_pid}/task/{task}/children") as f:
                children.extend(int(p) for p in f.read().split())
    except OSError:
        pass
    return children


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m imagetool.lab.firmware LAB_DIR NODE", file=sys.stderr)
        return 2
    return Firmware(Path(args[0]), args[1]).run()


if __name__ == "__main__":
    sys.exit(main())
