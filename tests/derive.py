"""Variants of a built release for failure tests: a real image, unpacked, changed, repacked.

A full diskimage-builder build per broken variant would cost minutes each; these take seconds and
still boot as real images on lab nodes (same systemd, same sshd, same node helper).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from imagetool.build import squashfs_command
from imagetool.manifest import ImageInfo, sha256_file
from imagetool.store import Store, StoredRelease


def derive_release(store: Store, base: StoredRelease, version: str, mutate: Callable[[Path], None]) -> StoredRelease:
    rid = f"{base.manifest.name}-{version}"
    # Derived again whenever the base image was rebuilt.
    stamp = store.path / f".{rid}.base"
    if store.has(rid) and stamp.exists() and stamp.read_text() == base.manifest.image.sha256:
        return store.get(rid)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        tree = Path(tmp) / "root"
        subprocess.run(["unsquashfs", "-q", "-n", "-d", str(tree), str(base.squashfs)], check=True,
                       capture_output=True)
        release_json = tree / "etc/imagetool/release.json"
        data = json.loads(release_json.read_text())
        data["version"] = version
        release_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        mutate(tree)
        with store.staging(rid) as staging:
            # Built as the base was (compressor, level, block size, time): a derived image differs
            # from its base in the chunks of what was changed, so delta staging sends just those.
            subprocess.run(squashfs_command(tree, staging.squashfs_path, base.manifest.squashfs,
                                            base.manifest.source_date_epoch) + ["-quiet"],
                           check=True, capture_output=True)
            manifest = dataclasses.replace(
                base.manifest, version=version,
                image=ImageInfo(file=f"{rid}.squashfs", size=staging.squashfs_path.stat().st_size,
                                sha256=sha256_file(staging.squashfs_path)))
            staging.manifest_path.write_bytes(manifest.to_json())
            stored = staging.commit(force=True)
    stamp.write_text(base.manifest.image.sha256)
    return stored


def failing_health_check(tree: Path) -> None:
    """The release's shipped check fails: the service answers, but not what the check wants."""
    check = tree / "usr/lib/imagetool/health.d/webapp-http"
    check.write_text("#!/bin/sh\necho 'webapp answered 503 on /health' >&2\nexit 1\n")
    check.chmod(0o755)


def broken_sshd(tree: Path) -> None:
    """sshd never starts: the controller cannot reach the node on this image."""
    link = tree / "etc/systemd/system/ssh.service"
    link.unlink(missing_ok=True)
    link.symlink_to("/dev/null")


def broken_boot(tree: Path) -> None:
    """No init at all: the image cannot boot."""
    for p in ("usr/lib/systemd/systemd", "sbin/init", "usr/sbin/init"):
        f = tree / p
        if f.exists() or f.is_symlink():
            f.unlink()
