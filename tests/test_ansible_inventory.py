"""Ansible inventories (rollout.ansible) read from real files, with their group_vars/ and host_vars/.

The expected nodes and vars below are what `ansible-inventory --list` (ansible-core 2.19) printed
for the same files, less what imagetool leaves out (lists, other ansible_* variables).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from imagetool.errors import InputError
from imagetool.store import StoredRelease
from rollout.inventory import NodeSpec, load_inventory
from tests.local_fleet import NEW, OLD, Fleet, fast_boot_polls, fleet, release, state  # noqa: F401 - fixtures


@pytest.fixture(autouse=True)
def no_ssh_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the machine's own ~/.ssh/config out of the tests."""
    monkeypatch.setenv("IMAGETOOL_SSH_CONFIG", str(tmp_path / "no-ssh-config"))


def files(base: Path, tree: dict[str, str]) -> Path:
    """Write `tree` (relative path -> text) under `base`; the first file is the inventory."""
    for name, text in tree.items():
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return base / next(iter(tree))


INI = {
    "hosts": """\
        # a comment
        node0 ansible_host=10.0.0.10

        [web]
        web[01:03] ansible_user=deploy http_port=8080
        node1 ansible_host=10.0.0.1 ansible_port=2222 flag=True

        [db]
        db1:2200 ansible_host=10.0.0.20

        [eu:children]
        web
        [eu:vars]
        region=eu
        http_port=80

        [all:vars]
        env=prod
        region=none
    """,
    "group_vars/all.yml": """\
        env: staging
        imagetool_reset_command: "ipmitool -H {name}-bmc power reset"
        listy: [1, 2]
    """,
    "group_vars/web/10-a.yml": "a: 1\nhttp_port: 9000\n",
    "group_vars/web/20-b": "a: 2\n",
    "group_vars/web/.hidden.yml": "a: hidden\n",
    "group_vars/web/30-c.yml~": "a: backup\n",
    "host_vars/web02.yaml": "a: 3\nansible_ssh_user: admin\n",
}


# The known_hosts files OpenSSH reads besides ~/.ssh/known_hosts when its config names none.
OPENSSH_ALSO = (Path("~/.ssh/known_hosts2").expanduser(), Path("/etc/ssh/ssh_known_hosts"),
                Path("/etc/ssh/ssh_known_hosts2"))


def test_ini_inventory_with_group_vars_and_host_vars(tmp_path: Path) -> None:
    inv = load_inventory(files(tmp_path, INI))
    by_name = {n.name: n for n in inv.nodes}
    # Ansible's order: all's hosts, then its children's (ungrouped, db, eu), then eu's (web).
    assert list(by_name) == ["node0", "db1", "web01", "web02", "web03", "node1"]
    reset = "ipmitool -H {name}-bmc power reset"
    assert by_name["node0"] == NodeSpec(name="node0", host="10.0.0.10", vars={"env": "staging", "region": "none"},
                                        reset_command=reset, known_hosts_also=OPENSSH_ALSO)
    # host:port in the host line is ansible_port.
    db1 = by_name["db1"]
    assert (db1.host, db1.port, db1.groups) == ("10.0.0.20", 2200, ("db",))
    # Inline host vars beat group_vars/web (a directory, files in name order) which beats the
    # [eu:vars] and [all:vars] of the file; group_vars/all beats [all:vars].
    assert by_name["web01"] == NodeSpec(name="web01", host="web01", user="deploy", groups=("eu", "web"),
                                        vars={"env": "staging", "region": "eu", "http_port": 8080, "a": 2},
                                        reset_command=reset, known_hosts_also=OPENSSH_ALSO)
    # host_vars beat everything; ansible_ssh_user beats ansible_user.
    assert (by_name["web02"].user, by_name["web02"].vars["a"]) == ("admin", 3)
    node1 = by_name["node1"]
    assert (node1.host, node1.port, node1.user) == ("10.0.0.1", 2222, "root")
    assert node1.vars == {"env": "staging", "region": "eu", "http_port": 9000, "a": 2, "flag": True}
    assert inv.groups == {"db": ["db1"], "eu": ["web01", "web02", "web03", "node1"],
                          "web": ["web01", "web02", "web03", "node1"]}


