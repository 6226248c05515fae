"""VM lab nodes: qemu booting the disk `imagetool disk` makes (GRUB, the release as committed
default on its /var partition), with a tap device on the lab's bridge; its per-node identity
(hostname, static address, SSH host keys) is written onto that /var by the lab. KVM where a
bounded probe shows it works, TCG otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from imagetool import disk
from imagetool.errors import HostSetupError, ImagetoolError, InputError
from imagetool.lab.model import HOST_KEY_PUB, Lab, LabNode, NodeState, Progress, link_state, ssh_argv
from imagetool.store import StoredRelease
from imagetool.systools import run_tool

QEMU = "qemu-system-x86_64"


VM_MEMORY_MIB = 1024


VM_CPUS = 2


ACCELS = ("kvm", "tcg")


ACCEL_ENV = "IMAGETOOL_LAB_ACCEL"


# The KVM probe boots SeaBIOS with nothing to boot, which then reboots, which ends qemu: a working
# KVM does that in well under a second (TCG: 0.2 s). Seen on this machine kind (nested, /dev/kvm
# present): with -cpu host qemu aborts at once (MSR 0x10a); with its default CPU it took 4 s for
# the probe and hung booting a kernel. Anything slower than this is not a KVM to use.
KVM_PROBE_TIMEOUT = 2.0


UNIX_PATH_MAX = 107


def vm_disk_size(var_size: int) -> int:
    """A VM's disk: its /var partition is `var_size`, plus GRUB's partitions and the backup GPT."""
    return -(-var_size // disk.MiB) * disk.MiB + disk.VAR_START + disk.GPT_BACKUP


def check_vm_inputs(d: Path, release: StoredRelease, var_size: int) -> None:
    """What would make a VM node fail, before anything is made."""
    needed = disk.min_size(release) - disk.VAR_START - disk.GPT_BACKUP
    if var_size < needed:
        raise InputError(f"--var-size {var_size // disk.MiB} MiB is too small for a VM node of {release.id}: its /var "
                         f"must hold the image twice and {disk.VAR_HEADROOM // disk.MiB} MiB more; use at least "
                         f"{-(-needed // disk.MiB)} MiB")
    longest = d / "nodes" / "node200" / "qmp.sock"
    if len(str(longest)) > UNIX_PATH_MAX:
        raise InputError(f"lab directory {d} is too long for the VMs' QMP sockets ({len(str(longest))} > "
                         f"{UNIX_PATH_MAX} characters); use a shorter --lab-dir")
    disk.check_bootable(release)


def network_file(address: str, gateway: str, prefixlen: int = 24) -> str:
    """A VM node's static address on the lab's network, for systemd-networkd. It sorts before the
    image's DHCP default (90-imagetool-wired.network), so it wins; nothing but the lab's own IPv4
    range is configured (no IPv6 link-local, no router solicitations)."""
    return ("# imagetool lab: this node's address on the lab's bridge (overrides the image's DHCP default)\n"
            "[Match]\n"
            "Type=ether\n"
            "\n"
            "[Network]\n"
            f"Address={address}/{prefixlen}\n"
            f"Gateway={gateway}\n"
            "LinkLocalAddressing=no\n"
            "IPv6AcceptRA=no\n")


def vm_var_files(node: LabNode, gateway: str, host_key: bytes, host_key_pub: bytes) -> dict[str, bytes]:
    """A VM node's own files on its /var (paths relative to /var): what a container node gets
    from the lab's namespace and seeding."""
    return {
        "lib/imagetool/etc/hostname": f"{node.name}\n".encode(),
        "lib/imagetool/network/10-lab.network": network_file(node.address, gateway).encode(),
        "lib/ssh/ssh_host_ed25519_key": host_key,
        "lib/ssh/ssh_host_ed25519_key.pub": host_key_pub,
    }


