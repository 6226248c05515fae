"""Ansible inventories, read as they are: operators who already target their fleet with Ansible
give imagetool the same file.

What is read, as Ansible reads it (its `yaml` and `ini` inventory plugins and `host_group_vars`):
groups with `hosts`, `children` and `vars` (YAML), `[group]`, `[group:vars]` and
`[group:children]` sections with inline host vars and Python-literal values (INI), host ranges
(`web[01:03]`, `db-[a:c]`, `[1:9:2]`), `host:port`, and the `group_vars/` and `host_vars/` beside
the inventory file (`NAME`, `NAME.yml`, `NAME.yaml` or `NAME.json`, the first that exists, or a
directory `NAME/` whose files load in name order).

A host's variables are merged with Ansible's precedence, lowest first: the inventory file's vars
of `all`, of the host's other groups (parents before children, then by `ansible_group_priority`,
then by name), `group_vars/all`, `group_vars/GROUP` in the same group order, the inventory file's
host vars, `host_vars/HOST`. Then:

- `ansible_host`, `ansible_port`, `ansible_user`, `ansible_ssh_private_key_file` (and the
  `ansible_ssh_host`, `ansible_ssh_port`, `ansible_ssh_user`, `ansible_private_key_file` names,
  the `ssh_` ones winning as in Ansible's ssh plugin) set how the node is reached, and
  `ansible_become`, `ansible_become_user` and `ansible_become_method` (only sudo) how the node
  helper runs (imagetool's `become` keys); the ssh config fills in what they leave out, as for
  imagetool's own inventory (rollout.inventory.resolve_node); other `ansible_*` variables are
  Ansible's own business and ignored;
- `imagetool_KEY` sets imagetool's own node settings (`imagetool_known_hosts`,
  `imagetool_reset_command`, `imagetool_proxy_jump`, ... winning over the `ansible_` ones), and in
  the vars of `all` its inventory-wide ones (`imagetool_health_checks`, `imagetool_hooks`,
  `imagetool_run_once`, `imagetool_trusted_keys`); any other `imagetool_` name is an error;
- every other variable whose value is a string, number or boolean is a node var
  (`{vars.NAME}`); lists, mappings, nulls and vault-encrypted values are left out.

Jinja templates are not evaluated, and ansible-vault is not decrypted: an encrypted vars file is
skipped, an encrypted connection setting is an error.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imagetool import schema
from imagetool.errors import InputError
from imagetool.schema import Where
from imagetool.yamlfile import MAX_YAML_BYTES, Loader, parse_yaml, read_limited
from rollout.checks import parse_checks
from rollout.hooks import Hooks
from rollout.inventory import (
    GROUP_NAME_RE,
    NODE_NAME_RE,
    SETTING_KEYS,
    TOP_KEYS,
    GivenNode,
    Inventory,
    _ssh_config_path,
    check_var,
    parse_hooks,
    parse_trusted_keys,
    resolve_nodes,
    setting,
)
from rollout.nodespec import DEFAULT_KNOWN_HOSTS

NATIVE, YAML, INI = "native", "ansible-yaml", "ansible-ini"
YAML_SUFFIXES = (".yaml", ".yml", ".json")
# Ansible's YAML_FILENAME_EXTENSIONS, tried in this order after the bare name.
VARS_SUFFIXES = (".yml", ".yaml", ".json")
# Hosts one range line may expand to: a fleet is thousands, a typo like [0:99999999] is not.
MAX_RANGE_HOSTS = 100_000

# Ansible's connection variables -> imagetool's node setting; of two names the later wins.
ANSIBLE_SETTINGS = {
    "host": ("ansible_host", "ansible_ssh_host"),
    "port": ("ansible_port", "ansible_ssh_port"),
    "user": ("ansible_user", "ansible_ssh_user"),
    "key": ("ansible_private_key_file", "ansible_ssh_private_key_file"),
    "become": ("ansible_become",),
    "become_user": ("ansible_become_user",),
    "become_method": ("ansible_become_method",),
}
# Ansible's boolean(): what its `ansible_become: yes` (or `=true` in INI) means.
TRUE_WORDS = ("y", "yes", "on", "1", "true", "t")
FALSE_WORDS = ("n", "no", "off", "0", "false", "f")
ANSIBLE_NAMES = {name: key for key, names in ANSIBLE_SETTINGS.items() for name in names}
PREFIX = "imagetool_"
INVENTORY_KEYS = ("health_checks", "hooks", "run_once", "trusted_keys")
IMAGETOOL_KEYS = (*SETTING_KEYS, *INVENTORY_KEYS)

INI_SECTION_RE = re.compile(r"^\[([^:\]\s]+)(?::(\w+))?\]\s*(?:#.*)?$")
INI_GROUP_NAME_RE = re.compile(r"^([^:\]\s]+)\s*(?:#.*)?$")
# host:port, where the host may hold [x:y] ranges (Ansible's parse_address 'hostport').
HOST_PORT_RE = re.compile(r"^((?:[^:\[\]]|\[[^\]]*\])*):([0-9]+)$")


class Vaulted:
    """A value encrypted with ansible-vault (`!vault`): imagetool cannot read it."""


class AnsibleLoader(Loader):
    """YAML with Ansible's tags: `!vault` values are opaque, `!unsafe` ones plain (imagetool
    evaluates no template, so Ansible's "do not template this" changes nothing)."""


