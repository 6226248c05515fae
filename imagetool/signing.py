"""Ed25519 signatures over manifests, and verification of an image against its manifest.

Only the manifest is signed: it carries the image's sha256 and size, so a valid signature over
the manifest plus a matching hash covers the image without signing 250 MB directly.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from imagetool.errors import AlreadyExistsError, InputError, NotFoundError, VerificationError
from imagetool.manifest import Manifest, sha256_file
from imagetool.release import MAX_KEY_BYTES
from imagetool.yamlfile import read_limited


def _write_new(path: Path, data: bytes, mode: int, force: bool) -> None:
    if force:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    try:
        # O_EXCL with the final mode: the private key is never readable by others, not even briefly.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise AlreadyExistsError(f"{path}: already exists; use --force to overwrite it") from None
    except OSError as e:
        raise InputError(f"{path}: cannot create: {e.strerror or e}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file, however spelt: relative or absolute, through symlinks
    (followed to their end, existing or not), or as two hard links to one inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def generate_keypair(private_path: Path, public_path: Path, force: bool = False) -> None:
    private_path, public_path = Path(private_path), Path(public_path)
    # Checked before anything is touched: the public key written second would replace the
    # private key just written (and, with --force, the one that was there before).
    if _same_file(private_path, public_path):
        raise InputError(f"--private {private_path} and --public {public_path} are the same file; "
                         "give the keys two paths")
    if not force:
        for p in (private_path, public_path):
            if p.exists():
                raise AlreadyExistsError(f"{p}: already exists; use --force to overwrite it")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, 0o600, force)
    _write_new(public_path, public_pem, 0o644, force)


def _read_key_file(path: Path, what: str) -> bytes:
    return read_limited(path, what, MAX_KEY_BYTES)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = _read_key_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise InputError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"{path}: expected an Ed25519 private key, got {type(key).__name__}")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    return public_key_from_pem(str(path), _read_key_file(path, "public key"))


def public_key_from_pem(name: str, pem: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM bytes, or an InputError naming `name`."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise InputError(f"{name}: not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(f"{name}: expected an Ed25519 public key, got {type(key).__name__}")
    return key


def sign_bytes(data: bytes, private_key_path: Path) -> bytes:
    """The signature file content for `data`: base64 of the raw 64-byte signature and a newline."""
    key = load_private_key(private_key_path)
    return base64.b64encode(key.sign(data)) + b"\n"


def sign_file(manifest_path: Path, private_key_path: Path) -> bytes:
    manifest_path = Path(manifest_path)
    try:
        data = manifest_path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{manifest_path}: manifest does not exist") from None
    return sign_bytes(data, private_key_path)


def _decode_signature(signature: bytes, sig_where: str) -> bytes:
    """The raw signature in a signature file (base64 and a newline, as sign_bytes writes it)."""
    try:
        return base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise VerificationError(f"{sig_where}: not a valid signature file (expected base64)") from None


def verify_signature(data: bytes, signature: bytes, public_key_path: Path, what: str, sig_where: str) -> None:
    key = load_public_key(public_key_path)
    raw = _decode_signature(signature, sig_where)
    try:
        key.verify(raw, data)
    except InvalidSignature:
        raise VerificationError(f"signature of {what} does not match key {public_key_path}") from None


@dataclass(frozen=True)
class TrustedKey:
    """A public key trusted to sign releases, and where it came from (shown in messages)."""

    name: str
    key: Ed25519PublicKey
    sha256: str

    @classmethod
    def from_file(cls, path: Path) -> TrustedKey:
        path = Path(path)
        return cls.from_pem(str(path), _read_key_file(path, "public key"))

    @classmethod
    def from_pem(cls, name: str, pem: bytes) -> TrustedKey:
        return cls(name=name, key=public_key_from_pem(name, pem), sha256=hashlib.sha256(pem).hexdigest())


def load_trusted_keys(paths: Sequence[Path]) -> list[TrustedKey]:
    """The keys at `paths`, each checked to be an Ed25519 public key (InputError otherwise)."""
    return [TrustedKey.from_file(p) for p in dict.fromkeys(Path(p) for p in paths)]


def signed_by(data: bytes, signature: bytes | None, keys: Sequence[TrustedKey], what: str,
              sig_where: str) -> TrustedKey:
    """The key in `keys` whose signature `signature` over `data` is; VerificationError naming
    `what` and the key set when there is none: unsigned, not a signature, or no key matches."""
    names = ", ".join(k.name for k in keys)
    if signature is None:
        raise VerificationError(f"{what} is not signed, and only releases signed by a trusted key are accepted "
                                f"(trusted keys: {names})")
    raw = _decode_signature(signature, sig_where)
    for key in keys:
        try:
            key.key.verify(raw, data)
            return key
        except InvalidSignature:
            continue
    raise VerificationError(f"signature of {what} matches none of the trusted keys ({names}): the manifest "
                            f"was changed after signing, or it was signed with a key that is not trusted")


def verify_release(
    squashfs: Path, manifest: Path, signature: Path | None, public_key: Path | None
) -> Manifest:
    """Check signature (when a key is given), then the image's size and sha256 against the manifest."""
    squashfs, manifest = Path(squashfs), Path(manifest)
    try:
        # Verify and parse the same bytes, so the file cannot change between the two.
        data = manifest.read_bytes()
    except FileNotFoundError:
        raise VerificationError(f"{manifest}: manifest does not exist") from None
    except OSError as e:
        raise VerificationError(f"{manifest}: cannot read manifest: {e.strerror or e}") from None

    if public_key is not None:
        sig_data = None
        if signature is not None:
            try:
                sig_data = Path(signature).read_bytes()
            except FileNotFoundError:
                pass
            except OSError as e:
                raise VerificationError(f"{signature}: cannot read signature: {e.strerror or e}") from None
        if sig_data is None:
            raise VerificationError(f"{manifest} has no signature"
                                    + (f" ({signature} is missing)" if signature else ""))
        verify_signature(data, sig_data, Path(public_key), str(manifest), str(signature))

    m = Manifest.from_json(data, str(manifest))
    try:
        size = squashfs.stat().st_size
    except FileNotFoundError:
        raise VerificationError(f"{squashfs}: image does not exist") from None
    if size != m.image.size:
        raise VerificationError(f"{squashfs}: size is {size} bytes, manifest {manifest} says {m.image.size}")
    actual = sha256_file(squashfs)
    if actual != m.image.sha256:
        raise VerificationError(
            f"{squashfs}: sha256 is {actual}, manifest {manifest} expects {m.image.sha256}"
        )
    return m
