"""The node's signature policy, on the real helper against a fake node root: a node that trusts a
key (from its image or its /var) takes only releases signed by one, at stage-commit, verify and
set-next alike, and its `status` calls an image signed only when the signature verifies now."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from imagetool.signing import sign_bytes
from tests.test_node_helper import NodeRoot, make_lab_node


@pytest.fixture
def node(tmp_path: Path) -> NodeRoot:
    return NodeRoot(tmp_path / "node")


def trust(node: NodeRoot, key: Path, where: str = "var") -> None:
    """Install a public key where the node looks: the image's /etc or the node's /var."""
    d = node.root / "etc/imagetool/trusted-keys" if where == "image" else node.var / "trusted-keys"
    d.mkdir(parents=True, exist_ok=True)
    (d / key.name).write_bytes(key.read_bytes())


def manifest_bytes(image_id: str, data: bytes) -> bytes:
    return json.dumps({"id": image_id, "image": {"sha256": hashlib.sha256(data).hexdigest(),
                                                 "size": len(data)}}).encode()


def transfer(node: NodeRoot, image_id: str, data: bytes, manifest: bytes, sig: bytes | None) -> None:
    """Put an image's files into .incoming, as the controller's transfer does."""
    incoming = node.images / ".incoming"
    incoming.mkdir(exist_ok=True)
    (incoming / f"{image_id}.squashfs").write_bytes(data)
    (incoming / f"{image_id}.manifest.json").write_bytes(manifest)
    if sig is not None:
        (incoming / f"{image_id}.sig").write_bytes(sig)


def signed(node: NodeRoot, image_id: str, key: Path, ok: bool = True) -> dict:
    """Transfer an image signed with `key` and stage-commit it; the helper's answer."""
    data = f"squashfs of {image_id}".encode() * 50
    manifest = manifest_bytes(image_id, data)
    transfer(node, image_id, data, manifest, sign_bytes(manifest, key))
    return node.run("stage-commit", image_id, ok=ok)


def tampered(node: NodeRoot, image_id: str, key: Path) -> None:
    """Transfer an image whose manifest was rewritten (for other image bytes) after signing: the
    .sig is the stale one of the original manifest."""
    original = manifest_bytes(image_id, b"the signed image")
    evil = b"an image nobody signed" * 10
    transfer(node, image_id, evil, manifest_bytes(image_id, evil), sign_bytes(original, key))


def image(node: NodeRoot, image_id: str) -> dict:
    return next(i for i in node.run("status")["images"] if i["id"] == image_id)


@pytest.mark.parametrize("where", ["var", "image"])
def test_unsigned_release_refused_where_a_key_is_trusted(node: NodeRoot, keys: dict[str, Path], where: str) -> None:
    trust(node, keys["release.pem"], where)
    data = b"unsigned image" * 10
    transfer(node, "web-1", data, manifest_bytes("web-1", data), None)
    refused = node.run("stage-commit", "web-1", ok=False)
    assert refused["kind"] == "verification"
    shown = "image" if where == "image" else "/var"
    assert refused["error"] == (f"web-1 is not signed, and this node accepts only releases signed by a key it "
                                f"trusts: release.pem ({shown})")
    assert node.installed() == set()
    assert not list((node.images / ".incoming").iterdir()), "a refused transfer is not kept to resume from"


def test_tampered_manifest_with_stale_signature_refused_at_stage(node: NodeRoot, keys: dict[str, Path]) -> None:
    trust(node, keys["release.pem"])
    tampered(node, "web-1", keys["release"])
    refused = node.run("stage-commit", "web-1", ok=False)
    assert refused["kind"] == "verification"
    assert refused["error"].startswith("web-1: signature refused: the signature matches none of the trusted keys")
    assert "trusted keys: release.pem (/var)" in refused["error"]
    assert node.installed() == set()


def test_signature_by_an_untrusted_key_refused(node: NodeRoot, keys: dict[str, Path]) -> None:
    trust(node, keys["release.pem"])
    assert "matches none of the trusted keys" in signed(node, "web-1", keys["other"], ok=False)["error"]
    assert node.installed() == set()


