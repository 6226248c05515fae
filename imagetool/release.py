"""The release description: a YAML file that says what goes into an image.

`load_release` turns the file into frozen dataclasses or raises InputError naming the file, the
key and the problem. Nothing downstream re-validates, so everything that ends up in a file name,
a command line or a DIB environment variable is checked here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from imagetool import schema
from imagetool.errors import InputError
from imagetool.layout import trusted_key_names
from imagetool.names import check_name, check_version, release_id
from imagetool.schema import Where
from imagetool.yamlfile import load_yaml

DISTRIBUTIONS = {"debian": "debian-minimal", "ubuntu": "ubuntu-minimal"}
DEFAULT_DISTRIBUTION = "debian"
# Debian's current stable; bookworm (oldstable) keeps building and booting (examples/webapp-1-bookworm.yaml).
DEFAULT_RELEASE = "trixie"

COMPRESSIONS = ("gzip", "zstd", "xz", "lzo", "lz4")
# GRUB (2.06 and 2.12) reads squashfs compressed with these only; a machine whose GRUB loads the
# kernel from inside the image needs one of them, so gzip is the default. zstd and lz4 images
# still run in the lab, and `imagetool disk` refuses them.
GRUB_COMPRESSIONS = ("gzip", "xz", "lzo")
DEFAULT_COMPRESSION = "gzip"
# Only these compressors take -Xcompression-level in mksquashfs; xz and lz4 have no level, and
# silently ignoring a level the operator wrote would be a lie.
LEVEL_RANGES = {"zstd": (1, 22), "gzip": (1, 9), "lzo": (1, 9)}
# gzip 6, not 9: measured on the example image, 9 costs 6x the CPU (226 s vs 37 s) for 0.6% less.
DEFAULT_LEVELS = {"zstd": 15, "gzip": 6}
DEFAULT_BLOCK_SIZE = 131072
DEFAULT_HEALTH_TIMEOUT = 10

RELEASE_CODENAME_RE = re.compile(r"^[a-z0-9]+$")
ELEMENT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]*$")
# A leading '-' would read as an option to systemctl; '/' or spaces would escape the unit name.
SERVICE_RE = re.compile(r"^[A-Za-z0-9@_:][A-Za-z0-9@_.:-]*\.(service|socket|timer|target)$")
HEALTH_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
ENV_KEY_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")
# `environment:` reaches the root-run build (diskimage-builder and every element's scripts). It
# is for the elements' own options, never for what the tool sets itself (build.dib_environment)
# nor for what changes which programs run or how: a release file must not be able to run code
# of its choice as root outside its elements.
RESERVED_ENV = frozenset({
    "DIB_RELEASE", "DIB_DISTRIBUTION_MIRROR", "DIB_DEBIAN_SECURITY_MIRROR", "ELEMENTS_PATH",
    "SOURCE_DATE_EPOCH", "PATH", "HOME", "SHELL", "IFS", "ENV", "BASH_ENV", "SHELLOPTS", "BASHOPTS",
    "PS4", "CDPATH", "GLOBIGNORE", "TMPDIR", "PERL5LIB", "PERL5OPT", "RUBYOPT", "GCONV_PATH",
    "DIB_PYTHON_EXEC",
})
RESERVED_ENV_PREFIXES = ("IMAGETOOL_", "LD_", "PYTHON", "BASH_FUNC_")

TOP_KEYS = (
    "name",
    "version",
    "description",
    "base",
    "mirrors",
    "elements",
    "element_paths",
    "packages",
    "services",
    "health_checks",
    "environment",
    "squashfs",
    "source_date_epoch",
    "trusted_keys",
)
BASE_KEYS = ("distribution", "release")
MIRROR_KEYS = ("distribution", "security")
HEALTH_KEYS = ("name", "command", "timeout")
SQUASHFS_KEYS = ("compression", "level", "block_size", "fragments")


@dataclass(frozen=True)
class Base:
    distribution: str = DEFAULT_DISTRIBUTION
    release: str = DEFAULT_RELEASE

    @property
    def element(self) -> str:
        """The diskimage-builder element that provides this base."""
        return DISTRIBUTIONS[self.distribution]


@dataclass(frozen=True)
class Mirrors:
    # None means "use what apt uses on the build machine" (see effective_mirrors).
    distribution: str | None = None
    security: str | None = None


@dataclass(frozen=True)
class HealthCheck:
    name: str
    command: str
    timeout: float = DEFAULT_HEALTH_TIMEOUT


@dataclass(frozen=True)
class SquashfsOptions:
    compression: str = DEFAULT_COMPRESSION
    level: int | None = DEFAULT_LEVELS[DEFAULT_COMPRESSION]
    block_size: int = DEFAULT_BLOCK_SIZE
    # Small files packed together into shared fragment blocks: one file added shifts every later
    # fragment, so the next release's image differs in far more than what changed (measured:
    # webapp-1 -> webapp-2, 2.1% of the image in new chunks with fragments, 0.8% without, for an
    # image 2% larger). Off by default: delta staging is what the layout is for.
    fragments: bool = False


@dataclass(frozen=True)
class Release:
    path: Path
    name: str
    version: str
    description: str = ""
    base: Base = field(default_factory=Base)
    mirrors: Mirrors = field(default_factory=Mirrors)
    elements: tuple[str, ...] = ()
    element_paths: tuple[Path, ...] = ()
    # As written in the file, for manifests: absolute build paths differ between CI machines.
    element_paths_given: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    health_checks: tuple[HealthCheck, ...] = ()
    environment: dict[str, str] = field(default_factory=dict)
    squashfs: SquashfsOptions = field(default_factory=SquashfsOptions)
    source_date_epoch: int | None = None
    # Release signing keys (public, PEM) built into the image at /etc/imagetool/trusted-keys/:
    # nodes running it accept only releases signed by one of them. Name there -> file here.
    trusted_keys: dict[str, Path] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return release_id(self.name, self.version)

    @property
    def dib_elements(self) -> list[str]:
        """All elements to pass to disk-image-create: the base element first."""
        return [self.base.element, *self.elements]


# ---------------------------------------------------------------------------------------------
# Loading


def load_release(path: str | Path) -> Release:
    path = Path(path)
    doc = load_yaml(path, "release file")
    return _parse_release(doc, path, Where(path))


def _parse_release(doc: Any, path: Path, w: Where) -> Release:
    schema.mapping(doc, w, TOP_KEYS, required=("name", "version"), optional=False)
    name = check_name(doc["name"], where=str(w / "name"))
    version = check_version(doc["version"], where=str(w / "version"))

    description = doc.get("description")
    description = "" if description is None else schema.string(description, w / "description")

    base = _parse_base(doc.get("base"), w / "base")
    mirrors = _parse_mirrors(doc.get("mirrors"), w / "mirrors")
    elements = schema.string_list(
        doc.get("elements"), w / "elements", ELEMENT_RE, "element name (lowercase letters, digits, '_' and '-')"
    )
    if base.element in elements:
        i = elements.index(base.element)
        raise (w / "elements")[i].error(f"{base.element!r} comes from base.distribution; do not list it")

    given = schema.string_list(doc.get("element_paths"), w / "element_paths", re.compile(r"^.+$"), "path")
    # Element paths must stay inside the release file's own directory tree, symlinks resolved:
    # the release (and its sha256 in the manifest) then describes everything the root-run build
    # executes, and a release file received from elsewhere cannot reach into /home or /etc.
    here = path.absolute().parent.resolve()
    element_paths = []
    for i, p in enumerate(given):
        wi = (w / "element_paths")[i]
        if ":" in p:
            raise wi.error(f"{schema.short(p)}: ':' separates entries of ELEMENTS_PATH; rename the directory")
        full = (here / p).resolve()
        if full != here and here not in full.parents:
            raise wi.error(f"{schema.short(p)} resolves to {full}, outside {here}: element paths must lie "
                           "in the release file's directory tree (symlinks resolved)")
        if not full.is_dir():
            raise wi.error(f"{schema.short(p)} is not a directory (looked for {full})")
        element_paths.append(full)

    packages = schema.string_list(
        doc.get("packages"), w / "packages", PACKAGE_RE,
        "Debian package name (lowercase letters, digits and '+.-')",
    )
    services = schema.string_list(
        doc.get("services"), w / "services", SERVICE_RE,
        "systemd unit name (letters, digits and '@_.:-', ending in .service, .socket, .timer or .target)",
    )
    health_checks = _parse_health_checks(doc.get("health_checks"), w / "health_checks")
    environment = _parse_environment(doc.get("environment"), w / "environment")
    squashfs = _parse_squashfs(doc.get("squashfs"), w / "squashfs")

    sde = doc.get("source_date_epoch")
    if sde is not None:
        sde = schema.integer(sde, w / "source_date_epoch", minimum=0, maximum=253402300799)  # year 9999
    trusted_keys = _parse_trusted_keys(doc.get("trusted_keys"), w / "trusted_keys", here)

    return Release(
        path=path.absolute(),
        name=name,
        version=version,
        description=description,
        base=base,
        mirrors=mirrors,
        elements=elements,
        element_paths=tuple(element_paths),
        element_paths_given=given,
        packages=packages,
        services=services,
        health_checks=health_checks,
        environment=environment,
        squashfs=squashfs,
        source_date_epoch=sde,
        trusted_keys=trusted_keys,
    )


PEM_PUBLIC_KEY = "-----BEGIN PUBLIC KEY-----"
# As the imagetool-node element checks it: the name becomes a file in the image.
KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.pem$")
MAX_KEY_BYTES = 16 * 1024


def _parse_trusted_keys(value: Any, w: Where, here: Path) -> dict[str, Path]:
    """Public key files, relative to the release file. Checked here only to be small PEM public
    keys with names of their own; the build checks each is an Ed25519 key (imagetool.signing)."""
    given = schema.string_list(value, w, re.compile(r"^.+$"), "path")
    keys: dict[str, Path] = {}
    try:
        names = trusted_key_names([here / p for p in given])
    except ValueError as e:
        raise w.error(str(e)) from None
    for i, (name, full) in enumerate(names.items()):
        wi = w[i]
        if not KEY_NAME_RE.match(name):
            raise wi.error(f"{given[i]!r}: installed as {name!r}, which is not a key file name "
                           f"(letters, digits and '_.-')")
        if not full.is_file():
            raise wi.error(f"{given[i]!r} is not a file (looked for {full})")
        if full.stat().st_size > MAX_KEY_BYTES or PEM_PUBLIC_KEY not in full.read_text(errors="replace"):
            raise wi.error(f"{given[i]!r} is not a PEM public key (expected {PEM_PUBLIC_KEY!r}, as written by "
                           f"`imagetool keygen`)")
        keys[name] = full
    return keys


def _parse_base(value: Any, w: Where) -> Base:
    value = schema.mapping(value, w, BASE_KEYS)
    dist = schema.string(value.get("distribution", DEFAULT_DISTRIBUTION), w / "distribution")
    schema.one_of(dist, w / "distribution", DISTRIBUTIONS)
    rel = schema.string(
        value.get("release", DEFAULT_RELEASE), w / "release", RELEASE_CODENAME_RE,
        "release codename (lowercase letters and digits)",
    )
    return Base(distribution=dist, release=rel)


def _check_url(value: Any, w: Where) -> str:
    url = schema.string(value, w)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or any(ch.isspace() for ch in url):
        raise w.error(f"{url!r} is not an http:// or https:// URL")
    return url.rstrip("/")


def _parse_mirrors(value: Any, w: Where) -> Mirrors:
    value = schema.mapping(value, w, MIRROR_KEYS)
    return Mirrors(**{k: None if value.get(k) is None else _check_url(value[k], w / k) for k in MIRROR_KEYS})


def _parse_health_checks(value: Any, w: Where) -> tuple[HealthCheck, ...]:
    checks: list[HealthCheck] = []
    for i, item in enumerate(schema.sequence(value, w)):
        wi = w[i]
        schema.mapping(item, wi, HEALTH_KEYS, required=("name", "command"), optional=False)
        name = schema.string(
            item["name"], wi / "name", HEALTH_NAME_RE, "health check name (lowercase letters, digits, '_' and '-')"
        )
        if any(c.name == name for c in checks):
            raise (wi / "name").error(f"health check {name!r} is defined twice")
        command = schema.string(item["command"], wi / "command", non_empty=True)
        timeout = schema.number(item.get("timeout", DEFAULT_HEALTH_TIMEOUT), wi / "timeout", minimum=0, exclusive=True,
                                maximum=schema.MAX_SECONDS)
        checks.append(HealthCheck(name=name, command=command, timeout=timeout))
    return tuple(checks)


def _parse_environment(value: Any, w: Where) -> dict[str, str]:
    env: dict[str, str] = {}
    for k, v in schema.mapping(value, w).items():
        if not ENV_KEY_RE.match(k):
            raise (w / k).error(f"{schema.short(k)} is not a valid variable name (must match {ENV_KEY_RE.pattern})")
        if k in RESERVED_ENV or k.startswith(RESERVED_ENV_PREFIXES):
            hint = {"SOURCE_DATE_EPOCH": "; use the release's source_date_epoch key",
                    "ELEMENTS_PATH": "; use the release's element_paths key",
                    "DIB_RELEASE": "; use base.release",
                    "DIB_DISTRIBUTION_MIRROR": "; use mirrors.distribution",
                    "DIB_DEBIAN_SECURITY_MIRROR": "; use mirrors.security"}.get(k, "")
            raise (w / k).error(f"{k} is set by imagetool or changes how the build runs; a release may not "
                                f"set it{hint}")
        # DIB's own switches are 1/0 (e.g. DIB_AVOID_PACKAGES_UPDATE=1), so YAML booleans map there.
        if isinstance(v, bool):
            env[k] = "1" if v else "0"
        elif isinstance(v, int):
            env[k] = str(v)
        elif isinstance(v, str):
            if "\0" in v:
                raise (w / k).error("must not contain a NUL character")
            env[k] = v
        else:
            raise (w / k).got("a string, integer or boolean", v)
    return env


def _parse_squashfs(value: Any, w: Where) -> SquashfsOptions:
    value = schema.mapping(value, w, SQUASHFS_KEYS)
    comp = schema.string(value.get("compression", DEFAULT_COMPRESSION), w / "compression")
    schema.one_of(comp, w / "compression", COMPRESSIONS)
    level = value.get("level")
    if level is None:
        level = DEFAULT_LEVELS.get(comp)
    else:
        level = schema.integer(level, w / "level")
        if comp not in LEVEL_RANGES:
            raise (w / "level").error(
                f"{comp} has no compression level; remove the key or use one of: {', '.join(LEVEL_RANGES)}"
            )
        lo, hi = LEVEL_RANGES[comp]
        if not lo <= level <= hi:
            raise (w / "level").error(f"{level} is out of range for {comp} ({lo}..{hi})")
    block = schema.integer(value.get("block_size", DEFAULT_BLOCK_SIZE), w / "block_size")
    if not (4096 <= block <= 1048576) or block & (block - 1):
        raise (w / "block_size").error(f"{block} is not a power of two between 4096 and 1048576")
    fragments = schema.boolean(value.get("fragments", False), w / "fragments")
    return SquashfsOptions(compression=comp, level=level, block_size=block, fragments=fragments)


# ---------------------------------------------------------------------------------------------
# Mirrors: the build machine's apt already knows a reachable mirror; hosts like the default
# security.debian.org may not be reachable from CI, so read apt's sources rather than guessing.


def _is_security_suite(suite: str) -> bool:
    return suite.endswith("-security") or "/updates" in suite


def _is_distribution_suite(suite: str) -> bool:
    # A suite ending in '/' is a flat third-party repository, never a distribution mirror.
    return not (
        _is_security_suite(suite)
        or suite.endswith(("-updates", "-backports", "/"))
    )


def _one_line_entries(text: str) -> list[tuple[str, str]]:
    entries = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line)
        fields = line.split()
        if len(fields) < 3 or fields[0] != "deb":
            continue
        entries.append((fields[1], fields[2]))
    return entries


def _deb822_entries(text: str) -> list[tuple[str, str]]:
    entries = []
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last_key: str | None = None
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if current:
                stanzas.append(current)
            current, last_key = {}, None
            continue
        if raw[0] in " \t" and last_key is not None:
            current[last_key] += " " + raw.strip()
            continue
        if ":" in raw:
            k, v = raw.split(":", 1)
            last_key = k.strip().lower()
            current[last_key] = v.strip()
    if current:
        stanzas.append(current)
    for st in stanzas:
        if st.get("enabled", "yes").strip().lower() in ("no", "false", "0"):
            continue
        if "deb" not in st.get("types", "").split():
            continue
        for uri in st.get("uris", "").split():
            for suite in st.get("suites", "").split():
                entries.append((uri, suite))
    return entries


def detect_apt_mirrors(sources_dir: Path = Path("/etc/apt")) -> tuple[str | None, str | None]:
    """(distribution mirror, security mirror) as configured for apt on this machine."""
    sources_dir = Path(sources_dir)
    entries: list[tuple[str, str]] = []
    files: list[tuple[Path, bool]] = [(sources_dir / "sources.list", False)]
    d = sources_dir / "sources.list.d"
    if d.is_dir():
        for f in sorted(d.iterdir()):
            if f.name.endswith(".list"):
                files.append((f, False))
            elif f.name.endswith(".sources"):
                files.append((f, True))
    for f, deb822 in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        entries.extend(_deb822_entries(text) if deb822 else _one_line_entries(text))

    dist = next((u.rstrip("/") for u, s in entries if _is_distribution_suite(s)), None)
    sec = next((u.rstrip("/") for u, s in entries if _is_security_suite(s)), None)
    if sec is None and dist is not None:
        sec = f"{dist}-security"
    return dist, sec


def effective_mirrors(release: Release, sources_dir: Path = Path("/etc/apt")) -> Mirrors:
    """The mirrors the build will use: the release's own, else what apt uses on this machine."""
    dist, sec = release.mirrors.distribution, release.mirrors.security
    if dist is None or sec is None:
        found_dist, found_sec = detect_apt_mirrors(sources_dir)
        if dist is None and found_dist is not None:
            other = "ubuntu" if release.base.distribution == "debian" else "debian"
            # A Debian host's mirror cannot serve an Ubuntu image (and vice versa): say so now
            # rather than let debootstrap fail minutes into the build.
            if other in found_dist.lower() and release.base.distribution not in found_dist.lower():
                raise InputError(
                    f"{release.path}: key 'mirrors.distribution': this machine's apt mirror "
                    f"{found_dist} looks like {other}, not {release.base.distribution}; "
                    f"set mirrors.distribution in {release.path}"
                )
        if dist is None:
            dist = found_dist
        if sec is None:
            sec = found_sec if release.mirrors.distribution is None else f"{dist}-security"
    if dist is None:
        raise InputError(
            f"{release.path}: key 'mirrors.distribution': no apt mirror found in {sources_dir} on this "
            f"machine; set mirrors.distribution in {release.path}"
        )
    return Mirrors(distribution=dist, security=sec)
