"""The inventory: which nodes a rollout touches, how to reach them, and extra health checks.

An inventory is a YAML file validated once, here, into dataclasses; every error names the file,
the key and the problem so an operator can fix it without reading code. OpenSSH's client
configuration (``~/.ssh/config``) is honoured for what the inventory leaves out, so nodes that
already work with ``ssh NAME`` work here too.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagetool import schema
from imagetool.chunks import check_source
from imagetool.errors import InputError
from imagetool.schema import Where
from imagetool.signing import load_public_key
from rollout.checks import CHECK_NAME_RE, CheckSpec, parse_checks
from rollout.hooks import HOOK_POINTS, Hooks, HookSpec, RunOnceSpec
from rollout.nodespec import DEFAULT_KNOWN_HOSTS, DEFAULT_PORT, DEFAULT_USER, NodeSpec, host_problem, user_problem
from rollout.sshconfig import expand_path, expand_tokens, parse_hop, resolve, resolve_all

NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Groups are matched against --limit values alongside node names, so they share the alphabet.
GROUP_NAME_RE = NODE_NAME_RE
# Ansible's implicit groups, which --limit knows for every inventory (rollout.hostpattern).
IMPLICIT_GROUPS = ("all", "ungrouped")

SSH_CONFIG_ENV = "IMAGETOOL_SSH_CONFIG"

TOP_KEYS = ("defaults", "nodes", "health_checks", "hooks", "run_once", "trusted_keys")
HOOKS_KEYS = HOOK_POINTS
# Not "on": YAML 1.1 reads an unquoted `on` key as the boolean true.
HOOK_KEYS = ("name", "run", "where", "timeout")
RUN_ONCE_KEYS = (*HOOK_KEYS, "node")
BECOME_KEYS = ("become", "become_user", "become_method")
DEFAULT_KEYS = ("user", "port", "key", "known_hosts", "proxy_jump", "vars", "reset_command", "source", *BECOME_KEYS)
NODE_KEYS = ("host", "port", "user", "key", "known_hosts", "proxy_jump", "groups", "vars", "reset_command", "source",
             *BECOME_KEYS)


@dataclass
class Inventory:
    path: Path
    nodes: list[NodeSpec]
    health_checks: list[CheckSpec]
    known_hosts: Path
    hooks: Hooks = field(default_factory=Hooks)
    # Release signing keys (public, PEM) the controller trusts: a release not signed by one of
    # them is refused before any node is contacted.
    trusted_keys: list[Path] = field(default_factory=list)

    @property
    def groups(self) -> dict[str, list[str]]:
        """Group name -> node names, in file order."""
        out: dict[str, list[str]] = {}
        for node in self.nodes:
            for group in node.groups:
                out.setdefault(group, []).append(node.name)
        return out


# --- validation helpers -----------------------------------------------------------------------


def _str(value: Any, where: Where) -> str:
    return schema.string(value, where, non_empty=True)


def _path(value: Any, where: Where, base: Path) -> Path:
    p = Path(_str(value, where)).expanduser()
    # Relative paths are relative to the inventory so an inventory and its keys move together.
    return p if p.is_absolute() else (base / p)


VAR_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _vars(value: Any, where: Where) -> dict[str, Any]:
    """Node vars: names as placeholders know them ({vars.NAME}), values that are one string,
    number or boolean (they become check arguments and hooks' environment variables, where a
    list has no meaning and a NUL cannot be passed)."""
    out = dict(schema.mapping(value, where))
    for k, v in out.items():
        check_var(k, v, where / k)
    return out


def check_var(name: str, value: Any, where: Where) -> None:
    """Raise unless `name` and `value` make a node var (see _vars)."""
    if not VAR_NAME_RE.match(name):
        raise where.error(f"{schema.short(name)} is not a valid var name (letters, digits and '_.-')")
    if not isinstance(value, (str, int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        raise where.got("a string, number or boolean", value)
    if isinstance(value, str) and "\0" in value:
        raise where.error("must not contain a NUL character")


def _host(value: Any, where: Where) -> str:
    host = _str(value, where).strip()
    problem = host_problem(host)
    if problem:
        raise where.error(problem)
    return host


def _user(value: Any, where: Where) -> str:
    user = _str(value, where)
    problem = user_problem(user)
    if problem:
        raise where.error(problem)
    return user


def _groups(value: Any, where: Where) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise where.got("a list of group names", value)
    for g in value:
        if not isinstance(g, str) or not GROUP_NAME_RE.match(g):
            raise where.error(f"{g!r} is not a valid group name ([A-Za-z0-9][A-Za-z0-9_.-]*)")
        if g in IMPLICIT_GROUPS:
            raise where.error(f"{g!r} is implicit: 'all' is every node, 'ungrouped' every node without a group")
    return tuple(dict.fromkeys(value))


def _proxy_jump(value: Any, where: Where) -> str | None:
    """ProxyJump: "none" or hops "[user@]host[:port],..." (ssh's -J), each checked here."""
    text = _str(value, where).strip()
    if text.lower() == "none":
        return None
    for hop in text.split(","):
        try:
            user, host, _ = parse_hop(hop, DEFAULT_USER)
        except ValueError:
            user, host = "", ""
        if hop.startswith("-") or any(c.isspace() or ord(c) < 32 for c in hop) or host_problem(host) \
                or user_problem(user):
            raise where.error(f"{schema.short(text)}: expected [user@]host[:port] hops separated by ',', "
                              "without spaces or a leading '-'")
    return text


def _become(value: Any, where: Where) -> bool:
    if not isinstance(value, bool):
        raise where.got("true or false", value)
    return value


def _become_method(value: Any, where: Where) -> str:
    if value != "sudo":
        raise where.error(f"{value!r}: the only become_method is 'sudo'")
    return "sudo"


def _reset_command(value: Any, where: Where) -> str:
    text = _str(value, where)
    try:
        shlex.split(text)
    except ValueError as e:
        raise where.error(f"{text!r}: cannot split into a command: {e}") from None
    return text


def _source(value: Any, where: Where) -> str:
    """An HTTP store (`imagetool publish`) the node pulls releases from itself."""
    try:
        return check_source(_str(value, where))
    except InputError as e:
        raise where.error(str(e)) from None


# --- ~/.ssh/config ----------------------------------------------------------------------------


def _ssh_config_path(path: str | os.PathLike[str] | None) -> str | None:
    """The config `ssh -G` reads: the one named (a missing file means none), else ssh's own
    choice (~/.ssh/config and /etc/ssh/ssh_config)."""
    if path is None:
        path = os.environ.get(SSH_CONFIG_ENV)
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p) if p.is_file() else os.devnull


