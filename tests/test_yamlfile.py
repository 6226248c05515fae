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
