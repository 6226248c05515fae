"""`imagetool disk`: the layout, GRUB's own view of the disk, and refusals before anything is written.

Booting such a disk for real is tests/test_vm.py; here GRUB's tools (grub-fstest, grub-editenv,
grub-script-check) read what was written, with GRUB's own filesystem code.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from imagetool import disk
from imagetool.disk import DiskOptions, grub_cfg, grubenv_block, make_disk
from imagetool.errors import InputError
from imagetool.manifest import ImageInfo, sha256_file
from imagetool.signing import generate_keypair, sign_file
from imagetool.store import Store
from tests.samples import sample_manifest

needs_grub = pytest.mark.skipif(not shutil.which("grub-fstest") or not Path("/usr/lib/grub/i386-pc").is_dir(),
                                reason="GRUB tools not installed (scripts/setup installs them)")


def fstest(image: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["grub-fstest", str(image), *args], capture_output=True, text=True, timeout=120)


@needs_grub
def test_grubenv_block_is_what_grub_editenv_reads(tmp_path):
    env = tmp_path / "grubenv"
    env.write_bytes(grubenv_block({"imagetool_default": "webapp-1", "imagetool_next": ""}))
    assert env.stat().st_size == 1024
    r = subprocess.run(["grub-editenv", str(env), "list"], capture_output=True, text=True, check=True)
    assert r.stdout.splitlines() == ["imagetool_default=webapp-1", "imagetool_next="]


@needs_grub
def test_grub_cfg_is_valid_grub_script(tmp_path):
    cfg = tmp_path / "grub.cfg"
    cfg.write_text(grub_cfg("0b0e3c9a-8e54-4f6a-9f0e-5d2a1c3b4d5e"))
    r = subprocess.run(["grub-script-check", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = cfg.read_text()
    # The one-shot entry is spent (saved empty) before any kernel is loaded.
    assert text.index("save_env --file $envfile imagetool_next") < text.index("imagetool_boot $image first")
    assert "imagetool.var=UUID=0b0e3c9a-8e54-4f6a-9f0e-5d2a1c3b4d5e" in text and "panic=" in text


@needs_grub
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_disk_boots_the_release_as_committed_default(release1, tmp_path, fmt):
    key = tmp_path / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGk8m0UwbTq3oE0X4lR0Jw0q3yq7kR8n0p2X9aZcW1bN op@example\n")
    # The node will trust this key, so the release it is installed with must be signed by it.
    trusted = tmp_path / "release.pub"
    generate_keypair(tmp_path / "release.key", trusted)
    sig = tmp_path / f"{release1.id}.sig"
    sig.write_bytes(sign_file(release1.manifest_path, tmp_path / "release.key"))
    out = tmp_path / f"node.{fmt}"
    result = make_disk(dataclasses.replace(release1, sig_path=sig), DiskOptions(output=out, format=fmt, size=2 * 1024**3, authorized_keys=[key],
                                             trusted_keys=[trusted]))
    assert result.path == out and out.exists()
    assert not list(tmp_path.glob(".imagetool-disk-*")), "scratch space left behind"
    raw = out
    if fmt == "qcow2":
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(out)], capture_output=True,
                                         text=True, check=True).stdout)
        assert info["format"] == "qcow2" and info["virtual-size"] == 2 * 1024**3
        raw = tmp_path / "converted.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(out), str(raw)], check=True)
    table = subprocess.run(["sgdisk", "-p", str(raw)], capture_output=True, text=True, check=True).stdout
    assert [line.split()[-1] for line in table.splitlines() if line.strip()[:1].isdigit()] == ["bios", "esp", "var"]
    mbr = raw.read_bytes()[:512]
    assert mbr[510:] == b"\x55\xaa" and mbr[:440] != bytes(440), "no boot code in the MBR"

    var = "(loop0,gpt3)"
    # GRUB's own ext2 code finds the image, bit for bit, and the environment block.
    r = fstest(raw, "cmp", f"{var}/lib/imagetool/images/webapp-1.squashfs", str(release1.squashfs))
    assert r.returncode == 0, r.stderr
    env = fstest(raw, "cat", f"{var}/lib/imagetool/boot/grubenv").stdout
    assert env.startswith("# GRUB Environment Block\nimagetool_default=webapp-1\nimagetool_next=\n")
    assert fstest(raw, "cat", f"{var}/lib/imagetool/boot/loader").stdout.strip() == "grub"
    state = json.loads(fstest(raw, "cat", f"{var}/lib/imagetool/state.json").stdout)
    assert state == {"committed": "webapp-1", "previous": None}
    assert "op@example" in fstest(raw, "cat", f"{var}/lib/ssh/authorized_keys/root").stdout
    assert "BEGIN PUBLIC KEY" in fstest(raw, "cat", f"{var}/lib/imagetool/trusted-keys/release.pem").stdout
    # No identity on the disk: one disk serves a fleet.
    assert "ssh_host" not in fstest(raw, "ls", f"{var}/lib/ssh/").stdout
    assert "machine-id" not in fstest(raw, "ls", f"{var}/lib/imagetool/").stdout
    # GRUB for UEFI and the one grub.cfg on the ESP, naming the /var filesystem.
    esp = "(loop0,gpt2)"
    assert "bootx64.efi" in fstest(raw, "ls", f"{esp}/EFI/BOOT/").stdout.lower()
    cfg = fstest(raw, "cat", f"{esp}/grub/grub.cfg").stdout
    assert f"search --no-floppy --fs-uuid --set=var {result.var_uuid}" in cfg


def _tiny_release(tmp_path: Path, compression: str, with_kernel: bool, version: str):
    """A small real squashfs in a real store: enough for disk's checks, which run before any write."""
    tree = tmp_path / f"tree-{version}"
    (tree / "boot").mkdir(parents=True)
    if with_kernel:
        (tree / "boot/vmlinuz-6.1.0-1-amd64").write_bytes(b"kernel")
        (tree / "boot/initrd.img-6.1.0-1-amd64").write_bytes(b"initrd")
        (tree / "boot/vmlinuz").symlink_to("vmlinuz-6.1.0-1-amd64")
        (tree / "boot/initrd.img").symlink_to("initrd.img-6.1.0-1-amd64")
    store = Store(tmp_path / "store")
    rid = f"tiny-{version}"
    with store.staging(rid) as staging:
        subprocess.run(["mksquashfs", str(tree), str(staging.squashfs_path), "-noappend", "-comp", compression,
                        "-quiet", "-no-progress"], check=True, capture_output=True)
        m = sample_manifest("tiny", version, image=ImageInfo(f"{rid}.squashfs", staging.squashfs_path.stat().st_size,
                                                              sha256_file(staging.squashfs_path)))
        m = dataclasses.replace(m, squashfs=dataclasses.replace(m.squashfs, compression=compression))
        staging.manifest_path.write_bytes(m.to_json())
        return staging.commit()