# --- public API -------------------------------------------------------------------------------


SETTING_KEYS = ("host", "port", "user", "key", "known_hosts", "proxy_jump", "reset_command", "source",
                *BECOME_KEYS)


def setting(key: str, value: Any, where: Where, base: Path) -> Any:
    """One of a node's SETTING_KEYS, validated; a relative path is relative to `base`."""
    if key in ("key", "known_hosts"):
        return _path(value, where, base)
    check = {"host": _host, "port": schema.port, "user": _user, "proxy_jump": _proxy_jump,
             "reset_command": _reset_command, "become": _become, "become_user": _user,
             "become_method": _become_method, "source": _source}[key]
    return check(value, where)


@dataclass(frozen=True)
class GivenNode:
    """One node as its inventory gives it, validated, before the ssh config fills in the rest."""

    name: str
    said: dict[str, Any]  # validated SETTING_KEYS, the node's over its defaults'; absent: not said
    groups: tuple[str, ...]
    vars: dict[str, Any]
    where: Where


def _lookup(node: GivenNode, config: str | None) -> tuple[str, str | None, str | None, int | None]:
    """What `ssh -G` is asked for `node`: `ssh ALIAS` semantics, the alias being what one would
    type (the host if the inventory gives one, else the node name); the inventory's user and port
    are ssh's command line (-l, -p), so they win over the config and Match user sees them."""
    return node.said.get("host") or node.name, config, node.said.get("user"), node.said.get("port")


def resolve_nodes(given: list[GivenNode], *, config: str | None, known_hosts: Path,
                  host_from_name: bool = False) -> list[NodeSpec]:
    """The nodes of an inventory (imagetool's own or Ansible's), each resolved by resolve_node.
    Their ssh configs are asked side by side first (one `ssh -G` per distinct lookup), so an
    inventory of thousands loads in seconds; errors are then raised in the inventory's order."""
    resolve_all([_lookup(node, config) for node in given])
    return [resolve_node(node, config=config, known_hosts=known_hosts, host_from_name=host_from_name)
            for node in given]


