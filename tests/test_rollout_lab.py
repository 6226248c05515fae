"""The rolling update and the cluster rollback, for real, on four lab nodes.

The tests run in file order and share one cluster: each starts from the state the previous one
left (all nodes committed on webapp-2 unless a test says otherwise).
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from imagetool.cli import main
from rollout.inventory import CheckSpec, load_inventory
from rollout.update import RolloutOptions, run_rollback, run_rollout
from tests.conftest import TEST_STORE, lab_ssh, make_lab, node_status
from tests.derive import broken_boot, broken_sshd, derive_release, failing_health_check
from tests.faults import fault

pytestmark = pytest.mark.lab

LAB = "itroll"
# Short timeouts keep failure tests quick; lab nodes boot in seconds.
FAST = dict(confirm_timeout=90, boot_timeout=45, health_timeout=30)


@pytest.fixture(scope="module")
def cluster(release1, lab_root):
    yield from make_lab(LAB, 4, release1, lab_root)


@pytest.fixture(scope="module")
def inventory(cluster):
    return load_inventory(cluster.inventory)


def statuses(cluster) -> dict[str, dict]:
    return {n.name: node_status(cluster, n) for n in cluster.nodes}


def boot_ids(cluster) -> dict[str, str]:
    return {name: s["boot_id"] for name, s in statuses(cluster).items()}


def assert_all_on(cluster, release_id: str, previous: str | None = None) -> None:
    for name, s in statuses(cluster).items():
        assert (s["booted"], s["default"], s["committed"]) == (release_id,) * 3, (name, s)
        assert s["next"] is None and s["system_state"] == "running", (name, s)
        if previous:
            assert s["previous"] == previous, (name, s)


def test_rollout_in_batches_moves_every_node(cluster, inventory, release1, release2):
    before = boot_ids(cluster)
    result = run_rollout(release2, inventory, RolloutOptions(batches="1,2,1", **FAST))
    assert result.exit_code == 0, result.to_dict()
    assert result.batches == [["node1"], ["node2", "node3"], ["node4"]]
    assert [r.outcome for r in result.nodes] == ["done"] * 4
    # Every node held webapp-1: each was sent only the chunks of webapp-2 it lacked, at most 2% of
    # the image (issue 9's goal; webapp-2 adds curl).
    from rollout.stage import needed_bytes

    full = 4 * needed_bytes(release2, 0)  # the image, its manifest and signature, to each node
    assert result.full_bytes == full and 0 < result.bytes_sent <= 0.02 * full, (result.bytes_sent, full)
    assert_all_on(cluster, release2.id, previous=release1.id)
    after = boot_ids(cluster)
    assert all(after[n] != before[n] for n in before), "every node rebooted into the new image"


def test_the_same_rollout_again_changes_nothing(cluster, inventory, release2):
    before = boot_ids(cluster)
    r = CliRunner().invoke(main, ["rollout", release2.id, "-i", str(cluster.inventory), "--store", str(TEST_STORE),
                                  "--batch", "1,2,1", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["bytes_sent"] == 0
    assert {n["outcome"] for n in result["nodes"]} == {"skipped"}
    assert boot_ids(cluster) == before, "no node rebooted"


def test_cluster_rollback_goes_to_the_previous_image_without_transfer(cluster, inventory, release1, release2):
    result = run_rollback(inventory, RolloutOptions(batches="2", **FAST))
    assert result.exit_code == 0, result.to_dict()
    assert result.bytes_sent == 0
    assert_all_on(cluster, release1.id, previous=release2.id)
    # And forward again: the image is still staged everywhere, so nothing moves but the boot.
    result = run_rollout(release2, inventory, RolloutOptions(batches="4", **FAST))
    assert result.exit_code == 0, result.to_dict()
    assert result.bytes_sent == 0
    assert_all_on(cluster, release2.id)


@fault("The new release fails its health gate on the canary",
       "the canary is rolled back to its committed image and the rollout stops before the next batch (exit 3)")
def test_failing_health_gate_rolls_the_canary_back_and_stops(cluster, inventory, release2, test_store):
    bad = derive_release(test_store, release2, "2_bad_health", failing_health_check)
    before = boot_ids(cluster)
    result = run_rollout(bad, inventory, RolloutOptions(batches="1", **FAST))
    assert result.exit_code == 3, result.to_dict()
    canary = result.node("node1")
    assert canary.outcome == "rolled-back" and canary.failed
    assert "webapp-http" in canary.error and "503" in canary.error
    assert [result.node(n).outcome for n in ("node2", "node3", "node4")] == ["not-started"] * 3
    after = statuses(cluster)
    assert after["node1"]["booted"] == release2.id and after["node1"]["committed"] == release2.id
    assert after["node1"]["system_state"] == "running"
    assert {n: after[n]["boot_id"] for n in ("node2", "node3", "node4")} == {
        n: before[n] for n in ("node2", "node3", "node4")}, "no other node was touched"


@pytest.mark.parametrize("breakage", [
    pytest.param(broken_sshd, id="sshd", marks=fault(
        "The new release boots but its sshd never starts: the controller cannot reach the trial boot",
        "the node is reset (or its dead-man switch fires) and boots its committed image")),
    pytest.param(broken_boot, id="boot", marks=fault(
        "The new release cannot boot at all (no init)",
        "the firmware's one-shot is spent; the reset boots the committed image")),
])
def test_release_that_breaks_the_node_comes_back_on_its_committed_image(cluster, inventory, release2, test_store,
                                                                        breakage):
    bad = derive_release(test_store, release2, f"2_{breakage.__name__}", breakage)
    result = run_rollout(bad, inventory, RolloutOptions(batches="1", **FAST))
    assert result.exit_code == 3, result.to_dict()
    assert result.node("node1").failed
    s = node_status(cluster, cluster.nodes[0])
    assert (s["booted"], s["committed"], s["default"]) == (release2.id,) * 3
    assert s["system_state"] == "running"


@fault("The second batch fails under `rollback: all`",
       "the failed node and every node the rollout already moved are back on their previous image")
def test_rollback_all_returns_the_first_batch_when_the_second_fails(cluster, inventory, release2, test_store):
    good = derive_release(test_store, release2, "3", lambda tree: None)
    fails_on_node2 = CheckSpec(name="not-node2", kind="command", target='test "$(hostname)" != node2',
                               retries=1, timeout=5)
    result = run_rollout(good, inventory, RolloutOptions(batches="1,1,2", on_failure="rollback-all",
                                                         checks=[fails_on_node2], **FAST))
    assert result.exit_code == 3, result.to_dict()
    assert result.node("node1").outcome == "rolled-back"
    assert result.node("node2").failed
    assert_all_on(cluster, release2.id)


@fault("A node presents an unknown or a changed SSH host key when the rollout connects",
       "that node is unreachable, naming the known_hosts file, and nothing is sent to it; no failure tolerated "
       "(the default), the rollout stops before any node is touched (exit 4 when every node is refused)")
def test_unknown_and_changed_host_keys_are_refused(cluster, tmp_path, release2):
    inv_text = cluster.inventory.read_text()
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    (tmp_path / "id_ed25519").write_bytes(cluster.key.read_bytes())
    (tmp_path / "id_ed25519").chmod(0o600)
    inv = tmp_path / "inventory.yaml"
    inv.write_text(inv_text)
    refused = run_rollout(release2, load_inventory(inv), RolloutOptions(batches="1", **FAST))
    assert refused.exit_code == 4 and all(r.outcome == "unreachable" for r in refused.nodes), refused.to_dict()
    assert all("host key is not in" in (r.error or "") for r in refused.nodes), refused.to_dict()
    # node1's address paired with node2's key: a changed host key.
    lines = cluster.known_hosts.read_text().splitlines()
    key_of_node2 = lines[1].split(" ", 1)[1]
    empty.write_text(f"{cluster.nodes[0].address} {key_of_node2}\n" + "\n".join(lines[1:]) + "\n")
    changed = run_rollout(release2, load_inventory(inv), RolloutOptions(batches="1", **FAST))
    assert changed.exit_code == 3 and changed.stopped, changed.to_dict()
    assert [r.outcome for r in changed.nodes] == ["unreachable"] + ["not-started"] * 3, changed.to_dict()
    assert "changed" in (changed.node("node1").error or "").lower()



# --- an HTTP store the nodes pull from ----------------------------------------------------------------------------


class Nginx:
    """nginx serving `root` on the lab's gateway address (inside the lab's network only), logging
    the body bytes of every answer."""

    PORT = 8099

    def __init__(self, cluster, tmp_path) -> None:
        import shutil
        import subprocess

        if shutil.which("nginx") is None:
            pytest.fail("nginx is not installed: scripts/setup installs it")
        self.root = tmp_path / "www"
        self.root.mkdir()
        self.log = tmp_path / "access.log"
        self.url = f"http://{cluster.gateway}:{self.PORT}"
        conf = tmp_path / "nginx.conf"
        conf.write_text(f"""