def make_vm(lab: Lab, node: LabNode, release: StoredRelease, var_size: int, progress: Progress | None = None,
            trusted_keys: Sequence[Path] = ()) -> None:
    """The VM's tap on the bridge, and its disk: `imagetool disk` with this node's identity on /var
    (and `trusted_keys` as `disk --trusted-key`)."""
    nd = lab.node_dir(node.name)
    nd.mkdir(parents=True)
    (nd / "node.json").write_text(json.dumps(asdict(node), indent=2) + "\n")
    run_tool(["ip", "tuntap", "add", "dev", node.tap, "mode", "tap"])
    run_tool(["ip", "link", "set", node.tap, "master", lab.bridge, "up"])
    # The host key is made here so that known_hosts has it before the first boot.
    keys = nd / ".hostkey"
    keys.mkdir(mode=0o700)
    key = keys / "ssh_host_ed25519_key"
    run_tool(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{node.name}", "-f", str(key)])
    files = vm_var_files(node, lab.gateway, key.read_bytes(), key.with_suffix(".pub").read_bytes())
    # The other key types too: made at first boot under TCG, RSA alone took 22 s of it.
    for kind in ("ecdsa", "rsa"):
        other = keys / f"ssh_host_{kind}_key"
        run_tool(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"root@{node.name}", "-f", str(other)])
        files[f"lib/ssh/{other.name}"] = other.read_bytes()
        files[f"lib/ssh/{other.name}.pub"] = other.with_suffix(".pub").read_bytes()
    shutil.copyfile(key.with_suffix(".pub"), nd / HOST_KEY_PUB)
    shutil.rmtree(keys)
    options = disk.DiskOptions(output=nd / "disk.raw", format="raw", size=vm_disk_size(var_size),
                               authorized_keys=[lab.key.with_suffix(".pub")], trusted_keys=list(trusted_keys),
                               var_files=files)
    disk.make_disk(release, options, progress)


def _qarg(path: Path) -> str:
    """A path inside a qemu option value (a comma there is written twice)."""
    return str(path).replace(",", ",,")


def qemu_argv(lab: Lab, node: LabNode, accel: str) -> list[str]:
    """The VM node's qemu: its disk, a NIC on its tap, an entropy source (without one, first-boot
    key generation stalls for ~20 s), the serial console appended to console.log, QMP for resets.
    -daemonize: qemu reports a failed start in its exit status, then runs in a session of its own."""
    nd = lab.node_dir(node.name)
    return [
        QEMU, "-name", f"{lab.name}-{node.name}", "-nodefaults", "-no-user-config",
        "-machine", "pc", "-accel", accel, "-cpu", "max" if accel == "tcg" else "host",
        "-smp", str(VM_CPUS), "-m", str(VM_MEMORY_MIB), "-uuid", node.machine_uuid,
        "-drive", f"file={_qarg(nd / 'disk.raw')},format=raw,if=virtio",
        "-netdev", f"tap,id=net0,ifname={node.tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=net0,mac={node.mac}",
        "-device", "virtio-rng-pci",
        "-display", "none",
        "-chardev", f"file,id=console,path={_qarg(nd / 'console.log')},append=on",
        "-serial", "chardev:console",
        "-qmp", f"unix:{_qarg(nd / 'qmp.sock')},server=on,wait=off",
        "-pidfile", str(nd / "qemu.pid"),
        "-daemonize",
    ]


def kvm_probe_argv(pidfile: Path) -> list[str]:
    """A trivial target: SeaBIOS finds nothing to boot, reboots at once, and -no-reboot ends qemu
    with status 0. The pidfile (in the lab directory) lets `down` find a probe that hangs."""
    return [QEMU, "-nodefaults", "-no-user-config", "-machine", "pc", "-accel", "kvm", "-cpu", "host", "-m", "32",
            "-display", "none", "-no-reboot", "-boot", "reboot-timeout=0", "-pidfile", str(pidfile)]