def _vault(loader: AnsibleLoader, node: yaml.Node) -> Vaulted:
    return Vaulted()


def _unsafe(loader: AnsibleLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]


AnsibleLoader.add_constructor("!vault", _vault)
AnsibleLoader.add_constructor("!unsafe", _unsafe)


def inventory_kind(path: Path) -> tuple[str, Any]:
    """Which inventory `path` is, and its content: (NATIVE, document), (YAML, document) or
    (INI, bytes).

    A file named `*.ini` is Ansible INI. Otherwise a YAML mapping whose top-level keys include
    `nodes`, or are all imagetool's own (defaults, nodes, health_checks, ...), is imagetool's; any
    other YAML mapping is Ansible YAML (groups at the top, usually `all:`). A file that is not a
    YAML mapping is Ansible INI, unless it is named `*.yaml`, `*.yml` or `*.json`.
    """
    raw = read_limited(path, "inventory file", MAX_YAML_BYTES, kind="YAML or INI")
    if path.suffix == ".ini":
        return INI, raw
    try:
        data = parse_yaml(raw, str(path), AnsibleLoader)
    except InputError:
        if path.suffix in YAML_SUFFIXES:
            raise
        return INI, raw
    if data is None:
        raise Where(path, style="path").error(
            "the inventory is empty; it needs at least a 'nodes' mapping (or Ansible's hosts)")
    if isinstance(data, dict):
        return (NATIVE if "nodes" in data or set(data) <= set(TOP_KEYS) else YAML), data
    return (NATIVE, data) if path.suffix in YAML_SUFFIXES else (INI, raw)


def load(path: Path, kind: str, data: Any, *, ssh_config: str | os.PathLike[str] | None = None) -> Inventory:
    """The Ansible inventory at `path` (content `data` as inventory_kind gave it)."""
    try:
        return _load(path, kind, data, ssh_config)
    except RecursionError:  # groups are walked recursively, as in Ansible
        raise InputError(f"{path}: groups are nested too deeply") from None


def _load(path: Path, kind: str, data: Any, ssh_config: str | os.PathLike[str] | None) -> Inventory:
    tree = _Tree(path)
    if kind == INI:
        try:
            _parse_ini(tree, data)
        except InputError as e:
            if path.suffix == ".ini":
                raise
            try:  # say why it was not read as YAML, too: the mistake may be there
                parse_yaml(data, str(path), AnsibleLoader)
                reason = "not a YAML mapping"
            except InputError as y:
                reason = str(y).removeprefix(f"{path}: ")
            raise InputError(f"{e} (read as Ansible INI; as YAML: {reason})") from None
    else:
        _parse_yaml(tree, data)
    return tree.inventory(_ssh_config_path(ssh_config))


# --- the inventory as Ansible builds it -----------------------------------------------------------


@dataclass
class _Var:
    value: Any
    where: Where


@dataclass
class _Group:
    name: str
    hosts: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)
    vars: dict[str, _Var] = field(default_factory=dict)
    priority: int = 1


@dataclass
class _Host:
    name: str
    groups: list[str] = field(default_factory=list)
    vars: dict[str, _Var] = field(default_factory=dict)


