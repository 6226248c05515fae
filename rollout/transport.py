"""SSH to one node: run commands, push files. Knows nothing about images, batches or rollouts.

Built on paramiko; the connection is opened as OpenSSH would open it (rollout.sshconnect: jump
host chains, ProxyCommand, ssh-agent, known_hosts read by rollout.knownhosts). Host keys are
always verified; an unknown key is refused unless the operator asked to accept new keys
(--accept-new-host-keys, StrictHostKeyChecking accept-new), a changed or revoked key is always
refused. Every failure to reach a node is an `UnreachableError` (or its `HostKeyError`
subclass) that names the node, its address and the cause.
"""

from __future__ import annotations

import errno
import itertools
import logging
import select
import shlex
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import paramiko
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential

from imagetool.errors import InputError, NodeError, UnreachableError
from rollout.nodespec import NodeSpec
from rollout.sshconnect import JUMPS, Endpoint, jump_chain, open_ssh, proxy_command, tcp_socket

# paramiko's transport thread logs a traceback for every failed handshake, and a rebooting node
# (a VM behind a port forward, say) resets many; the transport raises its own clear error.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

# Flow control for the bytes we *receive* (command output): a window this large lets a chatty
# command run without waiting on window adjustments. What we can *send* per packet is the
# server's choice (OpenSSH: 32 KiB per session channel), so a larger packet size only helps
# reception.
WINDOW_SIZE = 64 * 1024 * 1024
MAX_PACKET_SIZE = 256 * 1024
# Ciphers in the order we offer them. AES-GCM is one AEAD call per packet in `cryptography`
# (AES-NI on the controller, and cheap for sshd too); CTR+HMAC costs a second pass over every
# byte in Python-driven code. chacha20-poly1305 is not implemented by paramiko.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
# put_file reads the file in blocks of this size and cuts them into channel packets.
READ_BLOCK = 4 * 1024 * 1024
STDERR_TAIL_LINES = 10


class CommandTimeoutError(NodeError):
    """A command on a node did not finish within its timeout."""


@dataclass
class CommandResult:
    command: str
    exit_status: int
    stdout: str
    stderr: str
    host: str = ""
    name: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def check(self, what: str) -> CommandResult:
        """Return self if the command succeeded, else raise NodeError saying what failed where."""
        if self.ok:
            return self
        status = (
            f"exit status {self.exit_status}" if self.exit_status >= 0
            else "no exit status (killed by a signal or the connection closed)"
        )
        tail = "\n".join(self.stderr.rstrip().splitlines()[-STDERR_TAIL_LINES:])
        raise NodeError(
            f"node {self.name} ({self.host}): {what} failed: `{self.command}` ended with {status}"
            + (f"; stderr:\n{tail}" if tail else " and printed nothing on stderr")
        )


ProgressFn = Callable[[int], None]


@runtime_checkable
class Transport(Protocol):
    """How the node client reaches one node: run a command, run a trusted shell script, append a
    file's bytes to a file there (pyinfra's connector, colmena's Host). `SSHTransport` is the
    production home; `rollout.local.LocalTransport` runs the same node helper against a
    directory on this machine, for unit tests and benches.

    Every failure to reach the node is an UnreachableError naming it; a command that overruns
    its timeout is a CommandTimeoutError."""

    # Seconds one connection attempt may take.
    connect_timeout: float

    @property
    def connected(self) -> bool:
        """A connection is open (it may still turn out dead on use, as after a reboot)."""
        ...

    def run(self, argv: list[str], *, timeout: float = 60) -> CommandResult:
        """Run argv on the node, each argument reaching the program exactly as given."""
        ...

    def run_shell(self, script: str, *, timeout: float = 60) -> CommandResult:
        """Run a trusted, literal shell script with the node's shell."""
        ...

    def put_file(self, local: Path, remote: str, *, offset: int = 0, progress: ProgressFn | None = None,
                 timeout: float = 600, receiver: str | None = None) -> int:
        """Append local[offset:] to `remote` on the node (offset 0 truncates it first); returns the
        bytes sent, calling `progress` with the bytes sent so far. `receiver`: the node command
        that writes its stdin there instead of `cat` (the helper, through sudo, for `become`)."""
        ...

    def reconnect(self, timeout: float) -> None:
        """Drop the connection and connect again within `timeout` seconds (after a reboot)."""
        ...

    def close(self) -> None: ...


