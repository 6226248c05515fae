from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from imagetool.errors import AlreadyExistsError, InputError, VerificationError
from imagetool.manifest import ImageInfo, Manifest, sha256_file
from imagetool.signing import generate_keypair, sign_file, verify_release
from tests.samples import sample_manifest


def make_manifest(image: ImageInfo) -> Manifest:
    return sample_manifest(services=("webapp.service",), image=image)



@pytest.fixture
def release(tmp_path: Path) -> dict[str, Path]:
    keys = tmp_path / "keys"
    keys.mkdir()
    generate_keypair(keys / "signing.key", keys / "signing.pub")
    img = tmp_path / "webapp-1.0.squashfs"
    img.write_bytes(os.urandom(50_000))
    man = tmp_path / "webapp-1.0.manifest.json"
    man.write_bytes(make_manifest(ImageInfo(img.name, img.stat().st_size, sha256_file(img))).to_json())
    sig = tmp_path / "webapp-1.0.sig"
    sig.write_bytes(sign_file(man, keys / "signing.key"))
    return {"img": img, "man": man, "sig": sig, "key": keys / "signing.key", "pub": keys / "signing.pub"}


def test_keygen_mode_and_refusal(tmp_path: Path) -> None:
    priv, pub = tmp_path / "k", tmp_path / "k.pub"
    generate_keypair(priv, pub)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    before = priv.read_bytes()
    with pytest.raises(AlreadyExistsError, match=str(priv)):
        generate_keypair(priv, pub)
    assert priv.read_bytes() == before
    generate_keypair(priv, pub, force=True)
    assert priv.read_bytes() != before
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600


def test_signature_format(release: dict[str, Path]) -> None:
    content = release["sig"].read_bytes()
    assert content.endswith(b"\n")
    assert len(base64.b64decode(content.strip(), validate=True)) == 64


def test_sign_and_verify(release: dict[str, Path]) -> None:
    m = verify_release(release["img"], release["man"], release["sig"], release["pub"])
    assert m.id == "webapp-1.0"


def test_verify_without_key_checks_hash_only(release: dict[str, Path]) -> None:
    release["sig"].unlink()
    assert verify_release(release["img"], release["man"], None, None).id == "webapp-1.0"


def test_tampered_image(release: dict[str, Path]) -> None:
    data = bytearray(release["img"].read_bytes())
    data[1234] ^= 0x01
    release["img"].write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="sha256") as info:
        verify_release(release["img"], release["man"], release["sig"], release["pub"])
    assert str(release["img"]) in str(info.value)


def test_truncated_image(release: dict[str, Path]) -> None:
    data = release["img"].read_bytes()
    release["img"].write_bytes(data[:-1])
    with pytest.raises(VerificationError, match="size"):
        verify_release(release["img"], release["man"], None, None)


def test_tampered_manifest(release: dict[str, Path]) -> None:
    text = release["man"].read_text().replace('"webapp.service"', '"evil.service"')
    release["man"].write_text(text)
    with pytest.raises(VerificationError, match="does not match key"):
        verify_release(release["img"], release["man"], release["sig"], release["pub"])


def test_wrong_key(release: dict[str, Path], tmp_path: Path) -> None:
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    with pytest.raises(VerificationError, match="other.pub"):
        verify_release(release["img"], release["man"], release["sig"], tmp_path / "other.pub")


def test_missing_signature(release: dict[str, Path]) -> None:
    release["sig"].unlink()
    with pytest.raises(VerificationError, match="has no signature"):
        verify_release(release["img"], release["man"], release["sig"], release["pub"])
    with pytest.raises(VerificationError, match="has no signature"):
        verify_release(release["img"], release["man"], None, release["pub"])


def test_garbage_signature(release: dict[str, Path]) -> None:
    release["sig"].write_text("not base64 !!!\n")
    with pytest.raises(VerificationError, match=str(release["sig"])):
        verify_release(release["img"], release["man"], release["sig"], release["pub"])


def test_bad_key_files(release: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("hello")
    with pytest.raises(InputError, match="bad.pem"):
        verify_release(release["img"], release["man"], release["sig"], bad)
    with pytest.raises(InputError, match="bad.pem"):
        sign_file(release["man"], bad)
    # A private key where a public one belongs is a mistake worth naming, too.
    with pytest.raises(InputError, match="signing.key"):
        verify_release(release["img"], release["man"], release["sig"], release["key"])


@pytest.mark.parametrize("spelling", ["same", "relative", "symlink", "hardlink", "dangling-symlink"])
@pytest.mark.parametrize("force", [False, True])
def test_keygen_refuses_one_path_for_both_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               spelling: str, force: bool) -> None:
    from click.testing import CliRunner

    from imagetool.cli import main

    monkeypatch.chdir(tmp_path)
    key = tmp_path / "release.key"
    before = b"the operator's only private key\n"
    if spelling != "dangling-symlink":
        key.write_bytes(before)
    public = {"same": str(key), "relative": "./sub/../release.key", "symlink": "link.pub",
              "hardlink": "hard.pub", "dangling-symlink": "link.pub"}[spelling]
    (tmp_path / "sub").mkdir()
    if spelling in ("symlink", "dangling-symlink"):
        (tmp_path / "link.pub").symlink_to(key)
    if spelling == "hardlink":
        os.link(key, tmp_path / "hard.pub")
    r = CliRunner().invoke(main, ["keygen", "--private", str(key), "--public", public, *(["--force"] * force)])
    assert r.exit_code == 2 and "are the same file" in r.output, r.output
    assert "wrote" not in r.output
    if spelling != "dangling-symlink":
        assert key.read_bytes() == before, "nothing was touched"
    else:
        assert not key.exists()
