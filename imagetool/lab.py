"""The lab cluster: N real nodes on this machine, booting release images read-only.

A node is a container or a VM. A container node is a network namespace with a veth to a host
bridge and an address from the lab's own range (10.250.X.0/24, X from the lab's name), plus a
per-node firmware process (imagetool.firmware) that boots the slot its boot control names with
systemd-nspawn; its /var is its own ext4 filesystem (a sparse file, loop-mounted) so that a full
disk stays inside the node. A VM node is qemu booting the disk `imagetool disk` makes (GRUB, the
release as committed default on its /var partition), with a tap device on the same bridge; its
per-node identity (hostname, static address, SSH host key) is written onto that /var by the lab.
Everything the lab creates carries its name: interfaces `itl<hash>*`, namespaces
`imagetool-<lab>-<node>`, processes, mounts and files under the lab directory, so `down` can find
all of it from the lab's name alone, also after a crash.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import yaml
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from imagetool import disk
from imagetool.errors import HostSetupError, ImagetoolError, InputError, NotFoundError, UnreachableError
from imagetool.firmware import container_inits, lab_cgroups, remove_cgroups
from imagetool.layout import NodeVar
from imagetool.store import StoredRelease
from imagetool.systools import pid_alive, require, require_root, run_tool

LAB_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,15}$")
NODE_NAME_RE = re.compile(r"^node[0-9]{1,3}$")
LAB_NET = ipaddress.ip_network("10.250.0.0/16")
FIRST_HOST = 10
DEFAULT_VAR_SIZE = 4 * 1024**3
CONTAINER = "container"
VM = "vm"
CONTAINER_BOOT_TIMEOUT = 120.0
# Measured on this 2-core machine under TCG: GRUB, the Debian kernel and initramfs reach systemd in
# about 30 s and sshd answers after 90-120 s (over 180 s while an image build runs beside it).
VM_BOOT_TIMEOUT = 300.0
QEMU = "qemu-system-x86_64"
VM_MEMORY_MIB = 1024
VM_CPUS = 1
ACCELS = ("kvm", "tcg")
ACCEL_ENV = "IMAGETOOL_LAB_ACCEL"
# The KVM probe boots SeaBIOS with nothing to boot, which then reboots, which ends qemu: a working
# KVM does that in well under a second (TCG: 0.2 s). Seen on this machine kind (nested, /dev/kvm
# present): with -cpu host qemu aborts at once (MSR 0x10a); with its default CPU it took 4 s for
# the probe and hung booting a kernel. Anything slower than this is not a KVM to use.
KVM_PROBE_TIMEOUT = 2.0
UNIX_PATH_MAX = 107
Progress = Callable[[str, str], None]


def default_root() -> Path:
    return Path(os.environ.get("IMAGETOOL_LAB_DIR", "/var/lib/imagetool-lab"))


def check_lab_name(name: str) -> str:
    if not LAB_NAME_RE.match(name or ""):
        raise InputError(f"lab name {name!r}: use lowercase letters, digits and '-', at most 16 characters")
    return name


def _hash(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def link_prefix(name: str) -> str:
    """Interface names are limited to 15 characters: 'itl' + 4 hex of the lab's name."""
    return "itl" + _hash(name)[:4]


def subnet_of(name: str) -> ipaddress.IPv4Network:
    # 1..200: keeps clear of 10.250.254.0/24, which the transport tests use.
    octet = 1 + int(_hash(name), 16) % 200
    return ipaddress.ip_network(f"10.250.{octet}.0/24")


def tap_name(lab_name: str, index: int) -> str:
    """A VM node's tap device: the lab's link prefix, so `down` finds it (at most 11 characters)."""
    return f"{link_prefix(lab_name)}t{index}"


def mac_address(lab_name: str, node: str) -> str:
    """Stable per lab and node, in qemu's 52:54:00 range."""
    h = _hash(f"{lab_name}/{node}")
    return f"52:54:00:{h[0:2]}:{h[2:4]}:{h[4:6]}"


