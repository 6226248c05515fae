"""The lab cluster: N real nodes on this machine, booting release images read-only.

Each node is a network namespace with a veth to a host bridge and an address from the lab's own
range (10.250.X.0/24, X from the lab's name), plus a per-node firmware process
(imagetool.firmware) that boots the slot its boot control names with systemd-nspawn. A node's
/var is its own ext4 filesystem (a sparse file, loop-mounted) so that a full disk stays inside the
node. Everything the lab creates carries its name: interfaces `itl<hash>*`, namespaces
`imagetool-<lab>-<node>`, mounts and files under the lab directory, so `down` can find all of it
from the lab's name alone, also after a crash.
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
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import yaml
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from imagetool.errors import HostSetupError, ImagetoolError, InputError, NotFoundError, UnreachableError
from imagetool.firmware import container_inits, lab_cgroups, remove_cgroups
from imagetool.store import StoredRelease
from imagetool.systools import pid_alive, require, require_root

LAB_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,15}$")
NODE_NAME_RE = re.compile(r"^node[0-9]{1,3}$")
LAB_NET = ipaddress.ip_network("10.250.0.0/16")
FIRST_HOST = 10
DEFAULT_VAR_SIZE = 4 * 1024**3
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


@dataclass
class LabNode:
    name: str
    index: int
    address: str
    netns: str
    host_veth: str
    machine_uuid: str

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
               release=data["release"], nodes=nodes)


def _node_order(p: Path) -> int:
    return int(re.sub(r"\D", "", p.parent.name) or 0)


def _run(argv: list[str], check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if check and r.returncode != 0:
        raise ImagetoolError(f"`{' '.join(argv)}` failed (exit status {r.returncode}): {r.stderr.strip()}")
    return r


def preflight() -> None:
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
       var_size: int = DEFAULT_VAR_SIZE, boot_timeout: float = 120, progress: Progress | None = None) -> Lab:
    """Bring up a lab of `n_nodes` nodes booting `release`. On any failure, everything is undone."""
    progress = progress or (lambda step, detail: None)
    check_lab_name(name)
    if not 1 <= n_nodes <= 200:
        raise InputError(f"--nodes {n_nodes}: a lab has 1 to 200 nodes")
    preflight()
    d = lab_dir(name, root)
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
        (d / "lab.json").write_text(json.dumps({"name": name, "subnet": str(subnet), "bridge": bridge,
                                                "gateway": gateway, "release": release.id,
                                                "created": time.time()}, indent=2) + "\n")
        progress("network", f"bridge {bridge} {gateway}/24")
        _run(["ip", "link", "add", bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{gateway}/{subnet.prefixlen}", "dev", bridge])
        _run(["ip", "link", "set", bridge, "up"])
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"imagetool-lab-{name}", "-f", str(lab.key)])
        for i in range(1, n_nodes + 1):
            node = LabNode(name=f"node{i}", index=i, address=str(subnet.network_address + FIRST_HOST + i),
                           netns=f"imagetool-{name}-node{i}", host_veth=f"{prefix}n{i}",
                           machine_uuid=str(uuid.uuid4()))
            lab.nodes.append(node)
            progress("provision", node.name)
            _make_network(lab, node)
            _seed_node(lab, node, release, var_size)
        progress("boot", f"{n_nodes} nodes")
        for node in lab.nodes:
            start(lab, node.name)
        write_access_files(lab)
        wait_ssh(lab, [n.name for n in lab.nodes], timeout=boot_timeout, progress=progress)
        return lab
    except BaseException:
        down(name, root=root)
        raise


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
    state = var / "lib/imagetool"
    for sub in ("images", "boot", "etc"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    images = state / "images"
    shutil.copyfile(release.squashfs, images / f"{release.id}.squashfs")
    shutil.copyfile(release.manifest_path, images / f"{release.id}.manifest.json")
    if release.sig is not None:
        shutil.copyfile(release.sig, images / f"{release.id}.sig")
    (state / "boot/control.json").write_text(json.dumps({"default": release.id, "next": None}, indent=2) + "\n")
    (state / "state.json").write_text(json.dumps({"committed": release.id, "previous": None}, indent=2) + "\n")
    (state / "etc/hostname").write_text(node.name + "\n")
    ssh = var / "lib/ssh"
    (ssh / "authorized_keys").mkdir(parents=True)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{node.name}", "-f",
          str(ssh / "ssh_host_ed25519_key")])
    shutil.copyfile(lab.key.with_suffix(".pub"), ssh / "authorized_keys/root")


def write_access_files(lab: Lab) -> None:
    """known_hosts with the nodes' real host keys, and the inventory the rollout reads."""
    lines = []
    for node in lab.nodes:
        pub = (lab.node_dir(node.name) / "var/lib/ssh/ssh_host_ed25519_key.pub").read_text().split()
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