class _Tree:
    """Groups and hosts as the inventory file gives them, then their vars files and the nodes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.resolve().parent
        self.groups: dict[str, _Group] = {"all": _Group("all"), "ungrouped": _Group("ungrouped")}
        self.hosts: dict[str, _Host] = {}

    def group(self, name: Any, where: Where) -> _Group:
        return self.groups.setdefault(_group_name(name, where), _Group(name))

    def add_host(self, name: str, group: str, where: Where) -> _Host:
        if not NODE_NAME_RE.match(name):
            raise where.error(f"{schema.short(name)} is not a valid node name ([A-Za-z0-9][A-Za-z0-9_.-]*); "
                              "name the host and give its address as ansible_host")
        host = self.hosts.setdefault(name, _Host(name))
        if group not in host.groups:
            host.groups.append(group)
            self.groups[group].hosts.append(name)
        return host

    def add_child(self, parent: str, child: str, where: Where) -> None:
        if child == "all":
            raise where.error("group 'all' cannot be a child: it is the parent of every group")
        if child == parent:
            raise where.error(f"group {parent!r} cannot be its own child")
        if child not in self.groups[parent].children:
            self.groups[parent].children.append(child)
            self.groups[child].parents.append(parent)

    def set_var(self, target: dict[str, _Var], name: Any, value: Any, where: Where, scope: str,
                group: _Group | None = None) -> None:
        """Validate one variable where it is written; `scope` is "all", "group" or "host"."""
        if not isinstance(name, str):
            raise where.got("a variable name (a string)", name)
        if name == "ansible_group_priority" and group is not None:
            try:
                group.priority = int(value)
            except (TypeError, ValueError, OverflowError):
                raise where.got("an integer", value) from None
            return
        if name.startswith(PREFIX):
            key = name.removeprefix(PREFIX)
            if key not in IMAGETOOL_KEYS:
                raise where.error(f"unknown imagetool key {name!r} "
                                  f"(allowed: {', '.join(PREFIX + k for k in IMAGETOOL_KEYS)})")
            _readable(value, where)
            if key in INVENTORY_KEYS:
                if scope != "all":
                    raise where.error(f"{name} applies to the whole inventory: set it in the vars of group "
                                      "'all' (group_vars/all.yml or all: vars:)")
            else:
                value = setting(key, _boolean(value) if key == "become" else value, where, self.base)
        elif name in ANSIBLE_NAMES:
            _readable(value, where)
            key = ANSIBLE_NAMES[name]
            # Ansible hands a relative key file to ssh, which reads it from the current directory.
            value = setting(key, _boolean(value) if key == "become" else value, where, Path.cwd())
        elif name.startswith("ansible_"):
            return
        elif isinstance(value, (str, int, float)):  # bool is an int
            check_var(name, value, where)
        else:  # lists, mappings, nulls, vault: not a node var, yet they override lower ones
            check_var(name, "", where)
        target[name] = _Var(value, where)

    # --- after parsing ---

    def _check_cycles(self) -> None:
        state: dict[str, str] = {}

        def visit(name: str, trail: list[str]) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "busy":
                cycle = trail[trail.index(name):] + [name]
                raise InputError(f"{self.path}: groups form a cycle: {' -> '.join(cycle)}")
            state[name] = "busy"
            for child in self.groups[name].children:
                visit(child, [*trail, name])
            state[name] = "done"

        for name in self.groups:
            visit(name, [])

    def _depths(self) -> dict[str, int]:
        """Each group's depth below `all` (its longest path), as Ansible orders groups by it."""
        depth: dict[str, int] = {}

        def of(name: str) -> int:
            if name not in depth:
                parents = self.groups[name].parents
                depth[name] = 1 + max(of(p) for p in parents) if parents else 0
            return depth[name]

        return {name: of(name) for name in self.groups}

    def _ancestors(self, names: list[str]) -> set[str]:
        seen: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(self.groups[name].parents)
        return seen

    def _host_order(self) -> list[_Host]:
        """The hosts in Ansible's order for `all` (the order of its plays and of --list-hosts):
        the hosts of `all`, then of its children, then of theirs, level by level, each group's in
        the order the file gives them. (Ansible walks a set below the first level; parents are
        taken in order here.)"""
        order, level = ["all"], ["all"]
        while level:
            level = [c for g in level for c in self.groups[g].children if c not in order]
            level = list(dict.fromkeys(level))
            order += level
        names = [h for g in order for h in self.groups[g].hosts
                 if g != "ungrouped" or set(self.hosts[h].groups) <= {"all", "ungrouped"}]
        return [self.hosts[h] for h in dict.fromkeys(names)]

    def _files(self, kind: str, name: str, scope: str) -> dict[str, _Var]:
        """The vars of group_vars/NAME or host_vars/NAME (`kind`), as Ansible finds them."""
        out: dict[str, _Var] = {}
        for file in _vars_files(self.path.parent / kind, name):
            raw = read_limited(file, "vars file", MAX_YAML_BYTES, kind="YAML")
            if raw.lstrip().startswith(b"$ANSIBLE_VAULT;"):
                continue  # encrypted with ansible-vault: not readable here (see module doc)
            data = parse_yaml(raw, str(file), AnsibleLoader)
            if data is None:
                continue
            where = Where(file, style="path")
            if not isinstance(data, dict):
                raise where.got("a mapping of variables", data)
            for k, v in data.items():
                self.set_var(out, k, v, where / k, scope)
        return out

    def inventory(self, config: str | None) -> Inventory:
        if not self.hosts:
            raise InputError(f"{self.path}: the inventory lists no hosts")
        for name, group in self.groups.items():
            if name != "all" and not group.parents:
                self.groups["all"].children.append(name)
                group.parents.append("all")
        self._check_cycles()
        depth = self._depths()
        files = {name: self._files("group_vars", name, "all" if name == "all" else "group") for name in self.groups}
        everyone = {**self.groups["all"].vars, **files["all"]}

        known_hosts = everyone["imagetool_known_hosts"].value if "imagetool_known_hosts" in everyone else (
            Path(DEFAULT_KNOWN_HOSTS).expanduser())
        given: list[GivenNode] = []
        for host in self._host_order():
            direct = [g for g in host.groups if g != "all"]
            if len(direct) > 1 or direct == []:  # Ansible's ungrouped: in no group but all
                direct = [g for g in direct if g != "ungrouped"] or ["ungrouped"]
            groups = sorted(self._ancestors(direct) - {"all"},
                            key=lambda g: (depth[g], self.groups[g].priority, g))
            merged: dict[str, _Var] = dict(self.groups["all"].vars)
            for layer in ([self.groups[g].vars for g in groups] + [files["all"]] + [files[g] for g in groups]
                          + [host.vars, self._files("host_vars", host.name, "host")]):
                merged.update(layer)
            said = {key: merged[n].value for key, names in ANSIBLE_SETTINGS.items() for n in names if n in merged}
            said.update({k: merged[PREFIX + k].value for k in SETTING_KEYS if PREFIX + k in merged})
            given.append(GivenNode(
                host.name, said, groups=tuple(sorted(set(groups) - {"ungrouped"})),
                vars={k: v.value for k, v in merged.items()
                      if not k.startswith((PREFIX, "ansible_")) and isinstance(v.value, (str, int, float))},
                where=Where(self.path, ("host " + host.name,), style="path")))
        nodes = resolve_nodes(given, config=config, known_hosts=known_hosts, host_from_name=True)

        def where(key: str) -> Where:
            var = everyone.get(PREFIX + key)
            return var.where if var else Where(self.path, (PREFIX + key,), style="path")

        def value(key: str) -> Any:
            var = everyone.get(PREFIX + key)
            return var.value if var else None

        hooks: Hooks = parse_hooks(value("hooks"), where("hooks"), value("run_once"), where("run_once"))
        return Inventory(path=self.path, nodes=nodes, known_hosts=known_hosts, hooks=hooks,
                         health_checks=parse_checks(value("health_checks"), where("health_checks")),
                         trusted_keys=parse_trusted_keys(value("trusted_keys"), where("trusted_keys"), self.base))


