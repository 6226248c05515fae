"""The commands and environment a build runs, as pure functions, against exact values."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from imagetool.build import PROJECT_ELEMENTS, clamp_mtimes, dib_command, dib_environment, squashfs_command
from imagetool.errors import HostSetupError
from imagetool.release import load_release
from imagetool.systools import require

EXAMPLE = Path(__file__).resolve().parent.parent / "examples/webapp-2.yaml"


def test_dib_command_adds_this_projects_elements_and_makes_a_tar():
    release = load_release(EXAMPLE)
    argv = dib_command(release, Path("/w/image"))
    assert argv[1:] == ["-t", "tar", "-o", "/w/image", "--no-tmpfs", "-p", "python3,curl",
                        "debian-minimal", "openssh-server", "webapp", *PROJECT_ELEMENTS]


def test_squashfs_command_is_gzip_with_the_epoch():
    release = load_release(EXAMPLE)
    argv = squashfs_command(Path("/w/root"), Path("/s/webapp-2.squashfs"), release.squashfs, 1763856000)
    assert argv[:10] == ["mksquashfs", "/w/root", "/s/webapp-2.squashfs", "-noappend", "-comp", "gzip",
                         "-b", "131072", "-Xcompression-level", "6"]
    assert argv[argv.index("-mkfs-time") + 1] == "1763856000"
    # No shared fragment blocks by default: a file added to the next release shifts no other file.
    assert "-no-fragments" in argv
    packed = dataclasses.replace(release.squashfs, fragments=True)
    assert "-no-fragments" not in squashfs_command(Path("/w/root"), Path("/s/x.squashfs"), packed, None)


def test_environment_for_elements(tmp_path):
    release = load_release(EXAMPLE)
    env = dib_environment(release, tmp_path)
    assert env["DIB_RELEASE"] == "trixie"
    assert env["DIB_DISTRIBUTION_MIRROR"].startswith("http")
    assert env["DIB_DEBIAN_SECURITY_MIRROR"].endswith("-security")
    assert env["ELEMENTS_PATH"] == f"{tmp_path}:{EXAMPLE.parent / 'elements'}"
    assert env["IMAGETOOL_SERVICES"] == "webapp.service"
    assert json.loads(env["IMAGETOOL_RELEASE_JSON"])["version"] == "2"
    assert [c["name"] for c in json.loads(env["IMAGETOOL_HEALTH_CHECKS"])] == ["webapp-http"]
    assert env["SOURCE_DATE_EPOCH"] == "1763856000"


def test_clamp_mtimes_only_touches_newer_files(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_text("a")
    new.write_text("b")
    import os

    os.utime(old, (1000, 1000))
    clamp_mtimes(tmp_path, 5000)
    assert old.stat().st_mtime == 1000 and new.stat().st_mtime == 5000


def test_missing_tool_names_its_package(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr("shutil.which", lambda *a, **k: None)
    with pytest.raises(HostSetupError, match="apt-get install squashfs-tools"):
        require("mksquashfs")


def test_build_noise_and_leftover_device_nodes_are_removed(tmp_path):
    from imagetool.build import ensure_mount_points, remove_build_noise

    for rel in ("var/log/dpkg.log", "var/lib/apt/lists/x_Packages", "dev/loop19", "etc/keep"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    removed = remove_build_noise(tmp_path)
    ensure_mount_points(tmp_path)
    assert sorted(removed) == ["dev/loop19", "var/lib/apt/lists/x_Packages", "var/log/dpkg.log"]
    assert (tmp_path / "etc/keep").exists() and (tmp_path / "dev").is_dir() and (tmp_path / "proc").is_dir()


def test_password_dates_are_clamped_to_the_epoch_day(tmp_path):
    from imagetool.build import clamp_password_dates

    etc = tmp_path / "etc"
    etc.mkdir()
    epoch_day = 1763856000 // 86400
    shadow = etc / "shadow"
    shadow.write_text(f"root:*:{epoch_day + 368}:0:99999:7:::\nsshd:!:{epoch_day - 3}::::::\nodd:x\nnone:*::0:99999:7:::\n")
    shadow.chmod(0o640)
    (etc / "shadow-").write_text(f"root:*:{epoch_day + 368}:0:99999:7:::\n")
    assert clamp_password_dates(tmp_path, 1763856000) == 2
    assert shadow.read_text() == (f"root:*:{epoch_day}:0:99999:7:::\nsshd:!:{epoch_day - 3}::::::\nodd:x\n"
                                  "none:*::0:99999:7:::\n")
    assert (etc / "shadow-").read_text() == f"root:*:{epoch_day}:0:99999:7:::\n"
    assert shadow.stat().st_mode & 0o777 == 0o640
    assert clamp_password_dates(tmp_path / "nothing-here", 1763856000) == 0


def test_clamping_keeps_a_timestamp_pyc_valid(tmp_path):
    """A module whose source is newer than the epoch, compiled as a package's postinst does:
    after the clamps, Python still loads it from its .pyc (the .pyc says X = 1, the source now
    says X = 2 with the same size and time, so the value tells which one Python used)."""
    import os
    import py_compile
    import subprocess
    import sys

    from imagetool.build import clamp_pyc_source_times

    epoch, newer = 1763856000, 1791376507
    lib = tmp_path / "lib"
    lib.mkdir()
    mod, stale = lib / "mod.py", lib / "stale.py"
    for path in (mod, stale):
        path.write_text("X = 1\n")
        os.utime(path, (newer, newer))
        py_compile.compile(str(path), invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
        path.write_text("X = 2\n")
        os.utime(path, (newer, newer))
    os.utime(stale, (newer + 60, newer + 60))  # its .pyc was already out of date

    def loaded(name: str) -> str:
        return subprocess.run([sys.executable, "-B", "-c", f"import {name}; print({name}.X)"], cwd=lib,
                              capture_output=True, text=True, check=True).stdout.strip()

    assert clamp_pyc_source_times(tmp_path, epoch) == 1
    clamp_mtimes(tmp_path, epoch)
    assert loaded("mod") == "1"  # the .pyc, still valid
    assert loaded("stale") == "2"  # never made to look valid
