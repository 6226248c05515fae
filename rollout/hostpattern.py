"""`--limit`: Ansible host patterns over any inventory's nodes and groups.

Operators who target a fleet with Ansible already know how to say which hosts: `web:!node2`,
`web:&eu`, `node*`, `~regex`, `web[0]`, comma lists, `all`. The semantics here are Ansible's own
(ansible.inventory.manager: split_host_pattern, order_patterns, _evaluate_patterns,
_enumerate_matches), so a pattern selects the same hosts in both tools:

- patterns are separated by commas, else by colons outside brackets (`web[0:2]` stays whole);
- all plain patterns are joined first, then `&` patterns intersect, then `!` patterns exclude,
  whatever order they were written in; with only `&` and `!` patterns, `all` comes first;
- a plain pattern (no `&` or `!`) that is a node's name is that node; any other is matched
  (fnmatch glob, or a regular expression after `~`, matched from the start) against group names,
  taking their nodes, and against node names too when no group matched or it is a glob or regex;
- `all` is every node, `ungrouped` every node without a group;
- `pattern[i]`, `pattern[i:j]` and `pattern[i:]` pick among the nodes a non-regex pattern matched.

Unlike Ansible, which warns and carries on, a pattern that matches no node is an error naming it,
and so is a --limit that selects nothing: an exclusion with a typo would exclude nothing. The
nodes come back in inventory order (the canary is the first one).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

from imagetool.errors import InputError
from rollout.nodespec import NodeSpec

# Ansible's PATTERN_WITH_SUBSCRIPT: `expr[3]`, `expr[-1]`, `expr[1:3]`, `expr[1:]`.
SUBSCRIPT_RE = re.compile(r"^(.+)\[(?:(-?[0-9]+)|([0-9]+)([:-])([0-9]*))\]$")
# One pattern in a colon-separated list: no whitespace or ':[]' except inside a bracket pair.
COLON_PART_RE = re.compile(r"(?:[^\s:\[\]]|\[[^\]]*\])+")


def split(pattern: str) -> list[str]:
    """The single patterns in one --limit value: comma-separated, else colon-separated."""
    parts = pattern.split(",") if "," in pattern else COLON_PART_RE.findall(pattern)
    return [p.strip() for p in parts if p.strip()]


def ordered(patterns: Iterable[str]) -> list[str]:
    """Plain patterns first (`all` if there are none), then `&` ones, then `!` ones."""
    plain = [p for p in patterns if p[0] not in "&!"]
    return (plain or ["all"]) + [p for p in patterns if p[0] == "&"] + [p for p in patterns if p[0] == "!"]


def groups_of(nodes: list[NodeSpec]) -> dict[str, list[NodeSpec]]:
    """Group name -> its nodes in inventory order, the implicit `all` and `ungrouped` first."""
    groups: dict[str, list[NodeSpec]] = {"all": list(nodes), "ungrouped": [n for n in nodes if not n.groups]}
    for node in nodes:
        for group in node.groups:
            groups.setdefault(group, []).append(node)
    return groups


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern[1:] if pattern.startswith("~") else fnmatch.translate(pattern))
    except re.error as e:
        raise InputError(f"--limit {pattern!r}: not a valid pattern: {e}") from None


def _matches(pattern: str, nodes: list[NodeSpec], groups: dict[str, list[NodeSpec]]) -> list[NodeSpec]:
    """What one pattern (without its & or !) matches, before any subscript; duplicates kept, as
    Ansible keeps them before subscripting."""
    regex = _compile(pattern)
    matched_groups = [g for g in groups if regex.match(g)]
    found = [n for g in matched_groups for n in groups[g]]
    if not matched_groups or pattern.startswith("~") or any(c in pattern for c in ".?*["):
        found += [n for n in nodes if regex.match(n.name)]
    return found


def match(pattern: str, nodes: list[NodeSpec], groups: dict[str, list[NodeSpec]] | None = None) -> list[NodeSpec]:
    """The nodes one pattern (without its & or !) matches, subscript applied. None: an error."""
    groups = groups_of(nodes) if groups is None else groups
    subscript = None if pattern.startswith("~") else SUBSCRIPT_RE.match(pattern)
    expr = subscript.group(1) if subscript else pattern
    found = _matches(expr, nodes, groups)
    if not found:
        raise InputError(f"--limit {pattern!r}: no node or group matches {expr!r} "
                         f"(groups: {', '.join(sorted(g for g in groups if g not in ('all', 'ungrouped'))) or 'none'})")
    if subscript:
        index, start, sep, end = subscript.group(2, 3, 4, 5)
        if sep == "-":
            raise InputError(f"--limit {pattern!r}: write the range as [{start}:{end}] (inclusive)")
        try:
            if index is not None:
                found = [found[int(index)]]
            else:
                last = int(end) if end else len(found) - 1
                found = found[int(start):last + 1]
                if not found:
                    raise IndexError
        except IndexError:
            raise InputError(f"--limit {pattern!r}: {expr!r} matches {len(found)} nodes, "
                             f"none at that position") from None
    return found


def select(nodes: list[NodeSpec], limit: list[str] | None) -> list[NodeSpec]:
    """The nodes `limit` selects, in inventory order: every --limit value's patterns, taken
    together (two --limit options are one comma list). No limit (None or empty) is every node."""
    if not limit:
        return list(nodes)
    text = ",".join(limit)
    patterns = [p for value in limit for p in split(value)]
    if not patterns:
        raise InputError(f"--limit {text!r}: names no node or group")
    by_name = {n.name: n for n in nodes}
    groups = groups_of(nodes)
    chosen: list[NodeSpec] = []
    for p in ordered(patterns):
        if p in by_name:  # a node's own name is that node, before any group of that name
            chosen.append(by_name[p])
            continue
        that = {n.name for n in match(p[1:] if p[0] in "&!" else p, nodes, groups)}
        if p[0] == "!":
            chosen = [n for n in chosen if n.name not in that]
        elif p[0] == "&":
            chosen = [n for n in chosen if n.name in that]
        else:
            chosen += [n for n in nodes if n.name in that]
    names = {n.name for n in chosen}
    if not names:
        raise InputError(f"--limit {text!r} selects no node")
    return [n for n in nodes if n.name in names]
