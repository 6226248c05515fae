from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imagetool.errors import InputError, NotFoundError
from imagetool.release import (
    Base,
    HealthCheck,
    Mirrors,
    Release,
    SquashfsOptions,
    detect_apt_mirrors,
    effective_mirrors,
    load_release,
)

FULL = """\
name: webapp
version: "1.0"
description: "The web application"
base:
  distribution: debian
  release: bookworm
mirrors:
  distribution: http://deb.debian.org/debian/
  security: https://deb.debian.org/debian-security
elements: [openssh-server, vm]
element_paths: [elements]
packages: [python3, curl, libstdc++6]
services: [webapp.service, ssh.socket, getty@tty1.service]
health_checks:
  - name: webapp-http
    command: "curl -fsS http://127.0.0.1:8080/health"
    timeout: 5
  - name: disk
    command: "test -w /var"
environment:
  DIB_FOO: bar
  DIB_NUM: 3
  DIB_FLAG: true
squashfs:
  compression: zstd
  level: 19
  block_size: 262144
  fragments: true
source_date_epoch: 1700000000
"""


def release_to_dict(release: Release) -> dict[str, Any]:
    """A JSON-able view of the release as written (element paths relative, as in the file)."""
    return {
        "name": release.name,
        "version": release.version,
        "id": release.id,
        "description": release.description,
        "base": {"distribution": release.base.distribution, "release": release.base.release},
        "mirrors": {"distribution": release.mirrors.distribution, "security": release.mirrors.security},
        "elements": list(release.elements),
        "element_paths": list(release.element_paths_given),
        "packages": list(release.packages),
        "services": list(release.services),
        "health_checks": [
            {"name": h.name, "command": h.command, "timeout": h.timeout} for h in release.health_checks
        ],
        "environment": dict(release.environment),
        "squashfs": {
            "compression": release.squashfs.compression,
            "level": release.squashfs.level,
            "block_size": release.squashfs.block_size,
            "fragments": release.squashfs.fragments,
        },
        "source_date_epoch": release.source_date_epoch,
    }


def write(tmp_path: Path, text: str, name: str = "webapp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def minimal(extra: str = "") -> str:
    return 'name: webapp\nversion: "1.0"\n' + extra


def test_full_release(tmp_path: Path) -> None:
    (tmp_path / "elements").mkdir()
    r = load_release(write(tmp_path, FULL))
    assert r.id == "webapp-1.0"
    assert r.description == "The web application"
    assert r.base == Base("debian", "bookworm")
    assert r.base.element == "debian-minimal"
    assert r.dib_elements == ["debian-minimal", "openssh-server", "vm"]
    assert r.mirrors == Mirrors("http://deb.debian.org/debian", "https://deb.debian.org/debian-security")
    assert r.element_paths == ((tmp_path / "elements").resolve(),)
    assert r.element_paths[0].is_absolute()
    assert r.packages == ("python3", "curl", "libstdc++6")
    assert r.services == ("webapp.service", "ssh.socket", "getty@tty1.service")
    assert r.health_checks == (
        HealthCheck("webapp-http", "curl -fsS http://127.0.0.1:8080/health", 5),
        HealthCheck("disk", "test -w /var", 10),
    )
    assert r.environment == {"DIB_FOO": "bar", "DIB_NUM": "3", "DIB_FLAG": "1"}
    assert r.squashfs == SquashfsOptions("zstd", 19, 262144, fragments=True)
    assert r.source_date_epoch == 1700000000
    assert r.path == (tmp_path / "webapp.yaml").absolute()
    d = release_to_dict(r)
    assert d["element_paths"] == ["elements"]
    assert d["id"] == "webapp-1.0"
    import json

    json.dumps(d)


def test_minimal_release_gets_defaults(tmp_path: Path) -> None:
    r = load_release(write(tmp_path, "name: webapp\nversion: 2\n"))
    assert r.version == "2"
    assert r.description == ""
    assert r.base == Base("debian", "trixie")  # Debian's current stable
    assert r.mirrors == Mirrors(None, None)
    assert r.elements == () and r.packages == () and r.services == () and r.health_checks == ()
    assert r.element_paths == ()
    assert r.environment == {}
    assert r.squashfs == SquashfsOptions("gzip", 6, 131072)
    assert r.source_date_epoch is None


def test_ubuntu_base(tmp_path: Path) -> None:
    r = load_release(write(tmp_path, minimal("base: {distribution: ubuntu, release: jammy}\n")))
    assert r.dib_elements == ["ubuntu-minimal"]


def test_gzip_default_level(tmp_path: Path) -> None:
    r = load_release(write(tmp_path, minimal("squashfs: {compression: gzip}\n")))
    assert r.squashfs == SquashfsOptions("gzip", 6, 131072)
    r = load_release(write(tmp_path, minimal("squashfs: {compression: xz}\n")))
    assert r.squashfs.level is None


def expect_error(tmp_path: Path, text: str, *fragments: str, cls: type = InputError) -> str:
    p = write(tmp_path, text)
    with pytest.raises(cls) as info:
        load_release(p)
    msg = str(info.value)
    assert str(p) in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="nope.yaml"):
        load_release(tmp_path / "nope.yaml")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory"):
        load_release(tmp_path)