def node_kinds(n_nodes: int, vm_nodes: int) -> list[str]:
    """The kind of node1..nodeN: the `vm_nodes` highest-numbered ones are VMs."""
    return [VM if i > n_nodes - vm_nodes else CONTAINER for i in range(1, n_nodes + 1)]


@dataclass
class LabNode:
    name: str
    index: int
    address: str
    netns: str  # containers: their network namespace ("" for VMs)
    host_veth: str  # containers: the host end of their veth ("" for VMs)
    machine_uuid: str
    kind: str = CONTAINER  # node.json files from before VMs have no kind: containers
    tap: str = ""  # VMs: their tap device on the lab's bridge
    mac: str = ""  # VMs: their NIC's MAC address

    @property
    def is_vm(self) -> bool:
        return self.kind == VM

    @property
    def host_link(self) -> str:
        """The node's cable on the lab's bridge (what cut/heal pull and plug)."""
        return self.tap if self.is_vm else self.host_veth

    @staticmethod
    def load(node_dir: Path) -> LabNode:
        return LabNode(**json.loads((node_dir / "node.json").read_text()))


@dataclass
class Lab:
    name: str
    dir: Path
    subnet: str
    bridge: str
    gateway: str
    release: str
    nodes: list[LabNode] = field(default_factory=list)
    accel: str | None = None  # VM labs: kvm or tcg, decided once at `up`

    @property
    def inventory(self) -> Path:
        return self.dir / "inventory.yaml"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def key(self) -> Path:
        return self.dir / "id_ed25519"

    def node(self, name: str) -> LabNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise NotFoundError(f"lab {self.name} has no node {name!r} (nodes: {', '.join(n.name for n in self.nodes)})")

    def node_dir(self, name: str) -> Path:
        return self.dir / "nodes" / name


def lab_dir(name: str, root: Path | None = None) -> Path:
    return (root or default_root()) / check_lab_name(name)


def load_lab(name: str, root: Path | None = None) -> Lab:
    d = lab_dir(name, root)
    state = d / "lab.json"
    if not state.exists():
        raise NotFoundError(f"no lab named {name!r} (looked for {state}); start one with `imagetool lab up`")
    data = json.loads(state.read_text())
    nodes = [LabNode.load(p.parent) for p in sorted((d / "nodes").glob("*/node.json"), key=_node_order)]
    return Lab(name=data["name"], dir=d, subnet=data["subnet"], bridge=data["bridge"], gateway=data["gateway"],
               release=data["release"], nodes=nodes, accel=data.get("accel"))


def _node_order(p: Path) -> int:
    return int(re.sub(r"\D", "", p.parent.name) or 0)


_run = run_tool


def preflight(vms: bool = False) -> None:
    require_root("imagetool lab")
    require("systemd-nspawn", "ip", "mount", "losetup", "ssh", "ssh-keygen")
    if not shutil.which("mkfs.ext4", path="/usr/sbin:/sbin:/usr/bin:/bin"):
        raise HostSetupError("missing system tool mkfs.ext4; install with: apt-get install e2fsprogs")
    filesystems = Path("/proc/filesystems").read_text()
    if "squashfs" not in filesystems:
        subprocess.run(["modprobe", "squashfs"], capture_output=True)
        if "squashfs" not in Path("/proc/filesystems").read_text():
            raise HostSetupError("this kernel cannot mount squashfs (no squashfs in /proc/filesystems)")
    if not Path("/dev/loop-control").exists():
        raise HostSetupError("no loop device support (/dev/loop-control missing)")
    if vms:
        require(QEMU)
        disk.preflight()
        if not Path("/dev/net/tun").exists():
            raise HostSetupError("VM nodes need tap devices, and /dev/net/tun is missing (modprobe tun)")


