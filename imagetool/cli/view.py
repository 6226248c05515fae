"""How a rollout looks while it runs (LiveView) and when it ends (show_result)."""

from __future__ import annotations

import time
from typing import Any

from rich.table import Table

from imagetool.cli.common import console, human_bytes, out, print_json, safe


class LiveView:
    """Per-node live view on stderr: batch, step, detail, time in step; byte progress while
    staging. Events arrive from worker threads. Without a terminal, one line per event."""

    def __init__(self, names: list[str], title: str, *, stage_events: bool = False) -> None:
        import threading

        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

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
                step = f"[{style}]{safe(row['step'])}[/]" if style else safe(row["step"])
                t.add_row(safe(name), safe(row["batch"]), step, safe(row["detail"][-80:]), f"{now - row['since']:.0f}s")
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
            console.print(f"{time.monotonic() - self.started:6.1f}s  {safe(f'{node:<16}')} {safe(f'{step:<12}')} {safe(detail)}",
                          highlight=False)

    # rollout.stage.StageProgress
    def stage_start(self, node: str, total: int) -> None:
        with self.lock:
            if node in self.tasks:
                self.progress.reset(self.tasks[node], total=total)
            else:
                self.tasks[node] = self.progress.add_task(safe(node), total=total)
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
                       f"{result.outcome}, {sent_of(result.bytes_sent, result.image_bytes if result.mode else 0)}"
                       + (f" ({result.mode})" if result.mode else "") + (f": {result.error}" if result.error else ""))


def sent_of(sent: int, full: int) -> str:
    """"1.2 MiB of 278.0 MiB (0.4%)": what went over the wire against the whole images."""
    if not full:
        return human_bytes(sent)
    return f"{human_bytes(sent)} of {human_bytes(full)} ({100 * sent / full:.1f}%)"


def first_line(text: str | None, width: int = 60) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def show_result(result: Any, as_json: bool) -> None:
    if as_json:
        print_json(result.to_dict())
    else:
        what = f"{result.kind} {safe(result.rollout_id)}" + (f" → {safe(result.target)}" if result.target else "")
        t = Table(title=what + (" (dry run: nothing was changed)" if result.dry_run else ""))
        styles = {"done": "green", "skipped": "green", "planned": "cyan", "failed": "bold red",
                  "rolled-back": "yellow", "not-started": "dim"}
        if result.dry_run:
            for col in ("node", "batch", "from", "to", "action", "to stage"):
                t.add_column(col)
            t.add_column("why", no_wrap=True, overflow="ellipsis")
            for r in result.nodes:
                action = {"planned": "activate", "skipped": "skip"}.get(r.outcome, r.outcome)
                t.add_row(safe(r.node), str(r.batch or ""), safe(r.from_id or "-"), safe(r.to_id or "-"),
                          f"[{styles[r.outcome]}]{action}[/]", human_bytes(r.stage_bytes),
                          safe(first_line(r.error or r.detail, 90)))
        else:
            for col in ("node", "batch", "from", "to", "outcome", "time", "bytes"):
                t.add_column(col)
            t.add_column("error", no_wrap=True, overflow="ellipsis")
            for r in result.nodes:
                t.add_row(safe(r.node), str(r.batch or ""), safe(r.from_id or "-"), safe(r.to_id or "-"),
                          f"[{styles[r.outcome]}]{r.outcome}[/]", f"{r.seconds:.0f}s", human_bytes(r.bytes_sent),
                          safe(first_line(r.error)))
        out.print(t)
        for r in result.nodes:
            if r.error and r.outcome not in ("not-started",):
                console.print(f"[bold]{safe(r.node)}[/]: {safe(r.error)}", highlight=False)
        counts: dict[str, int] = {}
        for r in result.nodes:
            counts[r.outcome] = counts.get(r.outcome, 0) + 1
        if result.dry_run:
            to_stage = sum(r.stage_bytes for r in result.nodes)
            console.print(", ".join(f"{v} {k}" for k, v in counts.items()) + f"; {human_bytes(to_stage)} to stage")
        else:
            console.print(", ".join(f"{v} {k}" for k, v in counts.items()) + f" in {result.seconds:.0f}s, "
                          f"{sent_of(result.bytes_sent, result.full_bytes)} sent; journal: imagetool history {safe(result.rollout_id)}")
    if result.exit_code:
        from imagetool.errors import RolloutFailedError

        raise RolloutFailedError(result.reason or f"{result.kind} {result.rollout_id}: not every node reached its target")