def test_malformed_yaml(tmp_path: Path) -> None:
    expect_error(tmp_path, 'name: webapp\nversion: "1.0\npackages: [a\n', "line ", "column ", "malformed YAML")


def test_malformed_yaml_line_number(tmp_path: Path) -> None:
    expect_error(tmp_path, "name: webapp\nversion: 1\npackages: [a, b\nservices: x: y\n", "line 4")


def test_top_level_not_mapping(tmp_path: Path) -> None:
    expect_error(tmp_path, "- name: webapp\n", "top level", "mapping", "a list")


def test_empty_file(tmp_path: Path) -> None:
    expect_error(tmp_path, "", "top level", "null")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    expect_error(tmp_path, minimal("pakages: [curl]\n"), "key 'pakages'", "unknown key", "packages")


@pytest.mark.parametrize(
    "extra,key,allowed",
    [
        ("base: {distribution: debian, codename: bookworm}\n", "base.codename", "distribution, release"),
        (
            "health_checks:\n  - name: a\n    command: true\n    retries: 3\n",
            "health_checks[0].retries",
            "name, command, timeout",
        ),
        ("squashfs: {compresion: xz}\n", "squashfs.compresion", "compression, level, block_size, fragments"),
        ("mirrors: {main: http://x}\n", "mirrors.main", "distribution, security"),
    ],
)
def test_unknown_nested_key(tmp_path: Path, extra: str, key: str, allowed: str) -> None:
    expect_error(tmp_path, minimal(extra), f"key '{key}'", "unknown key", allowed)


def test_missing_name(tmp_path: Path) -> None:
    expect_error(tmp_path, 'version: "1.0"\n', "key 'name'", "missing")


def test_missing_version(tmp_path: Path) -> None:
    expect_error(tmp_path, "name: webapp\n", "key 'version'", "missing")


@pytest.mark.parametrize("name", ["../etc", "a/../b", ";rm -rf /", "WebApp", "-x", ""])
def test_bad_names(tmp_path: Path, name: str) -> None:
    import json

    expect_error(tmp_path, f'name: {json.dumps(name)}\nversion: "1.0"\n', "key 'name'", "not a valid release name")


@pytest.mark.parametrize("version", ["$(x)", "1.0/..", "1 0", "1..0", "-1"])
def test_bad_versions(tmp_path: Path, version: str) -> None:
    import json

    expect_error(tmp_path, f"name: webapp\nversion: {json.dumps(version)}\n", "key 'version'", "not a valid version")


