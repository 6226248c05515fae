"""`--limit` as Ansible host patterns (rollout.hostpattern), over Ansible and native inventories.

The expected hosts are what `ansible all -i hosts --limit PATTERN --list-hosts` (ansible-core 2.19)
selects from the same inventory; where Ansible only warns about a pattern that matches nothing,
imagetool refuses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imagetool.errors import InputError
from rollout.hostpattern import select, split
from rollout.inventory import load_inventory
from rollout.nodespec import NodeSpec

HOSTS = """\
node0 ansible_host=10.0.0.10

[web]
web[01:03]
node1 ansible_host=10.0.0.1

[db]
db1 ansible_host=10.0.0.20

[eu:children]
web
"""


@pytest.fixture
def nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[NodeSpec]:
    monkeypatch.setenv("IMAGETOOL_SSH_CONFIG", str(tmp_path / "no-ssh-config"))
    (tmp_path / "hosts").write_text(HOSTS)
    return load_inventory(tmp_path / "hosts").nodes


WEB = ["web01", "web02", "web03", "node1"]


@pytest.mark.parametrize("pattern, expected", [
    ("web", WEB),
    ("web:!node1", ["web01", "web02", "web03"]),
    ("!node1:web", ["web01", "web02", "web03"]),  # order does not matter: union, then &, then !
    ("web:&eu", WEB),
    ("all:!ungrouped:&eu", WEB),
    ("node*", ["node0", "node1"]),
    ("~web0[12]", ["web01", "web02"]),
    ("~.*1$", ["db1", "web01", "node1"]),  # a regex matches from the start only; $ anchors the end
    ("~(web|db)", ["db1", *WEB]),  # matches the groups, then their hosts too
    ("web01,db1", ["db1", "web01"]),  # inventory order, not the pattern's
    ("web01:db1", ["db1", "web01"]),
    (" web01 , db1 ", ["db1", "web01"]),
    ("all", ["node0", "db1", *WEB]),
    ("*", ["node0", "db1", *WEB]),
    ("ungrouped", ["node0"]),
    ("!web", ["node0", "db1"]),  # only exclusions: from all
    ("&db", ["db1"]),
    ("w*", WEB),  # the group web, and hosts named w*
    ("e?", WEB),
    ("web[0]", ["web01"]),
    ("web[-1]", ["node1"]),
    ("web[1:2]", ["web02", "web03"]),
    ("web[1:]", ["web02", "web03", "node1"]),
    ("eu,db,!web0*", ["db1", "node1"]),
])
def test_patterns(nodes: list[NodeSpec], pattern: str, expected: list[str]) -> None:
    assert [n.name for n in select(nodes, [pattern])] == expected


@pytest.mark.parametrize("limit, message", [
    (["typo"], r"--limit 'typo': no node or group matches 'typo' \(groups: db, eu, web\)"),
    (["web:!typo"], r"--limit 'typo': no node or group matches"),  # Ansible would exclude nothing
    (["web,typo"], r"--limit 'typo': no node or group matches"),
    (["eu:&db"], r"--limit 'eu:&db' selects no node"),
    (["web:!web"], r"--limit 'web:!web' selects no node"),
    (["web[9]"], r"--limit 'web\[9\]': 'web' matches 4 nodes, none at that position"),
    (["web[0-2]"], r"--limit 'web\[0-2\]': write the range as \[0:2\]"),
    (["~web("], r"--limit '~web\(': not a valid pattern"),
    ([","], r"--limit ',': names no node or group"),
    (["eu,db:!web0*"], r"--limit 'db:!web0\*': no node or group matches"),  # with commas, colons do not split
    (["web01:2222"], r"--limit '2222': no node or group matches"),
])
def test_bad_patterns(nodes: list[NodeSpec], limit: list[str], message: str) -> None:
    with pytest.raises(InputError, match=message):
        select(nodes, limit)


def test_no_limit_is_every_node_and_several_limits_are_one_list(nodes: list[NodeSpec]) -> None:
    assert select(nodes, None) == select(nodes, []) == nodes
    assert select(nodes, ["db1", "web:!node1"]) == select(nodes, ["db1,web,!node1"])


def test_split() -> None:
    assert split("a,b[1], c[2:3] , d") == ["a", "b[1]", "c[2:3]", "d"]
    assert split("web:!node2:&eu") == ["web", "!node2", "&eu"]
    assert split("web[01:03]") == ["web[01:03]"]


def test_a_node_name_wins_over_a_group_of_that_name() -> None:
    # Ansible inventories may name a group like a host; a plain word is the host, `&`/`!` the group.
    nodes = [NodeSpec("a", "10.0.0.1", groups=("b",)), NodeSpec("b", "10.0.0.2"), NodeSpec("c", "10.0.0.3", groups=("b",))]
    assert [n.name for n in select(nodes, ["b"])] == ["b"]
    assert [n.name for n in select(nodes, ["all:!b"])] == ["b"]


def test_native_inventory_patterns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGETOOL_SSH_CONFIG", str(tmp_path / "no-ssh-config"))
    (tmp_path / "inventory.yaml").write_text(
        "nodes:\n"
        "  n1: {host: 10.0.0.1, groups: [web, canary]}\n"
        "  n2: {host: 10.0.0.2, groups: [web]}\n"
        "  n3: {host: 10.0.0.3}\n")
    nodes = load_inventory(tmp_path / "inventory.yaml").nodes
    for pattern, expected in [("web:!canary", ["n2"]), ("ungrouped", ["n3"]), ("all:!web", ["n3"]),
                              ("n*:&web", ["n1", "n2"]), ("canary,n3", ["n1", "n3"])]:
        assert [n.name for n in select(nodes, [pattern])] == expected, pattern