def _addresses_in_use(subnet: ipaddress.IPv4Network, except_link: str) -> list[str]:
    found = []
    for a in json.loads(_run(["ip", "-j", "addr"]).stdout or "[]"):
        for info in a.get("addr_info", []):
            if info.get("family") == "inet" and ipaddress.ip_address(info["local"]) in subnet and a["ifname"] != except_link:
                found.append(f"{info['local']} on {a['ifname']}")
    for r in json.loads(_run(["ip", "-j", "route"]).stdout or "[]"):
        dst = r.get("dst", "")
        if dst not in ("default", "") and ipaddress.ip_network(dst, strict=False).overlaps(subnet) and r.get("dev") != except_link:
            found.append(f"route {dst} dev {r.get('dev')}")
    return found


# ------------------------------------------------------------------------------------------ up


def up(name: str, n_nodes: int, release: StoredRelease, *, root: Path | None = None,
       var_size: int = DEFAULT_VAR_SIZE, boot_timeout: float = CONTAINER_BOOT_TIMEOUT, vm_nodes: int = 0,
       accel: str = "auto", vm_boot_timeout: float = VM_BOOT_TIMEOUT, progress: Progress | None = None) -> Lab:
    """Bring up a lab of `n_nodes` nodes booting `release`, the `vm_nodes` highest-numbered of them
    VMs (qemu, `accel` as choose_accel() decides). On any failure, everything is undone."""
    progress = progress or (lambda step, detail: None)
    check_lab_name(name)
    if not 1 <= n_nodes <= 200:
        raise InputError(f"--nodes {n_nodes}: a lab has 1 to 200 nodes")
    if not 0 <= vm_nodes <= n_nodes:
        raise InputError(f"--vm-nodes {vm_nodes}: between 0 and the number of nodes ({n_nodes})")
    if accel not in ("auto", *ACCELS):
        raise InputError(f"--accel {accel!r}: choose auto, kvm or tcg")
    d = lab_dir(name, root)
    if vm_nodes:
        _check_vm_inputs(d, release, var_size)
    preflight(vms=vm_nodes > 0)
    if (d / "lab.json").exists():
        raise InputError(f"lab {name!r} is already up ({d}); `imagetool lab down --lab {name}` first")
    subnet = subnet_of(name)
    prefix = link_prefix(name)
    bridge = prefix + "br"
    conflicts = _addresses_in_use(subnet, except_link=bridge)
    if conflicts:
        raise HostSetupError(f"lab {name!r} would use {subnet}, which is already in use here ({'; '.join(conflicts)}); "
                             "pick another lab name")
    gateway = str(subnet.network_address + 1)
    lab = Lab(name=name, dir=d, subnet=str(subnet), bridge=bridge, gateway=gateway, release=release.id)
    try:
        d.mkdir(parents=True, exist_ok=True)
        (d / "nodes").mkdir(exist_ok=True)
        reason = None
        if vm_nodes:
            progress("accel", "probing KVM" if accel == "auto" and not os.environ.get(ACCEL_ENV) else accel)
            lab.accel, reason = choose_accel(accel, os.environ, lambda: kvm_works(d / "kvm-probe.pid"))
        (d / "lab.json").write_text(json.dumps({"name": name, "subnet": str(subnet), "bridge": bridge,
                                                "gateway": gateway, "release": release.id, "accel": lab.accel,
                                                "accel_reason": reason, "created": time.time()}, indent=2) + "\n")
        progress("network", f"bridge {bridge} {gateway}/24")
        _run(["ip", "link", "add", bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{gateway}/{subnet.prefixlen}", "dev", bridge])
        _run(["ip", "link", "set", bridge, "up"])
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"imagetool-lab-{name}", "-f", str(lab.key)])
        for i, kind in enumerate(node_kinds(n_nodes, vm_nodes), start=1):
            node_name = f"node{i}"
            address = str(subnet.network_address + FIRST_HOST + i)
            if kind == VM:
                node = LabNode(name=node_name, index=i, address=address, netns="", host_veth="",
                               machine_uuid=str(uuid.uuid4()), kind=VM, tap=tap_name(name, i),
                               mac=mac_address(name, node_name))
            else:
                node = LabNode(name=node_name, index=i, address=address, netns=f"imagetool-{name}-{node_name}",
                               host_veth=f"{prefix}n{i}", machine_uuid=str(uuid.uuid4()))
            lab.nodes.append(node)
            if node.is_vm:
                progress("provision", f"{node.name} (VM)")
                _make_vm(lab, node, release, var_size,
                         lambda step, detail, n=node.name: progress("provision", f"{n} (VM): disk {step} {detail}"))
            else:
                progress("provision", node.name)
                _make_network(lab, node)
                _seed_node(lab, node, release, var_size)
        progress("boot", f"{n_nodes} nodes" + (f", {vm_nodes} of them VMs ({lab.accel})" if vm_nodes else ""))
        for node in lab.nodes:
            start(lab, node.name)
        write_access_files(lab)
        _wait_ssh(lab, {n.name: vm_boot_timeout if n.is_vm else boot_timeout for n in lab.nodes}, progress)
        return lab
    except BaseException:
        down(name, root=root)
        raise


