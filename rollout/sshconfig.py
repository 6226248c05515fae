"""What OpenSSH's client configuration says about one host, asked of OpenSSH itself.

`ssh -G HOST` prints the settings ssh would use after everything OpenSSH does to a config:
Include (globs, relative to ~/.ssh), Match (host, originalhost, user, localuser, exec, all,
canonical, final), Host patterns with negation, first obtained value wins, the system-wide
config. Re-implementing that grammar would be a second copy that drifts from the real one (as
paramiko's, which lacks Include, did), so the controller runs `ssh -G` (openssh-client is a
requirement) with an argv list, `-F` naming the config, and a host already validated as a name.

`ssh -G` prints defaults as well as configured values; what the inventory falls back to must
tell them apart (imagetool's default user is root, not the local user), so each value is
compared with what `ssh -G -F /dev/null` prints. `ssh -G` leaves the %-tokens of IdentityFile,
CertificateFile and ProxyCommand to connection time; `expand_tokens` does that step, the way
ssh(1)'s TOKENS section lists them.
"""

from __future__ import annotations

import functools
import getpass
import hashlib
import os
import re
import shutil
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from imagetool.errors import InputError

SSH = "ssh"
RESOLVE_TIMEOUT = 30
PARALLEL = 8
STRICT_VALUES = ("yes", "accept-new", "no", "off", "ask")


@dataclass(frozen=True)
class HostConfig:
    """The settings ssh_config gives one host; None or empty where the config is silent."""

    alias: str
    hostname: str
    user: str | None = None
    port: int | None = None
    identity_files: tuple[str, ...] = ()  # tokens not yet expanded (they need the final user)
    certificate_files: tuple[str, ...] = ()
    identities_only: bool = False
    proxy_jump: str | None = None
    proxy_command: str | None = None  # tokens not yet expanded
    user_known_hosts: tuple[Path, ...] = ()
    global_known_hosts: tuple[Path, ...] = ()
    strict_host_key_checking: str | None = None

    @property
    def has_hostname(self) -> bool:
        """A HostName line applied (ssh -G echoes the alias, lowercased, when none did)."""
        return self.hostname != self.alias.lower()


def _run_ssh_g(alias: str, config: str | None, user: str | None, port: int | None) -> dict[str, list[str]]:
    if not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.:%-]*$", alias):
        raise InputError(f"{alias!r} cannot be looked up in the ssh config: not a host name")
    ssh = shutil.which(SSH)
    if ssh is None:
        raise InputError("reading the ssh config needs OpenSSH's `ssh` (package openssh-client); "
                         "install it, or set IMAGETOOL_SSH_CONFIG=/dev/null to use none")
    # No -F: ssh reads ~/.ssh/config and the system-wide /etc/ssh/ssh_config, as `ssh HOST` does.
    argv = [ssh, "-G", *(["-F", config] if config else [])]
    if user:
        argv += ["-l", user]
    if port:
        argv += ["-p", str(port)]
    argv += ["--", alias]
    try:
        proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=RESOLVE_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise InputError(f"ssh config {config or '~/.ssh/config'}: `ssh -G {alias}` took over {RESOLVE_TIMEOUT}s "
                         "(a Match exec that hangs?)") from None
    if proc.returncode != 0:
        why = " ".join(line for line in proc.stderr.splitlines() if "Pseudo-terminal" not in line).strip()
        raise InputError(f"ssh config {config or '~/.ssh/config'}: cannot resolve {alias!r}: "
                         f"{why or f'ssh -G exit {proc.returncode}'}")
    out: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        out.setdefault(key.lower(), []).append(value)
    return out


@functools.lru_cache(maxsize=1)
def _defaults() -> dict[str, list[str]]:
    return _run_ssh_g("imagetool-defaults", os.devnull, None, None)


