"""Real builds with diskimage-builder (once per session), checked from the outside."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from imagetool.build import BuildOptions, build
from imagetool.cli import main
from imagetool.errors import AlreadyExistsError, BuildError
from imagetool.release import load_release
from imagetool.signing import verify_release
from imagetool.store import Store
from tests.conftest import EXAMPLES, TEST_STORE, signing_keys

pytestmark = pytest.mark.build


@pytest.fixture(scope="module")
def image_root(release1):
    with tempfile.TemporaryDirectory() as mnt:
        subprocess.run(["mount", "-o", "loop,ro", str(release1.squashfs), mnt], check=True)
        try:
            yield Path(mnt)
        finally:
            subprocess.run(["umount", mnt], check=True)


def test_manifest_describes_the_image(release1):
    m = release1.manifest
    assert (m.name, m.version, m.id) == ("webapp", "1", "webapp-1")
    names = {p.name for p in m.packages}
    assert {"openssh-server", "python3", "systemd", "openssl"} <= names
    assert all(p.version for p in m.packages)
    assert m.services == ("webapp.service",)
    assert [h.name for h in m.health_checks] == ["webapp-http"]
    assert m.image.size == release1.squashfs.stat().st_size
    verify_release(release1.squashfs, release1.manifest_path, None, None)
    assert m.builder.diskimage_builder != "unknown" and m.builder.imagetool
    assert {"imagetool-readonly-root", "imagetool-node", "imagetool-health", "debian-minimal"} <= set(m.elements)
    assert m.source_date_epoch == 1763856000
    assert m.trusted_keys == ()  # webapp-1.yaml lists none
    assert release1.log is not None and "disk-image-create" in release1.log.read_text()


def test_bookworm_still_builds_beside_the_trixie_default(release1, release_bookworm, tmp_path):
    """Debian's current stable is the default base; the one before still builds, with its own
    packages, into an image ready for the same boot path (kernel, initramfs, imagetool's hook)."""
    def systemd(m) -> str:
        return next(p.version for p in m.packages if p.name == "systemd")

    assert (release1.manifest.base.release, release_bookworm.manifest.base.release) == ("trixie", "bookworm")
    assert systemd(release1.manifest).startswith("257") and systemd(release_bookworm.manifest).startswith("252")
    listing = subprocess.run(["unsquashfs", "-l", "-d", "", str(release_bookworm.squashfs)], capture_output=True,
                             text=True, check=True).stdout.split()
    assert "/boot/vmlinuz" in listing and "/boot/initrd.img" in listing
    assert "/etc/initramfs-tools/scripts/imagetool" in listing  # imagetool-boot: the initramfs mounts the image
    assert "/usr/lib/imagetool/imagetool-node" in listing


def test_squashfs_is_imagetools_own_gzip(release1):
    r = subprocess.run(["unsquashfs", "-s", str(release1.squashfs)], capture_output=True, text=True, check=True)
    assert "Compression gzip" in r.stdout  # GRUB reads gzip, not zstd
    assert "Block size 131072" in r.stdout


def test_image_is_ready_for_a_read_only_root(image_root, release1):
    release = json.loads((image_root / "etc/imagetool/release.json").read_text())
    assert (release["name"], release["version"], release["services"]) == ("webapp", "1", ["webapp.service"])
    assert not list((image_root / "etc/ssh").glob("ssh_host_*")), "host keys must not be shared by a fleet"
    assert "LABEL=" not in (image_root / "etc/fstab").read_text()
    assert os.readlink(image_root / "etc/resolv.conf") == "../run/imagetool/resolv.conf"
    assert (image_root / "etc/machine-id").read_text().strip() == "uninitialized"
    check = image_root / "usr/lib/imagetool/health.d/webapp-http"
    assert os.access(check, os.X_OK) and "urlopen" in check.read_text()
    assert os.access(image_root / "usr/lib/imagetool/imagetool-node", os.X_OK)
    assert os.readlink(image_root / "usr/sbin/imagetool-node") == "/usr/lib/imagetool/imagetool-node"
    # The release file lists no trusted_keys, so the imagetool-node element installed none: its
    # nodes check sha256 only. (No cached test image lists keys; see tests/test_release_trusted_keys.py.)
    assert not (image_root / "etc/imagetool/trusted-keys").exists()
    for mount_point in ("proc", "sys", "dev", "run", "tmp", "var"):
        assert (image_root / mount_point).is_dir()
    # Timestamps are clamped to SOURCE_DATE_EPOCH.
    newest = max((p.lstat().st_mtime for p in (image_root / "etc").rglob("*")), default=0)
    assert newest <= 1763856000


def test_signed_build_verifies_and_tampering_is_refused(release2, tmp_path):
    _, public = signing_keys()
    assert release2.sig is not None
    verify_release(release2.squashfs, release2.manifest_path, release2.sig, public)
    r = CliRunner().invoke(main, ["verify", release2.id, "--store", str(TEST_STORE), "--key", str(public)])
    assert r.exit_code == 0, r.output
    tampered = tmp_path / "webapp-2.manifest.json"
    tampered.write_bytes(release2.manifest_path.read_bytes().replace(b'"2"', b'"3"', 1))
    with pytest.raises(Exception, match="signature"):
        verify_release(release2.squashfs, tampered, release2.sig, public)


def test_store_commands_and_diff(release1, release2):
    runner = CliRunner()
    r = runner.invoke(main, ["images", "list", "--store", str(TEST_STORE), "--json"])
    assert r.exit_code == 0, r.output
    ids = [x["id"] for x in json.loads(r.output)]
    assert "webapp-1" in ids and "webapp-2" in ids
    r = runner.invoke(main, ["images", "show", "webapp-2", "--store", str(TEST_STORE), "--json"])
    assert json.loads(r.output)["version"] == "2"
    r = runner.invoke(main, ["diff", "webapp-1", "webapp-2", "--store", str(TEST_STORE), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert "curl" in [a["name"] for a in d["packages"]["added"]]
    assert not d["packages"]["removed"] and not d["packages"]["downgraded"]
    assert d["size"]["after"] == release2.manifest.image.size


def test_rebuilding_a_stored_release_is_refused_without_force(release1):
    with pytest.raises(AlreadyExistsError, match="--force"):
        build(load_release(EXAMPLES / "webapp-1.yaml"), Store(TEST_STORE), BuildOptions())


def test_failed_build_leaves_the_store_as_it_was(tmp_path, release1):
    store_dir = tmp_path / "store"
    store = Store(store_dir)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nversion: '1'\nelements: [no-such-element]\n")
    before = sorted(p.name for p in store_dir.rglob("*")) if store_dir.exists() else []
    with pytest.raises(BuildError, match="diskimage-builder failed"):
        build(load_release(bad), store, BuildOptions())
    after = [p for p in store_dir.rglob("*") if p.is_file()]
    assert after == [] and before == []
    assert store.list() == []


def test_element_installs_the_release_files_trusted_keys_into_the_image(image_root, tmp_path):
    """The imagetool-node element's install.d, run for real in the built image's own userland (an
    overlay over webapp-1, chrooted), with the environment a build of a release listing
    trusted_keys gets: the keys land in /etc/imagetool/trusted-keys/, byte for byte."""
    from imagetool.build import dib_environment
    from imagetool.signing import generate_keypair

    (tmp_path / "keys").mkdir()
    generate_keypair(tmp_path / "keys/ops.key", tmp_path / "keys/ops.pub")
    shutil.copytree(EXAMPLES / "elements", tmp_path / "elements")
    release_file = tmp_path / "webapp.yaml"
    release_file.write_text((EXAMPLES / "webapp-1.yaml").read_text() + "trusted_keys: [keys/ops.pub]\n")
    env = dib_environment(load_release(release_file), EXAMPLES.parent / "elements")
    script = EXAMPLES.parent / "elements/imagetool-node/install.d/50-imagetool-node"
    upper, work, root = (tmp_path / d for d in ("upper", "work", "root"))
    for d in (upper, work, root):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={image_root},upperdir={upper},workdir={work}", str(root)], check=True)
    try:
        (root / "tmp/install.d").mkdir(parents=True, exist_ok=True)
        (root / "tmp/install.d/50-imagetool-node").write_bytes(script.read_bytes())
        r = subprocess.run(["chroot", str(root), "/bin/bash", "/tmp/install.d/50-imagetool-node"],
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env}, capture_output=True, text=True,
                           timeout=120, check=False)
        assert r.returncode == 0, r.stderr
        installed = root / "etc/imagetool/trusted-keys/ops.pem"
        assert installed.read_text() == (tmp_path / "keys/ops.pub").read_text()
        assert oct(installed.stat().st_mode & 0o777) == "0o644"
        assert json.loads((root / "etc/imagetool/release.json").read_text())["name"] == "webapp"
    finally:
        subprocess.run(["umount", str(root)], check=True)
