"""Container lab nodes: a network namespace with a veth to the lab's bridge, its /var its own
ext4 filesystem (a sparse file, loop-mounted, so a full disk stays inside the node), booted by a
firmware process on the host (imagetool.lab.firmware) with systemd-nspawn.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from imagetool.errors import ImagetoolError
from imagetool.lab.firmware import container_inits
from imagetool.lab.model import HOST_KEY_PUB, Lab, LabNode, NodeState, link_prefix, link_state, read_pid
from imagetool.layout import NodeVar
from imagetool.store import StoredRelease
from imagetool.systools import run_tool


def make_network(lab: Lab, node: LabNode) -> None:
    peer = f"{link_prefix(lab.name)}p{node.index}"
    run_tool(["ip", "netns", "add", node.netns])
    run_tool(["ip", "link", "add", node.host_veth, "type", "veth", "peer", "name", peer])
    run_tool(["ip", "link", "set", peer, "netns", node.netns])
    run_tool(["ip", "link", "set", node.host_veth, "master", lab.bridge, "up"])
    ns = ["ip", "netns", "exec", node.netns]
    run_tool([*ns, "ip", "link", "set", peer, "name", "eth0"])
    run_tool([*ns, "ip", "addr", "add", f"{node.address}/24", "dev", "eth0"])
    run_tool([*ns, "ip", "link", "set", "eth0", "up"])
    run_tool([*ns, "ip", "link", "set", "lo", "up"])
    run_tool([*ns, "ip", "route", "add", "default", "via", lab.gateway])


def seed_node(lab: Lab, node: LabNode, release: StoredRelease, var_size: int,
              trusted_keys: Sequence[Path] = ()) -> None:
    """Make the node's /var, its own ext4 filesystem, look exactly like a freshly installed node's."""
    nd = lab.node_dir(node.name)
    nd.mkdir(parents=True)
    (nd / "node.json").write_text(json.dumps(asdict(node), indent=2) + "\n")
    img = nd / "var.img"
    with open(img, "wb") as f:
        f.truncate(var_size)
    run_tool(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", f"{node.name}-var", str(img)])
    var = nd / "var"
    var.mkdir()
    run_tool(["mount", "-o", "loop", str(img), str(var)])
    seed_var(NodeVar(var), node.name, release, lab.key.with_suffix(".pub"), trusted_keys)
    shutil.copyfile(var / "lib/ssh/ssh_host_ed25519_key.pub", nd / HOST_KEY_PUB)


def seed_var(node_var: NodeVar, hostname: str, release: StoredRelease, authorized_key: Path,
             trusted_keys: Sequence[Path] = ()) -> None:
    """What a freshly installed container node holds on its /var: `release` as its committed
    default (lab boot control), its hostname, a new SSH host key, the lab's key as root's
    authorized key, and the release signing keys it trusts, installed as `imagetool disk
    --trusted-key` installs them (NodeVar.install_trusted_keys)."""
    node_var.make_dirs()
    node_var.install_image(release.id, release.squashfs, release.manifest_path, release.sig)
    node_var.write_lab_control(default=release.id)
    node_var.write_state(committed=release.id)
    if trusted_keys:
        node_var.install_trusted_keys(list(trusted_keys))
    (node_var.state_dir / "etc").mkdir(exist_ok=True)
    (node_var.state_dir / "etc/hostname").write_text(hostname + "\n")
    ssh = node_var.var / "lib/ssh"
    (ssh / "authorized_keys").mkdir(parents=True)
    run_tool(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{hostname}", "-f",
              str(ssh / "ssh_host_ed25519_key")])
    shutil.copyfile(authorized_key, ssh / "authorized_keys/root")


def firmware_pid(lab: Lab, node: str) -> int | None:
    return read_pid(lab.node_dir(node) / "firmware.pid")


def container_init(lab: Lab, node: str) -> int | None:
    nspawn = read_pid(lab.node_dir(node) / "nspawn.pid")
    if nspawn is None:
        return None
    inits = container_inits(nspawn)
    return inits[0] if inits else None


def run_in_container(lab: Lab, node: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str] | None:
    """argv inside the node's running container, from the host (its console, not its SSH); None
    when no container runs. A command that overruns `timeout` raises subprocess.TimeoutExpired."""
    init = container_init(lab, node)
    if init is None:
        return None
    return subprocess.run(["nsenter", "-t", str(init), "-m", "-p", "-u", "-i", "-n", *argv],
                          capture_output=True, text=True, timeout=timeout)


def container_state(lab: Lab, node: LabNode) -> NodeState:
    nd = lab.node_dir(node.name)
    powered = firmware_pid(lab, node.name) is not None
    booted = None
    try:
        booted = json.loads((nd / "booted").read_text())["image"]
    except (OSError, ValueError, KeyError):
        pass
    system_state = "off" if not powered else "booting"
    # A loaded host (or a node deep in its boot) may take longer to answer than a status
    # should wait: then its state is not known, which is not an error of `lab status`.
    try:
        r = run_in_container(lab, node.name, ["systemctl", "is-system-running"], timeout=10)
        if r is not None:
            system_state = r.stdout.strip() or "booting"
    except subprocess.TimeoutExpired:
        system_state = "unknown"
    return NodeState(node.name, node.address, powered, booted, system_state, link_state(node), node.kind)


def start_container(lab: Lab, node: LabNode) -> int:
    """Start the node's firmware, which boots what its boot control names; returns its pid."""
    pid = firmware_pid(lab, node.name)
    if pid:
        return pid
    nd = lab.node_dir(node.name)
    log = open(nd / "firmware.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "imagetool.lab.firmware", str(lab.dir), node.name],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (nd / "firmware.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def reset_container(lab: Lab, node: LabNode) -> None:
    """SIGUSR1 to the firmware: it stops the container hard and boots again."""
    pid = firmware_pid(lab, node.name)
    if pid is None:
        raise ImagetoolError(f"lab {lab.name}: {node.name} is powered off; `imagetool lab start {node.name}`")
    os.kill(pid, signal.SIGUSR1)
