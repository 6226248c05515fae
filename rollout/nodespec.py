"""How to reach one node: the inventory's answer, which the transports and hooks read.

Kept apart from the inventory file's loader so that what reaches nodes (transport, node client,
checks, hooks) depends on this small record, not on how inventories are parsed.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagetool.errors import InputError

DEFAULT_USER = "root"
DEFAULT_PORT = 22
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"

# What a host and a user may be. They reach SSH (and, in hooks and checks, shell commands and
# environments): a leading '-' would read as an option, a space or newline would split a
# command line or a known_hosts line, an '@' would change who logs in where. A host is a name,
# an IPv4 or IPv6 address (with a %zone); a user is a POSIX login name.
HOST_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:%-]{0,252}$")
USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")
HOST_HINT = "a host name or address: letters, digits and '_.:%-', not starting with '-'"
USER_HINT = "a user name: letters, digits and '_.-', not starting with '-', at most 32"


def host_problem(host: object) -> str | None:
    """What is wrong with `host` as a node's address, or None."""
    if not isinstance(host, str) or not HOST_RE.match(host):
        return f"{host!r} is not {HOST_HINT}"
    return None


def user_problem(user: object) -> str | None:
    if not isinstance(user, str) or not USER_RE.match(user):
        return f"{user!r} is not {USER_HINT}"
    return None


@dataclass(frozen=True)
class NodeSpec:
    """How to reach one node. `host` is what is connected to; `name` is what operators call it."""

    name: str
    host: str
    port: int = DEFAULT_PORT
    user: str = DEFAULT_USER
    key: Path | None = None
    groups: tuple[str, ...] = ()
    vars: dict[str, Any] = field(default_factory=dict)
    proxy_jump: str | None = None
    known_hosts: Path = field(default_factory=lambda: Path(DEFAULT_KNOWN_HOSTS).expanduser())
    # Out-of-band power control run on the controller ({name} and {host} filled in), for a node
    # that stopped answering SSH: an IPMI, hypervisor or lab reset. None: wait for the node's own
    # dead-man switch instead.
    reset_command: str | None = None
    # An HTTP store (`imagetool publish`) this node pulls releases from itself, near it (a site's
    # mirror, a CDN); `--source` overrides it for a run. None: the controller sends what it lacks.
    source: str | None = None
    # From ssh_config (rollout.sshconfig), where the inventory is silent. The command that carries
    # the connection instead of TCP (%-tokens already expanded); mutually exclusive with
    # proxy_jump, which may list several hops "a,user@b:2222".
    proxy_command: str | None = None
    # More identity files to offer after `key`, and client certificates for them.
    identities: tuple[Path, ...] = ()
    certificates: tuple[Path, ...] = ()
    # Offer only `key` and `identities` (and their agent-held halves), no other agent keys.
    identities_only: bool = False
    # More known_hosts files read (never written): ssh_config's further UserKnownHostsFiles and
    # GlobalKnownHostsFiles. New keys are appended to `known_hosts`.
    known_hosts_also: tuple[Path, ...] = ()
    # StrictHostKeyChecking: None or "yes"/"ask" refuse an unknown key unless
    # --accept-new-host-keys; "accept-new", "no" and "off" add it. A changed key is always refused.
    strict_host_key_checking: str | None = None
    # The ssh config the node was resolved with (None: ssh's own default), for its jump hosts.
    ssh_config: str | None = field(default=None, compare=False)
    # `become`: a login user other than root runs the node helper as `become_user` through
    # `sudo -n` (the only become_method).
    become: bool = False
    become_user: str = DEFAULT_USER

    def __post_init__(self) -> None:
        # The inventory says which key is wrong; this holds for every NodeSpec, whoever made it.
        problem = host_problem(self.host) or user_problem(self.user) or user_problem(self.become_user)
        if problem:
            raise InputError(f"node {self.name}: {problem}")

    def __hash__(self) -> int:  # vars is a dict; a node's identity is its name
        return hash(self.name)

    @property
    def address(self) -> str:
        """host:port as operators read it in messages."""
        return f"{self.host}:{self.port}"

    def reset_argv(self) -> list[str] | None:
        """The reset command as an argv for subprocess.run, or None when the node has none.

        Only {name} and {host} are substituted (other braces are left alone), each as one
        shell-quoted word, so the command splits the same whatever the values contain.
        """
        if not self.reset_command:
            return None
        values = {"name": self.name, "host": self.host}
        command = re.sub(r"\{(name|host)\}", lambda m: shlex.quote(values[m.group(1)]), self.reset_command)
        return shlex.split(command)
