"""The imagetool command line: parse, call the core, print. Nothing else lives here."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from imagetool.errors import EXIT_CODES, ImagetoolError

console = Console(stderr=True)
out = Console()


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The one place where core errors become messages and exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ImagetoolError as e:
            console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]")
            sys.exit(130)

    return wrapper


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


EPILOG = "Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items())


@click.group(epilog=EPILOG)
@click.version_option(package_name="imagetool")
def main() -> None:
    """Build read-only root images, roll them out node by node behind health gates, roll back."""


store_option = click.option(
    "--store", type=click.Path(file_okay=False), default=None,
    help="Release store directory (default: $IMAGETOOL_STORE or ./releases).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")


# ------------------------------------------------------------------------------------ build


@main.command()
@click.argument("release_file", type=click.Path(dir_okay=False))
@store_option
@click.option("--force", is_flag=True, help="Rebuild a release that is already in the store.")
@click.option("--sign-key", type=click.Path(dir_okay=False), default=None, help="ed25519 private key (PEM) to sign the manifest.")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None, help="Scratch space (default /var/tmp).")
@click.option("--keep-work", is_flag=True, help="Keep the scratch directory (root tree, DIB output).")
@json_option
@handle_errors
def build(release_file: str, store: str | None, force: bool, sign_key: str | None, work_dir: str | None,
          keep_work: bool, as_json: bool) -> None:
    """Build RELEASE_FILE (YAML) into the release store."""
    from imagetool.build import BuildOptions, build as do_build
    from imagetool.release import load_release
    from imagetool.store import Store, default_store_path

    release = load_release(release_file)
    st = Store(default_store_path(store))
    options = BuildOptions(force=force, sign_key=Path(sign_key) if sign_key else None,
                           work_dir=Path(work_dir) if work_dir else None, keep_work=keep_work)
    started = time.monotonic()
    with console.status(f"building {release.id}") as status:
        def progress(step: str, detail: str) -> None:
            status.update(f"building {release.id}: [bold]{step}[/] {detail}  ({time.monotonic() - started:.0f}s)")
        stored = do_build(release, st, options, progress)
    m = stored.manifest
    if as_json:
        print_json({"id": m.id, "seconds": round(time.monotonic() - started, 1), "manifest": m.to_dict(),
                    "paths": {"squashfs": str(stored.squashfs), "manifest": str(stored.manifest_path)}})
        return
    console.print(f"built [bold]{m.id}[/] in {time.monotonic() - started:.0f}s")
    show_manifest(m, stored)


def show_manifest(m: Any, stored: Any) -> None:
    t = Table(show_header=False, box=None)
    t.add_row("release", m.id)
    t.add_row("image", f"{stored.squashfs} ({human_bytes(m.image.size)})")
    t.add_row("sha256", m.image.sha256)
    t.add_row("signed", "yes" if stored.sig else "no")
    t.add_row("built", f"{m.built_at} with imagetool {m.builder.imagetool}, diskimage-builder {m.builder.diskimage_builder}")
    t.add_row("base", f"{m.base.distribution} {m.base.release}")
    t.add_row("elements", " ".join(m.elements))
    t.add_row("packages", str(len(m.packages)))
    t.add_row("services", " ".join(m.services) or "-")
    t.add_row("health checks", " ".join(h.name for h in m.health_checks) or "-")
    out.print(t)


# ------------------------------------------------------------------------------- keys, verify


@main.command()
@click.option("--private", "private_key", type=click.Path(dir_okay=False), default="imagetool.key", show_default=True)
@click.option("--public", "public_key", type=click.Path(dir_okay=False), default="imagetool.pub", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
@handle_errors
def keygen(private_key: str, public_key: str, force: bool) -> None:
    """Make an ed25519 key pair for signing releases."""
    from imagetool.signing import generate_keypair

    generate_keypair(Path(private_key), Path(public_key), force=force)
    console.print(f"wrote {private_key} (private, mode 0600) and {public_key}")


@main.command()
@click.argument("release")
@store_option
@click.option("--key", type=click.Path(dir_okay=False), default=None, help="Public key: require a valid signature.")
@json_option
@handle_errors
def verify(release: str, store: str | None, key: str | None, as_json: bool) -> None:
    """Check a release's sha256 (and signature with --key). RELEASE: an id or a manifest path."""
    from imagetool.signing import verify_release
    from imagetool.store import Store, default_store_path, resolve_release

    stored = resolve_release(Store(default_store_path(store)), release)
    m = verify_release(stored.squashfs, stored.manifest_path, stored.sig, Path(key) if key else None)
    if as_json:
        print_json({"id": m.id, "ok": True, "sha256": m.image.sha256, "signature_checked": bool(key)})
    else:
        console.print(f"{m.id}: sha256 ok" + (", signature ok" if key else " (signature not checked: no --key)"))