def _group_name(name: Any, where: Where) -> str:
    if not isinstance(name, str) or not GROUP_NAME_RE.match(name):
        raise where.error(f"{schema.short(name)} is not a valid group name ([A-Za-z0-9][A-Za-z0-9_.-]*)")
    return name


def _boolean(value: Any) -> Any:
    """`value` as Ansible's boolean() reads it, when it is one of its words; else as it is (and
    refused by the setting's own check)."""
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    if type(value) is int and value in (0, 1):
        return bool(value)
    return value


def _readable(value: Any, where: Where) -> None:
    if isinstance(value, Vaulted):
        raise where.error("is encrypted with ansible-vault, which imagetool does not decrypt")


def _vars_files(directory: Path, name: str) -> list[Path]:
    """Ansible's find_vars_files: the first of NAME, NAME.yml, NAME.yaml, NAME.json that exists;
    a directory gives its files (bare or with those suffixes, not hidden, not `~` backups) in name
    order, descending into subdirectories without a suffix."""
    if not directory.is_dir():
        return []
    for suffix in ("", *VARS_SUFFIXES):
        path = directory / (name + suffix)
        if path.is_dir():
            return _dir_files(path, {path.resolve()})
        if path.exists():
            return [path]
    return []


def _dir_files(directory: Path, seen: set[Path]) -> list[Path]:
    found: list[Path] = []
    for path in sorted(directory.iterdir(), key=lambda p: p.name):
        if path.name.startswith(".") or path.name.endswith("~"):
            continue
        if path.is_dir() and not path.suffix:
            real = path.resolve()
            if real in seen:
                raise InputError(f"{path}: a directory loop (it leads back to {real})")
            found += _dir_files(path, seen | {real})
        elif path.is_file() and (not path.suffix or path.suffix in VARS_SUFFIXES):
            found.append(path)
    return found


