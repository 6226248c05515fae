"""Bytes on the wire for staging: delta (casync chunks the node lacks) against the whole image and
against rsync of the same pair, on a real lab node over real SSH.

    .venv/bin/python bench/delta.py [--store DIR] [--from webapp-1] [--to webapp-2 webapp-3 ...]

Brings up a one-node lab on FROM, then stages each TO in turn with `imagetool stage --json` (each
staged image becomes a seed for the next), and a second time to show a no-op costs nothing. For
each pair it prints the bytes imagetool sent, the image's size (what a full copy sends) and the
bytes rsync's delta algorithm sends for the same pair (`rsync --no-whole-file --stats`, its
"Literal data" plus its checksums, run between two local copies in the same run: the node's image
has no rsync). Goal (issue 9): webapp-1 -> webapp-2 sends at most 2% of the image. Needs root and
the releases in the store (the test suite's store by default). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imagetool import lab  # noqa: E402
from imagetool.store import Store  # noqa: E402

LAB = "benchdelta"
GOAL = 0.02


def rsync_bytes(old: Path, new: Path) -> int:
    """What rsync sends to turn `old` into `new`: literal data and the checksums it exchanges."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        target = Path(tmp) / new.name
        shutil.copyfile(old, target)
        # Not --inplace: in place, rsync cannot match data that moved to an earlier offset (it
        # overwrote it already), so every insertion makes the rest of the image literal data.
        out = subprocess.run(["rsync", "--no-whole-file", "--stats", str(new), str(target)],
                             capture_output=True, text=True, check=True).stdout
    sent = re.search(r"Total bytes sent: ([\d,]+)", out)
    received = re.search(r"Total bytes received: ([\d,]+)", out)
    # Locally one process plays both ends: "sent" is the sender's literal data and tokens,
    # "received" the receiver's block checksums. Over a network both cross it.
    return sum(int(m.group(1).replace(",", "")) for m in (sent, received) if m)


def stage(store: Path, inventory: Path, release: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "imagetool", "stage", release, "-i", str(inventory),
                           "--store", str(store), "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"imagetool stage {release} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout)["nodes"][0]


def mib(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=os.environ.get("IMAGETOOL_TEST_STORE", "/var/tmp/imagetool-test-store"))
    parser.add_argument("--from", dest="base", default="webapp-1")
    parser.add_argument("--to", nargs="+", default=["webapp-2", "webapp-3"])
    parser.add_argument("--lab-dir", default="/var/tmp/imagetool-test-labs")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/delta.py needs root (lab nodes)", file=sys.stderr)
        return 2
    store = Store(args.store)
    base = store.get(args.base)
    root = Path(args.lab_dir)
    lab.down(LAB, root)
    the_lab = lab.up(LAB, 1, base, root=root, var_size=3 * 1024**3)
    try:
        print(f"{'pair':<26} {'mode':<6} {'sent':>11} {'image':>11} {'sent/image':>10} {'rsync':>11} "
              f"{'rsync/image':>11}")
        previous = base
        for rid in args.to:
            release = store.get(rid)
            size = release.manifest.image.size
            got = stage(store.path, the_lab.inventory, rid)
            rs = rsync_bytes(previous.squashfs_path, release.squashfs_path)
            ratio = got["bytes_sent"] / size
            goal = f"   (goal <= {GOAL:.0%}: {'met' if ratio <= GOAL else 'NOT met'})" if previous is base else ""
            print(f"{previous.id + ' -> ' + rid:<26} {got['mode'] or '-':<6} {mib(got['bytes_sent']):>11} "
                  f"{mib(size):>11} {ratio:>10.2%} {mib(rs):>11} {rs / size:>11.2%}{goal}")
            again = stage(store.path, the_lab.inventory, rid)
            print(f"{'  again (no-op)':<26} {again['outcome']:<6} {mib(again['bytes_sent']):>11}")
            previous = release
    finally:
        lab.down(LAB, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
