"""`imagetool lab`: the local lab cluster's commands."""

from __future__ import annotations

import time
from collections.abc import Callable
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
from imagetool.errors import ImagetoolError

lab_option = click.option("--lab", "lab_name", default="default", show_default=True,
                          help="Lab name (labs coexist by name).")
lab_root_option = click.option("--lab-dir", type=click.Path(file_okay=False), default=None,
                               help="Where labs keep their state "
                                    "(default: $IMAGETOOL_LAB_DIR or /var/lib/imagetool-lab).")


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
              help="VM accelerator; auto: $IMAGETOOL_LAB_ACCEL if set, else KVM if a short probe runs under it, "
                   "else TCG.")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False), metavar="PEM",
              help="Release signing public key the nodes trust (repeatable), on their /var as `imagetool disk "
                   "--trusted-key` puts it; RELEASE must be signed by one of them.")
@store_option
@lab_option
@lab_root_option
@json_option
@handle_errors
def lab_up(n_nodes: int, release_ref: str, var_size: str, all_vms: bool, vm_nodes: int | None, accel: str,
           trusted_keys: tuple[str, ...], store: str | None, lab_name: str, lab_dir: str | None, as_json: bool) -> None:
    """Bring up N nodes booting RELEASE, and write their inventory and known_hosts."""
    from imagetool import lab as labmod
    from imagetool.store import Store, default_store_path, resolve_release

    if all_vms and vm_nodes not in (None, n_nodes):
        raise click.UsageError(f"--vm makes all {n_nodes} nodes VMs; --vm-nodes {vm_nodes} says otherwise")
    n_vms = n_nodes if all_vms else vm_nodes or 0
    release = resolve_release(Store(default_store_path(store)), release_ref)
    started = time.monotonic()
    with working(f"lab {safe(lab_name)}: starting") as update:
        def progress(step: str, detail: str) -> None:
            update(f"lab {safe(lab_name)}: [bold]{safe(step)}[/] {safe(detail)}")
        the_lab = labmod.up(lab_name, n_nodes, release, root=Path(lab_dir) if lab_dir else None,
                            var_size=parse_size(var_size), vm_nodes=n_vms, accel=accel, progress=progress,
                            trusted_keys=[Path(k) for k in trusted_keys])
    if as_json:
        print_json({"lab": the_lab.name, "inventory": str(the_lab.inventory), "known_hosts": str(the_lab.known_hosts),
                    "seconds": round(time.monotonic() - started, 1), "accel": the_lab.accel,
                    "nodes": [{"name": n.name, "address": n.address, "kind": n.kind} for n in the_lab.nodes]})
        return
    vms = f" ({n_vms} of them VMs under {the_lab.accel})" if n_vms else ""
    console.print(f"lab [bold]{safe(the_lab.name)}[/]: {len(the_lab.nodes)} nodes{vms} up on {safe(release.id)} "
                  f"in {time.monotonic() - started:.0f}s")
    if verbosity.quiet:
        return
    out.print(f"inventory:   {safe(the_lab.inventory)}\nknown_hosts: {safe(the_lab.known_hosts)}")
    n = the_lab.nodes[0]
    out.print(f"try: ssh -i {safe(the_lab.key)} -o UserKnownHostsFile={safe(the_lab.known_hosts)} "
              f"root@{safe(n.address)}")


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
    t = Table(title=f"lab {safe(the_lab.name)} ({safe(the_lab.subnet)})")
    for col in ("node", "kind", "address", "power", "booted", "state", "network"):
        t.add_column(col)
    for s in states:
        t.add_row(safe(s.name), safe(s.kind), safe(s.address), "on" if s.powered else "off", safe(s.booted or "-"),
                  safe(s.system_state), safe(s.network))
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
        console.print(f"lab {safe(lab_name)} down: removed {report.processes} processes, {report.mounts} mounts, "
                      f"{report.loops} loop devices, {report.netns} namespaces, {report.links} links, "
                      f"{report.cgroups} cgroups")
    if left:
        raise ImagetoolError(f"lab {lab_name}: could not remove {left}")


def _lab_node_command(name: str, doc: str, action: Callable[..., Any]) -> None:
    @lab.command(name, help=doc)
    @click.argument("node")
    @lab_option
    @lab_root_option
    @json_option
    @handle_errors
    def command(node: str, lab_name: str, lab_dir: str | None, as_json: bool) -> None:
        from imagetool import lab as labmod

        the_lab = labmod.load_lab(lab_name, Path(lab_dir) if lab_dir else None)
        _on_node(node, lambda: action(labmod, the_lab, node))
        if as_json:
            print_json({"lab": the_lab.name, "node": node, "action": name})
        else:
            console.print(f"lab {safe(lab_name)}: {name} {safe(node)}")


def _on_node(node: str, fn: Callable[[], Any]) -> Any:
    """fn(); its error, if any, names NODE (the node a lab node command is about)."""
    try:
        return fn()
    except ImagetoolError as e:
        e.nodes = e.nodes or (node,)
        raise


_lab_node_command("reset", "Hard reset NODE (no clean shutdown); it boots again.", lambda m, lab, n: m.reset(lab, n))
_lab_node_command("kill", "Crash NODE: it stays down until `lab start`.", lambda m, lab, n: m.kill(lab, n))
_lab_node_command("start", "Power NODE on.", lambda m, lab, n: m.start(lab, n))
_lab_node_command("cut", "Cut NODE's network.", lambda m, lab, n: m.cut(lab, n))
_lab_node_command("heal", "Restore NODE's network.", lambda m, lab, n: m.heal(lab, n))
_lab_node_command("unfill", "Remove the filler from NODE's /var.", lambda m, lab, n: m.unfill(lab, n))


@lab.command("fill")
@click.argument("node")
@click.option("--leave", default="1M", show_default=True, help="Free space to leave on NODE's /var.")
@lab_option
@lab_root_option
@json_option
@handle_errors
def lab_fill(node: str, leave: str, lab_name: str, lab_dir: str | None, as_json: bool) -> None:
    """Fill NODE's /var (a full disk, for tests)."""
    from imagetool import lab as labmod

    the_lab = labmod.load_lab(lab_name, Path(lab_dir) if lab_dir else None)
    size = _on_node(node, lambda: labmod.fill(the_lab, node, parse_size(leave)))
    if as_json:
        print_json({"lab": the_lab.name, "node": node, "action": "fill", "filled_bytes": size})
    else:
        console.print(f"lab {safe(lab_name)}: filled {safe(node)}'s /var with {human_bytes(size)}")


if __name__ == "__main__":
    main()
