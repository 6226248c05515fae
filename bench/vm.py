"""Real-machine figures: a VM node (qemu, GRUB, the image's kernel and initramfs) beside a container
node, measured in one run on one mixed two-node lab.

    .venv/bin/python bench/vm.py --from webapp-1 --to webapp-2 [--store DIR]

  disk            `imagetool disk` of FROM (raw, 8 GiB), and the same image copied with `cp` as
                  the baseline: what building a bootable disk costs over moving the bytes
  reset → ssh     a hard reset (the lab's power control) until sshd answers, for each node
  activation      a rollout of TO, staged first so only activation is timed: set-next, reboot,
                  new boot, health gate, confirm, commit; per node (--limit)
The VM runs under KVM where it works and TCG otherwise (printed). Needs root. Prints figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imagetool import lab  # noqa: E402
from imagetool.disk import DiskOptions, make_disk  # noqa: E402
from imagetool.store import Store, default_store_path, resolve_release  # noqa: E402
from rollout.inventory import load_inventory  # noqa: E402
from rollout.update import RolloutOptions, run_rollback, run_rollout  # noqa: E402

TIMEOUTS = dict(confirm_timeout=600, boot_timeout=400, health_timeout=200)


def ssh_answers(the_lab: lab.Lab, node: lab.LabNode) -> bool:
    try:
        return subprocess.run(lab.ssh_argv(the_lab, node, "true"), capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def reset_to_ssh(the_lab: lab.Lab, node: lab.LabNode, timeout: float = 600) -> float:
    t = time.monotonic()
    lab.reset(the_lab, node.name)
    # The node is still answering for a moment after the reset is requested: wait for it to stop.
    while ssh_answers(the_lab, node) and time.monotonic() - t < 5:
        time.sleep(0.2)
    while not ssh_answers(the_lab, node):
        if time.monotonic() - t > timeout:
            raise SystemExit(f"{node.name} did not answer ssh within {timeout:.0f}s after a reset")
        time.sleep(0.5)
    return time.monotonic() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="old", required=True)
    p.add_argument("--to", dest="new", required=True)
    p.add_argument("--store", default=None)
    args = p.parse_args()
    store = Store(default_store_path(args.store))
    old, new = resolve_release(store, args.old), resolve_release(store, args.new)
    root = Path(tempfile.mkdtemp(prefix="imagetool-bench-", dir="/var/tmp"))
    os.environ.setdefault("IMAGETOOL_STATE_DIR", str(root / "state"))

    t = time.monotonic()
    make_disk(old, DiskOptions(output=root / "bench.raw", size=8 * 1024**3))
    disk_seconds = time.monotonic() - t
    t = time.monotonic()
    shutil.copyfile(old.squashfs, root / "copy.squashfs")
    cp_seconds = time.monotonic() - t
    (root / "bench.raw").unlink()
    (root / "copy.squashfs").unlink()

    name = "benchvm"
    lab.down(name, root)
    the_lab = lab.up(name, 2, old, root=root, var_size=3 * 1024**3, vm_nodes=1)
    try:
        container, vm = the_lab.nodes
        inv = load_inventory(the_lab.inventory)
        resets = {n.name: reset_to_ssh(the_lab, n) for n in (container, vm)}
        # Stage TO everywhere (a first rollout, then back), so only activation is timed below.
        for run in (lambda: run_rollout(new, inv, RolloutOptions(batches="2", **TIMEOUTS)),
                    lambda: run_rollback(inv, RolloutOptions(batches="2", **TIMEOUTS))):
            r = run()
            assert r.exit_code == 0, r.to_dict()
        activation = {}
        for node in (container, vm):
            t = time.monotonic()
            r = run_rollout(new, inv, RolloutOptions(limit=[node.name], **TIMEOUTS))
            activation[node.name] = time.monotonic() - t
            assert r.exit_code == 0 and r.bytes_sent == 0, r.to_dict()
        r = run_rollback(inv, RolloutOptions(batches="2", **TIMEOUTS))
        assert r.exit_code == 0, r.to_dict()
        accel = getattr(lab.load_lab(name, root), "accel", "?")
        print(f"image {old.id}: {old.manifest.image.size / 2**20:.0f} MiB; VM accel: {accel}")
        print(f"imagetool disk (8 GiB raw):        {disk_seconds:6.1f} s   (cp of the image alone: {cp_seconds:.1f} s, "
              f"{disk_seconds / cp_seconds:.1f}x)")
        print(f"{'':34} {'container':>10} {'vm':>10} {'vm/container':>13}")
        print(f"{'reset → sshd answering':34} {resets[container.name]:9.1f}s {resets[vm.name]:9.1f}s "
              f"{resets[vm.name] / resets[container.name]:12.1f}x")
        print(f"{'activation (set-next → committed)':34} {activation[container.name]:9.1f}s "
              f"{activation[vm.name]:9.1f}s {activation[vm.name] / activation[container.name]:12.1f}x")
    finally:
        lab.down(name, root)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