@pytest.mark.parametrize("compression,kernel,problem", [
    ("zstd", True, "zstd-compressed, which GRUB cannot read"),
    ("gzip", False, "has no /boot/vmlinuz and no /boot/initrd.img"),
])
def test_unbootable_release_is_refused_before_writing(tmp_path, compression, kernel, problem):
    release = _tiny_release(tmp_path, compression, kernel, "1")
    out = tmp_path / "node.raw"
    with pytest.raises(InputError, match=problem):
        make_disk(release, DiskOptions(output=out, size=1024**3))
    assert not out.exists() and not list(tmp_path.glob(".imagetool-disk-*"))


def test_too_small_disk_is_refused_before_writing(tmp_path):
    release = _tiny_release(tmp_path, "gzip", True, "1")
    out = tmp_path / "node.raw"
    with pytest.raises(InputError, match=r"--size 100 MiB is too small for tiny-1.*use at least \d+ MiB"):
        make_disk(release, DiskOptions(output=out, size=100 * 1024**2))
    assert not out.exists()


def test_existing_output_needs_force(tmp_path):
    release = _tiny_release(tmp_path, "gzip", True, "1")
    out = tmp_path / "node.raw"
    out.write_text("precious")
    with pytest.raises(InputError, match="already exists; use --force"):
        make_disk(release, DiskOptions(output=out, size=1024**3))
    assert out.read_text() == "precious"


