"""VM nodes in the lab: qemu booting the disk `imagetool disk` makes, next to container nodes.

The first part needs nothing (argv, network file, accelerator choice, QMP against a fake and,
where qemu is installed, a real monitor). The lab part checks that `up` and `down` leave nothing
behind when a VM fails or the lab tool dies; it needs root, qemu, /dev/net/tun and a release whose
image GRUB can boot, and skips cleanly otherwise. A VM node's own life (identity, status, reset,
kill and start, cut and heal, rollouts) is tested on tests/test_vm.py's lab, so the suite boots one
mixed lab with a VM, not two.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from imagetool import lab
from imagetool.errors import InputError, UnreachableError
from tests.conftest import REPO, wait_for

HAVE_QEMU = shutil.which(lab.QEMU) is not None
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason=f"{lab.QEMU} not installed")

ROOT = Path("/var/lib/imagetool-lab")


def a_lab(root: Path = ROOT, accel: str | None = "tcg") -> lab.Lab:
    the_lab = lab.Lab(name="vmt", dir=root / "vmt", subnet="10.250.77.0/24", bridge="itl1234br",
                      gateway="10.250.77.1", release="webapp-1", accel=accel)
    the_lab.nodes = [
        lab.LabNode(name="node1", index=1, address="10.250.77.11", netns="imagetool-vmt-node1",
                    host_veth="itl1234n1", machine_uuid="11111111-2222-3333-4444-555555555555"),
        lab.LabNode(name="node2", index=2, address="10.250.77.12", netns="", host_veth="",
                    machine_uuid="66666666-7777-8888-9999-000000000000", kind=lab.VM, tap="itl1234t2",
                    mac="52:54:00:aa:bb:cc"),
    ]
    return the_lab


# ------------------------------------------------------------------------------ pure pieces


def test_qemu_argv_tcg():
    the_lab = a_lab()
    nd = "/var/lib/imagetool-lab/vmt/nodes/node2"
    assert lab.qemu_argv(the_lab, the_lab.nodes[1], "tcg") == [
        "qemu-system-x86_64", "-name", "vmt-node2", "-nodefaults", "-no-user-config",
        "-machine", "pc", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "1024",
        "-uuid", "66666666-7777-8888-9999-000000000000",
        "-drive", f"file={nd}/disk.raw,format=raw,if=virtio",
        "-netdev", "tap,id=net0,ifname=itl1234t2,script=no,downscript=no",
        "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:aa:bb:cc",
        "-device", "virtio-rng-pci",
        "-display", "none",
        "-chardev", f"file,id=console,path={nd}/console.log,append=on",
        "-serial", "chardev:console",
        "-qmp", f"unix:{nd}/qmp.sock,server=on,wait=off",
        "-pidfile", f"{nd}/qemu.pid",
        "-daemonize",
    ]


def test_qemu_argv_kvm_uses_the_host_cpu_and_commas_in_paths_are_escaped():
    the_lab = a_lab(root=Path("/srv/a,b"))
    argv = lab.qemu_argv(the_lab, the_lab.nodes[1], "kvm")
    assert argv[argv.index("-accel") + 1] == "kvm" and argv[argv.index("-cpu") + 1] == "host"
    assert argv[argv.index("-drive") + 1] == "file=/srv/a,,b/vmt/nodes/node2/disk.raw,format=raw,if=virtio"
    assert argv[argv.index("-pidfile") + 1] == "/srv/a,b/vmt/nodes/node2/qemu.pid"  # not a qemu option string


def test_kvm_probe_argv():
    assert lab.kvm_probe_argv(Path("/l/vmt/kvm-probe.pid")) == [
        "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-machine", "pc", "-accel", "kvm", "-cpu", "host",
        "-m", "32", "-display", "none", "-no-reboot", "-boot", "reboot-timeout=0", "-pidfile", "/l/vmt/kvm-probe.pid",
    ]


def test_network_file():
    assert lab.network_file("10.250.77.12", "10.250.77.1") == (
        "# imagetool lab: this node's address on the lab's bridge (overrides the image's DHCP default)\n"
        "[Match]\n"
        "Type=ether\n"
        "\n"
        "[Network]\n"
        "Address=10.250.77.12/24\n"
        "Gateway=10.250.77.1\n"
        "LinkLocalAddressing=no\n"
        "IPv6AcceptRA=no\n"
    )


def test_vm_var_files():
    node = a_lab().nodes[1]
    files = lab.vm_var_files(node, "10.250.77.1", b"PRIVATE", b"ssh-ed25519 AAAA root@node2\n")
    assert files == {
        "lib/imagetool/etc/hostname": b"node2\n",
        "lib/imagetool/network/10-lab.network": lab.network_file("10.250.77.12", "10.250.77.1").encode(),
        "lib/ssh/ssh_host_ed25519_key": b"PRIVATE",
        "lib/ssh/ssh_host_ed25519_key.pub": b"ssh-ed25519 AAAA root@node2\n",
    }
    # Sorts before the image's DHCP default, so systemd-networkd uses it.
    assert sorted(["10-lab.network", "90-imagetool-wired.network"])[0] == "10-lab.network"


def test_vm_nodes_are_the_highest_numbered():
    assert lab.node_kinds(3, 0) == ["container"] * 3
    assert lab.node_kinds(3, 1) == ["container", "container", "vm"]
    assert lab.node_kinds(2, 2) == ["vm", "vm"]


def test_tap_names_fit_and_carry_the_lab_prefix():
    for name in ("a", "a-very-long-name"):
        tap = lab.tap_name(name, 200)
        assert len(tap) <= 15 and tap.startswith(lab.link_prefix(name))  # what `down` deletes


def test_mac_is_stable_per_lab_and_node():
    assert lab.mac_address("vmt", "node1") == lab.mac_address("vmt", "node1")
    macs = {lab.mac_address(lab_name, node) for lab_name in ("vmt", "other") for node in ("node1", "node2")}
    assert len(macs) == 4
    assert all(m.startswith("52:54:00:") and len(m) == 17 for m in macs)


def test_vm_disk_size_gives_var_exactly_its_size():
    from imagetool import disk

    size = lab.vm_disk_size(3 * 1024**3)
    assert size - disk.VAR_START - disk.GPT_BACKUP == 3 * 1024**3
    assert size >= 3 * 1024**3 + 65 * 1024**2


def test_node_json_without_kind_is_a_container(tmp_path):
    (tmp_path / "node.json").write_text(json.dumps({
        "name": "node1", "index": 1, "address": "10.250.77.11", "netns": "imagetool-vmt-node1",
        "host_veth": "itl1234n1", "machine_uuid": "x"}))
    node = lab.LabNode.load(tmp_path)
    assert node.kind == "container" and not node.is_vm and node.host_link == "itl1234n1"
    vm = a_lab().nodes[1]
    assert vm.is_vm and vm.host_link == "itl1234t2"


# ------------------------------------------------------------------------ accelerator choice


class Probe:
    def __init__(self, works: bool) -> None:
        self.works, self.calls = works, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.works


def test_accel_explicit_choice_wins_and_does_not_probe():
    probe = Probe(True)
    assert lab.choose_accel("tcg", {"IMAGETOOL_LAB_ACCEL": "kvm"}, probe) == ("tcg", "--accel")
    assert lab.choose_accel("kvm", {}, probe) == ("kvm", "--accel")
    assert probe.calls == 0


def test_accel_environment_then_probe():
    probe = Probe(True)
    assert lab.choose_accel("auto", {"IMAGETOOL_LAB_ACCEL": "tcg"}, probe) == ("tcg", "IMAGETOOL_LAB_ACCEL")
    assert probe.calls == 0
    assert lab.choose_accel("auto", {"IMAGETOOL_LAB_ACCEL": "auto"}, probe)[0] == "kvm"
    assert lab.choose_accel("auto", {}, probe)[0] == "kvm"
    assert probe.calls == 2
    accel, reason = lab.choose_accel("auto", {}, Probe(False))
    assert accel == "tcg" and reason.startswith("probe")


def test_accel_bad_values_are_input_errors():
    with pytest.raises(InputError, match="IMAGETOOL_LAB_ACCEL"):
        lab.choose_accel("auto", {"IMAGETOOL_LAB_ACCEL": "hvf"}, Probe(True))
    with pytest.raises(InputError, match="--accel"):
        lab.choose_accel("xen", {}, Probe(True))


def test_probe_is_bounded_and_kills_what_hangs():
    assert lab.run_probe(["true"], 5) is True
    assert lab.run_probe(["false"], 5) is False
    assert lab.run_probe(["/nonexistent/qemu"], 5) is False
    started = time.monotonic()
    assert lab.run_probe(["sleep", "61.75"], 0.3) is False  # an argument nobody else uses
    assert time.monotonic() - started < 5
    assert subprocess.run(["pgrep", "-xf", "sleep 61.75"], capture_output=True).returncode != 0


@needs_qemu
def test_probe_target_ends_by_itself(tmp_path):
    """The probe's guest ends qemu on its own: under TCG (which always works) it must, quickly."""
    argv = lab.kvm_probe_argv(tmp_path / "probe.pid")
    argv[argv.index("kvm")] = "tcg"
    argv[argv.index("host")] = "max"
    assert lab.run_probe(argv, 20)


