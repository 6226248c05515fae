"""Build a release: diskimage-builder makes the root tree, imagetool makes the squashfs and manifest.

The squashfs is made here rather than by diskimage-builder so that compression, block size, file
order and timestamps are ours: two builds of the same inputs should differ as little as possible,
which is what makes delta transfer worth anything.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from imagetool.errors import AlreadyExistsError, BuildError, HostSetupError, NotFoundError
from imagetool.layout import image_file_names
from imagetool.manifest import BuilderInfo, ImageInfo, KeyInfo, Manifest, Package, parse_dpkg_manifest, sha256_file
from imagetool.release import Release, SquashfsOptions, effective_mirrors
from imagetool.signing import load_trusted_keys, sign_file
from imagetool.store import Store, StoredRelease
from imagetool.systools import disk_image_create, require, require_root

# This project's own elements, added to every build.
PROJECT_ELEMENTS = ["imagetool-readonly-root", "imagetool-node", "imagetool-health", "imagetool-boot"]

# Files in the built tree that differ between two builds of the same inputs and that nothing on a
# node reads (the node's own /var hides the image's /var at run time). Removing them keeps deltas
# small; what still differs is measured by bench/reproducibility.py.
BUILD_NOISE = [
    "var/log/*",
    "var/cache/apt/*.bin",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/lib/apt/lists/*",
    "var/cache/ldconfig/aux-cache",
    "etc/dib-manifests/dib_environment",
    "etc/dib-manifests/dib_arguments",
    "lost+found",
    # Device nodes diskimage-builder's chroot left behind (a build's /dev/loopN): the boot path
    # mounts /dev.
    "dev/*",
]

Progress = Callable[[str, str], None]  # (step, detail)


def elements_dir() -> Path:
    """The project's elements: $IMAGETOOL_ELEMENTS; else the copy an installed wheel carries inside
    the package (imagetool/elements/); else elements/ at the top of a checkout (editable install)."""
    explicit = os.environ.get("IMAGETOOL_ELEMENTS")
    package = Path(__file__).resolve().parent
    candidates = [Path(explicit)] if explicit else []
    candidates += [package / "elements", package.parent / "elements"]
    for c in candidates:
        if (c / "imagetool-node").is_dir():
            return c
    raise HostSetupError(
        f"imagetool's elements not found (looked in {', '.join(map(str, candidates))}); set IMAGETOOL_ELEMENTS"
    )


@dataclass
class BuildOptions:
    force: bool = False
    sign_key: Path | None = None
    work_dir: Path | None = None  # where diskimage-builder's output and the root tree go
    keep_work: bool = False


def dib_environment(release: Release, elements: Path) -> dict[str, str]:
    """The environment disk-image-create runs in (pure: tested against exact values)."""
    mirrors = effective_mirrors(release)
    release_json = {
        "name": release.name,
        "version": release.version,
        "services": list(release.services),
        "release_sha256": hashlib.sha256(release.path.read_bytes()).hexdigest(),
    }
    env = {
        "DIB_RELEASE": release.base.release,
        "DIB_DISTRIBUTION_MIRROR": mirrors.distribution or "",
        "ELEMENTS_PATH": ":".join([str(elements), *(str(p) for p in release.element_paths)]),
        "IMAGETOOL_RELEASE_JSON": json.dumps(release_json, sort_keys=True),
        "IMAGETOOL_SERVICES": " ".join(release.services),
        "IMAGETOOL_HEALTH_CHECKS": json.dumps(
            [{"name": h.name, "command": h.command, "timeout": h.timeout} for h in release.health_checks]
        ),
        # The keys' contents, not their paths: the element's install.d runs inside the chroot.
        "IMAGETOOL_TRUSTED_KEYS": json.dumps(
            {name: path.read_text() for name, path in release.trusted_keys.items()}, sort_keys=True
        ),
    }
    if release.base.distribution == "debian" and mirrors.security:
        env["DIB_DEBIAN_SECURITY_MIRROR"] = mirrors.security
    if release.source_date_epoch is not None:
        env["SOURCE_DATE_EPOCH"] = str(release.source_date_epoch)
    env.update(release.environment)
    return env


def dib_command(release: Release, output: Path) -> list[str]:
    argv = [disk_image_create(), "-t", "tar", "-o", str(output), "--no-tmpfs"]
    if release.packages:
        argv += ["-p", ",".join(release.packages)]
    argv += [*release.dib_elements, *PROJECT_ELEMENTS]
    return argv


def squashfs_command(tree: Path, output: Path, sq: SquashfsOptions, epoch: int | None) -> list[str]:
    argv = ["mksquashfs", str(tree), str(output), "-noappend", "-comp", sq.compression, "-b", str(sq.block_size)]
    if sq.compression in ("zstd", "xz", "gzip") and sq.level is not None:
        flag = {"zstd": "-Xcompression-level", "gzip": "-Xcompression-level", "xz": "-Xdict-size"}[sq.compression]
        if sq.compression != "xz":
            argv += [flag, str(sq.level)]
    if epoch is not None:
        argv += ["-mkfs-time", str(epoch)]
    argv += ["-processors", str(os.cpu_count() or 1), "-no-progress"]
    return argv


def source_date_epoch(release: Release) -> int | None:
    if release.source_date_epoch is not None:
        return release.source_date_epoch
    env = os.environ.get("SOURCE_DATE_EPOCH")
    return int(env) if env and env.isdigit() else None


def clamp_mtimes(tree: Path, epoch: int) -> int:
    """Clamp every timestamp newer than SOURCE_DATE_EPOCH to it; older ones (from packages) stay."""
    changed = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [*dirnames, *filenames, ""]:
            path = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(path)
            if st.st_mtime > epoch:
                os.utime(path, (epoch, epoch), follow_symlinks=False)
                changed += 1
    return changed


def clamp_pyc_source_times(tree: Path, epoch: int) -> int:
    """Keep timestamp-checked .pyc files valid when clamp_mtimes clamps their sources.

    Such a .pyc records its source's mtime and size, and Python recompiles the module when the
    source's differ. Packages built after SOURCE_DATE_EPOCH (Python's own standard library, for
    one) ship sources newer than the epoch; clamping them made their .pyc stale, so every Python
    process on a node (the node helper, health checks) recompiled what it imports, in memory, on
    a read-only root. A .pyc that matched its source gets the clamped time too; one that did not
    stays as it was (stale either way). Returns the number of .pyc files changed.
    """
    changed = 0
    for pyc in tree.rglob("__pycache__/*.pyc"):
        if pyc.is_symlink() or not pyc.is_file():
            continue
        try:
            source = Path(importlib.util.source_from_cache(str(pyc)))
            src = os.lstat(source)
        except (ValueError, OSError):
            continue
        with open(pyc, "r+b") as f:
            header = f.read(16)
            if len(header) < 16:
                continue
            flags, mtime, size = struct.unpack("<III", header[4:16])
            if flags != 0 or mtime <= epoch:  # hash-checked, or not clamped
                continue
            if mtime != int(src.st_mtime) & 0xFFFFFFFF or size != src.st_size & 0xFFFFFFFF:
                continue
            f.seek(8)
            f.write(struct.pack("<I", epoch))
            changed += 1
    return changed


# The shadow files whose "last password change" field is the day the account was made.
SHADOW_FILES = ("etc/shadow", "etc/shadow-")


def clamp_password_dates(tree: Path, epoch: int) -> int:
    """Clamp each account's last-change day (shadow's third field) to SOURCE_DATE_EPOCH's day.

    The accounts debootstrap makes carry the build's own day: diskimage-builder runs debootstrap
    through `sudo sh -c`, which drops SOURCE_DATE_EPOCH, so passwd stamps today (accounts that
    packages add later, in the chroot, get the epoch's day). Two builds on different days would
    otherwise differ in /etc/shadow. Returns the number of entries changed.
    """
    day = epoch // 86400
    changed = 0
    for rel in SHADOW_FILES:
        path = tree / rel
        if not path.is_file() or path.is_symlink():
            continue
        lines = path.read_bytes().split(b"\n")
        for i, line in enumerate(lines):
            fields = line.split(b":")
            if len(fields) >= 3 and fields[2].isdigit() and int(fields[2]) > day:
                fields[2] = str(day).encode()
                lines[i] = b":".join(fields)
                changed += 1
        with open(path, "r+b") as f:  # in place: the file keeps its owner and mode
            f.write(b"\n".join(lines))
            f.truncate()
    return changed


# diskimage-builder's tar leaves out the API filesystems' mount points; a root needs them.
MOUNT_POINTS = {"proc": 0o555, "sys": 0o555, "dev": 0o755, "run": 0o755, "tmp": 0o1777, "var": 0o755}


def ensure_mount_points(tree: Path) -> None:
    for name, mode in MOUNT_POINTS.items():
        p = tree / name
        if not p.exists():
            p.mkdir()
            os.chmod(p, mode)


def remove_build_noise(tree: Path) -> list[str]:
    removed = []
    for pattern in BUILD_NOISE:
        for p in tree.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(str(p.relative_to(tree)))
    return removed


def _run_logged(argv: list[str], log: Path, env: dict[str, str], progress: Progress, step: str) -> None:
    """Run a long step with its output appended to the build log; progress shows its latest phase."""
    with open(log, "ab") as logf:
        logf.write(f"\n$ {' '.join(argv)}\n".encode())
        logf.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                logf.write(line)
                text = line.decode(errors="replace").strip()
                m = re.search(r"Running hooks from .*/hooks/(\S+)", text) or re.search(r"Running (\S+\.d)", text)
                if m:
                    progress(step, m.group(1))
            rc = proc.wait()
        except BaseException:
            # Ctrl-C reaches diskimage-builder too (same process group); give it time to unmount.
            try:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=120)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                proc.kill()
                proc.wait()
            raise
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise BuildError(f"{step} failed (exit status {rc}); last lines of {log}:\n" + "\n".join(tail))


def build(release: Release, store: Store, options: BuildOptions | None = None,
          progress: Progress | None = None) -> StoredRelease:
    """Build `release` into `store`. The store gains the release completely or not at all."""
    options = options or BuildOptions()
    progress = progress or (lambda step, detail: None)
    require_root("imagetool build")
    require("debootstrap", "mksquashfs", "sudo", "tar")
    if store.has(release.id) and not options.force:
        raise AlreadyExistsError(f"release {release.id} already in store {store.path}; use --force to rebuild it")
    if options.sign_key is not None and not Path(options.sign_key).exists():
        raise NotFoundError(f"--sign-key {options.sign_key}: no such file")
    # Each an Ed25519 public key, now rather than in an image nodes then trust.
    load_trusted_keys(list(release.trusted_keys.values()))
    elements = elements_dir()
    env = {**os.environ, **dib_environment(release, elements)}
    epoch = source_date_epoch(release)

    with _build_lock(progress):
        return _build_locked(release, store, options, progress, env, epoch)


@contextlib.contextmanager
def _build_lock(progress: Progress) -> Iterator[None]:
    """One build at a time per machine: diskimage-builder's caches (apt archives, debootstrap
    tarballs in ~/.cache/image-create) are shared, and apt refuses to share its lock."""
    path = Path(os.environ.get("IMAGETOOL_BUILD_LOCK", "/var/lock/imagetool-build.lock"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("waiting", f"for another build on this machine ({path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _build_locked(release: Release, store: Store, options: BuildOptions, progress: Progress,
                  env: dict[str, str], epoch: int | None) -> StoredRelease:
    base = options.work_dir or Path(os.environ.get("IMAGETOOL_WORKDIR", "/var/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"imagetool-build-{release.id}-", dir=base))
    log = work / "build.log"
    started = time.monotonic()
    try:
        with store.staging(release.id) as staging:
            progress("diskimage-builder", "starting")
            _run_logged(dib_command(release, work / "image"), log, env, progress, "diskimage-builder")
            dib_seconds = time.monotonic() - started

            progress("unpack", "root tree")
            tree = work / "root"
            tree.mkdir()
            _run_logged(
                ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", str(work / "image.tar"),
                 "-C", str(tree)],
                log, env, progress, "unpack")
            (work / "image.tar").unlink()
            remove_build_noise(tree)
            ensure_mount_points(tree)
            if epoch is not None:
                clamp_password_dates(tree, epoch)
                clamp_pyc_source_times(tree, epoch)  # before clamp_mtimes: it compares with the sources
                clamp_mtimes(tree, epoch)

            progress("squashfs", release.squashfs.compression)
            sq_started = time.monotonic()
            # mksquashfs refuses SOURCE_DATE_EPOCH together with -mkfs-time; we pass the time explicitly.
            sq_env = {k: v for k, v in env.items() if k != "SOURCE_DATE_EPOCH"}
            _run_logged(squashfs_command(tree, staging.squashfs_path, release.squashfs, epoch), log, sq_env, progress,
                        "squashfs")
            sq_seconds = time.monotonic() - sq_started

            progress("manifest", "sha256")
            dpkg = work / "image.d" / "dib-manifests" / "dib-manifest-dpkg-image"
            packages = parse_dpkg_manifest(dpkg) if dpkg.exists() else []
            if not packages:
                raise BuildError(f"diskimage-builder wrote no package list ({dpkg}); see {log}")
            manifest = make_manifest(release, staging.squashfs_path, packages, epoch,
                                     [*release.dib_elements, *PROJECT_ELEMENTS])
            staging.manifest_path.write_bytes(manifest.to_json())
            if options.sign_key is not None:
                progress("sign", str(options.sign_key))
                staging.sig_path.write_bytes(sign_file(staging.manifest_path, options.sign_key))
            with open(log, "a") as f:
                f.write(f"\nimagetool: diskimage-builder {dib_seconds:.1f}s, squashfs {sq_seconds:.1f}s, "
                        f"total {time.monotonic() - started:.1f}s\n")
            shutil.copyfile(log, staging.log_path)
            progress("store", str(store.path))
            return staging.commit(force=options.force)
    except BaseException as e:
        # The store is untouched (staging removed itself); keep the log where the operator can read it.
        if not log.exists():
            raise
        kept = base / f"imagetool-build-{release.id}.failed.log"
        shutil.copyfile(log, kept)
        if isinstance(e, BuildError):
            raise BuildError(str(e).replace(str(log), str(kept))) from None
        raise
    finally:
        if not options.keep_work:
            shutil.rmtree(work, ignore_errors=True)


def make_manifest(release: Release, squashfs: Path, packages: list[Package], epoch: int | None,
                  elements: list[str]) -> Manifest:
    return Manifest(
        name=release.name,
        version=release.version,
        description=release.description,
        built_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        source_date_epoch=epoch,
        release_sha256=hashlib.sha256(release.path.read_bytes()).hexdigest(),
        builder=BuilderInfo(
            imagetool=_version("imagetool"),
            diskimage_builder=_version("diskimage-builder"),
            python=platform.python_version(),
            host=platform.node(),
        ),
        base=release.base,
        mirrors=effective_mirrors(release),
        elements=tuple(elements),
        environment=dict(release.environment),
        squashfs=release.squashfs,
        packages=tuple(sorted(packages, key=lambda p: (p.name, p.arch))),
        services=release.services,
        health_checks=release.health_checks,
        image=ImageInfo(file=image_file_names(release.id)["squashfs"],
                        size=squashfs.stat().st_size, sha256=sha256_file(squashfs)),
        trusted_keys=tuple(KeyInfo(name=name, sha256=sha256_file(path))
                           for name, path in sorted(release.trusted_keys.items())),
    )


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"