def resolve_node(node: GivenNode, *, config: str | None, known_hosts: Path,
                 host_from_name: bool = False) -> NodeSpec:
    """One node from what its inventory said, with the ssh config (`config` for `ssh -F`; None:
    ssh's own) filling in what it left out, as `ssh ALIAS` would. A node without a host is an
    error, unless `host_from_name`: Ansible connects to the inventory hostname itself."""
    name, said, w = node.name, node.said, node.where
    lookup = _lookup(node, config)
    alias, _, given_user, given_port = lookup
    opts = resolve(*lookup)
    host = said.get("host")
    if opts.has_hostname:  # ssh applies HostName to the name typed, given or not
        host = _host(opts.hostname, Where("ssh config", (alias, "HostName"), style="path"))
    elif host is None:
        if not host_from_name:
            raise w.error("missing 'host' (and no HostName for it in the ssh config)")
        host = name
    port = given_port or opts.port or DEFAULT_PORT
    user = given_user or (_user(opts.user, Where("ssh config", (alias, "User"), style="path"))
                          if opts.user else DEFAULT_USER)
    tokens = {"host": host, "port": port, "user": user, "alias": alias}

    identities: list[Path] = []
    if "key" in said:
        key: Path | None = said["key"]
    else:
        # Like ssh, skip IdentityFile lines whose file is absent (a shared config may list
        # keys for other machines); none present means agent and default keys.
        identities = [p for p in (expand_path(f, what="IdentityFile", **tokens) for f in opts.identity_files)
                      if p.is_file()]
        key = identities.pop(0) if identities else None
    certificates = tuple(p for p in (expand_path(f, what="CertificateFile", **tokens)
                                     for f in opts.certificate_files) if p.is_file())

    proxy_command = None
    if "proxy_jump" in said:  # None when the inventory says "none"
        jump = said["proxy_jump"]
    elif opts.proxy_jump:
        jump = _proxy_jump(opts.proxy_jump, Where("ssh config", (alias, "ProxyJump"), style="path"))
    else:
        jump = None
        if opts.proxy_command:
            proxy_command = expand_tokens(opts.proxy_command, what="ProxyCommand", host=host, port=port,
                                          user=user, alias=alias)

    if "known_hosts" in said:
        node_known_hosts = said["known_hosts"]
        known_hosts_also: tuple[Path, ...] = ()
    else:
        # OpenSSH reads every UserKnownHostsFile and GlobalKnownHostsFile, and adds new keys
        # to the first user file.
        user_files = list(opts.user_known_hosts) or [known_hosts, Path("~/.ssh/known_hosts2").expanduser()]
        node_known_hosts = user_files[0]
        known_hosts_also = tuple(dict.fromkeys([*user_files[1:], *opts.global_known_hosts]))

    return NodeSpec(
        name=name, host=host, port=port, user=user, key=key, groups=node.groups, vars=node.vars,
        proxy_jump=jump, known_hosts=node_known_hosts, reset_command=said.get("reset_command"),
        proxy_command=proxy_command, identities=tuple(identities), certificates=certificates,
        identities_only=opts.identities_only, known_hosts_also=known_hosts_also,
        strict_host_key_checking=opts.strict_host_key_checking, ssh_config=config,
        become=said.get("become", False), become_user=said.get("become_user", DEFAULT_USER),
        source=said.get("source"),
    )


def load_inventory(
    path: str | os.PathLike[str], *, ssh_config: str | os.PathLike[str] | None = None
) -> Inventory:
    """Load and validate an inventory file: imagetool's own, or an Ansible inventory (YAML or INI,
    with its group_vars/ and host_vars/), told apart by `rollout.ansible.inventory_kind`.

    `ssh_config` overrides the OpenSSH client config consulted for what the inventory leaves
    out (default: $IMAGETOOL_SSH_CONFIG, else ~/.ssh/config; a missing file is ignored).
    """
    # rollout.ansible builds on this module's validators, hence imported here.
    from rollout import ansible

    path = Path(path)
    kind, data = ansible.inventory_kind(path)
    if kind != "native":
        return ansible.load(path, kind, data, ssh_config=ssh_config)
    return _load_native(path, data, _ssh_config_path(ssh_config))