# ----------------------------------------------------------------------------------- QMP


def fake_qmp_server(path: Path, seen: list[dict]) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, server:
            f = conn.makefile("rwb")
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            f.flush()
            for line in f:
                msg = json.loads(line)
                seen.append(msg)
                if msg["execute"] == "system_reset":  # an event first, as qemu sends RESET
                    f.write(b'{"event": "RESET", "data": {"guest": false}}\n')
                    f.write(b'{"return": {}}\n')
                elif msg["execute"] == "qmp_capabilities":
                    f.write(b'{"return": {}}\n')
                else:
                    f.write(b'{"error": {"class": "CommandNotFound", "desc": "nope"}}\n')
                f.flush()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_qmp_client_against_a_fake_monitor(tmp_path):
    seen: list[dict] = []
    sock = tmp_path / "qmp.sock"
    fake_qmp_server(sock, seen)
    assert lab.qmp(sock, "system_reset") == {}
    assert seen == [{"execute": "qmp_capabilities"}, {"execute": "system_reset"}]
    sock2 = tmp_path / "qmp2.sock"
    fake_qmp_server(sock2, [])
    with pytest.raises(lab.ImagetoolError, match="refused bogus"):
        lab.qmp(sock2, "bogus")
    with pytest.raises(lab.ImagetoolError, match="cannot talk"):
        lab.qmp(tmp_path / "none.sock", "system_reset")