def vm_disk_size(var_size: int) -> int:
    """A VM's disk: its /var partition is `var_size`, plus GRUB's partitions and the backup GPT."""
    return -(-var_size // disk.MiB) * disk.MiB + disk.VAR_START + disk.GPT_BACKUP


def _check_vm_inputs(d: Path, release: StoredRelease, var_size: int) -> None:
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


def _make_network(lab: Lab, node: LabNode) -> None:
    peer = f"{link_prefix(lab.name)}p{node.index}"
    _run(["ip", "netns", "add", node.netns])
    _run(["ip", "link", "add", node.host_veth, "type", "veth", "peer", "name", peer])
    _run(["ip", "link", "set", peer, "netns", node.netns])
    _run(["ip", "link", "set", node.host_veth, "master", lab.bridge, "up"])
    ns = ["ip", "netns", "exec", node.netns]
    _run([*ns, "ip", "link", "set", peer, "name", "eth0"])
    _run([*ns, "ip", "addr", "add", f"{node.address}/24", "dev", "eth0"])
    _run([*ns, "ip", "link", "set", "eth0", "up"])
    _run([*ns, "ip", "link", "set", "lo", "up"])
    _run([*ns, "ip", "route", "add", "default", "via", lab.gateway])


def _seed_node(lab: Lab, node: LabNode, release: StoredRelease, var_size: int) -> None:
    """Make the node's /var look exactly like a freshly installed node's."""
    nd = lab.node_dir(node.name)
    nd.mkdir(parents=True)
    (nd / "node.json").write_text(json.dumps(asdict(node), indent=2) + "\n")
    img = nd / "var.img"
    with open(img, "wb") as f:
        f.truncate(var_size)
    _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", f"{node.name}-var", str(img)])
    var = nd / "var"
    var.mkdir()
    _run(["mount", "-o", "loop", str(img), str(var)])
    node_var = NodeVar(var)
    node_var.make_dirs()
    node_var.install_image(release.id, release.squashfs, release.manifest_path, release.sig)
    node_var.write_lab_control(default=release.id)
    node_var.write_state(committed=release.id)
    (node_var.state_dir / "etc").mkdir()
    (node_var.state_dir / "etc/hostname").write_text(node.name + "\n")
    ssh = var / "lib/ssh"
    (ssh / "authorized_keys").mkdir(parents=True)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{node.name}", "-f",
          str(ssh / "ssh_host_ed25519_key")])
    shutil.copyfile(lab.key.with_suffix(".pub"), ssh / "authorized_keys/root")
    shutil.copyfile(ssh / "ssh_host_ed25519_key.pub", nd / HOST_KEY_PUB)


