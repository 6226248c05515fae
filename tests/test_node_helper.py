"""The node helper itself (the file the image ships), run here against a fake node root.

The rules that keep a node bootable live in the helper, so they are tested on the helper: locks
and their take-over, gc never removing what the node may boot, the run-once record, the boot
backends (lab control.json, GRUB's environment block checked against the real grub-editenv) and
re-verification of an image before it is armed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

HELPER = Path(__file__).resolve().parent.parent / "elements/imagetool-node/static/usr/lib/imagetool/imagetool-node"


class NodeRoot:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.var = root / "var/lib/imagetool"
        self.images = self.var / "images"
        self.images.mkdir(parents=True)
        (self.var / "boot").mkdir()
        (root / "etc/imagetool").mkdir(parents=True)
        self.boot_id = root / "boot_id"
        self.boot_id.write_text("boot-1\n")

    def run(self, *args: str, ok: bool = True, path: str | None = None) -> dict[str, Any]:
        env = {**os.environ, "IMAGETOOL_NODE_ROOT": str(self.root), "IMAGETOOL_NODE_BOOT_ID_FILE": str(self.boot_id)}
        if path is not None:
            env["PATH"] = path
        r = subprocess.run([sys.executable, str(HELPER), *args], capture_output=True, text=True, env=env, timeout=60)
        answer = json.loads(r.stdout)
        assert answer["ok"] is ok, answer
        answer["_stderr"] = r.stderr
        return answer

    def add_image(self, image_id: str, mtime: float, size: int = 1000) -> None:
        (self.images / f"{image_id}.squashfs").write_bytes(b"x" * size)
        (self.images / f"{image_id}.manifest.json").write_text(json.dumps({"image": {"sha256": "0" * 64}}))
        os.utime(self.images / f"{image_id}.squashfs", (mtime, mtime))

    def stage(self, image_id: str, data: bytes | None = None) -> None:
        """Stage a real image the way the controller does: into .incoming, then stage-commit."""
        data = data if data is not None else f"squashfs of {image_id}".encode() * 50
        incoming = self.images / ".incoming"
        incoming.mkdir(exist_ok=True)
        (incoming / f"{image_id}.squashfs").write_bytes(data)
        manifest = {"id": image_id, "image": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}
        (incoming / f"{image_id}.manifest.json").write_text(json.dumps(manifest))
        self.run("stage-commit", image_id)

    def corrupt(self, image_id: str) -> None:
        """Flip one byte of a staged image, as a rotting disk would."""
        path = self.images / f"{image_id}.squashfs"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    def release(self, image_id: str) -> None:
        """Boot image_id: what the running root's release.json says."""
        (self.root / "etc/imagetool/release.json").write_text(json.dumps(
            {"name": image_id.rsplit("-", 1)[0], "version": image_id.rsplit("-", 1)[1]}))

    def boot(self, image_id: str, default: str, previous: str | None = None, next_id: str | None = None) -> None:
        self.release(image_id)
        (self.var / "boot/control.json").write_text(json.dumps({"default": default, "next": next_id}))
        (self.var / "state.json").write_text(json.dumps({"committed": default, "previous": previous}))

    def installed(self) -> set[str]:
        return {p.name.removesuffix(".squashfs") for p in self.images.glob("*.squashfs")}


@pytest.fixture
def node(tmp_path: Path) -> NodeRoot:
    return NodeRoot(tmp_path / "node")


needs_grub_editenv = pytest.mark.skipif(shutil.which("grub-editenv") is None, reason="grub-editenv not installed")


def grub_editenv(node: NodeRoot, *args: str) -> dict[str, str]:
    """Run the real grub-editenv on the node's grubenv; answer its `list` as a dict."""
    grubenv = node.var / "boot/grubenv"
    if args:
        subprocess.run(["grub-editenv", str(grubenv), *args], check=True, capture_output=True)
    listed = subprocess.run(["grub-editenv", str(grubenv), "list"], check=True, capture_output=True, text=True)
    return dict(line.split("=", 1) for line in listed.stdout.splitlines())


