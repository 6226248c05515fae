"""Manifests for unit tests: one realistic sample, changed per test with keyword arguments."""

from __future__ import annotations

from typing import Any

from imagetool.manifest import BuilderInfo, ImageInfo, Manifest, Package
from imagetool.release import Base, HealthCheck, Mirrors, SquashfsOptions


def sample_manifest(name: str = "webapp", version: str = "1.0", *, packages: dict[str, str] | None = None,
                    services: tuple[str, ...] = (), checks: tuple[tuple[Any, ...], ...] = (("http", "true", 10),),
                    image: ImageInfo | None = None) -> Manifest:
    packages = {"bash": "5.2.15-2+b2"} if packages is None else packages
    return Manifest(
        name=name,
        version=version,
        description="",
        built_at="2026-11-23T09:30:00Z",
        source_date_epoch=None,
        release_sha256="a" * 64,
        builder=BuilderInfo("0.1.0", "3.43.0", "3.11.7", "ci-1"),
        base=Base("debian", "bookworm"),
        mirrors=Mirrors("http://deb.debian.org/debian", "http://deb.debian.org/debian-security"),
        elements=("debian-minimal",),
        environment={},
        squashfs=SquashfsOptions(),
        packages=tuple(Package(n, v, "amd64") for n, v in packages.items()),
        services=tuple(services),
        health_checks=tuple(HealthCheck(*c) for c in checks),
        image=image or ImageInfo(f"{name}-{version}.squashfs", 1000, "b" * 64),
    )
