"""Chunks of images, for delta staging: a node is sent only the chunks of an image that none of its
images holds.

The engine and the format are casync's (the one RAUC uses for its adaptive updates): the
controller cuts each image of the store into content-defined chunks (about 64 KiB on average,
zstd-compressed, named by their digest) kept in one chunk store beside the releases, with one
index (.caibx) per image. A node says which images it holds (stage-info); every one the store
knows by the same sha256 is a seed. The chunks of the new image that no seed has, with the
image's index, travel as one tar (so a cut transfer resumes like an image does), and the node's
`casync extract --seed=...` rebuilds the image from its seeds and those chunks. What comes out is
checked against the signed manifest by stage-commit, like any transfer.

A squashfs is delta-friendly when its build is reproducible and its parameters do not change:
one file added to a 300 MB image changes about 0.2% of its chunks.

Only this module knows the index format, and only to compute which chunks a node lacks.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imagetool.errors import ImagetoolError, InputError
from imagetool.store import StoredRelease
from imagetool.systools import require

# Beside the releases: .casync/chunks (the chunk store), .casync/index/<sha256>.caibx,
# .casync/packs/<what>.tar (one per target and seed set, shared by nodes holding the same images).
CASYNC_DIR = ".casync"
# A delta this close to the image's size is not worth the node's casync run: send the image.
WORTH_IT = 0.9

_HEADER = 48 + 16  # index header, then the table header
_ITEM = struct.Struct("<Q32s")  # end offset of the chunk in the blob, chunk id
_TAIL = 40


@dataclass(frozen=True)
class Chunk:
    id: str  # hex digest, the chunk's file name in the store
    size: int  # uncompressed


def read_index(path: Path) -> list[Chunk]:
    """The chunks of a casync blob index, in blob order."""
    data = path.read_bytes()
    body = data[_HEADER:-_TAIL]
    if len(data) < _HEADER + _TAIL or len(body) % _ITEM.size:
        raise ImagetoolError(f"{path}: not a casync blob index")
    chunks, start = [], 0
    for end, digest in _ITEM.iter_unpack(body):
        chunks.append(Chunk(digest.hex(), end - start))
        start = end
    return chunks


def chunk_file(store: Path, chunk_id: str) -> Path:
    return store / chunk_id[:4] / f"{chunk_id}.cacnk"


@dataclass
class DeltaPlan:
    """What one node is sent for one image: `pack` (index and missing chunks) and the seeds the
    node takes the rest from."""

    pack: Path
    seeds: list[str]
    image_size: int
    new_bytes: int  # uncompressed size of the chunks that travel
    chunks: int
    new_chunks: int

    @property
    def pack_bytes(self) -> int:
        return self.pack.stat().st_size

    @property
    def name(self) -> str:
        return self.pack.name


class ChunkStore:
    """The store's casync side: indexes and chunks of its images, and the packs made of them."""

    def __init__(self, store_dir: Path) -> None:
        self.root = store_dir / CASYNC_DIR
        self.chunks = self.root / "chunks"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def index(self, release: StoredRelease) -> Path:
        """The image's index, chunking it into the store the first time (a few seconds a GB)."""
        sha = release.manifest.image.sha256
        path = self.root / "index" / f"{sha}.caibx"
        if path.exists():
            return path
        require("casync")
        with self._locked():
            if path.exists():
                return path
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.caibx")
            done = subprocess.run(["casync", "make", f"--store={self.chunks}", str(tmp), str(release.squashfs_path)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise ImagetoolError(f"casync make {release.squashfs_path} failed: {done.stderr.strip()[-400:]}")
            os.replace(tmp, path)
        return path

    def plan(self, release: StoredRelease, seeds: Sequence[StoredRelease]) -> DeltaPlan | None:
        """The delta from `seeds` to `release`, or None when it would not be smaller than the image."""
        index = self.index(release)
        target = read_index(index)
        have: set[str] = set()
        for seed in seeds:
            have.update(c.id for c in read_index(self.index(seed)))
        sizes = {c.id: c.size for c in target}
        missing = sorted(cid for cid in sizes if cid not in have)
        new_bytes = sum(sizes[cid] for cid in missing)
        # Chunk files in a tar: 512 bytes of header each, padded to 512.
        estimate = sum(1024 + chunk_file(self.chunks, c).stat().st_size for c in missing)
        if estimate >= WORTH_IT * release.manifest.image.size:
            return None
        digest = hashlib.sha256("\n".join(missing).encode()).hexdigest()[:32]
        pack = self._pack(release, index, missing, digest)
        if pack.stat().st_size >= WORTH_IT * release.manifest.image.size:
            return None
        return DeltaPlan(pack, sorted(s.id for s in seeds), release.manifest.image.size, new_bytes,
                         len(target), len(missing))

    def _pack(self, release: StoredRelease, index: Path, missing: list[str], digest: str) -> Path:
        """One tar per target and chunk set, byte for byte the same every time it is made, so a
        transfer cut short resumes into the same file."""
        pack = self.root / "packs" / f"{release.id}.delta-{digest}.tar"
        if pack.exists():
            return pack
        with self._locked():
            if pack.exists():
                return pack
            pack.parent.mkdir(parents=True, exist_ok=True)
            tmp = pack.with_name(f".{pack.name}.{os.getpid()}")
            with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
                tar.add(index, "index.caibx", filter=_plain)
                for chunk_id in missing:
                    tar.add(chunk_file(self.chunks, chunk_id), f"{chunk_id[:4]}/{chunk_id}.cacnk", filter=_plain)
            os.replace(tmp, pack)
        return pack


_SOURCE_RE = re.compile(r"^https?://[A-Za-z0-9.\[\]:-]+(/[A-Za-z0-9._~%/+-]*)?$")


def check_source(url: str) -> str:
    """A store URL nodes can read: http(s)://HOST[:PORT][/PATH], nothing a shell or casync could
    take for something else. Returned without a trailing slash."""
    if not isinstance(url, str) or not _SOURCE_RE.match(url):
        raise InputError(f"store URL {str(url)[:200]!r} is not http:// or https://HOST[:PORT][/PATH]")
    return url.rstrip("/")


@dataclass
class Published:
    release: str
    to: Path
    chunks: int
    new_chunks: int  # chunk files this publish added to the directory
    new_bytes: int

    def to_dict(self) -> dict[str, object]:
        return {"release": self.release, "to": str(self.to), "chunks": self.chunks, "new_chunks": self.new_chunks,
                "new_bytes": self.new_bytes}


def publish(release: StoredRelease, to: Path) -> Published:
    """Lay `release` out in `to` for nodes that read it with plain HTTP GETs (any static server,
    CDN or bucket): chunks/ (casync's chunk store, shared by every release published there),
    <id>.caibx, <id>.manifest.json and <id>.sig. Chunks first and the manifest last, each file
    renamed into place, so a node never sees an index whose chunks are not all there yet."""
    chunk_store = ChunkStore(release.squashfs_path.parent)
    index = chunk_store.index(release)
    chunks = read_index(index)
    new_chunks = new_bytes = 0
    for chunk_id in sorted({c.id for c in chunks}):
        target = chunk_file(to / "chunks", chunk_id)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy_into_place(chunk_file(chunk_store.chunks, chunk_id), target)
        new_chunks += 1
        new_bytes += target.stat().st_size
    _copy_into_place(index, to / f"{release.id}.caibx")
    if release.sig_path is not None:
        _copy_into_place(release.sig_path, to / f"{release.id}.sig")
    _copy_into_place(release.manifest_path, to / f"{release.id}.manifest.json")
    return Published(release.id, to, len(chunks), new_chunks, new_bytes)


def _copy_into_place(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    info.mode = 0o644
    return info
