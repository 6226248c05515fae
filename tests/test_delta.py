"""Delta staging against the real node helper (rollout.local) and the real casync on both ends:
only the chunks a node lacks travel, what arrives is checked like any transfer, and every way
the delta can go wrong ends with the node holding the right image or its old one."""

from __future__ import annotations

import io
import random
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagetool.store import StoredRelease
from rollout.delta import ChunkStore, read_index
from rollout.local import LocalMachine, local_nodes
from rollout.node import HelperNode
from rollout.stage import stage
from tests.local_fleet import OLD, Fleet, fleet, machine, state  # noqa: F401 - fixtures
from tests.samples import make_release

pytestmark = pytest.mark.skipif(shutil.which("casync") is None, reason="casync is not installed (scripts/setup)")

SIZE = 4 * 1024 * 1024


def old_bytes() -> bytes:
    return random.Random(1).randbytes(SIZE)


def changed(data: bytes) -> bytes:
    """`data` with 64 KiB rewritten in the middle and 100 bytes inserted near the start."""
    noise = random.Random(2).randbytes(64 * 1024)
    mid = len(data) // 2
    return data[:4096] + b"i" * 100 + data[4096:mid] + noise + data[mid + len(noise):]


@pytest.fixture
def old(tmp_path: Path) -> StoredRelease:
    """OLD (the fleet's installed release) with 4 MiB of content, in the fleet's store."""
    return make_release(tmp_path / "store", "web", "1.0", old_bytes())


@pytest.fixture
def new(tmp_path: Path, old: StoredRelease) -> StoredRelease:
    return make_release(tmp_path / "store", "web", "1.1", changed(old_bytes()))


@pytest.fixture
def node(tmp_path: Path, old: StoredRelease) -> Iterator[HelperNode]:
    """One local node, OLD installed, committed and booted."""
    m = LocalMachine(tmp_path / "n1", timer_delay=0)
    m.install_release(old, commit=True)
    m.power_on()
    yield local_nodes([m])[0]
    m.power_off()


def installed(node: HelperNode, release: StoredRelease) -> Path:
    return machine(node).node_var.images / f"{release.id}.squashfs"


def test_a_node_holding_the_old_image_gets_only_the_chunks_it_lacks(node: HelperNode, new: StoredRelease) -> None:
    result = stage(node, new)
    assert result.outcome == "staged" and result.mode == "delta", result
    assert result.bytes_sent < 0.15 * SIZE, result  # 64 KiB changed, ~64 KiB chunks either side
    assert result.image_bytes == new.manifest.image.size
    assert installed(node, new).read_bytes() == new.squashfs_path.read_bytes()
    incoming = machine(node).node_var.incoming
    assert sorted(p.name for p in incoming.iterdir()) == []  # the pack and the chunk store are gone
    again = stage(node, new)
    assert again.outcome == "present" and again.bytes_sent == 0


def test_the_same_image_with_nothing_changed_sends_almost_nothing(node: HelperNode, tmp_path: Path) -> None:
    """A rebuild of the same content under a new version: only the index and the manifest travel."""
    same = make_release(tmp_path / "store", "web", "1.2", old_bytes())
    result = stage(node, same)
    assert result.mode == "delta" and result.bytes_sent < 0.01 * SIZE, result
    assert installed(node, same).read_bytes() == old_bytes()


def test_a_node_without_a_seed_the_store_knows_gets_the_whole_image(fleet: Fleet, tmp_path: Path) -> None:
    nodes = fleet(1)  # installed with the fleet's 1000-byte OLD, which is not in this store
    other = make_release(tmp_path / "other", "web", "2.0", old_bytes())
    result = stage(nodes[0], other)
    assert result.mode == "full" and result.bytes_sent >= SIZE, result
    assert installed(nodes[0], other).read_bytes() == old_bytes()


def test_a_corrupt_seed_on_the_node_falls_back_to_the_whole_image(node: HelperNode, new: StoredRelease,
                                                                   old: StoredRelease) -> None:
    seed = installed(node, old)
    data = bytearray(seed.read_bytes())
    for i in range(0, len(data), 4096):
        data[i] ^= 0xFF  # every chunk of the seed rots
    seed.write_bytes(bytes(data))
    result = stage(node, new)
    assert result.mode == "full" and result.bytes_sent >= SIZE, result
    assert result.note and "delta failed" in result.note and "casync" in result.note, result.note
    assert installed(node, new).read_bytes() == new.squashfs_path.read_bytes()


