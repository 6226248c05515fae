from __future__ import annotations

from pathlib import Path

import pytest

from imagetool.errors import InputError, NotFoundError
from imagetool.release import load_release
from imagetool.yamlfile import load_yaml, parse_yaml
from rollout.inventory import load_inventory


def test_safe_load_semantics() -> None:
    assert parse_yaml("a: 1\nb: [x, 'y']\nc: {d: null}\n", "f.yaml") == {"a": 1, "b": ["x", "y"], "c": {"d": None}}
    with pytest.raises(InputError, match=r"f.yaml: malformed YAML at line 1, column 4: .*python/object"):
        parse_yaml("a: !!python/object/apply:os.system ['true']\n", "f.yaml")


def test_duplicate_keys_are_refused_with_both_lines() -> None:
    with pytest.raises(InputError, match=r"f.yaml: malformed YAML at line 4, column 3: found duplicate key 'p' \(first at line 2\)"):
        parse_yaml("x:\n  p: 1\n  q: 2\n  p: 3\n", "f.yaml")


def test_merge_keys_may_be_overridden() -> None:
    assert parse_yaml("base: &b {p: 1, q: 2}\nx: {<<: *b, p: 3}\n", "f.yaml")["x"] == {"p": 3, "q": 2}


def test_unclosed_quote_names_where_it_opened() -> None:
    with pytest.raises(InputError, match=r"at line 3, column 1: found unexpected end of stream "
                                         r"\(while scanning a quoted scalar at line 2, column 10\)"):
        parse_yaml('name: webapp\nversion: "1.0\n', "f.yaml")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"nope.yaml: release file does not exist"):
        load_yaml(tmp_path / "nope.yaml", "release file")
    with pytest.raises(InputError, match=r"is a directory, expected a release file \(YAML\)"):
        load_yaml(tmp_path, "release file")


def test_release_and_inventory_refuse_duplicate_keys_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGETOOL_SSH_CONFIG", str(tmp_path / "ssh_config"))
    release = tmp_path / "r.yaml"
    release.write_text('name: webapp\nversion: "1"\nname: other\n')
    with pytest.raises(InputError, match=r"r.yaml: malformed YAML at line 3, column 1: found duplicate key 'name' \(first at line 1\)"):
        load_release(release)
    inventory = tmp_path / "i.yaml"
    inventory.write_text("nodes:\n  a: {host: h1}\n  a: {host: h2}\n")
    with pytest.raises(InputError, match=r"i.yaml: malformed YAML at line 3, column 3: found duplicate key 'a' \(first at line 2\)"):
        load_inventory(inventory)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True))


def test_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path: Path) -> None:
    assert len(BOMB) < 400
    with pytest.raises(InputError, match=r"aliases expand this document to more than") as info:
        parse_yaml(BOMB, "f.yaml")
    assert len(str(info.value)) < 300
    p = tmp_path / "bomb.yaml"
    p.write_text("name: webapp\nversion: '1'\npackages: *i\n".replace("*i", "[]") + "x: " + "[*a]\n")
    with pytest.raises(InputError):
        load_release(p)


def test_recursive_alias_is_refused() -> None:
    with pytest.raises(InputError, match="refers to the value that contains it"):
        parse_yaml("a: &a [*a]\n", "f.yaml")


def test_error_messages_quote_values_briefly(tmp_path: Path) -> None:
    # Shared values (anchors) stay under the expansion limit but are still big: the message
    # quotes them cut short.
    p = tmp_path / "r.yaml"
    p.write_text("name: webapp\nversion: '1'\nbig: &b [" + ", ".join(["'" + "y" * 50 + "'"] * 300) + "]\n"
                 "packages: {x: *b}\n".replace("big: &b", "description: &b"))
    with pytest.raises(InputError) as info:
        load_release(p)
    assert len(str(info.value)) < 500, str(info.value)


def test_files_are_read_with_a_size_limit(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"/dev/zero: too large for release file"):
        load_release("/dev/zero")
    with pytest.raises(InputError, match=r"too large for inventory file"):
        load_inventory("/dev/zero")
