"""Commands that work on nodes: stage, rollout, rollback, plan, gc, history, report, status."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from imagetool.cli.common import (
    Seconds,
    console,
    handle_errors,
    human_bytes,
    json_option,
    main,
    out,
    print_json,
    safe,
    store_option,
    verbosity,
    working,
)
from imagetool.cli.view import LiveView, first_line, sent_of, show_result

inventory_option = click.option(
    "-i", "--inventory", required=True, type=click.Path(dir_okay=False),
    help="Inventory file: imagetool's (YAML) or Ansible's (YAML or INI).")
host_keys_option = click.option(
    "--accept-new-host-keys", is_flag=True, help="Trust and record host keys not yet in known_hosts.")
limit_option = click.option(
    "--limit", multiple=True, metavar="PATTERN",
    help="Only these nodes: Ansible host patterns, e.g. 'web:!node2', 'web:&eu', 'node*' (repeatable).")
parallel_option = click.option(
    "--parallel", type=click.IntRange(1, 1024), default=4, show_default=True,
    help="Nodes staged or contacted at once.")
delta_option = click.option(
    "--delta/--no-delta", default=True, show_default=True,
    help="Send a node only the chunks of the image it lacks, taking the rest from images it holds "
         "(--no-delta: always the whole image, from the controller, even to nodes whose inventory "
         "names a source).")
source_option = click.option(
    "--source", default=None, metavar="URL",
    help="Nodes fetch the chunks they lack from this HTTP(S) store (`imagetool publish`) themselves; "
         "the controller sends only manifests. Default: each node's inventory `source`, if any.")
trusted_key_option = click.option(
    "--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False), metavar="PEM",
    help="Release signing public key to require (repeatable; beside the inventory's trusted_keys): "
         "a release not signed by one is refused before any node is contacted.")


def check_options() -> list[Callable[..., Any]]:
    """`--check-KEY` for every health-check kind in the registry (rollout.checks)."""
    from rollout.checks import KINDS

    return [click.option(f"--check-{key}", f"check_{key}", multiple=True, metavar=kind.metavar, help=kind.flag_help)
            for key, kind in KINDS.items()]


def with_options(options: list[Callable[..., Any]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            fn = option(fn)
        return fn
    return apply


def rollout_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The batching, policy and health-gate options rollout and rollback share."""
    from rollout.batch import DEFAULT_BATCHES

    options = [
        click.option("--batch", "batches", default=DEFAULT_BATCHES, show_default=True,
                     help="Batch sizes, Ansible serial style: '1,2,25%' (the last repeats; percentages of the "
                          "nodes that move). The first batch is the canary."),
        click.option("--pause", type=Seconds(0), default=0, show_default=True, help="Seconds between batches."),
        click.option("--max-failures", default="0", show_default=True, metavar="N|P%",
                     help="Failed nodes tolerated per batch (P% of that batch's size, rounded down, as Ansible's "
                          "max_fail_percentage): the run stops when a batch's failures exceed it."),
        click.option("--canary-failures-allowed", is_flag=True,
                     help="A failure in the canary (first) batch does not stop the run by itself: the canary is "
                          "judged by --max-failures like any batch."),
        click.option("--approve", is_flag=True,
                     help="After the canary batch, wait (locks held) for the operator: y/n here, "
                          "`imagetool approve ID [--reject]`, or approve/reject written into the approval file."),
        click.option("--approve-timeout", type=Seconds(1, 7 * 86400), default=None, metavar="S",
                     help="Stop (not go on) when no approval came within S seconds."),
        click.option("--on-failure", type=click.Choice(["rollback-node", "rollback-all"]), default="rollback-node",
                     show_default=True, help="When stopping: leave moved nodes, or move every one back too."),
        click.option("--confirm-timeout", type=Seconds(1), default=300, show_default=True,
                     help="Seconds a node waits for confirmation of a new boot before it reboots back by itself."),
        click.option("--boot-timeout", type=Seconds(1), default=180, show_default=True,
                     help="Seconds to wait for a node to come back after a reboot."),
        click.option("--health-timeout", type=Seconds(0), default=120, show_default=True,
                     help="Seconds a freshly booted node may take to become healthy."),
        *check_options(),
        click.option("--rollout-id", default=None,
                     help="Carry on an interrupted run under its id (its locks are taken over when its controller "
                          "process is provably gone, else with --break-lock)."),
        click.option("--break-lock", is_flag=True,
                     help="Take over node locks of other runs older than --lock-max-age (says whose it broke)."),
        click.option("--lock-max-age", type=Seconds(0, 10 * 365 * 86400), default=3600, show_default=True, metavar="S",
                     help="Age in seconds after which --break-lock may take a lock over."),
        click.option("--dry-run", is_flag=True, help="Connect, plan and show; change nothing."),
        limit_option,
        parallel_option,
        click.option("--batch-parallel", type=click.IntRange(1, 4096), default=64, show_default=True,
                     help="Nodes of a batch that activate at once; a larger batch's others follow as they finish."),
        delta_option,
        source_option,
        host_keys_option,
        json_option,
    ]
    return with_options(options)(fn)


