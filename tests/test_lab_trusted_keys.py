"""`imagetool lab up --trusted-key`: lab nodes trust release signing keys on their /var, installed
exactly as `imagetool disk --trusted-key` installs them (NodeVar.install_trusted_keys), and a
release those keys did not sign is refused before anything is made.

Unit level, without root: the seeding of a container node's /var (against the real node helper on
a local machine), the VM node's disk options, the refusal, and the command line. No lab is booted
here: the lab tests' clusters run webapp-1, which is unsigned, so their nodes cannot trust a key.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from imagetool import lab
from imagetool.errors import InputError, VerificationError
from imagetool.lab import vm
from imagetool.lab.container import seed_var
from rollout.local import LocalMachine
from rollout.node import NodeStatus
from tests.samples import make_release


def test_a_seeded_node_trusts_the_keys_and_its_helper_says_so(tmp_path: Path, keys: dict[str, Path]) -> None:
    release = make_release(tmp_path / "store", "web", "1.0", sign_key=keys["release"])
    lab_pub = tmp_path / "id_ed25519.pub"
    lab_pub.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB0dGVzdA imagetool-lab-test\n")
    machine = LocalMachine(tmp_path / "node1")
    seed_var(machine.node_var, "node1", release, lab_pub, [keys["release.pem"]])

    installed = machine.node_var.trusted_keys / "release.pem"
    assert installed.read_bytes() == keys["release.pem"].read_bytes()
    assert sorted(p.name for p in machine.node_var.trusted_keys.iterdir()) == ["release.pem"]
    assert (machine.node_var.var / "lib/ssh/authorized_keys/root").read_text() == lab_pub.read_text()
    assert (machine.node_var.state_dir / "etc/hostname").read_text() == "node1\n"

    # The real node helper, booted on that /var: it trusts the key and the release verifies with it.
    machine.power_on()
    try:
        st = NodeStatus.from_answer("node1", machine.inspect())
    finally:
        machine.power_off()
    assert (st.booted, st.committed) == (release.id, release.id)
    assert [(k.name, k.where) for k in st.trusted_keys or ()] == [("release.pem", "var")]
    image = st.image(release.id)
    assert image is not None and (image.signed, image.signed_by, image.signature) == (True, "release.pem", "verified")


def test_without_keys_a_seeded_node_trusts_none(tmp_path: Path) -> None:
    release = make_release(tmp_path / "store", "web", "1.0")
    lab_pub = tmp_path / "id_ed25519.pub"
    lab_pub.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB0dGVzdA imagetool-lab-test\n")
    machine = LocalMachine(tmp_path / "node1")
    seed_var(machine.node_var, "node1", release, lab_pub)
    assert not machine.node_var.trusted_keys.exists()


def test_up_refuses_what_the_keys_did_not_sign_before_touching_anything(tmp_path: Path,
                                                                        keys: dict[str, Path]) -> None:
    root = tmp_path / "labs"
    unsigned = make_release(tmp_path / "store", "web", "1.0")
    with pytest.raises(VerificationError, match=r"release web-1.0 .* is not signed.*release.pem"):
        lab.up("keys", 2, unsigned, root=root, trusted_keys=[keys["release.pem"]])
    other = make_release(tmp_path / "store", "web", "1.1", sign_key=keys["other"])
    with pytest.raises(VerificationError, match="matches none of the trusted keys"):
        lab.up("keys", 2, other, root=root, vm_nodes=1, trusted_keys=[keys["release.pem"]])
    signed = make_release(tmp_path / "store", "web", "1.2", sign_key=keys["release"])
    with pytest.raises(InputError, match="missing.pem"):
        lab.up("keys", 2, signed, root=root, trusted_keys=[tmp_path / "missing.pem"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other/release.pem").write_bytes(keys["release.pem"].read_bytes())
    with pytest.raises(InputError, match="would both be installed as release.pem"):
        lab.up("keys", 2, signed, root=root, trusted_keys=[keys["release.pem"], tmp_path / "other/release.pem"])
    assert not root.exists()


def test_a_vm_node_gets_the_keys_on_its_disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            keys: dict[str, Path]) -> None:
    """A VM node's /var is made by `imagetool disk`: the keys go there as --trusted-key."""
    release = make_release(tmp_path / "store", "web", "1.0", sign_key=keys["release"])
    the_lab = lab.Lab(name="keys", dir=tmp_path / "keys", subnet="10.250.77.0/24", bridge="itl1234br",
                      gateway="10.250.77.1", release=release.id)
    node = lab.LabNode(name="node1", index=1, address="10.250.77.11", netns="", host_veth="",
                       machine_uuid="66666666-7777-8888-9999-000000000000", kind=lab.VM, tap="itl1234t1",
                       mac="52:54:00:aa:bb:cc")
    made = []

    def run_tool(argv: list[str], **kw: object) -> None:
        if argv[0] == "ssh-keygen":  # real host keys; no tap device
            subprocess.run(argv, check=True, capture_output=True)

    monkeypatch.setattr(vm, "run_tool", run_tool)
    monkeypatch.setattr(vm.disk, "make_disk", lambda release, options, progress=None: made.append(options))
    vm.make_vm(the_lab, node, release, 1024**3, trusted_keys=[keys["release.pem"]])
    assert [o.trusted_keys for o in made] == [[keys["release.pem"]]]


@pytest.mark.parametrize("args, expected", [([], []), (["--trusted-key", "a.pem", "--trusted-key", "b.pub"],
                                                        [Path("a.pem"), Path("b.pub")])])
def test_cli_lab_up_passes_trusted_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str],
                                        expected: list[Path]) -> None:
    import imagetool.store
    from imagetool.cli import main

    calls = []

    def fake_up(name: str, n_nodes: int, release: object, **kw: object) -> lab.Lab:
        calls.append(kw["trusted_keys"])
        the_lab = lab.Lab(name=name, dir=tmp_path / name, subnet="10.250.77.0/24", bridge="itl1234br",
                          gateway="10.250.77.1", release="webapp-1")
        the_lab.nodes = [lab.LabNode(name="node1", index=1, address="10.250.77.11", netns="imagetool-keys-node1",
                                     host_veth="itl1234n1", machine_uuid="11111111-2222-3333-4444-555555555555")]
        return the_lab

    monkeypatch.setattr(lab, "up", fake_up)
    monkeypatch.setattr(imagetool.store, "resolve_release", lambda store, ref: type("R", (), {"id": ref})())
    r = CliRunner().invoke(main, ["lab", "up", "--lab", "keys", "--nodes", "1", "--release", "webapp-1", "--json",
                                  *args])
    assert r.exit_code == 0, r.output
    assert calls == [expected]
    assert [n["name"] for n in json.loads(r.stdout)["nodes"]] == ["node1"]