@needs_qemu
def test_qmp_client_against_real_qemu(tmp_path):
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen([lab.QEMU, "-nodefaults", "-accel", "tcg", "-m", "32", "-display", "none", "-S",
                             "-qmp", f"unix:{sock},server=on,wait=off"], stderr=subprocess.DEVNULL)
    try:
        assert wait_for(sock.exists, 10)
        assert lab.qmp(sock, "system_reset") == {}
        assert lab.qmp(sock, "query-status")["status"] == "prelaunch"
        lab.qmp(sock, "quit")
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------ inputs, CLI, refusals


def test_up_checks_vm_nodes_before_touching_anything(tmp_path):
    for n, k in ((2, 3), (2, -1)):
        with pytest.raises(InputError, match="--vm-nodes"):
            lab.up("vmt", n, object(), root=tmp_path, vm_nodes=k)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="--accel"):
        lab.up("vmt", 2, object(), root=tmp_path, vm_nodes=1, accel="xen")  # type: ignore[arg-type]
    assert not (tmp_path / "vmt").exists()


def test_fill_is_refused_on_a_vm_node():
    with pytest.raises(InputError, match="node2 is a VM"):
        lab.fill(a_lab(), "node2", 1024)
    with pytest.raises(InputError, match="node2 is a VM"):
        lab.unfill(a_lab(), "node2")


def test_reset_of_a_powered_off_vm_says_so(tmp_path):
    the_lab = a_lab(root=tmp_path)
    with pytest.raises(lab.ImagetoolError, match="powered off"):
        lab.reset(the_lab, "node2")


