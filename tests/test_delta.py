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

from imagetool.chunks import ChunkStore, read_index
from imagetool.store import StoredRelease
from rollout.local import LocalMachine, local_nodes
from rollout.node import HelperNode
from rollout.stage import needed_bytes, stage, stage_all
from rollout.update import Rollout
from tests.local_fleet import OLD, Fleet, fleet, machine, options, state  # noqa: F401 - fixtures
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
    assert result.full_bytes == new.manifest.image.size + new.manifest_path.stat().st_size
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


def test_a_plan_estimates_the_delta_and_the_rollout_sends_it(node: HelperNode, new: StoredRelease,
                                                              old: StoredRelease) -> None:
    planned = Rollout([node], options(dry_run=True)).run(new).node(node.name)
    assert planned.outcome == "planned" and planned.detail == f"stage (delta from {old.id}), then activate"
    assert 0 < planned.stage_bytes < 0.15 * SIZE, planned
    whole = Rollout([node], options(dry_run=True, delta=False)).run(new).node(node.name)
    assert whole.stage_bytes == needed_bytes(new, 0) and whole.detail == "stage (whole image), then activate"
    done = stage(node, new)
    assert done.mode == "delta" and done.bytes_sent == planned.stage_bytes, (done, planned)


def test_nodes_holding_the_same_images_share_one_plan(new: StoredRelease, old: StoredRelease,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = ChunkStore(new.squashfs_path.parent)
    first = chunks.plan(new, [old])
    assert first is not None and first.new_chunks < first.chunks
    monkeypatch.setattr(ChunkStore, "_plan", lambda *a: pytest.fail("planned again for the same seed set"))
    assert ChunkStore(new.squashfs_path.parent).plan(new, [old]) is first
    monkeypatch.undo()
    first.pack.unlink()  # gone (gc): made again, the same bytes under the same name
    again = chunks.plan(new, [old])
    assert again is not None and again.pack == first.pack and again.pack.exists()


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
        node.stage_delta(new.id, [OLD], pack=name)
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
        node.stage_delta(new.id, [OLD], pack=name)


def test_read_index_gives_the_chunks_in_order(new: StoredRelease) -> None:
    chunks = read_index(ChunkStore(new.squashfs_path.parent).index(new))
    assert sum(c.size for c in chunks) == new.manifest.image.size
    assert len(chunks) > 10 and all(len(c.id) == 64 for c in chunks)


def test_no_delta_sends_the_whole_image(node: HelperNode, new: StoredRelease) -> None:
    result = stage(node, new, delta=False)
    assert result.mode == "full" and result.bytes_sent >= SIZE and result.note is None, result
    assert installed(node, new).read_bytes() == new.squashfs_path.read_bytes()


# --- nodes that pull from an HTTP store ------------------------------------------------------------------


class Served:
    """A directory served over HTTP on 127.0.0.1 (a thread of this process), counting the bytes
    it serves; `delay` seconds before each answer plays a slow store."""

    def __init__(self, root: Path, delay: float = 0) -> None:
        import functools
        import http.server
        import threading

        self.bytes = 0
        self.delay = delay
        served = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def copyfile(self, source, outputfile) -> None:  # type: ignore[no-untyped-def]
                import time

                time.sleep(served.delay)
                data = source.read()
                served.bytes += len(data)
                outputfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                      functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/store"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path / "www")
    yield s
    s.close()


def published(new: StoredRelease, tmp_path: Path) -> Path:
    from imagetool.chunks import publish

    to = tmp_path / "www" / "store"
    result = publish(new, to)
    assert result.chunks > 10 and result.new_chunks == len({*(c.id for c in read_index(to / f"{new.id}.caibx"))})
    return to


def test_a_node_pulls_only_what_it_lacks_from_an_http_store(node: HelperNode, new: StoredRelease, tmp_path: Path,
                                                            served: Served) -> None:
    published(new, tmp_path)
    result = stage(node, new, source=served.url)
    assert result.mode == "pull" and result.outcome == "staged", result
    # The controller sent the manifest; the node fetched the index and the chunks its seed lacks.
    assert result.bytes_sent == new.manifest_path.stat().st_size
    assert 0 < served.bytes < 0.15 * SIZE, served.bytes
    assert installed(node, new).read_bytes() == new.squashfs_path.read_bytes()


def test_a_node_whose_inventory_names_a_store_pulls_from_it(node: HelperNode, new: StoredRelease, tmp_path: Path,
                                                            served: Served) -> None:
    """The inventory's `source` (a site's mirror): the node pulls unless the run says otherwise."""
    import dataclasses

    from rollout.node import HelperNode as Helper

    published(new, tmp_path)
    near = Helper(dataclasses.replace(node.spec, source=served.url), node.transport)
    planned = Rollout([near], options(dry_run=True)).run(new).node(near.name)
    assert planned.detail == f"pull from {served.url}, then activate", planned
    # --no-delta is the way round a store that is down: the controller sends the whole image.
    whole = stage_all([near], new, delta=False).results[near.name]
    assert whole.mode == "full" and served.bytes == 0, whole
    for f in machine(near).node_var.images.glob(f"{new.id}.*"):
        f.unlink()  # staged again below, this time from the store
    pulled = stage_all([near], new).results[near.name]
    assert pulled.mode == "pull" and 0 < served.bytes < 0.15 * SIZE, (pulled, served.bytes)
    assert installed(near, new).read_bytes() == new.squashfs_path.read_bytes()


def test_publishing_a_second_release_adds_only_its_new_chunks(new: StoredRelease, old: StoredRelease,
                                                              tmp_path: Path) -> None:
    from imagetool.chunks import publish

    to = tmp_path / "www" / "store"
    first = publish(old, to)
    second = publish(new, to)
    assert first.new_chunks == first.chunks and 0 < second.new_chunks < 0.15 * second.chunks, (first, second)
    assert (to / f"{new.id}.manifest.json").read_bytes() == new.manifest_path.read_bytes()
    assert publish(new, to).new_chunks == 0


def assert_untouched(node: HelperNode, new: StoredRelease) -> None:
    st = state(node)
    assert st.committed == OLD and st.booted == OLD and not st.has_image(new.id)
    assert sorted(p.name for p in machine(node).node_var.incoming.iterdir()) in (
        [], [f"{new.id}.manifest.json"]), "nothing but the manifest is left behind"


def test_a_store_that_is_down_is_named_and_the_node_keeps_its_image(node: HelperNode, new: StoredRelease,
                                                                    tmp_path: Path, served: Served) -> None:
    published(new, tmp_path)
    url = served.url
    served.close()
    with pytest.raises(Exception) as e:
        stage(node, new, source=url)
    assert f"store {url}" in str(e.value) and "n1" in str(e.value), e.value
    assert_untouched(node, new)


def test_a_corrupt_chunk_in_the_store_is_refused(node: HelperNode, new: StoredRelease, old: StoredRelease,
                                                 tmp_path: Path, served: Served) -> None:
    to = published(new, tmp_path)
    have = {c.id for c in read_index(ChunkStore(old.squashfs_path.parent).index(old))}
    lacking = next(c.id for c in read_index(to / f"{new.id}.caibx") if c.id not in have)
    chunk = to / "chunks" / lacking[:4] / f"{lacking}.cacnk"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(Exception) as e:
        stage(node, new, source=served.url)
    assert f"store {served.url}" in str(e.value) and "n1" in str(e.value), e.value
    assert_untouched(node, new)


def test_a_store_without_the_index_is_named(node: HelperNode, new: StoredRelease, tmp_path: Path,
                                            served: Served) -> None:
    to = published(new, tmp_path)
    (to / f"{new.id}.caibx").unlink()
    with pytest.raises(Exception, match=rf"store {served.url}: cannot fetch {new.id}.caibx: (Not Found|File not found)"):
        stage(node, new, source=served.url)
    assert_untouched(node, new)


def test_a_stalled_store_is_an_error_not_a_hang(node: HelperNode, new: StoredRelease, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    published(new, tmp_path)
    slow = Served(tmp_path / "www", delay=3)
    monkeypatch.setattr("rollout.stage.PULL_TIMEOUT", 2.0)
    try:
        with pytest.raises(Exception, match="slow or stalled|timed out"):
            stage(node, new, source=slow.url)
    finally:
        slow.close()
    assert_untouched(node, new)


@pytest.mark.parametrize("url", ["file:///etc", "ftp://example.org/x", "http://", "http://h/x y",
                                 "http://h/$(reboot)", "https://h/;rm", "-http://h"])
def test_a_store_url_that_is_not_http_is_refused_on_both_ends(node: HelperNode, new: StoredRelease,
                                                              url: str) -> None:
    from imagetool.chunks import check_source
    from imagetool.errors import InputError

    with pytest.raises(InputError, match="is not http:// or https://"):
        check_source(url)
    with pytest.raises(Exception, match="invalid store URL"):
        node.stage_delta(new.id, [], source=url)