def make_grub_node(node: NodeRoot, default: str, **other_variables: str) -> Path:
    """A node that boots with GRUB: the loader fact and an environment block made by grub-editenv."""
    (node.var / "boot/loader").write_text("grub\n")
    grub_editenv(node, "create")
    grub_editenv(node, "set", f"imagetool_default={default}", *(f"{k}={v}" for k, v in other_variables.items()))
    return node.var / "boot/grubenv"


def make_lab_node(node: NodeRoot, default: str) -> None:
    (node.var / "boot/control.json").write_text(json.dumps({"default": default, "next": None}))


def control_json(node: NodeRoot) -> dict[str, Any]:
    return json.loads((node.var / "boot/control.json").read_text())


def test_lock_names_its_holder_and_is_taken_over_only_by_name(node: NodeRoot) -> None:
    node.run("lock", "r-1", "--owner", "ops@ctl", "--command", "imagetool rollout web-2", "--pid", "4242")
    refused = node.run("lock", "r-2", "--owner", "dev@laptop", ok=False)
    assert "locked by rollout r-1 of ops@ctl" in refused["error"] and "imagetool rollout web-2" in refused["error"]
    # Taking over names the lock it means: a different holder is not broken by mistake.
    node.run("lock", "r-2", "--owner", "dev@laptop", "--take-over", "r-0", ok=False)
    got = node.run("lock", "r-2", "--owner", "dev@laptop", "--take-over", "r-1")
    assert got["broken"]["rollout"] == "r-1" and got["broken"]["pid"] == 4242
    assert got["lock"]["rollout"] == "r-2"
    # Only the holder unlocks.
    assert "held by rollout r-2" in node.run("unlock", "r-1", ok=False)["error"]
    node.run("unlock", "r-2")
    assert node.run("status")["lock"] is None


def test_lock_older_than_is_broken(node: NodeRoot) -> None:
    node.run("lock", "r-1", "--owner", "a@b")
    lock = json.loads((node.var / "lock").read_text())
    lock["time"] = time.time() - 7200
    (node.var / "lock").write_text(json.dumps(lock))
    node.run("lock", "r-2", "--owner", "c@d", "--break-older-than", "10800", ok=False)
    assert node.run("lock", "r-2", "--owner", "c@d", "--break-older-than", "3600")["broken"]["rollout"] == "r-1"


def test_gc_never_removes_booted_committed_previous_or_pending(node: NodeRoot) -> None:
    now = time.time()
    for i, image in enumerate(["web-1", "web-2", "web-3", "web-4", "web-5", "web-6", "web-7"]):
        node.add_image(image, now - 1000 + i * 10)
    # Booted web-4 on trial; committed web-3 (default), previous web-2; one-shot pending web-1.
    node.boot("web-4", default="web-3", previous="web-2", next_id="web-1")
    (node.images / "web-9.squashfs").write_bytes(b"stray")  # a gc that crashed half-way
    got = node.run("gc", "--keep", "1")
    assert set(got["protected"]) == {"web-1", "web-2", "web-3", "web-4"}
    # Of the others (web-5, web-6, web-7) the newest one is kept.
    assert sorted(got["removed"]) == ["web-5", "web-6", "web-9"]
    assert node.installed() == {"web-1", "web-2", "web-3", "web-4", "web-7"}
    assert got["freed_bytes"] >= 0
    got = node.run("gc", "--keep", "0")
    assert got["removed"] == ["web-7"]
    assert node.installed() == {"web-1", "web-2", "web-3", "web-4"}


def test_staging_refuses_to_overwrite_the_fallback_image(node: NodeRoot) -> None:
    node.add_image("web-1", time.time())
    node.add_image("web-2", time.time())
    node.boot("web-2", default="web-2", previous="web-1")
    incoming = node.images / ".incoming"
    incoming.mkdir()
    (incoming / "web-1.squashfs").write_bytes(b"other bytes")
    (incoming / "web-1.manifest.json").write_text("{}")
    refused = node.run("stage-commit", "web-1", ok=False)
    assert "fallback" in refused["error"]
    assert (node.images / "web-1.squashfs").read_bytes() == b"x" * 1000


