"""The lab cluster: N real nodes on this machine, booting release images read-only.

A node is a container (imagetool.lab.container: a network namespace and systemd-nspawn, booted
by the lab's firmware) or a VM (imagetool.lab.vm: qemu booting a disk from `imagetool disk`), all
on one bridge with addresses from the lab's own range (10.250.X.0/24, X from the lab's name).
This module brings a lab up and down and plays its power and network controls; the names and
records are in imagetool.lab.model.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from imagetool import disk
from imagetool.errors import HostSetupError, ImagetoolError, InputError, UnreachableError
from imagetool.lab.container import (
    container_init,
    container_state,
    firmware_pid,
    make_network,
    reset_container,
    seed_node,
    start_container,
)
from imagetool.lab.firmware import container_inits, lab_cgroups, remove_cgroups
from imagetool.lab.model import (
    CONTAINER,
    CONTAINER_BOOT_TIMEOUT,
    DEFAULT_VAR_SIZE,
    FIRST_HOST,
    HOST_KEY_PUB,
    VM,
    VM_BOOT_TIMEOUT,
    Lab,
    LabNode,
    NodeState,
    Progress,
    check_lab_name,
    kill_pid,
    lab_dir,
    link_prefix,
    load_lab,
    mac_address,
    node_kinds,
    read_pid,
    save_lab_record,
    ssh_argv,
    subnet_of,
    tap_name,
    wait_gone,
)
from imagetool.lab.vm import (
    ACCEL_ENV,
    ACCELS,
    QEMU,
    check_vm_inputs,
    choose_accel,
    kvm_probe_argv,
    kvm_works,
    make_vm,
    network_file,
    qemu_argv,
    qemu_pid,
    qmp,
    reset_vm,
    run_probe,
    start_vm,
    vm_disk_size,
    vm_state,
    vm_var_files,
)
from imagetool.store import StoredRelease
from imagetool.systools import require, require_root, run_tool


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
    for a in json.loads(run_tool(["ip", "-j", "addr"]).stdout or "[]"):
        for info in a.get("addr_info", []):
            ours = a["ifname"] == except_link
            if info.get("family") == "inet" and ipaddress.ip_address(info["local"]) in subnet and not ours:
                found.append(f"{info['local']} on {a['ifname']}")
    for r in json.loads(run_tool(["ip", "-j", "route"]).stdout or "[]"):
        dst = r.get("dst", "")
        overlaps = dst not in ("default", "") and ipaddress.ip_network(dst, strict=False).overlaps(subnet)
        if overlaps and r.get("dev") != except_link:
            found.append(f"route {dst} dev {r.get('dev')}")
    return found


def up(name: str, n_nodes: int, release: StoredRelease, *, root: Path | None = None,
       var_size: int = DEFAULT_VAR_SIZE, boot_timeout: float = CONTAINER_BOOT_TIMEOUT, vm_nodes: int = 0,
       accel: str = "auto", vm_boot_timeout: float = VM_BOOT_TIMEOUT, progress: Progress | None = None,
       trusted_keys: Sequence[Path] = ()) -> Lab:
    """Bring up a lab of `n_nodes` nodes booting `release`, the `vm_nodes` highest-numbered of them
    VMs (qemu, `accel` as choose_accel() decides). Every node trusts `trusted_keys` (release
    signing public keys, on its /var as `imagetool disk --trusted-key` puts them), and `release`
    must be signed by one of them. On any failure, everything is undone."""
    progress = progress or (lambda step, detail: None)
    check_lab_name(name)
    if not 1 <= n_nodes <= 200:
        raise InputError(f"--nodes {n_nodes}: a lab has 1 to 200 nodes")
    if not 0 <= vm_nodes <= n_nodes:
        raise InputError(f"--vm-nodes {vm_nodes}: between 0 and the number of nodes ({n_nodes})")
    if accel not in ("auto", *ACCELS):
        raise InputError(f"--accel {accel!r}: choose auto, kvm or tcg")
    d = lab_dir(name, root)
    trusted_keys = [Path(k) for k in trusted_keys]
    if trusted_keys:
        # As `imagetool disk` does: the nodes would hold every later release to these keys.
        disk.check_trusted_keys(release, trusted_keys)
    if vm_nodes:
        check_vm_inputs(d, release, var_size)
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
        save_lab_record(lab, accel_reason=reason)
        progress("network", f"bridge {bridge} {gateway}/24")
        run_tool(["ip", "link", "add", bridge, "type", "bridge"])
        run_tool(["ip", "addr", "add", f"{gateway}/{subnet.prefixlen}", "dev", bridge])
        run_tool(["ip", "link", "set", bridge, "up"])
        run_tool(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"imagetool-lab-{name}", "-f", str(lab.key)])
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

                def disk_progress(step: str, detail: str, n: str = node.name) -> None:
                    progress("provision", f"{n} (VM): disk {step} {detail}")

                make_vm(lab, node, release, var_size, disk_progress, trusted_keys=trusted_keys)
            else:
                progress("provision", node.name)
                make_network(lab, node)
                seed_node(lab, node, release, var_size, trusted_keys)
        progress("boot", f"{n_nodes} nodes" + (f", {vm_nodes} of them VMs ({lab.accel})" if vm_nodes else ""))
        for node in lab.nodes:
            start(lab, node.name)
        write_access_files(lab)
        _wait_ssh(lab, {n.name: vm_boot_timeout if n.is_vm else boot_timeout for n in lab.nodes}, progress)
        return lab
    except BaseException:
        down(name, root=root)
        raise


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


def _not_for_vm(lab: Lab, node: str, what: str) -> LabNode:
    n = lab.node(node)
    if n.is_vm:
        raise InputError(f"lab {lab.name}: {node} is a VM; {what} is only supported for container nodes")
    return n


def start(lab: Lab, node: str) -> int:
    """Power the node on: start its firmware, which boots what the boot control names (a VM:
    start its qemu, whose GRUB does that). Returns the firmware's or qemu's pid."""
    n = lab.node(node)
    return start_vm(lab, n) if n.is_vm else start_container(lab, n)


def reset(lab: Lab, node: str) -> None:
    """Hard reset: no clean shutdown; the firmware (a VM: GRUB) boots again, consuming a pending one-shot."""
    n = lab.node(node)
    if n.is_vm:
        reset_vm(lab, n)
    else:
        reset_container(lab, n)


def kill(lab: Lab, node: str, timeout: float = 15) -> None:
    """Crash: the node dies at once and stays down until `start`."""
    pid = qemu_pid(lab, node) if lab.node(node).is_vm else firmware_pid(lab, node)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid, timeout)


def cut(lab: Lab, node: str) -> None:
    """Cut the node's network (its cable is pulled on the bridge side: its veth, or its VM's tap)."""
    run_tool(["ip", "link", "set", lab.node(node).host_link, "down"])


def heal(lab: Lab, node: str) -> None:
    run_tool(["ip", "link", "set", lab.node(node).host_link, "up"])


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
        if run_tool(["fallocate", "-l", str(size), str(filler)], check=False).returncode == 0:
            return size
        filler.unlink(missing_ok=True)
    raise HostSetupError(f"lab {lab.name}: could not fill {node}'s /var (it keeps changing)")


def unfill(lab: Lab, node: str) -> None:
    (lab.node_dir(_not_for_vm(lab, node, "lab unfill").name) / "var" / "imagetool-lab-fill").unlink(missing_ok=True)


def status(lab: Lab) -> list[NodeState]:
    with ThreadPoolExecutor(max_workers=min(16, len(lab.nodes)) or 1) as pool:
        return list(pool.map(lambda node: (vm_state if node.is_vm else container_state)(lab, node), lab.nodes))


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
        if ours and (b"imagetool.lab.firmware" in cmdline or b"systemd-nspawn" in cmdline or QEMU.encode() in cmdline):
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
    out = run_tool(["losetup", "-J", "-l"], check=False).stdout
    devices = json.loads(out or '{"loopdevices": []}').get("loopdevices", [])
    return [x["name"] for x in devices if (x.get("back-file") or "").startswith(str(d) + "/")]


def _netns_of(name: str) -> list[str]:
    out = run_tool(["ip", "-j", "netns", "list"], check=False).stdout
    return [n["name"] for n in json.loads(out or "[]") if n["name"].startswith(f"imagetool-{name}-node")]


def _links_of(name: str) -> list[str]:
    prefix = link_prefix(name)
    out = run_tool(["ip", "-j", "link"], check=False).stdout
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
    powered = [pid for pid in map(read_pid, [*d.glob("nodes/*/firmware.pid"), *d.glob("nodes/*/qemu.pid")]) if pid]
    ours = set(_lab_processes(d))
    powered = [pid for pid in powered if pid in ours]  # never a reused pid
    for pid in powered:
        os.kill(pid, signal.SIGTERM)
    for pid in powered:  # all at once: ten nodes must not take ten stop timeouts
        wait_gone(pid, 10)
        report.processes += 1
    rest = _lab_processes(d)
    for pid in rest:
        for child in container_inits(pid):
            kill_pid(child)
        kill_pid(pid)
        report.processes += 1
    for pid in rest:
        wait_gone(pid, 15, after_kill=0)
    for point in _mounts_under(d):
        if run_tool(["umount", point], check=False).returncode != 0:
            run_tool(["umount", "-l", point], check=False)
        report.mounts += 1
    for loop in _loops_under(d):
        run_tool(["losetup", "-d", loop], check=False)
        report.loops += 1
    for ns in _netns_of(name):
        run_tool(["ip", "netns", "delete", ns], check=False)
        report.netns += 1
    for link in _links_of(name):
        # Deleting one end of a veth removes its peer too.
        if run_tool(["ip", "link", "delete", link], check=False).returncode == 0:
            report.links += 1
    report.cgroups = remove_cgroups(name)
    if d.exists() and not _mounts_under(d):
        shutil.rmtree(d)
    return report


__all__ = [
    "CONTAINER", "HOST_KEY_PUB", "QEMU", "VM", "VM_BOOT_TIMEOUT", "DownReport", "ImagetoolError", "Lab", "LabNode",
    "NodeState", "check_lab_name", "choose_accel", "container_init", "cut", "down", "firmware_pid", "fill", "heal",
    "kill", "kvm_probe_argv", "lab_dir", "leftovers", "link_prefix", "load_lab", "mac_address", "network_file",
    "node_kinds", "preflight", "qemu_argv", "qemu_pid", "qmp", "reset", "run_probe", "ssh_argv", "start", "status",
    "subnet_of", "tap_name", "unfill", "up", "vm_disk_size", "vm_var_files", "wait_ssh", "write_access_files",
]