YAML = {
    "inv.yml": """\
        all:
          vars: {x: all-inline, y: all-inline, z: all-inline}
          hosts:
            lone: {ansible_host: 10.1.0.1}
          children:
            zeta:
              vars: {x: zeta, ansible_group_priority: 5}
              hosts:
                h1:
                h2: {x: h2-inline}
            alpha:
              vars: {x: alpha, y: alpha}
              hosts:
                h1: {ansible_port: "2201"}
              children:
                beta:
                  vars: {y: beta}
                  hosts:
                    h3:
                    h1:
        eu:
          hosts: h2
          vars: {z: eu}
    """,
    "group_vars/all": "z: gv-all\n",
    "group_vars/alpha.yml": "w: gv-alpha-yml\n",
    "group_vars/alpha.yaml": "w: never read, alpha.yml comes first\n",
    "host_vars/h3.json": '{"w": "hv-h3"}\n',
}


def test_yaml_inventory_precedence(tmp_path: Path) -> None:
    inv = load_inventory(files(tmp_path, YAML))
    got = {n.name: (n.host, n.port, n.groups, n.vars) for n in inv.nodes}
    assert list(got) == ["lone", "h1", "h2", "h3"]
    assert got == {
        "lone": ("10.1.0.1", 22, (), {"x": "all-inline", "y": "all-inline", "z": "gv-all"}),
        # beta (a child) beats alpha (its parent); zeta beats alpha at the same depth by its
        # ansible_group_priority, not by name; group_vars/all beats eu's inline vars.
        "h1": ("h1", 2201, ("alpha", "beta", "zeta"), {"x": "zeta", "y": "beta", "z": "gv-all", "w": "gv-alpha-yml"}),
        "h2": ("h2", 22, ("eu", "zeta"), {"x": "h2-inline", "y": "all-inline", "z": "gv-all"}),
        "h3": ("h3", 22, ("alpha", "beta"), {"x": "alpha", "y": "beta", "z": "gv-all", "w": "hv-h3"}),
    }


def test_the_same_fleet_in_three_formats_gives_the_same_nodes(tmp_path: Path) -> None:
    native = files(tmp_path / "native", {"inventory.yaml": """\
        defaults: {user: deploy, reset_command: "reset {name}", vars: {env: prod}}
        nodes:
          n1: {host: 10.0.0.1, groups: [web], vars: {http_port: 8080}}
          n2: {host: 10.0.0.2, port: 2222, groups: [db]}
    """})
    yaml_inv = files(tmp_path / "yaml", {"inventory.yml": """\
        all:
          vars: {ansible_user: deploy, imagetool_reset_command: "reset {name}", env: prod}
          children:
            web: {hosts: {n1: {ansible_host: 10.0.0.1, http_port: 8080}}}
            db: {hosts: {"n2:2222": {ansible_host: 10.0.0.2}}}
    """})
    ini = files(tmp_path / "ini", {
        "hosts.ini": "[web]\nn1 ansible_host=10.0.0.1\n[db]\nn2 ansible_host=10.0.0.2 ansible_port=2222\n",
        "group_vars/all.yml": "ansible_user: deploy\nimagetool_reset_command: reset {name}\nenv: prod\n",
        "host_vars/n1": "http_port: 8080\n",
    })
    expected = load_inventory(native).nodes
    assert load_inventory(yaml_inv).nodes == expected
    assert load_inventory(ini).nodes == expected


