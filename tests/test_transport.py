"""SSHTransport against a real sshd in a network namespace (see tests/sshd_fixture.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import os
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from imagetool.errors import HostKeyError, InputError, NodeError, UnreachableError
from rollout.inventory import load_inventory
from rollout.knownhosts import known_hosts_name
from rollout.local import LocalMachine
from rollout.node import HelperNode
from rollout.sshconnect import JUMPS
from rollout.stage import needed_bytes, stage
from rollout.transport import CONNECTIONS, CommandResult, CommandTimeoutError, SSHTransport
from tests.samples import make_release
from tests.sshd_fixture import DEAD_ADDR, NODE_ADDR, SshdServer, keygen, sshd_node, sshd_server  # noqa: F401

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def ssh(sshd_node):  # type: ignore[no-untyped-def]
    t = SSHTransport(sshd_node)
    yield t
    t.close()


@pytest.fixture
def remote_dir(ssh: SSHTransport) -> str:
    # The namespace shares the host's filesystem, so a fresh directory keeps tests apart.
    path = ssh.run(["mktemp", "-d", "/tmp/itest-transport-XXXXXX"], check=True).stdout.strip()
    yield path
    ssh.run(["rm", "-rf", path])


def random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 20))
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.hexdigest()


def remote_sha256(ssh: SSHTransport, path: str) -> str:
    return ssh.run(["sha256sum", path], check=True, timeout=60).stdout.split()[0]


# --- commands ---------------------------------------------------------------------------------


def test_run_exit_status_stdout_stderr(ssh: SSHTransport) -> None:
    r = ssh.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.exit_status, r.stdout, r.stderr, r.ok) == (3, "out\n", "err\n", False)
    assert r.command == "sh -c 'echo out; echo err >&2; exit 3'"
    assert ssh.run(["true"]).ok
    ssh.connect()  # idempotent: same connection
    assert ssh.connected


def test_check_raises_node_error_with_context(ssh: SSHTransport) -> None:
    script = "for i in $(seq 1 30); do echo line$i >&2; done; exit 7"
    with pytest.raises(NodeError) as e:
        ssh.run(["sh", "-c", script], check=True)
    msg = str(e.value)
    assert "node itest (10.250.254.2)" in msg and "exit status 7" in msg and "sh -c" in msg
    assert "line30" in msg and "line21" in msg and "line20" not in msg  # only the tail
    r = CommandResult("x", 1, "", "boom", host="h", name="n")
    with pytest.raises(NodeError, match=r"node n \(h\): staging failed: `x` ended with exit status 1; stderr:\nboom"):
        r.check("staging")


def test_a_node_without_the_helper_is_not_unreachable(ssh: SSHTransport) -> None:
    """This sshd's machine has no imagetool-node: its shell says `command not found` (127), and the
    node client reports the missing helper, not an unreachable node."""
    from imagetool.errors import HelperMissingError
    from rollout.node import HelperNode

    assert ssh.run(["imagetool-node", "status"]).exit_status == 127
    with pytest.raises(HelperMissingError, match="node itest: node helper missing at /usr/sbin/imagetool-node"):
        HelperNode(ssh.node, ssh).status()


def test_nasty_arguments_reach_the_program_verbatim(ssh: SSHTransport, remote_dir: str) -> None:
    marker = f"{remote_dir}/pwned"
    nasty = [
        f"$(touch {marker})",
        f"`touch {marker}`",
        f"; touch {marker}",
        f"&& touch {marker} #",
        f"| touch {marker}",
        "'single' \"double\" \\back",
        f"line1\nline2\ntouch {marker}",
        "*",
        "",
        "  spaced  ",
        "$HOME ${PATH} %s {}",
    ]
    r = ssh.run(["printf", "%s\\0", *nasty], check=True)
    assert r.stdout.split("\0")[:-1] == nasty
    assert not ssh.run(["test", "-e", marker]).ok, "an argument was executed by the shell"
    assert not Path(marker).exists()


def test_run_with_input(ssh: SSHTransport) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB, binary
    r = ssh.run(["sha256sum"], input=data, check=True)
    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    # stdin is closed even without input, so commands that read it end
    assert ssh.run(["cat"], timeout=10).stdout == ""


def test_large_output_on_both_streams(ssh: SSHTransport) -> None:
    r = ssh.run(["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' o; head -c 3000000 /dev/zero | tr '\\0' e >&2"])
    assert (len(r.stdout), len(r.stderr)) == (3_000_000, 3_000_000)


def test_run_shell(ssh: SSHTransport) -> None:
    r = ssh.run_shell("x=$((6*7)); echo $x | tr 4 X; test -d /", check=True)
    assert r.stdout == "X2\n"


def test_run_timeout(ssh: SSHTransport) -> None:
    start = time.monotonic()
    with pytest.raises(CommandTimeoutError, match=r"node itest \(10.250.254.2:22\): `sleep 30` did not finish within 1s"):
        ssh.run(["sleep", "30"], timeout=1)
    assert time.monotonic() - start < 3
    # the connection is still usable afterwards
    assert ssh.run(["echo", "ok"]).stdout == "ok\n"


def test_run_rejects_non_argv(ssh: SSHTransport) -> None:
    with pytest.raises(InputError):
        ssh.run("echo hi")  # type: ignore[arg-type]


# --- files ------------------------------------------------------------------------------------


def test_put_file_50mb(ssh: SSHTransport, remote_dir: str, tmp_path: Path) -> None:
    local = tmp_path / "big.bin"
    digest = random_file(local, 50 * 1000 * 1000)
    seen: list[int] = []
    sent = ssh.put_file(local, f"{remote_dir}/big.bin", progress=seen.append)
    assert sent == 50 * 1000 * 1000
    assert seen == sorted(seen) and seen[-1] == sent
    assert remote_sha256(ssh, f"{remote_dir}/big.bin") == digest


def test_put_file_truncates_and_resumes(ssh: SSHTransport, remote_dir: str, tmp_path: Path) -> None:
    local = tmp_path / "f.bin"
    digest = random_file(local, 5_000_123)
    remote = f"{remote_dir}/dir with space/f'q.bin"
    ssh.run(["mkdir", "-p", f"{remote_dir}/dir with space"], check=True)
    # Leftover junk longer than the file: offset 0 must truncate it.
    ssh.run(["sh", "-c", 'head -c 9000000 /dev/zero > "$1"', "sh", remote], check=True)
    # An interrupted first transfer: only the first part arrived.
    part = tmp_path / "part.bin"
    part.write_bytes(local.read_bytes()[:1_234_567])
    assert ssh.put_file(part, remote) == 1_234_567
    assert ssh.put_file(local, remote, offset=1_234_567) == 5_000_123 - 1_234_567
    assert remote_sha256(ssh, remote) == digest
    assert ssh.put_file(local, remote, offset=5_000_123) == 0  # nothing left to send
    assert remote_sha256(ssh, remote) == digest
    with pytest.raises(InputError, match="outside the file"):
        ssh.put_file(local, remote, offset=5_000_124)


def test_put_file_remote_error(ssh: SSHTransport, tmp_path: Path) -> None:
    local = tmp_path / "f.bin"
    random_file(local, 100_000)
    with pytest.raises(NodeError, match=r"node itest .*/nonexistent-dir/f"):
        ssh.put_file(local, "/nonexistent-dir/f")


# --- host keys --------------------------------------------------------------------------------


def test_unknown_host_key_refused(sshd_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    node = dataclasses.replace(sshd_node, known_hosts=empty)
    with pytest.raises(HostKeyError, match=rf"node itest \(10.250.254.2:22\): host key is not in {empty}.*--accept-new-host-keys"):
        SSHTransport(node).connect()
    # a missing file is the same as an empty one
    with pytest.raises(HostKeyError, match="host key is not in"):
        SSHTransport(dataclasses.replace(node, known_hosts=tmp_path / "absent")).connect()


def test_changed_host_key_refused(sshd_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    other = keygen(tmp_path / "other_host_key")
    kh = tmp_path / "known_hosts"
    kh.write_text(f"{NODE_ADDR} {other}\n")
    node = dataclasses.replace(sshd_node, known_hosts=kh)
    for accept in (False, True):
        with pytest.raises(HostKeyError, match=r"HOST KEY CHANGED.*expected fingerprint SHA256:.*got SHA256:.*refusing"):
            SSHTransport(node, accept_new_host_keys=accept).connect()
    assert kh.read_text() == f"{NODE_ADDR} {other}\n"  # never rewritten


def test_accept_new_host_key_appends(sshd_server: SshdServer, tmp_path: Path) -> None:
    kh = tmp_path / "sub" / "known_hosts"
    node = dataclasses.replace(sshd_server.node, known_hosts=kh)
    with SSHTransport(node, accept_new_host_keys=True) as t:
        assert t.run(["true"]).ok
    assert kh.read_text() == f"{NODE_ADDR} {sshd_server.host_pubkey_line}\n"
    # now known: a strict transport connects
    with SSHTransport(node) as t:
        assert t.run(["true"]).ok


def test_hashed_known_hosts(sshd_server: SshdServer, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(sshd_server.known_hosts.read_text())
    subprocess.run(["ssh-keygen", "-H", "-f", str(kh)], check=True, capture_output=True)
    assert kh.read_text().startswith("|1|")
    with SSHTransport(dataclasses.replace(sshd_server.node, known_hosts=kh)) as t:
        assert t.run(["true"]).ok


def test_known_hosts_name() -> None:
    assert known_hosts_name("10.250.0.1", 22) == "10.250.0.1"
    assert known_hosts_name("10.250.0.1", 2222) == "[10.250.0.1]:2222"


# --- failures to connect ----------------------------------------------------------------------


def test_unreachable_host_is_bounded(sshd_node) -> None:  # type: ignore[no-untyped-def]
    node = dataclasses.replace(sshd_node, name="ghost", host=DEAD_ADDR)
    start = time.monotonic()
    with pytest.raises(UnreachableError, match=rf"node ghost \({DEAD_ADDR}:22\): cannot connect: ") as e:
        SSHTransport(node, connect_timeout=1, connect_retries=2).connect()
    assert not isinstance(e.value, HostKeyError)
    assert time.monotonic() - start < 5


def test_connection_refused(sshd_node) -> None:  # type: ignore[no-untyped-def]
    node = dataclasses.replace(sshd_node, port=2999)
    with pytest.raises(UnreachableError, match=r"node itest \(10.250.254.2:2999\): cannot connect: connection refused"):
        SSHTransport(node, connect_timeout=1, connect_retries=2).connect()


def test_wrong_key_is_not_retried(sshd_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    keygen(tmp_path / "stranger")
    node = dataclasses.replace(sshd_node, key=tmp_path / "stranger")
    start = time.monotonic()
    with pytest.raises(UnreachableError, match=r"node itest \(10.250.254.2:22\): authentication as 'root' failed with key"):
        SSHTransport(node, connect_timeout=5, connect_retries=5).connect()
    assert time.monotonic() - start < 4
    with pytest.raises(UnreachableError, match=r"key file .*/absent does not exist"):
        SSHTransport(dataclasses.replace(node, key=tmp_path / "absent")).connect()


def test_reconnect_after_the_connection_died(sshd_server: SshdServer) -> None:
    t = SSHTransport(sshd_server.node)
    t.connect()
    # Kill the sshd process serving this connection (the parent of our commands), as a reboot
    # would; the listening sshd stays up for the reconnect.
    session_sshd = t.run(["sh", "-c", "echo $PPID"]).stdout.strip()
    assert session_sshd != str(sshd_server.process.pid)
    subprocess.run(["kill", session_sshd], check=True)
    Retrying(stop=stop_after_delay(10), wait=wait_fixed(0.2), retry=retry_if_result(bool))(lambda: t.connected)
    assert not t.connected
    t.reconnect(timeout=10)
    assert t.run(["echo", "back"]).stdout == "back\n"
    t.close()


# --- how many connections stay open ------------------------------------------------------------

def test_idle_connections_beyond_the_limit_are_closed_and_reopen_on_use(
        sshd_server: SshdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CONNECTIONS, "limit", 2)
    ts = [SSHTransport(sshd_server.node) for _ in range(5)]
    try:
        for i, t in enumerate(ts):
            assert t.run(["echo", str(i)]).stdout == f"{i}\n"
            assert sum(x.connected for x in ts) <= 2
        # The two used last are open; the first was closed as idle and connects again on use.
        assert [t.connected for t in ts] == [False, False, False, True, True]
        assert ts[0].run(["echo", "again"]).stdout == "again\n"
        assert [t.connected for t in ts] == [True, False, False, False, True]
    finally:
        for t in ts:
            t.close()
    assert len(CONNECTIONS) == 0


def test_a_connection_running_a_command_is_never_closed_as_idle(
        sshd_server: SshdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CONNECTIONS, "limit", 1)
    ts = [SSHTransport(sshd_server.node) for _ in range(4)]
    results: dict[int, str] = {}

    def one(i: int) -> None:
        results[i] = ts[i].run(["sh", "-c", f"sleep 1; echo {i}"], check=True).stdout

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        # All four ran at once, over the limit of one: none was cut.
        assert results == {i: f"{i}\n" for i in range(4)}
        # Once idle, they are closed down to the limit on the next use.
        assert ts[0].run(["true"]).ok
        assert sum(t.connected for t in ts) == 1 and ts[0].connected
    finally:
        for t in ts:
            t.close()


# --- ssh config and jump hosts ----------------------------------------------------------------


def test_ssh_config_is_honoured(sshd_server: SshdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(textwrap.dedent(f"""
        Host testnode
            HostName {NODE_ADDR}
            User root
            Port 22
            IdentityFile {sshd_server.client_key}
        Host *
            User nobody-here
            Port 2999
    """))
    monkeypatch.setenv("IMAGETOOL_SSH_CONFIG", str(config))
    inv_file = tmp_path / "inventory.yaml"
    inv_file.write_text(f"defaults: {{known_hosts: {sshd_server.known_hosts}}}\nnodes: {{testnode: {{}}}}\n")
    (node,) = load_inventory(inv_file).nodes
    assert (node.host, node.user, node.port, node.key) == (NODE_ADDR, "root", 22, sshd_server.client_key)
    with SSHTransport(node) as t:
        assert t.run(["id", "-un"]).stdout == "root\n"


def test_proxy_jump(sshd_node) -> None:  # type: ignore[no-untyped-def]
    # The throwaway sshd is its own jump host: the node is reached through a direct-tcpip channel.
    node = dataclasses.replace(sshd_node, proxy_jump=f"root@{NODE_ADDR}:22")
    with SSHTransport(node) as t:
        assert t.run(["echo", "via jump"]).stdout == "via jump\n"
        assert t._jump is not None  # noqa: SLF001


def test_proxy_jump_chain_is_shared_by_the_nodes_behind_it(sshd_node) -> None:  # type: ignore[no-untyped-def]
    # Two hops (the throwaway sshd twice, the second reached through the first), two nodes.
    spec = dataclasses.replace(sshd_node, proxy_jump=f"root@{NODE_ADDR},{NODE_ADDR}:22", ssh_config=os.devnull)
    a = SSHTransport(dataclasses.replace(spec, name="a"))
    b = SSHTransport(dataclasses.replace(spec, name="b"))
    try:
        # The node sees the connection come from the last hop (itself), not from the controller.
        assert a.run(["sh", "-c", "echo ${SSH_CONNECTION%% *}"]).stdout == f"{NODE_ADDR}\n"
        assert b.run(["true"]).ok
        assert a._jump == b._jump and len(a._jump) == 2  # noqa: SLF001
        assert JUMPS.open_chains() == 2  # one connection per hop, not per node
        a.close()
        assert JUMPS.open_chains() == 2 and b.run(["true"]).ok
    finally:
        a.close()
        b.close()
    assert JUMPS.open_chains() == 0


def test_jump_host_failures_name_the_node_and_the_hop(sshd_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "empty").write_text("")
    spec = dataclasses.replace(sshd_node, proxy_jump=f"root@{NODE_ADDR}", ssh_config=os.devnull,
                               known_hosts=tmp_path / "empty")
    with pytest.raises(HostKeyError, match=rf"node itest \({NODE_ADDR}:22\): jump host root@{NODE_ADDR}:22: "
                                           "host key is not in"):
        SSHTransport(spec).connect()
    # The second hop fails (its user is refused): the first one, already up, is closed again.
    spec = dataclasses.replace(sshd_node, proxy_jump=f"root@{NODE_ADDR},no-such-user@{NODE_ADDR}", ssh_config=os.devnull)
    with pytest.raises(UnreachableError, match=rf"node itest \({NODE_ADDR}:22\): jump host no-such-user@{NODE_ADDR}:22: "
                                               "authentication as 'no-such-user' failed"):
        SSHTransport(spec).connect()
    assert JUMPS.open_chains() == 0
    # The jump host answers, the node behind it does not (port 2999): retried, then reported.
    spec = dataclasses.replace(sshd_node, port=2999, proxy_jump=f"root@{NODE_ADDR}", ssh_config=os.devnull)
    with pytest.raises(UnreachableError, match=rf"node itest \({NODE_ADDR}:2999\): cannot connect: "):
        SSHTransport(spec, connect_timeout=1, connect_retries=2).connect()
    assert JUMPS.open_chains() == 0


def test_direct_connection_comes_from_the_controller(ssh: SSHTransport) -> None:
    # The other half of the proof above: without a jump host the node sees the host side.
    assert ssh.run(["sh", "-c", "echo ${SSH_CONNECTION%% *}"]).stdout == "10.250.254.1\n"


# --- known_hosts as OpenSSH reads it ---------------------------------------------------------


def _node_with_known_hosts(server: SshdServer, tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    kh = tmp_path / "known_hosts"
    kh.write_text(text)
    return dataclasses.replace(server.node, known_hosts=kh), kh


def test_cert_authority_and_unreadable_lines_do_not_break_the_host_entry(sshd_server: SshdServer, tmp_path: Path) -> None:
    # Before: one @cert-authority line made every node unreachable ("Incorrect padding").
    node, _ = _node_with_known_hosts(sshd_server, tmp_path, (
        f"@cert-authority *.elsewhere {sshd_server.ca_pubkey_line}\n"
        "@future-marker x ssh-ed25519 AAAA\n"
        "10.250.254.9 ssh-ed25519 %%%not-base64\n"
        f"{NODE_ADDR} {sshd_server.host_pubkey_line}\n"
    ))
    with SSHTransport(node) as t:
        assert t.run(["true"]).ok


def test_host_certificate_signed_by_a_trusted_ca(sshd_server: SshdServer, tmp_path: Path) -> None:
    # The CA line is the only trust anchor: the node's certificate (ssh-keygen -s -h) is checked.
    node, _ = _node_with_known_hosts(sshd_server, tmp_path, f"@cert-authority 10.250.254.* {sshd_server.ca_pubkey_line}\n")
    with SSHTransport(node) as t:
        assert t.run(["true"]).ok
        key = t._ssh.get_remote_server_key()  # noqa: SLF001
        assert key.public_blob.key_type == "ssh-ed25519-cert-v01@openssh.com"


def test_host_certificate_of_another_ca_is_refused(sshd_server: SshdServer, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other_ca")
    node, _ = _node_with_known_hosts(sshd_server, tmp_path, f"@cert-authority * {other}\n")
    with pytest.raises(HostKeyError, match=r"host certificate not accepted: it is signed by a CA that no "
                                           r"@cert-authority line for this host names"):
        SSHTransport(node).connect()


def test_revoked_host_key_is_refused_naming_file_and_line(sshd_server: SshdServer, tmp_path: Path) -> None:
    node, kh = _node_with_known_hosts(sshd_server, tmp_path, (
        f"{NODE_ADDR} {sshd_server.host_pubkey_line}\n@revoked * {sshd_server.host_pubkey_line}\n"
    ))
    for accept in (False, True):
        with pytest.raises(HostKeyError, match=rf"node itest .*REVOKED host key .*marked @revoked at {kh}:2; refusing"):
            SSHTransport(node, accept_new_host_keys=accept).connect()


def test_negated_pattern_excludes_the_host(sshd_server: SshdServer, tmp_path: Path) -> None:
    node, _ = _node_with_known_hosts(sshd_server, tmp_path, f"10.250.254.*,!{NODE_ADDR} {sshd_server.host_pubkey_line}\n")
    with pytest.raises(HostKeyError, match="host key is not in"):
        SSHTransport(node).connect()
    node, _ = _node_with_known_hosts(sshd_server, tmp_path, f"10.250.254.*,!10.250.254.9 {sshd_server.host_pubkey_line}\n")
    with SSHTransport(node) as t:
        assert t.run(["true"]).ok


# --- ssh_config: ProxyCommand, Include, known hosts files, strictness -------------------------


def _inventory_node(tmp_path: Path, config: str, name: str = "n1"):  # type: ignore[no-untyped-def]
    cfg = tmp_path / "ssh_config"
    cfg.write_text(textwrap.dedent(config))
    inv = tmp_path / "inventory.yaml"
    inv.write_text(f"nodes: {{{name}: {{}}}}\n")
    (node,) = load_inventory(inv, ssh_config=cfg).nodes
    return node


def test_proxy_command_from_ssh_config(sshd_server: SshdServer, tmp_path: Path) -> None:
    # `ssh -W` through the sshd itself carries the connection; the node then sees it coming from
    # its own address. %h and %p are expanded, the command runs in the shell as ssh runs it.
    node = _inventory_node(tmp_path, f"""
        Include {tmp_path}/conf.d/*.conf
        Host n1
            HostName {NODE_ADDR}
            IdentityFile {sshd_server.client_key}
            UserKnownHostsFile {tmp_path}/empty {sshd_server.known_hosts}
            ProxyCommand ssh -F /dev/null -i {sshd_server.client_key} -o BatchMode=yes -o UserKnownHostsFile={sshd_server.known_hosts} -W %h:%p root@%h 2>/dev/null
    """)
    assert node.proxy_command and f"-W {NODE_ADDR}:22 root@{NODE_ADDR}" in node.proxy_command
    with SSHTransport(node) as t:
        assert t.run(["sh", "-c", "echo ${SSH_CONNECTION%% *}"]).stdout == f"{NODE_ADDR}\n"
    assert not (tmp_path / "empty").exists()  # known in the second file: nothing written


def test_include_and_accept_new_from_ssh_config(sshd_server: SshdServer, tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "nodes.conf").write_text(
        f"Host n1\n  HostName {NODE_ADDR}\n  IdentityFile {sshd_server.client_key}\n")
    node = _inventory_node(tmp_path, f"""
        Include {tmp_path}/conf.d/*.conf
        Host *
            UserKnownHostsFile {tmp_path}/kh_new
            StrictHostKeyChecking accept-new
    """)
    assert (node.host, node.strict_host_key_checking) == (NODE_ADDR, "accept-new")
    with SSHTransport(node) as t:
        assert t.run(["true"]).ok
    assert (tmp_path / "kh_new").read_text() == f"{NODE_ADDR} {sshd_server.host_pubkey_line}\n"


def test_strict_host_key_checking_yes_refuses_unknown(sshd_server: SshdServer, tmp_path: Path) -> None:
    node = _inventory_node(tmp_path, f"""
        Host n1
            HostName {NODE_ADDR}
            IdentityFile {sshd_server.client_key}
            UserKnownHostsFile {tmp_path}/kh_new
            StrictHostKeyChecking yes
    """)
    with pytest.raises(HostKeyError, match="host key is not in"):
        SSHTransport(node).connect()


# --- ssh-agent ----------------------------------------------------------------------------------


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A real ssh-agent; SSH_AUTH_SOCK points at it for the test."""
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    Retrying(stop=stop_after_delay(10), wait=wait_fixed(0.05), retry=retry_if_result(lambda r: not r))(sock.exists)
    monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
    yield sock
    proc.terminate()
    proc.wait(timeout=5)


@pytest.fixture
def passphrase_key(sshd_server: SshdServer, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A passphrase-protected key the sshd accepts (authorized for the test only)."""
    key = tmp_path / "id_secret"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "s3cret", "-C", "secret", "-f", str(key)], check=True)
    before = sshd_server.authorized_keys.read_text()
    sshd_server.authorized_keys.write_text(before + Path(f"{key}.pub").read_text())
    yield key
    sshd_server.authorized_keys.write_text(before)


def ssh_add(key: Path, passphrase: str, tmp_path: Path) -> None:
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\necho {passphrase}\n")
    askpass.chmod(0o700)
    subprocess.run(["ssh-add", str(key)], check=True, capture_output=True, stdin=subprocess.DEVNULL,
                   env={**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"})


def test_passphrase_key_named_in_the_inventory_uses_the_agent(sshd_server: SshdServer, passphrase_key: Path,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              request: pytest.FixtureRequest) -> None:
    node = dataclasses.replace(sshd_server.node, key=passphrase_key)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with pytest.raises(UnreachableError, match=rf"{passphrase_key} needs a passphrase and ssh-agent does not hold it"):
        SSHTransport(node).connect()
    request.getfixturevalue("agent")
    ssh_add(passphrase_key, "s3cret", tmp_path)
    with SSHTransport(node) as t:
        assert t.run(["true"]).ok


def test_agent_key_without_a_key_file(sshd_server: SshdServer, passphrase_key: Path, agent: Path,
                                      tmp_path: Path) -> None:
    ssh_add(passphrase_key, "s3cret", tmp_path)
    with SSHTransport(dataclasses.replace(sshd_server.node, key=None)) as t:
        assert t.run(["true"]).ok


def test_identities_only_offers_no_other_agent_key(sshd_server: SshdServer, passphrase_key: Path, agent: Path,
                                                   tmp_path: Path) -> None:
    ssh_add(passphrase_key, "s3cret", tmp_path)
    keygen(tmp_path / "stranger")
    node = dataclasses.replace(sshd_server.node, key=tmp_path / "stranger")
    with SSHTransport(node) as t:  # the agent's key gets in after the stranger is refused
        assert t.run(["true"]).ok
    with pytest.raises(UnreachableError, match=r"authentication as 'root' failed .*refused: .*stranger"):
        SSHTransport(dataclasses.replace(node, identities_only=True)).connect()


# --- become: a login user other than root, the helper through sudo -n ------------------------


_USERS = itertools.count(1)


@pytest.fixture
def login_user():  # type: ignore[no-untyped-def]
    """A throwaway user on this machine (the sshd's namespace shares its users and files) and
    the sudoers.d file the test writes for it; both removed afterwards."""
    name = f"itest-become-{os.getpid() % 100000}-{next(_USERS)}"
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True)
    # sshd without PAM refuses a locked account ('!' password), even for a key.
    subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True)
    sudoers = Path("/etc/sudoers.d") / name
    try:
        yield name, sudoers
    finally:
        sudoers.unlink(missing_ok=True)
        # -f: the user's last sshd session may still be on its way out.
        subprocess.run(["userdel", "-f", "-r", name], capture_output=True)


def allow_helper(sudoers: Path, user: str, machine: LocalMachine, *, nopasswd: bool) -> None:
    """sudoers for `user`: the machine's helper (found through secure_path, as /usr/sbin's would
    be on a node), with or without a password."""
    text = (f"Defaults:{user} secure_path={machine.bin}:/usr/sbin:/usr/bin:/sbin:/bin\n"
            f"{user} ALL=(root) {'NOPASSWD: ' if nopasswd else ''}{machine.bin}/imagetool-node\n")
    draft = sudoers.with_name(f".{sudoers.name}.draft")
    draft.write_text(text)
    draft.chmod(0o440)
    subprocess.run(["visudo", "-cqf", str(draft)], check=True)
    draft.rename(sudoers)


@pytest.fixture
def machine(tmp_path: Path):  # type: ignore[no-untyped-def]
    """The real node helper against a directory (rollout.local), booted on web-1.0; reached here
    over the throwaway sshd, not through LocalTransport."""
    m = LocalMachine(tmp_path / "machine", timer_delay=0)
    m.install_release(make_release(tmp_path / "store", "web", "1.0", b"o" * 1000), commit=True)
    m.power_on()
    yield m
    m.power_off()


def test_become_runs_the_helper_and_stages_through_sudo(sshd_server: SshdServer, login_user, machine: LocalMachine,
                                                        tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    user, sudoers = login_user
    allow_helper(sudoers, user, machine, nopasswd=True)
    release = make_release(tmp_path / "store", "web", "1.1", os.urandom(300_000))
    spec = dataclasses.replace(sshd_server.node, user=user, become=True)
    node = HelperNode(spec, SSHTransport(spec))
    try:
        assert node.transport.run(["id", "-un"]).stdout == f"{user}\n"  # logged in as the user
        assert node.status().booted == "web-1.0"  # the helper ran, as root
        result = stage(node, release)
        assert (result.outcome, result.bytes_sent) == ("staged", needed_bytes(release, 0))
        image = machine.root / "var/lib/imagetool/images/web-1.1.squashfs"
        assert image.read_bytes() == release.squashfs_path.read_bytes() and image.stat().st_uid == 0
        assert stage(node, release).outcome == "present"
        # The login user alone cannot write there: this is why the helper receives the bytes.
        incoming = node.stage_info("web-1.2").incoming
        assert not node.transport.run(["sh", "-c", f"echo x > {incoming}/web-1.2.sig"]).ok
        # receive writes nothing but a transfer's own files in .incoming
        with pytest.raises(NodeError, match=r"receive writes only a transfer's files"):
            node.put(release.manifest_path, "/etc/passwd.manifest.json")
    finally:
        node.close()


def test_become_without_nopasswd_says_what_sudoers_needs(sshd_server: SshdServer, login_user,
                                                         machine: LocalMachine) -> None:  # type: ignore[no-untyped-def]
    user, sudoers = login_user
    allow_helper(sudoers, user, machine, nopasswd=False)
    spec = dataclasses.replace(sshd_server.node, user=user, become=True)
    with contextlib.closing(HelperNode(spec, SSHTransport(spec))) as node:
        with pytest.raises(NodeError, match=rf"node itest: sudo asks '{user}' for a password to run imagetool-node as "
                                            rf"'root' \(become\); allow it without one .*NOPASSWD: /usr/sbin/imagetool-node"):
            node.status()


def test_become_stages_a_delta_through_receive(sshd_server: SshdServer, login_user,
                                               tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A login user's node staging by delta: the pack (<id>.delta-<hex>.tar) goes through the
    helper's receive, and stage-delta runs through sudo like every helper command."""
    from tests.test_delta import changed, old_bytes

    user, sudoers = login_user
    old = make_release(tmp_path / "store", "web", "1.0", old_bytes())
    new = make_release(tmp_path / "store", "web", "1.1", changed(old_bytes()))
    m = LocalMachine(tmp_path / "machine", timer_delay=0)
    m.install_release(old, commit=True)
    m.power_on()
    allow_helper(sudoers, user, m, nopasswd=True)
    spec = dataclasses.replace(sshd_server.node, user=user, become=True)
    node = HelperNode(spec, SSHTransport(spec))
    try:
        result = stage(node, new)
        assert (result.outcome, result.mode) == ("staged", "delta"), result
        assert result.bytes_sent < needed_bytes(new, 0) / 4
        image = m.root / "var/lib/imagetool/images/web-1.1.squashfs"
        assert image.read_bytes() == new.squashfs_path.read_bytes() and image.stat().st_uid == 0
    finally:
        node.close()
        m.power_off()


def test_become_without_the_helper_is_helper_missing(sshd_server: SshdServer, login_user) -> None:  # type: ignore[no-untyped-def]
    """A user sudo lets run anything: sudo says `command not found` (exit status 1, not the
    shell's 127), still the missing helper, not a failed command or an unreachable node. (With a
    rule naming the helper alone, sudo asks for a password instead: see _check_sudo.)"""
    from imagetool.errors import HelperMissingError

    user, sudoers = login_user
    draft = sudoers.with_name(f".{sudoers.name}.draft")
    draft.write_text(f"Defaults:{user} secure_path=/usr/sbin:/usr/bin:/sbin:/bin\n"
                     f"{user} ALL=(root) NOPASSWD: ALL\n")
    draft.chmod(0o440)
    subprocess.run(["visudo", "-cqf", str(draft)], check=True)
    draft.rename(sudoers)
    spec = dataclasses.replace(sshd_server.node, user=user, become=True)
    with contextlib.closing(HelperNode(spec, SSHTransport(spec))) as node:
        with pytest.raises(HelperMissingError, match=r"node itest: node helper missing at /usr/sbin/imagetool-node "
                                                     r"\(sudo: `imagetool-node`: command not found\)"):
            node.status()