def test_wrong_type_in_list(tmp_path: Path) -> None:
    expect_error(tmp_path, minimal("packages: [python3, curl, 3]\n"), "key 'packages[2]'", "expected a string, got 3")


def test_wrong_type_for_list(tmp_path: Path) -> None:
    expect_error(tmp_path, minimal("packages: curl\n"), "key 'packages'", "expected a list")


def test_bad_package_name(tmp_path: Path) -> None:
    expect_error(tmp_path, minimal("packages: ['curl; reboot']\n"), "key 'packages[0]'", "not a valid Debian package name")


def test_duplicate_package(tmp_path: Path) -> None:
    expect_error(tmp_path, minimal("packages: [curl, curl]\n"), "key 'packages[1]'", "twice")


@pytest.mark.parametrize(
    "service", ["web app.service", "web/app.service", "webapp", "x.service;reboot", "-h.service", "$(id).service"]
)
def test_bad_service_name(tmp_path: Path, service: str) -> None:
    import json

    expect_error(tmp_path, minimal(f"services: [{json.dumps(service)}]\n"), "key 'services[0]'", "systemd unit")


def test_duplicate_health_check_names(tmp_path: Path) -> None:
    text = minimal(
        "health_checks:\n  - {name: http, command: 'true'}\n  - {name: http, command: 'false'}\n"
    )
    expect_error(tmp_path, text, "key 'health_checks[1].name'", "'http'", "twice")


def test_health_check_missing_command(tmp_path: Path) -> None:
    expect_error(tmp_path, minimal("health_checks:\n  - {name: http}\n"), "key 'health_checks[0].command'", "missing")


@pytest.mark.parametrize("timeout", ["0", "-1", "'10'", "true"])
def test_health_check_bad_timeout(tmp_path: Path, timeout: str) -> None:
    text = minimal(f"health_checks:\n  - {{name: http, command: 'true', timeout: {timeout}}}\n")
    expect_error(tmp_path, text, "key 'health_checks[0].timeout'")


@pytest.mark.parametrize("url", ["ftp://deb.debian.org/debian", "deb.debian.org/debian", "http://", "http://a b/"])
def test_bad_mirror_url(tmp_path: Path, url: str) -> None:
    expect_error(tmp_path, minimal(f"mirrors:\n  distribution: '{url}'\n"), "key 'mirrors.distribution'", "URL")


def test_nonexistent_element_path(tmp_path: Path) -> None:
    expect_error(tmp_path, minimal("element_paths: [missing-elements]\n"), "key 'element_paths[0]'", "missing-elements")


def test_element_path_is_relative_to_yaml_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "rel"
    (sub / "els").mkdir(parents=True)
    p = write(sub, minimal("element_paths: [els]\n"))
    monkeypatch.chdir(tmp_path)
    assert load_release(Path("rel") / p.name).element_paths == ((sub / "els").resolve(),)


@pytest.mark.parametrize("value", ["'no'", "0", "null"])
def test_fragments_is_a_boolean(tmp_path: Path, value: str) -> None:
    expect_error(tmp_path, minimal(f"squashfs: {{fragments: {value}}}\n"), "key 'squashfs.fragments'")


@pytest.mark.parametrize("block", ["4095", "100000", "2097152", "'131072'"])
def test_bad_block_size(tmp_path: Path, block: str) -> None:
    expect_error(tmp_path, minimal(f"squashfs: {{block_size: {block}}}\n"), "key 'squashfs.block_size'")


@pytest.mark.parametrize(
    "squashfs,fragment",
    [
        ("{compression: zstd, level: 23}", "out of range"),
        ("{compression: gzip, level: 10}", "out of range"),
        ("{compression: xz, level: 5}", "no compression level"),
        ("{compression: bzip2}", "not supported"),
    ],
)
def test_bad_squashfs_options(tmp_path: Path, squashfs: str, fragment: str) -> None:
    expect_error(tmp_path, minimal(f"squashfs: {squashfs}\n"), "key 'squashfs.", fragment)


