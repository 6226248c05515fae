"""How a rollout looks while it runs (LiveView) and when it ends (show_result)."""

from __future__ import annotations

import threading
import time
from typing import Any

from rich.progress import ProgressColumn, Task
from rich.table import Table
from rich.text import Text

from imagetool.cli.common import Ticker, console, human_bytes, out, print_json, safe, verbosity


class _Speed(ProgressColumn):
    """Transfer speed in binary units (rich's own column counts in kB and MB)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else f"{human_bytes(speed)}/s", style="progress.data.speed")


class LiveView:
    """A rollout, rollback or staging while it runs, on stderr. In a terminal: a live table per
    node (batch, step, detail, time in step) and byte progress while staging; with -v also a line
    per event. In a log (stderr not a terminal): a line per event, a stage line as each node
    finishes staging, and every PROGRESS_INTERVAL seconds a line saying where the run is
    ("stage: 2/3 nodes, 512.0 MiB of 748.0 MiB, 42.0 MiB/s"). With -q: nothing. Events arrive
    from worker threads."""

    def __init__(self, names: list[str], title: str, *, stage_events: bool = False) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self.title = title
        self.started = time.monotonic()
        self.rows: dict[str, dict[str, Any]] = {
            n: {"batch": "", "step": "waiting", "detail": "", "since": self.started} for n in names}
        self.lock = threading.Lock()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                                 _Speed(), TimeRemainingColumn(), console=console)
        self.tasks: dict[str, Any] = {}
        self.total_task: Any = None
        self.shown = not verbosity.quiet
        self.interactive = self.shown and console.is_terminal
        self.lines = self.shown and (not self.interactive or verbosity.verbose)
        self.live: Any = None
        self.ticker: Ticker | None = None
        # The latest event about the whole rollout (node "*") and when it came.
        self.rollout_line: tuple[str, float] | None = None
        # `imagetool stage` has no rollout events: staging results are its only news.
        self.stage_events = stage_events
        # Staging as plain numbers, for the lines in a log: node -> bytes to send, bytes sent.
        self.staging: set[str] = set(names) if stage_events else set()
        self.stage_total: dict[str, int] = {}
        self.stage_done: dict[str, int] = {}
        self.staged: set[str] = set()
        self.stage_started: float | None = None

    def __enter__(self) -> LiveView:
        if self.interactive:
            from rich.live import Live

            self.live = Live(self, console=console, refresh_per_second=4)
            self.live.__enter__()
        elif self.shown:
            self.ticker = Ticker(self.heartbeat).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
        if self.ticker is not None:
            self.ticker.__exit__(*exc)

    def __rich__(self) -> Any:
        from rich.console import Group

        with self.lock:
            t = Table(title=f"{self.title}  ({time.monotonic() - self.started:.0f}s)", title_justify="left")
            for col in ("node", "batch", "step", "detail", "time"):
                t.add_column(col)
            now = time.monotonic()
            for name, row in self.rows.items():
                style = {"done": "green", "skipped": "green", "failed": "bold red", "rolled-back": "yellow",
                         "rollback": "yellow", "unreachable": "bold red", "not-started": "dim"}.get(row["step"], "")
                step = f"[{style}]{safe(row['step'])}[/]" if style else safe(row["step"])
                t.add_row(safe(name), safe(row["batch"]), step, safe(row["detail"][-80:]), f"{now - row['since']:.0f}s")
            if self.rollout_line is not None:
                line, since = self.rollout_line
                t.caption = f"{safe(line)}  ({now - since:.0f}s)"
                t.caption_justify = "left"
            return Group(self.progress, t) if self.tasks else t

    def _line(self, text: str) -> None:
        console.print(f"{time.monotonic() - self.started:6.1f}s  {text}", highlight=False)

    def event(self, node: str, step: str, detail: str) -> None:
        with self.lock:
            if node == "*":
                # About the whole rollout (a pause, the wait for approval): one line under the table,
                # until the next batch starts.
                self.rollout_line = (detail, time.monotonic())
            elif step == "batch":
                self.rollout_line = None
            row = self.rows.get(node)
            if step == "stage":
                self.staging.add(node)
            if row is not None and step == "batch":
                row["batch"] = detail
            elif row is not None:
                if row["step"] != step:
                    row["since"] = time.monotonic()
                row["step"], row["detail"] = step, detail
        if self.lines:
            self._line(f"{safe(f'{node:<16}')} {safe(f'{step:<12}')} {safe(detail)}")

    def heartbeat(self) -> None:
        """Where the run is, as one line: staging's bytes while it stages, else nodes per step."""
        with self.lock:
            if self.stage_started is not None and len(self.staged) < len(self.staging):
                text = self._stage_line()
            else:
                steps: dict[str, int] = {}
                for row in self.rows.values():
                    steps[row["step"]] = steps.get(row["step"], 0) + 1
                text = f"{safe(self.title)}: " + ", ".join(f"{n} {safe(step)}" for step, n in steps.items())
        self._line(text)

    def _stage_line(self) -> str:
        done, total = sum(self.stage_done.values()), sum(self.stage_total.values())
        seconds = time.monotonic() - (self.stage_started or time.monotonic())
        speed = f", {human_bytes(done / seconds)}/s" if seconds > 0 else ""
        return (f"stage: {len(self.staged)}/{len(self.staging | self.staged)} nodes, "
                f"{human_bytes(done)} of {human_bytes(total)}{speed}")

    # rollout.stage.StageProgress
    def stage_start(self, node: str, total: int) -> None:
        with self.lock:
            self.staging.add(node)
            self.stage_total[node], self.stage_done[node] = total, 0
            if self.stage_started is None:
                self.stage_started = time.monotonic()
            if not self.interactive:
                return
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
            self.stage_done[node] = done
            task = self.tasks.get(node)
            if task is None:
                return
            self.progress.update(task, completed=done)
            self.progress.update(self.total_task, completed=sum(t.completed for t in self.progress.tasks
                                                                  if t.id != self.total_task))

    def stage_end(self, node: str, result: Any) -> None:
        with self.lock:
            self.staging.add(node)
            self.staged.add(node)
            if self.stage_started is None:
                self.stage_started = time.monotonic()
            line = self._stage_line()
        if self.stage_events:
            self.event(node, "failed" if result.error else "staged",
                       f"{result.outcome}, {sent_of(result.bytes_sent, result.full_bytes if result.mode else 0)}"
                       + (f" ({result.mode})" if result.mode else "") + (f": {result.error}" if result.error else ""))
        if self.shown and not self.interactive:
            self._line(line)


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
                  "rolled-back": "yellow", "unreachable": "bold red", "not-started": "dim"}
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
        if not verbosity.quiet:
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
                          f"{sent_of(result.bytes_sent, result.full_bytes)} sent; "
                          f"journal: imagetool history {safe(result.rollout_id)}")
    if result.exit_code:
        from imagetool.errors import NotApprovedError, RolloutFailedError, UnreachableError
        from rollout.policy import OK_OUTCOMES

        cls = {4: UnreachableError, 9: NotApprovedError}.get(result.exit_code, RolloutFailedError)
        raise cls(result.reason or f"{result.kind} {result.rollout_id}: not every node reached its target",
                  nodes=[r.node for r in result.nodes if r.outcome not in OK_OUTCOMES])