def test_ran_once_is_recorded_in_status(node: NodeRoot) -> None:
    node.add_image("web-2", time.time())
    node.boot("web-2", default="web-2")
    node.run("ran-once", "web-2", "--rollout", "r-9")
    st = node.run("status")
    assert st["run_once"]["release"] == "web-2" and st["run_once"]["rollout"] == "r-9"
    assert node.run("ran-once", "../etc", ok=False)["error"]


def test_a_confirmation_after_the_node_gave_up_is_refused(node: NodeRoot) -> None:
    node.add_image("web-1", time.time())
    node.add_image("web-2", time.time())
    node.boot("web-2", default="web-1")  # a trial boot of web-2; web-1 is committed
    trial = {"id": "web-2", "boot_id": "boot-1", "started": time.time() - 60, "deadline": time.time() - 1,
             "confirmed": None, "gave_up": time.time()}
    (node.var / "boot/trial.json").write_text(json.dumps(trial))
    assert "too late" in node.run("confirm", "web-2", ok=False)["error"]
    assert "gave up" in node.run("commit", "web-2", ok=False)["error"]
    control = json.loads((node.var / "boot/control.json").read_text())
    assert control["default"] == "web-1", "nothing was half-applied"
    # Unconfirmed (but not given up): commit still refuses.
    trial["gave_up"], trial["deadline"] = None, time.time() + 60
    (node.var / "boot/trial.json").write_text(json.dumps(trial))
    assert "not confirmed" in node.run("commit", "web-2", ok=False)["error"]
    node.run("confirm", "web-2")
    assert node.run("commit", "web-2")["committed"] == "web-2"


def test_without_a_loader_file_the_node_boots_as_in_the_lab(node: NodeRoot) -> None:
    node.stage("web-1")
    node.stage("web-2")
    node.boot("web-1", default="web-1")
    assert node.run("status")["boot_loader"] == "lab"
    node.run("set-next", "web-2", "--confirm-timeout", "30", "--rollout", "r-1")
    # The lab firmware reads exactly this file: its format is unchanged.
    ctl = control_json(node)
    assert (ctl["default"], ctl["next"], ctl["confirm_timeout"], ctl["rollout"]) == ("web-1", "web-2", 30, "r-1")
    st = node.run("status")
    assert (st["default"], st["next"]) == ("web-1", "web-2")
    node.run("clear-next")
    assert control_json(node)["next"] is None
    assert not (node.var / "boot/grubenv").exists()


@needs_grub_editenv
def test_grub_boot_control_agrees_with_grub_editenv(node: NodeRoot) -> None:
    node.stage("a-1")
    node.stage("a-2")
    grubenv = make_grub_node(node, default="a-1", saved_entry="rescue")
    inode = grubenv.stat().st_ino
    node.release("a-1")
    st = node.run("status")
    assert (st["boot_loader"], st["default"], st["next"]) == ("grub", "a-1", None)

    node.run("set-next", "a-2", "--confirm-timeout", "30", "--rollout", "r-1")
    env = grub_editenv(node)
    assert (env["imagetool_default"], env["imagetool_next"], env["saved_entry"]) == ("a-1", "a-2", "rescue")
    # Metadata stays in control.json; the boot entries live in grubenv alone.
    ctl = control_json(node)
    assert (ctl["confirm_timeout"], ctl["rollout"]) == (30, "r-1")
    assert "default" not in ctl and "next" not in ctl

    node.run("clear-next")
    assert grub_editenv(node)["imagetool_next"] == ""
    assert node.run("status")["next"] is None

    # Armed again; GRUB consumes the one-shot (save_env of an empty value) and boots a-2.
    node.run("set-next", "a-2")
    grub_editenv(node, "set", "imagetool_next=")
    node.release("a-2")
    assert node.run("commit", "a-2", "--rollout", "r-1")["previous"] == "a-1"
    env = grub_editenv(node)
    assert (env["imagetool_default"], env["imagetool_next"], env["saved_entry"]) == ("a-2", "", "rescue")
    st = node.run("status")
    assert (st["default"], st["next"], st["previous"]) == ("a-2", None, "a-1")

    # GRUB's tool still edits what the helper wrote, and the helper keeps what the tool added.
    grub_editenv(node, "set", "extra=1")
    node.run("set-next", "a-1")
    env = grub_editenv(node)
    assert (env["imagetool_default"], env["imagetool_next"], env["extra"]) == ("a-2", "a-1", "1")
    # Written in place: GRUB's save_env writes the file's blocks, so they must never move.
    assert grubenv.stat().st_ino == inode and grubenv.stat().st_size == 1024


