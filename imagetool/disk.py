"""`imagetool disk`: a release becomes a bootable disk for a real machine (VM, cloud, bare metal).

Layout (GPT):

    1  bios   1 MiB    BIOS boot partition: GRUB's core.img for BIOS machines
    2  esp    63 MiB   EFI system partition (FAT): EFI/BOOT/BOOTX64.EFI and grub/grub.cfg
    3  var    the rest the node's persistent /var (ext4, label imagetool-var): the release as the
                       committed default, GRUB's environment block, the operator's SSH key

GRUB is built here with grub-mkimage, every module it needs inside the image, so the disk is put
together from files (mkfs.ext4 -d, mtools) without loop devices, mounts or a running VM. The
grub.cfg is written once and never per release: it reads the default and the one-shot entry from
the environment block on /var, spends a one-shot entry before loading anything (grub-reboot
semantics), loop-mounts images/<id>.squashfs and boots the kernel and initramfs inside it.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imagetool.errors import HostSetupError, ImagetoolError, InputError
from imagetool.layout import NodeVar, trusted_key_names
from imagetool.release import GRUB_COMPRESSIONS
from imagetool.signing import load_trusted_keys, signed_by
from imagetool.store import StoredRelease
from imagetool.systools import require, run_tool

MiB = 1024**2
SECTOR = 512
BIOS_START = 1 * MiB
BIOS_SIZE = 1 * MiB
ESP_SIZE = 63 * MiB
VAR_START = BIOS_START + BIOS_SIZE + ESP_SIZE  # 65 MiB
GPT_BACKUP = 1 * MiB  # room left at the end for the backup GPT
# /var holds the committed image, the next one being staged, logs and the journal (64 MiB).
VAR_HEADROOM = 512 * MiB
DEFAULT_SIZE = 8 * 1024**3
VAR_LABEL = "imagetool-var"
KERNEL_CONSOLE = "console=tty0 console=ttyS0,115200n8"
PANIC_SECONDS = 10

# Modules built into both GRUB images. squash4 pulls in the decompressors it needs.
GRUB_MODULES = [
    "part_gpt", "part_msdos", "fat", "ext2", "squash4", "loopback", "linux", "normal", "configfile",
    "search", "search_fs_uuid", "search_label", "loadenv", "test", "echo", "sleep", "reboot", "halt",
    "serial", "terminal", "gzio", "xzio", "lzopio",
]
GRUB_PLATFORM_MODULES = {"i386-pc": ["biosdisk"], "x86_64-efi": ["efi_gop", "efi_uga"]}
GRUB_LIB = Path("/usr/lib/grub")

# GRUB's environment block: 1024 bytes, this header, name=value lines, '#' padding.
GRUBENV_SIZE = 1024
GRUBENV_HEADER = b"# GRUB Environment Block\n"

Progress = Callable[[str, str], None]


@dataclass
class DiskOptions:
    output: Path
    format: str = "raw"  # raw | qcow2
    size: int = DEFAULT_SIZE
    authorized_keys: list[Path] = field(default_factory=list)
    trusted_keys: list[Path] = field(default_factory=list)
    # Extra files for the node's /var, path relative to /var -> content (the lab's per-node files).
    var_files: dict[str, bytes] = field(default_factory=dict)
    force: bool = False


@dataclass
class DiskResult:
    path: Path
    format: str
    size: int
    release: str
    var_uuid: str
    partitions: list[dict[str, object]]

    def to_dict(self) -> dict[str, object]:
        return {"path": str(self.path), "format": self.format, "size": self.size, "release": self.release,
                "var_uuid": self.var_uuid, "partitions": self.partitions}


def grubenv_block(variables: dict[str, str]) -> bytes:
    """A GRUB environment block holding `variables` (what grub-editenv would write)."""
    body = GRUBENV_HEADER + b"".join(f"{k}={v}\n".encode() for k, v in variables.items())
    if len(body) > GRUBENV_SIZE:
        raise InputError("GRUB environment block overflow")
    return body + b"#" * (GRUBENV_SIZE - len(body))


def grub_cfg(var_uuid: str) -> str:
    """The one grub.cfg of a node, for its whole life (release ids come from the environment block)."""
    return f"""\