# --- host patterns in the inventory: ranges and ports ------------------------------------------------


def expand_hosts(pattern: str, where: Where, *, ini: bool = False) -> tuple[list[str], int | None]:
    """The host names in an inventory host pattern and the port it gives them, if any:
    `web[01:03].example:2222` -> web01.example, web02.example, web03.example and 2222."""
    port = None
    m = HOST_PORT_RE.match(pattern)
    if m:
        pattern, port = m.group(1), int(m.group(2))
    elif ini and pattern.endswith(":"):
        raise where.error(f"host pattern {pattern!r} ends in ':', which is reserved for a port")
    return _expand(pattern, pattern, where), port


def _expand(pattern: str, whole: str, where: Where) -> list[str]:
    if "[" not in pattern:
        return [pattern]
    head, _, rest = pattern.partition("[")
    spec, closed, tail = rest.partition("]")
    bounds = spec.split(":")
    if not closed or len(bounds) not in (2, 3):
        raise where.error(f"host range in {whole!r} must be [begin:end] or [begin:end:step]")
    begin, end, step_text = bounds[0] or "0", bounds[1], bounds[2] if len(bounds) == 3 else "1"
    if not end:
        raise where.error(f"host range in {whole!r} has no end")
    width = len(begin) if begin.startswith("0") and len(begin) > 1 else 0
    if width and len(end) != width:
        raise where.error(f"host range in {whole!r}: zero-padded begin and end must be as long")
    try:
        step = int(step_text)
        if step < 1:
            raise ValueError
        if len(begin) == 1 and len(end) == 1 and begin in string.ascii_letters and end in string.ascii_letters:
            first, last = string.ascii_letters.index(begin), string.ascii_letters.index(end)
            values = list(string.ascii_letters[first:last + 1:step])
        else:
            numbers = range(int(begin), int(end) + 1, step)
            if len(numbers) > MAX_RANGE_HOSTS:
                raise where.error(f"host range in {whole!r} makes more than {MAX_RANGE_HOSTS} hosts")
            values = [str(n).zfill(width) for n in numbers]
    except ValueError:
        raise where.error(f"host range in {whole!r}: expected numbers or single letters, "
                          "and a positive step") from None
    if not values:
        raise where.error(f"host range in {whole!r} is empty (begin after end)")
    tails = _expand(tail, whole, where)
    if len(values) * len(tails) > MAX_RANGE_HOSTS:
        raise where.error(f"host range in {whole!r} makes more than {MAX_RANGE_HOSTS} hosts")
    return [head + v + t for v in values for t in tails]


# --- the YAML inventory ------------------------------------------------------------------------------


def _parse_yaml(tree: _Tree, data: dict[Any, Any]) -> None:
    root = Where(tree.path, style="path")
    for name, body in data.items():
        _yaml_group(tree, name, body, root / name)