@needs_grub_editenv
def test_grub_block_too_full_is_refused_untouched(node: NodeRoot) -> None:
    node.stage("a-1")
    node.stage("a-2")
    grubenv = make_grub_node(node, default="a-1", filler="f" * 900)  # grub-editenv also adds a comment line
    before = grubenv.read_bytes()
    assert "do not fit" in node.run("set-next", "a-2", ok=False)["error"]
    assert grubenv.read_bytes() == before


def test_grub_without_a_valid_environment_block_is_refused(node: NodeRoot) -> None:
    node.stage("a-1")
    node.stage("a-2")
    node.release("a-1")
    (node.var / "boot/loader").write_text("grub\n")
    grubenv = node.var / "boot/grubenv"
    for command in (["status"], ["set-next", "a-2"], ["commit", "a-1"], ["boot"]):
        error = node.run(*command, ok=False)["error"]
        assert str(grubenv) in error and "missing" in error, error
    grubenv.write_bytes(b"# GRUB Environment Block\nimagetool_default=a-1\n")  # not padded to 1024
    error = node.run("status", ok=False)["error"]
    assert str(grubenv) in error and "not a GRUB environment block" in error
    (node.var / "boot/loader").write_text("uboot\n")
    assert "uboot" in node.run("status", ok=False)["error"]


@pytest.mark.parametrize("loader", ["lab", pytest.param("grub", marks=needs_grub_editenv)])
def test_set_next_refuses_an_image_corrupted_after_staging(node: NodeRoot, loader: str) -> None:
    node.stage("web-1")
    node.stage("web-2")
    node.release("web-1")
    if loader == "grub":
        make_grub_node(node, default="web-1")
    else:
        make_lab_node(node, default="web-1")
    node.corrupt("web-2")
    refused = node.run("set-next", "web-2", ok=False)
    assert "web-2: sha256 mismatch" in refused["error"]
    st = node.run("status")
    assert (st["boot_loader"], st["default"], st["next"]) == (loader, "web-1", None)
    ctl = control_json(node) if (node.var / "boot/control.json").exists() else {}
    assert "next_set_at" not in ctl, "nothing was armed or recorded"
    assert "removed it, the next rollout stages it again" in refused["error"] and refused["kind"] == "verification"
    assert node.installed() == {"web-1"}, "the damaged image is gone, so a rollout sends it again"


@needs_grub_editenv
def test_dead_man_switch_reads_the_default_from_grubenv(node: NodeRoot, tmp_path: Path) -> None:
    node.stage("a-1")
    node.stage("a-2")
    make_grub_node(node, default="a-1")
    node.release("a-1")
    assert node.run("boot")["trial"] is False
    node.run("set-next", "a-2", "--confirm-timeout", "1")
    # A stand-in systemctl: the test must never reboot the machine running it.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "systemctl").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'systemctl.log'}\n")
    (fake / "systemctl").chmod(0o755)
    node.release("a-2")  # booted the one-shot a-2; the default in grubenv is still a-1
    got = node.run("boot", path=f"{fake}:{os.environ['PATH']}")
    assert (got["trial"], got["confirmed"], got["rebooting"]) == (True, False, True)
    assert "rebooting into a-1" in got["_stderr"]
    assert (tmp_path / "systemctl.log").read_text().split() == ["reboot"]
    assert json.loads((node.var / "boot/trial.json").read_text())["id"] == "a-2"


