"""The local release store: a flat directory of built releases.

    <store>/<id>.squashfs  <id>.manifest.json  <id>.sig (optional)  <id>.build.log (optional)

A release is in the store iff its manifest is: the manifest is renamed into place last, so a
build that dies half-way leaves at most files that `list` and `get` do not see. Builds write into
`<store>/.incoming/<id>.<pid>.<random>/` (same filesystem, so the final renames are atomic).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imagetool.errors import AlreadyExistsError, ImagetoolError, NotFoundError, VerificationError
from imagetool.layout import MANIFEST_SUFFIX, SQUASHFS_SUFFIX, image_file_names
from imagetool.manifest import Manifest, load_manifest
from imagetool.names import check_release_id
from imagetool.systools import pid_alive
from imagetool.versions import version_key

STORE_ENV = "IMAGETOOL_STORE"
INCOMING = ".incoming"
# A release's files are named as on the nodes (imagetool.layout), plus the build's log.
LOG_SUFFIX = ".build.log"


def default_store_path(explicit: str | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get(STORE_ENV)
    if env:
        return Path(env)
    return Path("releases")


@dataclass(frozen=True)
class StoredRelease:
    id: str
    manifest: Manifest
    squashfs_path: Path
    manifest_path: Path
    sig_path: Path | None
    log_path: Path | None

    # Short spellings, as the CLI uses them.
    @property
    def squashfs(self) -> Path:
        return self.squashfs_path

    @property
    def sig(self) -> Path | None:
        return self.sig_path

    @property
    def log(self) -> Path | None:
        return self.log_path


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _beside(directory: Path, rid: str) -> tuple[Path, Path, Path, Path]:
    names = image_file_names(rid)
    return (
        directory / names["squashfs"],
        directory / names["manifest"],
        directory / names["sig"],
        directory / f"{rid}{LOG_SUFFIX}",
    )


def _stored(rid: str, manifest: Manifest, directory: Path) -> StoredRelease:
    squashfs, man, sig, log = _beside(directory, rid)
    return StoredRelease(
        id=rid,
        manifest=manifest,
        squashfs_path=squashfs,
        manifest_path=man,
        sig_path=sig if sig.exists() else None,
        log_path=log if log.exists() else None,
    )


class Staging:
    """A private directory where one build writes its files before they enter the store."""

    def __init__(self, store: Store, release_id: str, path: Path) -> None:
        self.store = store
        self.release_id = release_id
        self.path = path
        self.committed = False
        self.squashfs_path, self.manifest_path, self.sig_path, self.log_path = _beside(path, release_id)

    def commit(self, force: bool = False) -> StoredRelease:
        if not self.squashfs_path.exists():
            raise ImagetoolError(f"{self.squashfs_path}: staged image is missing; nothing to commit")
        manifest = load_manifest(self.manifest_path)
        if manifest.id != self.release_id:
            raise VerificationError(
                f"{self.manifest_path}: describes release {manifest.id}, not {self.release_id}"
            )
        store_dir = self.store.path
        dest_squashfs, dest_manifest, dest_sig, dest_log = _beside(store_dir, self.release_id)
        with self.store._lock():
            exists = dest_manifest.exists()
            if exists and not force:
                raise AlreadyExistsError(
                    f"release {self.release_id} already in store {store_dir}; use --force to rebuild it"
                )
            staged = [p for p in (self.log_path, self.squashfs_path, self.sig_path, self.manifest_path) if p.exists()]
            for p in staged:
                _fsync_file(p)
            if exists:
                # Take the old release out first: while files are swapped it is absent rather
                # than an old manifest describing a new image.
                dest_manifest.unlink()
                _fsync_dir(store_dir)
            for src, dest in ((self.log_path, dest_log), (self.squashfs_path, dest_squashfs),
                              (self.sig_path, dest_sig)):
                if src.exists():
                    os.replace(src, dest)
                elif dest.exists():
                    # A leftover log or signature from an earlier build would describe another image.
                    dest.unlink()
            os.replace(self.manifest_path, dest_manifest)
            _fsync_dir(store_dir)
        self.committed = True
        return _stored(self.release_id, manifest, store_dir)


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    @contextmanager
    def _lock(self) -> Iterator[None]:
        # Two builds of the same release committing at once must not interleave their renames.
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def list(self) -> list[StoredRelease]:
        releases: list[StoredRelease] = []
        try:
            entries = sorted(self.path.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        for entry in entries:
            name = entry.name
            if name.startswith(".") or not name.endswith(MANIFEST_SUFFIX):
                continue
            rid = name[: -len(MANIFEST_SUFFIX)]
            try:
                check_release_id(rid)
                manifest = load_manifest(entry)
            except (ImagetoolError, OSError, ValueError):
                continue
            if manifest.id != rid:
                continue
            releases.append(_stored(rid, manifest, self.path))
        releases.sort(key=lambda r: (r.manifest.name, version_key(r.manifest.version)))
        return releases

    def has(self, release_id: str) -> bool:
        check_release_id(release_id)
        return (self.path / f"{release_id}{MANIFEST_SUFFIX}").exists()

    def get(self, release_id: str) -> StoredRelease:
        check_release_id(release_id)
        path = self.path / f"{release_id}{MANIFEST_SUFFIX}"
        if not path.exists():
            raise NotFoundError(
                f"release {release_id} is not in store {self.path}; `imagetool images list` shows what is"
            )
        manifest = load_manifest(path)
        if manifest.id != release_id:
            raise VerificationError(f"{path}: describes release {manifest.id}, not {release_id}")
        return _stored(release_id, manifest, self.path)

    def _clean_stale(self, incoming: Path) -> None:
        for entry in incoming.iterdir():
            parts = entry.name.rsplit(".", 2)
            if len(parts) != 3 or not parts[1].isdigit():
                continue
            if not pid_alive(int(parts[1])):
                shutil.rmtree(entry, ignore_errors=True)

    @contextmanager
    def staging(self, release_id: str) -> Iterator[Staging]:
        check_release_id(release_id)
        incoming = self.path / INCOMING
        incoming.mkdir(parents=True, exist_ok=True)
        self._clean_stale(incoming)
        path = Path(tempfile.mkdtemp(prefix=f"{release_id}.{os.getpid()}.", dir=incoming))
        try:
            yield Staging(self, release_id, path)
        finally:
            # Runs on success, on errors and on KeyboardInterrupt alike: after a commit only the
            # empty directory is left; without one, nothing reached the store.
            shutil.rmtree(path, ignore_errors=True)


def resolve_release(store: Store, ref: str) -> StoredRelease:
    """A release id in the store, or a path to a .manifest.json or .squashfs in any directory."""
    is_path = ref.endswith((MANIFEST_SUFFIX, SQUASHFS_SUFFIX)) or os.sep in ref
    if not is_path:
        return store.get(ref)
    path = Path(ref)
    if path.name.endswith(MANIFEST_SUFFIX):
        rid = path.name[: -len(MANIFEST_SUFFIX)]
    elif path.name.endswith(SQUASHFS_SUFFIX):
        rid = path.name[: -len(SQUASHFS_SUFFIX)]
    else:
        raise NotFoundError(f"{ref}: expected a release id, a .manifest.json or a .squashfs file")
    check_release_id(rid, where=str(path))
    if not path.exists():
        raise NotFoundError(f"{path}: does not exist")
    directory = path.parent
    manifest_path = directory / f"{rid}{MANIFEST_SUFFIX}"
    if not manifest_path.exists():
        raise NotFoundError(f"{manifest_path}: no manifest beside {path}")
    manifest = load_manifest(manifest_path)
    if manifest.id != rid:
        raise VerificationError(f"{manifest_path}: describes release {manifest.id}, not {rid}")
    found = _stored(rid, manifest, directory)
    if not found.squashfs_path.exists():
        raise NotFoundError(f"{found.squashfs_path}: no image beside {manifest_path}")
    return found
