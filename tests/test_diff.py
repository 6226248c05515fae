from __future__ import annotations

import json

import pytest

from imagetool.diff import diff_releases
from imagetool.manifest import ImageInfo, Manifest
from imagetool.versions import debian_version_cmp, version_key
from tests.samples import sample_manifest


def make_manifest(version: str, packages: dict[str, str], services=(), checks=(), size: int = 1000) -> Manifest:  # type: ignore[no-untyped-def]
    return sample_manifest(version=version, packages=packages, services=tuple(services), checks=tuple(checks),
                           image=ImageInfo(f"webapp-{version}.squashfs", size, "b" * 64))



@pytest.mark.parametrize(
    "a,b,expected",
    [
        ("1.0", "1.0-1", -1),
        ("1:0.9", "2.0", 1),
        ("1.0~rc1", "1.0", -1),
        ("2.10", "2.9", 1),
        ("1.0+b1", "1.0", 1),
        ("1.0", "1.0", 0),
        ("0:1.0", "1.0", 0),
        ("1.0~~", "1.0~", -1),
        ("1.0a", "1.0+", -1),
        ("5.2.15-2+b2", "5.2.15-2", 1),
        ("1.0-1~bpo12+1", "1.0-1", -1),
        ("01.0", "1.0", 0),
    ],
)
def test_debian_version_cmp(a: str, b: str, expected: int) -> None:
    assert debian_version_cmp(a, b) == expected
    assert debian_version_cmp(b, a) == -expected


def test_release_versions_sort_as_dpkg_sorts_them() -> None:
    # Release versions may contain '_', which Debian versions may not: it sorts as a separator.
    versions = ["1.10", "2.0~rc1", "1.9", "2.0", "1_11", "1:0.1"]
    assert sorted(versions, key=version_key) == ["1.9", "1.10", "1_11", "2.0~rc1", "2.0", "1:0.1"]


def test_diff() -> None:
    a = make_manifest(
        "1.0",
        {"bash": "5.2.15-2", "curl": "7.88.1-10", "libssl3": "3.0.11-1", "old": "1.0", "same": "2"},
        services=["webapp.service", "old.timer"],
        checks=[("http", "curl x", 10), ("disk", "test -w /var", 10), ("gone", "true", 1)],
        size=1000,
    )
    b = make_manifest(
        "1.1",
        {"bash": "5.2.15-2+b2", "curl": "7.88.1-10", "libssl3": "3.0.9-1", "new": "0.1~rc1", "same": "2"},
        services=["webapp.service", "ssh.socket"],
        checks=[("http", "curl x", 20), ("disk", "test -w /var", 10), ("fresh", "true", 1)],
        size=1500,
    )
    d = diff_releases(a, b)
    assert d.added == [("new", "0.1~rc1")]
    assert d.removed == [("old", "1.0")]
    assert d.upgraded == [("bash", "5.2.15-2", "5.2.15-2+b2")]
    assert d.downgraded == [("libssl3", "3.0.11-1", "3.0.9-1")]
    assert d.services_added == ["ssh.socket"]
    assert d.services_removed == ["old.timer"]
    assert d.health_checks_added == ["fresh"]
    assert d.health_checks_removed == ["gone"]
    assert d.health_checks_changed == ["http"]
    assert (d.size_before, d.size_after, d.size_change) == (1000, 1500, 500)
    assert not d.is_empty
    doc = d.to_dict()
    json.dumps(doc)
    assert doc["packages"]["upgraded"] == [{"name": "bash", "old": "5.2.15-2", "new": "5.2.15-2+b2"}]
    assert doc["size"]["change"] == 500
    assert (doc["before"], doc["after"]) == ("webapp-1.0", "webapp-1.1")


def test_health_check_command_change() -> None:
    a = make_manifest("1.0", {}, checks=[("http", "curl a", 10)])
    b = make_manifest("1.1", {}, checks=[("http", "curl b", 10)])
    assert diff_releases(a, b).health_checks_changed == ["http"]


def test_empty_diff() -> None:
    a = make_manifest("1.0", {"bash": "5"}, services=["a.service"], checks=[("h", "true", 10)], size=10)
    b = make_manifest("1.1", {"bash": "5"}, services=["a.service"], checks=[("h", "true", 10.0)], size=12)
    d = diff_releases(a, b)
    assert d.is_empty
    assert d.size_change == 2
