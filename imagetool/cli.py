"""The imagetool command line: parse, call the core, print. Nothing else lives here."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from imagetool.errors import EXIT_CODES, ImagetoolError


def _width(stream: Any) -> int | None:
    """Into a file or a pipe (CI logs), tables get room instead of being cut at 80 columns."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return None if tty or "COLUMNS" in os.environ else 200


console = Console(stderr=True, soft_wrap=True, width=_width(sys.stderr))
out = Console(soft_wrap=True, width=_width(sys.stdout))


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
    with console.status(f"disk for {stored.id}") as status:
        def progress(step: str, detail: str) -> None:
            status.update(f"disk for {escape(stored.id)}: [bold]{step}[/] {escape(detail)}")
        result = make_disk(stored, options, progress)
    seconds = round(time.monotonic() - started, 1)
    if as_json:
        print_json({**result.to_dict(), "seconds": seconds})
        return
    console.print(f"wrote [bold]{escape(str(result.path))}[/] ({result.format}, {human_bytes(result.size)}) "
                  f"in {seconds:.0f}s")
    t = Table("#", "partition", "size", "holds", box=None)
    holds = {"bios": "GRUB core (BIOS)", "esp": "EFI/BOOT/BOOTX64.EFI, grub/grub.cfg",
             "var": f"/var: {stored.id} committed, GRUB environment block"}
    for p in result.partitions:
        t.add_row(str(p["number"]), str(p["name"]), human_bytes(int(p["size"])), holds[str(p["name"])])  # type: ignore[call-overload]
    out.print(t)


@main.group()
def lab() -> None:
    """The local lab cluster: real nodes on this machine (systemd-nspawn containers, or qemu VMs booting
    the disk `imagetool disk` makes)."""


@lab.command("up")
@click.option("--nodes", "n_nodes", type=int, default=3, show_default=True)
@click.option("--release", "release_ref", required=True, help="Initial release (id in the store, or manifest path).")
@click.option("--var-size", default="4G", show_default=True, help="Size of each node's /var filesystem.")
@click.option("--vm", "all_vms", is_flag=True, help="Make every node a VM (qemu booting a disk of RELEASE).")
@click.option("--vm-nodes", type=click.IntRange(min=0), default=None, metavar="K",
              help="Make the K highest-numbered nodes VMs, the others containers.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
              help="VM accelerator; auto: $IMAGETOOL_LAB_ACCEL if set, else KVM if a short probe runs under it, else TCG.")
@store_option
@lab_option
@lab_root_option
@json_option
@handle_errors
def lab_up(n_nodes: int, release_ref: str, var_size: str, all_vms: bool, vm_nodes: int | None, accel: str,
           store: str | None, lab_name: str, lab_dir: str | None, as_json: bool) -> None:
    """Bring up N nodes booting RELEASE, and write their inventory and known_hosts."""
    from imagetool import lab as labmod
    from imagetool.store import Store, default_store_path, resolve_release

    if all_vms and vm_nodes not in (None, n_nodes):
        raise click.UsageError(f"--vm makes all {n_nodes} nodes VMs; --vm-nodes {vm_nodes} says otherwise")
    n_vms = n_nodes if all_vms else vm_nodes or 0
    release = resolve_release(Store(default_store_path(store)), release_ref)
    started = time.monotonic()
    with console.status(f"lab {lab_name}: starting") as status:
        def progress(step: str, detail: str) -> None:
            status.update(f"lab {lab_name}: [bold]{step}[/] {escape(detail)}  ({time.monotonic() - started:.0f}s)")
        the_lab = labmod.up(lab_name, n_nodes, release, root=Path(lab_dir) if lab_dir else None,
                            var_size=parse_size(var_size), vm_nodes=n_vms, accel=accel, progress=progress)
    if as_json:
        print_json({"lab": the_lab.name, "inventory": str(the_lab.inventory), "known_hosts": str(the_lab.known_hosts),
                    "seconds": round(time.monotonic() - started, 1), "accel": the_lab.accel,
                    "nodes": [{"name": n.name, "address": n.address, "kind": n.kind} for n in the_lab.nodes]})
        return
    vms = f" ({n_vms} of them VMs under {the_lab.accel})" if n_vms else ""
    console.print(f"lab [bold]{the_lab.name}[/]: {len(the_lab.nodes)} nodes{vms} up on {release.id} "
                  f"in {time.monotonic() - started:.0f}s")
    out.print(f"inventory:   {the_lab.inventory}\nknown_hosts: {the_lab.known_hosts}")
    n = the_lab.nodes[0]
    out.print(f"try: ssh -i {the_lab.key} -o UserKnownHostsFile={the_lab.known_hosts} root@{n.address}")


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], units[t[-1]]) if t and t[-1] in units else (t, 1)
    try:
        return int(float(num) * unit)
    except ValueError:
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
    for col in ("node", "kind", "address", "power", "booted", "state", "network"):
        t.add_column(col)
    for s in states:
        t.add_row(s.name, s.kind, s.address, "on" if s.powered else "off", s.booted or "-", s.system_state, s.network)
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
                      f"{report.loops} loop devices, {report.netns} namespaces, {report.links} links, "
                      f"{report.cgroups} cgroups")
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