def _is_network_error(exc: BaseException) -> bool:
    """Worth retrying: the node may be booting or the network flapping. Host key and
    authentication failures are answers, not accidents; retrying them only delays the report."""
    if isinstance(exc, socket.gaierror):
        return False  # a name that does not resolve will not resolve in a second either
    if isinstance(exc, (OSError, EOFError, paramiko.ssh_exception.ChannelException)):
        return True
    if isinstance(exc, (paramiko.AuthenticationException, paramiko.BadHostKeyException)):
        return False
    # sshd that is starting or overloaded (MaxStartups) drops us before or during the banner.
    return isinstance(exc, paramiko.SSHException) and (
        "banner" in str(exc).lower() or "error reading" in str(exc).lower()
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "connection timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (no sshd listening?)"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"{exc.strerror.lower() if exc.strerror else 'unreachable'}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class OpenConnections:
    """The SSH connections this process holds open, least recently used first. Beyond `limit`,
    the least recently used idle ones are closed: a transport connects again on its next use.

    A rollout of a thousand nodes would otherwise hold a connection to every node from its first
    status to its last unlock (each connection is a paramiko thread and its buffers, about 60 KiB
    in the controller). A fleet within the limit keeps every connection for the whole run; a
    larger one reconnects a node for each phase that reaches it. A connection running a command
    is never closed as idle, so the limit only bounds the idle ones."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: OrderedDict[SSHTransport, None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._open)

    def used(self, transport: SSHTransport) -> None:
        with self._lock:
            self._open[transport] = None
            self._open.move_to_end(transport)
            # `transport` is now the newest, so never among them while the limit is at least one.
            oldest = list(itertools.islice(self._open, max(0, len(self._open) - self.limit)))
        # Closed outside the lock: closing waits for the connection's thread.
        for t in oldest:
            t.close_if_idle()

    def forget(self, transport: SSHTransport) -> None:
        with self._lock:
            self._open.pop(transport, None)


CONNECTIONS = OpenConnections(limit=128)


class SSHTransport:
    """One SSH connection to one node, opened on first use and reused until `close`."""

    def __init__(
        self,
        node: NodeSpec,
        *,
        accept_new_host_keys: bool = False,
        connect_timeout: float = 10,
        connect_retries: int = 3,
    ) -> None:
        self.node = node
        self.accept_new_host_keys = accept_new_host_keys
        self.connect_timeout = connect_timeout
        self.connect_retries = max(1, connect_retries)
        self._ssh: paramiko.Transport | None = None
        # The jump host chain this transport rides in the shared pool, while connected.
        self._jump: tuple[Endpoint, ...] | None = None
        self._lock = threading.Lock()
        # Commands running on the connection now: it is not idle (rollout.transport.CONNECTIONS).
        self._busy = 0

    # --- identity ---------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.node.host

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def label(self) -> str:
        return f"{self.node.name} ({self.node.host}:{self.node.port})"

    def __repr__(self) -> str:
        return f"SSHTransport({self.label})"

    def __enter__(self) -> SSHTransport:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- connection -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        t = self._ssh
        return bool(t and t.is_active() and t.is_authenticated())

    def connect(self) -> None:
        """Connect and authenticate unless already connected; retries network errors only."""
        with self._lock:
            self._connect_locked()
        CONNECTIONS.used(self)

    def _connect_locked(self) -> None:
        if self.connected:
            return
        self._close_locked()
        budget = self.connect_timeout * self.connect_retries
        self._connect_retrying(stop=stop_after_attempt(self.connect_retries) | stop_after_delay(budget),
                               deadline=time.monotonic() + budget)

    def reconnect(self, timeout: float) -> None:
        """Drop the connection and connect again, retrying until `timeout` seconds have passed.

        For after a reboot: the node is down for a while, then sshd comes back.
        """
        with self._lock:
            self._close_locked()
            self._connect_retrying(stop=stop_after_delay(timeout), deadline=time.monotonic() + timeout)
        CONNECTIONS.used(self)

    def _connect_retrying(self, *, stop, deadline: float) -> None:  # type: ignore[no-untyped-def]
        try:
            for attempt in Retrying(
                stop=stop,
                wait=wait_exponential(multiplier=0.5, max=5),
                retry=retry_if_exception(_is_network_error),
                reraise=True,
            ):
                with attempt:
                    # No single attempt may outlive the overall budget.
                    remaining = max(0.5, min(self.connect_timeout, deadline - time.monotonic()))
                    self._connect_once(remaining)
        except UnreachableError as e:  # HostKeyError too; a jump host's says which hop
            if str(e).startswith(f"node {self.label}"):
                raise
            raise type(e)(f"node {self.label}: {e}") from None
        except paramiko.AuthenticationException as e:
            how = f"key {self.node.key}" if self.node.key else "ssh-agent and default keys"
            raise UnreachableError(
                f"node {self.label}: authentication as {self.node.user!r} failed with {how}: {e}"
            ) from None
        except Exception as e:  # noqa: BLE001 - every connect failure is reported the same way
            raise UnreachableError(f"node {self.label}: cannot connect: {_describe(e)}") from e

    def _connect_once(self, timeout: float) -> None:
        node = self.node
        if node.key is not None and not Path(node.key).is_file():
            raise UnreachableError(f"node {self.label}: key file {node.key} does not exist")
        endpoint = Endpoint.of_node(node, f"node {self.label}", self.accept_new_host_keys)
        jump = None
        if node.proxy_jump:
            chain = jump_chain(node, self.accept_new_host_keys)
            sock, jump = JUMPS.channel(chain, node.host, node.port, timeout, _fast_transport)
        elif node.proxy_command:
            sock = proxy_command(node.proxy_command, timeout)
        else:
            sock = tcp_socket(node.host, node.port, timeout)
        try:
            t = open_ssh(endpoint, sock, timeout, _fast_transport)
        except BaseException:
            sock.close()
            if jump is not None:
                JUMPS.release(jump)
            raise
        # Notice a node that vanished (a reset, a cable) instead of hanging on a dead TCP stream.
        t.set_keepalive(15)
        self._ssh, self._jump = t, jump

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def close_if_idle(self) -> bool:
        """Close the connection unless a command is running on it (or it is being opened)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self._busy:
                return False
            self._close_locked()
            return True
        finally:
            self._lock.release()

    def _close_locked(self) -> None:
        CONNECTIONS.forget(self)
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        if self._jump is not None:
            JUMPS.release(self._jump)
            self._jump = None

    def _session(self, timeout: float) -> paramiko.Channel:
        """A new channel for one command; the connection counts as busy until `_done`."""
        with self._lock:
            self._connect_locked()
            assert self._ssh is not None
            ssh = self._ssh
            self._busy += 1
        CONNECTIONS.used(self)
        try:
            return ssh.open_session(timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as e:
            self._done()
            raise UnreachableError(f"node {self.label}: cannot open a session: {_describe(e)}") from e
        except BaseException:
            self._done()
            raise

    def _done(self) -> None:
        with self._lock:
            self._busy -= 1

    # --- commands ---------------------------------------------------------------------------

    def run(
        self,
        argv: list[str],
        *,
        timeout: float = 60,
        input: bytes | None = None,
        check: bool = False,
    ) -> CommandResult:
        """Run argv on the node. Each argument reaches the program exactly as given: the remote
        command line is built with shlex.join, so no value is ever interpreted by the shell."""
        if not isinstance(argv, (list, tuple)) or not argv or not all(isinstance(a, str) for a in argv):
            raise InputError(f"node {self.label}: run() needs a non-empty list of strings, got {argv!r}")
        return self._exec(shlex.join(argv), timeout=timeout, input=input, check=check)

    def run_shell(self, script: str, *, timeout: float = 60, check: bool = False) -> CommandResult:
        """Run a trusted, literal shell script (e.g. a health check command from the release or
        inventory) with the node's login shell. Never build `script` from untrusted values."""
        return self._exec(script, timeout=timeout, input=None, check=check)

    def _exec(self, command: str, *, timeout: float, input: bytes | None, check: bool) -> CommandResult:
        deadline = time.monotonic() + timeout
        chan = self._session(timeout)
        out: list[bytes] = []
        err: list[bytes] = []
        try:
            chan.settimeout(timeout)
            chan.exec_command(command)
            if input:
                chan.sendall(input)
            # EOF on stdin so commands that read it (cat, sh -s) finish.
            chan.shutdown_write()
            self._drain(chan, out, err, deadline)
            status = chan.recv_exit_status()
        except TimeoutError:
            # The channel is closed below: sshd then closes the command's pipes. There is no
            # public paramiko call for the "signal" request, and OpenSSH ignores it for root
            # logins anyway, so commands that must be bounded on the node are wrapped in
            # timeout(1) by their callers.
            raise CommandTimeoutError(
                f"node {self.label}: `{command}` did not finish within {timeout:g}s"
            ) from None
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise UnreachableError(
                f"node {self.label}: connection lost while running `{command}`: {_describe(e)}"
            ) from e
        finally:
            chan.close()
            self._done()
        result = CommandResult(
            command=command,
            exit_status=status,
            stdout=b"".join(out).decode("utf-8", "replace"),
            stderr=b"".join(err).decode("utf-8", "replace"),
            host=self.node.host,
            name=self.node.name,
        )
        if check:
            result.check("command")
        return result

    @staticmethod
    def _drain(chan: paramiko.Channel, out: list[bytes], err: list[bytes], deadline: float) -> None:
        """Read stdout and stderr until EOF and the exit status are in, or the deadline passes.
        Both streams are read together so neither can fill up and stall the command."""
        while not chan.eof_received or chan.recv_ready() or chan.recv_stderr_ready():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            # The channel's fileno is an event pipe paramiko sets when data or EOF arrives.
            select.select([chan], [], [], min(remaining, 1.0))
            while chan.recv_ready():
                out.append(chan.recv(1 << 20))
            while chan.recv_stderr_ready():
                err.append(chan.recv_stderr(1 << 20))
            if chan.closed:
                break
        if not chan.status_event.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError

    # --- files ------------------------------------------------------------------------------

    def put_file(
        self,
        local: Path,
        remote: str,
        *,
        offset: int = 0,
        progress: Callable[[int], None] | None = None,
        timeout: float = 600,
        receiver: str | None = None,
    ) -> int:
        """Send local[offset:] to the node and append it to `remote` (offset 0 truncates it).

        Returns the bytes sent; `progress` is called with the bytes sent so far by this call.
        An exec channel running `cat` beats SFTP here: no per-write request/acknowledge round
        trips, and sshd just copies the stream into the file.
        """
        local = Path(local)
        size, command = upload_command(local, remote, offset)
        command = receiver or command
        deadline = time.monotonic() + timeout
        chan = self._session(min(timeout, self.connect_timeout))
        sent = 0
        err: list[bytes] = []
        try:
            chan.settimeout(timeout)
            chan.exec_command(command)
            packet = max(1024, chan.out_max_packet_size - 64)
            with open(local, "rb", buffering=0) as f:
                f.seek(offset)
                buf = bytearray(READ_BLOCK)
                view = memoryview(buf)
                while True:
                    n = f.readinto(buf)
                    if not n:
                        break
                    pos = 0
                    while pos < n:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise TimeoutError
                        chan.settimeout(remaining)
                        # One packet's worth at a time: Channel.sendall re-slices (copies) the
                        # whole rest of its buffer after every packet.
                        k = chan.send(view[pos:min(n, pos + packet)])
                        if k == 0:
                            raise EOFError("the remote side closed the channel")
                        pos += k
                    sent += n
                    if progress is not None:
                        progress(sent)
            chan.shutdown_write()
            self._drain(chan, [], err, deadline)
            status = chan.recv_exit_status()
        except TimeoutError:
            # The channel is closed below: sshd then closes the command's pipes. There is no
            # public paramiko call for the "signal" request, and OpenSSH ignores it for root
            # logins anyway, so commands that must be bounded on the node are wrapped in
            # timeout(1) by their callers.
            raise CommandTimeoutError(
                f"node {self.label}: sending {local} to {remote} did not finish within {timeout:g}s "
                f"({sent} of {size - offset} bytes sent)"
            ) from None
        except EOFError as e:
            status = chan.recv_exit_status() if chan.exit_status_ready() else -1
            err.append(chan.recv_stderr(1 << 16) if chan.recv_stderr_ready() else b"")
            raise NodeError(
                f"node {self.label}: `{command}` stopped reading after {sent} bytes "
                f"(exit status {status}): {b''.join(err).decode('utf-8', 'replace').strip() or e}"
            ) from None
        except (paramiko.SSHException, OSError) as e:
            raise UnreachableError(
                f"node {self.label}: connection lost while sending {local} to {remote} "
                f"after {sent} bytes: {_describe(e)}"
            ) from e
        finally:
            chan.close()
            self._done()
        CommandResult(
            command=command, exit_status=status, stdout="",
            stderr=b"".join(err).decode("utf-8", "replace"), host=self.node.host, name=self.node.name,
        ).check(f"writing {remote}")
        return sent


def _fast_transport(sock: socket.socket | paramiko.Channel, **kwargs: object) -> paramiko.Transport:
    """paramiko's Transport with a big receive window and the fastest ciphers offered first."""
    t = paramiko.Transport(
        sock,
        default_window_size=WINDOW_SIZE,
        default_max_packet_size=MAX_PACKET_SIZE,
        **kwargs,  # type: ignore[arg-type]
    )
    opts = t.get_security_options()
    supported = list(opts.ciphers)
    opts.ciphers = [c for c in PREFERRED_CIPHERS if c in supported] + [
        c for c in supported if c not in PREFERRED_CIPHERS
    ]
    return t


def upload_command(local: Path, remote: str, offset: int) -> tuple[int, str]:
    """The size of `local` and the node command that appends what follows `offset` to `remote`
    (offset 0 truncates it): `cat`, whose stdin is the bytes. Every transport writes files so."""
    try:
        size = local.stat().st_size
    except OSError as e:
        raise InputError(f"{local}: cannot read: {e.strerror or e}") from None
    if offset < 0 or offset > size:
        raise InputError(f"{local}: offset {offset} is outside the file (size {size})")
    return size, f"cat {'>>' if offset else '>'} {shlex.quote(remote)}"
