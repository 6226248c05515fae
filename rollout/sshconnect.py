"""Opening one authenticated SSH connection the way OpenSSH would: the socket (TCP, a
ProxyCommand, or a channel through a chain of jump hosts), the host key judged against every
known_hosts file (rollout.knownhosts), then public keys: the named files, their halves held by
ssh-agent, the agent's other keys unless IdentitiesOnly, client certificates beside them.

paramiko's SSHClient does each of these its own way (one known_hosts file that a marker line
breaks, the agent only when no key file is named); here they follow ssh(1), on paramiko's
Transport. Jump hosts are shared: every node behind the same resolved chain of hops rides one
connection per hop (`JumpPool`), as a ControlMaster would.
"""

from __future__ import annotations

import base64
import binascii
import os
import shlex
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from imagetool.errors import HostKeyError, UnreachableError
from rollout.knownhosts import ChangedHostKey, KnownHosts, append, known_hosts_name
from rollout.nodespec import NodeSpec
from rollout.sshconfig import expand_path, parse_hop, resolve

# What ssh offers when no IdentityFile is configured (the ones paramiko can use).
DEFAULT_IDENTITIES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
SOCKET_BUFFER = 4 * 1024 * 1024
ACCEPT_NEW = ("accept-new", "no", "off")


@dataclass(frozen=True)
class Endpoint:
    """One SSH server to log in to (a node or a jump host), as resolved: hashable, so a chain of
    them names a shared jump connection."""

    label: str = field(compare=False)  # "node web1 (10.0.0.1:22)", "jump host u@j1:22": for messages
    host: str
    port: int
    user: str
    keys: tuple[Path, ...]
    certificates: tuple[Path, ...]
    identities_only: bool
    known_hosts: tuple[Path, ...]  # the first one receives accepted keys
    accept_new: bool

    @classmethod
    def of_node(cls, node: NodeSpec, label: str, accept_new: bool) -> Endpoint:
        return cls(
            label=label, host=node.host, port=node.port, user=node.user,
            keys=tuple(k for k in (node.key, *node.identities) if k is not None),
            certificates=node.certificates, identities_only=node.identities_only,
            known_hosts=(Path(node.known_hosts).expanduser(), *node.known_hosts_also),
            accept_new=accept_new or node.strict_host_key_checking in ACCEPT_NEW,
        )


def jump_chain(node: NodeSpec, accept_new: bool) -> tuple[Endpoint, ...]:
    """The node's ProxyJump hops, first to last, each resolved through the ssh config (HostName,
    User, Port, IdentityFile) like `ssh -J`; a hop the config says nothing about is reached
    with the node's user, keys and known_hosts."""
    if not node.proxy_jump:
        return ()
    hops = []
    for hop in node.proxy_jump.split(","):
        given_user, host, port = parse_hop(hop, "")
        cfg = resolve(host, node.ssh_config, given_user or None, port if port != 22 else None)
        user = given_user or cfg.user or node.user
        port = port if port != 22 else (cfg.port or 22)
        keys = tuple(p for p in (expand_path(f, host=cfg.hostname, port=port, user=user, alias=host,
                                             what="IdentityFile") for f in cfg.identity_files) if p.is_file())
        hops.append(Endpoint(
            label=f"jump host {user}@{cfg.hostname}:{port}", host=cfg.hostname, port=port,
            user=user, keys=keys or tuple(k for k in (node.key, *node.identities) if k is not None),
            certificates=node.certificates, identities_only=cfg.identities_only or node.identities_only,
            known_hosts=(Path(node.known_hosts).expanduser(), *node.known_hosts_also),
            accept_new=accept_new or node.strict_host_key_checking in ACCEPT_NEW,
        ))
    return tuple(hops)


