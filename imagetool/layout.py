"""Where things are on a node, as the host side sees them: the one place that spells it.

The node helper (`imagetool-node`, a stdlib-only file that ships in images) keeps its own copy
of the same layout: that is the node's side. Everything on this side that writes or reads a
node's /var (the lab's seeding and firmware, `imagetool disk`, staging, the local machine of
unit tests and benches) goes through here, and so does the store, whose files are named the
same way.

    /var/lib/imagetool/images/<id>.squashfs|.manifest.json|.sig   installed images
    /var/lib/imagetool/images/.incoming/                           transfers in progress
    /var/lib/imagetool/boot/control.json   {"default": ID, "next": ID|null, ...} (lab boot control)
    /var/lib/imagetool/boot/loader         "grub" or "lab" (absent: lab)
    /var/lib/imagetool/boot/grubenv        GRUB's environment block (grub nodes)
    /var/lib/imagetool/state.json          {"committed": ID, "previous": ID|null, ...}
    /var/lib/imagetool/trusted-keys/*.pem  release signing keys the node trusts
    /etc/imagetool/release.json            inside the image: name, version, services
    /etc/imagetool/trusted-keys/*.pem      inside the image: the keys the release brought

Standard library only: the lab firmware runs it as a separate process.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A release's files, on the node and in the store alike.
SQUASHFS_SUFFIX = ".squashfs"
MANIFEST_SUFFIX = ".manifest.json"
SIG_SUFFIX = ".sig"
IMAGE_SUFFIXES = {"squashfs": SQUASHFS_SUFFIX, "manifest": MANIFEST_SUFFIX, "sig": SIG_SUFFIX}

# On the node, below /var.
STATE_DIR = "lib/imagetool"
NODE_VAR = "/var"
NODE_STATE = posixpath.join(NODE_VAR, STATE_DIR)
NODE_IMAGES = posixpath.join(NODE_STATE, "images")
NODE_INCOMING = posixpath.join(NODE_IMAGES, ".incoming")
# In the image (the read-only root).
RELEASE_JSON = "etc/imagetool/release.json"
IMAGE_TRUSTED_KEYS = "etc/imagetool/trusted-keys"
# The helper trusts only files with this suffix in either trusted-keys directory.
KEY_SUFFIX = ".pem"


def trusted_key_names(paths: list[Path]) -> dict[str, Path]:
    """The file name each key gets in a trusted-keys directory (`x.pub` becomes `x.pem`: the node
    reads only *.pem). Two keys that would get one name are refused rather than one lost."""
    names: dict[str, Path] = {}
    for p in paths:
        p = Path(p)
        name = p.name if p.name.endswith(KEY_SUFFIX) else p.stem + KEY_SUFFIX
        if name.startswith(".") or name == KEY_SUFFIX:
            raise ValueError(f"{p}: a trusted key needs a file name (it is installed under it)")
        if name in names and names[name] != p:
            raise ValueError(f"{p} and {names[name]} would both be installed as {name}; rename one")
        names[name] = p
    return names


def image_file_names(image_id: str) -> dict[str, str]:
    """{"squashfs": "<id>.squashfs", "manifest": "<id>.manifest.json", "sig": "<id>.sig"}"""
    return {kind: image_id + suffix for kind, suffix in IMAGE_SUFFIXES.items()}


def image_paths(directory: str, image_id: str) -> dict[str, str]:
    """The three files of `image_id` in a directory on the node (POSIX paths, as sent there)."""
    base = directory.rstrip("/")
    return {kind: f"{base}/{name}" for kind, name in image_file_names(image_id).items()}


def _write_json(path: Path, data: Any) -> None:
    """Atomically: the helper and the firmware may read the file at any moment."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class NodeVar:
    """A node's /var as a directory on this machine (a lab node's /var, a disk's /var tree, a
    local machine's root/var)."""

    var: Path

    @property
    def state_dir(self) -> Path:
        return self.var / STATE_DIR

    @property
    def images(self) -> Path:
        return self.state_dir / "images"

    @property
    def incoming(self) -> Path:
        return self.images / ".incoming"

    @property
    def boot_dir(self) -> Path:
        return self.state_dir / "boot"

    @property
    def control(self) -> Path:
        return self.boot_dir / "control.json"

    @property
    def loader(self) -> Path:
        return self.boot_dir / "loader"

    @property
    def grubenv(self) -> Path:
        return self.boot_dir / "grubenv"

    @property
    def trial(self) -> Path:
        """Written by the node's dead-man switch at a boot into an image that is not the default."""
        return self.boot_dir / "trial.json"

    @property
    def lock(self) -> Path:
        """The rollout lock: {"rollout", "owner", "command", "time", "token", "holder"} (older
        helpers: "pid", no token or holder)."""
        return self.state_dir / "lock"

    @property
    def state(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def trusted_keys(self) -> Path:
        return self.state_dir / "trusted-keys"

    def install_trusted_keys(self, keys: list[Path]) -> list[str]:
        """Put release signing keys among those the node trusts; returns their names there."""
        names = trusted_key_names(keys)
        self.trusted_keys.mkdir(parents=True, exist_ok=True)
        for name, key in names.items():
            target = self.trusted_keys / name
            shutil.copyfile(key, target)
            target.chmod(0o644)
        return sorted(names)

    def image_file(self, image_id: str, kind: str = "squashfs") -> Path:
        return self.images / image_file_names(image_id)[kind]

    # --- a freshly installed node --------------------------------------------------------

    def make_dirs(self) -> None:
        for d in (self.images, self.boot_dir):
            d.mkdir(parents=True, exist_ok=True)

    def install_image(self, image_id: str, squashfs: Path, manifest: Path, sig: Path | None = None,
                      copy: Callable[[Path, Path], object] = shutil.copyfile) -> None:
        """Put a release's files among the node's installed images (manifest last: an image is
        installed once its manifest is there)."""
        self.images.mkdir(parents=True, exist_ok=True)
        copy(squashfs, self.image_file(image_id, "squashfs"))
        if sig is not None:
            copy(sig, self.image_file(image_id, "sig"))
        copy(manifest, self.image_file(image_id, "manifest"))

    def write_state(self, committed: str, previous: str | None = None) -> None:
        self.state.parent.mkdir(parents=True, exist_ok=True)
        self.state.write_text(json.dumps({"committed": committed, "previous": previous}, indent=2) + "\n")

    # --- control.json: the lab boot backend --------------------------------------------------

    def read_control(self) -> dict[str, Any]:
        data = json.loads(self.control.read_text() or "null")
        if not isinstance(data, dict):
            raise ValueError(f"{self.control} is not a JSON object")
        return data

    def write_lab_control(self, default: str | None, next_id: str | None = None) -> None:
        """Boot control of a lab node: the firmware boots `next` once, else `default`."""
        self.boot_dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.control, {"default": default, "next": next_id})

    def write_grub_control(self) -> None:
        """On GRUB nodes grubenv holds default and next; control.json only the helper's metadata."""
        self.boot_dir.mkdir(parents=True, exist_ok=True)
        self.control.write_text("{}\n")

    def choose_boot(self, log: Callable[[str], None] = lambda msg: None) -> str | None:
        """What a lab node's firmware boots, exactly as a bootloader sees it: the one-shot `next`
        entry, consumed before the boot the way `grub-reboot` does (so a boot that dies falls back
        to the default on the next one), else the default. None: nothing bootable."""
        try:
            ctl = self.read_control()
        except (OSError, ValueError) as e:
            log(f"boot control unreadable ({e}); no bootable image")
            return None
        default, next_ = ctl.get("default"), ctl.get("next")
        if next_:
            ctl["next"] = None
            ctl["last_one_shot"] = next_
            _write_json(self.control, ctl)
            if self.image_file(next_).exists():
                return next_
            log(f"one-shot image {next_} missing; booting default {default}")
        if default and self.image_file(default).exists():
            return default
        log(f"default image {default!r} missing; no bootable image")
        return None