# imagetool: written once by `imagetool disk`; it never changes per release. The node helper
# sets imagetool_default and the one-shot imagetool_next in the environment block on /var.
set timeout=0
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
search --no-floppy --fs-uuid --set=var {var_uuid}
set envfile=($var)/lib/imagetool/boot/grubenv
load_env --file $envfile imagetool_default imagetool_next
set image=$imagetool_default
if [ -n "$imagetool_next" ]; then
    set image=$imagetool_next
    # Spend the one-shot entry before loading anything: if this image hangs or panics, the
    # next reset boots the default (grub-reboot semantics).
    set imagetool_next=
    save_env --file $envfile imagetool_next
fi

# $1: the image id, $2: a name for its loop device (one per attempt).
function imagetool_boot {{
    if ! loopback $2 ($var)/lib/imagetool/images/$1.squashfs; then return 1; fi
    echo "imagetool: booting $1"
    if ! linux ($2)/boot/vmlinuz boot=imagetool imagetool.image=$1 imagetool.var=UUID={var_uuid} ro panic={PANIC_SECONDS} {KERNEL_CONSOLE}; then return 1; fi
    if ! initrd ($2)/boot/initrd.img; then return 1; fi
    boot
}}

imagetool_boot $image first
if [ "$image" != "$imagetool_default" ]; then
    echo "imagetool: cannot boot $image; booting the default $imagetool_default"
    imagetool_boot $imagetool_default fallback