def _make_options(kw: dict[str, Any], command: str, **fixed: Any) -> Any:
    """RolloutOptions from the command's options; an option the command lacks keeps its default."""
    from rollout.checks import cli_checks
    from rollout.update import RolloutOptions

    given = {k: v for k, v in kw.items() if v is not None and not k.startswith("check_")}
    given["limit"] = list(kw.get("limit") or ()) or None
    given["trusted_keys"] = [Path(k) for k in kw.get("trusted_keys") or ()]
    given["checks"] = cli_checks(**{k.removeprefix("check_"): v for k, v in kw.items() if k.startswith("check_")})
    return RolloutOptions(command=command, **given, **fixed)


def _count(items: Iterable[str]) -> str:
    """"2 staged, 1 present": how many of each, in the order first seen."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return ", ".join(f"{n} {item}" for item, n in counts.items()) or "no nodes"


def _command_line() -> str:
    import shlex

    return shlex.join(["imagetool", *sys.argv[1:]])[:500]


@main.command()
@click.argument("release")
@inventory_option
@store_option
@trusted_key_option
@limit_option
@parallel_option
@delta_option
@source_option
@host_keys_option
@json_option
@handle_errors
def stage(release: str, inventory: str, store: str | None, trusted_keys: tuple[str, ...], limit: tuple[str, ...],
          parallel: int, delta: bool, source: str | None, accept_new_host_keys: bool, as_json: bool) -> None:
    """Copy RELEASE to the nodes without disturbing them (skips nodes that have it, resumes partial copies)."""
    from imagetool.chunks import check_source
    from imagetool.errors import LockedError, NodeError, UnreachableError, VerificationError
    from imagetool.store import Store, default_store_path, resolve_release
    from rollout.fleet import open_nodes
    from rollout.inventory import load_inventory
    from rollout.locks import default_owner, new_rollout_id
    from rollout.stage import stage_all

    stored = resolve_release(Store(default_store_path(store)), release)
    inv = load_inventory(inventory)
    # stage_all checks the release (and its signature against these keys) before any node is
    # contacted: a refused release changes nothing anywhere.
    keys = [*inv.trusted_keys, *(Path(k) for k in trusted_keys)]
    # Under each node's rollout lock, so a rollout or a gc cannot pull the transfer away.
    lock_as = ("stage-" + new_rollout_id(), default_owner(), _command_line())
    with open_nodes(inv, list(limit), accept_new_host_keys=accept_new_host_keys) as nodes:
        with LiveView([n.name for n in nodes], f"staging {stored.id}", stage_events=True) as view:
            report = stage_all(nodes, stored, parallel=parallel, progress=view, lock_as=lock_as, trusted_keys=keys,
                               delta=delta, source=check_source(source) if source else None)
    if as_json:
        print_json(report.to_dict())
    else:
        if not verbosity.quiet:
            t = Table(title=f"stage {safe(stored.id)}")
            for col in ("node", "outcome", "time", "sent", "error"):
                t.add_column(col)
            for r in report.results.values():
                t.add_row(safe(r.node), safe(r.outcome) + (f" ({r.mode})" if r.mode else ""), f"{r.seconds:.0f}s",
                          sent_of(r.bytes_sent, r.full_bytes if r.mode else 0), safe(r.error or r.note or ""))
            out.print(t)
        outcomes = _count(r.outcome for r in report.results.values())
        full = sum(r.full_bytes for r in report.results.values() if r.mode)
        console.print(f"stage {safe(stored.id)}: {safe(outcomes)}, {sent_of(report.bytes_sent, full)} sent",
                      highlight=False)
    failed = report.failed
    if failed:
        errors = [r.exception for r in failed.values()]
        cls = (UnreachableError if all(isinstance(e, UnreachableError) for e in errors)
               else LockedError if any(isinstance(e, LockedError) for e in errors)
               else VerificationError if any(isinstance(e, VerificationError) for e in errors) else NodeError)
        raise cls(f"{len(failed)} of {len(report.results)} nodes not staged: "
                  + "; ".join(r.error or r.node for r in failed.values()), nodes=list(failed))


@main.command()
@click.argument("release")
@inventory_option
@store_option
@trusted_key_option
@rollout_options
@handle_errors
def rollout(release: str, inventory: str, store: str | None, as_json: bool, **kw: Any) -> None:
    """Roll RELEASE out: stage everywhere, then activate batch by batch behind health gates."""
    from imagetool.store import Store, default_store_path, resolve_release
    from rollout.hostpattern import select
    from rollout.inventory import load_inventory
    from rollout.update import run_rollout

    stored = resolve_release(Store(default_store_path(store)), release)
    inv = load_inventory(inventory)
    options = _make_options(kw, _command_line())
    names = [n.name for n in select(inv.nodes, options.limit)]
    with LiveView(names, f"rollout {stored.id}") as view:
        result = run_rollout(stored, inv, options, events=_asking(view, options), progress=view)
    show_result(result, as_json)


def _asking(view: LiveView, options: Any) -> Callable[[str, str, str], None]:
    """The view's event receiver; with --approve and a terminal on stdin, it also asks y/n there
    when the rollout waits for approval, and writes the answer where every answer goes
    (rollout.approval). The rollout id is fixed here so the answer file is known."""
    import threading

    from rollout.approval import answer, approval_path
    from rollout.journal import state_dir
    from rollout.locks import new_rollout_id

    if not options.approve or options.dry_run or not sys.stdin.isatty():
        return view.event
    options.rollout_id = options.rollout_id or new_rollout_id()
    path = approval_path(state_dir(options.state_dir), options.rollout_id)

    def ask(detail: str) -> None:
        if view.live is not None:
            view.live.stop()
            console.print(safe(detail), highlight=False)
        yes = click.confirm("go on after the canary?", default=None, err=True)
        answer(path, "approve" if yes else "reject")

    def event(node: str, step: str, detail: str) -> None:
        if node == "*" and step == "approve" and detail.startswith("waiting"):
            view.event(node, step, detail)
            threading.Thread(target=ask, args=(detail,), daemon=True).start()
            return
        if view.live is not None and not view.live.is_started:
            view.live.start()
        view.event(node, step, detail)

    return event


@main.command()
@click.argument("rollout_id")
@click.option("--reject", is_flag=True, help="Stop the rollout instead: the nodes after the canary stay untouched.")
@json_option
@handle_errors
def approve(rollout_id: str, reject: bool, as_json: bool) -> None:
    """Let a rollout waiting after its canary (--approve) go on, or stop it with --reject."""
    from imagetool.errors import InputError
    from rollout.approval import answer, approval_path
    from rollout.journal import find_record, state_dir

    directory = state_dir()
    rec = find_record(directory, rollout_id)
    if rec.ended is not None:
        raise InputError(f"rollout {rec.id} has ended ({rec.state}): nothing waits for an answer")
    begin = next((e for e in rec.events if e.get("event") == "begin"), {})
    if rec.dry_run or not (begin.get("options") or {}).get("approve"):
        raise InputError(f"rollout {rec.id} runs without --approve: nothing waits for an answer")
    path = approval_path(directory, rec.id)
    answer(path, "reject" if reject else "approve")
    if as_json:
        print_json({"rollout_id": rec.id, "answer": "reject" if reject else "approve", "path": str(path)})
    else:
        console.print(f"{'rejected' if reject else 'approved'}: rollout {safe(rec.id)} ({safe(path)})",
                      highlight=False)


@main.command()
@inventory_option
@click.option("--to", "to", default=None, metavar="RELEASE",
              help="Roll back to this release (staged on the nodes) instead of each node's previous one.")
@rollout_options
@handle_errors
def rollback(inventory: str, to: str | None, as_json: bool, **kw: Any) -> None:
    """Move nodes back to their previous image (kept on each node, so nothing is copied)."""
    from rollout.hostpattern import select
    from rollout.inventory import load_inventory
    from rollout.update import run_rollback

    inv = load_inventory(inventory)
    options = _make_options(kw, _command_line())
    names = [n.name for n in select(inv.nodes, options.limit)]
    with LiveView(names, "rollback" + (f" to {to}" if to else "")) as view:
        result = run_rollback(inv, options, to=to, events=_asking(view, options))
    show_result(result, as_json)


@main.command()
@click.argument("release")
@inventory_option
@store_option
@click.option("--batch", "batches", default=None, help="Batch sizes as for rollout (default: rollout's).")
@trusted_key_option
@with_options(check_options())
@limit_option
@parallel_option
@host_keys_option
@json_option
@handle_errors
def plan(release: str, inventory: str, store: str | None, as_json: bool, **kw: Any) -> None:
    """Show what `rollout RELEASE` would do, node by node, changing nothing (same as rollout --dry-run)."""
    from imagetool.store import Store, default_store_path, resolve_release
    from rollout.inventory import load_inventory
    from rollout.update import run_rollout

    stored = resolve_release(Store(default_store_path(store)), release)
    inv = load_inventory(inventory)
    options = _make_options(kw, _command_line(), dry_run=True)
    with working("asking the nodes"):
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
    with working("collecting"):
        reports = inventory_gc(inv, keep=keep, incoming=incoming, limit=list(limit) or None,
                               accept_new_host_keys=accept_new_host_keys, parallel=parallel)
    if as_json:
        print_json({"nodes": [r.to_dict() for r in reports]})
    else:
        if not verbosity.quiet:
            t = Table(title=f"gc --keep {keep}")
            for col in ("node", "removed", "kept", "freed", "free now", "error"):
                t.add_column(col)
            for r in reports:
                t.add_row(safe(r.node), safe(" ".join(map(str, r.removed)) or "-"),
                          safe(" ".join(map(str, r.kept)) or "-"), human_bytes(r.freed_bytes),
                          human_bytes(r.free_bytes) if r.error is None else "-", safe(r.error or ""))
            out.print(t)
        console.print(f"gc: removed {sum(len(r.removed) for r in reports)} images from {len(reports)} nodes, "
                      f"freed {human_bytes(sum(r.freed_bytes for r in reports))}", highlight=False)
    failed = [r for r in reports if r.error]
    if failed:
        raise NodeError(f"{len(failed)} of {len(reports)} nodes not collected: "
                        + "; ".join(r.error or r.node for r in failed), nodes=[r.node for r in failed])


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
        t = Table(title=f"rollouts in {safe(directory)}")
        for col in ("id", "kind", "target", "started", "state", "nodes", "owner"):
            t.add_column(col)
        for r in records:
            outcomes: dict[str, int] = {}
            for o in r.outcomes.values():
                outcomes[o] = outcomes.get(o, 0) + 1
            summary = ", ".join(f"{v} {k}" for k, v in outcomes.items()) or f"{len(r.nodes)} nodes"
            style = {"ok": "green", "interrupted": "yellow", "dry-run": "cyan"}.get(r.state, "red")
            t.add_row(safe(r.id), safe(r.kind), safe(r.target or "(previous)"), safe(str(r.started or "")[:19]),
                      f"[{style}]{safe(r.state)}[/]", safe(summary), safe(r.owner or ""))
        out.print(t)
        return
    rec = find_record(directory, rollout_id)
    if as_json:
        print_json(rec.to_dict(events=True))
        return
    out.print(f"[bold]{safe(rec.kind)} {safe(rec.id)}[/] → {safe(rec.target or '(previous)')}: {safe(rec.state)}"
              + (f" ({safe(rec.reason)})" if rec.reason else ""), highlight=False)
    out.print(f"command: {safe(rec.command or '')}   owner: {safe(rec.owner or '')}   journal: {safe(rec.path)}",
              highlight=False)
    if rec.resumes:
        out.print(f"took over the locks of: {safe(', '.join(rec.resumes))}", highlight=False)
    t = Table()
    for col in ("time", "node", "step", "outcome", "detail"):
        t.add_column(col)
    for ev in rec.events:
        kind = ev.get("event")
        if kind == "step":
            t.add_row(safe(str(ev.get("time", ""))[11:23]), safe(ev.get("node")), safe(ev.get("step")),
                      safe(ev.get("outcome")), safe(first_line(str(ev.get("detail") or ""), 100)))
        elif kind in ("plan", "hook", "takeover"):
            detail = {"plan": lambda e: f"{e.get('action')}: {e.get('reason')}",
                      "hook": lambda e: f"{e.get('point')} {e.get('hook')}: exit {e.get('exit_status')}",
                      "takeover": lambda e: f"took over the lock of {e.get('rollout')}: {e.get('why')}"}[kind](ev)
            t.add_row(safe(str(ev.get("time", ""))[11:23]), safe(ev.get("node")), kind, "",
                      safe(first_line(detail, 100)))
    out.print(t)


@main.command()
@click.argument("rollout_id")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The HTML file to write.")
@store_option
@json_option
@handle_errors
def report(rollout_id: str, output: str, store: str | None, as_json: bool) -> None:
    """Write one rollout's report (ROLLOUT_ID or a unique prefix) as a self-contained HTML page:
    timeline, bytes and outcome per node, health evidence of failed nodes, release diff."""
    from imagetool.store import Store, default_store_path
    from rollout.journal import find_record, state_dir
    from rollout.report import write_report

    rep = write_report(find_record(state_dir(), rollout_id), Path(output), Store(default_store_path(store)))
    summary = {"output": str(Path(output).resolve()), **rep.summary()}
    if as_json:
        print_json(summary)
        return
    counts = ", ".join(f"{n} {o}" for o, n in summary["outcomes"].items())
    out.print(f"wrote {safe(summary['output'])}: {safe(rep.record.kind)} {safe(rep.record.id)} → "
              f"{safe(rep.record.target or '(previous)')}: {safe(rep.state)} ({safe(counts)})", highlight=False)


@main.command()
@inventory_option
@limit_option
@click.option("--no-health", is_flag=True, help="Skip the health checks; status only.")
@click.option("--parallel", type=click.IntRange(1, 1024), default=8, show_default=True, help="Nodes contacted at once.")
@host_keys_option
@json_option
@handle_errors
def status(inventory: str, limit: tuple[str, ...], no_health: bool, parallel: int, accept_new_host_keys: bool,
           as_json: bool) -> None:
    """What each node booted, committed and keeps; its health, free space and lock.

    Exits 4 when a node is unreachable, 3 when every node answered and one is unhealthy."""
    from imagetool.errors import HelperMissingError, NodeError, UnhealthyError, UnreachableError, VerificationError
    from rollout.fleet import inventory_status
    from rollout.inventory import load_inventory

    inv = load_inventory(inventory)
    with working("asking the nodes"):
        reports = inventory_status(inv, limit=list(limit) or None, accept_new_host_keys=accept_new_host_keys,
                                   health=not no_health, parallel=parallel)

    def state(r: Any) -> str:
        if r.status is None:
            return ("unreachable" if r.unreachable else "helper missing"
                    if isinstance(r.exception, HelperMissingError) else "error")
        return "up" if no_health else "healthy" if r.health is not None else "unhealthy"

    if as_json:
        print_json({"nodes": [r.to_dict() for r in reports]})
    else:
        if not verbosity.quiet:
            t = Table(title=f"nodes in {safe(inventory)}")
            for col in ("node", "booted", "committed", "previous", "staged", "boot id", "health", "free", "lock"):
                t.add_column(col)
            for r in reports:
                s = r.status
                if s is None:
                    t.add_row(safe(r.name), f"[bold red]{state(r)}[/]: {safe(r.error or '')}",
                              "", "", "", "", "", "", "")
                    continue
                booted = safe(s.booted or "-")
                if s.booted != s.committed:
                    booted = f"[yellow]{booted}[/] (trial)" if s.trial else f"[yellow]{booted}[/]"
                staged = " ".join(i.id for i in s.images if i.id not in (s.committed, s.previous, s.booted)) or "-"
                if no_health:
                    health = "-"
                elif r.health is not None:
                    health = "[green]healthy[/]"
                else:
                    health = f"[red]unhealthy[/]: {safe((r.health_error or '')[-120:])}"
                lock = f"{s.lock.get('rollout')} ({s.lock.get('owner')})" if s.lock else "-"
                t.add_row(safe(r.name), booted, safe(s.committed or "-"), safe(s.previous or "-"), safe(staged),
                          safe(s.boot_id[:8]), health, human_bytes(s.free_bytes), safe(lock))
            out.print(t)
        console.print(f"{len(reports)} nodes: {safe(_count(state(r) for r in reports))}", highlight=False)
    unknown = [r for r in reports if r.status is None]
    if unknown:
        # Unreachable (exit 4) only when that is what happened to every one of them: a node that
        # answered with a damaged state file or a refusal is reported as that.
        errors = [r.exception for r in unknown]
        cls = (UnreachableError if all(r.unreachable for r in unknown)
               else HelperMissingError if all(isinstance(e, HelperMissingError) for e in errors)
               else VerificationError if any(isinstance(e, VerificationError) for e in errors) else NodeError)
        what = "unreachable" if cls is UnreachableError else "without a status"
        raise cls(f"{len(unknown)} of {len(reports)} nodes {what}: " + "; ".join(r.error or r.name for r in unknown),
                  nodes=[r.name for r in unknown])
    unhealthy = [r.name for r in reports if state(r) == "unhealthy"]
    if unhealthy:
        raise UnhealthyError(f"{len(unhealthy)} of {len(reports)} nodes unhealthy: " + ", ".join(unhealthy),
                             nodes=unhealthy)
