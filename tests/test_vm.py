"""Real machines, for real: a qemu VM booting the disk `imagetool disk` makes, through real GRUB,
the image's own kernel and initramfs, next to a container node in one mixed lab.

The tests run in file order and share one lab (node1 a container, node2 a VM); each starts from the
state the previous one left: the VM's identity and the lab's power and network controls first,
then rollout, rollback and the two ways a release fails on a VM. Under TCG a VM boot takes a minute
or two on this machine kind, so the whole suite's VM work is here, on one VM, and no boot is
repeated without a reason. GRUB's one-shot entry is proven by the rollout (booted once into the
new image, then committed) and by the release that cannot boot (the spent entry falls back).
"""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest
import yaml
from click.testing import CliRunner

from imagetool import lab
from imagetool.cli import main
from rollout.inventory import load_inventory
from rollout.update import RolloutOptions, run_rollback, run_rollout
from tests.conftest import REPO, TEST_STORE, check_cut_and_heal, lab_ssh, make_lab, node_status, wait_for
from tests.derive import broken_boot, derive_release, failing_health_check
from tests.faults import fault
from tests.test_disk import boots_through_grub

pytestmark = [pytest.mark.lab, pytest.mark.vm]

LAB = "itvm"
VM_TIMEOUTS = dict(confirm_timeout=900, boot_timeout=600, health_timeout=180)
# A boot under TCG takes one to two minutes on a quiet machine of this kind, and several times that
# while the other half of scripts/test keeps both cores busy: waits here allow for the latter.
VM_BOOT = 600


@pytest.fixture(scope="module")
def cluster(release1, lab_root):
    yield from make_lab(LAB, 2, release1, lab_root, vm_nodes=1, vm_boot_timeout=VM_BOOT)


@pytest.fixture(scope="module")
def inventory(cluster):
    return load_inventory(cluster.inventory)


@pytest.fixture(scope="module")
def vm(cluster):
    node = cluster.nodes[1]
    assert node.kind == "vm"
    return node


def ssh(cluster, node, *command, timeout=60) -> subprocess.CompletedProcess[str]:
    return lab_ssh(cluster, node, *command, timeout=timeout)


def test_vm_node_boots_its_image_read_only_through_grub(cluster, vm, release1):
    s = node_status(cluster, vm)
    assert (s["boot_loader"], s["booted"], s["default"], s["committed"]) == ("grub", release1.id, release1.id,
                                                                               release1.id)
    root = json.loads(ssh(cluster, vm, "findmnt", "-J", "/").stdout)["filesystems"][0]
    assert root["fstype"] == "squashfs" and "ro" in root["options"].split(","), root
    var = json.loads(ssh(cluster, vm, "findmnt", "-J", "/var").stdout)["filesystems"][0]
    assert var["fstype"] == "ext4" and "rw" in var["options"].split(","), var
    cmdline = ssh(cluster, vm, "cat", "/proc/cmdline").stdout
    assert f"imagetool.image={release1.id}" in cmdline and "boot=imagetool" in cmdline and "panic=" in cmdline
    r = ssh(cluster, vm, "systemctl", "is-system-running", "--wait", timeout=200)
    assert r.stdout.strip() == "running", ssh(cluster, vm, "systemctl", "--failed").stdout
    # Identity made on /var at first boot, not shared with the other node.
    ids = {n.name: ssh(cluster, n, "cat", "/etc/machine-id").stdout.strip() for n in cluster.nodes}
    assert len(set(ids.values())) == 2 and all(len(i) == 32 for i in ids.values()), ids
    assert ssh(cluster, vm, "cat", "/var/lib/imagetool/etc/machine-id").stdout.strip() == ids[vm.name]
    # The VM answers on its static lab address, which came from /var (the image's default is DHCP),
    # and on nothing else: no DHCP lease, no IPv6 (the image has no iproute2).
    assert ssh(cluster, vm, "test", "-f", "/run/systemd/network/10-lab.network").returncode == 0
    assert ssh(cluster, vm, "hostname", "-I").stdout.split() == [vm.address]
    inet6 = ssh(cluster, vm, "cat", "/proc/net/if_inet6").stdout.split("\n")
    assert [line.split()[-1] for line in inet6 if line.strip()] == ["lo"], inet6
    assert s["hostname"] == vm.name
    assert cluster.accel in ("kvm", "tcg")
    assert json.loads((cluster.dir / "lab.json").read_text())["accel"] == cluster.accel
    assert ssh(cluster, vm, "touch", "/usr/imagetool-write-test").returncode != 0
    assert ssh(cluster, vm, "touch", "/var/lib/imagetool/write-test").returncode == 0
    # The host key the lab made (known_hosts held it before the first boot) is the one sshd uses.
    host_pub = ssh(cluster, vm, "cat", "/var/lib/ssh/ssh_host_ed25519_key.pub").stdout.split()[:2]
    assert host_pub == (cluster.node_dir(vm.name) / lab.HOST_KEY_PUB).read_text().split()[:2]
    # Containers and VMs see each other on the lab's bridge.
    connect = f"import socket; socket.create_connection(({cluster.nodes[0].address!r}, 22), 5).close()"
    assert ssh(cluster, vm, "python3", "-c", shlex.quote(connect)).returncode == 0