fi
echo "imagetool: cannot boot $imagetool_default; resetting in {PANIC_SECONDS} s"
sleep {PANIC_SECONDS}
reboot
"""  # noqa: E501 - the `linux` line is GRUB's, one command


def early_cfg(esp_volume_id: str) -> str:
    """Built into each GRUB image: find the ESP, where grub.cfg is."""
    return f"search --no-floppy --fs-uuid --set=root {esp_volume_id}\nset prefix=($root)/grub\n"


def preflight() -> None:
    require("mkfs.ext4", "mkfs.fat", "mcopy", "mmd", "sgdisk", "grub-mkimage")
    for platform in GRUB_PLATFORM_MODULES:
        if not (GRUB_LIB / platform / "normal.mod").exists():
            package = {"i386-pc": "grub-pc-bin", "x86_64-efi": "grub-efi-amd64-bin"}[platform]
            raise HostSetupError(f"GRUB for {platform} is not installed ({GRUB_LIB / platform}); "
                                 f"install with: apt-get install {package}")


def check_bootable(release: StoredRelease) -> None:
    """Refuse a release GRUB cannot boot, before anything is written."""
    compression = release.manifest.squashfs.compression
    if compression not in GRUB_COMPRESSIONS:
        raise InputError(f"{release.id}: its squashfs is {compression}-compressed, which GRUB cannot read; rebuild "
                         f"it with `squashfs: {{compression: gzip}}` (GRUB reads {', '.join(GRUB_COMPRESSIONS)})")
    missing = [p for p in ("boot/vmlinuz", "boot/initrd.img") if not _image_has(release.squashfs, p)]
    if missing:
        raise InputError(f"{release.id}: the image has no {' and no '.join('/' + m for m in missing)}, so no machine "
                         "can boot it (build it from a base with a kernel, e.g. debian-minimal, "
                         "with imagetool's elements)")


def _image_has(squashfs: Path, path: str) -> bool:
    r = subprocess.run(["unsquashfs", "-l", "-d", "", str(squashfs), path], capture_output=True, text=True)
    return r.returncode == 0 and any(line.strip() == "/" + path for line in r.stdout.splitlines())


def min_size(release: StoredRelease) -> int:
    image = release.squashfs.stat().st_size
    return VAR_START + 2 * image + VAR_HEADROOM + GPT_BACKUP


def check_trusted_keys(release: StoredRelease, keys: list[Path]) -> None:
    """--trusted-key: each an Ed25519 public key with a name of its own, and the release installed
    signed by one of them, since the node will hold every later release to the same rule."""
    try:
        trusted_key_names(keys)
    except ValueError as e:
        raise InputError(f"--trusted-key: {e}") from None
    sig = release.sig.read_bytes() if release.sig is not None else None
    signed_by(release.manifest_path.read_bytes(), sig, load_trusted_keys(keys),
              f"release {release.id} ({release.manifest_path})", str(release.sig))


def make_disk(release: StoredRelease, options: DiskOptions, progress: Progress | None = None) -> DiskResult:
    """Write a bootable disk for `release` to options.output; nothing is left behind on failure."""
    progress = progress or (lambda step, detail: None)
    if options.format not in ("raw", "qcow2"):
        raise InputError(f"--format {options.format!r}: choose raw or qcow2")
    output = Path(options.output)
    if output.exists() and not options.force:
        raise InputError(f"{output}: already exists; use --force to overwrite it")
    if not output.parent.is_dir():
        raise InputError(f"{output.parent}: no such directory")
    for key in [*options.authorized_keys, *options.trusted_keys]:
        if not Path(key).is_file():
            raise InputError(f"{key}: no such file")
    if options.trusted_keys:
        check_trusted_keys(release, options.trusted_keys)
    needed = min_size(release)
    if options.size < needed:
        raise InputError(f"--size {options.size // MiB} MiB is too small for {release.id}: its image is "
                         f"{release.squashfs.stat().st_size // MiB} MiB, and /var must hold it, the next release "
                         f"and {VAR_HEADROOM // MiB} MiB more; use at least {-(-needed // MiB)} MiB")
    preflight()
    if options.format == "qcow2":
        require("qemu-img")
    check_bootable(release)

    var_uuid = str(uuid.uuid4())
    esp_id = uuid.uuid4().hex[:8].upper()
    esp_volume_id = f"{esp_id[:4]}-{esp_id[4:]}"
    size = options.size // MiB * MiB
    var_size = size - VAR_START - GPT_BACKUP
    with tempfile.TemporaryDirectory(prefix=".imagetool-disk-", dir=output.parent) as tmp:
        work = Path(tmp)
        raw = work / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(size)
        progress("partition", f"{size // MiB} MiB GPT")
        _run(["sgdisk", "-Z", "-a", "2048",
              _gpt_entry(1, BIOS_START, BIOS_SIZE), "-t1:EF02", "-c1:bios",
              _gpt_entry(2, BIOS_START + BIOS_SIZE, ESP_SIZE), "-t2:EF00", "-c2:esp",
              _gpt_entry(3, VAR_START, var_size), "-t3:8300", "-c3:var", str(raw)])

        progress("var", f"{release.id} as the committed default")
        var_tree = work / "var"
        _var_tree(var_tree, release, options)
        # The ext4 is made straight into the disk file at the partition's offset.
        _run(["mkfs.ext4", "-q", "-F", "-L", VAR_LABEL, "-U", var_uuid, "-m", "1", "-d", str(var_tree),
              "-E", f"offset={VAR_START}", str(raw), f"{var_size // 1024}k"])

        progress("grub", "BIOS and UEFI")
        esp = work / "esp.img"
        _make_esp(esp, work, esp_volume_id, var_uuid)
        _write_at(raw, esp, BIOS_START + BIOS_SIZE)
        _install_bios_grub(raw, work, esp_volume_id)

        final = work / "disk.out"
        if options.format == "qcow2":
            progress("qcow2", str(output))
            _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(final)])
            raw.unlink()
        else:
            raw.rename(final)
        os.replace(final, output)
    partitions = [
        {"number": 1, "name": "bios", "start": BIOS_START, "size": BIOS_SIZE},
        {"number": 2, "name": "esp", "start": BIOS_START + BIOS_SIZE, "size": ESP_SIZE, "volume_id": esp_volume_id},
        {"number": 3, "name": "var", "start": VAR_START, "size": var_size, "uuid": var_uuid, "label": VAR_LABEL},
    ]
    return DiskResult(path=output, format=options.format, size=size, release=release.id, var_uuid=var_uuid,
                      partitions=partitions)


def _gpt_entry(number: int, start: int, size: int) -> str:
    """sgdisk's -n with first and last sector (inclusive), so the filesystems fit exactly."""
    return f"-n{number}:{start // SECTOR}:{(start + size) // SECTOR - 1}"


