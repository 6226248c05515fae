"""Commands about images: build, keygen, verify, images list/show, diff, disk."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from imagetool.cli.common import (
    console,
    handle_errors,
    human_bytes,
    json_option,
    main,
    out,
    parse_size,
    print_json,
    safe,
    store_option,
    verbosity,
    working,
)

# ------------------------------------------------------------------------------------ build


@main.command()
@click.argument("release_file", type=click.Path(dir_okay=False))
@store_option
@click.option("--force", is_flag=True, help="Rebuild a release that is already in the store.")
@click.option("--sign-key", type=click.Path(dir_okay=False), default=None,
              help="ed25519 private key (PEM) to sign the manifest.")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None, help="Scratch space (default /var/tmp).")
@click.option("--keep-work", is_flag=True, help="Keep the scratch directory (root tree, DIB output).")
@json_option
@handle_errors
def build(release_file: str, store: str | None, force: bool, sign_key: str | None, work_dir: str | None,
          keep_work: bool, as_json: bool) -> None:
    """Build RELEASE_FILE (YAML) into the release store."""
    from imagetool.build import BuildOptions
    from imagetool.build import build as do_build
    from imagetool.release import load_release
    from imagetool.store import Store, default_store_path

    release = load_release(release_file)
    st = Store(default_store_path(store))
    options = BuildOptions(force=force, sign_key=Path(sign_key) if sign_key else None,
                           work_dir=Path(work_dir) if work_dir else None, keep_work=keep_work)
    started = time.monotonic()
    with working(f"building {safe(release.id)}") as update:
        def progress(step: str, detail: str) -> None:
            update(f"building {safe(release.id)}: [bold]{safe(step)}[/] {safe(detail)}")
        stored = do_build(release, st, options, progress)
    m = stored.manifest
    if as_json:
        print_json({"id": m.id, "seconds": round(time.monotonic() - started, 1), "manifest": m.to_dict(),
                    "paths": {"squashfs": str(stored.squashfs), "manifest": str(stored.manifest_path)}})
        return
    console.print(f"built [bold]{safe(m.id)}[/] in {time.monotonic() - started:.0f}s")
    if not verbosity.quiet:
        show_manifest(m, stored)


def show_manifest(m: Any, stored: Any) -> None:
    # Everything here is the manifest's word (a file anyone could have written): shown, not parsed.
    t = Table(show_header=False, box=None)
    t.add_row("release", safe(m.id))
    t.add_row("image", f"{safe(stored.squashfs)} ({human_bytes(m.image.size)})")
    t.add_row("sha256", safe(m.image.sha256))
    t.add_row("signed", "yes" if stored.sig else "no")
    t.add_row("built", safe(f"{m.built_at} with imagetool {m.builder.imagetool}, "
                            f"diskimage-builder {m.builder.diskimage_builder}"))
    t.add_row("base", safe(f"{m.base.distribution} {m.base.release}"))
    t.add_row("elements", safe(" ".join(m.elements)))
    t.add_row("packages", str(len(m.packages)))
    t.add_row("services", safe(" ".join(m.services) or "-"))
    t.add_row("health checks", safe(" ".join(h.name for h in m.health_checks) or "-"))
    out.print(t)


# ------------------------------------------------------------------------------- keys, verify


@main.command()
@click.option("--private", "private_key", type=click.Path(dir_okay=False), default="imagetool.key", show_default=True)
@click.option("--public", "public_key", type=click.Path(dir_okay=False), default="imagetool.pub", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
@json_option
@handle_errors
def keygen(private_key: str, public_key: str, force: bool, as_json: bool) -> None:
    """Make an ed25519 key pair for signing releases."""
    from imagetool.signing import generate_keypair

    generate_keypair(Path(private_key), Path(public_key), force=force)
    if as_json:
        print_json({"private": private_key, "public": public_key})
        return
    console.print(f"wrote {safe(private_key)} (private, mode 0600) and {safe(public_key)}", highlight=False)


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
        console.print(f"{safe(m.id)}: sha256 ok" + (", signature ok" if key else " (signature not checked: no --key)"))


@main.command()
@click.argument("release")
@store_option
@click.option("--to", "to", required=True, type=click.Path(file_okay=False),
              help="Directory a static HTTP server (nginx, a CDN, a bucket synced from it) serves to the nodes.")
@json_option
@handle_errors
def publish(release: str, store: str | None, to: str, as_json: bool) -> None:
    """Put RELEASE's chunks, index, manifest and signature where nodes fetch them with plain HTTP
    GETs (`stage`/`rollout --source URL`). Chunks shared with releases published before are kept once."""
    from imagetool.chunks import publish as publish_release
    from imagetool.store import Store, default_store_path, resolve_release
    from rollout.stage import check_release_files

    stored = resolve_release(Store(default_store_path(store)), release)
    check_release_files(stored)
    result = publish_release(stored, Path(to))
    if as_json:
        print_json(result.to_dict())
    else:
        console.print(f"published {safe(stored.id)} to {safe(to)}: {result.chunks} chunks, {result.new_chunks} new "
                      f"({human_bytes(result.new_bytes)})")


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
    t = Table(title=f"releases in {safe(st.path)}")
    for col in ("release", "size", "built", "signed", "sha256"):
        t.add_column(col)
    for r in releases:
        t.add_row(safe(r.id), human_bytes(r.manifest.image.size), safe(r.manifest.built_at), "yes" if r.sig else "no",
                  safe(r.manifest.image.sha256[:16]))
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
    t = Table(title=f"{safe(ra.id)} → {safe(rb.id)}")
    for col in ("change", "package", "from", "to"):
        t.add_column(col)
    for name, version in d.added:
        t.add_row("[green]added[/]", safe(name), "", safe(version))
    for name, version in d.removed:
        t.add_row("[red]removed[/]", safe(name), safe(version), "")
    for name, old, new in d.upgraded:
        t.add_row("upgraded", safe(name), safe(old), safe(new))
    for name, old, new in d.downgraded:
        t.add_row("[yellow]downgraded[/]", safe(name), safe(old), safe(new))
    out.print(t)
    for label, items in (("services added", d.services_added), ("services removed", d.services_removed),
                         ("health checks added", d.health_checks_added),
                         ("health checks removed", d.health_checks_removed),
                         ("health checks changed", d.health_checks_changed)):
        if items:
            out.print(f"{label}: {safe(', '.join(items))}")
    out.print(f"image size: {human_bytes(d.size_before)} → {human_bytes(d.size_after)} "
              f"({'+' if d.size_change >= 0 else '-'}{human_bytes(abs(d.size_change))})")


# ------------------------------------------------------------------------------------ disk


@main.command()
@click.argument("release")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="The disk file to write.")
@click.option("--format", "disk_format", type=click.Choice(["raw", "qcow2"]), default="raw", show_default=True)
@click.option("--size", default="8G", show_default=True, help="Disk size; /var gets all but the first 65 MiB.")
@click.option("--authorized-key", "authorized_keys", multiple=True, type=click.Path(dir_okay=False),
              help="SSH public key allowed to log in as root (repeatable).")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False),
              help="Release signing public key (PEM) the node trusts (repeatable).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT.")
@store_option
@json_option
@handle_errors
def disk(release: str, output: str, disk_format: str, size: str, authorized_keys: tuple[str, ...],
         trusted_keys: tuple[str, ...], force: bool, store: str | None, as_json: bool) -> None:
    """Write a bootable disk (GRUB for BIOS and UEFI, /var holding RELEASE as committed) for a real machine."""
    from imagetool.disk import DiskOptions, make_disk
    from imagetool.store import Store, default_store_path, resolve_release

    stored = resolve_release(Store(default_store_path(store)), release)
    options = DiskOptions(output=Path(output), format=disk_format, size=parse_size(size),
                          authorized_keys=[Path(k) for k in authorized_keys],
                          trusted_keys=[Path(k) for k in trusted_keys], force=force)
    started = time.monotonic()
    with working(f"disk for {safe(stored.id)}") as update:
        def progress(step: str, detail: str) -> None:
            update(f"disk for {safe(stored.id)}: [bold]{safe(step)}[/] {safe(detail)}")
        result = make_disk(stored, options, progress)
    seconds = round(time.monotonic() - started, 1)
    if as_json:
        print_json({**result.to_dict(), "seconds": seconds})
        return
    console.print(f"wrote [bold]{safe(str(result.path))}[/] ({result.format}, {human_bytes(result.size)}) "
                  f"in {seconds:.0f}s")
    if verbosity.quiet:
        return
    t = Table("#", "partition", "size", "holds", box=None)
    holds = {"bios": "GRUB core (BIOS)", "esp": "EFI/BOOT/BOOTX64.EFI, grub/grub.cfg",
             "var": f"/var: {safe(stored.id)} committed, GRUB environment block"}
    for p in result.partitions:
        t.add_row(str(p["number"]), str(p["name"]), human_bytes(int(p["size"])), holds[str(p["name"])])  # type: ignore[call-overload]
    out.print(t)
