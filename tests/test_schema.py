from __future__ import annotations

import json
import math

import pytest

from imagetool import schema
from imagetool.errors import InputError, VerificationError
from imagetool.schema import Where


def test_key_style_names_the_key() -> None:
    w = Where("r.yaml")
    with pytest.raises(InputError, match=r"^r.yaml: key 'packages\[2\]': expected a string, got 3 \(an integer\)$"):
        schema.string_list(["a", "b", 3], w / "packages")
    with pytest.raises(InputError, match=r"^r.yaml: key 'base.codename': unknown key \(allowed: distribution, release\)$"):
        schema.mapping({"codename": "x"}, w / "base", ("distribution", "release"))
    with pytest.raises(InputError, match=r"^r.yaml: key 'name': missing \(required\)$"):
        schema.mapping({"version": 1}, w, ("name", "version"), required=("name",))
    with pytest.raises(InputError, match=r"^r.yaml: top level: expected a mapping, got \[\] \(a list\)$"):
        schema.mapping([], w, optional=False)


def test_path_style_names_the_path() -> None:
    w = Where("inv.yaml", style="path")
    with pytest.raises(InputError, match=r"^inv.yaml: nodes.a: unknown keys 'x', 'y' \(allowed: host\)$"):
        schema.mapping({"x": 1, "y": 2}, w / "nodes" / "a", ("host",))
    with pytest.raises(InputError, match=r"^inv.yaml: health_checks.0: missing 'name'$"):
        schema.mapping({}, w / "health_checks" / 0, ("name",), required=("name",))
    with pytest.raises(InputError, match=r"^inv.yaml: hooks.x\.1: "):
        schema.string(3, (w / "hooks" / "x")[1])


def test_error_class_is_the_callers() -> None:
    with pytest.raises(VerificationError, match=r"m.json: key 'image.size': expected an integer >= 0, got -1"):
        schema.integer(-1, Where("m.json", error=VerificationError) / "image" / "size", minimum=0)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "1", None])
def test_numbers_are_finite_numbers(value: object) -> None:
    with pytest.raises(InputError, match=r"key 't': expected a number >= 0"):
        schema.number(value, Where("f") / "t", minimum=0)
    assert schema.number(0, Where("f") / "t", minimum=0) == 0


@pytest.mark.parametrize("value,ok", [(1, True), (65535, True), ("22", True), (0, False), (65536, False),
                                      (True, False), ("x", False), (22.0, False)])
def test_port(value: object, ok: bool) -> None:
    if ok:
        assert schema.port(value, Where("f") / "p") == int(value)  # type: ignore[call-overload]
    else:
        with pytest.raises(InputError, match="expected a port number 1-65535"):
            schema.port(value, Where("f") / "p")


def test_nan_timeouts_are_refused_everywhere(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from imagetool.manifest import Manifest
    from imagetool.release import load_release
    from rollout.inventory import load_inventory
    from tests.samples import sample_manifest

    r = tmp_path / "r.yaml"
    r.write_text('name: w\nversion: "1"\nhealth_checks: [{name: a, command: "true", timeout: .nan}]\n')
    with pytest.raises(InputError, match=r"key 'health_checks\[0\].timeout': expected a number > 0 and <= 86400, got nan"):
        load_release(r)
    i = tmp_path / "i.yaml"
    i.write_text("nodes: {a: {host: h}}\nhealth_checks: [{name: a, tcp: 'h:1', interval: .inf}]\n")
    with pytest.raises(InputError, match=r"i.yaml: health_checks.a.interval: expected a number >= 0 and <= 86400, got inf"):
        load_inventory(i, ssh_config=tmp_path / "none")
    doc = json.loads(sample_manifest().to_json())
    doc["health_checks"] = [{"name": "a", "command": "true", "timeout": math.nan}]
    with pytest.raises(VerificationError, match=r"key 'health_checks\[0\].timeout'"):
        Manifest.from_json(json.dumps(doc).encode(), "m.json")