def test_garbage_signature_is_a_clear_refusal_not_a_traceback(node: NodeRoot, keys: dict[str, Path]) -> None:
    trust(node, keys["release.pem"])
    data = b"image" * 10
    transfer(node, "web-1", data, manifest_bytes("web-1", data), b"not base64 at all!\n")
    refused = node.run("stage-commit", "web-1", ok=False)
    assert "web-1.sig is not a base64 signature" in refused["error"]
    assert not list((node.images / ".incoming").iterdir())


def test_signed_release_staged_and_verified(node: NodeRoot, keys: dict[str, Path]) -> None:
    trust(node, keys["other.pem"], "image")
    trust(node, keys["release.pem"], "var")
    answer = signed(node, "web-1", keys["release"])
    assert answer["ok"] and answer["signed_by"] == "release.pem" and answer["trusted_keys"] == 2
    assert node.run("verify", "web-1")["signed_by"] == "release.pem"
    st = node.run("status")
    assert st["protocol"] >= 3
    assert [(k["name"], k["where"]) for k in st["trusted_keys"]] == [("other.pem", "image"), ("release.pem", "var")]
    assert st["trusted_keys"][1]["sha256"] == hashlib.sha256(keys["release.pem"].read_bytes()).hexdigest()
    assert {k: image(node, "web-1")[k] for k in ("signed", "signed_by", "signature")} == \
        {"signed": True, "signed_by": "release.pem", "signature": "verified"}


def test_stage_info_hands_out_the_public_keys(node: NodeRoot, keys: dict[str, Path]) -> None:
    trust(node, keys["release.pem"])
    info = node.run("stage-info", "web-1")
    assert [(k["name"], k["pem"]) for k in info["trusted_keys"]] == [("release.pem", keys["release.pem"].read_text())]


def test_signed_means_verified_now_not_a_sig_file_exists(node: NodeRoot, keys: dict[str, Path]) -> None:
    # Without trusted keys a .sig proves nothing: the image is "unchecked", not signed.
    signed(node, "web-1", keys["release"])
    assert {k: image(node, "web-1")[k] for k in ("signed", "signature")} == {"signed": False, "signature": "unchecked"}
    assert node.run("status")["trusted_keys"] == []
    trust(node, keys["release.pem"])
    assert image(node, "web-1")["signed"] is True
    # The manifest changes after staging, its .sig stays: no longer signed.
    manifest = node.images / "web-1.manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"size"', b'"size" '))
    assert {k: image(node, "web-1")[k] for k in ("signed", "signed_by", "signature")} == \
        {"signed": False, "signed_by": None, "signature": "invalid"}


def test_set_next_refuses_a_manifest_tampered_after_staging(node: NodeRoot, keys: dict[str, Path]) -> None:
    trust(node, keys["release.pem"])
    assert signed(node, "web-1", keys["release"])["ok"]
    assert signed(node, "web-2", keys["release"])["ok"]
    node.release("web-1")
    make_lab_node(node, default="web-1")
    # Both the image and its manifest are swapped on the node; the stale .sig stays.
    evil = b"an image nobody signed" * 10
    (node.images / "web-2.squashfs").write_bytes(evil)
    (node.images / "web-2.manifest.json").write_bytes(manifest_bytes("web-2", evil))
    refused = node.run("set-next", "web-2", ok=False)
    assert refused["kind"] == "verification" and refused["error"].startswith("web-2: signature refused")
    assert node.run("verify", "web-2", ok=False)["error"] == refused["error"]
    st = node.run("status")
    assert (st["default"], st["next"]) == ("web-1", None)


def test_set_next_refuses_an_unsigned_image_once_keys_are_trusted(node: NodeRoot, keys: dict[str, Path]) -> None:
    """Staged before the node trusted keys, armed after: the policy holds at the boot too."""
    node.stage("web-1")
    node.stage("web-2")
    node.release("web-1")
    make_lab_node(node, default="web-1")
    trust(node, keys["release.pem"])
    refused = node.run("set-next", "web-2", ok=False)
    assert refused["error"].startswith("web-2 is not signed")
    assert node.run("status")["next"] is None


def test_without_trusted_keys_sha256_still_guards(node: NodeRoot) -> None:
    node.stage("web-1")
    assert node.run("verify", "web-1")["signed_by"] is None
    node.corrupt("web-1")
    refused = node.run("verify", "web-1", ok=False)
    assert refused["kind"] == "verification" and "sha256 mismatch" in refused["error"]
