"""Staging: put a release's image, manifest and signature on nodes without disturbing them.

Files travel into the helper's `.incoming/` and `stage-commit` verifies them (sha256, signature
if the node trusts keys) and moves them into place, manifest last. A node that already has the
image is skipped (0 bytes); a transfer cut short resumes where it stopped; a node without room
is refused before anything is written.

Signatures are checked twice before a byte leaves: against the keys the operator trusts (the
inventory's `trusted_keys`, `--trusted-key`), once for the whole run; and against the keys each
node says it trusts (stage-info), so a node that would refuse the release is not sent 250 MB
first. The node's own check at stage-commit is the one that counts: it holds whatever the
controller was told.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from imagetool.chunks import ChunkStore, DeltaPlan
from imagetool.errors import ImagetoolError, NodeError, VerificationError
from imagetool.signing import TrustedKey, load_trusted_keys, signed_by
from imagetool.store import Store, StoredRelease
from imagetool.units import human_bytes
from rollout.node import HelperError, Node, StageInfo, for_each, incoming_paths, under_lock

StageOutcome = Literal["present", "staged", "resumed", "failed"]


class StageProgress(Protocol):
    """Callbacks from staging threads (one per node): must be thread-safe and quick."""

    def stage_start(self, node: str, total: int) -> None: ...

    def stage_advance(self, node: str, done: int) -> None: ...

    def stage_end(self, node: str, result: StageResult) -> None: ...


class NoProgress:
    def stage_start(self, node: str, total: int) -> None:
        pass

    def stage_advance(self, node: str, done: int) -> None:
        pass

    def stage_end(self, node: str, result: StageResult) -> None:
        pass


@dataclass
class StageResult:
    node: str
    image_id: str
    outcome: StageOutcome
    bytes_sent: int = 0
    seconds: float = 0.0
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False, compare=False)
    # How the image travelled: pushed whole, pushed as a delta, pulled by the node from an HTTP
    # store (None: it did not travel).
    mode: Literal["full", "delta", "pull"] | None = None
    full_bytes: int = 0  # what sending the whole image (with manifest and signature) costs: "sent N of M"
    note: str | None = None  # why a delta was not used, when it could have been

    @property
    def ok(self) -> bool:
        return self.outcome != "failed"

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "image": self.image_id, "outcome": self.outcome, "bytes_sent": self.bytes_sent,
                "full_bytes": self.full_bytes, "mode": self.mode, "note": self.note,
                "seconds": round(self.seconds, 1), "error": self.error}


@dataclass
class StageReport:
    image_id: str
    results: dict[str, StageResult] = field(default_factory=dict)

    @property
    def failed(self) -> dict[str, StageResult]:
        return {k: r for k, r in self.results.items() if not r.ok}

    @property
    def bytes_sent(self) -> int:
        return sum(r.bytes_sent for r in self.results.values())

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image_id, "bytes_sent": self.bytes_sent,
                "nodes": [r.to_dict() for r in self.results.values()]}


def needed_bytes(release: StoredRelease, partial: int) -> int:
    """Bytes a transfer still writes on the node, resuming from `partial` bytes of the image."""
    size = release.manifest.image.size
    rest = size - partial if 0 < partial <= size else size
    extra = release.manifest_path.stat().st_size + (release.sig_path.stat().st_size if release.sig_path else 0)
    return rest + extra


# Seconds a node may take to pull an image from an HTTP store: a stalled store is an error, not a hang.
PULL_TIMEOUT = 1800.0

# Below this many free bytes after a failed write, the node's /var is taken to be full.
FULL_BELOW = 1024 * 1024


def _disk_full(node: Node, image_id: str, error: ImagetoolError) -> bool:
    """Did this transfer fail because the node's /var filled up? The node's own words may not
    make it back (the channel closes when `cat` dies), so ask the node how much is left."""
    if "No space left on device" in str(error):
        return True
    try:
        return node.stage_info(image_id).free_bytes < FULL_BELOW
    except ImagetoolError:
        return False  # unreachable: nothing to say about its disk


def stage(node: Node, release: StoredRelease, progress: StageProgress | None = None, *,
          delta: bool = True, source: str | None = None) -> StageResult:
    """Stage `release` on one node; raises on failure (stage_all turns that into data).
    delta=False: the whole image, even where a delta could be sent. source: the node pulls what
    it lacks from this HTTP store (`imagetool publish`) itself; the controller sends the manifest."""
    progress = progress or NoProgress()
    start = time.monotonic()
    image = release.manifest.image
    full = needed_bytes(release, 0)
    info = node.stage_info(release.id)
    check_for_node(node.name, release, info)
    if info.present and info.sha256 == image.sha256:
        result = StageResult(node.name, release.id, "present", 0, time.monotonic() - start, full_bytes=full)
        progress.stage_end(node.name, result)
        return result
    if source is not None:
        sent = _pull(node, release, info, source, progress)
        result = StageResult(node.name, release.id, "staged", sent, time.monotonic() - start, mode="pull",
                             full_bytes=full)
        progress.stage_end(node.name, result)
        return result
    note = None
    plan, why_not = delta_plan(release, info) if delta else (None, None)
    if plan is not None:
        try:
            sent, resumed = _send_delta(node, release, info, plan, progress)
            result = StageResult(node.name, release.id, "resumed" if resumed else "staged", sent,
                                 time.monotonic() - start, mode="delta", full_bytes=full)
            progress.stage_end(node.name, result)
            return result
        except HelperError as e:
            # The node answered that it could not rebuild the image from its seeds (a seed that
            # rotted, casync failing, the result not verifying): it gets the whole image, as a
            # node without seeds does. A node that stopped answering (a lost connection, a power
            # cut) is not sent anything more: that is the node's failure, as for a whole image.
            note = f"delta failed ({e}); sent the whole image"
            info = node.stage_info(release.id)
    sent, resumed = _send_full(node, release, info, progress)
    result = StageResult(node.name, release.id, "resumed" if resumed else "staged", sent, time.monotonic() - start,
                         mode="full", full_bytes=full, note=note or why_not)
    progress.stage_end(node.name, result)
    return result


def delta_plan(release: StoredRelease, info: StageInfo) -> tuple[DeltaPlan | None, str | None]:
    """The delta for this node, or None and why not (None: the node has nothing to seed from)."""
    if not info.casync:
        return None, "the node has no casync"
    return _delta_from(release, info.seeds)


def _delta_from(release: StoredRelease, held: Sequence[tuple[str, str | None]]) -> tuple[DeltaPlan | None, str | None]:
    """The delta to `release` from the images (id, sha256) a node holds that the store has too."""
    if shutil.which("casync") is None:
        return None, "casync is not installed here"
    store = Store(release.squashfs_path.parent)
    seeds = []
    for seed_id, sha256 in held:
        try:
            seed = store.get(seed_id) if store.has(seed_id) else None
        except ImagetoolError:
            continue
        if seed is not None and seed.manifest.image.sha256 == sha256 and seed.squashfs_path.exists():
            seeds.append(seed)
    if not seeds:
        return None, None
    try:
        plan = ChunkStore(store.path).plan(release, seeds)
    except (ImagetoolError, OSError) as e:
        return None, f"no delta: {e}"
    return plan, None if plan is not None else "a delta would not be smaller"


def estimate(release: StoredRelease, held: Sequence[tuple[str, str | None]], *, delta: bool = True) -> tuple[int, str]:
    """What staging `release` on a node holding `held` (id, sha256) would send, and how: for plans,
    before any node is asked for more than its status. The pack a delta would send (the node's
    own casync and its seeds' health are known only when staging), else the whole image."""
    plan = _delta_from(release, [(i, s) for i, s in held if i != release.id])[0] if delta else None
    if plan is not None:
        extra = needed_bytes(release, release.manifest.image.size)  # manifest and signature
        return plan.pack_bytes + extra, f"delta from {', '.join(plan.seeds)}"
    return needed_bytes(release, 0), "whole image"


def _space_for(node: Node, release: StoredRelease, info: StageInfo, need: int) -> None:
    if info.free_bytes < need:
        raise NodeError(
            f"node {node.name}: not enough space to stage {release.id}: needs {human_bytes(need)}, "
            f"{human_bytes(info.free_bytes)} free in {info.incoming}", nodes=[node.name]
        )


def _on_full_disk(node: Node, release: StoredRelease, e: ImagetoolError) -> None:
    """Re-raise a failed write; when /var filled up, give the space back first."""
    if not _disk_full(node, release.id, e):
        raise e  # a lost connection: the partial file stays for the next run to resume
    # Something else filled /var while we wrote: give the space back to the running
    # services rather than keep a partial image they cannot afford.
    try:
        node.stage_abort(release.id)
        what = "the partial transfer was removed"
    except ImagetoolError as abort_error:
        what = f"removing the partial transfer failed too: {abort_error}"
    raise NodeError(f"node {node.name}: /var filled up while staging {release.id} ({e}); {what}; "
                    "the running image is untouched") from None


def _send_meta(node: Node, release: StoredRelease, paths: dict[str, str]) -> int:
    # Manifest and signature first: small, and without them a resumed image cannot be checked.
    sent = node.put(release.manifest_path, paths["manifest"])
    if release.sig_path is not None:
        sent += node.put(release.sig_path, paths["sig"])
    return sent


def _send_delta(node: Node, release: StoredRelease, info: StageInfo, plan: DeltaPlan,
                progress: StageProgress) -> tuple[int, bool]:
    """Send the pack (resuming a cut one), let the node rebuild the image, commit it."""
    pack_bytes = plan.pack_bytes
    partial = dict(info.delta_partials).get(plan.name, 0)
    partial = partial if 0 < partial <= pack_bytes else 0
    # The pack, then the image casync rebuilds beside it.
    _space_for(node, release, info, pack_bytes - partial + release.manifest.image.size)
    paths = incoming_paths(info.incoming, release.id)
    progress.stage_start(node.name, pack_bytes - partial)
    try:
        sent = _send_meta(node, release, paths)
        sent += node.put(plan.pack, f"{info.incoming}/{plan.name}", offset=partial,
                         progress=lambda n: progress.stage_advance(node.name, n))
        node.stage_delta(release.id, plan.seeds, pack=plan.name)
    except ImagetoolError as e:
        _on_full_disk(node, release, e)
    node.stage_commit(release.id)
    return sent, bool(partial)


def _pull(node: Node, release: StoredRelease, info: StageInfo, source: str, progress: StageProgress) -> int:
    """The node fetches the chunks it lacks from the store at `source` (its seeds are every image
    it holds); the controller sends only the manifest and signature."""
    if not info.casync:
        raise NodeError(f"node {node.name}: has no casync, so it cannot pull {release.id} from the store {source}")
    _space_for(node, release, info, release.manifest.image.size)
    progress.stage_start(node.name, 0)
    sent = _send_meta(node, release, incoming_paths(info.incoming, release.id))
    # The helper's own errors name the store (cannot fetch, casync failed, stalled).
    node.stage_delta(release.id, [seed for seed, _ in info.seeds], source=source, timeout=PULL_TIMEOUT)
    try:
        node.stage_commit(release.id)
    except VerificationError as e:
        raise VerificationError(f"the image node {node.name} pulled from the store {source} does not verify: "
                                f"{e}") from None
    return sent


def _send_full(node: Node, release: StoredRelease, info: StageInfo, progress: StageProgress) -> tuple[int, bool]:
    """Send the whole image (resuming a cut transfer) and commit it."""
    image = release.manifest.image
    partial = info.partial_bytes if 0 < info.partial_bytes <= image.size else 0
    _space_for(node, release, info, needed_bytes(release, partial))
    paths = incoming_paths(info.incoming, release.id)
    progress.stage_start(node.name, image.size - partial)
    sent = 0
    try:
        sent += _send_meta(node, release, paths)
        sent += node.put(release.squashfs_path, paths["squashfs"], offset=partial,
                         progress=lambda n: progress.stage_advance(node.name, n))
    except ImagetoolError as e:
        _on_full_disk(node, release, e)
    try:
        node.stage_commit(release.id)
    except ImagetoolError:
        if not partial:
            raise
        # The resumed part did not check out (the helper has already thrown the partial file
        # away): send the whole image once more before giving up.
        progress.stage_start(node.name, image.size)
        sent += _send_meta(node, release, paths)
        sent += node.put(release.squashfs_path, paths["squashfs"], offset=0,
                         progress=lambda n: progress.stage_advance(node.name, n))
        node.stage_commit(release.id)
        partial = 0
    return sent, bool(partial)


def check_release_files(release: StoredRelease, trusted_keys: Sequence[Path] = ()) -> TrustedKey | None:
    """Refuse before touching any node if the release in the store is not what it claims: its
    image's size, and its signature when the operator trusts keys. Returns the key that signed it."""
    size = release.squashfs_path.stat().st_size if release.squashfs_path.exists() else None
    if size != release.manifest.image.size:
        raise VerificationError(
            f"{release.squashfs_path}: {'missing' if size is None else f'{size} bytes'}, "
            f"manifest says {release.manifest.image.size}"
        )
    if not trusted_keys:
        return None
    return _signed_by(release, load_trusted_keys(trusted_keys), f"release {release.id} ({release.manifest_path})")


def _signed_by(release: StoredRelease, keys: Sequence[TrustedKey], what: str) -> TrustedKey:
    try:
        # The bytes that are sent: the manifest file itself, not its parsed form.
        data = release.manifest_path.read_bytes()
        sig = release.sig_path.read_bytes() if release.sig_path is not None else None
    except OSError as e:
        raise VerificationError(f"release {release.id}: cannot read {e.filename}: {e.strerror or e}") from None
    return signed_by(data, sig, keys, what, str(release.sig_path))


def check_for_node(node: str, release: StoredRelease, info: StageInfo) -> None:
    """Refuse, before sending anything, a release this node would refuse for its signature."""
    if not info.trusted_keys:
        return  # the node trusts no key (or its helper does not say): it checks sha256 only
    keys, unusable = [], []
    for k in info.trusted_keys:
        name = f"{k.name} ({'image' if k.where == 'image' else '/var'})"
        try:
            keys.append(TrustedKey.from_pem(name, (k.pem or "").encode()))
        except ImagetoolError:
            unusable.append(name)  # the node's openssl cannot use it either
    if not keys and unusable:
        raise VerificationError(f"node {node}: none of the keys it trusts is an Ed25519 public key "
                                f"({', '.join(unusable)}): it would refuse every release")
    if keys:
        _signed_by(release, keys, f"release {release.id} (for node {node})")


def source_for(node: Node, source: str | None, delta: bool = True) -> str | None:
    """The HTTP store `node` pulls from: the run's (--source), else its inventory's, unless the
    run sends whole images (--no-delta: the way round a store that is down), else none."""
    if source is not None or not delta:
        return source
    return getattr(getattr(node, "spec", None), "source", None)


def stage_all(nodes: Sequence[Node], release: StoredRelease, parallel: int = 4,
              progress: StageProgress | None = None, *,
              lock_as: tuple[str, str, str] | None = None, trusted_keys: Sequence[Path] = (),
              delta: bool = True, source: str | None = None) -> StageReport:
    """Stage on every node, `parallel` at a time; each node's result (or failure) is data.

    `lock_as` (lock id, owner, command): take each node's rollout lock while staging it, for
    staging outside a rollout (a rollout stages under its own locks). `trusted_keys`: the
    release must be signed by one of them, or nothing is sent to any node."""
    check_release_files(release, trusted_keys)
    progress = progress or NoProgress()
    report = StageReport(release.id)

    def one(node: Node) -> StageResult:
        start = time.monotonic()
        src = source_for(node, source, delta)
        try:
            if lock_as is None:
                return stage(node, release, progress, delta=delta, source=src)
            return under_lock(node, *lock_as, lambda n: stage(n, release, progress, delta=delta, source=src))
        except Exception as e:  # noqa: BLE001 - a node's failure is data; Ctrl-C is not
            result = StageResult(node.name, release.id, "failed", 0, time.monotonic() - start, str(e), e)
            progress.stage_end(node.name, result)
            return result

    report.results.update(for_each(nodes, one, parallel))
    return report
