"""Lab figures: bring-up time for N nodes from cold, one node's reboot time, memory per idle node.

    .venv/bin/python bench/lab.py --release webapp-1 [--store DIR] [--nodes 10]

Cold means no lab processes, mounts or namespaces; the release image is already built. A reboot is
timed from `imagetool-node reboot` until sshd answers again with a new boot id. Memory per node is
the sum of the resident set (PSS where the kernel gives it) of every process in the node's
container plus its firmware and nspawn, idle after boot. Needs root. Prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imagetool import lab  # noqa: E402
from imagetool.store import Store, default_store_path, resolve_release  # noqa: E402


def ssh_json(the_lab: lab.Lab, node: lab.LabNode, *cmd: str) -> dict | None:
    r = subprocess.run(lab.ssh_argv(the_lab, node, *cmd), capture_output=True, text=True, timeout=15)
    return json.loads(r.stdout) if r.returncode == 0 else None


def reboot_seconds(the_lab: lab.Lab, node: lab.LabNode) -> float:
    before = ssh_json(the_lab, node, "imagetool-node", "status")["boot_id"]
    t = time.monotonic()
    ssh_json(the_lab, node, "imagetool-node", "reboot")
    deadline = t + 120
    while time.monotonic() < deadline:  # a benchmark's polling loop, not product code
        try:
            s = ssh_json(the_lab, node, "imagetool-node", "status")
        except subprocess.TimeoutExpired:
            s = None
        if s and s["boot_id"] != before:
            return time.monotonic() - t
        time.sleep(0.1)
    raise RuntimeError(f"{node.name} did not come back")


def pss_kib(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        return next(int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
        except OSError:
            pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--release", default="webapp-1")
    ap.add_argument("--store", default=None)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--reboots", type=int, default=5)
    args = ap.parse_args()
    release = resolve_release(Store(default_store_path(args.store)), args.release)
    name = "bench"
    root = Path("/var/tmp/imagetool-bench-labs")
    lab.down(name, root)
    t = time.monotonic()
    the_lab = lab.up(name, args.nodes, release, root=root, var_size=2 * 1024**3)
    up_s = time.monotonic() - t
    try:
        print(f"lab up, {args.nodes} nodes from cold to sshd answering on all: {up_s:.1f}s "
              f"({up_s / args.nodes:.2f}s per node)")
        node = the_lab.nodes[0]
        times = [reboot_seconds(the_lab, node) for _ in range(args.reboots)]
        print(f"reboot (asked -> sshd answers with a new boot id), {args.reboots} runs: "
              f"median {statistics.median(times):.2f}s, min {min(times):.2f}s, max {max(times):.2f}s")
        time.sleep(5)  # idle
        per_node = []
        for n in the_lab.nodes:
            fw = lab.firmware_pid(the_lab, n.name)
            per_node.append(sum(pss_kib(p) for p in descendants(fw)) / 1024 if fw else 0)
        print(f"memory per idle node (PSS of firmware + nspawn + container): median "
              f"{statistics.median(per_node):.1f} MiB, max {max(per_node):.1f} MiB")
    finally:
        t = time.monotonic()
        lab.down(name, root)
        print(f"lab down: {time.monotonic() - t:.1f}s")


if __name__ == "__main__":
    main()