HOST_KEY_PUB = "ssh_host_ed25519_key.pub"  # a copy of each node's public host key, in its node directory


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


def _make_vm(lab: Lab, node: LabNode, release: StoredRelease, var_size: int, progress: Progress | None = None) -> None:
    """The VM's tap on the bridge, and its disk: `imagetool disk` with this node's identity on /var."""
    nd = lab.node_dir(node.name)
    nd.mkdir(parents=True)
    (nd / "node.json").write_text(json.dumps(asdict(node), indent=2) + "\n")
    _run(["ip", "tuntap", "add", "dev", node.tap, "mode", "tap"])
    _run(["ip", "link", "set", node.tap, "master", lab.bridge, "up"])
    # The host key is made here so that known_hosts has it before the first boot.
    keys = nd / ".hostkey"
    keys.mkdir(mode=0o700)
    key = keys / "ssh_host_ed25519_key"
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{node.name}", "-f", str(key)])
    files = vm_var_files(node, lab.gateway, key.read_bytes(), key.with_suffix(".pub").read_bytes())
    # The other key types too: made at first boot under TCG, RSA alone took 22 s of it.
    for kind in ("ecdsa", "rsa"):
        other = keys / f"ssh_host_{kind}_key"
        _run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"root@{node.name}", "-f", str(other)])
        files[f"lib/ssh/{other.name}"] = other.read_bytes()
        files[f"lib/ssh/{other.name}.pub"] = other.with_suffix(".pub").read_bytes()
    shutil.copyfile(key.with_suffix(".pub"), nd / HOST_KEY_PUB)
    shutil.rmtree(keys)
    options = disk.DiskOptions(output=nd / "disk.raw", format="raw", size=vm_disk_size(var_size),
                               authorized_keys=[lab.key.with_suffix(".pub")], var_files=files)
    disk.make_disk(release, options, progress)


def write_access_files(lab: Lab) -> None:
    """known_hosts with the nodes' real host keys, and the inventory the rollout reads."""
    lines = []
    for node in lab.nodes:
        pub = (lab.node_dir(node.name) / HOST_KEY_PUB).read_text().split()
        lines.append(f"{node.address} {pub[0]} {pub[1]}\n")
    lab.known_hosts.write_text("".join(lines))
    # The lab's power control, as an IPMI reset would be for real machines.
    reset = [sys.executable, "-m", "imagetool.cli", "lab", "reset", "{name}", "--lab", lab.name,
             "--lab-dir", str(lab.dir.parent)]
    inventory = {
        "defaults": {"user": "root", "port": 22, "key": lab.key.name, "known_hosts": lab.known_hosts.name,
                     "reset_command": shlex.join(reset)},
        "nodes": {n.name: {"host": n.address, "groups": ["lab"]} for n in lab.nodes},
    }
    header = f"# lab {lab.name}: written by `imagetool lab up`; nodes are reached over SSH like real machines\n"
    tmp = lab.inventory.with_suffix(".tmp")
    tmp.write_text(header + yaml.safe_dump(inventory, sort_keys=False))
    os.replace(tmp, lab.inventory)


def ssh_argv(lab: Lab, node: LabNode, *command: str) -> list[str]:
    return ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={lab.known_hosts}", "-o", "ConnectTimeout=3",
            "-i", str(lab.key), f"root@{node.address}", *command]


def wait_ssh(lab: Lab, names: list[str], timeout: float | None = None, progress: Progress | None = None) -> None:
    """Wait until every named node accepts an SSH login with host key checking; without a
    `timeout`, a VM node gets VM_BOOT_TIMEOUT and a container CONTAINER_BOOT_TIMEOUT."""
    _wait_ssh(lab, {name: timeout if timeout is not None else
                    VM_BOOT_TIMEOUT if lab.node(name).is_vm else CONTAINER_BOOT_TIMEOUT for name in names}, progress)


