"""The lab cluster, for real: nodes booting release images read-only, reached over SSH."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from imagetool import lab
from tests.conftest import check_cut_and_heal, lab_ssh, make_lab, node_status, wait_for

pytestmark = pytest.mark.lab

LAB = "itest"


@pytest.fixture(scope="module")
def cluster(release1, lab_root):
    yield from make_lab(LAB, 3, release1, lab_root)


ssh = lab_ssh


def booted(the_lab, node, release_id: str, other_than: str):
    """The node's status once it answers from a new boot of `release_id`, else None."""
    r = ssh(the_lab, node, "imagetool-node", "status", timeout=10)
    if r.returncode != 0:
        return None
    s = json.loads(r.stdout)
    return s if s["boot_id"] != other_than and s["booted"] == release_id else None


def test_nodes_run_the_release_read_only_with_every_unit_started(cluster, release1):
    assert [n.name for n in cluster.nodes] == ["node1", "node2", "node3"]
    for node in cluster.nodes:
        r = ssh(cluster, node, "systemctl", "is-system-running", "--wait")
        assert r.stdout.strip() == "running", (node.name, r.stdout, ssh(cluster, node, "systemctl", "--failed").stdout)
        # Really read-only: the root cannot be written, /var can.
        assert ssh(cluster, node, "touch", "/usr/imagetool-write-test").returncode != 0
        assert ssh(cluster, node, "touch", "/var/lib/imagetool/write-test").returncode == 0
        status = node_status(cluster, node)
        assert status["booted"] == release1.id
        assert status["default"] == release1.id and status["committed"] == release1.id
        assert status["system_state"] == "running"
        assert ssh(cluster, node, "hostname").stdout.strip() == node.name


def test_each_node_has_cgroups_of_its_own(cluster):
    """Containers sharing a cgroup run their units in the same cgroups and kill each other's
    processes when they boot together (what made rollouts flaky in CI)."""
    seen = set()
    for node in cluster.nodes:
        init = lab.container_init(cluster, node.name)
        assert init is not None
        groups = {line.split(":", 2)[2] for line in open(f"/proc/{init}/cgroup").read().splitlines()
                  if line.startswith("0::") or "name=systemd" in line}
        assert groups and all(f"{cluster.name}-{node.name}/" in g for g in groups), groups
        assert not groups & seen
        seen |= groups


def test_ssh_refuses_a_wrong_host_key(cluster, tmp_path):
    node = cluster.nodes[0]
    other = cluster.nodes[1]
    # known_hosts that pairs node1's address with node2's key: ssh must refuse.
    pub = (cluster.node_dir(other.name) / "var/lib/ssh/ssh_host_ed25519_key.pub").read_text().split()
    bad = tmp_path / "known_hosts"
    bad.write_text(f"{node.address} {pub[0]} {pub[1]}\n")
    argv = lab.ssh_argv(cluster, node, "true")
    argv[argv.index(f"UserKnownHostsFile={cluster.known_hosts}")] = f"UserKnownHostsFile={bad}"
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "HOST IDENTIFICATION HAS CHANGED" in r.stderr or "Host key verification failed" in r.stderr


def test_inventory_lists_every_node(cluster):
    import yaml

    inv = yaml.safe_load(cluster.inventory.read_text())
    assert {name: spec["host"] for name, spec in inv["nodes"].items()} == {n.name: n.address for n in cluster.nodes}


def test_status_reports_each_node(cluster, release1):
    states = lab.status(cluster)
    assert [(s.name, s.powered, s.booted, s.system_state, s.network) for s in states] == [
        (n.name, True, release1.id, "running", "up") for n in cluster.nodes
    ]


def test_one_shot_boot_then_reset_falls_back_to_the_default(cluster, release1, release2):
    node = cluster.nodes[2]
    images = cluster.node_dir(node.name) / "var/lib/imagetool/images"
    shutil.copyfile(release2.squashfs, images / f"{release2.id}.squashfs")
    shutil.copyfile(release2.manifest_path, images / f"{release2.id}.manifest.json")
    before = node_status(cluster, node)["boot_id"]

    r = ssh(cluster, node, "imagetool-node", "set-next", release2.id, "--confirm-timeout", "600")
    assert r.returncode == 0, r.stdout
    ssh(cluster, node, "imagetool-node", "reboot")

    s = wait_for(lambda: booted(cluster, node, release2.id, other_than=before), 90)
    assert s, "node did not come back on the one-shot image"
    assert s["default"] == release1.id and s["next"] is None  # the one-shot entry was consumed
    assert s["trial"] and s["trial"]["id"] == release2.id

    # A hard reset before any commit: the firmware boots the default again.
    lab.reset(cluster, node.name)
    mid = s["boot_id"]

    s = wait_for(lambda: booted(cluster, node, release1.id, other_than=mid), 90)
    assert s, "node did not fall back to its default image after a reset"
    assert s["committed"] == release1.id and s["system_state"] in ("running", "starting")


def test_cut_and_heal_the_network(cluster):
    check_cut_and_heal(cluster, cluster.nodes[1], back_within=30)


def test_kill_and_start(cluster):
    node = cluster.nodes[1]
    lab.kill(cluster, node.name)
    assert not lab.status(cluster)[1].powered
    assert ssh(cluster, node, "true", timeout=10).returncode != 0
    lab.start(cluster, node.name)
    lab.wait_ssh(cluster, [node.name], timeout=90)


def test_fill_leaves_only_what_was_asked(cluster):
    node = cluster.nodes[0]
    lab.fill(cluster, node.name, leave=5 * 1024**2)
    try:
        free = node_status(cluster, node)["free_bytes"]
        assert free <= 6 * 1024**2
    finally:
        lab.unfill(cluster, node.name)
    assert node_status(cluster, node)["free_bytes"] > 1024**3


def test_down_leaves_nothing_behind(release1, lab_root):
    name = "itdown"
    lab.down(name, lab_root)
    the_lab = lab.up(name, 1, release1, root=lab_root, var_size=1024**3)
    there = lab.leftovers(name, lab_root)
    assert there["netns"] == [the_lab.nodes[0].netns]
    assert len(there["cgroups"]) >= 1, "the node runs in a cgroup of its own"
    # Crash of the lab tool itself: its state directory is all that down gets.
    lab.down(name, lab_root)
    assert lab.leftovers(name, lab_root) == {"processes": [], "mounts": [], "loops": [], "netns": [], "links": [],
                                             "cgroups": [], "dir": []}
