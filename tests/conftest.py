"""Session fixtures: real images built once per session (or reused while their inputs are unchanged),
and real lab clusters that are always torn down."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagetool.signing import generate_keypair

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
# Images are big and slow to build: keep them in a store outside the checkout and rebuild only
# when what they are built from changes (release file, elements, build code).
TEST_STORE = Path(os.environ.get("IMAGETOOL_TEST_STORE", "/var/tmp/imagetool-test-store"))


@pytest.fixture(autouse=True, scope="session")
def journal_dir(tmp_path_factory) -> Iterator[Path]:
    """Rollout journals of the test session go to a temporary state directory, not ~/.local."""
    path = tmp_path_factory.mktemp("state")
    old = os.environ.get("IMAGETOOL_STATE_DIR")
    os.environ["IMAGETOOL_STATE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("IMAGETOOL_STATE_DIR", None)
    else:
        os.environ["IMAGETOOL_STATE_DIR"] = old


BUILT_RELEASES = {"release1", "release2", "release3", "release_bookworm"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs a built image is a build test, whichever file it is in: `-m "not build"`
    then runs without diskimage-builder and without minutes of building."""
    for item in items:
        if BUILT_RELEASES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.build)


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (diskimage-builder, mounts, network namespaces)")


def inputs_digest(release_file: Path) -> str:
    h = hashlib.sha256()
    paths = [release_file, REPO / "imagetool/build.py"]  # the build's own steps shape the image too
    for base in (REPO / "elements", EXAMPLES / "elements"):
        paths += sorted(p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for p in paths:
        h.update(str(p.relative_to(REPO)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def signing_keys(store_dir: Path = TEST_STORE) -> tuple[Path, Path]:
    from imagetool.signing import generate_keypair

    keys = store_dir / ".keys"
    private, public = keys / "signing.key", keys / "signing.pub"
    if not private.exists():
        keys.mkdir(parents=True, exist_ok=True)
        generate_keypair(private, public, force=True)
    return private, public


def build_cached(release_file: Path, store_dir: Path = TEST_STORE, sign: bool = False):
    """Build `release_file` into the test store unless an image of exactly these inputs is there."""
    from imagetool.build import BuildOptions, build
    from imagetool.release import load_release
    from imagetool.store import Store

    release = load_release(release_file)
    store = Store(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    # Two test runs on one machine (worktrees) share the store: one builds, the other waits.
    with open(store_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sign_key = signing_keys(store_dir)[0] if sign else None
        stamp = store_dir / f".{release.id}.inputs"
        digest = inputs_digest(release_file) + (f" signed {sign_key.read_bytes().hex()[:32]}" if sign_key else "")
        if store.has(release.id) and stamp.exists() and stamp.read_text() == digest:
            return store.get(release.id)
        stored = build(release, store, BuildOptions(force=True, sign_key=sign_key))
        stamp.write_text(digest)
        return stored


@pytest.fixture(scope="session")
def test_store():
    from imagetool.store import Store

    return Store(TEST_STORE)


@pytest.fixture(scope="session")
def release1():
    needs_root()
    return build_cached(EXAMPLES / "webapp-1.yaml")


@pytest.fixture(scope="session")
def release2():
    """Version 2, built with --sign-key (the key pair is signing_keys())."""
    needs_root()
    return build_cached(EXAMPLES / "webapp-2.yaml", sign=True)


@pytest.fixture(scope="session")
def release_bookworm():
    """webapp-1 built on Debian bookworm (oldstable; trixie is the default): it still builds and boots."""
    needs_root()
    return build_cached(EXAMPLES / "webapp-1-bookworm.yaml")


@pytest.fixture(scope="session")
def release3(release2, test_store):
    """webapp-3: webapp-2 with a marker file, so there is a third image to move between."""
    from tests.derive import derive_release

    return derive_release(test_store, release2, "3", lambda tree: (tree / "etc/webapp-3").write_text("3\n"))


@pytest.fixture(scope="session")
def lab_root() -> Path:
    return Path(os.environ.get("IMAGETOOL_TEST_LAB_DIR", "/var/tmp/imagetool-test-labs"))


def make_lab(name: str, n_nodes: int, release, root: Path, **kw) -> Iterator:
    from imagetool import lab

    lab.down(name, root)  # a crashed earlier session may have left one behind
    the_lab = lab.up(name, n_nodes, release, root=root, var_size=3 * 1024**3, **kw)
    try:
        yield the_lab
    finally:
        lab.down(name, root)


def wait_for(predicate, timeout: float, interval: float = 0.5):
    """predicate()'s first true result within `timeout` seconds, else its last (false) one."""
    from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

    return Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(interval), retry=retry_if_result(lambda r: not r),
                    retry_error_callback=lambda state: state.outcome.result())(predicate)


def lab_ssh(the_lab, node, *command: str, timeout: float = 30):
    """Run `command` on a lab node over real SSH with host key checking."""
    import subprocess

    from imagetool.lab import ssh_argv

    return subprocess.run(ssh_argv(the_lab, node, *command), capture_output=True, text=True, timeout=timeout)


def check_cut_and_heal(the_lab, node, back_within: float) -> None:
    """A cut node answers nothing and shows as cut; healed, it answers again within `back_within` s."""
    from imagetool import lab

    lab.cut(the_lab, node.name)
    try:
        assert lab_ssh(the_lab, node, "true", timeout=15).returncode != 0
        assert next(s for s in lab.status(the_lab) if s.name == node.name).network == "cut"
    finally:
        lab.heal(the_lab, node.name)
    assert wait_for(lambda: lab_ssh(the_lab, node, "true", timeout=10).returncode == 0, back_within)


def node_status(the_lab, node) -> dict:
    """The node helper's own answer, over real SSH with host key checking."""
    import subprocess

    from imagetool.lab import ssh_argv

    r = subprocess.run(ssh_argv(the_lab, node, "imagetool-node", "status"), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr + r.stdout
    return json.loads(r.stdout)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """Two key pairs: `release` (the one the node will trust) and `other` (an unknown signer)."""
    d = tmp_path / "keys"
    d.mkdir()
    for name in ("release", "other"):
        generate_keypair(d / f"{name}.key", d / f"{name}.pem")
    return {"release": d / "release.key", "release.pem": d / "release.pem",
            "other": d / "other.key", "other.pem": d / "other.pem"}


def host_side_booted(the_lab, node: str) -> str | None:
    """What a lab node's firmware booted, seen from the host: works while its network is cut."""
    from imagetool import lab

    return next(s.booted for s in lab.status(the_lab) if s.name == node)


def kill_controller_at(the_lab, release, node: str, step: str, prefix: str, options: dict) -> None:
    """Run the real rollout of `release` to `node` in a child process (tests/kill_at.py) that dies
    by SIGKILL at `step` (see there); fail unless it did."""
    import subprocess
    import sys

    opts = {"batches": "1", "limit": [node], **options}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "tests.kill_at", str(TEST_STORE), release.id, str(the_lab.inventory),
                        node, step, prefix, json.dumps(opts)], cwd=REPO, env=env, check=False, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == -9, f"the controller was not killed at {step} {prefix!r}: {r.returncode} {r.stderr[-2000:]}"