user root;
daemon off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{}}
http {{
    log_format bytes '$request $status $body_bytes_sent';
    access_log {self.log} bytes;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    server {{
        listen {cluster.gateway}:{self.PORT};
        root {self.root};
    }}
}}
""")
        self.process = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp_path)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def served(self) -> tuple[int, int]:
        """(requests answered 200, body bytes sent)."""
        lines = [line.split() for line in self.log.read_text().splitlines()] if self.log.exists() else []
        ok = [line for line in lines if line[-2] == "200"]
        return len(ok), sum(int(line[-1]) for line in ok)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture
def nginx(cluster, tmp_path):
    server = Nginx(cluster, tmp_path)
    try:
        yield server
    finally:
        server.stop()


def test_nodes_pull_the_release_from_an_http_store(cluster, inventory, release2, test_store, nginx):
    """`imagetool publish` to a directory nginx serves; a rollout with --source: each node fetches
    the chunks its images lack from nginx, the controller sends only manifests."""
    # A release no node holds yet (webapp-3 is staged everywhere by the tests above).
    release5 = derive_release(test_store, release2, "5", lambda tree: (tree / "etc/webapp-5").write_text("5\n"))
    r = CliRunner().invoke(main, ["publish", release5.id, "--to", str(nginx.root / "store"),
                                  "--store", str(TEST_STORE), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["chunks"] > 100
    result = run_rollout(release5, inventory, RolloutOptions(batches="2", source=f"{nginx.url}/store", **FAST))
    assert result.exit_code == 0, result.to_dict()
    assert_all_on(cluster, release5.id, previous=release2.id)
    requests, served = nginx.served()
    size = release5.manifest.image.size
    print(f"\n4 nodes pulled {release5.id} ({size} bytes): nginx served {served} bytes in {requests} requests, "
          f"the controller sent {result.bytes_sent} bytes")
    # Every node fetched the index and the few chunks webapp-2 does not have; nothing else.
    assert result.bytes_sent <= 4 * release5.manifest_path.stat().st_size + 4 * 1024, result.bytes_sent
    assert 4 <= requests and 0 < served < 4 * 0.05 * size, (requests, served)
    # Back to webapp-2 for whatever comes after.
    back = run_rollout(release2, inventory, RolloutOptions(batches="4", **FAST))
    assert back.exit_code == 0 and back.bytes_sent == 0, back.to_dict()


def test_a_bookworm_release_rolls_out_and_back(cluster, inventory, release2, release_bookworm):
    """The default base is trixie; a release built on bookworm runs on a lab node like any other:
    staged, booted, its services up behind the health gate, committed; then back to trixie."""
    result = run_rollout(release_bookworm, inventory, RolloutOptions(batches="1", limit=["node1"], **FAST))
    assert result.exit_code == 0 and result.node("node1").outcome == "done", result.to_dict()
    s = statuses(cluster)["node1"]
    assert (s["booted"], s["committed"], s["system_state"]) == (release_bookworm.id, release_bookworm.id, "running"), s
    assert lab_ssh(cluster, cluster.node("node1"), "cat", "/etc/debian_version").stdout.startswith("12.")
    back = run_rollout(release2, inventory, RolloutOptions(batches="1", limit=["node1"], **FAST))
    assert back.exit_code == 0 and back.bytes_sent == 0, back.to_dict()
    assert_all_on(cluster, release2.id)