def test_bad_distribution(tmp_path: Path) -> None:
    expect_error(tmp_path, minimal("base: {distribution: fedora}\n"), "key 'base.distribution'", "debian, ubuntu")


def test_bad_environment(tmp_path: Path) -> None:
    expect_error(tmp_path, minimal("environment: {dib_foo: x}\n"), "key 'environment.dib_foo'")
    expect_error(tmp_path, minimal("environment: {DIB_FOO: [x]}\n"), "key 'environment.DIB_FOO'")


def test_bad_source_date_epoch(tmp_path: Path) -> None:
    expect_error(tmp_path, minimal("source_date_epoch: -1\n"), "key 'source_date_epoch'")
    expect_error(tmp_path, minimal("source_date_epoch: '1700000000'\n"), "key 'source_date_epoch'")


def test_base_element_listed_again(tmp_path: Path) -> None:
    expect_error(tmp_path, minimal("elements: [debian-minimal]\n"), "key 'elements[0]'")


# --- apt mirrors -------------------------------------------------------------------------------


def apt_dir(tmp_path: Path, sources_list: str | None = None, **files: str) -> Path:
    d = tmp_path / "apt"
    (d / "sources.list.d").mkdir(parents=True)
    if sources_list is not None:
        (d / "sources.list").write_text(sources_list)
    for name, text in files.items():
        (d / "sources.list.d" / name).write_text(text)
    return d


DEB822 = """\
Types: deb deb-src
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example.org/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example.org/debian-security
Suites: bookworm-security
Components: main
"""


def test_detect_deb822(tmp_path: Path) -> None:
    d = apt_dir(tmp_path, **{"debian.sources": DEB822})
    assert detect_apt_mirrors(d) == ("http://mirror.example.org/debian", "http://security.example.org/debian-security")


def test_detect_deb822_disabled_stanza_and_ignored_files(tmp_path: Path) -> None:
    text = (
        "Types: deb\nURIs: http://disabled.example.org/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb-src\nURIs: http://src.example.org/debian\nSuites: bookworm\n\n" + DEB822
    )
    d = apt_dir(
        tmp_path,
        **{
            "a.sources.disabled": "Types: deb\nURIs: http://ignored.example.org/debian\nSuites: bookworm\n",
            "b.list.save": "deb http://ignored.example.org/debian bookworm main\n",
            "debian.sources": text,
        },
    )
    assert detect_apt_mirrors(d) == ("http://mirror.example.org/debian", "http://security.example.org/debian-security")


def test_detect_one_line(tmp_path: Path) -> None:
    text = """\
# deb http://commented.example.org/debian bookworm main
deb-src http://src.example.org/debian bookworm main

deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://ftp.example.org/debian/ bookworm-updates main
deb [ arch=amd64 ] http://ftp.example.org/debian/ bookworm main contrib  # trailing comment
deb http://security.example.org/ bookworm/updates main
"""
    d = apt_dir(tmp_path, text)
    assert detect_apt_mirrors(d) == ("http://ftp.example.org/debian", "http://security.example.org")


def test_detect_derives_security(tmp_path: Path) -> None:
    d = apt_dir(tmp_path, "deb http://ftp.example.org/debian bookworm main\n")
    assert detect_apt_mirrors(d) == ("http://ftp.example.org/debian", "http://ftp.example.org/debian-security")


def test_detect_sources_list_before_dir(tmp_path: Path) -> None:
    d = apt_dir(tmp_path, "deb http://first.example.org/debian bookworm main\n", **{"x.list": "deb http://second.example.org/debian bookworm main\n"})
    assert detect_apt_mirrors(d)[0] == "http://first.example.org/debian"


def test_detect_nothing(tmp_path: Path) -> None:
    assert detect_apt_mirrors(apt_dir(tmp_path)) == (None, None)
    assert detect_apt_mirrors(tmp_path / "does-not-exist") == (None, None)


