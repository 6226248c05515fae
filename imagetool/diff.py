"""What changed between two releases, from their manifests alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imagetool.manifest import Manifest, Package
from imagetool.versions import debian_version_cmp


@dataclass
class ReleaseDiff:
    before: str
    after: str
    added: list[tuple[str, str]] = field(default_factory=list)
    removed: list[tuple[str, str]] = field(default_factory=list)
    upgraded: list[tuple[str, str, str]] = field(default_factory=list)
    downgraded: list[tuple[str, str, str]] = field(default_factory=list)
    services_added: list[str] = field(default_factory=list)
    services_removed: list[str] = field(default_factory=list)
    health_checks_added: list[str] = field(default_factory=list)
    health_checks_removed: list[str] = field(default_factory=list)
    health_checks_changed: list[str] = field(default_factory=list)
    size_before: int = 0
    size_after: int = 0

    @property
    def size_change(self) -> int:
        return self.size_after - self.size_before

    @property
    def is_empty(self) -> bool:
        """No package, service or health check changed (the image size alone does not count)."""
        return not (
            self.added
            or self.removed
            or self.upgraded
            or self.downgraded
            or self.services_added
            or self.services_removed
            or self.health_checks_added
            or self.health_checks_removed
            or self.health_checks_changed
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": self.before,
            "after": self.after,
            "packages": {
                "added": [{"name": n, "version": v} for n, v in self.added],
                "removed": [{"name": n, "version": v} for n, v in self.removed],
                "upgraded": [{"name": n, "old": o, "new": v} for n, o, v in self.upgraded],
                "downgraded": [{"name": n, "old": o, "new": v} for n, o, v in self.downgraded],
            },
            "services": {"added": self.services_added, "removed": self.services_removed},
            "health_checks": {
                "added": self.health_checks_added,
                "removed": self.health_checks_removed,
                "changed": self.health_checks_changed,
            },
            "size": {"before": self.size_before, "after": self.size_after, "change": self.size_change},
            "empty": self.is_empty,
        }


def _package_map(packages: tuple[Package, ...] | list[Package]) -> dict[str, str]:
    # Keyed by name; a package installed for two architectures gets "name:arch" keys so
    # neither hides the other.
    count: dict[str, int] = {}
    for p in packages:
        count[p.name] = count.get(p.name, 0) + 1
    return {(p.name if count[p.name] == 1 else f"{p.name}:{p.arch}"): p.version for p in packages}


def diff_releases(a: Manifest, b: Manifest) -> ReleaseDiff:
    d = ReleaseDiff(before=a.id, after=b.id, size_before=a.image.size, size_after=b.image.size)
    pa, pb = _package_map(a.packages), _package_map(b.packages)
    for name in sorted(pa.keys() | pb.keys()):
        if name not in pa:
            d.added.append((name, pb[name]))
        elif name not in pb:
            d.removed.append((name, pa[name]))
        elif pa[name] != pb[name]:
            # Versions that differ as strings but compare equal (1.0 vs 1.0-0) still changed.
            if debian_version_cmp(pa[name], pb[name]) <= 0:
                d.upgraded.append((name, pa[name], pb[name]))
            else:
                d.downgraded.append((name, pa[name], pb[name]))
    sa, sb = set(a.services), set(b.services)
    d.services_added = sorted(sb - sa)
    d.services_removed = sorted(sa - sb)
    ha = {h.name: h for h in a.health_checks}
    hb = {h.name: h for h in b.health_checks}
    d.health_checks_added = sorted(hb.keys() - ha.keys())
    d.health_checks_removed = sorted(ha.keys() - hb.keys())
    d.health_checks_changed = sorted(
        n
        for n in ha.keys() & hb.keys()
        if ha[n].command != hb[n].command or float(ha[n].timeout) != float(hb[n].timeout)
    )
    return d
