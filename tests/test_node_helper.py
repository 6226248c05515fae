"""The node helper itself (the file the image ships), run here against a fake node root.

The rules that keep a node bootable live in the helper, so they are tested on the helper: locks
and their take-over, gc never removing what the node may boot, the run-once record.
"""

from __future__ import annotations

import json
import os
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

    def run(self, *args: str, ok: bool = True) -> dict[str, Any]:
        env = {**os.environ, "IMAGETOOL_NODE_ROOT": str(self.root), "IMAGETOOL_NODE_BOOT_ID_FILE": str(self.boot_id)}
        r = subprocess.run([sys.executable, str(HELPER), *args], capture_output=True, text=True, env=env, timeout=60)
        answer = json.loads(r.stdout)
        assert answer["ok"] is ok, answer
        return answer

    def add_image(self, image_id: str, mtime: float, size: int = 1000) -> None:
        (self.images / f"{image_id}.squashfs").write_bytes(b"x" * size)
        (self.images / f"{image_id}.manifest.json").write_text(json.dumps({"image": {"sha256": "0" * 64}}))
        os.utime(self.images / f"{image_id}.squashfs", (mtime, mtime))

    def boot(self, image_id: str, default: str, previous: str | None = None, next_id: str | None = None) -> None:
        (self.root / "etc/imagetool/release.json").write_text(json.dumps(
            {"name": image_id.rsplit("-", 1)[0], "version": image_id.rsplit("-", 1)[1]}))
        (self.var / "boot/control.json").write_text(json.dumps({"default": default, "next": next_id}))
        (self.var / "state.json").write_text(json.dumps({"committed": default, "previous": previous}))

    def installed(self) -> set[str]:
        return {p.name.removesuffix(".squashfs") for p in self.images.glob("*.squashfs")}


@pytest.fixture
def node(tmp_path: Path) -> NodeRoot:
    return NodeRoot(tmp_path / "node")


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
