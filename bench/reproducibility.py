"""What still differs between two builds of the same release, and between releases 1 and 2.

    .venv/bin/python bench/reproducibility.py [--release examples/webapp-1.yaml] [--other examples/webapp-2.yaml]
    .venv/bin/python bench/reproducibility.py --compare A.squashfs B.squashfs

Builds the release twice (diskimage-builder cache warm after the first), mounts both squashfs
images and compares every file (content and metadata), then measures how many bytes of the second
image are new relative to the first, by content-defined chunks (what a chunk store would send) and
by fixed 128 KiB blocks. Needs root. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imagetool.build import BuildOptions, build  # noqa: E402
from imagetool.release import load_release  # noqa: E402
from imagetool.store import Store  # noqa: E402


def file_table(root: Path) -> dict[str, tuple]:
    table = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                content = ("link", os.readlink(p))
            elif p.is_file():
                content = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size)
            else:
                content = ("dir",)
            table[rel] = (content, st.st_mode, st.st_uid, st.st_gid, int(st.st_mtime))
    return table


def gear_chunks(data: bytes, avg_bits: int = 16, min_size: int = 16 * 1024, max_size: int = 256 * 1024):
    """Content-defined chunking with a rolling gear hash (casync/FastCDC style), ~64 KiB average."""
    import random

    rnd = random.Random(42)
    gear = [rnd.getrandbits(64) for _ in range(256)]
    mask = (1 << avg_bits) - 1
    mask64 = (1 << 64) - 1
    start, h, i, n = 0, 0, 0, len(data)
    while i < n:
        h = ((h << 1) + gear[data[i]]) & mask64
        i += 1
        size = i - start
        if (size >= min_size and (h & mask) == 0) or size >= max_size:
            yield data[start:i]
            start, h = i, 0
    if start < n:
        yield data[start:]


def new_bytes(a: Path, b: Path) -> tuple[float, float]:
    da, db = a.read_bytes(), b.read_bytes()
    seen = {hashlib.sha256(c).digest() for c in gear_chunks(da)}
    cdc_new = sum(len(c) for c in gear_chunks(db) if hashlib.sha256(c).digest() not in seen)
    block = 128 * 1024
    blocks = {hashlib.sha256(da[i:i + block]).digest() for i in range(0, len(da), block)}
    fixed_new = sum(len(db[i:i + block]) for i in range(0, len(db), block)
                    if hashlib.sha256(db[i:i + block]).digest() not in blocks)
    return cdc_new / len(db), fixed_new / len(db)


def compare(a: Path, b: Path, label: str) -> None:
    with tempfile.TemporaryDirectory() as ma, tempfile.TemporaryDirectory() as mb:
        subprocess.run(["mount", "-o", "loop,ro", str(a), ma], check=True)
        subprocess.run(["mount", "-o", "loop,ro", str(b), mb], check=True)
        try:
            ta, tb = file_table(Path(ma)), file_table(Path(mb))
        finally:
            subprocess.run(["umount", ma])
            subprocess.run(["umount", mb])
    only_a = sorted(set(ta) - set(tb))
    only_b = sorted(set(tb) - set(ta))
    changed = sorted(k for k in set(ta) & set(tb) if ta[k] != tb[k])
    changed_bytes = sum(tb[k][0][2] for k in changed if tb[k][0][0] == "file")
    cdc, fixed = new_bytes(a, b)
    print(f"\n== {label}: {a.name} vs {b.name}")
    print(f"image sizes: {a.stat().st_size / 1e6:.1f} MB, {b.stat().st_size / 1e6:.1f} MB; "
          f"identical image: {hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()}")
    print(f"files: {len(ta)} vs {len(tb)}; only in first {len(only_a)}, only in second {len(only_b)}, "
          f"differing {len(changed)} ({changed_bytes / 1e6:.1f} MB of file content)")
    for k in changed[:40]:
        what = "content" if ta[k][0] != tb[k][0] else "metadata"
        print(f"  differs ({what}): /{k}")
    for k in only_b[:20]:
        print(f"  only in second: /{k}")
    print(f"new bytes in the second image: {cdc * 100:.1f}% by content-defined chunks, "
          f"{fixed * 100:.1f}% by fixed 128 KiB blocks")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--release", default=str(REPO / "examples/webapp-1.yaml"))
    ap.add_argument("--other", default=str(REPO / "examples/webapp-2.yaml"))
    ap.add_argument("--compare", nargs=2, metavar=("A.squashfs", "B.squashfs"),
                    help="only compare two existing images, no builds")
    args = ap.parse_args()
    if args.compare:
        compare(Path(args.compare[0]), Path(args.compare[1]), "given images")
        return
    release = load_release(args.release)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        stores = [Store(Path(tmp) / "a"), Store(Path(tmp) / "b")]
        images = []
        for i, store in enumerate(stores):
            t = time.monotonic()
            images.append(build(release, store, BuildOptions()).squashfs)
            print(f"build {i + 1} of {release.id}: {time.monotonic() - t:.0f}s")
        compare(images[0], images[1], "same release built twice")
        if args.other:
            other = load_release(args.other)
            t = time.monotonic()
            img = build(other, stores[0], BuildOptions()).squashfs
            print(f"build of {other.id}: {time.monotonic() - t:.0f}s")
            compare(images[0], img, "next release")


if __name__ == "__main__":
    main()