def test_status_skips_an_empty_manifest(tmp_path):
    """A manifest a power cut left empty (seen on a VM reset right after a copy) is not an image,
    and status still answers."""
    node = NodeRoot(tmp_path)
    images = tmp_path / "var/lib/imagetool/images"
    images.mkdir(parents=True, exist_ok=True)
    (images / "webapp-9.squashfs").write_bytes(b"x")
    (images / "webapp-9.manifest.json").write_bytes(b"")
    out = node.run("status")
    assert out["ok"] and all(i["id"] != "webapp-9" for i in out["images"])


# --- bad input and damaged files: a clear answer, never a traceback ------------------------------


def fake_systemctl(tmp_path: Path) -> str:
    """A PATH whose systemctl only logs: the test must never reboot the machine running it."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "systemctl").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'systemctl.log'}\necho running\n")
    (fake / "systemctl").chmod(0o755)
    return f"{fake}:{os.environ['PATH']}"


def test_a_signature_that_is_not_base64_is_refused_and_the_transfer_dropped(node: NodeRoot) -> None:
    keys = node.var / "trusted-keys"
    keys.mkdir()
    (keys / "release.pem").write_text("-----BEGIN PUBLIC KEY-----\nnot used: decoding fails first\n")
    data = b"squashfs" * 100
    incoming = node.images / ".incoming"
    incoming.mkdir()
    (incoming / "web-1.squashfs").write_bytes(data)
    (incoming / "web-1.manifest.json").write_text(json.dumps(
        {"id": "web-1", "image": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}))
    (incoming / "web-1.sig").write_text("this is *not* base64!\n")
    got = node.run("stage-commit", "web-1", ok=False)
    assert got["kind"] == "verification" and "not a base64 signature" in got["error"], got
    assert "Traceback" not in got["_stderr"]
    assert list(incoming.iterdir()) == [], "a transfer that failed verification is not resumed from"
    assert not (node.images / "web-1.squashfs").exists()


@pytest.mark.parametrize("name", ["boot/control.json", "state.json", "boot/trial.json"])
@pytest.mark.parametrize("content", ["[1, 2]", "\"text\"", "3", "{not json"])
def test_damaged_node_files_are_reported_as_corrupt(node: NodeRoot, name: str, content: str) -> None:
    node.stage("web-1")
    node.boot("web-1", default="web-1")
    (node.var / name).write_text(content)
    commands = [["status"], ["commit", "web-1"]] + ([["set-next", "web-1"]] if name == "boot/control.json" else [])
    for command in commands:
        got = node.run(*command, ok=False)
        assert got["kind"] == "corrupt" and name in got["error"], (command, got)
        assert "Traceback" not in got["_stderr"]


def test_release_json_and_manifests_that_are_not_objects(node: NodeRoot) -> None:
    node.stage("web-1")
    node.boot("web-1", default="web-1")
    (node.images / "web-1.manifest.json").write_text("[]")
    assert node.run("status")["images"] == [], "not an installed image"
    got = node.run("verify", "web-1", ok=False)
    assert got["kind"] == "verification" and "manifest missing or invalid" in got["error"]
    (node.images / "web-1.manifest.json").write_text(json.dumps({"id": "web-1", "image": ["x"]}))
    assert node.run("stage-info", "web-1")["sha256"] is None
    assert node.run("verify", "web-1", ok=False)["kind"] == "verification"
    (node.root / "etc/imagetool/release.json").write_text("[\"web\"]")
    got = node.run("status", ok=False)
    assert got["kind"] == "corrupt" and "release.json is not a JSON object" in got["error"]


def test_a_sha256_mismatch_is_a_verification_failure(node: NodeRoot) -> None:
    node.stage("web-1")
    node.corrupt("web-1")
    got = node.run("verify", "web-1", ok=False)
    assert got["kind"] == "verification" and "sha256 mismatch" in got["error"]


def test_oversized_files_are_refused(node: NodeRoot) -> None:
    (node.var / "state.json").symlink_to("/dev/zero")
    got = node.run("status", ok=False)
    assert got["kind"] == "corrupt" and "larger than" in got["error"]


@pytest.mark.parametrize("args", [
    ["set-next", "web-1", "--confirm-timeout", "nan"],
    ["set-next", "web-1", "--confirm-timeout", "inf"],
    ["set-next", "web-1", "--confirm-timeout", "0"],
    ["health", "--wait", "NaN"],
    ["health", "--timeout", "-1"],
    ["gc", "--keep", "-1"],
    ["lock", "r-1", "--owner", "me", "--pid", "0"],
    ["nonsense"],
])
def test_numbers_on_the_command_line_are_finite_and_in_range(node: NodeRoot, args: list[str]) -> None:
    env = {**os.environ, "IMAGETOOL_NODE_ROOT": str(node.root), "IMAGETOOL_NODE_BOOT_ID_FILE": str(node.boot_id)}
    r = subprocess.run([sys.executable, str(HELPER), *args], capture_output=True, text=True, env=env, timeout=60)
    answer = json.loads(r.stdout)
    assert r.returncode == 2 and answer["ok"] is False and answer["kind"] == "usage", (r.stdout, r.stderr)


def test_dead_man_switch_ignores_a_timeout_that_is_not_finite(node: NodeRoot, tmp_path: Path) -> None:
    node.stage("a-1")
    node.stage("a-2")
    make_lab_node(node, default="a-1")
    node.release("a-2")  # booted the one-shot
    ctl = control_json(node)
    (node.var / "boot/control.json").write_text(json.dumps({**ctl, "confirm_timeout": float("nan")}))
    env = {**os.environ, "IMAGETOOL_NODE_ROOT": str(node.root), "IMAGETOOL_NODE_BOOT_ID_FILE": str(node.boot_id),
           "PATH": fake_systemctl(tmp_path)}
    proc = subprocess.Popen([sys.executable, str(HELPER), "boot"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        trial_path = node.var / "boot/trial.json"
        for _ in range(100):
            if trial_path.exists():
                break
            time.sleep(0.1)
        trial = json.loads(trial_path.read_text())
        assert trial["deadline"] - trial["started"] == pytest.approx(600, abs=1)
        # A damaged record does not disarm the switch either.
        trial_path.write_text("[]")
        time.sleep(1.5)
        assert proc.poll() is None, "still watching"
    finally:
        proc.kill()
        proc.wait()


def test_an_armed_failpoint_stops_the_helper_there_and_says_so(tmp_path):
    """The fault tests' power cut at an exact moment: the helper writes `.reached` and waits to die.
    Here the commit's first write (state.json) has happened and its second (the boot default) not."""
    node = NodeRoot(tmp_path)
    node.stage("web-2")
    node.boot("web-2", default="web-1")
    run = node.root / "run/imagetool"
    run.mkdir(parents=True)
    (run / "failpoint").write_text("commit:state-written\n")
    env = {**os.environ, "IMAGETOOL_NODE_ROOT": str(node.root), "IMAGETOOL_NODE_BOOT_ID_FILE": str(node.boot_id)}
    proc = subprocess.Popen([sys.executable, str(HELPER), "commit", "web-2"], env=env, stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (run / "failpoint.reached").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (run / "failpoint.reached").read_text() == "commit:state-written\n"
        time.sleep(0.2)
        assert proc.poll() is None, "the helper went on past its failpoint"
    finally:
        proc.kill()
        proc.wait()
    raw = json.loads((node.var / "state.json").read_text())
    assert raw["committed"] == "web-2" and raw["uncommitted"]["committed"] == "web-1"
    assert json.loads((node.var / "boot/control.json").read_text())["default"] == "web-1"
    # The commit was cut short: the node boots web-1, and its record says web-1 too.
    assert node.run("status")["committed"] == "web-1"
    # Another point armed, or none: the helper runs through, and the record is final.
    (run / "failpoint").write_text("set-next:metadata-written\n")
    assert node.run("commit", "web-2")["committed"] == "web-2"
    assert json.loads((node.var / "boot/control.json").read_text())["default"] == "web-2"
    assert json.loads((node.var / "state.json").read_text()) == {
        **{k: v for k, v in raw.items() if k not in ("uncommitted", "committed_at")},
        "committed_at": json.loads((node.var / "state.json").read_text())["committed_at"]}


def test_a_commit_cut_short_reads_as_undone_and_boot_writes_it_back(tmp_path):
    """state.json written, the boot default not moved: a power cut between commit's two writes."""
    node = NodeRoot(tmp_path)
    node.stage("web-2")
    node.boot("web-1", default="web-1", previous="web-0")
    before = {"committed": "web-1", "previous": "web-0", "committed_at": 100.0, "rollout": "r-1"}
    cut_short = {**before, "committed": "web-2", "previous": "web-1", "committed_at": 200.0, "rollout": "r-2",
                 "run_once": {"release": "web-1"}, "uncommitted": before}
    (node.var / "state.json").write_text(json.dumps(cut_short))
    st = node.run("status")
    assert (st["committed"], st["previous"], st["last_rollout"]) == ("web-1", "web-0", "r-1")
    node.run("boot")
    assert json.loads((node.var / "state.json").read_text()) == {**before, "run_once": {"release": "web-1"}}
    # Had the default moved before the cut, the commit stands: only the marker goes.
    (node.var / "state.json").write_text(json.dumps(cut_short))
    (node.var / "boot/control.json").write_text(json.dumps({"default": "web-2", "next": None}))
    node.release("web-2")
    node.run("boot")
    assert json.loads((node.var / "state.json").read_text()) == {
        k: v for k, v in cut_short.items() if k != "uncommitted"}


def test_a_damaged_state_file_does_not_stop_the_dead_man_switch(tmp_path):
    """boot settles a cut-short commit in state.json; a state.json it cannot read must not keep
    the switch from watching a trial boot."""
    node = NodeRoot(tmp_path)
    node.stage("web-2")
    node.boot("web-2", default="web-1")
    (node.var / "boot/control.json").write_text(json.dumps({"default": "web-1", "next": None,
                                                            "confirm_timeout": 1}))
    (node.var / "state.json").write_text("[not an object")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "systemctl").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/systemctl.log\n")
    (fake / "systemctl").chmod(0o755)
    answer = node.run("boot", path=f"{fake}:{os.environ['PATH']}")
    assert answer["trial"] is True and answer["rebooting"] is True
    assert "could not settle state.json" in answer["_stderr"]
    assert (tmp_path / "systemctl.log").read_text().split() == ["reboot"]