@needs_grub
def test_interrupted_disk_leaves_no_half_file(tmp_path, monkeypatch):
    release = _tiny_release(tmp_path, "gzip", True, "1")
    out = tmp_path / "node.raw"
    out.write_text("the old disk")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(disk, "_install_bios_grub", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_disk(release, DiskOptions(output=out, size=1024**3, force=True))
    assert out.read_text() == "the old disk"
    assert not list(tmp_path.glob(".imagetool-disk-*"))


def test_cli_disk_errors_are_clear(tmp_path):
    release = _tiny_release(tmp_path, "zstd", True, "1")
    r = subprocess.run([str(Path(__file__).resolve().parent.parent / ".venv/bin/imagetool"), "disk", release.id,
                        "--store", str(tmp_path / "store"), "-o", str(tmp_path / "x.raw"), "--size", "1G"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "zstd-compressed, which GRUB cannot read" in r.stderr and "Traceback" not in r.stderr


OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


@needs_grub
@pytest.mark.vm
@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_disk_boots_into_its_image_under_bios_and_uefi(release1, tmp_path, firmware):
    """The same disk, on both firmwares: GRUB reads grub.cfg, loads the kernel from inside the
    squashfs, and the initramfs hands over to the image's systemd on a read-only root."""
    boots_through_grub(release1, tmp_path, firmware)


def boots_through_grub(release1, tmp_path, firmware: str) -> None:
    """A disk of `release1` booted in qemu reaches the image's systemd (also used by test_vm)."""
    from tests.conftest import wait_for

    if not shutil.which("qemu-system-x86_64") or (firmware == "uefi" and not OVMF_CODE.exists()):
        pytest.skip("qemu-system-x86 / ovmf not installed (scripts/setup installs them)")
    out = tmp_path / "node.raw"
    make_disk(release1, DiskOptions(output=out, size=2 * 1024**3))
    console = tmp_path / "console.log"
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "1", "-nodefaults",
            "-display", "none", "-net", "none", "-drive", f"file={out},format=raw,if=virtio",
            "-device", "virtio-rng-pci", "-serial", f"file:{console}"]
    if firmware == "uefi":
        shutil.copyfile(OVMF_VARS, tmp_path / "vars.fd")
        argv += ["-machine", "q35", "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                 "-drive", f"if=pflash,format=raw,file={tmp_path / 'vars.fd'}"]
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def text() -> str:
            return console.read_text(errors="replace") if console.exists() else ""

        # "Reached target": the image's systemd is running (Debian's initramfs has no systemd).
        handed_over = wait_for(lambda: "Reached target" in text() or "Kernel panic" in text(), timeout=600,
                               interval=2)
        log = text()
        assert handed_over and "Kernel panic" not in log, log[-3000:]
        assert f"imagetool: booting {release1.id}" in log
        assert f"imagetool.image={release1.id}" in log and "boot=imagetool" in log
    finally:
        qemu.kill()
        qemu.wait()


def test_disk_trusted_keys_must_vouch_for_the_release(tmp_path):
    """A node installed to trust a key would refuse its own next release otherwise; and the
    release it starts on is held to the rule it will hold every later one to."""
    from imagetool.errors import VerificationError
    from tests.samples import make_release

    release = make_release(tmp_path / "store", "web", "1.0")
    generate_keypair(tmp_path / "release.key", tmp_path / "release.pub")
    with pytest.raises(VerificationError, match="release web-1.0 .* is not signed.*release.pub"):
        disk.check_trusted_keys(release, [tmp_path / "release.pub"])
    with pytest.raises(InputError, match="would both be installed as release.pem"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other/release.pem").write_bytes((tmp_path / "release.pub").read_bytes())
        disk.check_trusted_keys(release, [tmp_path / "release.pub", tmp_path / "other/release.pem"])
    sig = tmp_path / "web-1.0.sig"
    sig.write_bytes(sign_file(release.manifest_path, tmp_path / "release.key"))
    disk.check_trusted_keys(dataclasses.replace(release, sig_path=sig), [tmp_path / "release.pub"])