def wait_ssh(lab: Lab, names: list[str], timeout: float, progress: Progress | None = None) -> None:
    """Wait until every named node accepts an SSH login with host key checking."""

    def login(node: LabNode) -> bool:
        try:
            return subprocess.run(ssh_argv(lab, node, "true"), capture_output=True, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def one(name: str) -> None:
        node = lab.node(name)
        ok = Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(0.5), retry=retry_if_result(lambda ok: not ok),
                      retry_error_callback=lambda state: False)(login, node)
        if not ok:
            raise UnreachableError(f"lab {lab.name}: {name} ({node.address}) did not answer ssh within {timeout:.0f}s; "
                                   f"see {lab.node_dir(name) / 'console.log'}")
        if progress:
            progress("ssh", f"{name} up")

    with ThreadPoolExecutor(max_workers=min(16, len(names)) or 1) as pool:
        list(pool.map(one, names))


# ------------------------------------------------------------------------------ power controls


def _pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def firmware_pid(lab: Lab, node: str) -> int | None:
    return _pid(lab.node_dir(node) / "firmware.pid")


def start(lab: Lab, node: str) -> int:
    """Power the node on: start its firmware, which boots what the boot control names."""
    lab.node(node)
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
    """Hard reset: no clean shutdown; the firmware boots again (consuming a pending one-shot)."""
    pid = firmware_pid(lab, node)
    if pid is None:
        raise ImagetoolError(f"lab {lab.name}: {node} is powered off; `imagetool lab start {node}`")
    os.kill(pid, signal.SIGUSR1)


def kill(lab: Lab, node: str, timeout: float = 15) -> None:
    """Crash: the node dies at once and stays down until `start`."""
    pid = firmware_pid(lab, node)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    _wait_gone(pid, timeout)


def _wait_gone(pid: int, timeout: float) -> None:
    alive = Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(0.1), retry=retry_if_result(bool),
                     retry_error_callback=lambda state: True)(pid_alive, pid)
    if alive:
        _kill(pid)


def cut(lab: Lab, node: str) -> None:
    """Cut the node's network (its cable is pulled on the bridge side)."""
    _run(["ip", "link", "set", lab.node(node).host_veth, "down"])


def heal(lab: Lab, node: str) -> None:
    _run(["ip", "link", "set", lab.node(node).host_veth, "up"])


def fill(lab: Lab, node: str, leave: int) -> int:
    """Fill the node's /var until only about `leave` bytes are free, for root too (the
    filesystem's reserved blocks count as used: the node's services run as root); returns the
    filler's size. ext4 keeps a few clusters nobody can allocate, and the node may be writing
    meanwhile, so a size that does not fit is measured again, a little smaller each time."""
    var = lab.node_dir(lab.node(node).name) / "var"
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
    (lab.node_dir(lab.node(node).name) / "var" / "imagetool-lab-fill").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- status


@dataclass
class NodeState:
    name: str
    address: str
    powered: bool
    booted: str | None
    system_state: str
    network: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def container_init(lab: Lab, node: str) -> int | None:
    nspawn = _pid(lab.node_dir(node) / "nspawn.pid")
    if nspawn is None:
        return None
    inits = container_inits(nspawn)
    return inits[0] if inits else None


def status(lab: Lab) -> list[NodeState]:
    states = []
    for node in lab.nodes:
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
        link = json.loads(_run(["ip", "-j", "link", "show", node.host_veth], check=False).stdout or "[{}]")[0]
        network = "cut" if "UP" not in link.get("flags", []) else "up"
        states.append(NodeState(node.name, node.address, powered, booted, system_state, network))
    return states


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
    """Firmware and nspawn processes of this lab, found by the lab directory in their command line."""
    pids = []
    needle = str(d).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and (b"imagetool.firmware" in cmdline or b"systemd-nspawn" in cmdline):
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
    # Power cut through each firmware first (it kills its container), then anything left over.
    firmwares = [pid for pid in map(_pid, d.glob("nodes/*/firmware.pid")) if pid]
    for pid in firmwares:
        os.kill(pid, signal.SIGTERM)
    for pid in firmwares:  # all at once: ten nodes must not take ten stop timeouts
        _wait_gone(pid, 10)
        report.processes += 1
    for pid in _lab_processes(d):
        for child in container_inits(pid):
            _kill(child)
        _kill(pid)
        report.processes += 1
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
