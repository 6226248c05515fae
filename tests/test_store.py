from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagetool.errors import AlreadyExistsError, InputError, NotFoundError
from imagetool.manifest import ImageInfo, Manifest, sha256_file
from imagetool.store import Store, default_store_path, resolve_release
from tests.samples import sample_manifest


def make_manifest(name: str, version: str, image: ImageInfo) -> Manifest:
    return sample_manifest(name, version, image=image)



def stage_files(staging, name: str, version: str, content: bytes = b"image", sig: bool = True, log: bool = True) -> None:  # type: ignore[no-untyped-def]
    staging.squashfs_path.write_bytes(content)
    if log:
        staging.log_path.write_text("build log\n")
    if sig:
        staging.sig_path.write_text("c2lnbmF0dXJl\n")
    image = ImageInfo(f"{name}-{version}.squashfs", len(content), sha256_file(staging.squashfs_path))
    staging.manifest_path.write_bytes(make_manifest(name, version, image).to_json())


def add(store: Store, name: str, version: str, content: bytes = b"image", force: bool = False, **kw: bool) -> None:
    rid = f"{name}-{version}"
    with store.staging(rid) as st:
        stage_files(st, name, version, content, **kw)
        st.commit(force=force)


def snapshot(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


def incoming(store: Store) -> list[str]:
    d = store.path / ".incoming"
    return sorted(os.listdir(d)) if d.exists() else []


def test_commit_writes_all_files(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    add(store, "webapp", "1.0")
    names = sorted(p.name for p in store.path.iterdir() if not p.name.startswith("."))
    assert names == ["webapp-1.0.build.log", "webapp-1.0.manifest.json", "webapp-1.0.sig", "webapp-1.0.squashfs"]
    assert incoming(store) == []
    r = store.get("webapp-1.0")
    assert r.id == "webapp-1.0"
    assert r.squashfs_path == store.path / "webapp-1.0.squashfs"
    assert r.sig_path == store.path / "webapp-1.0.sig"
    assert r.log_path == store.path / "webapp-1.0.build.log"
    assert (r.squashfs, r.sig, r.log) == (r.squashfs_path, r.sig_path, r.log_path)
    assert r.manifest.image.size == 5
    assert store.has("webapp-1.0")
    assert not store.has("webapp-2.0")


def test_optional_files(tmp_path: Path) -> None:
    store = Store(tmp_path)
    add(store, "webapp", "1.0", sig=False, log=False)
    r = store.get("webapp-1.0")
    assert r.sig_path is None and r.log_path is None


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_leaves_store_untouched(tmp_path: Path, exc: BaseException) -> None:
    store = Store(tmp_path / "store")
    add(store, "webapp", "1.0")
    before = snapshot(store.path)
    with pytest.raises(type(exc)):
        with store.staging("webapp-1.1") as st:
            stage_files(st, "webapp", "1.1")
            raise exc
    with pytest.raises(type(exc)):
        with store.staging("webapp-1.0") as st:
            stage_files(st, "webapp", "1.0", b"other")
            raise exc
    assert snapshot(store.path) == before
    assert incoming(store) == []
    assert [r.id for r in store.list()] == ["webapp-1.0"]


def test_no_commit_means_no_change(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.staging("webapp-1.0") as st:
        stage_files(st, "webapp", "1.0")
    assert store.list() == []
    assert incoming(store) == []


def test_existing_release_refused_then_forced(tmp_path: Path) -> None:
    store = Store(tmp_path)
    add(store, "webapp", "1.0", b"first")
    before = snapshot(store.path)
    with pytest.raises(AlreadyExistsError, match="release webapp-1.0 already in store.*--force"):
        add(store, "webapp", "1.0", b"second")
    assert snapshot(store.path) == before
    assert incoming(store) == []
    add(store, "webapp", "1.0", b"second!", force=True, sig=False)
    r = store.get("webapp-1.0")
    assert r.squashfs_path.read_bytes() == b"second!"
    assert r.manifest.image.size == 7
    assert r.sig_path is None  # the old signature described the old image
    assert not (store.path / "webapp-1.0.sig").exists()


def test_commit_refuses_mismatched_manifest(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(Exception, match="describes release webapp-2.0"):
        with store.staging("webapp-1.0") as st:
            stage_files(st, "webapp", "2.0")
            # the staging file names follow the staged id; the manifest inside says otherwise
            st.commit()
    assert store.list() == []


def test_list_ignores_half_written_and_junk(tmp_path: Path) -> None:
    store = Store(tmp_path)
    add(store, "webapp", "1.10")
    add(store, "webapp", "1.9")
    add(store, "webapp", "1.10~rc1")
    add(store, "api", "2")
    (tmp_path / "webapp-3.0.squashfs").write_bytes(b"half")  # build died before the manifest
    (tmp_path / "broken-1.manifest.json").write_text("{not json")
    (tmp_path / ".hidden-1.manifest.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "subdir").mkdir()
    assert [r.id for r in store.list()] == ["api-2", "webapp-1.9", "webapp-1.10~rc1", "webapp-1.10"]
    assert not store.has("webapp-3.0")
    with pytest.raises(NotFoundError, match="webapp-3.0 is not in store"):
        store.get("webapp-3.0")


def test_list_of_missing_store(tmp_path: Path) -> None:
    assert Store(tmp_path / "nope").list() == []


def test_default_store_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("IMAGETOOL_STORE", raising=False)
    assert default_store_path(None) == Path("releases")
    monkeypatch.setenv("IMAGETOOL_STORE", str(tmp_path / "env"))
    assert default_store_path(None) == tmp_path / "env"
    assert default_store_path(str(tmp_path / "x")) == tmp_path / "x"


@pytest.mark.parametrize("bad", ["../etc-1", "webapp", "web app-1", "webapp-1;rm", "webapp-1/../x", ""])
def test_invalid_ids_refused(tmp_path: Path, bad: str) -> None:
    store = Store(tmp_path)
    with pytest.raises(InputError):
        store.get(bad)
    with pytest.raises(InputError):
        store.has(bad)
    with pytest.raises(InputError):
        with store.staging(bad):
            pass
    assert not (tmp_path / ".incoming").exists() or incoming(store) == []


def test_stale_staging_dirs_removed(tmp_path: Path) -> None:
    store = Store(tmp_path)
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    stale = tmp_path / ".incoming" / f"webapp-1.0.{dead_pid}.abc123"
    stale.mkdir(parents=True)
    (stale / "webapp-1.0.squashfs").write_bytes(b"x")
    alive = tmp_path / ".incoming" / f"webapp-1.1.{os.getpid()}.def456"
    alive.mkdir()
    with store.staging("webapp-2.0"):
        pass
    assert not stale.exists()
    assert alive.exists()


def test_resolve_release(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    add(store, "webapp", "1.0")
    assert resolve_release(store, "webapp-1.0").id == "webapp-1.0"
    other = Store(tmp_path / "elsewhere")
    add(other, "api", "2")
    by_manifest = resolve_release(store, str(other.path / "api-2.manifest.json"))
    assert by_manifest.squashfs_path == other.path / "api-2.squashfs"
    by_image = resolve_release(store, str(other.path / "api-2.squashfs"))
    assert by_image.manifest_path == other.path / "api-2.manifest.json"
    with pytest.raises(NotFoundError):
        resolve_release(store, str(tmp_path / "missing-1.squashfs"))
    with pytest.raises(NotFoundError, match="not in store"):
        resolve_release(store, "api-2")