def _var_tree(root: Path, release: StoredRelease, options: DiskOptions) -> None:
    """The node's /var on its first boot: exactly what a node committed to `release` holds."""
    node_var = NodeVar(root)
    node_var.make_dirs()
    # Hard links where the store is on the same filesystem: mkfs.ext4 -d copies the bytes anyway.
    node_var.install_image(release.id, release.squashfs, release.manifest_path, release.sig, copy=_link_or_copy)
    node_var.loader.write_text("grub\n")
    node_var.grubenv.write_bytes(grubenv_block({"imagetool_default": release.id, "imagetool_next": ""}))
    node_var.write_grub_control()
    node_var.write_state(committed=release.id)
    if options.trusted_keys:
        node_var.install_trusted_keys(options.trusted_keys)
    ssh = root / "lib/ssh/authorized_keys"
    ssh.mkdir(parents=True)
    if options.authorized_keys:
        text = "".join(Path(k).read_text().rstrip("\n") + "\n" for k in options.authorized_keys)
        (ssh / "root").write_text(text)
        (ssh / "root").chmod(0o600)
    for rel, content in options.var_files.items():
        target = (root / rel).resolve()
        if root.resolve() not in target.parents:
            raise InputError(f"/var file {rel!r} is outside /var")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        if "ssh_host_" in target.name and not target.name.endswith(".pub"):
            target.chmod(0o600)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _make_esp(esp: Path, work: Path, volume_id: str, var_uuid: str) -> None:
    with open(esp, "wb") as f:
        f.truncate(ESP_SIZE)
    _run(["mkfs.fat", "-F", "32", "-n", "ESP", "-i", volume_id.replace("-", ""), str(esp)])
    efi = work / "BOOTX64.EFI"
    _grub_image("x86_64-efi", efi, work, volume_id)
    cfg = work / "grub.cfg"
    cfg.write_text(grub_cfg(var_uuid))
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    _run(["mmd", "-i", str(esp), "::EFI", "::EFI/BOOT", "::grub"], env=env)
    _run(["mcopy", "-i", str(esp), str(efi), "::EFI/BOOT/BOOTX64.EFI"], env=env)
    _run(["mcopy", "-i", str(esp), str(cfg), "::grub/grub.cfg"], env=env)


def _grub_image(platform: str, output: Path, work: Path, esp_volume_id: str) -> None:
    early = work / f"early-{platform}.cfg"
    early.write_text(early_cfg(esp_volume_id))
    _run(["grub-mkimage", "-O", platform, "-d", str(GRUB_LIB / platform), "-o", str(output), "-p", "/grub",
          "-c", str(early), *GRUB_MODULES, *GRUB_PLATFORM_MODULES[platform]])


# Offsets in GRUB's i386-pc boot.img and diskboot.img (grub-setup's job, done here on a file).
BOOT_KERNEL_SECTOR = 0x5C  # u64: LBA of core.img's first sector
BOOT_DRIVE = 0x64  # u8: 0xff = the drive the BIOS booted from
BOOT_DRIVE_CHECK = 0x66  # a jump that only floppies need; grub-setup turns it into two nops
MBR_KEEP = 0x1B8  # from here on (disk signature, partition table, 0x55aa) the MBR stays as it is
BLOCKLIST = SECTOR - 12  # diskboot.img's first blocklist: u64 start, u16 sectors, u16 segment
CORE_SEGMENT = 0x820


def _install_bios_grub(raw: Path, work: Path, esp_volume_id: str) -> None:
    core = work / "core.img"
    _grub_image("i386-pc", core, work, esp_volume_id)
    data = bytearray(core.read_bytes())
    if len(data) % SECTOR:
        data += b"\0" * (SECTOR - len(data) % SECTOR)
    sectors = len(data) // SECTOR
    if len(data) > BIOS_SIZE:
        raise ImagetoolError(f"GRUB's core.img is {len(data)} bytes, more than the BIOS boot partition holds")
    core_lba = BIOS_START // SECTOR
    # diskboot.img (core.img's first sector) loads the rest from the sectors that follow it.
    struct.pack_into("<QHH", data, BLOCKLIST, core_lba + 1, sectors - 1, CORE_SEGMENT)
    boot = bytearray((GRUB_LIB / "i386-pc/boot.img").read_bytes())
    struct.pack_into("<Q", boot, BOOT_KERNEL_SECTOR, core_lba)
    boot[BOOT_DRIVE] = 0xFF
    boot[BOOT_DRIVE_CHECK:BOOT_DRIVE_CHECK + 2] = b"\x90\x90"
    with open(raw, "r+b") as f:
        mbr = bytearray(f.read(SECTOR))
        mbr[:MBR_KEEP] = boot[:MBR_KEEP]
        f.seek(0)
        f.write(mbr)
        f.seek(BIOS_START)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_at(target: Path, source: Path, offset: int) -> None:
    with open(source, "rb") as src, open(target, "r+b") as dst:
        dst.seek(offset)
        shutil.copyfileobj(src, dst, 4 * MiB)


_run = run_tool