def _wait_ssh(lab: Lab, timeouts: dict[str, float], progress: Progress | None = None) -> None:
    def login(node: LabNode) -> bool:
        try:
            return subprocess.run(ssh_argv(lab, node, "true"), capture_output=True, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def one(name: str) -> None:
        node = lab.node(name)
        timeout = timeouts[name]
        ok = Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(0.5), retry=retry_if_result(lambda ok: not ok),
                      retry_error_callback=lambda state: False)(login, node)
        if not ok:
            what = f"a VM under {lab.accel or 'tcg'}" if node.is_vm else "a container"
            raise UnreachableError(f"lab {lab.name}: {name} ({node.address}, {what}) did not answer ssh within "
                                   f"{timeout:.0f}s; see {lab.node_dir(name) / 'console.log'}")
        if progress:
            progress("ssh", f"{name} up")

    with ThreadPoolExecutor(max_workers=min(16, len(timeouts)) or 1) as pool:
        list(pool.map(one, timeouts))


# ------------------------------------------------------------------------------------------ VMs


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


def _start_vm(lab: Lab, node: LabNode) -> int:
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


def _reset_vm(lab: Lab, node: LabNode) -> None:
    if qemu_pid(lab, node.name) is None:
        raise ImagetoolError(f"lab {lab.name}: {node.name} is powered off; `imagetool lab start {node.name}`")
    qmp(lab.node_dir(node.name) / "qmp.sock", "system_reset")


def _not_for_vm(lab: Lab, node: str, what: str) -> LabNode:
    n = lab.node(node)
    if n.is_vm:
        raise InputError(f"lab {lab.name}: {node} is a VM; {what} is only supported for container nodes")
    return n


# ------------------------------------------------------------------------------ power controls


