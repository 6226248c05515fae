"""ssh_config resolution (rollout.sshconfig, through rollout.inventory) against OpenSSH itself.

Each case is a config file (read with -F, as IMAGETOOL_SSH_CONFIG), an inventory node and the
settings it must end up with, written out by hand. Every case is checked twice: the inventory's
NodeSpec must have those settings, and `ssh -G -F file HOST` must agree with them field by
field for the fields the transport uses, so the table is OpenSSH's truth, not ours.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagetool.errors import InputError
from rollout.inventory import load_inventory
from rollout.sshconfig import expand_tokens, parse_hop

CASES: list[tuple[str, dict[str, str], tuple[str, dict[str, Any]], dict[str, Any]]] = [
    # (id, files relative to tmp (the first is the config), inventory node, expected NodeSpec fields)
    ("include-glob-first-wins", {
        "config": "Include {tmp}/conf.d/*.conf\nHost *\n  User fallback\n",
        "conf.d/a.conf": "Host web1\n  HostName 10.1.0.1\n  User alice\n",
        "conf.d/b.conf": "Host web*\n  Port 2201\n  User bob\n",
    }, ("web1", {}), {"host": "10.1.0.1", "user": "alice", "port": 2201}),
    ("include-glob-matching-nothing", {
        "config": "Include {tmp}/none-*.conf\nHost web2\n  HostName 10.1.0.2\n",
    }, ("web2", {}), {"host": "10.1.0.2", "user": "root", "port": 22}),
    ("host-negation", {
        "config": "Host *.example !db.example\n  User ops\nHost *\n  User fallback\n",
    }, ("web", {"host": 'web.example'}), {"host": "web.example", "user": "ops"}),
    ("host-negation-excluded", {
        "config": "Host *.example !db.example\n  User ops\nHost *\n  User fallback\n",
    }, ("db", {"host": 'db.example'}), {"host": "db.example", "user": "fallback"}),
    ("match-host-and-originalhost", {
        "config": "Host short\n  HostName 10.1.0.5\nMatch host 10.1.0.5\n  Port 2202\n"
                  "Match originalhost short\n  User orig\n",
    }, ("short", {}), {"host": "10.1.0.5", "port": 2202, "user": "orig"}),
    ("match-user-sees-the-inventory-user", {
        "config": "Host mu\n  HostName 10.1.0.6\nMatch user carol\n  Port 2203\n",
    }, ("mu", {"user": 'carol'}), {"host": "10.1.0.6", "user": "carol", "port": 2203}),
    ("match-user-other", {
        "config": "Host mu\n  HostName 10.1.0.6\nMatch user carol\n  Port 2203\n",
    }, ("mu", {"user": 'dave'}), {"user": "dave", "port": 22}),
    ("match-exec", {
        "config": "Host ex\n  HostName 10.1.0.7\nMatch exec \"test -e {tmp}/flag\"\n  Port 2204\n",
        "flag": "",
    }, ("ex", {}), {"host": "10.1.0.7", "port": 2204}),
    ("match-final-and-all", {
        "config": "Host fi\n  HostName 10.1.0.9\nMatch final host 10.1.0.9\n  User finaluser\nMatch all\n  Port 2207\n",
    }, ("fi", {}), {"host": "10.1.0.9", "user": "finaluser", "port": 2207}),
    ("first-obtained-value-wins", {
        "config": "Host x\n  HostName 10.1.0.10\n  Port 2205\nHost x\n  Port 2206\n  HostName 10.9.9.9\n",
    }, ("x", {}), {"host": "10.1.0.10", "port": 2205}),
    ("inventory-wins", {
        "config": "Host iw\n  HostName 10.1.0.11\n  Port 2208\n  User cfg\n",
    }, ("iw", {"port": 2209, "user": 'inv'}), {"host": "10.1.0.11", "port": 2209, "user": "inv"}),
    ("tokens", {
        "config": "Host tok\n  HostName 10.1.0.12\n  User deploy\n  IdentityFile {tmp}/keys/%r@%h-%p_%n\n"
                  "  ProxyCommand ssh -W %h:%p jump %% %r\n",
        "keys/deploy@10.1.0.12-22_tok": "key",
    }, ("tok", {}), {"host": "10.1.0.12", "key": "{tmp}/keys/deploy@10.1.0.12-22_tok",
                   "proxy_command": "ssh -W 10.1.0.12:22 jump % deploy", "proxy_jump": None}),
    ("identity-files-absent-skipped", {
        "config": "Host idf\n  HostName 10.1.0.13\n  IdentityFile {tmp}/absent\n  IdentityFile {tmp}/k1\n"
                  "  IdentityFile {tmp}/k2\n  IdentitiesOnly yes\n  CertificateFile {tmp}/k1-cert.pub\n",
        "k1": "key", "k2": "key", "k1-cert.pub": "cert",
    }, ("idf", {}), {"key": "{tmp}/k1", "identities": ("{tmp}/k2",), "identities_only": True,
                   "certificates": ("{tmp}/k1-cert.pub",)}),
    ("proxy-jump-hops", {
        "config": "Host pj\n  HostName 10.1.0.14\n  ProxyJump u1@j1:2022,j2\n  ProxyCommand never-used\n",
    }, ("pj", {}), {"host": "10.1.0.14", "proxy_jump": "u1@j1:2022,j2", "proxy_command": None}),
    ("known-hosts-files-and-strictness", {
        "config": "Host kh\n  HostName 10.1.0.15\n  UserKnownHostsFile {tmp}/kh1 {tmp}/kh2\n"
                  "  GlobalKnownHostsFile {tmp}/global\n  StrictHostKeyChecking accept-new\n",
    }, ("kh", {}), {"known_hosts": "{tmp}/kh1", "known_hosts_also": ("{tmp}/kh2", "{tmp}/global"),
                  "strict_host_key_checking": "accept-new"}),
    ("strict-no", {
        "config": "Host sn\n  HostName 10.1.0.16\n  StrictHostKeyChecking no\n",
    }, ("sn", {}), {"strict_host_key_checking": "no"}),
]


def ssh_g(config: Path, alias: str, user: str | None, port: int | None) -> dict[str, list[str]]:
    argv = ["ssh", "-G", "-F", str(config)]
    argv += ["-l", user] if user else []
    argv += ["-p", str(port)] if port else []
    out = subprocess.run([*argv, "--", alias], capture_output=True, text=True, check=True).stdout
    got: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        got.setdefault(key, []).append(value)
    return got


def fill(value: Any, tmp: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, tuple):
        return tuple(fill(v, tmp) for v in value)
    return value


@pytest.mark.parametrize(("files", "node", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_resolution_agrees_with_ssh_G(tmp_path: Path, files: dict[str, str], node: tuple[str, dict[str, Any]],
                                      expected: dict[str, Any]) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(fill(text, tmp_path))
    config = tmp_path / "config"
    inv = tmp_path / "inventory.yaml"
    name, settings = node
    inv.write_text(yaml.safe_dump({"nodes": {name: settings}}))
    (spec,) = load_inventory(inv, ssh_config=config).nodes
    want = {k: fill(v, tmp_path) for k, v in expected.items()}
    got = {k: getattr(spec, k) for k in want}
    got = {k: str(v) if isinstance(v, Path) else tuple(map(str, v)) if k in (
        "identities", "certificates", "known_hosts_also") else v for k, v in got.items()}
    assert got == want

    # OpenSSH says the same.
    alias = settings.get("host", name)
    g = ssh_g(config, alias, settings.get("user"), settings.get("port"))
    parity = {
        "host": lambda: g["hostname"][0],
        "port": lambda: int(g["port"][0]),
        "user": lambda: g["user"][0],
        "proxy_jump": lambda: ([parse_hop(h, "") for h in g["proxyjump"][0].split(",")] if "proxyjump" in g else None),
        "identities_only": lambda: g["identitiesonly"][0] in ("yes", "true"),
        "strict_host_key_checking": lambda: {"true": "yes", "false": "no"}.get(g["stricthostkeychecking"][0],
                                                                              g["stricthostkeychecking"][0]),
        "known_hosts": lambda: g["userknownhostsfile"][0].split()[0],
        "known_hosts_also": lambda: tuple(g["userknownhostsfile"][0].split()[1:] + g["globalknownhostsfile"][0].split()),
        # ssh -G leaves the tokens of these to connection time; expanded the way ssh(1) says.
        "key": lambda: expand_tokens(g["identityfile"][1 if "absent" in g["identityfile"][0] else 0],
                                     host=spec.host, port=spec.port, user=spec.user, alias=alias, what=""),
        "proxy_command": lambda: (expand_tokens(g["proxycommand"][0], host=spec.host, port=spec.port,
                                                user=spec.user, alias=alias, what="") if "proxycommand" in g
                                  and "proxyjump" not in g else None),
    }
    for field, value in want.items():
        if field == "proxy_jump" and value is not None:
            value = [parse_hop(h, "") for h in value.split(",")]
        if field in parity:
            assert parity[field]() == value, f"ssh -G disagrees on {field}"


def load_with_config(tmp_path: Path, config_text: str, inventory_text: str) -> None:
    config = tmp_path / "config"
    config.write_text(config_text)
    inv = tmp_path / "inventory.yaml"
    inv.write_text(inventory_text)
    load_inventory(inv, ssh_config=config)


def test_unknown_token_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"ProxyCommand 'nc %h %Z': unknown token %Z"):
        load_with_config(tmp_path, "Host t\n  HostName 10.1.0.1\n  ProxyCommand nc %h %Z\n", "nodes: {t: {}}\n")


def test_a_broken_config_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=rf"ssh config {tmp_path / 'config'}: cannot resolve '10.1.0.1': .*line 2: "
                                          "Bad configuration option: nosuchoption"):
        load_with_config(tmp_path, "Host t\n  NoSuchOption yes\n", "nodes: {t: {host: 10.1.0.1}}\n")