@pytest.mark.parametrize("args, vm_nodes", [
    ([], 0), (["--vm"], 3), (["--vm-nodes", "1"], 1), (["--vm", "--vm-nodes", "3"], 3),
])
def test_cli_lab_up_passes_vm_nodes_and_accel(monkeypatch, tmp_path, args, vm_nodes):
    import imagetool.store
    from imagetool.cli import main

    calls = []

    def fake_up(name, n_nodes, release, **kw):
        calls.append((name, n_nodes, kw["vm_nodes"], kw["accel"]))
        the_lab = a_lab(root=tmp_path)
        return the_lab

    monkeypatch.setattr(lab, "up", fake_up)
    monkeypatch.setattr(imagetool.store, "resolve_release", lambda store, ref: type("R", (), {"id": ref})())
    r = CliRunner().invoke(main, ["lab", "up", "--lab", "vmt", "--nodes", "3", "--release", "webapp-1",
                                  "--accel", "tcg", "--json", *args])
    assert r.exit_code == 0, r.output
    assert calls == [("vmt", 3, vm_nodes, "tcg")]
    assert [n["kind"] for n in json.loads(r.stdout)["nodes"]] == ["container", "vm"]


def test_cli_lab_up_refuses_contradicting_vm_options():
    from imagetool.cli import main

    r = CliRunner().invoke(main, ["lab", "up", "--nodes", "3", "--release", "x", "--vm", "--vm-nodes", "1"])
    assert r.exit_code == 2 and "--vm-nodes 1" in r.output


# ----------------------------------------------------------------------- real VM nodes



def vm_ready(release) -> None:
    from imagetool import disk

    if os.geteuid() != 0:
        pytest.skip("needs root (tap devices, mounts, network namespaces)")
    if not HAVE_QEMU:
        pytest.skip(f"{lab.QEMU} not installed")
    if not Path("/dev/net/tun").exists():
        pytest.skip("no /dev/net/tun")
    try:
        disk.preflight()
        disk.check_bootable(release)
    except lab.ImagetoolError as e:
        pytest.skip(f"no bootable disk for a VM here: {e}")


@pytest.fixture(scope="module")
def vm_release(release1):
    vm_ready(release1)
    return release1


NOTHING = {"processes": [], "mounts": [], "loops": [], "netns": [], "links": [], "cgroups": [], "dir": []}


@pytest.mark.lab
@pytest.mark.vm
def test_failed_up_with_a_vm_leaves_nothing_behind(vm_release, lab_root):
    name = "itvmfail"
    lab.down(name, lab_root)
    with pytest.raises(UnreachableError, match="console.log"):
        lab.up(name, 1, vm_release, root=lab_root, var_size=2 * 1024**3, vm_nodes=1, accel="tcg",
               vm_boot_timeout=1)
    assert lab.leftovers(name, lab_root) == NOTHING


@pytest.mark.lab
@pytest.mark.vm
def test_down_after_the_lab_tool_crashed_leaves_nothing_behind(vm_release, lab_root):
    """`up` killed with SIGKILL once its VM runs: `down` finds qemu, tap and disk from the lab's name."""
    name = "itvmcrash"
    lab.down(name, lab_root)
    code = ("from pathlib import Path; from imagetool import lab; from imagetool.store import Store, resolve_release; "
            f"release = resolve_release(Store('.'), {str(vm_release.manifest_path)!r}); "
            f"lab.up({name!r}, 1, release, root=Path({str(lab_root)!r}), var_size=2 * 1024**3, vm_nodes=1, "
            "accel='tcg')")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        pidfile = lab_root / name / "nodes/node1/qemu.pid"
        assert wait_for(lambda: pidfile.exists() or proc.poll() is not None, 180) and pidfile.exists(), \
            proc.stderr.read().decode() if proc.poll() is not None else "qemu did not start"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        there = lab.leftovers(name, lab_root)
        assert there["processes"] and there["links"] and there["dir"], there
        lab.down(name, lab_root)
        assert lab.leftovers(name, lab_root) == NOTHING
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        lab.down(name, lab_root)