def test_receive_writes_only_a_transfers_files_in_incoming(node: NodeRoot) -> None:
    """`receive` (how `become` stages as a login user other than root) appends stdin to one of a
    transfer's files in .incoming, resuming at --offset, and writes nothing anywhere else."""
    incoming = node.images / ".incoming"

    def receive(path: str, data: bytes, *options: str) -> dict[str, Any]:
        env = {**os.environ, "IMAGETOOL_NODE_ROOT": str(node.root), "IMAGETOOL_NODE_BOOT_ID_FILE": str(node.boot_id)}
        r = subprocess.run([sys.executable, str(HELPER), "receive", path, *options], input=data,
                           capture_output=True, env=env, timeout=60)
        return json.loads(r.stdout)

    target = str(incoming / "web-2.squashfs")
    assert receive(target, b"first part ") == {"ok": True, "path": target, "received_bytes": 11}
    assert receive(target, b"and the rest", "--offset", "11")["received_bytes"] == 12
    assert (incoming / "web-2.squashfs").read_bytes() == b"first part and the rest"
    wrong = receive(target, b"x", "--offset", "5")
    assert not wrong["ok"] and "holds 23 bytes, not 5" in wrong["error"]
    assert receive(target, b"again")["received_bytes"] == 5  # offset 0 starts over
    assert (incoming / "web-2.squashfs").read_bytes() == b"again"
    pack = f"{incoming}/web-2.delta-{'0' * 16}.tar"  # a delta pack (delta staging) is a transfer's file too
    assert receive(pack, b"tar")["received_bytes"] == 3
    for path in (str(node.root / "etc/passwd"), f"{incoming}/web-2.delta-xyz.tar", str(node.images / "web-2.squashfs"),
                 f"{incoming}/../web-3.squashfs", f"{incoming}/web-3.squashfs.extra", f"{incoming}/.squashfs"):
        answer = receive(path, b"evil")
        assert not answer["ok"], path
    assert not (node.root / "etc/passwd").exists() and not (node.images / "web-3.squashfs").exists()
