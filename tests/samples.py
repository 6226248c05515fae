"""Manifests and releases for unit tests: one realistic sample, changed per test with keyword arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imagetool.manifest import BuilderInfo, ImageInfo, Manifest, Package, sha256_file
from imagetool.release import Base, HealthCheck, Mirrors, SquashfsOptions
from imagetool.store import Store, StoredRelease


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


def make_release(store_dir: Path, name: str, version: str, content: bytes = b"squashfs image bytes", *,
                 sign_key: Path | None = None, packages: dict[str, str] | None = None) -> StoredRelease:
    """A release in a store at `store_dir`: `content` as its image, a sample manifest describing it
    (with `packages`, if given), signed with `sign_key` (an ed25519 private key file) when given."""
    from imagetool.signing import sign_file

    store = Store(store_dir)
    rid = f"{name}-{version}"
    with store.staging(rid) as st:
        st.squashfs_path.write_bytes(content)
        image = ImageInfo(f"{rid}.squashfs", len(content), sha256_file(st.squashfs_path))
        st.manifest_path.write_bytes(sample_manifest(name, version, image=image, packages=packages).to_json())
        if sign_key is not None:
            st.sig_path.write_bytes(sign_file(st.manifest_path, sign_key))
        return st.commit()
