"""Version ordering, as dpkg orders versions: 1.9 < 1.10, 2.0~rc1 < 2.0, epochs first.

Package versions in manifests and release versions in the store both sort this way; python-debian
does the comparing.
"""

from __future__ import annotations

from debian.debian_support import Version


def _debian(version: str) -> str:
    # Release versions may contain '_' (see names.VERSION_RE), which Debian versions may not;
    # read it as the separator it stands for.
    return version.replace("_", ".")


def version_key(version: str) -> Version:
    """A sort key that orders versions as dpkg does."""
    return Version(_debian(version))


def debian_version_cmp(a: str, b: str) -> int:
    """-1, 0 or 1 as `dpkg --compare-versions` orders a and b."""
    va, vb = version_key(a), version_key(b)
    return (va > vb) - (va < vb)
