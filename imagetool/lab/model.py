"""The lab's names and records: which lab, which nodes, where their state lives, how to reach them.

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
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from imagetool import schema
from imagetool.errors import InputError, NotFoundError
from imagetool.schema import Where
from imagetool.systools import pid_alive, run_tool
from imagetool.yamlfile import read_limited

LAB_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,15}$")


FIRST_HOST = 10


DEFAULT_VAR_SIZE = 4 * 1024**3


CONTAINER = "container"


VM = "vm"


CONTAINER_BOOT_TIMEOUT = 120.0


# Measured on this 2-core machine under TCG: GRUB, the Debian kernel and initramfs reach systemd in
# about 30 s and sshd answers after 90-120 s (over 180 s while an image build runs beside it).
VM_BOOT_TIMEOUT = 300.0


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
    return ipaddress.IPv4Network(f"10.250.{octet}.0/24")


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
        path = node_dir / "node.json"
        w = Where(path, style="path")
        known = {f.name: f.type for f in fields(LabNode)}
        data = schema.mapping(_read_record(path, "lab node record"), w, tuple(known),
                              required=("name", "index", "address", "netns", "host_veth", "machine_uuid"),
                              optional=False)
        schema.integer(data["index"], w / "index", minimum=0, maximum=253)
        for key, value in data.items():
            if key != "index":
                schema.string(value, w / key)
        return LabNode(**data)


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


LAB_RECORD_KEYS = ("name", "subnet", "bridge", "gateway", "release", "accel", "accel_reason", "created")


def save_lab_record(lab: Lab, accel_reason: str | None = None) -> None:
    """lab.json, which load_lab reads back; `up` also records why it chose its accelerator and
    when it was made, for the operator."""
    record = {"name": lab.name, "subnet": lab.subnet, "bridge": lab.bridge, "gateway": lab.gateway,
              "release": lab.release, "accel": lab.accel, "accel_reason": accel_reason, "created": time.time()}
    (lab.dir / "lab.json").write_text(json.dumps(record, indent=2) + "\n")


def load_lab(name: str, root: Path | None = None) -> Lab:
    d = lab_dir(name, root)
    state = d / "lab.json"
    if not state.exists():
        raise NotFoundError(f"no lab named {name!r} (looked for {state}); start one with `imagetool lab up`")
    w = Where(state, style="path")
    data = schema.mapping(_read_record(state, "lab record"), w, LAB_RECORD_KEYS,
                          required=("name", "subnet", "bridge", "gateway", "release"), optional=False)
    for key in ("name", "subnet", "bridge", "gateway", "release"):
        schema.string(data[key], w / key, non_empty=True)
    if data.get("accel") is not None:
        schema.string(data["accel"], w / "accel")
    nodes = [LabNode.load(p.parent) for p in sorted((d / "nodes").glob("*/node.json"), key=_node_order)]
    return Lab(name=data["name"], dir=d, subnet=data["subnet"], bridge=data["bridge"], gateway=data["gateway"],
               release=data["release"], nodes=nodes, accel=data.get("accel"))


# The lab's records are a few hundred bytes each.
MAX_RECORD_BYTES = 1 << 20


def _read_record(path: Path, what: str) -> object:
    """A lab record (JSON) or an InputError saying it is damaged and how to get rid of it."""
    data = read_limited(path, what, MAX_RECORD_BYTES)
    try:
        return json.loads(data)
    except ValueError as e:
        raise InputError(f"{path}: damaged {what} ({e}); `imagetool lab down` removes the lab") from None


def _node_order(p: Path) -> int:
    return int(re.sub(r"\D", "", p.parent.name) or 0)


HOST_KEY_PUB = "ssh_host_ed25519_key.pub"  # a copy of each node's public host key, in its node directory


def ssh_argv(lab: Lab, node: LabNode, *command: str) -> list[str]:
    return ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={lab.known_hosts}", "-o", "ConnectTimeout=3",
            "-i", str(lab.key), f"root@{node.address}", *command]


def read_pid(path: Path) -> int | None:
    """The live process whose pid `path` holds. A zombie is not live: a firmware this process
    started and killed stays one until reaped, and `status` (which asks every node at once) must
    not report such a node powered."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if running(pid) else None


def wait_gone(pid: int, timeout: float, after_kill: float = 15) -> bool:
    """Wait for `pid` to end, SIGKILL it after `timeout`, then wait up to `after_kill` more
    seconds (a VM killed inside KVM takes seconds to go). True if it is gone."""
    for wait, last in ((timeout, False), (after_kill, True)):
        alive = Retrying(stop=stop_after_delay(wait), wait=wait_fixed(0.1), retry=retry_if_result(bool),
                         retry_error_callback=lambda state: True)(running, pid)
        if not alive:
            return True
        if not last:
            kill_pid(pid)
    return False


def running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has nothing left to stop)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return pid_alive(pid)
    return stat[stat.rindex(")") + 2:][:1] != "Z"


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


def link_state(node: LabNode) -> str:
    link = json.loads(run_tool(["ip", "-j", "link", "show", node.host_link], check=False).stdout or "[{}]")[0]
    return "cut" if "UP" not in link.get("flags", []) else "up"


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
