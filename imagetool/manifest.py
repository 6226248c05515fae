"""The manifest: what a built image contains, written beside it as `<id>.manifest.json`.

The manifest bytes are what gets signed, and a manifest may come from another machine, so
`Manifest.from_json` checks everything that later ends up in a file name or on a command line.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagetool.errors import NotFoundError, VerificationError
from imagetool.names import check_name, check_version, release_id
from imagetool.release import Base, HealthCheck, Mirrors, SquashfsOptions

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
        r = _Reader(where)
        r.need(doc, "", dict)
        fmt = r.get(doc, "format", int)
        if fmt != FORMAT:
            raise VerificationError(f"{where}: key 'format': manifest format {fmt!r} is not supported (expected {FORMAT})")
        name = r.get(doc, "name", str)
        version = r.get(doc, "version", str)
        try:
            check_name(name, where=f"{where}: key 'name'")
            check_version(version, where=f"{where}: key 'version'")
        except Exception as e:  # noqa: BLE001 - re-raised as a verification failure
            raise VerificationError(str(e)) from None
        mid = r.get(doc, "id", str)
        if mid != release_id(name, version):
            raise VerificationError(f"{where}: key 'id': {mid!r} does not match name and version ({release_id(name, version)!r})")
        sde = r.get(doc, "source_date_epoch", int, optional=True)
        release_sha = r.get(doc, "release_sha256", str)
        r.sha256(release_sha, "release_sha256")

        b = r.get(doc, "builder", dict)
        builder = BuilderInfo(
            imagetool=r.get(b, "builder.imagetool", str),
            diskimage_builder=r.get(b, "builder.diskimage_builder", str),
            python=r.get(b, "builder.python", str),
            host=r.get(b, "builder.host", str),
        )
        bd = r.get(doc, "base", dict)
        base = Base(distribution=r.get(bd, "base.distribution", str), release=r.get(bd, "base.release", str))
        md = r.get(doc, "mirrors", dict)
        mirrors = Mirrors(
            distribution=r.get(md, "mirrors.distribution", str, optional=True),
            security=r.get(md, "mirrors.security", str, optional=True),
        )
        elements = tuple(r.str_list(doc, "elements"))
        env = r.get(doc, "environment", dict)
        for k, v in env.items():
            r.need(v, f"environment.{k}", str)
        sd = r.get(doc, "squashfs", dict)
        squashfs = SquashfsOptions(
            compression=r.get(sd, "squashfs.compression", str),
            level=r.get(sd, "squashfs.level", int, optional=True),
            block_size=r.get(sd, "squashfs.block_size", int),
        )
        packages = []
        for i, p in enumerate(r.get(doc, "packages", list)):
            key = f"packages[{i}]"
            r.need(p, key, dict)
            packages.append(
                Package(
                    name=r.get(p, f"{key}.name", str),
                    version=r.get(p, f"{key}.version", str),
                    arch=r.get(p, f"{key}.arch", str),
                )
            )
        services = tuple(r.str_list(doc, "services"))
        checks = []
        for i, h in enumerate(r.get(doc, "health_checks", list)):
            key = f"health_checks[{i}]"
            r.need(h, key, dict)
            timeout = r.get(h, f"{key}.timeout", (int, float))
            checks.append(HealthCheck(name=r.get(h, f"{key}.name", str), command=r.get(h, f"{key}.command", str), timeout=timeout))
        im = r.get(doc, "image", dict)
        image = ImageInfo(
            file=r.get(im, "image.file", str),
            size=r.get(im, "image.size", int),
            sha256=r.get(im, "image.sha256", str),
        )
        r.sha256(image.sha256, "image.sha256")
        # The file name travels to nodes; it must be the one the id implies, nothing else.
        if image.file != f"{mid}.squashfs":
            raise VerificationError(f"{where}: key 'image.file': expected {mid + '.squashfs'!r}, got {image.file!r}")
        if image.size < 0:
            raise VerificationError(f"{where}: key 'image.size': must not be negative, got {image.size}")
        return cls(
            format=fmt,
            name=name,
            version=version,
            description=r.get(doc, "description", str, optional=True) or "",
            built_at=r.get(doc, "built_at", str),
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
        )


class _Reader:
    def __init__(self, where: str) -> None:
        self.where = where

    def need(self, value: Any, key: str, typ: type | tuple[type, ...]) -> Any:
        if isinstance(value, bool) or not isinstance(value, typ):
            names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            label = f"key '{key}'" if key else "top level"
            raise VerificationError(f"{self.where}: {label}: expected {names}, got {value!r}")
        return value

    def get(self, d: dict[str, Any], key: str, typ: type | tuple[type, ...], optional: bool = False) -> Any:
        leaf = key.rsplit(".", 1)[-1]
        if leaf not in d:
            raise VerificationError(f"{self.where}: key '{key}': missing from manifest")
        value = d[leaf]
        if value is None and optional:
            return None
        return self.need(value, key, typ)

    def str_list(self, d: dict[str, Any], key: str) -> list[str]:
        items = self.get(d, key, list)
        for i, item in enumerate(items):
            self.need(item, f"{key}[{i}]", str)
        return items

    def sha256(self, value: str, key: str) -> None:
        if not SHA256_RE.match(value):
            raise VerificationError(f"{self.where}: key '{key}': {value!r} is not a sha256 hex digest")


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{path}: manifest does not exist") from None
    except OSError as e:
        raise VerificationError(f"{path}: cannot read manifest: {e.strerror or e}") from None
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