def _load_native(path: Path, data: Any, config: str | None) -> Inventory:
    base = path.resolve().parent
    root = Where(path, style="path")
    data = schema.mapping(data, root, TOP_KEYS)
    if not data:
        raise root.error("the inventory is empty; it needs at least a 'nodes' mapping")

    d = root / "defaults"
    defaults = schema.mapping(data.get("defaults"), d, DEFAULT_KEYS)
    said_by_default = {k: setting(k, v, d / k, base) for k, v in defaults.items() if k in SETTING_KEYS}
    known_hosts = said_by_default.get("known_hosts", Path(DEFAULT_KNOWN_HOSTS).expanduser())
    default_vars = _vars(defaults.get("vars"), d / "vars")

    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, dict) or not raw_nodes:
        if raw_nodes is None:
            raise (root / "nodes").error("missing: the inventory lists no nodes")
        raise (root / "nodes").got("a mapping of node names to node settings", raw_nodes)

    given: list[GivenNode] = []
    for name, raw in raw_nodes.items():
        w = root / "nodes" / name
        if not isinstance(name, str) or not NODE_NAME_RE.match(name):
            raise w.error(f"{name!r} is not a valid node name ([A-Za-z0-9][A-Za-z0-9_.-]*)")
        spec = schema.mapping(raw, w, NODE_KEYS)
        said = {**said_by_default, **{k: setting(k, v, w / k, base) for k, v in spec.items() if k in SETTING_KEYS}}
        given.append(GivenNode(name, said, groups=_groups(spec.get("groups"), w / "groups"),
                               vars={**default_vars, **_vars(spec.get("vars"), w / "vars")}, where=w))
    nodes = resolve_nodes(given, config=config, known_hosts=known_hosts)

    names = {n.name for n in nodes}
    for node in nodes:
        clash = [g for g in node.groups if g in names]
        if clash:
            raise (root / "nodes" / node.name / "groups").error(
                f"group {clash[0]!r} has the name of a node; --limit could not tell them apart"
            )

    checks = parse_checks(data.get("health_checks"), root / "health_checks")
    hooks = parse_hooks(data.get("hooks"), root / "hooks", data.get("run_once"), root / "run_once")
    keys = parse_trusted_keys(data.get("trusted_keys"), root / "trusted_keys", base)
    return Inventory(path=path, nodes=nodes, health_checks=checks, known_hosts=known_hosts, hooks=hooks,
                     trusted_keys=keys)


def parse_trusted_keys(value: Any, where: Where, base: Path) -> list[Path]:
    """Public key files, relative to the inventory; each must be an Ed25519 public key now,
    not when a rollout is half-way."""
    if isinstance(value, str):
        value = [value]
    keys: list[Path] = []
    for i, item in enumerate(schema.sequence(value, where)):
        path = _path(item, where / i, base)
        if path in keys:
            raise (where / i).error(f"{item!r} is listed twice")
        try:
            load_public_key(path)
        except InputError as e:
            raise (where / i).error(str(e)) from None
        keys.append(path)
    return keys


def _hook(raw: Any, where: Where, allowed: tuple[str, ...], default_name: str) -> dict[str, Any]:
    spec = schema.mapping(raw, where, allowed)
    if "run" not in spec:
        raise where.missing("run", "the command to run")
    name = _str(spec.get("name", default_name), where / "name")
    if not CHECK_NAME_RE.match(name):
        raise (where / "name").error(f"{name!r} is not a valid hook name ([A-Za-z0-9][A-Za-z0-9_.-]*)")
    runs_on = spec.get("where", "controller")
    if runs_on not in ("controller", "node"):
        raise (where / "where").error(f"expected 'controller' or 'node', got {runs_on!r}")
    return {"name": name, "run": _str(spec["run"], where / "run"), "where": runs_on,
            "timeout": float(schema.number(spec.get("timeout", 300), where / "timeout", minimum=1,
                                           maximum=schema.MAX_SECONDS))}


def parse_hooks(value: Any, where: Where, run_once: Any, run_once_where: Where) -> Hooks:
    points = schema.mapping(value, where, HOOKS_KEYS)
    found: dict[str, tuple[HookSpec, ...]] = {}
    for point in HOOKS_KEYS:
        raw = points.get(point)
        if raw is None:
            continue
        raw = schema.sequence(raw, where / point)
        specs = [HookSpec(**_hook(item, where / point / i, HOOK_KEYS, f"{point}-{i + 1}"))
                 for i, item in enumerate(raw)]
        names = [h.name for h in specs]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise (where / point).error(f"duplicate hook name {dup!r}")
        found[point] = tuple(specs)
    once = None
    if run_once is not None:
        w = run_once_where
        fields = _hook(run_once, w, RUN_ONCE_KEYS, "run-once")
        which = schema.mapping(run_once, w, RUN_ONCE_KEYS).get("node", "first")
        if which not in ("first", "last"):
            raise (w / "node").error(f"expected 'first' or 'last' (the bootstrap node), got {which!r}")
        once = RunOnceSpec(**fields, node=which)
    return Hooks(**found, run_once=once)