# ------------------------------------------------------------------------------- store views


@main.group()
def images() -> None:
    """The local release store."""


@images.command("list")
@store_option
@json_option
@handle_errors
def images_list(store: str | None, as_json: bool) -> None:
    """List the releases in the store."""
    from imagetool.store import Store, default_store_path

    st = Store(default_store_path(store))
    releases = st.list()
    if as_json:
        print_json([{"id": r.id, "size": r.manifest.image.size, "sha256": r.manifest.image.sha256,
                     "built_at": r.manifest.built_at, "signed": r.sig is not None} for r in releases])
        return
    t = Table(title=f"releases in {st.path}")
    for col in ("release", "size", "built", "signed", "sha256"):
        t.add_column(col)
    for r in releases:
        t.add_row(r.id, human_bytes(r.manifest.image.size), r.manifest.built_at, "yes" if r.sig else "no",
                  r.manifest.image.sha256[:16])
    out.print(t)


@images.command("show")
@click.argument("release")
@store_option
@json_option
@handle_errors
def images_show(release: str, store: str | None, as_json: bool) -> None:
    """Show one release's manifest."""
    from imagetool.store import Store, default_store_path, resolve_release

    stored = resolve_release(Store(default_store_path(store)), release)
    if as_json:
        print_json(stored.manifest.to_dict())
    else:
        show_manifest(stored.manifest, stored)


@main.command()
@click.argument("a")
@click.argument("b")
@store_option
@json_option
@handle_errors
def diff(a: str, b: str, store: str | None, as_json: bool) -> None:
    """Package-level difference between releases A and B."""
    from imagetool.diff import diff_releases
    from imagetool.store import Store, default_store_path, resolve_release

    st = Store(default_store_path(store))
    ra, rb = resolve_release(st, a), resolve_release(st, b)
    d = diff_releases(ra.manifest, rb.manifest)
    if as_json:
        print_json(d.to_dict())
        return
    t = Table(title=f"{ra.id} → {rb.id}")
    for col in ("change", "package", "from", "to"):
        t.add_column(col)
    for name, version in d.added:
        t.add_row("[green]added[/]", name, "", version)
    for name, version in d.removed:
        t.add_row("[red]removed[/]", name, version, "")
    for name, old, new in d.upgraded:
        t.add_row("upgraded", name, old, new)
    for name, old, new in d.downgraded:
        t.add_row("[yellow]downgraded[/]", name, old, new)
    out.print(t)
    for label, items in (("services added", d.services_added), ("services removed", d.services_removed),
                         ("health checks added", d.health_checks_added),
                         ("health checks removed", d.health_checks_removed),
                         ("health checks changed", d.health_checks_changed)):
        if items:
            out.print(f"{label}: {', '.join(items)}")
    out.print(f"image size: {human_bytes(d.size_before)} → {human_bytes(d.size_after)} "
              f"({'+' if d.size_change >= 0 else '-'}{human_bytes(abs(d.size_change))})")


# ---------------------------------------------------------------------------------------- lab


lab_option = click.option("--lab", "lab_name", default="default", show_default=True, help="Lab name (labs coexist by name).")
lab_root_option = click.option("--lab-dir", type=click.Path(file_okay=False), default=None,
                               help="Where labs keep their state (default: $IMAGETOOL_LAB_DIR or /var/lib/imagetool-lab).")


@main.group()
def lab() -> None:
    """The local lab cluster: real nodes on this machine (systemd-nspawn, network namespaces)."""


@lab.command("up")
@click.option("--nodes", "n_nodes", type=int, default=3, show_default=True)
@click.option("--release", "release_ref", required=True, help="Initial release (id in the store, or manifest path).")
@click.option("--var-size", default="4G", show_default=True, help="Size of each node's /var filesystem.")
@store_option
@lab_option
@lab_root_option
@json_option
@handle_errors
def lab_up(n_nodes: int, release_ref: str, var_size: str, store: str | None, lab_name: str, lab_dir: str | None,
           as_json: bool) -> None:
    """Bring up N nodes booting RELEASE, and write their inventory and known_hosts."""
    from imagetool import lab as labmod
    from imagetool.store import Store, default_store_path, resolve_release

    release = resolve_release(Store(default_store_path(store)), release_ref)
    started = time.monotonic()
    with console.status(f"lab {lab_name}: starting") as status:
        def progress(step: str, detail: str) -> None:
            status.update(f"lab {lab_name}: [bold]{step}[/] {escape(detail)}  ({time.monotonic() - started:.0f}s)")
        the_lab = labmod.up(lab_name, n_nodes, release, root=Path(lab_dir) if lab_dir else None,
                            var_size=parse_size(var_size), progress=progress)
    if as_json:
        print_json({"lab": the_lab.name, "inventory": str(the_lab.inventory), "known_hosts": str(the_lab.known_hosts),
                    "seconds": round(time.monotonic() - started, 1),
                    "nodes": [{"name": n.name, "address": n.address} for n in the_lab.nodes]})
        return
    console.print(f"lab [bold]{the_lab.name}[/]: {len(the_lab.nodes)} nodes up on {release.id} "
                  f"in {time.monotonic() - started:.0f}s")
    out.print(f"inventory:   {the_lab.inventory}\nknown_hosts: {the_lab.known_hosts}")
    n = the_lab.nodes[0]
    out.print(f"try: ssh -i {the_lab.key} -o UserKnownHostsFile={the_lab.known_hosts} root@{n.address}")


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units and t[-1] != "" else (t, "")
    try:
        return int(float(num) * units[unit])
    except (ValueError, KeyError):
        raise click.BadParameter(f"{text!r} is not a size (e.g. 4G, 512M)") from None


