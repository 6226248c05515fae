"""known_hosts as OpenSSH reads it: which host keys a node may present.

paramiko's HostKeys reads one file and stops at the first line it cannot decode (an
`@cert-authority` line made every node unreachable with "Incorrect padding"). Here every line is
judged on its own, as sshd(8) "SSH_KNOWN_HOSTS FILE FORMAT" describes it: hashed names
(`|1|salt|hash`), patterns with `*`, `?` and `!` negation, `[host]:port`, several names per line,
`@revoked` keys (refused wherever they appear) and `@cert-authority` lines (a host certificate
signed by that CA is trusted for the names the line matches). A line that cannot be read is
skipped and remembered, never fatal for the others.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from imagetool.errors import HostKeyError

CERT_HOST = 2  # the certificate type of a host certificate (PROTOCOL.certkeys)


def known_hosts_name(host: str, port: int) -> str:
    """How OpenSSH names a host in known_hosts: bare for port 22, `[host]:port` otherwise."""
    return host if port == 22 else f"[{host}]:{port}"


@dataclass(frozen=True)
class Entry:
    """One readable line: its marker (None, "revoked", "cert-authority"), names and key."""

    path: Path
    line: int
    marker: str | None
    names: str
    key_type: str
    blob: bytes

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def matches(self, name: str) -> bool:
        """OpenSSH's match_hostname_list: a negated pattern that matches wins over everything."""
        if self.names.startswith("|1|"):
            return _hashed_match(self.names, name)
        matched = False
        for pattern in self.names.split(","):
            negated = pattern.startswith("!")
            pattern = pattern[1:] if negated else pattern
            if _pattern_match(pattern.lower(), name.lower()):
                if negated:
                    return False
                matched = True
        return matched


def _pattern_match(pattern: str, name: str) -> bool:
    # Only '*' and '?' are special in OpenSSH patterns; fnmatch's '[' must match literally
    # (it starts every "[host]:port" name).
    if "*" not in pattern and "?" not in pattern:
        return pattern == name
    return fnmatch.fnmatchcase(name, pattern.replace("[", "[[]"))


def _hashed_match(names: str, name: str) -> bool:
    try:
        _, _, salt, digest = names.split("|", 3)
        salt_b, digest_b = base64.b64decode(salt, validate=True), base64.b64decode(digest, validate=True)
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(hmac.new(salt_b, name.encode(), hashlib.sha1).digest(), digest_b)


@dataclass
class KnownHosts:
    """The entries of one or more known_hosts files (missing files count as empty)."""

    files: tuple[Path, ...]
    entries: list[Entry] = field(default_factory=list)
    # Lines skipped as unreadable, "file:line: why", for messages that explain a refusal.
    skipped: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, files: tuple[Path, ...] | list[Path]) -> KnownHosts:
        kh = cls(tuple(files))
        for path in kh.files:
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                continue
            except OSError as e:
                raise HostKeyError(f"cannot read known_hosts file {path}: {e.strerror or e}") from None
            for number, raw in enumerate(text.splitlines(), 1):
                entry = _parse_line(path, number, raw, kh.skipped)
                if entry is not None:
                    kh.entries.append(entry)
        return kh

    def key_types(self, name: str) -> list[str]:
        """Key types known for `name`, certificate types first when a CA is trusted for it (the
        host key algorithms to prefer, as OpenSSH orders them)."""
        cas = any(e.marker == "cert-authority" and e.matches(name) for e in self.entries)
        plain = [e.key_type for e in self.entries if e.marker is None and e.matches(name)]
        certs = [f"{t}-cert-v01@openssh.com" for t in _HOST_KEY_TYPES] if cas else []
        return list(dict.fromkeys(certs + plain))

    def has_ca_for(self, name: str) -> bool:
        return any(e.marker == "cert-authority" and e.matches(name) for e in self.entries)

    def check(self, host: str, port: int, key: paramiko.PKey) -> str:
        """Judge the key a server presented: "known" (or "certified") when trusted, "unknown";
        raises HostKeyError for a revoked key and a changed one."""
        name = known_hosts_name(host, port)
        blob = key.asbytes()
        cert = key.public_blob.key_blob if key.public_blob is not None else None
        for e in self.entries:
            if e.marker == "revoked" and e.blob in (blob, cert):
                raise HostKeyError(
                    f"{name} presented a REVOKED host key ({key.get_name()} {key.fingerprint}): "
                    f"marked @revoked at {e.where}; refusing"
                )
        if cert is not None:
            ca = _cert_ca_blob(cert)
            for e in self.entries:
                if e.marker == "revoked" and e.blob == ca:
                    raise HostKeyError(f"{name}: its host certificate is signed by a REVOKED CA "
                                       f"(@revoked at {e.where}); refusing")
            problem = self._cert_problem(host, name, cert)
            if problem is None:
                return "certified"
        plain = [e for e in self.entries if e.marker is None and e.matches(name)]
        if any(e.blob == blob for e in plain):
            return "known"
        same_type = [e for e in plain if e.key_type == key.get_name()]
        if same_type:
            raise ChangedHostKey(name, same_type[0], key)
        if cert is not None:
            raise HostKeyError(f"{name}: host certificate not accepted: {problem}")
        return "unknown"

    def _cert_problem(self, host: str, name: str, cert: bytes) -> str | None:
        """Why this host certificate is not trusted for `host`, or None when it is."""
        cas = [e for e in self.entries if e.marker == "cert-authority" and e.matches(name)]
        if not cas:
            return f"no @cert-authority line in {', '.join(map(str, self.files))} matches {name}"
        try:
            c = parse_certificate(cert)
        except ValueError as e:
            return f"cannot read it: {e}"
        ca = next((e for e in cas if e.blob == c.ca_blob), None)
        if ca is None:
            return "it is signed by a CA that no @cert-authority line for this host names"
        if c.cert_type != CERT_HOST:
            return "it is a user certificate, not a host certificate"
        if c.principals and host not in c.principals:
            return f"it is valid for {', '.join(c.principals)}, not {host}"
        now = time.time()
        if not c.valid_after <= now < c.valid_before:
            return "it is expired or not yet valid"
        if c.critical_options:
            return "it carries critical options, which no host certificate may"
        try:
            ca_key = paramiko.PKey.from_type_string(ca.key_type, ca.blob)
            ok = ca_key.verify_ssh_sig(c.signed, paramiko.Message(c.signature))
        except Exception as e:  # noqa: BLE001 - any failure to verify is a refusal
            return f"its signature cannot be checked with the CA key at {ca.where}: {e}"
        return None if ok else f"its signature does not verify with the CA key at {ca.where}"


