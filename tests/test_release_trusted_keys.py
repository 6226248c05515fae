"""Trusted keys in the release file: validated there, handed to the imagetool-node element as
contents, and recorded in the manifest so a change of keys is a change of release.

That the element really writes them into an image is checked in test_build_real.py
(test_element_installs_the_release_files_trusted_keys_into_the_image): the element's install.d
runs in an overlay of the built webapp-1 with the environment such a build gets. Neither cached
test image lists trusted_keys itself: nodes booted on one would refuse the unsigned webapp-1 and
the derived releases the lab tests move to."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from imagetool.build import dib_environment
from imagetool.errors import InputError
from imagetool.manifest import KeyInfo, Manifest
from imagetool.release import load_release
from imagetool.signing import generate_keypair
from tests.samples import sample_manifest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples/webapp-2.yaml"


def release_file(tmp_path: Path, keys: str) -> Path:
    p = tmp_path / "webapp.yaml"
    p.write_text(f'name: webapp\nversion: "1.0"\nmirrors: {{distribution: http://deb.example.org/debian}}\n'
                 f'trusted_keys: {keys}\n')
    return p


@pytest.fixture
def pub(tmp_path: Path) -> Path:
    (tmp_path / "keys").mkdir()
    generate_keypair(tmp_path / "keys/release.key", tmp_path / "keys/release.pub")
    return tmp_path / "keys/release.pub"


def test_keys_are_relative_to_the_release_file_and_named_pem(tmp_path: Path, pub: Path) -> None:
    release = load_release(release_file(tmp_path, "[keys/release.pub]"))
    assert release.trusted_keys == {"release.pem": pub}
    env = dib_environment(release, tmp_path)
    assert json.loads(env["IMAGETOOL_TRUSTED_KEYS"]) == {"release.pem": pub.read_text()}


def test_no_keys_installs_none(tmp_path: Path) -> None:
    p = tmp_path / "webapp.yaml"
    p.write_text('name: webapp\nversion: "1.0"\nmirrors: {distribution: http://deb.example.org/debian}\n')
    assert json.loads(dib_environment(load_release(p), tmp_path)["IMAGETOOL_TRUSTED_KEYS"]) == {}


@pytest.mark.parametrize("keys, problem", [
    ("[keys/missing.pem]", r"key 'trusted_keys\[0\]': 'keys/missing.pem' is not a file"),
    ("[keys/release.key]", r"key 'trusted_keys\[0\]': 'keys/release.key' is not a PEM public key"),
    ("[keys/release.pub, other/release.pem]", r"key 'trusted_keys': .* would both be installed as release.pem"),
    ("[keys/release.pub, keys/release.pub]", r"key 'trusted_keys\[1\]': 'keys/release.pub' is listed twice"),
    ("keys/release.pub", r"key 'trusted_keys': expected a list"),
])
def test_bad_keys_are_refused_naming_file_and_key(tmp_path: Path, pub: Path, keys: str, problem: str) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other/release.pem").write_bytes(pub.read_bytes())
    with pytest.raises(InputError, match=problem):
        load_release(release_file(tmp_path, keys))


def test_manifest_records_key_digests_and_reads_old_manifests() -> None:
    m = dataclasses.replace(sample_manifest(), trusted_keys=(KeyInfo("release.pem", "c" * 64),))
    doc = json.loads(m.to_json())
    assert doc["trusted_keys"] == [{"name": "release.pem", "sha256": "c" * 64}]
    assert Manifest.from_json(m.to_json(), "m.json") == m
    del doc["trusted_keys"]  # a manifest from before keys were built into images
    assert Manifest.from_dict(doc, "old.json").trusted_keys == ()
    doc["trusted_keys"] = [{"name": "release.pem", "sha256": "nope"}]
    with pytest.raises(Exception, match=r"trusted_keys\[0\].sha256"):
        Manifest.from_dict(doc, "bad.json")
