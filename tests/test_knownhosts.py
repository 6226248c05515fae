"""known_hosts read as OpenSSH reads it (rollout.knownhosts), with real keys and certificates
made by ssh-keygen; the same files against a real sshd are in tests/test_transport.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import paramiko
import pytest

from imagetool.errors import HostKeyError
from rollout.knownhosts import ChangedHostKey, KnownHosts, parse_certificate


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "t", "-f", str(path)], check=True)
    return " ".join(Path(f"{path}.pub").read_text().split()[:2])


def sign_host(ca: Path, key: Path, *extra: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", "host", *extra, f"{key}.pub"], check=True,
                   capture_output=True)
    return Path(f"{key}-cert.pub")


def host_key(path: Path, cert: Path | None = None) -> paramiko.PKey:
    """The key as a server presents it: plain, or with its certificate."""
    key = paramiko.Ed25519Key(filename=str(path))
    if cert is not None:
        key.load_certificate(str(cert))
    return key


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    out = {}
    for name in ("host", "other", "ca", "ca2"):
        out[name] = (tmp_path / name, keygen(tmp_path / name))
    return out


def load(tmp_path: Path, text: str, name: str = "known_hosts") -> KnownHosts:
    path = tmp_path / name
    path.write_text(text)
    return KnownHosts.load([path])


@pytest.mark.parametrize(("names", "host", "port", "known"), [
    ("10.0.0.1", "10.0.0.1", 22, True),
    ("10.0.0.1", "10.0.0.2", 22, False),
    ("web1,10.0.0.1,web2", "10.0.0.1", 22, True),       # several names on one line
    ("10.0.0.*", "10.0.0.7", 22, True),                 # wildcard
    ("10.0.0.?", "10.0.0.17", 22, False),
    ("10.0.0.*,!10.0.0.7", "10.0.0.7", 22, False),      # negation wins
    ("!10.0.0.7,10.0.0.*", "10.0.0.8", 22, True),
    ("[10.0.0.1]:2222", "10.0.0.1", 2222, True),        # non-standard port
    ("10.0.0.1", "10.0.0.1", 2222, False),              # a bare name is port 22 only
    ("[10.0.0.*]:2222", "10.0.0.3", 2222, True),
    ("WEB1.example", "web1.example", 22, True),         # names are case-insensitive
])
def test_names_match_as_in_openssh(tmp_path: Path, keys, names: str, host: str, port: int, known: bool) -> None:  # type: ignore[no-untyped-def]
    path, line = keys["host"]
    kh = load(tmp_path, f"{names} {line}\n")
    assert kh.check(host, port, host_key(path)) == ("known" if known else "unknown")


def test_hashed_names(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    path, line = keys["host"]
    kh_file = tmp_path / "known_hosts"
    kh_file.write_text(f"10.0.0.1 {line}\n[10.0.0.1]:2222 {line}\n")
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(kh_file)], check=True, capture_output=True)
    assert kh_file.read_text().count("|1|") == 2
    kh = KnownHosts.load([kh_file])
    assert kh.check("10.0.0.1", 22, host_key(path)) == "known"
    assert kh.check("10.0.0.1", 2222, host_key(path)) == "known"
    assert kh.check("10.0.0.2", 22, host_key(path)) == "unknown"


def test_unreadable_lines_never_break_the_others(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    path, line = keys["host"]
    _, ca_line = keys["ca"]
    kh = load(tmp_path, "\n".join([
        f"@cert-authority *.example {ca_line}",
        "@future-marker 10.0.0.1 ssh-ed25519 AAAA",
        "10.0.0.1 ssh-ed25519 not-base64!!",
        "10.0.0.1 ssh-rsa " + line.split()[1],  # the key is an ed25519 key, the line says rsa
        "# a comment",
        "10.0.0.1",
        f"10.0.0.1 {line}",
        "",
    ]))
    assert kh.check("10.0.0.1", 22, host_key(path)) == "known"
    assert len(kh.skipped) == 4 and kh.skipped[0].endswith(":2: unknown marker @future-marker")


def test_several_files_are_read(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    path, line = keys["host"]
    (tmp_path / "b").write_text(f"10.0.0.1 {line}\n")
    kh = KnownHosts.load([tmp_path / "absent", tmp_path / "b"])
    assert kh.check("10.0.0.1", 22, host_key(path)) == "known"


def test_changed_key_names_the_line(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    path, _ = keys["host"]
    _, other = keys["other"]
    kh = load(tmp_path, f"# first\n10.0.0.1 {other}\n")
    with pytest.raises(ChangedHostKey, match=rf"HOST KEY CHANGED for 10.0.0.1 \(known at {tmp_path}/known_hosts:2, "
                                             r"expected fingerprint SHA256:.*, got SHA256:"):
        kh.check("10.0.0.1", 22, host_key(path))


def test_revoked_key_is_refused_naming_file_and_line(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    path, line = keys["host"]
    kh = load(tmp_path, f"10.0.0.1 {line}\n@revoked * {line}\n")
    with pytest.raises(HostKeyError, match=rf"REVOKED host key .*marked @revoked at {tmp_path}/known_hosts:2"):
        kh.check("10.0.0.1", 22, host_key(path))


def test_host_certificate_signed_by_a_listed_ca(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    path, _ = keys["host"]
    ca, ca_line = keys["ca"]
    cert = sign_host(ca, path, "-h", "-n", "web1.example,10.0.0.1")
    presented = host_key(path, cert)
    kh = load(tmp_path, f"@cert-authority *.example,10.0.0.* {ca_line}\n")
    assert kh.key_types("10.0.0.1")[0] == "ssh-ed25519-cert-v01@openssh.com"
    assert kh.check("10.0.0.1", 22, presented) == "certified"
    assert kh.check("web1.example", 22, presented) == "certified"
    # a name the certificate does not list
    with pytest.raises(HostKeyError, match=r"valid for web1.example, 10.0.0.1, not web2.example"):
        kh.check("web2.example", 22, presented)
    # a CA line for other names
    with pytest.raises(HostKeyError, match=r"no @cert-authority line .* matches 10.1.0.1"):
        kh.check("10.1.0.1", 22, presented)
    # another CA
    _, ca2_line = keys["ca2"]
    with pytest.raises(HostKeyError, match=r"signed by a CA that no @cert-authority line for this host names"):
        load(tmp_path, f"@cert-authority * {ca2_line}\n", "kh2").check("10.0.0.1", 22, presented)
    # the CA revoked
    with pytest.raises(HostKeyError, match=r"signed by a REVOKED CA \(@revoked at .*kh3:2\)"):
        load(tmp_path, f"@cert-authority * {ca_line}\n@revoked * {ca_line}\n", "kh3").check("10.0.0.1", 22, presented)


@pytest.mark.parametrize(("options", "problem"), [
    (["-h", "-n", "10.0.0.1", "-V", "20200101:20200102"], "expired or not yet valid"),
    (["-n", "10.0.0.1"], "a user certificate, not a host certificate"),
])
def test_invalid_host_certificates(tmp_path: Path, keys, options: list[str], problem: str) -> None:  # type: ignore[no-untyped-def]
    path, _ = keys["host"]
    ca, ca_line = keys["ca"]
    presented = host_key(path, sign_host(ca, path, *options))
    with pytest.raises(HostKeyError, match=problem):
        load(tmp_path, f"@cert-authority * {ca_line}\n").check("10.0.0.1", 22, presented)


def test_an_invalid_certificate_falls_back_to_the_plain_key(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    # As ssh: a certificate that does not check out is set aside and the key judged plainly.
    path, line = keys["host"]
    ca, ca_line = keys["ca"]
    presented = host_key(path, sign_host(ca, path, "-h", "-n", "elsewhere"))
    assert load(tmp_path, f"@cert-authority * {ca_line}\n10.0.0.1 {line}\n").check("10.0.0.1", 22, presented) == "known"


def test_certificate_fields(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    path, _ = keys["host"]
    ca, ca_line = keys["ca"]
    cert = parse_certificate(host_key(path, sign_host(ca, path, "-h", "-n", "a,b", "-V", "20300101:20300102"))
                             .public_blob.key_blob)
    assert (cert.cert_type, cert.principals) == (2, ("a", "b"))
    assert cert.valid_before - cert.valid_after == 86400
    assert paramiko.PKey.from_type_string("ssh-ed25519", cert.ca_blob).get_base64() == ca_line.split()[1]