@functools.cache
def resolve(alias: str, config: str | None, user: str | None = None, port: int | None = None) -> HostConfig:
    """The ssh config's settings for `alias` (as `ssh -F config [-l user] [-p port] alias`
    would see it: the inventory's user and port are ssh's command line, so Match user sees them)."""
    got = _run_ssh_g(alias, config, user, port)
    base = _defaults()

    def configured(key: str) -> list[str]:
        value = got.get(key, [])
        return [] if value == base.get(key, []) else value

    def one(key: str) -> str | None:
        value = configured(key)
        return value[0] if value else None

    def files(key: str) -> tuple[Path, ...]:
        return tuple(Path(p) for v in configured(key) for p in v.split())

    port_text = one("port")
    jump = one("proxyjump")
    command = one("proxycommand")
    strict = one("stricthostkeychecking")
    # ssh -G prints booleans as true/false; StrictHostKeyChecking yes prints as "true".
    strict = {"true": "yes", "false": "no"}.get(strict, strict) if strict else None
    return HostConfig(
        alias=alias,
        hostname=(got.get("hostname") or [alias.lower()])[0],
        user=one("user"),
        port=int(port_text) if port_text else None,
        identity_files=tuple(configured("identityfile")),
        certificate_files=tuple(configured("certificatefile")),
        identities_only=(got.get("identitiesonly") or ["no"])[0] in ("yes", "true"),
        proxy_jump=None if jump in (None, "none") else jump,
        proxy_command=None if command in (None, "none") else command,
        user_known_hosts=files("userknownhostsfile"),
        global_known_hosts=tuple(Path(p) for v in got.get("globalknownhostsfile", []) for p in v.split()),
        strict_host_key_checking=strict,
    )


def resolve_all(lookups: list[tuple[str, str | None, str | None, int | None]]) -> None:
    """Resolve many hosts at once (one `ssh -G` each, a few milliseconds of CPU, run side by side
    so that an inventory of thousands loads in seconds); `resolve` then answers from its cache.
    Failures are left for `resolve` to raise again, in the inventory's order."""
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        for future in [pool.submit(resolve, *lookup) for lookup in dict.fromkeys(lookups)]:
            future.exception()


def expand_tokens(text: str, *, host: str, port: int, user: str, alias: str, what: str) -> str:
    """ssh(1)'s %-tokens in IdentityFile, CertificateFile and ProxyCommand: %h host, %p port,
    %r remote user, %n the name as typed, %u local user, %d local home, %l/%L local host name,
    %i uid, %C connection hash, %%. An unknown token is an error, as in ssh."""
    local_host = socket.gethostname()
    values = {
        "%": "%", "h": host, "p": str(port), "r": user, "n": alias, "u": getpass.getuser(),
        "d": os.path.expanduser("~"), "l": local_host, "L": local_host.split(".")[0], "i": str(os.getuid()),
        "C": hashlib.sha1(f"{local_host}{host}{port}{user}".encode()).hexdigest(), "k": host,
    }

    def sub(m: re.Match[str]) -> str:
        token = m.group(1)
        if token not in values:
            raise InputError(f"ssh config: {what} {text!r}: unknown token %{token}")
        return values[token]

    return re.sub(r"%(.?)", sub, text)


def expand_path(text: str, **tokens: str | int) -> Path:
    return Path(os.path.expanduser(expand_tokens(text, **tokens)))  # type: ignore[arg-type]


def parse_hop(spec: str, default_user: str) -> tuple[str, str, int]:
    """One ProxyJump hop, [user@]host[:port] or [user@][v6addr]:port -> (user, host, port)."""
    user, _, hostport = spec.rpartition("@")
    host, port = hostport, 22
    if hostport.startswith("["):
        inner, _, rest = hostport[1:].partition("]")
        host = inner
        if rest.startswith(":"):
            port = int(rest[1:])
    elif hostport.count(":") == 1:
        host, _, p = hostport.partition(":")
        port = int(p)
    if not host or not 0 < port < 65536:
        raise ValueError(spec)
    return user or default_user, host, port
