"""Names that end up in file names and on nodes' command lines: validated once, here."""

from __future__ import annotations

import re

from imagetool.errors import InputError
from imagetool.schema import short

# A release name and version become file names (<name>-<version>.squashfs) on the controller
# and on every node, so neither may contain '/', '..', whitespace or shell metacharacters.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+~_]{0,62}$")
RELEASE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}-[A-Za-z0-9][A-Za-z0-9.+~_]{0,62}$")


def check_name(name: object, where: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InputError(
            f"{where}: {short(name)} is not a valid release name "
            "(lowercase letters, digits and '-', starting with a letter or digit, at most 63)"
        )
    return name


def check_version(version: object, where: str = "version") -> str:
    # YAML reads `version: 1.10` as the number 1.1: the text the operator wrote is gone, and two
    # releases could end up with one id. Only whole numbers survive the round trip.
    if isinstance(version, float):
        raise InputError(f"{where}: {short(version)} was read as a number; quote it (version: \"...\") "
                         "so it stays exactly as written")
    if isinstance(version, int) and not isinstance(version, bool):
        version = str(version)
    if not isinstance(version, str) or not VERSION_RE.match(version) or ".." in version:
        raise InputError(
            f"{where}: {short(version)} is not a valid version "
            "(letters, digits and '.+~_', starting with a letter or digit, no '..', at most 63)"
        )
    return version


def check_release_id(release_id: object, where: str = "release") -> str:
    """A release id is '<name>-<version>', e.g. 'webapp-1.0'."""
    if not isinstance(release_id, str) or not RELEASE_ID_RE.match(release_id) or ".." in release_id:
        raise InputError(
            f"{where}: {short(release_id)} is not a valid release id (expected NAME-VERSION, e.g. webapp-1.0)"
        )
    return release_id


def release_id(name: str, version: str) -> str:
    return f"{name}-{version}"