def test_imagetool_settings_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "keys").mkdir()
    pub = tmp_path / "keys/release.pub"
    from imagetool.signing import generate_keypair

    generate_keypair(tmp_path / "keys/release.key", pub)
    path = files(tmp_path / "inv", {
        "hosts": "[web]\nn1 ansible_ssh_private_key_file=keys/ansible_key imagetool_user=imagetool\n"
                 "n2 ansible_host=10.0.0.2 ansible_ssh_host=10.0.0.22 ansible_user=ansible\n",
        "group_vars/all/imagetool.yml": f"""\
            imagetool_known_hosts: known_hosts
            imagetool_proxy_jump: bastion
            imagetool_trusted_keys: [{pub}]
            imagetool_health_checks:
              - {{name: port, tcp: "{{host}}:{{vars.http_port}}"}}
            imagetool_hooks:
              before_activate: [{{run: "echo before"}}]
        """,
        "group_vars/all/plain.yml": "http_port: 80\n",
        "group_vars/web.yml": "ansible_ssh_private_key_file: ~/web_key\n",
    })
    monkeypatch.chdir(tmp_path)
    inv = load_inventory(path)
    n1, n2 = inv.nodes
    base = tmp_path / "inv"
    # ansible_ paths are as ssh reads them (from the current directory); imagetool_ ones are
    # relative to the inventory, as in imagetool's own; host vars beat group_vars/web.
    assert n1.key == tmp_path / "keys/ansible_key"
    assert n2.key == Path("~/web_key").expanduser()
    assert (n1.user, n2.user, n2.host) == ("imagetool", "ansible", "10.0.0.22")
    assert n1.known_hosts == base / "known_hosts" == inv.known_hosts
    assert n1.proxy_jump == "bastion"
    assert inv.trusted_keys == [pub]
    assert inv.health_checks[0].for_node(n1).target == "n1:80"
    assert [h.run for h in inv.hooks.before_activate] == ["echo before"]


