from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from imagetool.errors import InputError
from rollout.hostpattern import select
from rollout.inventory import CheckSpec, NodeSpec, load_inventory


def write(tmp_path: Path, text: str, name: str = "inventory.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


@pytest.fixture
def no_ssh_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the machine's own ~/.ssh/config out of the tests."""
    path = tmp_path / "ssh_config"
    monkeypatch.setenv("IMAGETOOL_SSH_CONFIG", str(path))
    return path


FULL = """
    defaults:
      user: deploy
      port: 2222
      key: keys/id_ed25519
      known_hosts: known_hosts
      vars: {env: prod, http_port: 80}
    nodes:
      node1:
        host: 10.250.3.11
        groups: [web, canary]
        vars: {http_port: 8080}
      node2:
        host: 10.250.3.12
        port: 22
        user: root
        key: ~/other_key
        groups: [web]
      db-1.example:
        host: 10.250.3.13
        groups: db
    health_checks:
      - {name: web, http: "http://{host}:{vars.http_port}/health", expect_status: 204, timeout: 5, retries: 10, interval: 1}
      - {name: ssh-port, tcp: "{host}:22", timeout: 3}
      - {name: disk, command: "test -w /var/lib/imagetool && echo {name} ${HOME} | awk '{print $1}'", timeout: 5}
"""


def test_full_inventory(tmp_path: Path, no_ssh_config: Path) -> None:
    inv = load_inventory(write(tmp_path, FULL))
    assert [n.name for n in inv.nodes] == ["node1", "node2", "db-1.example"]
    n1, n2, db = inv.nodes
    assert n1 == NodeSpec(
        name="node1", host="10.250.3.11", port=2222, user="deploy",
        key=tmp_path / "keys/id_ed25519", groups=("web", "canary"),
        vars={"env": "prod", "http_port": 8080}, proxy_jump=None, known_hosts=tmp_path / "known_hosts",
    )
    assert (n2.port, n2.user, n2.key) == (22, "root", Path("~/other_key").expanduser())
    assert db.groups == ("db",) and db.vars == {"env": "prod", "http_port": 80}
    assert inv.known_hosts == tmp_path / "known_hosts"
    assert inv.groups == {"web": ["node1", "node2"], "canary": ["node1"], "db": ["db-1.example"]}

    web, port, disk = inv.health_checks
    assert web == CheckSpec(name="web", kind="http", target="http://{host}:{vars.http_port}/health",
                            expect_status=204, timeout=5, retries=10, interval=1.0)
    assert (port.kind, port.timeout, port.retries, port.interval, port.expect_status) == ("tcp", 3, 3, 1.0, 200)
    assert web.for_node(n1).target == "http://10.250.3.11:8080/health"
    assert port.for_node(db).target == "10.250.3.13:22"
    # Only known placeholders are touched; shell braces survive; values are shell-quoted.
    assert disk.for_node(db).target == (
        "test -w /var/lib/imagetool && echo db-1.example ${HOME} | awk '{print $1}'"
    )


def test_check_placeholder_missing_var(tmp_path: Path, no_ssh_config: Path) -> None:
    inv = load_inventory(write(tmp_path, """
        nodes: {a: {host: 10.250.0.1}}
        health_checks: [{name: x, tcp: "{host}:{vars.port}"}]
    """))
    with pytest.raises(InputError, match=r"node a has no var 'port'"):
        inv.health_checks[0].for_node(inv.nodes[0])


def test_defaults(tmp_path: Path, no_ssh_config: Path) -> None:
    inv = load_inventory(write(tmp_path, "nodes:\n  a: {host: 10.250.0.1}\n"))
    (a,) = inv.nodes
    assert (a.user, a.port, a.key, a.groups, a.vars, a.proxy_jump) == ("root", 22, None, (), {}, None)
    assert inv.known_hosts == Path("~/.ssh/known_hosts").expanduser() == a.known_hosts
    assert inv.health_checks == []


def test_source_from_defaults_and_per_node(tmp_path: Path, no_ssh_config: Path) -> None:
    """Nodes pull from the store nearest them: a node's own `source` wins over the defaults'."""
    inv = load_inventory(write(tmp_path, "defaults: {source: 'http://10.250.0.9:8080/store/'}\nnodes:\n"
                                         "  a: {host: 10.250.0.1}\n"
                                         "  b: {host: 10.250.0.2, source: 'https://eu.mirror.example/s'}\n"))
    assert [n.source for n in inv.nodes] == ["http://10.250.0.9:8080/store", "https://eu.mirror.example/s"]


def test_select_by_name_and_group(tmp_path: Path, no_ssh_config: Path) -> None:
    inv = load_inventory(write(tmp_path, FULL))
    names = lambda nodes: [n.name for n in nodes]  # noqa: E731
    assert names(select(inv.nodes, None)) == ["node1", "node2", "db-1.example"]
    assert names(select(inv.nodes, [])) == ["node1", "node2", "db-1.example"]
    assert names(select(inv.nodes, ["canary"])) == ["node1"]
    assert names(select(inv.nodes, ["web"])) == ["node1", "node2"]
    # file order, no duplicates, names and groups mixed
    assert names(select(inv.nodes, ["db-1.example", "web", "node1"])) == ["node1", "node2", "db-1.example"]
    with pytest.raises(InputError, match=r"--limit 'nope': no node or group matches 'nope' \(groups: canary, db, web\)"):
        select(inv.nodes, ["nope"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("nodes:\n  a: {host: 10.250.0.1, hots: x}\n",
         r"inventory.yaml: nodes.a: unknown key 'hots' \(allowed: host, port, user, key, known_hosts, proxy_jump, groups, vars, reset_command, source, become, become_user, become_method\)"),
        ("nodes:\n  a: {host: 10.250.0.1}\nnode: {}\n",
         r"inventory.yaml: unknown key 'node' \(allowed: defaults, nodes, health_checks, hooks, run_once, trusted_keys\)"),
        ("defaults: {usr: root}\nnodes:\n  a: {host: 10.250.0.1}\n",
         r"inventory.yaml: defaults: unknown key 'usr' \(allowed: user, port, key, known_hosts, proxy_jump, vars, reset_command, source, become, become_user, become_method\)"),
        ("nodes:\n  a: {port: 22}\n", r"inventory.yaml: nodes.a: missing 'host'"),
        ("nodes:\n  a: {host: 10.250.0.1}\n  b: {host: 10.250.0.2}\n  a: {host: 10.250.0.3}\n",
         r"inventory.yaml: malformed YAML at line 4, column 3: .*duplicate key 'a' \(first at line 2\)"),
        ("nodes:\n  a: {host: 10.250.0.1, port: 70000}\n", r"nodes.a.port: expected a port number 1-65535, got 70000"),
        ("nodes:\n  a: {host: 10.250.0.1, port: yes}\n", r"nodes.a.port: expected a port number"),
        ("nodes:\n  -bad: {host: 10.250.0.1}\n", r"nodes.-bad: '-bad' is not a valid node name"),
        ("nodes:\n  a: {host: [1]}\n", r"nodes.a.host: expected a non-empty string"),
        ("nodes:\n  a: {host: 10.250.0.1, groups: [a]}\n", r"nodes.a.groups: group 'a' has the name of a node"),
        ("nodes:\n  a: {host: 10.250.0.1\n", r"inventory.yaml: malformed YAML at line 3"),
        ("nodes: []\n", r"inventory.yaml: nodes: expected a mapping of node names"),
        ("", r"inventory.yaml: the inventory is empty"),
        ("nodes:\n  a: {host: 10.250.0.1}\nhealth_checks:\n  - {name: x, tcp: 'h:1', http: 'http://h/'}\n",
         r"health_checks.x: a check needs exactly one of command, tcp, http \(got tcp, http\)"),
        ("nodes:\n  a: {host: 10.250.0.1}\nhealth_checks:\n  - {name: x, timeout: 3}\n",
         r"health_checks.x: a check needs exactly one of command, tcp, http \(got none\)"),
        ("nodes:\n  a: {host: 10.250.0.1}\nhealth_checks:\n  - {name: x, command: true, retry: 3}\n",
         r"health_checks.x: unknown key 'retry' \(allowed: name, command, tcp, http, expect_status, timeout, retries, interval\)"),
        ("nodes:\n  a: {host: 10.250.0.1}\nhealth_checks:\n  - {command: 'true'}\n", r"health_checks.0: missing 'name'"),
        ("nodes:\n  a: {host: 10.250.0.1}\nhealth_checks:\n  - {name: x, tcp: '{host}'}\n",
         r"health_checks.x.tcp: '\{host\}': expected HOST:PORT"),
        ("nodes:\n  a: {host: 10.250.0.1}\nhealth_checks:\n  - {name: x, http: 'http://{hots}/'}\n",
         r"health_checks.x.http: unknown placeholder \{hots\}"),
        ("nodes:\n  a: {host: 10.250.0.1}\nhealth_checks:\n  - {name: x, tcp: 'h:1', expect_status: 200}\n",
         r"health_checks.x.expect_status: only http checks"),
        ("nodes:\n  a: {host: 10.250.0.1}\nhealth_checks:\n  - {name: x, command: 'true', retries: 0}\n",
         r"health_checks.x.retries: expected an integer 1-1000, got 0"),
        ("nodes:\n  a: {host: 10.250.0.1}\nhealth_checks:\n  - {name: x, command: 'true'}\n  - {name: x, command: 'false'}\n",
         r"health_checks.x.name: duplicate health check name 'x'"),
        ("nodes:\n  a: {host: 10.250.0.1, proxy_jump: 'j1,-x'}\n", r"nodes.a.proxy_jump: 'j1,-x': expected \[user@\]host"),
        ("nodes:\n  a: {host: 10.250.0.1, become: 'yes'}\n", r"nodes.a.become: expected true or false"),
        ("defaults: {source: 'ftp://mirror/store'}\nnodes:\n  a: {host: 10.250.0.1}\n",
         r"defaults.source: store URL 'ftp://mirror/store' is not http:// or https://HOST"),
        ("nodes:\n  a: {host: 10.250.0.1, source: 'http://m/$(reboot)'}\n", r"nodes.a.source: store URL"),
        ("nodes:\n  a: {host: 10.250.0.1, source: 80}\n", r"nodes.a.source: expected a non-empty string"),
        ("nodes:\n  a: {host: 10.250.0.1, become: true, become_method: su}\n", r"nodes.a.become_method: 'su': the only"),
        ("defaults: {become_user: '-x'}\nnodes:\n  a: {host: 10.250.0.1}\n", r"defaults.become_user: '-x' is not a user"),
        ("nodes:\n  a: {host: 10.250.0.1}\nhealth_checks:\n  - {name: x, command: 'true', timeout: .nan}\n",
         r"health_checks.x.timeout: expected a number >= 0.001 and <= 86400, got nan"),
        ("nodes:\n  a: {host: 10.250.0.1}\nhealth_checks:\n  - {name: x, command: 'true', interval: .inf}\n",
         r"health_checks.x.interval: expected a number >= 0 and <= 86400, got inf"),
        ("nodes:\n  a: {host: 10.250.0.1}\nhooks:\n  after_commit:\n    - {run: 'true', timeout: .NaN}\n",
         r"hooks.after_commit.0.timeout: expected a number >= 1 and <= 86400, got nan"),
        ("nodes:\n  a: {host: 10.250.0.1}\nhooks:\n  after_commit:\n    - {run: 'true', timeout: 1e+30}\n",
         r"hooks.after_commit.0.timeout: expected a number >= 1 and <= 86400"),
    ],
)
def test_validation_errors(tmp_path: Path, no_ssh_config: Path, text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_inventory(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope.yaml: inventory file does not exist"):
        load_inventory(tmp_path / "nope.yaml")


def test_ssh_config_fills_what_inventory_leaves_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "cfg_key"
    key.write_text("not really a key")
    config = tmp_path / "ssh_config"
    config.write_text(textwrap.dedent(f"""
        Host alpha
            HostName 10.250.9.1
            User alice
            Port 2200
            IdentityFile /nonexistent/key
            IdentityFile {key}
            ProxyJump jumper@10.250.9.254:2022
        Host 10.250.9.2
            User bob
            Port 2201
        Host *
            User fallback
    """))
    monkeypatch.setenv("IMAGETOOL_SSH_CONFIG", str(config))
    inv = load_inventory(write(tmp_path, """
        nodes:
          alpha: {}
          beta: {host: 10.250.9.2}
          gamma: {host: 10.250.9.3, user: carol, port: 22}
          alpha-override: {host: alpha, user: dave, key: k}
    """))
    alpha, beta, gamma, override = inv.nodes
    assert (alpha.host, alpha.user, alpha.port, alpha.key, alpha.proxy_jump) == (
        "10.250.9.1", "alice", 2200, key, "jumper@[10.250.9.254]:2022")
    assert (beta.host, beta.user, beta.port) == ("10.250.9.2", "bob", 2201)
    # the inventory wins over the ssh config
    assert (gamma.user, gamma.port) == ("carol", 22)
    # `host: alpha` is what `ssh alpha` would be given: its HostName applies, as in OpenSSH.
    assert (override.host, override.user, override.port, override.key) == ("10.250.9.1", "dave", 2200, tmp_path / "k")

    # The explicit argument beats the environment variable.
    other = tmp_path / "other_config"
    other.write_text("Host alpha\n  HostName 10.250.9.99\n")
    inv = load_inventory(write(tmp_path, "nodes: {alpha: {}}\n"), ssh_config=other)
    assert (inv.nodes[0].host, inv.nodes[0].user, inv.nodes[0].port) == ("10.250.9.99", "root", 22)


def test_ssh_config_without_hostname_still_needs_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "ssh_config"
    config.write_text("Host *\n  User x\n")
    monkeypatch.setenv("IMAGETOOL_SSH_CONFIG", str(config))
    with pytest.raises(InputError, match=r"nodes.a: missing 'host' \(and no HostName for it in the ssh config\)"):
        load_inventory(write(tmp_path, "nodes: {a: {}}\n"))


@pytest.mark.parametrize("text, message", [
    ("nodes:\n  a: {host: '-oProxyCommand=touch x'}\n", r"nodes.a.host: '-oProxyCommand=touch x' is not a host name"),
    ("nodes:\n  a: {host: 'h1 h2'}\n", r"nodes.a.host: 'h1 h2' is not a host name"),
    ("nodes:\n  a: {host: \"h1\\nh2\"}\n", r"nodes.a.host: 'h1\\nh2' is not a host name"),
    ("nodes:\n  a: {host: 'root@h1'}\n", r"nodes.a.host: 'root@h1' is not a host name"),
    ("nodes:\n  a: {host: h1, user: '-lroot'}\n", r"nodes.a.user: '-lroot' is not a user name"),
    ("nodes:\n  a: {host: h1, user: 'ro ot'}\n", r"nodes.a.user: 'ro ot' is not a user name"),
    ("defaults: {user: \"a\\nb\"}\nnodes:\n  a: {host: h1}\n", r"defaults.user: 'a\\nb' is not a user name"),
    ("nodes:\n  a: {host: h1, proxy_jump: '-J x'}\n", r"nodes.a.proxy_jump: .*without spaces or a leading '-'"),
    ("nodes:\n  a: {host: h1, vars: {x: [1, 2]}}\n", r"nodes.a.vars.x: expected a string, number or boolean"),
    ("nodes:\n  a: {host: h1, vars: {'a b': 1}}\n", r"nodes.a.vars.a b: 'a b' is not a valid var name"),
    ("nodes:\n  a: {host: h1, vars: {x: .nan}}\n", r"nodes.a.vars.x: expected a string, number or boolean"),
])
def test_host_user_and_vars_are_validated(tmp_path: Path, no_ssh_config: Path, text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_inventory(write(tmp_path, text))


def test_hosts_may_be_names_and_addresses(tmp_path: Path, no_ssh_config: Path) -> None:
    inv = load_inventory(write(tmp_path, "nodes:\n  a: {host: db-1.example.com}\n  b: {host: 10.0.0.2}\n"
                                         "  c: {host: 'fe80::1%eth0', user: deploy_1}\n"))
    assert [(n.host, n.user) for n in inv.nodes] == [("db-1.example.com", "root"), ("10.0.0.2", "root"),
                                                    ("fe80::1%eth0", "deploy_1")]
    with pytest.raises(InputError, match="node x: '-h' is not a host name"):
        NodeSpec(name="x", host="-h")
