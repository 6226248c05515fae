"""The controller's side of signatures, against local machines running the real helper: a release
the operator's trusted keys (inventory `trusted_keys`, `--trusted-key`) do not vouch for is
refused before any node is contacted, and a release a node's own keys would refuse is not sent to
it. Exit code 5 (VerificationError) either way for `stage`; in a rollout the refusing node is a
failed node (exit 3, tests/test_update_plan.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagetool.errors import InputError, VerificationError
from imagetool.store import StoredRelease
from rollout.inventory import load_inventory
from rollout.node import HelperNode
from rollout.stage import stage, stage_all
from rollout.update import Rollout
from tests.local_fleet import OLD, Fleet, actions, fast_boot_polls, fleet, machine, options, state  # noqa: F401
from tests.samples import make_release


def tamper(release: StoredRelease) -> None:
    """Rewrite the manifest after signing (its .sig stays): what an attacker with the store does."""
    doc = json.loads(release.manifest_path.read_bytes())
    doc["description"] = "not what was signed"
    release.manifest_path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def trust_on_node(node: HelperNode, key: Path) -> None:
    """A key on the node's /var, as `imagetool disk --trusted-key` installs it."""
    machine(node).node_var.install_trusted_keys([key])


def sent(nodes: list[HelperNode]) -> list[tuple[str, str]]:
    return [a for n in nodes for a in actions(n, "put", "stage-commit")]


def test_rollout_refuses_an_unsigned_release_before_contacting_any_node(
        tmp_path: Path, fleet: Fleet, keys: dict[str, Path]) -> None:
    nodes = fleet(2)
    release = make_release(tmp_path / "store", "web", "1.1")
    with pytest.raises(VerificationError, match=r"release web-1.1 .* is not signed.*trusted keys: .*release.pem") as e:
        Rollout(nodes, options(trusted_keys=[keys["release.pem"]])).run(release)
    assert e.value.exit_code == 5
    assert [a for n in nodes for a in actions(n) if a[0] != "boot"] == [], "no node was even asked"


def test_rollout_refuses_a_tampered_manifest_with_a_stale_signature(
        tmp_path: Path, fleet: Fleet, keys: dict[str, Path]) -> None:
    nodes = fleet(2)
    release = make_release(tmp_path / "store", "web", "1.1", sign_key=keys["release"])
    tamper(release)
    with pytest.raises(VerificationError, match="matches none of the trusted keys"):
        Rollout(nodes, options(), trusted_keys=[keys["release.pem"]]).run(release)
    assert sent(nodes) == []
    assert all(state(n).committed == OLD and not state(n).has_image("web-1.1") for n in nodes)


def test_stage_all_refuses_a_release_signed_by_another_key(
        tmp_path: Path, fleet: Fleet, keys: dict[str, Path]) -> None:
    nodes = fleet(1)
    release = make_release(tmp_path / "store", "web", "1.1", sign_key=keys["other"])
    with pytest.raises(VerificationError):
        stage_all(nodes, release, trusted_keys=[keys["release.pem"]])
    assert sent(nodes) == []


def test_a_release_a_node_would_refuse_is_not_sent_to_it(tmp_path: Path, fleet: Fleet, keys: dict[str, Path]) -> None:
    """No keys on the controller, but the node trusts one: the controller asks it first."""
    nodes = fleet(1)
    trust_on_node(nodes[0], keys["release.pem"])
    unsigned = make_release(tmp_path / "store", "web", "1.1")
    with pytest.raises(VerificationError, match=r"release web-1.1 \(for node n1\) is not signed.*release.pem \(/var\)"):
        stage(nodes[0], unsigned)
    tampered = make_release(tmp_path / "store", "web", "1.2", sign_key=keys["release"])
    tamper(tampered)
    report = stage_all(nodes, tampered)
    assert isinstance(report.results["n1"].exception, VerificationError)
    assert actions(nodes[0], "put", "stage-commit") == []


def test_signed_release_rolls_out_and_shows_as_verified(tmp_path: Path, fleet: Fleet, keys: dict[str, Path]) -> None:
    nodes = fleet(2)
    for n in nodes:
        trust_on_node(n, keys["release.pem"])
    release = make_release(tmp_path / "store", "web", "1.1", sign_key=keys["release"])
    result = Rollout(nodes, options(trusted_keys=[keys["release.pem"]])).run(release)
    assert result.exit_code == 0, result.to_dict()
    for n in nodes:
        st = state(n)
        assert st.committed == "web-1.1"
        new, old = st.image("web-1.1"), st.image(OLD)
        assert new is not None and (new.signed, new.signed_by, new.signature) == (True, "release.pem", "verified")
        assert old is not None and (old.signed, old.signature) == (False, "unsigned")
        assert [k.name for k in st.trusted_keys or ()] == ["release.pem"]


def test_node_refusal_at_stage_commit_is_exit_5(tmp_path: Path, fleet: Fleet, keys: dict[str, Path]) -> None:
    """A helper that refuses what the controller could not check beforehand (its keys changed
    between stage-info and stage-commit) fails the node with a verification error."""
    nodes = fleet(1)
    release = make_release(tmp_path / "store", "web", "1.1")
    node = nodes[0]
    info = node.stage_info

    def keys_arrive_meanwhile(image_id: str):  # type: ignore[no-untyped-def]
        answer = info(image_id)
        trust_on_node(node, keys["release.pem"])
        return answer

    node.stage_info = keys_arrive_meanwhile  # type: ignore[method-assign]
    with pytest.raises(VerificationError) as e:
        stage(node, release)
    assert e.value.exit_code == 5 and "web-1.1 is not signed" in str(e.value)
    assert not state(node).has_image("web-1.1")


def test_inventory_trusted_keys(tmp_path: Path, keys: dict[str, Path]) -> None:
    inv = tmp_path / "inventory.yaml"
    (tmp_path / "release.pem").write_bytes(keys["release.pem"].read_bytes())
    inv.write_text("trusted_keys: [release.pem]\nnodes:\n  a: {host: 10.0.0.1}\n")
    assert load_inventory(inv).trusted_keys == [tmp_path / "release.pem"]
    inv.write_text("trusted_keys: [missing.pem]\nnodes:\n  a: {host: 10.0.0.1}\n")
    with pytest.raises(InputError, match=r"inventory.yaml: trusted_keys.0: .*missing.pem: public key does not exist"):
        load_inventory(inv)
    inv.write_text(f"trusted_keys: [{keys['release']}]\nnodes:\n  a: {{host: 10.0.0.1}}\n")
    with pytest.raises(InputError, match="not a PEM public key"):
        load_inventory(inv)