class ChangedHostKey(HostKeyError):
    def __init__(self, name: str, entry: Entry, key: paramiko.PKey) -> None:
        self.entry = entry
        self.key = key
        try:
            expected = paramiko.PKey.from_type_string(entry.key_type, entry.blob).fingerprint
        except Exception:  # noqa: BLE001 - the message still names the line
            expected = "?"
        super().__init__(
            f"HOST KEY CHANGED for {name} (known at {entry.where}, expected fingerprint {expected}, "
            f"got {key.fingerprint})"
        )


_HOST_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
                   "rsa-sha2-512", "rsa-sha2-256")


def _parse_line(path: Path, number: int, raw: str, skipped: list[str]) -> Entry | None:
    fields = raw.split()
    if not fields or fields[0].startswith("#"):
        return None
    marker = None
    if fields[0].startswith("@"):
        marker = fields[0][1:]
        fields = fields[1:]
        if marker not in ("revoked", "cert-authority"):
            skipped.append(f"{path}:{number}: unknown marker @{marker}")
            return None
    if len(fields) < 3:
        skipped.append(f"{path}:{number}: expected names, key type and key")
        return None
    names, key_type, b64 = fields[:3]
    try:
        blob = base64.b64decode(b64, validate=True)
        (n,) = struct.unpack(">I", blob[:4])
        embedded = blob[4:4 + n].decode()
    except (binascii.Error, ValueError, struct.error, UnicodeDecodeError):
        skipped.append(f"{path}:{number}: the key is not valid base64")
        return None
    if embedded != key_type:
        skipped.append(f"{path}:{number}: the key is a {embedded}, the line says {key_type}")
        return None
    return Entry(path, number, marker, names, key_type, blob)


# --- host certificates (OpenSSH PROTOCOL.certkeys) -----------------------------------------------


@dataclass(frozen=True)
class Certificate:
    cert_type: int
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    critical_options: bytes
    ca_blob: bytes
    signed: bytes  # everything the CA signed
    signature: bytes


# How many key fields each certified key type has (strings or mpints, all length-prefixed).
_KEY_FIELDS = {"ssh-ed25519": 1, "ssh-rsa": 2, "ecdsa-sha2-nistp256": 2, "ecdsa-sha2-nistp384": 2,
               "ecdsa-sha2-nistp521": 2}


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def string(self) -> bytes:
        (n,) = struct.unpack(">I", self._take(4))
        return self._take(n)

    def uint(self, size: int) -> int:
        return int.from_bytes(self._take(size), "big")

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated certificate")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def parse_certificate(blob: bytes) -> Certificate:
    r = _Reader(blob)
    cert_type_name = r.string().decode(errors="replace")
    base = cert_type_name.removesuffix("-cert-v01@openssh.com")
    if base not in _KEY_FIELDS:
        raise ValueError(f"unsupported certificate type {cert_type_name}")
    r.string()  # nonce
    for _ in range(_KEY_FIELDS[base]):
        r.string()
    r.uint(8)  # serial
    cert_type = r.uint(4)
    r.string()  # key id
    principals_r = _Reader(r.string())
    principals = []
    while principals_r.pos < len(principals_r.data):
        principals.append(principals_r.string().decode(errors="replace"))
    valid_after, valid_before = r.uint(8), r.uint(8)
    critical = r.string()
    r.string()  # extensions
    r.string()  # reserved
    ca_blob = r.string()
    signed = blob[:r.pos]
    signature = r.string()
    return Certificate(cert_type, tuple(principals), valid_after, valid_before, critical, ca_blob, signed, signature)


def _cert_ca_blob(cert: bytes) -> bytes | None:
    try:
        return parse_certificate(cert).ca_blob
    except ValueError:
        return None


# Many transports (one per node) may append to one file at once.
_APPEND_LOCK = threading.Lock()


def append(path: Path, name: str, key: paramiko.PKey) -> None:
    """Add a host key line, like OpenSSH's accept-new: appended, never rewriting the operator's
    file (its comments, hashed entries and markers stay as they are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _APPEND_LOCK, open(path, "a+") as f:
        f.seek(0, 2)
        if f.tell():
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":
                f.write("\n")
        f.write(f"{name} {key.get_name()} {key.get_base64()}\n")