def tcp_socket(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A big send buffer keeps the kernel busy while Python encrypts the next packet.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    return sock


def proxy_command(command: str, timeout: float) -> paramiko.ProxyCommand:
    """ProxyCommand as ssh runs it: by the shell, `exec`ed, its stdin and stdout the connection."""
    shell = os.environ.get("SHELL") or "/bin/sh"
    proxy = paramiko.ProxyCommand(shlex.join([shell, "-c", f"exec {command}"]))
    proxy.settimeout(timeout)
    return proxy


def open_ssh(ep: Endpoint, sock: socket.socket | paramiko.Channel | paramiko.ProxyCommand, timeout: float,
             make_transport) -> paramiko.Transport:  # type: ignore[no-untyped-def]
    """Handshake, host key check and authentication over `sock`; the caller closes `sock` on error."""
    kh = KnownHosts.load(ep.known_hosts)
    name = known_hosts_name(ep.host, ep.port)
    t = make_transport(sock)
    try:
        # Ask for the key types known_hosts holds for this host first (certificates first when a
        # CA is trusted for it), as ssh orders HostKeyAlgorithms: otherwise a host known by its
        # ECDSA key that also has an Ed25519 key would look changed.
        preferred = [k for k in kh.key_types(name) if k in t._key_info]
        if preferred:
            opts = t.get_security_options()
            opts.key_types = tuple(dict.fromkeys([*preferred, *opts.key_types]))
        t.banner_timeout = t.auth_timeout = timeout
        t.start_client(timeout=timeout)
        check_host_key(ep, kh, t.get_remote_server_key())
        authenticate(t, ep, timeout)
    except BaseException:
        t.close()
        raise
    return t


def check_host_key(ep: Endpoint, kh: KnownHosts, key: paramiko.PKey) -> None:
    name = known_hosts_name(ep.host, ep.port)
    try:
        verdict = kh.check(ep.host, ep.port, key)
    except ChangedHostKey as e:
        raise HostKeyError(
            f"{ep.label}: {e} — refusing; someone may be intercepting the connection, or the "
            f"node was reinstalled: check, then remove the old key from {e.entry.path}"
        ) from None
    except HostKeyError as e:
        raise HostKeyError(f"{ep.label}: {e}") from None
    if verdict != "unknown":
        return
    if kh.has_ca_for(name):
        raise HostKeyError(
            f"{ep.label}: a @cert-authority line in {', '.join(map(str, ep.known_hosts))} trusts a CA for "
            f"{name}, but the node presented a plain host key ({key.get_name()} {key.fingerprint}), no "
            "certificate, and no plain entry matches it; give its sshd a HostCertificate or add the key"
        )
    if not ep.accept_new:
        skipped = f" ({len(kh.skipped)} unreadable line(s) skipped, first: {kh.skipped[0]})" if kh.skipped else ""
        raise HostKeyError(
            f"{ep.label}: host key is not in {', '.join(map(str, ep.known_hosts))} "
            f"({key.get_name()} {key.fingerprint}){skipped}; add it or pass --accept-new-host-keys"
        )
    append(ep.known_hosts[0], name, key)


# --- authentication -----------------------------------------------------------------------------


def _agent() -> paramiko.Agent | None:
    if not os.environ.get("SSH_AUTH_SOCK"):
        return None
    try:
        return paramiko.Agent()
    except paramiko.SSHException:
        return None  # a stale SSH_AUTH_SOCK: no agent, as for ssh


def _public_half(path: Path) -> bytes | None:
    """The key blob of `path`'s .pub file (how an encrypted key is found in the agent)."""
    try:
        return base64.b64decode(Path(f"{path}.pub").read_text().split()[1])
    except (OSError, IndexError, ValueError, binascii.Error):
        return None


def _with_certificate(key: paramiko.PKey, path: Path, certificates: tuple[Path, ...]) -> paramiko.PKey:
    """Attach a client certificate for this key: CertificateFile, or ssh's KEY-cert.pub beside it."""
    for cert in (*certificates, Path(f"{path}-cert.pub")):
        if cert.is_file():
            try:
                key.load_certificate(str(cert))
                return key
            except ValueError:
                continue  # a certificate for another key
    return key


def identities(ep: Endpoint, agent: list[paramiko.AgentKey]) -> tuple[list[tuple[str, paramiko.PKey]], list[str]]:
    """The keys to offer, in ssh's order (named files, each through the agent when it holds them,
    then the agent's other keys unless IdentitiesOnly), and why named keys could not be used."""
    by_blob = {k.asbytes(): k for k in agent}
    offered: list[tuple[str, paramiko.PKey]] = []
    problems: list[str] = []
    files = list(ep.keys)
    if not files and not ep.identities_only:
        files = [p for p in (Path(os.path.expanduser(f)) for f in DEFAULT_IDENTITIES) if p.is_file()]
    for path in files:
        blob = _public_half(path)
        if blob in by_blob:
            offered.append((f"{path} (held by ssh-agent)", by_blob[blob]))
            continue
        try:
            key = paramiko.PKey.from_path(path)
        except (paramiko.PasswordRequiredException, TypeError) as e:
            if isinstance(e, TypeError) and "password" not in str(e).lower():
                problems.append(f"{path}: {e}")
                continue
            problems.append(f"{path} needs a passphrase and ssh-agent does not hold it (ssh-add {path})")
            continue
        except FileNotFoundError:
            problems.append(f"key file {path} does not exist")
            continue
        except (paramiko.SSHException, OSError, ValueError) as e:
            problems.append(f"{path}: cannot load: {e}")
            continue
        offered.append((str(path), _with_certificate(key, path, ep.certificates)))
    if not ep.identities_only or not ep.keys:
        seen = {k.asbytes() for _, k in offered}
        offered += [(f"ssh-agent key {k.comment or k.fingerprint}", k) for k in agent if k.asbytes() not in seen]
    return offered, problems


def authenticate(t: paramiko.Transport, ep: Endpoint, timeout: float) -> None:
    agent = _agent()
    try:
        offered, problems = identities(ep, list(agent.get_keys()) if agent else [])
        tried = []
        for what, key in offered:
            try:
                t.auth_publickey(ep.user, key)
                return
            except paramiko.BadAuthenticationType as e:
                raise paramiko.AuthenticationException(
                    f"the server does not take public keys (it allows {', '.join(e.allowed_types)})") from None
            except paramiko.AuthenticationException:
                tried.append(what)
    finally:
        if agent is not None:
            agent.close()  # agent keys sign through it: only once authentication is over
    detail = "; ".join(([f"refused: {', '.join(tried)}"] if tried else []) + problems)
    raise paramiko.AuthenticationException(detail or "no key to offer (no key file, no ssh-agent key)")


# --- shared jump hosts --------------------------------------------------------------------------


class JumpPool:
    """One connection per jump host chain, shared by every node behind it and closed when the
    last of them lets go. Keyed by the chain of resolved hops up to and including that hop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._transports: dict[tuple[Endpoint, ...], paramiko.Transport] = {}
        self._users: dict[tuple[Endpoint, ...], int] = {}
        self._locks: dict[tuple[Endpoint, ...], threading.Lock] = {}

    def channel(self, chain: tuple[Endpoint, ...], host: str, port: int, timeout: float,
                make_transport) -> tuple[paramiko.Channel, tuple[Endpoint, ...]]:  # type: ignore[no-untyped-def]
        """A direct-tcpip channel to host:port through the chain (connecting the hops that are
        not up yet); returns it and the chain, which the caller `release`s when done."""
        with self._lock:
            self._users[chain] = self._users.get(chain, 0) + 1
        try:
            last = self._transport(chain, timeout, make_transport)
            # A ChannelException (the node refuses or is down: rebooting behind its jump host)
            # is left as it is: the transport retries it like a refused TCP connection.
            chan = last.open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=timeout)
        except BaseException:
            self.release(chain)  # the last one out closes the hops it alone opened
            raise
        return chan, chain

    def _transport(self, chain: tuple[Endpoint, ...], timeout: float, make_transport) -> paramiko.Transport:  # type: ignore[no-untyped-def]
        with self._lock:
            lock = self._locks.setdefault(chain, threading.Lock())
        with lock:  # one connection per chain, even when many nodes ask at once
            t = self._transports.get(chain)
            if t is not None and t.is_active():
                return t
            ep = chain[-1]
            if len(chain) == 1:
                sock: socket.socket | paramiko.Channel = tcp_socket(ep.host, ep.port, timeout)
            else:
                prev = self._transport(chain[:-1], timeout, make_transport)
                sock = prev.open_channel("direct-tcpip", (ep.host, ep.port), ("127.0.0.1", 0), timeout=timeout)
            try:
                t = open_ssh(ep, sock, timeout, make_transport)
            except paramiko.AuthenticationException as e:
                sock.close()
                raise UnreachableError(f"{ep.label}: authentication as {ep.user!r} failed: {e}") from None
            except BaseException:
                sock.close()
                raise
            t.set_keepalive(15)
            self._transports[chain] = t
            return t

    def release(self, chain: tuple[Endpoint, ...]) -> None:
        """A node behind `chain` is done with it; the last one out closes every hop."""
        with self._lock:
            self._users[chain] = self._users.get(chain, 1) - 1
            if self._users[chain] > 0:
                return
            del self._users[chain]
            closing = [c for c in self._transports if c == chain[:len(c)]
                       and not any(u[:len(c)] == c for u in self._users)]
            for c in sorted(closing, key=len, reverse=True):
                self._transports.pop(c).close()

    def open_chains(self) -> int:
        with self._lock:
            return sum(1 for t in self._transports.values() if t.is_active())


JUMPS = JumpPool()