# ------------------------------------------------------------------------------ nodes: stage,
# ------------------------------------------------------------------------------ rollout, rollback, status

inventory_option = click.option(
    "-i", "--inventory", required=True, type=click.Path(dir_okay=False), help="Inventory file (YAML).")
host_keys_option = click.option(
    "--accept-new-host-keys", is_flag=True, help="Trust and record host keys not yet in known_hosts.")
limit_option = click.option(
    "--limit", multiple=True, metavar="NAME|GROUP", help="Only these nodes or groups (repeatable).")
parallel_option = click.option(
    "--parallel", type=click.IntRange(min=1), default=4, show_default=True,
    help="Nodes staged or contacted at once.")


def rollout_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The batching, policy and health-gate options rollout and rollback share."""
    from rollout.batch import DEFAULT_BATCHES

    options = [
        click.option("--batch", "batches", default=DEFAULT_BATCHES, show_default=True,
                     help="Batch sizes, Ansible serial style: '1,2,25%' (the last repeats). The first batch is the canary."),
        click.option("--pause", type=click.FloatRange(min=0), default=0, show_default=True, help="Seconds between batches."),
        click.option("--max-failures", default="0", show_default=True, metavar="N|P%",
                     help="Failed nodes tolerated (over the whole run) before stopping."),
        click.option("--on-failure", type=click.Choice(["rollback-node", "rollback-all"]), default="rollback-node",
                     show_default=True, help="When stopping: leave moved nodes, or move every one back too."),
        click.option("--confirm-timeout", type=click.FloatRange(min=1), default=300, show_default=True,
                     help="Seconds a node waits for confirmation of a new boot before it reboots back by itself."),
        click.option("--boot-timeout", type=click.FloatRange(min=1), default=180, show_default=True,
                     help="Seconds to wait for a node to come back after a reboot."),
        click.option("--health-timeout", type=click.FloatRange(min=0), default=120, show_default=True,
                     help="Seconds a freshly booted node may take to become healthy."),
        click.option("--check-http", multiple=True, metavar="URL[=STATUS]",
                     help="Extra health check from here, e.g. http://{host}:8080/health=200 (repeatable)."),
        click.option("--check-tcp", multiple=True, metavar="HOST:PORT", help="Extra TCP check from here, e.g. {host}:5432."),
        click.option("--check-command", multiple=True, metavar="CMD", help="Extra check command run on the node."),
        click.option("--rollout-id", default=None, help="Take over an interrupted run's locks by its id and carry on."),
        click.option("--break-lock", is_flag=True,
                     help="Take over node locks of other runs older than --lock-max-age (says whose it broke)."),
        click.option("--lock-max-age", type=click.FloatRange(min=0), default=3600, show_default=True, metavar="S",
                     help="Age in seconds after which --break-lock may take a lock over."),
        click.option("--dry-run", is_flag=True, help="Connect, plan and show; change nothing."),
        limit_option,
        parallel_option,
        host_keys_option,
        json_option,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _make_options(kw: dict[str, Any], command: str) -> Any:
    from rollout.checks import cli_checks
    from rollout.update import RolloutOptions

    return RolloutOptions(
        batches=kw["batches"], pause=kw["pause"], max_failures=kw["max_failures"], on_failure=kw["on_failure"],
        confirm_timeout=kw["confirm_timeout"], boot_timeout=kw["boot_timeout"], health_timeout=kw["health_timeout"],
        parallel=kw["parallel"], dry_run=kw["dry_run"], accept_new_host_keys=kw["accept_new_host_keys"],
        rollout_id=kw["rollout_id"], limit=list(kw["limit"]) or None,
        checks=cli_checks(http=kw["check_http"], tcp=kw["check_tcp"], command=kw["check_command"]),
        command=command, break_lock=kw["break_lock"], lock_max_age=kw["lock_max_age"],
    )


class LiveView:
    """Per-node live view on stderr: batch, step, detail, time in step; byte progress while
    staging. Events arrive from worker threads. Without a terminal, one line per event."""

    def __init__(self, names: list[str], title: str, *, stage_events: bool = False) -> None:
        import threading

        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.title = title
        self.started = time.monotonic()
        self.rows: dict[str, dict[str, Any]] = {
            n: {"batch": "", "step": "waiting", "detail": "", "since": self.started} for n in names}
        self.lock = threading.Lock()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=console)
        self.tasks: dict[str, Any] = {}
        self.total_task: Any = None
        self.interactive = console.is_terminal
        self.live: Any = None
        # `imagetool stage` has no rollout events: staging results are its only news.
        self.stage_events = stage_events

    def __enter__(self) -> LiveView:
        if self.interactive:
            from rich.live import Live

            self.live = Live(self, console=console, refresh_per_second=4)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def __rich__(self) -> Any:
        from rich.console import Group

        with self.lock:
            t = Table(title=f"{self.title}  ({time.monotonic() - self.started:.0f}s)", title_justify="left")
            for col in ("node", "batch", "step", "detail", "time"):
                t.add_column(col)
            now = time.monotonic()
            for name, row in self.rows.items():
                style = {"done": "green", "skipped": "green", "failed": "bold red", "rolled-back": "yellow",
                         "rollback": "yellow", "not-started": "dim"}.get(row["step"], "")
                step = f"[{style}]{row['step']}[/]" if style else row["step"]
                t.add_row(name, row["batch"], step, escape(row["detail"][-80:]), f"{now - row['since']:.0f}s")
            return Group(self.progress, t) if self.tasks else t

    def event(self, node: str, step: str, detail: str) -> None:
        with self.lock:
            row = self.rows.get(node)
            if step == "batch" and row is not None:
                row["batch"] = detail
                return
            if row is not None:
                if row["step"] != step:
                    row["since"] = time.monotonic()
                row["step"], row["detail"] = step, detail
        if not self.interactive:
            console.print(f"{time.monotonic() - self.started:6.1f}s  {node:<16} {step:<12} {escape(detail)}",
                          highlight=False)

    # rollout.stage.StageProgress
    def stage_start(self, node: str, total: int) -> None:
        with self.lock:
            if node in self.tasks:
                self.progress.reset(self.tasks[node], total=total)
            else:
                self.tasks[node] = self.progress.add_task(node, total=total)
            if self.total_task is None:
                self.total_task = self.progress.add_task("[bold]total[/]", total=0)
            self.progress.update(self.total_task, total=sum(t.total or 0 for t in self.progress.tasks
                                                              if t.id != self.total_task))

    def stage_advance(self, node: str, done: int) -> None:
        with self.lock:
            task = self.tasks.get(node)
            if task is None:
                return
            self.progress.update(task, completed=done)
            self.progress.update(self.total_task, completed=sum(t.completed for t in self.progress.tasks
                                                                  if t.id != self.total_task))

    def stage_end(self, node: str, result: Any) -> None:
        if self.stage_events:
            self.event(node, "failed" if result.error else "staged",
                       f"{result.outcome}, {human_bytes(result.bytes_sent)}" + (f": {result.error}" if result.error else ""))


def _first_line(text: str | None, width: int = 60) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def show_result(result: Any, as_json: bool) -> None:
    if as_json:
        print_json(result.to_dict())
    else:
        what = f"{result.kind} {result.rollout_id}" + (f" → {result.target}" if result.target else "")
        t = Table(title=what + (" (dry run: nothing was changed)" if result.dry_run else ""))
        styles = {"done": "green", "skipped": "green", "planned": "cyan", "failed": "bold red",
                  "rolled-back": "yellow", "not-started": "dim"}
        if result.dry_run:
            for col in ("node", "batch", "from", "to", "action", "to stage"):
                t.add_column(col)
            t.add_column("why", no_wrap=True, overflow="ellipsis")
            for r in result.nodes:
                action = {"planned": "activate", "skipped": "skip"}.get(r.outcome, r.outcome)
                t.add_row(r.node, str(r.batch or ""), r.from_id or "-", r.to_id or "-",
                          f"[{styles[r.outcome]}]{action}[/]", human_bytes(r.stage_bytes),
                          escape(_first_line(r.error or r.detail, 90)))
        else:
            for col in ("node", "batch", "from", "to", "outcome", "time", "bytes"):
                t.add_column(col)
            t.add_column("error", no_wrap=True, overflow="ellipsis")
            for r in result.nodes:
                t.add_row(r.node, str(r.batch or ""), r.from_id or "-", r.to_id or "-",
                          f"[{styles[r.outcome]}]{r.outcome}[/]", f"{r.seconds:.0f}s", human_bytes(r.bytes_sent),
                          escape(_first_line(r.error)))
        out.print(t)
        for r in result.nodes:
            if r.error and r.outcome not in ("not-started",):
                console.print(f"[bold]{r.node}[/]: {escape(r.error)}", highlight=False)
        counts: dict[str, int] = {}
        for r in result.nodes:
            counts[r.outcome] = counts.get(r.outcome, 0) + 1
        if result.dry_run:
            to_stage = sum(r.stage_bytes for r in result.nodes)
            console.print(", ".join(f"{v} {k}" for k, v in counts.items()) + f"; {human_bytes(to_stage)} to stage")
        else:
            console.print(", ".join(f"{v} {k}" for k, v in counts.items()) + f" in {result.seconds:.0f}s, "
                          f"{human_bytes(result.bytes_sent)} sent; journal: imagetool history {result.rollout_id}")
    if result.exit_code:
        from imagetool.errors import RolloutFailedError

        raise RolloutFailedError(result.reason or f"{result.kind} {result.rollout_id}: not every node reached its target")


def _command_line() -> str:
    import shlex

    return shlex.join(["imagetool", *sys.argv[1:]])[:500]


@main.command()
@click.argument("release")
@inventory_option
@store_option
@limit_option
@parallel_option
@host_keys_option
@json_option
@handle_errors
def stage(release: str, inventory: str, store: str | None, limit: tuple[str, ...], parallel: int,
          accept_new_host_keys: bool, as_json: bool) -> None:
    """Copy RELEASE to the nodes without disturbing them (skips nodes that have it, resumes partial copies)."""
    from imagetool.errors import LockedError, NodeError, UnreachableError
    from imagetool.store import Store, default_store_path, resolve_release
    from rollout.inventory import load_inventory, select
    from rollout.node import ssh_nodes
    from rollout.stage import stage_all
    from rollout.update import default_owner, new_rollout_id

    stored = resolve_release(Store(default_store_path(store)), release)
    inv = load_inventory(inventory)
    nodes = ssh_nodes(select(inv.nodes, list(limit)), accept_new_host_keys=accept_new_host_keys)
    # Under each node's rollout lock, so a rollout or a gc cannot pull the transfer away.
    lock_as = ("stage-" + new_rollout_id(), default_owner(), _command_line())
    try:
        with LiveView([n.name for n in nodes], f"staging {stored.id}", stage_events=True) as view:
            report = stage_all(nodes, stored, parallel=parallel, progress=view, lock_as=lock_as)
    finally:
        for n in nodes:
            n.close()
    if as_json:
        print_json(report.to_dict())
    else:
        t = Table(title=f"stage {stored.id}")
        for col in ("node", "outcome", "time", "bytes", "error"):
            t.add_column(col)
        for r in report.results.values():
            t.add_row(r.node, r.outcome, f"{r.seconds:.0f}s", human_bytes(r.bytes_sent), escape(r.error or ""))
        out.print(t)
    failed = report.failed
    if failed:
        errors = [r.exception for r in failed.values()]
        cls = (UnreachableError if all(isinstance(e, UnreachableError) for e in errors)
               else LockedError if any(isinstance(e, LockedError) for e in errors) else NodeError)
        raise cls(f"{len(failed)} of {len(report.results)} nodes not staged: " + ", ".join(failed))


@main.command()
@click.argument("release")
@inventory_option
@store_option
@rollout_options
@handle_errors
def rollout(release: str, inventory: str, store: str | None, as_json: bool, **kw: Any) -> None:
    """Roll RELEASE out: stage everywhere, then activate batch by batch behind health gates."""
    from imagetool.store import Store, default_store_path, resolve_release
    from rollout.inventory import load_inventory, select
    from rollout.update import run_rollout

    stored = resolve_release(Store(default_store_path(store)), release)
    inv = load_inventory(inventory)
    options = _make_options(kw, _command_line())
    names = [n.name for n in select(inv.nodes, options.limit)]
    with LiveView(names, f"rollout {stored.id}") as view:
        result = run_rollout(stored, inv, options, events=view.event, progress=view)
    show_result(result, as_json)


@main.command()
@inventory_option
@click.option("--to", "to", default=None, metavar="RELEASE", help="Roll back to this release (staged on the nodes) instead of each node's previous one.")
@rollout_options
@handle_errors
def rollback(inventory: str, to: str | None, as_json: bool, **kw: Any) -> None:
    """Move nodes back to their previous image (kept on each node, so nothing is copied)."""
    from rollout.inventory import load_inventory, select
    from rollout.update import run_rollback

    inv = load_inventory(inventory)
    options = _make_options(kw, _command_line())
    names = [n.name for n in select(inv.nodes, options.limit)]
    with LiveView(names, "rollback" + (f" to {to}" if to else "")) as view:
        result = run_rollback(inv, options, to=to, events=view.event)
    show_result(result, as_json)


@main.command()
@click.argument("release")
@inventory_option
@store_option
@click.option("--batch", "batches", default=None, help="Batch sizes as for rollout (default: rollout's).")
@click.option("--check-http", multiple=True, metavar="URL[=STATUS]", help="Extra health check, as for rollout.")
@click.option("--check-tcp", multiple=True, metavar="HOST:PORT", help="Extra TCP check, as for rollout.")
@click.option("--check-command", multiple=True, metavar="CMD", help="Extra check command, as for rollout.")
@limit_option
@parallel_option
@host_keys_option
@json_option
@handle_errors
def plan(release: str, inventory: str, store: str | None, batches: str | None, check_http: tuple[str, ...],
         check_tcp: tuple[str, ...], check_command: tuple[str, ...], limit: tuple[str, ...], parallel: int,
         accept_new_host_keys: bool, as_json: bool) -> None:
    """Show what `rollout RELEASE` would do, node by node, changing nothing (same as rollout --dry-run)."""
    from imagetool.store import Store, default_store_path, resolve_release
    from rollout.batch import DEFAULT_BATCHES
    from rollout.checks import cli_checks
    from rollout.inventory import load_inventory
    from rollout.update import RolloutOptions, run_rollout

    stored = resolve_release(Store(default_store_path(store)), release)
    inv = load_inventory(inventory)
    options = RolloutOptions(batches=batches or DEFAULT_BATCHES, dry_run=True, parallel=parallel,
                             accept_new_host_keys=accept_new_host_keys, limit=list(limit) or None,
                             checks=cli_checks(http=check_http, tcp=check_tcp, command=check_command), command=_command_line())
    with console.status("asking the nodes"):
        result = run_rollout(stored, inv, options)
    show_result(result, as_json)


@main.command()
@inventory_option
@click.option("--keep", type=click.IntRange(min=0), default=1, show_default=True,
              help="Other images to keep per node (newest first), beyond booted, committed, previous and pending.")
@click.option("--incoming", is_flag=True, help="Also drop partial transfers.")
@limit_option
@parallel_option
@host_keys_option
@json_option
@handle_errors
def gc(inventory: str, keep: int, incoming: bool, limit: tuple[str, ...], parallel: int, accept_new_host_keys: bool,
       as_json: bool) -> None:
    """Remove old images from the nodes; never the booted, committed, previous or pending one."""
    from imagetool.errors import NodeError
    from rollout.inventory import load_inventory
    from rollout.retention import inventory_gc

    inv = load_inventory(inventory)
    with console.status("collecting"):
        reports = inventory_gc(inv, keep=keep, incoming=incoming, limit=list(limit) or None,
                               accept_new_host_keys=accept_new_host_keys, parallel=parallel)
    if as_json:
        print_json([r.to_dict() for r in reports])
    else:
        t = Table(title=f"gc --keep {keep}")
        for col in ("node", "removed", "kept", "freed", "free now", "error"):
            t.add_column(col)
        for r in reports:
            t.add_row(r.node, " ".join(r.removed) or "-", " ".join(r.kept) or "-", human_bytes(r.freed_bytes),
                      human_bytes(r.free_bytes) if r.error is None else "-", escape(r.error or ""))
        out.print(t)
    failed = [r for r in reports if r.error]
    if failed:
        raise NodeError(f"{len(failed)} of {len(reports)} nodes not collected: " + ", ".join(r.node for r in failed))


@main.command()
@click.argument("rollout_id", required=False)
@click.option("--limit", "count", type=click.IntRange(min=1), default=20, show_default=True,
              help="Rollouts listed (newest last).")
@json_option
@handle_errors
def history(rollout_id: str | None, count: int, as_json: bool) -> None:
    """List past rollouts from the journal, or show one (ROLLOUT_ID or a unique prefix) event by event."""
    from rollout.journal import find_record, list_records, state_dir

    directory = state_dir()
    if rollout_id is None:
        records = list_records(directory)[-count:]
        if as_json:
            print_json([r.to_dict() for r in records])
            return
        t = Table(title=f"rollouts in {directory}")
        for col in ("id", "kind", "target", "started", "state", "nodes", "owner"):
            t.add_column(col)
        for r in records:
            outcomes: dict[str, int] = {}
            for o in r.outcomes.values():
                outcomes[o] = outcomes.get(o, 0) + 1
            summary = ", ".join(f"{v} {k}" for k, v in outcomes.items()) or f"{len(r.nodes)} nodes"
            style = {"ok": "green", "interrupted": "yellow", "dry-run": "cyan"}.get(r.state, "red")
            t.add_row(r.id, r.kind, r.target or "(previous)", (r.started or "")[:19], f"[{style}]{r.state}[/]",
                      summary, escape(r.owner or ""))
        out.print(t)
        return
    rec = find_record(directory, rollout_id)
    if as_json:
        print_json(rec.to_dict(events=True))
        return
    out.print(f"[bold]{rec.kind} {rec.id}[/] → {rec.target or '(previous)'}: {rec.state}"
              + (f" ({escape(rec.reason)})" if rec.reason else ""), highlight=False)
    out.print(f"command: {escape(rec.command or '')}   owner: {escape(rec.owner or '')}   journal: {rec.path}",
              highlight=False)
    if rec.resumes:
        out.print(f"took over the locks of: {', '.join(rec.resumes)}", highlight=False)
    t = Table()
    for col in ("time", "node", "step", "outcome", "detail"):
        t.add_column(col)
    for ev in rec.events:
        kind = ev.get("event")
        if kind == "step":
            t.add_row(str(ev.get("time", ""))[11:23], str(ev.get("node")), str(ev.get("step")),
                      str(ev.get("outcome")), escape(_first_line(str(ev.get("detail") or ""), 100)))
        elif kind in ("plan", "hook", "takeover"):
            detail = {"plan": lambda e: f"{e.get('action')}: {e.get('reason')}",
                      "hook": lambda e: f"{e.get('point')} {e.get('hook')}: exit {e.get('exit_status')}",
                      "takeover": lambda e: f"took over the lock of {e.get('rollout')}: {e.get('why')}"}[kind](ev)
            t.add_row(str(ev.get("time", ""))[11:23], str(ev.get("node")), kind, "", escape(_first_line(detail, 100)))
    out.print(t)


@main.command()
@inventory_option
@limit_option
@click.option("--no-health", is_flag=True, help="Skip the health checks; status only.")
@click.option("--parallel", type=click.IntRange(min=1), default=8, show_default=True, help="Nodes contacted at once.")
@host_keys_option
@json_option
@handle_errors
def status(inventory: str, limit: tuple[str, ...], no_health: bool, parallel: int, accept_new_host_keys: bool,
           as_json: bool) -> None:
    """What each node booted, committed and keeps; its health, free space and lock."""
    from imagetool.errors import UnreachableError
    from rollout.inventory import load_inventory
    from rollout.update import inventory_status

    inv = load_inventory(inventory)
    with console.status("asking the nodes"):
        reports = inventory_status(inv, limit=list(limit) or None, accept_new_host_keys=accept_new_host_keys,
                                   health=not no_health, parallel=parallel)
    if as_json:
        print_json([r.to_dict() for r in reports])
    else:
        t = Table(title=f"nodes in {inventory}")
        for col in ("node", "booted", "committed", "previous", "staged", "boot id", "health", "free", "lock"):
            t.add_column(col)
        for r in reports:
            s = r.status
            if s is None:
                t.add_row(r.name, f"[bold red]unreachable[/]: {escape(r.error or '')}", "", "", "", "", "", "", "")
                continue
            booted = s.booted or "-"
            if s.booted != s.committed:
                booted = f"[yellow]{booted}[/] (trial)" if s.trial else f"[yellow]{booted}[/]"
            staged = " ".join(i.id for i in s.images if i.id not in (s.committed, s.previous, s.booted)) or "-"
            if no_health:
                health = "-"
            elif r.health is not None:
                health = "[green]healthy[/]"
            else:
                health = f"[red]unhealthy[/]: {escape((r.health_error or '')[-120:])}"
            lock = f"{s.lock.get('rollout')} ({s.lock.get('owner')})" if s.lock else "-"
            t.add_row(r.name, booted, s.committed or "-", s.previous or "-", staged, s.boot_id[:8], health,
                      human_bytes(s.free_bytes), escape(lock))
        out.print(t)
    unreachable = [r for r in reports if r.status is None]
    if unreachable:
        raise UnreachableError(f"{len(unreachable)} of {len(reports)} nodes unreachable: "
                               + ", ".join(r.name for r in unreachable))
