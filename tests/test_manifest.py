from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from imagetool.errors import NotFoundError, VerificationError
from imagetool.manifest import (
    BuilderInfo,
    ImageInfo,
    Manifest,
    Package,
    load_manifest,
    parse_dpkg_manifest,
    sha256_file,
)
from imagetool.release import Base, HealthCheck, Mirrors, SquashfsOptions


def make_manifest(**over: object) -> Manifest:
    m = Manifest(
        name="webapp",
        version="1.0",
        description="",
        built_at="2026-11-23T09:30:00Z",
        source_date_epoch=1700000000,
        release_sha256="a" * 64,
        builder=BuilderInfo("0.1.0", "3.43.0", "3.11.7", "ci-1"),
        base=Base("debian", "bookworm"),
        mirrors=Mirrors("http://deb.debian.org/debian", "http://deb.debian.org/debian-security"),
        elements=("debian-minimal", "openssh-server"),
        environment={"DIB_FOO": "bar"},
        squashfs=SquashfsOptions("zstd", 15, 131072),
        packages=(Package("bash", "5.2.15-2+b2", "amd64"), Package("adduser", "3.134", "all")),
        services=("webapp.service",),
        health_checks=(HealthCheck("webapp-http", "curl -fsS http://127.0.0.1:8080/health", 10),),
        image=ImageInfo("webapp-1.0.squashfs", 123, "b" * 64),
    )
    return replace(m, **over)  # type: ignore[arg-type]


def test_round_trip() -> None:
    m = make_manifest()
    data = m.to_json()
    assert data.endswith(b"\n")
    doc = json.loads(data)
    assert doc["format"] == 1
    assert doc["id"] == "webapp-1.0"
    assert [p["name"] for p in doc["packages"]] == ["adduser", "bash"]
    assert list(doc) == sorted(doc)
    back = Manifest.from_json(data, "x.manifest.json")
    assert back.to_json() == data
    assert back.id == "webapp-1.0"
    assert back.packages[0] == Package("adduser", "3.134", "all")
    assert back.health_checks == m.health_checks
    assert back.image == m.image


def test_load_manifest(tmp_path: Path) -> None:
    p = tmp_path / "webapp-1.0.manifest.json"
    p.write_bytes(make_manifest().to_json())
    assert load_manifest(p).id == "webapp-1.0"
    with pytest.raises(NotFoundError, match="nope.manifest.json"):
        load_manifest(tmp_path / "nope.manifest.json")


def test_bad_json_names_where() -> None:
    with pytest.raises(VerificationError, match="somewhere.json"):
        Manifest.from_json(b"{not json", "somewhere.json")
    with pytest.raises(VerificationError, match="somewhere.json: top level"):
        Manifest.from_json(b"[]", "somewhere.json")


@pytest.mark.parametrize(
    "mutate,fragment",
    [
        (lambda d: d.pop("image"), "key 'image': missing"),
        (lambda d: d["image"].pop("sha256"), "key 'image.sha256': missing"),
        (lambda d: d.update(format=2), "format 2 is not supported"),
        (lambda d: d.update(name="../x"), "key 'name'"),
        (lambda d: d.update(id="other-1.0"), "key 'id'"),
        (lambda d: d["image"].update(file="../../etc/passwd"), "key 'image.file'"),
        (lambda d: d["image"].update(sha256="xyz"), "key 'image.sha256'"),
        (lambda d: d["packages"][0].update(version=3), "key 'packages[0].version'"),
    ],
)
def test_invalid_manifests(mutate, fragment: str) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(make_manifest().to_json())
    mutate(doc)
    with pytest.raises(VerificationError, match="m.json") as info:
        Manifest.from_json(json.dumps(doc).encode(), "m.json")
    assert fragment in str(info.value)


# What diskimage-builder's dpkg element writes (elements/dpkg/finalise.d/99-write-dpkg-manifest):
# dpkg-query output on one line, then sed turns the last "," into "]}" and breaks after each "},".
DPKG_SED = """{"packages": [
{"package": "adduser","arch": "all","version": "3.134","status": "ii "    },
{"package": "bash","arch": "amd64","version": "5.2.15-2+b2","status": "ii "    },
{"package": "libc6:amd64","arch": "amd64","version": "2.36-9+deb12u4","status": "ii "    },
{"package": "oldpkg","arch": "amd64","version": "1.0-1","status": "rc "    },
{"package": "held","arch": "amd64","version": "2.0","status": "hi "    },
{"package": "zlib1g:amd64","arch": "amd64","version": "1:1.2.13.dfsg-1","status": "ii "}
]}
"""


def expected_packages() -> list[Package]:
    return [
        Package("adduser", "3.134", "all"),
        Package("bash", "5.2.15-2+b2", "amd64"),
        Package("libc6", "2.36-9+deb12u4", "amd64"),
        Package("zlib1g", "1:1.2.13.dfsg-1", "amd64"),
    ]


def test_parse_dpkg_manifest_json(tmp_path: Path) -> None:
    p = tmp_path / "dib-manifest-dpkg-webapp-1.0"
    p.write_text(DPKG_SED)
    assert parse_dpkg_manifest(p) == expected_packages()


def test_parse_dpkg_manifest_lenient(tmp_path: Path) -> None:
    # A trailing comma before ']' (sed left it) makes it invalid JSON; the fallback still reads it.
    broken = DPKG_SED.replace('"ii "}\n]}', '"ii "},\n]}')
    assert broken != DPKG_SED
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken)
    p = tmp_path / "dib-manifest-dpkg-webapp-1.0"
    p.write_text(broken)
    assert parse_dpkg_manifest(p) == expected_packages()


def test_parse_dpkg_manifest_empty(tmp_path: Path) -> None:
    p = tmp_path / "m"
    p.write_text("garbage")
    with pytest.raises(VerificationError, match=str(p)):
        parse_dpkg_manifest(p)
    with pytest.raises(NotFoundError):
        parse_dpkg_manifest(tmp_path / "missing")


def test_sha256_file(tmp_path: Path) -> None:
    p = tmp_path / "f"
    data = b"x" * 3_000_000
    p.write_bytes(data)
    assert sha256_file(p, chunk=4096) == hashlib.sha256(data).hexdigest()


def test_a_manifest_is_read_with_a_size_limit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from imagetool.errors import NotFoundError, VerificationError
    from imagetool.manifest import load_manifest

    with pytest.raises(VerificationError, match="/dev/zero: too large for manifest"):
        load_manifest("/dev/zero")
    with pytest.raises(VerificationError, match="is a directory, expected a manifest"):
        load_manifest(tmp_path)
    with pytest.raises(NotFoundError, match="manifest does not exist"):
        load_manifest(tmp_path / "nope.json")