def run_probe(argv: list[str], timeout: float) -> bool:
    """Did `argv` exit with status 0 within `timeout` seconds? Killed when it did not."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        return False
    try:
        return proc.wait(timeout) == 0
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(15)  # a VM stuck in KVM takes seconds to die; `down` finds it if it takes longer
        except subprocess.TimeoutExpired:
            pass
        return False


def kvm_works(pidfile: Path, timeout: float = KVM_PROBE_TIMEOUT) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        return run_probe(kvm_probe_argv(pidfile), timeout)
    finally:
        pidfile.unlink(missing_ok=True)


def choose_accel(requested: str, env: Mapping[str, str], probe: Callable[[], bool]) -> tuple[str, str]:
    """kvm or tcg, and why: an explicit choice (`--accel`), else $IMAGETOOL_LAB_ACCEL, else a
    bounded probe (/dev/kvm can exist and hang rather than fail)."""
    if requested not in ("auto", *ACCELS):
        raise InputError(f"--accel {requested!r}: choose auto, kvm or tcg")
    if requested != "auto":
        return requested, "--accel"
    from_env = env.get(ACCEL_ENV, "").strip()
    if from_env and from_env != "auto":
        if from_env not in ACCELS:
            raise InputError(f"{ACCEL_ENV}={from_env!r}: choose auto, kvm or tcg")
        return from_env, ACCEL_ENV
    if probe():
        return "kvm", "probe: KVM works"
    return "tcg", f"probe: KVM unavailable, failing, or slower than {KVM_PROBE_TIMEOUT:.0f}s for a trivial guest"


def qemu_pid(lab: Lab, node: str) -> int | None:
    """The node's qemu, if it runs (a pid from the pidfile that is really this node's qemu)."""
    nd = lab.node_dir(node)
    try:
        pid = int((nd / "qemu.pid").read_text().strip())
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if not args or not args[0].endswith(QEMU.encode()) or str(nd / "qemu.pid").encode() not in args:
        return None
    return pid


def qmp(sock: Path, command: str, timeout: float = 10, **arguments: object) -> object:
    """One QMP command on a qemu's monitor socket; its "return" value."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
            f = s.makefile("rwb")

            def reply() -> dict[str, object]:
                while True:
                    line = f.readline()
                    if not line:
                        raise ImagetoolError(f"qemu closed its monitor ({sock})")
                    msg = json.loads(line)
                    if "return" in msg or "error" in msg or "QMP" in msg:
                        return msg  # events (asynchronous) are skipped

            if "QMP" not in reply():
                raise ImagetoolError(f"{sock}: not a QMP monitor")
            for execute, args in (("qmp_capabilities", {}), (command, arguments)):
                f.write(json.dumps({"execute": execute, **({"arguments": args} if args else {})}).encode() + b"\n")
                f.flush()
                msg = reply()
                if "error" in msg:
                    raise ImagetoolError(f"qemu refused {execute}: {msg['error']}")
            return msg["return"]
    except (OSError, ValueError) as e:
        raise ImagetoolError(f"cannot talk to qemu's monitor {sock}: {e}") from None


def start_vm(lab: Lab, node: LabNode) -> int:
    pid = qemu_pid(lab, node.name)
    if pid:
        return pid
    nd = lab.node_dir(node.name)
    (nd / "qmp.sock").unlink(missing_ok=True)
    r = subprocess.run(qemu_argv(lab, node, lab.accel or "tcg"), stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=60, start_new_session=True)
    pid = qemu_pid(lab, node.name)
    if r.returncode != 0 or pid is None:
        raise HostSetupError(f"lab {lab.name}: qemu for {node.name} did not start (exit status {r.returncode}): "
                             f"{r.stderr.strip()}")
    return pid


def reset_vm(lab: Lab, node: LabNode) -> None:
    if qemu_pid(lab, node.name) is None:
        raise ImagetoolError(f"lab {lab.name}: {node.name} is powered off; `imagetool lab start {node.name}`")
    qmp(lab.node_dir(node.name) / "qmp.sock", "system_reset")


def vm_state(lab: Lab, node: LabNode) -> NodeState:
    """Powered is qemu alive; what it booted and how far, the node helper says over SSH (if it answers)."""
    powered = qemu_pid(lab, node.name) is not None
    network = link_state(node)
    booted, system_state = None, "off"
    if powered:
        system_state = "unreachable" if network == "cut" else "booting"
        if network != "cut":
            try:
                r = subprocess.run(ssh_argv(lab, node, "imagetool-node", "status"), capture_output=True, text=True,
                                   timeout=10)
                answer = json.loads(r.stdout) if r.returncode == 0 else {}
                booted, system_state = answer.get("booted"), answer.get("system_state") or system_state
            except (subprocess.TimeoutExpired, ValueError, AttributeError):
                pass
    return NodeState(node.name, node.address, powered, booted, system_state, network, node.kind)