def test_a_cut_delta_resumes_where_it_stopped(node: HelperNode, new: StoredRelease, old: StoredRelease) -> None:
    plan = ChunkStore(new.squashfs_path.parent).plan(new, [old])
    assert plan is not None
    pack = plan.pack.read_bytes()
    incoming = machine(node).node_var.incoming
    incoming.mkdir(parents=True, exist_ok=True)
    (incoming / plan.name).write_bytes(pack[: len(pack) // 2])
    result = stage(node, new)
    assert result.outcome == "resumed" and result.mode == "delta", result
    manifest_and_sig = new.manifest_path.stat().st_size
    assert result.bytes_sent == len(pack) - len(pack) // 2 + manifest_and_sig
    assert installed(node, new).read_bytes() == new.squashfs_path.read_bytes()


def test_var_filling_up_during_a_delta_gives_the_space_back(node: HelperNode, new: StoredRelease,
                                                            old: StoredRelease) -> None:
    machine(node).disk_fills_after = 1000
    with pytest.raises(Exception, match="filled up"):
        stage(node, new)
    incoming = machine(node).node_var.incoming
    assert not any(p.name.endswith(".tar") for p in incoming.iterdir())
    st = state(node)
    assert st.committed == OLD and st.booted == OLD
    assert installed(node, old).read_bytes() == old_bytes()


def pack_with(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("members, error", [
    ({"../../../../etc/evil": b"x"}, "unexpected member"),
    ({"0000/../../x.cacnk": b"x"}, "unexpected member"),
    ({"index.caibx": b"short"}, "not a casync blob index"),
    ({"00ab/" + "ab" * 32 + ".cacnk": b"x"}, "no index.caibx"),
])
def test_the_helper_refuses_a_hostile_or_broken_pack(node: HelperNode, new: StoredRelease, members: dict[str, bytes],
                                                     error: str) -> None:
    """Whatever a pack holds, the helper writes only chunk files into its own chunk store."""
    incoming = machine(node).node_var.incoming
    incoming.mkdir(parents=True, exist_ok=True)
    shutil.copy(new.manifest_path, incoming / f"{new.id}.manifest.json")
    name = f"{new.id}.delta-{'0' * 32}.tar"
    (incoming / name).write_bytes(pack_with(members))
    with pytest.raises(Exception, match=error):
        node.stage_delta(new.id, name, [OLD])
    assert not (machine(node).root / "etc/evil").exists()
    assert sorted(p.name for p in incoming.iterdir()) == [f"{new.id}.manifest.json"]


def test_a_pack_whose_index_does_not_match_the_manifest_is_refused(node: HelperNode, new: StoredRelease,
                                                                   old: StoredRelease, tmp_path: Path) -> None:
    """The size to rebuild comes from the manifest (signed, where the node trusts keys), never
    from the pack alone: an index describing other bytes is refused before casync runs."""
    other = make_release(tmp_path / "store", "web", "9.0", old_bytes() + b"more")
    plan = ChunkStore(other.squashfs_path.parent).plan(other, [old])
    assert plan is not None
    incoming = machine(node).node_var.incoming
    incoming.mkdir(parents=True, exist_ok=True)
    shutil.copy(new.manifest_path, incoming / f"{new.id}.manifest.json")
    name = f"{new.id}.delta-{'1' * 32}.tar"
    shutil.copy(plan.pack, incoming / name)
    with pytest.raises(Exception, match="index describes"):
        node.stage_delta(new.id, name, [OLD])


def test_read_index_gives_the_chunks_in_order(new: StoredRelease) -> None:
    chunks = read_index(ChunkStore(new.squashfs_path.parent).index(new))
    assert sum(c.size for c in chunks) == new.manifest.image.size
    assert len(chunks) > 10 and all(len(c.id) == 64 for c in chunks)


def test_no_delta_sends_the_whole_image(node: HelperNode, new: StoredRelease) -> None:
    result = stage(node, new, delta=False)
    assert result.mode == "full" and result.bytes_sent >= SIZE and result.note is None, result
    assert installed(node, new).read_bytes() == new.squashfs_path.read_bytes()