def test_status_of_a_mixed_lab(cluster, release1):
    states = lab.status(cluster)
    assert [(s.name, s.kind, s.powered, s.booted, s.network) for s in states] == [
        ("node1", "container", True, release1.id, "up"), ("node2", "vm", True, release1.id, "up")]
    assert all(s.system_state in ("running", "starting") for s in states), states


def test_cut_and_heal_a_vm(cluster, vm):
    check_cut_and_heal(cluster, vm, back_within=60)


def test_inventory_reset_command_resets_a_vm(cluster, vm, release1):
    before = node_status(cluster, vm)["boot_id"]
    inv = yaml.safe_load(cluster.inventory.read_text())
    argv = shlex.split(inv["defaults"]["reset_command"].replace("{name}", vm.name))
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: (s := status_or_none(cluster, vm)) and s["boot_id"] != before
                    and s["booted"] == release1.id, VM_BOOT, 2), \
        f"no new boot after a reset; see {cluster.node_dir(vm.name) / 'console.log'}"


def test_kill_and_start_a_vm(cluster, vm, lab_root):
    pid = lab.qemu_pid(cluster, vm.name)
    assert pid and str(pid) in lab.leftovers(LAB, lab_root)["processes"]
    lab.kill(cluster, vm.name)
    assert lab.qemu_pid(cluster, vm.name) is None
    assert str(pid) not in lab.leftovers(LAB, lab_root)["processes"]
    state = lab.status(cluster)[1]
    assert not state.powered and state.system_state == "off"
    assert ssh(cluster, vm, "true", timeout=10).returncode != 0
    with pytest.raises(lab.ImagetoolError, match="powered off"):
        lab.reset(cluster, vm.name)
    lab.start(cluster, vm.name)
    assert lab.start(cluster, vm.name) == lab.qemu_pid(cluster, vm.name)  # a second start: the same qemu
    lab.wait_ssh(cluster, [vm.name], timeout=VM_BOOT)


def status_or_none(cluster, node) -> dict | None:
    try:
        return node_status(cluster, node)
    except (AssertionError, subprocess.TimeoutExpired, ValueError):
        return None


def test_rollout_to_a_mixed_lab_then_again_changes_nothing(cluster, inventory, vm, release1, release2):
    before = {n.name: node_status(cluster, n)["boot_id"] for n in cluster.nodes}
    result = run_rollout(release2, inventory, RolloutOptions(batches="1,1", **VM_TIMEOUTS))
    assert result.exit_code == 0, result.to_dict()
    assert [r.outcome for r in result.nodes] == ["done", "done"]
    for node in cluster.nodes:
        s = node_status(cluster, node)
        assert (s["booted"], s["default"], s["committed"], s["previous"]) == (release2.id, release2.id,
                                                                                 release2.id, release1.id), s
        assert s["next"] is None and s["boot_id"] != before[node.name]
    env = ssh(cluster, vm, "cat", "/var/lib/imagetool/boot/grubenv").stdout
    assert f"imagetool_default={release2.id}\nimagetool_next=\n" in env, "commit moved GRUB's default"
    assert ssh(cluster, vm, "systemctl", "is-system-running", "--wait", timeout=200).stdout.strip() == "running"

    boots = {n.name: node_status(cluster, n)["boot_id"] for n in cluster.nodes}
    r = CliRunner().invoke(main, ["rollout", release2.id, "-i", str(cluster.inventory), "--store", str(TEST_STORE),
                                  "--batch", "1,1", "--json"])
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    assert again["bytes_sent"] == 0 and {n["outcome"] for n in again["nodes"]} == {"skipped"}
    assert {n.name: node_status(cluster, n)["boot_id"] for n in cluster.nodes} == boots, "nothing rebooted"