def _yaml_group(tree: _Tree, name: Any, body: Any, where: Where) -> str:
    group = tree.group(name, where)
    if body is None:
        return group.name
    body = schema.mapping(body, where, ("hosts", "children", "vars"))
    scope = "all" if group.name == "all" else "group"
    for section, entries in body.items():
        w = where / section
        if isinstance(entries, str):  # `hosts: node1` is one host (as Ansible reads it)
            entries = {entries: None}
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise w.got("a mapping", entries)
        for key, value in entries.items():
            if section == "vars":
                tree.set_var(group.vars, key, value, w / key, scope, group)
            elif section == "children":
                child = _yaml_group(tree, key, value, w / key)
                tree.add_child(group.name, child, w / key)
            else:
                if not isinstance(key, str):
                    raise (w / key).got("a host name or pattern (quote numbers)", key)
                if value is not None and not isinstance(value, dict):
                    raise (w / key).got("a mapping of host vars", value)
                names, port = expand_hosts(key, w / key)
                for host_name in names:
                    host = tree.add_host(host_name, group.name, w / key)
                    if port is not None:
                        tree.set_var(host.vars, "ansible_port", port, w / key, "host")
                    for k, v in (value or {}).items():
                        tree.set_var(host.vars, k, v, w / key / k, "host")
    return group.name


# --- the INI inventory -------------------------------------------------------------------------------


def _ini_value(text: str) -> Any:
    """An INI value as Ansible reads it: a Python literal if it is one, else the text."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, complex) or value is Ellipsis:
        return text if value is Ellipsis else str(value)
    return value


def _parse_ini(tree: _Tree, raw: bytes) -> None:
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{tree.path}: not UTF-8 text (byte {e.start})") from None
    # Groups named before they are declared: [x:vars] needs x declared somewhere, a child in
    # [x:children] needs its own section. name -> (kind of reference, line, parents)
    pending: dict[str, tuple[str, int, list[str]]] = {}
    group, state = "ungrouped", "hosts"
    for number, line in enumerate(lines, 1):
        where = Where(f"{tree.path}:{number}", style="path")
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        section = INI_SECTION_RE.match(line)
        if section:
            group, state = section.group(1), section.group(2) or "hosts"
            if state not in ("hosts", "children", "vars"):
                raise where.error(f"section [{group}:{state}] has unknown type {state!r} (hosts, children or vars)")
            if group not in tree.groups and state == "vars" and group not in pending:
                pending[group] = ("vars", number, [])
            tree.group(group, where)
            if group in pending and state != "vars":
                kind, _, parents = pending.pop(group)
                for parent in parents if kind == "children" else []:
                    tree.add_child(parent, group, where)
            continue
        if line.startswith("[") and line.endswith("]"):
            raise where.error(f"invalid section {line!r}: no spaces, and [group], [group:vars] or [group:children]")
        if state == "hosts":
            _ini_hosts(tree, line, group, where)
        elif state == "vars":
            name, equals, value = line.partition("=")
            if not equals:
                raise where.error(f"expected key=value, got {line!r}")
            g = tree.groups[group]
            tree.set_var(g.vars, name.strip(), _ini_value(value.strip()), where / name.strip(),
                         "all" if group == "all" else "group", g)
        else:
            child = INI_GROUP_NAME_RE.match(line)
            if not child:
                raise where.error(f"expected a group name, got {line!r}")
            name = child.group(1)
            if name in tree.groups:
                tree.add_child(group, name, where)
            else:
                _group_name(name, where)
                pending.setdefault(name, ("children", number, []))[2].append(group)
    for name, (kind, number, parents) in pending.items():
        where = Where(f"{tree.path}:{number}", style="path")
        if kind == "vars":
            raise where.error(f"section [{name}:vars] is for a group that is never declared")
        raise where.error(f"section [{parents[-1]}:children] names group {name!r}, which is never declared")


def _ini_hosts(tree: _Tree, line: str, group: str, where: Where) -> None:
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as e:
        raise where.error(f"cannot split host line {schema.short(line)}: {e}") from None
    if not tokens:
        return
    names, port = expand_hosts(tokens[0], where, ini=True)
    assignments: dict[str, Any] = {}
    for token in tokens[1:]:
        name, equals, value = token.partition("=")
        if not equals:
            raise where.error(f"expected key=value after the host, got {schema.short(token)}")
        assignments[name] = _ini_value(value)
    for host_name in names:
        host = tree.add_host(host_name, group, where)
        if port is not None:
            tree.set_var(host.vars, "ansible_port", port, where, "host")
        for name, value in assignments.items():
            tree.set_var(host.vars, name, value, where / name, "host")
