"""What still differs between two builds of the same release, and between releases 1 and 2.

    .venv/bin/python bench/reproducibility.py [--release examples/webapp-1.yaml] [--other examples/webapp-2.yaml]
                                              [--store DIR]
    .venv/bin/python bench/reproducibility.py --compare A.squashfs B.squashfs

Builds the release twice (diskimage-builder cache warm after the first), mounts both squashfs
images and compares every file (content and metadata), then measures how many bytes of the second
image are new relative to the first, by casync's content-defined chunks (what delta staging sends)
and by fixed 128 KiB blocks. Needs root and casync. Prints figures; asserts nothing.
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
from imagetool.chunks import read_index  # noqa: E402
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


def casync_chunks(image: Path, chunk_store: Path) -> list:
    """The image's content-defined chunks as casync cuts them (~64 KiB average): what delta
    staging (imagetool/chunks.py) sends a node that lacks them."""
    index = chunk_store / f"{image.name}.{os.getpid()}.caibx"
    subprocess.run(["casync", "make", f"--store={chunk_store / 'chunks'}", str(index), str(image)],
                   check=True, stdout=subprocess.DEVNULL)
    try:
        return read_index(index)
    finally:
        index.unlink()


def new_bytes(a: Path, b: Path) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        seen = {c.id for c in casync_chunks(a, Path(tmp))}
        cdc_new = sum(c.size for c in casync_chunks(b, Path(tmp)) if c.id not in seen)
    da, db = a.read_bytes(), b.read_bytes()
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
    ap.add_argument("--store", help="directory for the two builds' stores (default: a temporary one, removed)")
    ap.add_argument("--compare", nargs=2, metavar=("A.squashfs", "B.squashfs"),
                    help="only compare two existing images, no builds")
    args = ap.parse_args()
    if args.compare:
        compare(Path(args.compare[0]), Path(args.compare[1]), "given images")
        return
    release = load_release(args.release)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        scratch = Path(args.store or tmp)
        stores = [Store(scratch / "a"), Store(scratch / "b")]
        images = []
        for i, store in enumerate(stores):
            t = time.monotonic()
            images.append(build(release, store, BuildOptions(force=True)).squashfs)
            print(f"build {i + 1} of {release.id}: {time.monotonic() - t:.0f}s")
        compare(images[0], images[1], "same release built twice")
        if args.other:
            other = load_release(args.other)
            t = time.monotonic()
            img = build(other, stores[0], BuildOptions(force=True)).squashfs
            print(f"build of {other.id}: {time.monotonic() - t:.0f}s")
            compare(images[0], img, "next release")


if __name__ == "__main__":
    main()