def test_cluster_rollback_returns_the_vm_to_the_previous_image(cluster, inventory, vm, release1, release2):
    result = run_rollback(inventory, RolloutOptions(batches="2", **VM_TIMEOUTS))
    assert result.exit_code == 0, result.to_dict()
    assert result.bytes_sent == 0
    s = node_status(cluster, vm)
    assert (s["booted"], s["default"], s["committed"], s["previous"]) == (release1.id, release1.id, release1.id,
                                                                             release2.id)
    root = json.loads(ssh(cluster, vm, "findmnt", "-J", "/").stdout)["filesystems"][0]
    assert root["fstype"] == "squashfs" and "ro" in root["options"].split(",")


@fault("A release that cannot boot, on a VM booting through GRUB",
       "the kernel panics and resets; GRUB's spent one-shot leaves the committed image to boot")
def test_release_that_cannot_boot_falls_back_through_grub(cluster, inventory, vm, release1, test_store):
    """No init in the image: the initramfs panics (rather than run /bin/sh as PID 1 and hang),
    panic= resets the VM, and GRUB, whose one-shot entry is already spent, boots the committed
    image, with no help from the controller."""
    bad = derive_release(test_store, release1, "1_broken_boot", broken_boot)
    before = node_status(cluster, vm)["boot_id"]
    result = run_rollout(bad, inventory, RolloutOptions(batches="1", limit=[vm.name], **VM_TIMEOUTS))
    assert result.exit_code == 3, result.to_dict()
    assert result.node(vm.name).outcome == "rolled-back", result.to_dict()
    s = node_status(cluster, vm)
    assert (s["booted"], s["default"], s["committed"]) == (release1.id,) * 3
    assert s["next"] is None and s["boot_id"] != before
    console = (lab.lab_dir(LAB, cluster.dir.parent) / "nodes" / vm.name / "console.log").read_text(errors="replace")
    assert f"imagetool: booting {bad.id}" in console, "GRUB tried the new image"
    # initramfs-tools' panic: with panic= on the command line it resets the machine.
    assert f"imagetool: {bad.id} has no working /sbin/init" in console
    assert "Rebooting automatically due to panic= boot argument" in console


@fault("A release that fails its health gate, on a VM booting through GRUB",
       "rolled back through GRUB to the committed image, every unit running")
def test_failing_health_gate_on_a_vm_is_rolled_back(cluster, inventory, vm, release1, test_store):
    bad = derive_release(test_store, release1, "1_bad_health", failing_health_check)
    # The gate waits health_timeout for a check that will never pass: keep it short here.
    timeouts = {**VM_TIMEOUTS, "health_timeout": 60}
    result = run_rollout(bad, inventory, RolloutOptions(batches="1", limit=[vm.name], **timeouts))
    assert result.exit_code == 3, result.to_dict()
    r = result.node(vm.name)
    assert r.outcome == "rolled-back" and "webapp-http" in r.error
    s = node_status(cluster, vm)
    assert (s["booted"], s["default"], s["committed"]) == (release1.id,) * 3
    assert s["system_state"] == "running"


def test_a_bookworm_release_boots_through_grub_too(release_bookworm, tmp_path):
    """trixie is the default base; a release on bookworm (its own kernel, initramfs-tools and
    systemd) still boots through the same GRUB path. Last in this file: the other run of
    scripts/test has built it by then."""
    assert release_bookworm.manifest.base.release == "bookworm"
    boots_through_grub(release_bookworm, tmp_path, "bios")
