"""The host tools imagetool drives, and the Debian packages that provide them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from imagetool.errors import HostSetupError, ImagetoolError

PACKAGES = {
    "debootstrap": "debootstrap",
    "mksquashfs": "squashfs-tools",
    "unsquashfs": "squashfs-tools",
    "sudo": "sudo",
    "systemd-nspawn": "systemd-container",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "scp": "openssh-client",
    "ip": "iproute2",
    "mount": "mount",
    "losetup": "mount",
    "tar": "tar",
    "zstd": "zstd",
    "casync": "casync",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.fat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "sgdisk": "gdisk",
    "grub-mkimage": "grub-common",
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
}


def require(*tools: str) -> dict[str, str]:
    """Return the path of each tool, or fail naming the package that provides the missing ones."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for tool in tools:
        path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
        if path is None:
            missing.append(tool)
        else:
            found[tool] = path
    if missing:
        pkgs = sorted({PACKAGES.get(t, t) for t in missing})
        raise HostSetupError(
            f"missing system tool(s): {', '.join(missing)}; install with: "
            f"apt-get install {' '.join(pkgs)} (or run scripts/setup)"
        )
    return found


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise HostSetupError(f"{what} needs root (it mounts filesystems and creates network namespaces)")


def disk_image_create() -> str:
    """diskimage-builder's entry point, preferring the one installed beside this Python."""
    beside = Path(sys.executable).parent / "disk-image-create"
    if beside.exists():
        return str(beside)
    path = shutil.which("disk-image-create")
    if path is None:
        raise HostSetupError("disk-image-create not found; install diskimage-builder (pip install -e .)")
    return path


def pid_alive(pid: int) -> bool:
    """Is process `pid` alive on this machine? (Permission denied still means it exists.)"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_tool(argv: list[str], check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a system tool, output captured; a failure (with check) or a missing tool is an error
    that quotes the command and what it said."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    except FileNotFoundError:
        raise HostSetupError(f"missing system tool {argv[0]}") from None
    if check and r.returncode != 0:
        said = (r.stderr or r.stdout).strip()
        raise ImagetoolError(f"`{' '.join(argv)}` failed (exit status {r.returncode}): {said}")
    return r
