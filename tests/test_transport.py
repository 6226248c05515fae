"""SSHTransport against a real sshd in a network namespace (see tests/sshd_fixture.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from imagetool.errors import HostKeyError, InputError, NodeError, UnreachableError
from rollout.inventory import load_inventory
from rollout.knownhosts import known_hosts_name
from rollout.transport import CommandResult, CommandTimeoutError, SSHTransport
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