def _pid(path: Path) -> int | None:
    """The live process whose pid `path` holds. A zombie is not live: a firmware this process
    started and killed stays one until reaped, and `status` (which asks every node at once) must
    not report such a node powered."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _running(pid) else None


def firmware_pid(lab: Lab, node: str) -> int | None:
    return _pid(lab.node_dir(node) / "firmware.pid")


def start(lab: Lab, node: str) -> int:
    """Power the node on: start its firmware, which boots what the boot control names (a VM:
    start its qemu, whose GRUB does that). Returns the firmware's or qemu's pid."""
    n = lab.node(node)
    if n.is_vm:
        return _start_vm(lab, n)
    pid = firmware_pid(lab, node)
    if pid:
        return pid
    nd = lab.node_dir(node)
    log = open(nd / "firmware.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "imagetool.firmware", str(lab.dir), node],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (nd / "firmware.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def reset(lab: Lab, node: str) -> None:
    """Hard reset: no clean shutdown; the firmware (a VM: GRUB) boots again, consuming a pending one-shot."""
    n = lab.node(node)
    if n.is_vm:
        _reset_vm(lab, n)
        return
    pid = firmware_pid(lab, node)
    if pid is None:
        raise ImagetoolError(f"lab {lab.name}: {node} is powered off; `imagetool lab start {node}`")
    os.kill(pid, signal.SIGUSR1)


def kill(lab: Lab, node: str, timeout: float = 15) -> None:
    """Crash: the node dies at once and stays down until `start`."""
    pid = qemu_pid(lab, node) if lab.node(node).is_vm else firmware_pid(lab, node)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    _wait_gone(pid, timeout)


def _wait_gone(pid: int, timeout: float, after_kill: float = 15) -> bool:
    """Wait for `pid` to end, SIGKILL it after `timeout`, then wait up to `after_kill` more
    seconds (a VM killed inside KVM takes seconds to go). True if it is gone."""
    for wait, last in ((timeout, False), (after_kill, True)):
        alive = Retrying(stop=stop_after_delay(wait), wait=wait_fixed(0.1), retry=retry_if_result(bool),
                         retry_error_callback=lambda state: True)(_running, pid)
        if not alive:
            return True
        if not last:
            _kill(pid)
    return False


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has nothing left to stop)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return pid_alive(pid)
    return stat[stat.rindex(")") + 2:][:1] != "Z"


def cut(lab: Lab, node: str) -> None:
    """Cut the node's network (its cable is pulled on the bridge side: its veth, or its VM's tap)."""
    _run(["ip", "link", "set", lab.node(node).host_link, "down"])


def heal(lab: Lab, node: str) -> None:
    _run(["ip", "link", "set", lab.node(node).host_link, "up"])


def fill(lab: Lab, node: str, leave: int) -> int:
    """Fill the node's /var until only about `leave` bytes are free, for root too (the
    filesystem's reserved blocks count as used: the node's services run as root); returns the
    filler's size. ext4 keeps a few clusters nobody can allocate, and the node may be writing
    meanwhile, so a size that does not fit is measured again, a little smaller each time."""
    var = lab.node_dir(_not_for_vm(lab, node, "lab fill").name) / "var"
    filler = var / "imagetool-lab-fill"
    filler.unlink(missing_ok=True)
    step = 16 * 1024**2
    for attempt in range(10):
        st = os.statvfs(var)
        size = max(0, st.f_bfree * st.f_frsize - leave - attempt * step)
        if _run(["fallocate", "-l", str(size), str(filler)], check=False).returncode == 0:
            return size
        filler.unlink(missing_ok=True)
    raise HostSetupError(f"lab {lab.name}: could not fill {node}'s /var (it keeps changing)")


def unfill(lab: Lab, node: str) -> None:
    (lab.node_dir(_not_for_vm(lab, node, "lab unfill").name) / "var" / "imagetool-lab-fill").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- status


@dataclass
class NodeState:
    name: str
    address: str
    powered: bool
    booted: str | None
    system_state: str
    network: str
    kind: str = CONTAINER

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def container_init(lab: Lab, node: str) -> int | None:
    nspawn = _pid(lab.node_dir(node) / "nspawn.pid")
    if nspawn is None:
        return None
    inits = container_inits(nspawn)
    return inits[0] if inits else None


def status(lab: Lab) -> list[NodeState]:
    with ThreadPoolExecutor(max_workers=min(16, len(lab.nodes)) or 1) as pool:
        return list(pool.map(lambda node: (_vm_state if node.is_vm else _container_state)(lab, node), lab.nodes))


def _network(node: LabNode) -> str:
    link = json.loads(_run(["ip", "-j", "link", "show", node.host_link], check=False).stdout or "[{}]")[0]
    return "cut" if "UP" not in link.get("flags", []) else "up"


def _container_state(lab: Lab, node: LabNode) -> NodeState:
    nd = lab.node_dir(node.name)
    powered = firmware_pid(lab, node.name) is not None
    booted = None
    try:
        booted = json.loads((nd / "booted").read_text())["image"]
    except (OSError, ValueError, KeyError):
        pass
    init = container_init(lab, node.name)
    system_state = "off" if not powered else "booting"
    if init:
        r = subprocess.run(["nsenter", "-t", str(init), "-m", "-p", "-u", "-i", "-n",
                            "systemctl", "is-system-running"], capture_output=True, text=True, timeout=10)
        system_state = r.stdout.strip() or "booting"
    return NodeState(node.name, node.address, powered, booted, system_state, _network(node), node.kind)


def _vm_state(lab: Lab, node: LabNode) -> NodeState:
    """Powered is qemu alive; what it booted and how far, the node helper says over SSH (if it answers)."""
    powered = qemu_pid(lab, node.name) is not None
    network = _network(node)
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


# --------------------------------------------------------------------------------------- down


@dataclass
class DownReport:
    processes: int = 0
    mounts: int = 0
    loops: int = 0
    netns: int = 0
    links: int = 0
    cgroups: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _lab_processes(d: Path) -> list[int]:
    """Firmware, nspawn and qemu processes of this lab, found by the lab directory in their command
    line (the directory itself, or a path inside it: lab `a` must not find lab `ab`'s)."""
    pids = []
    needle = str(d).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ours = any(arg == needle or needle + b"/" in arg for arg in cmdline.split(b"\0"))
        if ours and (b"imagetool.firmware" in cmdline or b"systemd-nspawn" in cmdline or QEMU.encode() in cmdline):
            pids.append(int(entry))
    return pids


def _mounts_under(d: Path) -> list[str]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(d) or point.startswith(str(d) + "/"):
            mounts.append(point)
    return sorted(set(mounts), key=len, reverse=True)


def _loops_under(d: Path) -> list[str]:
    out = _run(["losetup", "-J", "-l"], check=False).stdout
    devices = json.loads(out or '{"loopdevices": []}').get("loopdevices", [])
    return [x["name"] for x in devices if (x.get("back-file") or "").startswith(str(d) + "/")]


def _netns_of(name: str) -> list[str]:
    out = _run(["ip", "-j", "netns", "list"], check=False).stdout
    return [n["name"] for n in json.loads(out or "[]") if n["name"].startswith(f"imagetool-{name}-node")]


def _links_of(name: str) -> list[str]:
    prefix = link_prefix(name)
    out = _run(["ip", "-j", "link"], check=False).stdout
    return [link["ifname"] for link in json.loads(out or "[]") if link["ifname"].startswith(prefix)]


def leftovers(name: str, root: Path | None = None) -> dict[str, list[str]]:
    """Everything of this lab still on the machine (empty after a successful `down`)."""
    d = lab_dir(name, root)
    return {
        "processes": [str(p) for p in _lab_processes(d)],
        "mounts": _mounts_under(d),
        "loops": _loops_under(d),
        "netns": _netns_of(name),
        "links": _links_of(name),
        "cgroups": sorted(str(p) for p in lab_cgroups(name)),
        "dir": [str(d)] if d.exists() else [],
    }


def down(name: str, root: Path | None = None) -> DownReport:
    """Remove every namespace, link, mount, loop device and process of the lab, then its directory."""
    require_root("imagetool lab down")
    d = lab_dir(name, root)
    report = DownReport()
    # Power cut through each firmware first (it kills its container) and each VM's qemu, then
    # anything left over (a crashed `up` may have left processes without pid files).
    powered = [pid for pid in map(_pid, [*d.glob("nodes/*/firmware.pid"), *d.glob("nodes/*/qemu.pid")]) if pid]
    ours = set(_lab_processes(d))
    powered = [pid for pid in powered if pid in ours]  # never a reused pid
    for pid in powered:
        os.kill(pid, signal.SIGTERM)
    for pid in powered:  # all at once: ten nodes must not take ten stop timeouts
        _wait_gone(pid, 10)
        report.processes += 1
    rest = _lab_processes(d)
    for pid in rest:
        for child in container_inits(pid):
            _kill(child)
        _kill(pid)
        report.processes += 1
    for pid in rest:
        _wait_gone(pid, 15, after_kill=0)
    for point in _mounts_under(d):
        if _run(["umount", point], check=False).returncode != 0:
            _run(["umount", "-l", point], check=False)
        report.mounts += 1
    for loop in _loops_under(d):
        _run(["losetup", "-d", loop], check=False)
        report.loops += 1
    for ns in _netns_of(name):
        _run(["ip", "netns", "delete", ns], check=False)
        report.netns += 1
    for link in _links_of(name):
        # Deleting one end of a veth removes its peer too.
        if _run(["ip", "link", "delete", link], check=False).returncode == 0:
            report.links += 1
    report.cgroups = remove_cgroups(name)
    if d.exists() and not _mounts_under(d):
        shutil.rmtree(d)
    return report


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