@lab.command("status")
@lab_option
@lab_root_option
@json_option
@handle_errors
def lab_status(lab_name: str, lab_dir: str | None, as_json: bool) -> None:
    """Nodes, addresses, booted release, running or not."""
    from imagetool import lab as labmod

    the_lab = labmod.load_lab(lab_name, Path(lab_dir) if lab_dir else None)
    states = labmod.status(the_lab)
    if as_json:
        print_json({"lab": the_lab.name, "subnet": the_lab.subnet, "inventory": str(the_lab.inventory),
                    "nodes": [s.to_dict() for s in states]})
        return
    t = Table(title=f"lab {the_lab.name} ({the_lab.subnet})")
    for col in ("node", "address", "power", "booted", "state", "network"):
        t.add_column(col)
    for s in states:
        t.add_row(s.name, s.address, "on" if s.powered else "off", s.booted or "-", s.system_state, s.network)
    out.print(t)


@lab.command("down")
@lab_option
@lab_root_option
@json_option
@handle_errors
def lab_down(lab_name: str, lab_dir: str | None, as_json: bool) -> None:
    """Remove every namespace, link, mount, loop device, process and file of the lab."""
    from imagetool import lab as labmod

    root = Path(lab_dir) if lab_dir else None
    report = labmod.down(lab_name, root)
    left = {k: v for k, v in labmod.leftovers(lab_name, root).items() if v}
    if as_json:
        print_json({"removed": report.to_dict(), "leftovers": left})
    else:
        console.print(f"lab {lab_name} down: removed {report.processes} processes, {report.mounts} mounts, "
                      f"{report.loops} loop devices, {report.netns} namespaces, {report.links} links")
    if left:
        raise ImagetoolError(f"lab {lab_name}: could not remove {left}")


def _lab_node_command(name: str, doc: str, action: Callable[..., Any]) -> None:
    @lab.command(name, help=doc)
    @click.argument("node")
    @lab_option
    @lab_root_option
    @handle_errors
    def command(node: str, lab_name: str, lab_dir: str | None) -> None:
        from imagetool import lab as labmod

        the_lab = labmod.load_lab(lab_name, Path(lab_dir) if lab_dir else None)
        action(labmod, the_lab, node)
        console.print(f"lab {lab_name}: {name} {node}")


_lab_node_command("reset", "Hard reset NODE (no clean shutdown); it boots again.", lambda m, l, n: m.reset(l, n))
_lab_node_command("kill", "Crash NODE: it stays down until `lab start`.", lambda m, l, n: m.kill(l, n))
_lab_node_command("start", "Power NODE on.", lambda m, l, n: m.start(l, n))
_lab_node_command("cut", "Cut NODE's network.", lambda m, l, n: m.cut(l, n))
_lab_node_command("heal", "Restore NODE's network.", lambda m, l, n: m.heal(l, n))
_lab_node_command("unfill", "Remove the filler from NODE's /var.", lambda m, l, n: m.unfill(l, n))


@lab.command("fill")
@click.argument("node")
@click.option("--leave", default="1M", show_default=True, help="Free space to leave on NODE's /var.")
@lab_option
@lab_root_option
@handle_errors
def lab_fill(node: str, leave: str, lab_name: str, lab_dir: str | None) -> None:
    """Fill NODE's /var (a full disk, for tests)."""
    from imagetool import lab as labmod

    the_lab = labmod.load_lab(lab_name, Path(lab_dir) if lab_dir else None)
    size = labmod.fill(the_lab, node, parse_size(leave))
    console.print(f"lab {lab_name}: filled {node}'s /var with {human_bytes(size)}")


if __name__ == "__main__":
    main()
