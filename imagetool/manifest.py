"""The manifest: what a built image contains, written beside it as `<id>.manifest.json`.

The manifest bytes are what gets signed, and a manifest may come from another machine, so
`Manifest.from_json` checks everything that later ends up in a file name or on a command line.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagetool import schema
from imagetool.errors import InputError, NotFoundError, VerificationError
from imagetool.names import check_name, check_version, release_id
from imagetool.release import Base, HealthCheck, Mirrors, SquashfsOptions
from imagetool.schema import Where
from imagetool.yamlfile import read_limited

FORMAT = 1
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str


@dataclass(frozen=True)
class BuilderInfo:
    imagetool: str
    diskimage_builder: str
    python: str
    host: str


@dataclass(frozen=True)
class ImageInfo:
    file: str
    size: int
    sha256: str


@dataclass(frozen=True)
class KeyInfo:
    """A release signing key built into the image (/etc/imagetool/trusted-keys/<name>)."""

    name: str
    sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    description: str
    built_at: str
    source_date_epoch: int | None
    release_sha256: str
    builder: BuilderInfo
    base: Base
    mirrors: Mirrors
    elements: tuple[str, ...]
    environment: dict[str, str]
    squashfs: SquashfsOptions
    packages: tuple[Package, ...]
    services: tuple[str, ...]
    health_checks: tuple[HealthCheck, ...]
    image: ImageInfo
    format: int = FORMAT
    # The keys nodes running this image trust: a change of keys is a change of release.
    trusted_keys: tuple[KeyInfo, ...] = ()

    @property
    def id(self) -> str:
        return release_id(self.name, self.version)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "id": self.id,
            "description": self.description,
            "built_at": self.built_at,
            "source_date_epoch": self.source_date_epoch,
            "release_sha256": self.release_sha256,
            "builder": {
                "imagetool": self.builder.imagetool,
                "diskimage_builder": self.builder.diskimage_builder,
                "python": self.builder.python,
                "host": self.builder.host,
            },
            "base": {"distribution": self.base.distribution, "release": self.base.release},
            "mirrors": {"distribution": self.mirrors.distribution, "security": self.mirrors.security},
            "elements": list(self.elements),
            "environment": dict(self.environment),
            "squashfs": {
                "compression": self.squashfs.compression,
                "level": self.squashfs.level,
                "block_size": self.squashfs.block_size,
            },
            "packages": [
                {"name": p.name, "version": p.version, "arch": p.arch}
                for p in sorted(self.packages, key=lambda p: (p.name, p.arch))
            ],
            "services": list(self.services),
            "health_checks": [
                {"name": h.name, "command": h.command, "timeout": h.timeout} for h in self.health_checks
            ],
            "image": {"file": self.image.file, "size": self.image.size, "sha256": self.image.sha256},
            "trusted_keys": [{"name": k.name, "sha256": k.sha256} for k in self.trusted_keys],
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise VerificationError(f"{where}: not a valid manifest (bad JSON: {e})") from None
        return cls.from_dict(doc, where)

    @classmethod
    def from_dict(cls, doc: Any, where: str) -> Manifest:
        w = Where(where, error=VerificationError)
        schema.mapping(doc, w, optional=False)
        fmt = _get(doc, w, "format", schema.integer)
        if fmt != FORMAT:
            raise (w / "format").error(f"manifest format {fmt!r} is not supported (expected {FORMAT})")
        name = _get(doc, w, "name", schema.string)
        version = _get(doc, w, "version", schema.string)
        try:
            check_name(name, where=str(w / "name"))
            check_version(version, where=str(w / "version"))
        except InputError as e:
            raise VerificationError(str(e)) from None
        mid = _get(doc, w, "id", schema.string)
        if mid != release_id(name, version):
            raise (w / "id").error(f"{mid!r} does not match name and version ({release_id(name, version)!r})")
        sde = _get(doc, w, "source_date_epoch", schema.integer, optional=True)
        release_sha = _get(doc, w, "release_sha256", _sha256)

        b, wb = _get(doc, w, "builder", _mapping), w / "builder"
        builder = BuilderInfo(**{k: _get(b, wb, k, schema.string)
                                 for k in ("imagetool", "diskimage_builder", "python", "host")})
        bd, wbd = _get(doc, w, "base", _mapping), w / "base"
        base = Base(distribution=_get(bd, wbd, "distribution", schema.string),
                    release=_get(bd, wbd, "release", schema.string))
        md, wmd = _get(doc, w, "mirrors", _mapping), w / "mirrors"
        mirrors = Mirrors(
            distribution=_get(md, wmd, "distribution", schema.string, optional=True),
            security=_get(md, wmd, "security", schema.string, optional=True),
        )
        elements = _get(doc, w, "elements", _strings)
        env = _get(doc, w, "environment", _mapping)
        for k, v in env.items():
            schema.string(v, w / "environment" / k)
        sd, wsd = _get(doc, w, "squashfs", _mapping), w / "squashfs"
        squashfs = SquashfsOptions(
            compression=_get(sd, wsd, "compression", schema.string),
            level=_get(sd, wsd, "level", schema.integer, optional=True),
            block_size=_get(sd, wsd, "block_size", schema.integer),
        )
        packages = []
        for i, p in enumerate(_get(doc, w, "packages", schema.sequence)):
            wp = (w / "packages")[i]
            schema.mapping(p, wp, optional=False)
            packages.append(Package(**{k: _get(p, wp, k, schema.string) for k in ("name", "version", "arch")}))
        services = _get(doc, w, "services", _strings)
        checks = []
        for i, h in enumerate(_get(doc, w, "health_checks", schema.sequence)):
            wh = (w / "health_checks")[i]
            schema.mapping(h, wh, optional=False)
            checks.append(HealthCheck(
                name=_get(h, wh, "name", schema.string),
                command=_get(h, wh, "command", schema.string),
                timeout=_get(h, wh, "timeout", _seconds),
            ))
        im, wim = _get(doc, w, "image", _mapping), w / "image"
        image = ImageInfo(
            file=_get(im, wim, "file", schema.string),
            size=_get(im, wim, "size", _size),
            sha256=_get(im, wim, "sha256", _sha256),
        )
        keys = []
        # Optional: manifests from before trusted keys were built into images have none.
        for i, k in enumerate(schema.sequence(doc.get("trusted_keys"), w / "trusted_keys")):
            wk = (w / "trusted_keys")[i]
            schema.mapping(k, wk, optional=False)
            keys.append(KeyInfo(name=_get(k, wk, "name", schema.string), sha256=_get(k, wk, "sha256", _sha256)))
        # The file name travels to nodes; it must be the one the id implies, nothing else.
        if image.file != f"{mid}.squashfs":
            raise (wim / "file").error(f"expected {mid + '.squashfs'!r}, got {image.file!r}")
        return cls(
            format=fmt,
            name=name,
            version=version,
            description=_get(doc, w, "description", schema.string, optional=True) or "",
            built_at=_get(doc, w, "built_at", schema.string),
            source_date_epoch=sde,
            release_sha256=release_sha,
            builder=builder,
            base=base,
            mirrors=mirrors,
            elements=elements,
            environment=dict(env),
            squashfs=squashfs,
            packages=tuple(sorted(packages, key=lambda p: (p.name, p.arch))),
            services=services,
            health_checks=tuple(checks),
            image=image,
            trusted_keys=tuple(keys),
        )


def _get(d: dict[str, Any], w: Where, key: str, check: Callable[[Any, Where], Any], optional: bool = False) -> Any:
    """d[key] checked by `check`; every key must be there, null only where `optional`."""
    if key not in d:
        raise w.missing(key)
    if d[key] is None and optional:
        return None
    return check(d[key], w / key)


def _mapping(value: Any, w: Where) -> dict[str, Any]:
    return schema.mapping(value, w, optional=False)


def _strings(value: Any, w: Where) -> tuple[str, ...]:
    return schema.string_list(value, w, unique=False, optional=False)


def _seconds(value: Any, w: Where) -> float:
    return schema.number(value, w, minimum=0, exclusive=True, maximum=schema.MAX_SECONDS)


def _size(value: Any, w: Where) -> int:
    return schema.integer(value, w, minimum=0)


def _sha256(value: Any, w: Where) -> str:
    return schema.string(value, w, SHA256_RE, "sha256 hex digest")


# A manifest lists every package of an image: a few hundred KiB. A larger file is not one.
MAX_MANIFEST_BYTES = 16 << 20


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    data = read_limited(path, "manifest", MAX_MANIFEST_BYTES, kind="JSON", error=VerificationError)
    return Manifest.from_json(data, str(path))


# diskimage-builder writes this file with dpkg-query and sed, so it is JSON only if nothing
# unusual happened; the fallback reads each {...} object on its own.
_OBJECT_RE = re.compile(r"\{[^{}]*\}")
_PAIR_RE = re.compile(r'"([A-Za-z_]+)"\s*:\s*"((?:[^"\\]|\\.)*)"')


def parse_dpkg_manifest(path: str | Path) -> list[Package]:
    """Installed packages from DIB's dib-manifest-dpkg-<image> file, sorted by name."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise NotFoundError(f"{path}: dpkg manifest does not exist") from None
    except OSError as e:
        raise VerificationError(f"{path}: cannot read dpkg manifest: {e.strerror or e}") from None

    records: list[dict[str, Any]] | None = None
    try:
        doc = json.loads(text)
        if isinstance(doc, dict) and isinstance(doc.get("packages"), list):
            records = [p for p in doc["packages"] if isinstance(p, dict)]
    except json.JSONDecodeError:
        pass
    if records is None:
        records = [dict(_PAIR_RE.findall(m.group(0))) for m in _OBJECT_RE.finditer(text)]

    packages: dict[tuple[str, str], Package] = {}
    for rec in records:
        name, version, arch, status = (
            rec.get("package"), rec.get("version"), rec.get("arch", ""), rec.get("status", "")
        )
        if not isinstance(name, str) or not isinstance(version, str) or not name:
            continue
        if not isinstance(status, str) or not status.startswith("ii"):
            continue
        arch = arch if isinstance(arch, str) else ""
        # ${binary:Package} carries ':amd64' for multi-arch packages; the arch has its own field.
        if ":" in name:
            name, suffix = name.split(":", 1)
            arch = arch or suffix
        packages[(name, arch)] = Package(name=name, version=version, arch=arch)
    if not packages:
        raise VerificationError(f"{path}: no installed packages found in dpkg manifest")
    return sorted(packages.values(), key=lambda p: (p.name, p.arch))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