def test_ssh_config_and_become_as_for_imagetools_own_inventory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An Ansible inventory's nodes are resolved as imagetool's own are (rollout.inventory.
    resolve_nodes): `ssh -G` for the host name or ansible_host (HostName, User, Port,
    IdentityFile and CertificateFile with their tokens, ProxyCommand, known hosts files), one
    lookup per distinct alias, side by side; ansible_become* are imagetool's become keys."""
    import threading

    from rollout import sshconfig

    (tmp_path / "id_web1").write_text("a key")
    (tmp_path / "id_web1-cert.pub").write_text("its certificate")
    config = tmp_path / "ssh_config"
    config.write_text(textwrap.dedent(f"""\
        Host web1
            HostName 10.250.9.1
            User alice
            IdentityFile {tmp_path}/id_%n
            CertificateFile {tmp_path}/id_%n-cert.pub
            UserKnownHostsFile {tmp_path}/kh1 {tmp_path}/kh2
        Host behind
            HostName 10.250.9.2
            ProxyCommand nc -X connect %h %p
        Host *
            Port 2200
    """))
    monkeypatch.setenv("IMAGETOOL_SSH_CONFIG", str(config))
    lookups: list[tuple[str, str]] = []
    run_ssh_g = sshconfig._run_ssh_g

    def counted(alias: str, *args: object) -> dict[str, list[str]]:
        lookups.append((alias, threading.current_thread().name))
        return run_ssh_g(alias, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(sshconfig, "_run_ssh_g", counted)
    web1, web2, web3, web4 = load_inventory(files(tmp_path, {"hosts.ini": """\
        web1 ansible_become=yes
        web2 ansible_host=behind ansible_user=bob ansible_become=True ansible_become_user=imagetool
        web3 ansible_host=10.250.9.3 ansible_port=22 imagetool_known_hosts=kh
        web4 ansible_host=behind ansible_user=bob imagetool_become=false

        [all:vars]
        ansible_become_method=sudo
    """})).nodes
    assert (web1.host, web1.user, web1.port, web1.key, web1.certificates) == (
        "10.250.9.1", "alice", 2200, tmp_path / "id_web1", (tmp_path / "id_web1-cert.pub",))
    assert (web1.known_hosts, web1.known_hosts_also[0]) == (tmp_path / "kh1", tmp_path / "kh2")
    assert (web1.become, web1.become_user) == (True, "root")
    assert (web2.host, web2.user, web2.port, web2.proxy_command, web2.become, web2.become_user) == (
        "10.250.9.2", "bob", 2200, "nc -X connect 10.250.9.2 2200", True, "imagetool")
    assert (web3.host, web3.port, web3.user, web3.known_hosts, web3.known_hosts_also, web3.become) == (
        "10.250.9.3", 22, "root", tmp_path / "kh", (), False)
    assert web4.become is False
    # web2 and web4 are the same lookup (behind, as bob): asked once; all of them by the pool.
    assert sorted(a for a, _ in lookups if a != "imagetool-defaults") == ["10.250.9.3", "behind", "web1"]
    assert all(thread.startswith("ThreadPoolExecutor") for a, thread in lookups if a != "imagetool-defaults")


def test_imagetool_key_beats_the_ansible_one_whatever_the_level(tmp_path: Path) -> None:
    path = files(tmp_path, {
        "hosts.ini": "n1 ansible_host=10.0.0.1\n",
        "group_vars/all.yml": "imagetool_host: 10.9.9.9\nimagetool_key: id_imagetool\n",
    })
    (n1,) = load_inventory(path).nodes
    assert (n1.host, n1.key) == ("10.9.9.9", tmp_path / "id_imagetool")


def test_vault(tmp_path: Path) -> None:
    path = files(tmp_path, {
        "inv.yml": """\
            all:
              hosts:
                n1:
                  secret: !vault |
                    $ANSIBLE_VAULT;1.1;AES256
                    6162
                  plain: !unsafe "{{ not a template }}"
        """,
        "group_vars/all/vault.yml": "$ANSIBLE_VAULT;1.1;AES256\n3136\n",
        "group_vars/all/vars.yml": "shared: 1\n",
    })
    (n1,) = load_inventory(path).nodes
    assert n1.vars == {"plain": "{{ not a template }}", "shared": 1}
    files(tmp_path, {"host_vars/n1.yml": "ansible_host: !vault |\n  $ANSIBLE_VAULT;1.1;AES256\n  6162\n"})
    with pytest.raises(InputError, match=r"host_vars/n1.yml: ansible_host: is encrypted with ansible-vault"):
        load_inventory(path)


@pytest.mark.parametrize("name, text, kind", [
    ("inventory.yaml", "nodes:\n  n1: {host: 10.0.0.1}\n", "native"),
    ("inventory", "defaults: {user: root}\nnodes:\n  n1: {host: 10.0.0.1}\n", "native"),
    ("inventory.yml", "all:\n  hosts:\n    n1: {ansible_host: 10.0.0.1}\n", "ansible-yaml"),
    ("hosts", "web:\n  hosts: {n1: {ansible_host: 10.0.0.1}}\n", "ansible-yaml"),
    ("hosts", "n1 ansible_host=10.0.0.1\n", "ansible-ini"),
    ("hosts", "[web]\nn1 ansible_host=10.0.0.1\n", "ansible-ini"),
    ("hosts.ini", "n1: {ansible_host: 10.0.0.1}\n", "ansible-ini"),  # .ini is INI, whatever it holds
])
def test_detection(tmp_path: Path, name: str, text: str, kind: str) -> None:
    from rollout.ansible import inventory_kind

    path = tmp_path / name
    path.write_text(text)
    assert inventory_kind(path)[0] == kind
    if name != "hosts.ini":
        assert [n.name for n in load_inventory(path).nodes] == ["n1"]


@pytest.mark.parametrize("tree, message", [
    # malformed files
    ({"inv.yml": "all:\n  hosts: {n1: {x: 1}\n"}, r"inv.yml: malformed YAML at line 3"),
    ({"hosts": "[web\nn1\n"},
     r"hosts:1: host range in '\[web' must be \[begin:end\].* \(read as Ansible INI; as YAML: malformed YAML at line 3"),
    ({"hosts.ini": "[web:host]\n"}, r"hosts.ini:1: section \[web:host\] has unknown type 'host'"),
    ({"hosts.ini": "[web servers]\n"}, r"hosts.ini:1: invalid section '\[web servers\]'"),
    ({"hosts.ini": "n1 x='unclosed\n"}, r"hosts.ini:1: cannot split host line .*No closing quotation"),
    ({"hosts.ini": "[web:vars]\nx\n[web]\nn1\n"}, r"hosts.ini:2: expected key=value, got 'x'"),
    ({"hosts.ini": "n1:\n"}, r"hosts.ini:1: host pattern 'n1:' ends in ':'"),
    ({"hosts.ini": b"n1 x=\xff\n"}, r"hosts.ini: not UTF-8 text"),
    ({"hosts.ini": "[web:children]\ndb\n"},
     r"hosts.ini:2: section \[web:children\] names group 'db', which is never declared"),
    ({"hosts.ini": "[web:vars]\nx=1\n"}, r"hosts.ini:1: section \[web:vars\] is for a group that is never declared"),
    ({"inv.yml": "all:\n  hosts: [n1, n2]\n"}, r"inv.yml: all.hosts: expected a mapping, got \['n1', 'n2'\]"),
    ({"inv.yml": "all:\n  host: {n1: }\n"}, r"inv.yml: all: unknown key 'host' \(allowed: hosts, children, vars\)"),
    ({"inv.yml": "all:\n  hosts: {n1: web}\n"}, r"inv.yml: all.hosts.n1: expected a mapping of host vars"),
    ({"inv.yml": "all:\n  hosts: {1: }\n"}, r"inv.yml: all.hosts.1: expected a host name or pattern \(quote numbers\)"),
    ({"inv.yml": "web:\n  vars: {x: 1}\n"}, r"inv.yml: the inventory lists no hosts"),
    # cycles and names
    ({"inv.yml": "a:\n  children:\n    b:\n      children:\n        a:\n          hosts: {n1: }\n"},
     r"inv.yml: groups form a cycle: a -> b -> a"),
    ({"hosts.ini": "[a:children]\nb\n[b:children]\na\n[a]\nn1\n"}, r"hosts.ini: groups form a cycle: a -> b -> a"),
    ({"inv.yml": "web:\n  children:\n    all:\n"}, r"inv.yml: web.children.all: group 'all' cannot be a child"),
    ({"hosts.ini": "".join(f"[g{i}:children]\ng{i + 1}\n" for i in range(3000)) + "[g3000]\nn1\n"},
     r"hosts.ini: groups are nested too deeply"),
    ({"inv.yml": "all:\n  vars: {x: " + "[" * 5000 + "]" * 5000 + "}\n"}, r"inv.yml: malformed YAML: nested too deeply"),
    ({"hosts.ini": "[web]\n../../etc/passwd\n"}, r"hosts.ini:2: '../../etc/passwd' is not a valid node name"),
    ({"inv.yml": "all:\n  hosts: {'../x': }\n"}, r"inv.yml: all.hosts.../x: '../x' is not a valid node name"),
    ({"hosts.ini": "[web/..]\nn1\n"}, r"hosts.ini:1: 'web/..' is not a valid group name"),
    # ranges
    ({"hosts.ini": "web[0:99999999]\n"}, r"hosts.ini:1: host range in 'web\[0:99999999\]' makes more than 100000"),
    ({"hosts.ini": "web[0:9][0:9999][0:9]\n"}, r"makes more than 100000 hosts"),
    ({"hosts.ini": "web[1:5:0]\n"}, r"hosts.ini:1: host range in 'web\[1:5:0\]': expected numbers or single letters"),
    ({"hosts.ini": "web[01:5]\n"}, r"zero-padded begin and end must be as long"),
    ({"hosts.ini": "web[5:1]\n"}, r"host range in 'web\[5:1\]' is empty"),
    # vars: values, files, imagetool's keys
    ({"hosts.ini": "n1\n[all:vars]\nx=1e999\n"}, r"hosts.ini:3: x: expected a string, number or boolean, got inf"),
    ({"hosts.ini": "n1\n", "group_vars/all.yml": "x: .nan\n"},
     r"group_vars/all.yml: x: expected a string, number or boolean, got nan"),
    ({"hosts.ini": "n1\n", "group_vars/all.yml": "- x\n"},
     r"group_vars/all.yml: expected a mapping of variables, got \['x'\]"),
    ({"hosts.ini": "n1\n", "host_vars/n1": 'x: "a\\0b"\n'}, r"host_vars/n1: x: must not contain a NUL character"),
    ({"hosts.ini": "n1\n", "group_vars/ungrouped.yml": "imagetool_reset_cmd: x\n"},
     (r"group_vars/ungrouped.yml: imagetool_reset_cmd: unknown imagetool key 'imagetool_reset_cmd' \(allowed: "
      r"imagetool_host, imagetool_port, .*imagetool_trusted_keys\)")),
    ({"hosts.ini": "[web]\nn1\n", "group_vars/web.yml": "imagetool_health_checks: []\n"},
     r"group_vars/web.yml: imagetool_health_checks: .*applies to the whole inventory"),
    ({"hosts.ini": "n1 ansible_port=99999\n"}, r"hosts.ini:1: ansible_port: expected a port number 1-65535"),
    ({"hosts.ini": "n1 ansible_host='-oProxyCommand=x'\n"}, r"hosts.ini:1: ansible_host: '-oProxyCommand=x' is not"),
    ({"hosts.ini": "n1 'bad name'=1\n"}, r"hosts.ini:1: bad name: 'bad name' is not a valid var name"),
    ({"hosts.ini": "[web]\nn1\n[web:vars]\nansible_group_priority=high\n"},
     r"hosts.ini:4: ansible_group_priority: expected an integer"),
    ({"inv.yml": "all:\n  hosts: {n1: }\n  vars: {imagetool_health_checks: [{name: x}]}\n"},
     r"inv.yml: all.vars.imagetool_health_checks.x: a check needs exactly one of"),
    # become
    ({"hosts.ini": "n1 ansible_become=maybe\n"}, r"hosts.ini:1: ansible_become: expected true or false, got 'maybe'"),
    ({"hosts.ini": "n1 ansible_become=yes ansible_become_method=su\n"},
     r"hosts.ini:1: ansible_become_method: 'su': the only become_method is 'sudo'"),
    ({"hosts.ini": "n1 ansible_become_user=-x\n"}, r"hosts.ini:1: ansible_become_user: '-x' is not a user name"),
])
def test_hostile_and_malformed_inventories(tmp_path: Path, tree: dict[str, str | bytes], message: str) -> None:
    for name, text in tree.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_inventory(tmp_path / next(iter(tree)))


def test_a_vars_directory_that_loops_is_refused(tmp_path: Path) -> None:
    path = files(tmp_path, {"hosts.ini": "n1\n", "group_vars/all/a.yml": "x: 1\n"})
    (tmp_path / "group_vars/all/again").symlink_to(tmp_path / "group_vars/all")
    with pytest.raises(InputError, match=r"group_vars/all/again: a directory loop"):
        load_inventory(path)


def test_native_inventories_refuse_ansibles_implicit_group_names(tmp_path: Path) -> None:
    path = files(tmp_path, {"inventory.yaml": "nodes:\n  n1: {host: 10.0.0.1, groups: [ungrouped]}\n"})
    with pytest.raises(InputError, match=r"nodes.n1.groups: 'ungrouped' is implicit"):
        load_inventory(path)


def test_cli_rollout_with_an_ansible_inventory_and_a_pattern(release: StoredRelease, fleet: Fleet, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`imagetool rollout -i hosts --limit PATTERN` against local nodes running the real helper:
    the Ansible inventory and the pattern decide which nodes move, reached as the inventory says."""
    import json

    from click.testing import CliRunner

    from imagetool.cli import main

    inv = files(tmp_path / "ansible", {
        "hosts": "n1 ansible_host=10.0.0.1\n[web]\nn[2:3]\n[web:vars]\nansible_user=deploy\n",
        "host_vars/n2.yml": "ansible_host: 10.0.0.2\nansible_port: 2222\n",
        "host_vars/n3.yml": "ansible_host: 10.0.0.3\n",
    })
    nodes = {n.name: n for n in fleet(3)}
    reached: list[NodeSpec] = []

    def local(specs: list[NodeSpec], **kw: object) -> list[object]:
        reached.extend(specs)
        return [nodes[s.name] for s in specs]

    monkeypatch.setattr("rollout.fleet.ssh_nodes", local)
    common = ["-i", str(inv), "--store", str(release.manifest_path.parent), "--health-timeout", "0", "--json"]

    r = CliRunner().invoke(main, ["rollout", "web-1.1", "--batch", "1", "--limit", "all:!n3", *common])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [(n["node"], n["outcome"]) for n in doc["nodes"]] == [("n1", "done"), ("n2", "done")]
    assert [(s.name, s.host, s.port, s.user) for s in reached] == [
        ("n1", "10.0.0.1", 22, "root"), ("n2", "10.0.0.2", 2222, "deploy")]
    assert [state(nodes[n]).committed for n in ("n1", "n2", "n3")] == [NEW, NEW, OLD]

    r = CliRunner().invoke(main, ["rollout", "web-1.1", "--limit", "web:!typo", *common])
    assert r.exit_code == 2 and "--limit 'typo': no node or group matches 'typo'" in r.output
    assert state(nodes["n3"]).committed == OLD
