"""An in-memory node for unit tests of the rollout: the node model without SSH or reboots.

`FakeNode` follows the node helper's rules (one-shot next boot consumed at boot, commit makes the
booted image the default and the old default the previous one, locks by rollout id) and records
every action in a shared `log` so tests can assert the order of things across nodes. Time is
simulated: a node that hangs in an image comes back by its dead-man switch only to a wait that
lasts longer than the confirm timeout it was given.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from imagetool.errors import LockedError, NodeError, UnreachableError
from imagetool.manifest import ImageInfo, sha256_file
from imagetool.store import StoredRelease, Store
from rollout.inventory import NodeSpec
from rollout.node import BootTimeoutError, HelperError, NodeImage, NodeStatus, StageInfo
from rollout.transport import CommandResult
from tests.test_store import make_manifest

INCOMING = "/var/lib/imagetool/images/.incoming"


def make_release(store_dir: Path, name: str, version: str, content: bytes = b"squashfs image bytes") -> StoredRelease:
    store = Store(store_dir)
    rid = f"{name}-{version}"
    with store.staging(rid) as st:
        st.squashfs_path.write_bytes(content)
        image = ImageInfo(f"{rid}.squashfs", len(content), sha256_file(st.squashfs_path))
        st.manifest_path.write_bytes(make_manifest(name, version, image).to_json())
        return st.commit()


class FakeNode:
    def __init__(
        self,
        name: str,
        image: str = "web-1.0",
        log: list[tuple[str, str, str]] | None = None,
        *,
        free_bytes: int = 10**12,
        can_reset: bool = False,
    ) -> None:
        self.spec = NodeSpec(name=name, host=f"10.0.0.{abs(hash(name)) % 250 + 1}")
        self._name = name
        self.log = log if log is not None else []
        self._lock = threading.Lock()
        # image id -> (sha256, size)
        self.images: dict[str, tuple[str | None, int]] = {image: ("0" * 64, 100)}
        self.default: str | None = image
        self.next: str | None = None
        self.committed: str | None = image
        self.previous: str | None = None
        self.booted: str | None = image
        self.boots = 1
        self.confirm_timeout: float | None = None
        self.trial: dict[str, Any] | None = None
        self.lock_held: dict[str, Any] | None = None
        self.run_once: dict[str, Any] | None = None
        self.free = free_bytes
        self.incoming: dict[str, int] = {}  # remote path -> bytes there
        self.incoming_src: dict[str, Path] = {}
        self.bytes_received = 0
        self._can_reset = can_reset
        # Behaviour knobs for tests.
        self.unreachable = False
        self.unhealthy_images: set[str] = set()
        self.hangs_on: set[str] = set()  # booting these never reaches sshd
        self.hung = False
        self.fail_on: dict[str, BaseException] = {}  # action -> exception to raise
        # command (or (command, booted image)) -> exit status of run_shell
        self.shell_results: dict[Any, int] = {}

    # --- bookkeeping --------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def can_reset(self) -> bool:
        return self._can_reset

    @property
    def boot_id(self) -> str:
        return f"{self._name}-boot-{self.boots}"

    def _act(self, action: str, arg: str = "") -> None:
        self.log.append((self._name, action, arg))
        exc = self.fail_on.get(action)
        if exc is not None:
            raise exc
        if self.unreachable or self.hung:
            raise UnreachableError(f"node {self._name}: cannot connect: connection timed out")

    def actions(self, *names: str) -> list[tuple[str, str]]:
        return [(a, arg) for n, a, arg in self.log if n == self._name and (not names or a in names)]

    def _boot(self) -> None:
        """What the firmware does: consume the one-shot entry, else boot the default."""
        self.boots += 1
        image = self.next or self.default
        self.next = None
        self.booted = image
        self.trial = None
        if image != self.default:
            self.trial = {"id": image, "boot_id": self.boot_id, "confirmed": None, "deadline": self.confirm_timeout}
        self.hung = image in self.hangs_on

    def _deadman(self) -> None:
        """The node's dead-man switch fires on an unconfirmed trial: boot the default."""
        self.next = None
        self.hung = False
        self.boots += 1
        self.booted = self.default
        self.trial = None

    # --- the Node interface --------------------------------------------------------------

    def status(self) -> NodeStatus:
        self._act("status")
        return NodeStatus(
            name=self._name, booted=self.booted, default=self.default, next=self.next,
            committed=self.committed, previous=self.previous, boot_id=self.boot_id,
            images=tuple(NodeImage(i, size, sha) for i, (sha, size) in self.images.items()),
            free_bytes=self.free, lock=self.lock_held, system_state="running", trial=self.trial,
            time=time.time(), run_once=self.run_once,
        )

    def stage_info(self, image_id: str) -> StageInfo:
        self._act("stage-info", image_id)
        sha = self.images.get(image_id, (None, 0))[0]
        partial = self.incoming.get(f"{INCOMING}/{image_id}.squashfs", 0)
        return StageInfo(image_id in self.images, sha, partial, self.free, INCOMING)

    def put(self, local: Path, remote: str, offset: int = 0, progress: Any = None) -> int:
        self._act("put", remote)
        size = Path(local).stat().st_size
        n = size - offset
        self.incoming[remote] = (self.incoming.get(remote, 0) if offset else 0) + n
        self.incoming_src[remote] = Path(local)
        self.bytes_received += n
        if progress is not None:
            progress(n)
        return n

    def stage_commit(self, image_id: str) -> dict[str, Any]:
        self._act("stage-commit", image_id)
        squashfs = f"{INCOMING}/{image_id}.squashfs"
        manifest = f"{INCOMING}/{image_id}.manifest.json"
        if squashfs not in self.incoming or manifest not in self.incoming:
            raise HelperError(self._name, "stage-commit", f"{image_id}: not transferred")
        doc = json.loads(self.incoming_src[manifest].read_bytes())
        if self.incoming[squashfs] != doc["image"]["size"]:
            del self.incoming[squashfs]
            raise HelperError(self._name, "stage-commit", f"{image_id}: sha256 mismatch")
        self.images[image_id] = (doc["image"]["sha256"], doc["image"]["size"])
        for k in [k for k in self.incoming if f"/{image_id}." in k]:
            del self.incoming[k]
        return {"sha256": doc["image"]["sha256"]}

    def stage_abort(self, image_id: str) -> dict[str, Any]:
        self._act("stage-abort", image_id)
        for k in [k for k in self.incoming if f"/{image_id}." in k]:
            del self.incoming[k]
        return {"freed_bytes": 0}

    def set_next(self, image_id: str, confirm_timeout: float, rollout_id: str | None) -> None:
        self._act("set-next", image_id)
        if image_id not in self.images:
            raise HelperError(self._name, "set-next", f"{image_id} is not staged on this node")
        self.next = image_id
        self.confirm_timeout = confirm_timeout

    def clear_next(self) -> None:
        self._act("clear-next")
        self.next = None

    def reboot(self) -> str:
        self._act("reboot")
        old = self.boot_id
        self._boot()
        return old

    def wait_for_boot(self, old_boot_id: str | None, timeout: float, cancel: Any = None) -> NodeStatus:
        self.log.append((self._name, "wait-for-boot", f"{timeout:g}"))
        if self.hung:
            if self.trial is not None and timeout >= (self.confirm_timeout or 0):
                self._deadman()
            else:
                raise BootTimeoutError(f"node {self._name}: not back with a new boot within {timeout:g}s")
        if self.unreachable:
            raise BootTimeoutError(f"node {self._name}: not back with a new boot within {timeout:g}s")
        st = self.status()
        if st.boot_id == old_boot_id:
            raise BootTimeoutError(f"node {self._name}: still on the old boot")
        return st

    def health(self, wait: float = 0) -> dict[str, Any]:
        self._act("health", self.booted or "")
        ok = self.booted not in self.unhealthy_images
        return {"healthy": ok, "checks": [{"name": "system-running", "ok": ok,
                                           "detail": "systemctl is-system-running: " + ("running" if ok else "degraded"),
                                           "output": "" if ok else "app.service failed"}]}

    def run_shell(self, command: str, timeout: float) -> CommandResult:
        self._act("run-shell", command)
        status = self.shell_results.get((command, self.booted), self.shell_results.get(command, 0))
        return CommandResult(command, status, "out", "", self.spec.host, self._name)

    def confirm(self, image_id: str) -> None:
        self._act("confirm", image_id)
        if self.booted != image_id:
            raise HelperError(self._name, "confirm", f"booted {self.booted}, not {image_id}")
        if self.trial:
            self.trial["confirmed"] = True

    def commit(self, image_id: str, rollout_id: str | None) -> None:
        self._act("commit", image_id)
        if self.booted != image_id:
            raise HelperError(self._name, "commit", f"refusing to commit {image_id}: the node booted {self.booted}")
        if self.trial and not self.trial.get("confirmed"):
            raise HelperError(self._name, "commit", f"refusing to commit {image_id}: this boot is not confirmed")
        old = self.default
        self.default = image_id
        self.next = None
        if old and old != image_id:
            self.previous = old
        self.committed = image_id
        self.trial = None

    def lock(self, rollout_id: str, owner: str, command: str, *, take_over: str | None = None,
             pid: int | None = None) -> dict[str, Any]:
        self._act("lock", rollout_id)
        held = self.lock_held
        if held and held["rollout"] != rollout_id and held["rollout"] != take_over:
            raise LockedError(f"node {self._name}: locked by rollout {held['rollout']}")
        self.lock_held = {"rollout": rollout_id, "owner": owner, "command": command, "pid": pid, "time": time.time()}
        return {"locked": True, "broken": held if held and held["rollout"] == take_over else None}

    def ran_once(self, image_id: str, rollout_id: str) -> None:
        self._act("ran-once", image_id)
        self.run_once = {"release": image_id, "rollout": rollout_id}

    def unlock(self, rollout_id: str) -> None:
        self._act("unlock", rollout_id)
        if self.lock_held and self.lock_held["rollout"] != rollout_id:
            raise HelperError(self._name, "unlock", "held by another rollout")
        self.lock_held = None

    def gc(self, keep: int = 0, incoming: bool = False) -> dict[str, Any]:
        self._act("gc")
        return {"removed": []}

    def reset(self) -> None:
        self.log.append((self._name, "reset", ""))
        if not self._can_reset:
            raise NodeError(f"node {self._name}: no reset_command in the inventory")
        self.hung = False
        self._boot()

    def close(self) -> None:
        pass
