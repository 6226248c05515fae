"""A real, throwaway OpenSSH server in its own network namespace, for transport tests and benches.

`throwaway_sshd()` is a plain context manager (the bench uses it); `sshd_server` and `sshd_node`
are the session-scoped pytest fixtures built on it. Import them in a test module with
`from tests.sshd_fixture import sshd_node, sshd_server  # noqa`.

The server listens on 10.250.254.2:22 inside namespace `itest-sshd-<pid>`, reached from the host
through a veth pair (host side `itsh<pid%10000>`, 10.250.254.1/30). Everything lives in the lab's
own range so no traffic leaves the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_fixed

from imagetool.systools import pid_alive
from rollout.inventory import NodeSpec

HOST_ADDR = "10.250.254.1"
NODE_ADDR = "10.250.254.2"
# The other usable-looking address of the /30 (its broadcast): routed to the veth, nobody there.
DEAD_ADDR = "10.250.254.3"
SSHD = "/usr/sbin/sshd"


@dataclass
class SshdServer:
    namespace: str
    host_if: str
    tmp: Path
    node: NodeSpec
    client_key: Path
    host_key: Path
    host_pubkey_line: str  # "ssh-ed25519 AAAA..." as in the .pub file, without comment
    known_hosts: Path
    process: subprocess.Popen[bytes]
    # The CA that signed the host key's certificate (sshd presents it to clients that ask for
    # certificates first: those with an @cert-authority line for the host), "ssh-ed25519 AAAA...".
    ca_key: Path
    ca_pubkey_line: str
    authorized_keys: Path

    def netns(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command inside the server's namespace (as the node sees it)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.namespace, *argv],
            check=check, capture_output=True, text=True, timeout=timeout,
        )


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, timeout=30)


def keygen(path: Path, kind: str = "ed25519") -> str:
    """A fresh passphrase-less key at `path`; returns its public line without the comment."""
    _run("ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "itest", "-f", str(path))
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


@retry(
    retry=retry_if_exception_type(OSError),
    stop=stop_after_delay(15),
    wait=wait_fixed(0.1),
    reraise=True,
)
def _wait_for_port(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=1) as s:
        s.settimeout(2)
        # sshd accepts before it is ready to talk; the banner proves it is.
        if not s.recv(64).startswith(b"SSH-"):
            raise ConnectionError(f"{host}:{port} answered without an SSH banner")


def _sshd_config(tmp: Path, host_key: Path, authorized_keys: Path) -> str:
    return "\n".join([
        "Port 22",
        f"ListenAddress {NODE_ADDR}",
        f"HostKey {host_key}",
        f"HostCertificate {host_key}-cert.pub",
        f"AuthorizedKeysFile {authorized_keys}",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "UseDNS no",
        f"PidFile {tmp / 'sshd.pid'}",
        # The bench's scp speaks SFTP (OpenSSH >= 9 defaults to it).
        "Subsystem sftp /usr/lib/openssh/sftp-server",
        "MaxSessions 64",
        "MaxStartups 64",
        "",
    ])


def _remove_namespace(namespace: str, host_if: str) -> None:
    """Kill whatever runs in the namespace, then delete it and the host end of its veth."""
    for p in _run("ip", "netns", "pids", namespace, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(p), signal.SIGKILL)
    _run("ip", "netns", "del", namespace, check=False)
    _run("ip", "link", "del", host_if, check=False)


def clear_stale() -> list[str]:
    """Remove the namespaces and veths of throwaway sshds whose test process is gone.

    A run killed mid-session (a machine restart, a CI timeout) leaves its namespace and its host
    veth, still holding 10.250.254.1/30 and the route: the next run's packets would then go to the
    dead namespace and be refused. Returns the namespaces removed.
    """
    removed = []
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        namespace = line.split()[0] if line.split() else ""
        if not namespace.startswith("itest-sshd-"):
            continue
        try:
            pid = int(namespace.removeprefix("itest-sshd-"))
        except ValueError:
            continue
        if pid_alive(pid) and pid != os.getpid():
            continue
        _remove_namespace(namespace, f"itsh{pid % 10000}")
        removed.append(namespace)
    # A host veth whose namespace is already gone keeps the address and route alone.
    for line in _run("ip", "-o", "-4", "addr", "show", "to", f"{HOST_ADDR}/32", check=False).stdout.splitlines():
        ifname = line.split()[1].split("@")[0]
        if ifname.startswith("itsh"):
            _run("ip", "link", "del", ifname, check=False)
            removed.append(ifname)
    return removed


@contextlib.contextmanager
def throwaway_sshd() -> Iterator[SshdServer]:
    """Start sshd in a fresh namespace; always tear down sshd, namespace and veth on exit."""
    if os.geteuid() != 0:
        raise PermissionError("a throwaway sshd needs root (network namespaces)")
    clear_stale()
    pid = os.getpid()
    namespace = f"itest-sshd-{pid}"
    host_if = f"itsh{pid % 10000}"
    peer_if = f"itsp{pid % 10000}"
    tmp = Path(tempfile.mkdtemp(prefix="itest-sshd-"))
    process: subprocess.Popen[bytes] | None = None
    try:
        _run("ip", "netns", "add", namespace)
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        _run("ip", "link", "set", peer_if, "netns", namespace)
        _run("ip", "addr", "add", f"{HOST_ADDR}/30", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        ns = ["ip", "netns", "exec", namespace]
        _run(*ns, "ip", "addr", "add", f"{NODE_ADDR}/30", "dev", peer_if)
        _run(*ns, "ip", "link", "set", peer_if, "up")
        _run(*ns, "ip", "link", "set", "lo", "up")

        host_key = tmp / "ssh_host_ed25519_key"
        host_pub = keygen(host_key)
        ca_key = tmp / "host_ca"
        ca_pub = keygen(ca_key)
        _run("ssh-keygen", "-q", "-s", str(ca_key), "-h", "-I", "itest-host", "-n", NODE_ADDR,
             str(host_key.with_suffix(".pub")))
        client_key = tmp / "id_ed25519"
        client_pub = keygen(client_key)
        authorized = tmp / "authorized_keys"
        authorized.write_text(client_pub + "\n")
        # sshd reads authorized_keys as the user logging in: tests log in as users other than root.
        tmp.chmod(0o711)
        authorized.chmod(0o644)
        config = tmp / "sshd_config"
        config.write_text(_sshd_config(tmp, host_key, authorized))
        known_hosts = tmp / "known_hosts"
        known_hosts.write_text(f"{NODE_ADDR} {host_pub}\n")
        # sshd refuses to start without its privilege separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        _run(SSHD, "-t", "-f", str(config))

        with open(tmp / "sshd.log", "wb") as log:
            process = subprocess.Popen(
                [*ns, SSHD, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        try:
            _wait_for_port(NODE_ADDR, 22)
        except OSError as e:
            status = "running" if process.poll() is None else f"exited {process.returncode}"
            raise RuntimeError(
                f"throwaway sshd ({status}) did not answer on {NODE_ADDR}:22: {e}\n"
                f"sshd log:\n{(tmp / 'sshd.log').read_text(errors='replace')}"
            ) from e
        node = NodeSpec(
            name="itest",
            host=NODE_ADDR,
            port=22,
            user="root",
            key=client_key,
            known_hosts=known_hosts,
        )
        yield SshdServer(
            namespace=namespace, host_if=host_if, tmp=tmp, node=node, client_key=client_key,
            host_key=host_key, host_pubkey_line=host_pub, known_hosts=known_hosts, process=process,
            ca_key=ca_key, ca_pubkey_line=ca_pub, authorized_keys=authorized,
        )
    finally:
        # Session children (one per SSH connection) live in the namespace too; kill them all, then
        # the namespace and the veth, which goes with it but is deleted explicitly in case not.
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        _remove_namespace(namespace, host_if)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def sshd_server() -> Iterator[SshdServer]:
    if os.geteuid() != 0:
        pytest.skip("the throwaway sshd needs root for network namespaces")
    with throwaway_sshd() as server:
        yield server


@pytest.fixture(scope="session")
def sshd_node(sshd_server: SshdServer) -> NodeSpec:
    return sshd_server.node