@pytest.mark.skipif(not Path("/etc/apt/sources.list.d/debian.sources").exists(), reason="not a deb822 Debian host")
def test_detect_real_etc_apt() -> None:
    dist, sec = detect_apt_mirrors()
    assert dist is not None and dist.startswith("http")
    assert sec is not None and sec.startswith("http")
    assert not dist.endswith("/") and not sec.endswith("/")


def test_effective_mirrors(tmp_path: Path) -> None:
    d = apt_dir(tmp_path, **{"debian.sources": DEB822})
    r = load_release(write(tmp_path, minimal()))
    assert effective_mirrors(r, d) == Mirrors("http://mirror.example.org/debian", "http://security.example.org/debian-security")
    r = load_release(write(tmp_path, minimal("mirrors: {distribution: 'http://own.example.org/debian'}\n")))
    assert effective_mirrors(r, d) == Mirrors("http://own.example.org/debian", "http://own.example.org/debian-security")


def test_effective_mirrors_none_found(tmp_path: Path) -> None:
    p = write(tmp_path, minimal())
    with pytest.raises(InputError, match="set mirrors.distribution in") as info:
        effective_mirrors(load_release(p), apt_dir(tmp_path))
    assert str(p.absolute()) in str(info.value)


def test_effective_mirrors_wrong_distribution(tmp_path: Path) -> None:
    d = apt_dir(tmp_path, "deb http://archive.ubuntu.com/ubuntu jammy main\n")
    r = load_release(write(tmp_path, minimal()))
    with pytest.raises(InputError, match="mirrors.distribution"):
        effective_mirrors(r, d)


@pytest.mark.parametrize("key", ["IMAGETOOL_RELEASE_JSON", "IMAGETOOL_ANYTHING", "PATH", "LD_PRELOAD",
                                 "LD_LIBRARY_PATH", "ELEMENTS_PATH", "PYTHONPATH", "DIB_RELEASE",
                                 "DIB_DISTRIBUTION_MIRROR", "SOURCE_DATE_EPOCH", "BASH_ENV"])
def test_environment_may_not_set_the_tools_own_variables(tmp_path: Path, key: str) -> None:
    expect_error(tmp_path, minimal(f"environment: {{{key}: x}}\n"), f"key 'environment.{key}'",
                 "a release may not set it")


def test_environment_keeps_element_options(tmp_path: Path) -> None:
    r = load_release(write(tmp_path, minimal("environment: {DIB_DEBUG_TRACE: 1, DIB_DEV_USER_USERNAME: a}\n")))
    assert r.environment == {"DIB_DEBUG_TRACE": "1", "DIB_DEV_USER_USERNAME": "a"}


@pytest.mark.parametrize("version", ["1.10", "1.0", "1.5e+3", ".nan"])
def test_version_read_as_a_number_must_be_quoted(tmp_path: Path, version: str) -> None:
    expect_error(tmp_path, f"name: webapp\nversion: {version}\n", "key 'version'", "quote it")


def test_whole_number_version_is_kept(tmp_path: Path) -> None:
    assert load_release(write(tmp_path, "name: webapp\nversion: 3\n")).version == "3"


def test_element_paths_must_stay_in_the_release_directory(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    here = tmp_path / "rel"
    (here / "elements").mkdir(parents=True)
    (here / "sneaky").symlink_to(outside)
    expect_error(here, minimal("element_paths: [../outside]\n"), "outside", "directory tree")
    expect_error(here, minimal("element_paths: [sneaky]\n"), "outside", "symlinks resolved")
    expect_error(here, minimal(f"element_paths: [{outside}]\n"), "directory tree")
    expect_error(here, minimal("element_paths: ['elements:/etc']\n"), "ELEMENTS_PATH")
    assert load_release(write(here, minimal("element_paths: [elements, ./elements/..]\n"))).element_paths == (
        (here / "elements").resolve(), here.resolve())
