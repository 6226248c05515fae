"""A rollout's report: one self-contained HTML page drawn from its journal alone.

The page is for people after the fact: a timeline (inline SVG) of every node's phases along the
run's time axis with its batches marked, a table of bytes sent and outcome per node, the run's
summary, the health evidence of each node that failed, and the release diff when the store has
both manifests. Nothing is loaded from elsewhere (no CSS, script, font or image), so the file can
be mailed or attached to a ticket.

Every value in a journal may come from a node (a check's output, an error quoting it) or from an
inventory: all of it is HTML-escaped here, in text and in attributes alike.

Phases come from the node's `step` events: a step starts its phase, which lasts until the node's
next step of another phase or its final step (done, rolled-back, ...). A run without an `end`
event was interrupted (or is still running): its open phases are drawn up to its last event.
"""

from __future__ import annotations

import html
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imagetool.diff import ReleaseDiff, diff_releases
from imagetool.errors import ImagetoolError, InputError
from imagetool.store import Store
from rollout.journal import FINAL_STEPS, RolloutRecord

# The phases drawn, in the order a node goes through them, with their colours. The rollback's red
# is the failure colour of the page.
PHASES = {
    "prepare": ("connect, lock, read state", "#c8c8c8"),
    "stage": ("stage", "#4c78a8"),
    "reboot": ("one-shot boot, reboot", "#9467bd"),
    "health": ("health gate", "#e8a33d"),
    "commit": ("commit, after-commit hooks", "#54a24b"),
    "rollback": ("rollback", "#d62728"),
}
OUTCOME_COLOURS = {
    "done": "#54a24b", "skipped": "#9e9e9e", "rolled-back": "#d62728", "failed": "#7f0000",
    "not-started": "#ffffff", "planned": "#7aa6c2", "interrupted": "#e0b000", "stopped": "#e0b000",
}
# Which phase a step starts. Steps not here (connect, lock, warning, ...) change nothing drawn;
# `hook` runs inside the phase it belongs to (before-activate, after-commit, after-rollback).
STEP_PHASES = {"batch": "reboot", "activate": "reboot", "boot": "reboot", "verify": "health",
               "commit": "commit", "run-once": "commit", "rollback": "rollback"}
PREPARE_STEPS = {"connect", "lock", "reconcile"}

_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def esc(value: object) -> str:
    """Text from a journal, safe in HTML and SVG text and in quoted attributes; control characters
    shown as \\xNN."""
    text = _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))
    return html.escape(text, quote=True)


def _time(value: object) -> float | None:
    """A journal time (2026-11-23T12:00:00.123Z) as seconds since the epoch, None if it is not one."""
    try:
        return datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- the report as data ------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    start: float          # seconds since the run began
    end: float
    open: bool = False    # still running when the journal stops (an interrupted run)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    output: str


@dataclass
class HealthEvidence:
    """One health gate that failed on a node: on which image, and every check it ran."""

    image: str
    seconds: float
    checks: list[Check]


@dataclass
class NodeRow:
    name: str
    outcome: str = "interrupted"
    ended_at: float | None = None
    batch: str = ""
    from_id: str | None = None
    to_id: str | None = None
    bytes_sent: int | None = None
    # How the image travelled ("full", "delta" or "pull") and what the whole of it costs, when it did.
    transfer: str | None = None
    image_bytes: int | None = None
    reason: str = ""
    phases: list[Phase] = field(default_factory=list)
    failed_gates: list[HealthEvidence] = field(default_factory=list)


@dataclass
class BatchMark:
    label: str
    start: float   # its first node's batch step


@dataclass
class Report:
    record: RolloutRecord
    duration: float
    rows: list[NodeRow]
    batches: list[BatchMark]
    resumed_at: list[float]
    diffs: list[ReleaseDiff]
    diff_note: str | None

    @property
    def state(self) -> str:
        return self.record.state

    @property
    def previous(self) -> list[str]:
        """The releases the nodes were on before (those moved to another one)."""
        return sorted({r.from_id for r in self.rows if r.from_id and r.from_id != r.to_id})

    @property
    def bytes_sent(self) -> int:
        return sum(r.bytes_sent or 0 for r in self.rows)

    def summary(self) -> dict[str, Any]:
        rec = self.record
        return {"id": rec.id, "kind": rec.kind, "target": rec.target, "previous": self.previous,
                "state": self.state, "exit_code": rec.exit_code, "reason": rec.reason, "started": rec.started,
                "ended": rec.ended, "seconds": round(self.duration, 1), "bytes_sent": self.bytes_sent,
                "outcomes": dict(Counter(r.outcome for r in self.rows)), "journal": str(rec.path)}


def build_report(record: RolloutRecord, store: Store | None = None) -> Report:
    """The report of one journaled run; `store` (may be None) for the release diff."""
    timed = [(t, ev) for ev in record.events if (t := _time(ev.get("time"))) is not None]
    if not timed:
        raise InputError(f"journal {record.path}: no events to report on")
    t0 = timed[0][0]
    end_t = timed[-1][0] - t0
    rows: dict[str, NodeRow] = {name: NodeRow(name) for name in record.nodes}
    current: dict[str, Phase] = {}
    batches: dict[str, BatchMark] = {}
    resumed_at: list[float] = []
    last_t = 0.0
    end_outcomes: dict[str, str] = {}

    def close(node: str, at: float, *, open_: bool = False) -> None:
        phase = current.pop(node, None)
        if phase is not None:
            phase.end, phase.open = at, open_
            rows[node].phases.append(phase)

    for t_abs, ev in timed:
        t = t_abs - t0
        kind = ev.get("event")
        node = str(ev.get("node"))
        if kind == "begin":
            if t > 0:
                # The same rollout id run again: what the earlier run left open stopped with it.
                for name in list(current):
                    close(name, last_t, open_=True)
                resumed_at.append(t)
            for name in ev.get("nodes") or []:
                rows.setdefault(str(name), NodeRow(str(name)))
        elif kind == "end":
            outcomes = ev.get("outcomes")
            if isinstance(outcomes, dict):
                end_outcomes.update({str(k): str(v) for k, v in outcomes.items()})
        elif kind == "plan" and node in rows:
            rows[node].from_id = _text(ev.get("from_id"))
            rows[node].to_id = _text(ev.get("to_id"))
        elif kind == "stage" and node in rows:
            sent = _int(ev.get("bytes_sent"))
            if sent is not None:
                rows[node].bytes_sent = (rows[node].bytes_sent or 0) + sent
            if ev.get("mode") in ("full", "delta", "pull"):
                rows[node].transfer, rows[node].image_bytes = str(ev["mode"]), _int(ev.get("full_bytes"))
        elif kind == "health" and node in rows and ev.get("healthy") is False:
            checks = [Check(str(c.get("name")), c.get("ok") is True, str(c.get("detail") or ""),
                            str(c.get("output") or ""))
                      for c in ev.get("checks") or [] if isinstance(c, dict)]
            seconds = ev.get("seconds")
            rows[node].failed_gates.append(HealthEvidence(
                str(ev.get("image")), float(seconds) if isinstance(seconds, (int, float)) else 0.0, checks))
        elif kind == "step" and node in rows:
            _step(rows[node], current, close, str(ev.get("step")), str(ev.get("detail") or ""), t, batches,
                  len(resumed_at))
        last_t = t
    for name in list(current):
        # No final step: the run stopped (or is still going) with this phase open.
        close(name, end_t, open_=record.ended is None)
    for name, outcome in end_outcomes.items():
        if name in rows:
            rows[name].outcome = outcome
    if record.ended is not None:
        # Ended without a final step for these nodes: the run stopped on an error (unreachable
        # nodes, a lock, Ctrl-C) that its end event names.
        for row in rows.values():
            if row.outcome == "interrupted":
                row.outcome, row.reason = "stopped", row.reason or (record.reason or "")
    diffs, note = _diffs(list(rows.values()), store)
    return Report(record, end_t, list(rows.values()), sorted(batches.values(), key=lambda b: b.start),
                  resumed_at, diffs, note)


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _step(row: NodeRow, current: dict[str, Phase], close: Callable[..., None], step: str, detail: str, t: float,
          batches: dict[str, BatchMark], run: int) -> None:
    """One step of one node: open, continue or close its phase."""
    name = row.name
    phase = current.get(name)
    if step in FINAL_STEPS:
        close(name, t)
        row.outcome, row.ended_at = step, t
        if step in ("failed", "rolled-back", "not-started") and detail:
            row.reason = row.reason or detail
        return
    if step == "batch":
        row.batch = detail
        label = "batch " + detail.split("/")[0] + (" (canary)" if "canary" in detail else "")
        # A run again under the same id has batches of its own.
        batches.setdefault(f"{run}:{label}", BatchMark(label, t))
    if step == "rollback" and detail and not row.reason:
        row.reason = detail
    if step == "stage":
        # A node's first stage step starts its copy, the second reports it done: then it waits.
        copying = phase is not None and phase.name == "stage"
        close(name, t)
        if not copying:
            current[name] = Phase("stage", t, t)
        return
    want = "prepare" if step in PREPARE_STEPS else STEP_PHASES.get(step)
    if want is None or (phase is not None and (phase.name == want or phase.name == "rollback")):
        return  # hooks and warnings, or a step inside the phase (a rollback lasts until its end)
    close(name, t)
    current[name] = Phase(want, t, t)


def _diffs(rows: list[NodeRow], store: Store | None) -> tuple[list[ReleaseDiff], str | None]:
    pairs = sorted({(r.from_id, r.to_id) for r in rows if r.from_id and r.to_id and r.from_id != r.to_id})
    if not pairs:
        return [], "no node changed release in this run"
    if store is None:
        return [], "no release store given: the release diff needs both manifests (--store)"
    diffs, missing = [], []
    for a, b in pairs:
        try:
            diffs.append(diff_releases(store.get(a).manifest, store.get(b).manifest))
        except ImagetoolError as e:
            missing.append(str(e))
    return diffs, "; ".join(missing) or None


# --- the page -----------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m{s:02d}s"


def _bytes(n: int | None) -> str:
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _tick_step(span: float) -> float:
    """A round step that puts 5 to 12 ticks on the axis."""
    for step in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600):
        if span / step <= 12:
            return step
    return 3600 * max(1, round(span / 3600 / 10))


def _sent(row: NodeRow) -> str:
    if row.transfer == "delta" and row.image_bytes:
        return f"{_bytes(row.bytes_sent)} (delta of {_bytes(row.image_bytes)})"
    if row.transfer == "pull" and row.image_bytes:
        return f"{_bytes(row.bytes_sent)} (the node pulled what it lacked of {_bytes(row.image_bytes)} from the store)"
    return _bytes(row.bytes_sent)


LABEL_W, PLOT_W, ROW_H, TOP = 170, 900, 22, 58


def _timeline(report: Report) -> str:
    span = max(report.duration, 0.001)
    scale = PLOT_W / span

    def x(t: float) -> float:
        return LABEL_W + t * scale

    height = TOP + ROW_H * len(report.rows) + 30
    width = LABEL_W + PLOT_W + 20
    out = [(f'<svg id="timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="timeline of the rollout">'),
           ('<defs><pattern id="open-hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
            'patternTransform="rotate(45)"><rect width="3" height="6" fill="#ffffff" opacity="0.6"/></pattern>'
            '</defs>')]
    bottom = TOP + ROW_H * len(report.rows)
    for i, b in enumerate(report.batches):
        nxt = report.batches[i + 1].start if i + 1 < len(report.batches) else span
        out.append(f'<rect class="batch-band" x="{x(b.start):.1f}" y="{TOP - 4}" '
                   f'width="{max(1.0, (nxt - b.start) * scale):.1f}" height="{bottom - TOP + 8}" '
                   f'fill="{"#f3f3f8" if i % 2 == 0 else "#fbfbfd"}"/>')
    step = _tick_step(span)
    k = 0
    while k * step <= span + 1e-9:
        tx = x(k * step)
        out.append(f'<line class="tick" x1="{tx:.1f}" y1="{TOP - 6}" x2="{tx:.1f}" y2="{bottom + 4}" '
                   'stroke="#dddddd"/>')
        out.append(f'<text class="tick-label" x="{tx:.1f}" y="{bottom + 18}" text-anchor="middle">'
                   f'{esc(_duration(k * step) if step >= 1 else f"{k * step:.2f}s")}</text>')
        k += 1
    last_label_x = -1000.0
    lift = 0
    for b in report.batches:
        # A label too close to the one before goes one line up, so neither hides the other.
        lift = 12 - lift if x(b.start) - last_label_x < 110 else 0
        last_label_x = x(b.start)
        out.append(f'<line class="batch-marker" data-label="{esc(b.label)}" x1="{x(b.start):.1f}" '
                   f'y1="{TOP - 20 - lift}" x2="{x(b.start):.1f}" y2="{bottom + 4}" stroke="#333" '
                   'stroke-dasharray="4 3"/>')
        out.append(f'<text class="batch-label" x="{x(b.start) + 3:.1f}" y="{TOP - 22 - lift}">{esc(b.label)}</text>')
    for t in report.resumed_at:
        out.append(f'<line class="resume-marker" x1="{x(t):.1f}" y1="{TOP - 20}" x2="{x(t):.1f}" '
                   f'y2="{bottom + 4}" stroke="#e0b000" stroke-width="2"/>')
        out.append(f'<text class="batch-label" x="{x(t) + 3:.1f}" y="{TOP - 8}">run again</text>')
    for i, row in enumerate(report.rows):
        y = TOP + i * ROW_H
        label = row.name if len(row.name) <= 22 else row.name[:21] + "…"
        out.append(f'<text class="node-label" x="{LABEL_W - 8}" y="{y + 15}" text-anchor="end">{esc(label)}'
                   f'<title>{esc(row.name)}</title></text>')
        for p in row.phases:
            w = max(2.0, (p.end - p.start) * scale)
            colour = PHASES[p.name][1]
            cls = f"phase phase-{p.name}" + (" open" if p.open else "")
            tip = f"{row.name}: {PHASES[p.name][0]}, +{_duration(p.start)} for {_duration(p.end - p.start)}" + (
                " (still open when the journal ends)" if p.open else "")
            out.append(f'<rect class="{cls}" data-node="{esc(row.name)}" data-phase="{p.name}" '
                       f'data-start="{p.start:.3f}" data-end="{p.end:.3f}" x="{x(p.start):.1f}" y="{y + 3}" '
                       f'width="{w:.1f}" height="{ROW_H - 6}" fill="{colour}"><title>{esc(tip)}</title></rect>')
            if p.open:
                out.append(f'<rect class="open-hatch" x="{x(p.start):.1f}" y="{y + 3}" width="{w:.1f}" '
                           f'height="{ROW_H - 6}" fill="url(#open-hatch)"/>')
        if row.ended_at is not None:
            cx = x(row.ended_at)
            colour = OUTCOME_COLOURS.get(row.outcome, "#000")
            out.append(f'<circle class="outcome outcome-{esc(row.outcome)}" data-node="{esc(row.name)}" '
                       f'cx="{cx:.1f}" cy="{y + ROW_H / 2}" r="5" fill="{colour}" stroke="#333">'
                       f'<title>{esc(row.name)}: {esc(row.outcome)}</title></circle>')
    out.append("</svg>")
    return "\n".join(out)


def _legend() -> str:
    items = [f'<span class="key"><i style="background:{c}"></i>{esc(label)}</span>' for label, c in PHASES.values()]
    items.append('<span class="key"><i class="hatched"></i>open when the journal ends</span>')
    return '<p class="legend">' + " ".join(items) + "</p>"


def _nodes_table(report: Report) -> str:
    out = [('<table id="nodes"><thead><tr><th>node</th><th>batch</th><th>outcome</th><th>bytes sent</th>'
            '<th>from → to</th><th>time</th><th>why</th></tr></thead><tbody>')]
    for row in report.rows:
        took = sum(p.end - p.start for p in row.phases)
        first_line = row.reason.splitlines()[0] if row.reason else ""
        out.append(
            f'<tr data-node="{esc(row.name)}"><td>{esc(row.name)}</td><td>{esc(row.batch)}</td>'
            f'<td class="outcome-cell">'
            f'<span class="badge" style="background:{OUTCOME_COLOURS.get(row.outcome, "#ccc")}">'
            f'{esc(row.outcome)}</span></td><td class="num">{esc(_sent(row))}</td>'
            f'<td>{esc(row.from_id or "?")} → {esc(row.to_id or "?")}</td><td class="num">{esc(_duration(took))}</td>'
            f'<td class="why">{esc(first_line)}</td></tr>')
    out.append("</tbody></table>")
    return "\n".join(out)


def _summary(report: Report) -> str:
    rec = report.record
    begin = next((e for e in rec.events if e.get("event") == "begin"), {})
    options: dict[str, Any] = begin["options"] if isinstance(begin.get("options"), dict) else {}
    outcome = {"ok": "succeeded", "interrupted": "interrupted"}.get(report.state, report.state)
    counts = ", ".join(f"{n} {o}" for o, n in Counter(r.outcome for r in report.rows).items())
    rows = [
        ("release", rec.target or "(each node's previous image)"),
        ("previous release", ", ".join(report.previous) or "–"),
        ("started", rec.started or "?"),
        ("ended", rec.ended or "no end in the journal"),
        ("duration", _duration(report.duration) + ("" if rec.ended else " (up to the last event)")),
        ("outcome", outcome + (f": {rec.reason}" if rec.reason else "")),
        ("nodes", counts),
        ("bytes sent", _bytes(report.bytes_sent)),
        ("command", rec.command or ""),
        ("owner", rec.owner or ""),
        ("options", ", ".join(f"{k} {v}" for k, v in options.items()) + (" (dry run)" if rec.dry_run else "")),
    ]
    if rec.resumes:
        rows.append(("took over the locks of", ", ".join(rec.resumes)))
    rows.append(("journal", str(rec.path)))
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f'<table id="summary" class="state-{esc(report.state.split()[0])}">{body}</table>'


def _evidence(report: Report) -> str:
    failed = [r for r in report.rows if r.outcome in ("failed", "rolled-back", "interrupted", "stopped") and
              (r.reason or r.failed_gates)]
    if not failed:
        return "<p>No node failed.</p>"
    out = []
    for row in failed:
        out.append(f'<div class="evidence" data-node="{esc(row.name)}"><h3>{esc(row.name)}: {esc(row.outcome)}</h3>')
        if row.reason:
            out.append(f'<pre class="reason">{esc(row.reason)}</pre>')
        for gate in row.failed_gates:
            out.append(f"<p>health gate on {esc(gate.image)} failed after {esc(_duration(gate.seconds))}:</p>"
                       '<table class="checks"><thead><tr><th>check</th><th>result</th><th>detail</th><th>output</th>'
                       "</tr></thead><tbody>")
            for c in gate.checks:
                out.append(f'<tr class="{"ok" if c.ok else "failing"}"><td>{esc(c.name)}</td>'
                           f'<td>{"passed" if c.ok else "failed"}</td><td>{esc(c.detail)}</td>'
                           f'<td><pre class="output">{esc(c.output)}</pre></td></tr>')
            out.append("</tbody></table>")
        out.append("</div>")
    return "\n".join(out)


def _release_diff(report: Report) -> str:
    out = []
    if report.diff_note:
        out.append(f'<p class="note" id="diff-note">Release diff not available: {esc(report.diff_note)}</p>')
    for d in report.diffs:
        out.append(f'<h3>{esc(d.before)} → {esc(d.after)}</h3>')
        if d.is_empty:
            out.append("<p>No package, service or health check changed.</p>")
        changes = ([("added", n, "", v) for n, v in d.added] + [("removed", n, v, "") for n, v in d.removed]
                   + [("upgraded", n, o, v) for n, o, v in d.upgraded]
                   + [("downgraded", n, o, v) for n, o, v in d.downgraded])
        if changes:
            out.append('<table class="diff"><thead><tr><th>change</th><th>package</th><th>from</th><th>to</th>'
                       "</tr></thead><tbody>")
            out.extend(f'<tr class="{c}"><td>{c}</td><td>{esc(n)}</td><td>{esc(o)}</td><td>{esc(v)}</td></tr>'
                       for c, n, o, v in changes)
            out.append("</tbody></table>")
        for label, items in (("services added", d.services_added), ("services removed", d.services_removed),
                             ("health checks added", d.health_checks_added),
                             ("health checks removed", d.health_checks_removed),
                             ("health checks changed", d.health_checks_changed)):
            if items:
                out.append(f"<p>{label}: {esc(', '.join(items))}</p>")
        out.append(f"<p>image size: {esc(_bytes(d.size_before))} → {esc(_bytes(d.size_after))}</p>")
    return "\n".join(out)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:13px} th,td{padding:3px 8px;text-align:left;vertical-align:top}
#summary th{color:#555;font-weight:normal;white-space:nowrap}
#nodes thead th,.checks th,.diff th{border-bottom:1px solid #bbb}
#nodes tbody tr:nth-child(even){background:#f7f7f7} .num{text-align:right;white-space:nowrap}
.badge{display:inline-block;padding:0 6px;border-radius:3px;color:#fff;border:1px solid #999}
.badge[style*="#ffffff"]{color:#222} .why{max-width:420px;overflow-wrap:anywhere}
.banner{padding:8px 12px;border-radius:4px;margin:10px 0;font-weight:bold}
.banner.interrupted{background:#fff3c4;border:1px solid #e0b000}
.banner.failed{background:#fde0e0;border:1px solid #d62728} .banner.ok{background:#e3f4e1;border:1px solid #54a24b}
pre{margin:0;white-space:pre-wrap;overflow-wrap:anywhere;font-size:12px;max-height:300px;overflow:auto}
.evidence{border-left:4px solid #d62728;padding:2px 12px;margin:10px 0;background:#fff8f8}
.checks tr.failing td:nth-child(2){color:#d62728;font-weight:bold}
.diff tr.added td:first-child{color:#2b7a2b} .diff tr.removed td:first-child{color:#d62728}
.legend{font-size:12px} .key{margin-right:14px;white-space:nowrap}
.key i{display:inline-block;width:14px;height:10px;margin-right:4px;vertical-align:middle}
.key i.hatched{background:repeating-linear-gradient(45deg,#999 0 3px,#fff 3px 6px)}
#timeline text{font-size:11px;fill:#333} #timeline .batch-label{font-weight:bold}
.timeline-wrap{overflow-x:auto} .note{color:#555;font-style:italic}
"""


def render_html(report: Report) -> str:
    rec = report.record
    if report.state == "interrupted":
        banner = ('<p class="banner interrupted">Interrupted: the journal has no end (the controller was killed, '
                  "or the run is still going). Phases still open are drawn up to its last event.</p>")
    elif report.state == "ok":
        banner = '<p class="banner ok">Succeeded.</p>'
    else:
        banner = f'<p class="banner failed">{esc(report.state)}: {esc(rec.reason or "")}</p>'
    title = f"{rec.kind} {rec.id} → {rec.target or 'previous images'}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{CSS}</style></head>
<body data-state="{esc(report.state)}">
<h1>{esc(title)}</h1>
{banner}
<h2>Summary</h2>
{_summary(report)}
<h2>Timeline</h2>
{_legend()}
<div class="timeline-wrap">{_timeline(report)}</div>
<h2>Nodes</h2>
{_nodes_table(report)}
<h2>Health evidence of failed nodes</h2>
<div id="evidence">{_evidence(report)}</div>
<h2>Release diff</h2>
<div id="release-diff">{_release_diff(report)}</div>
</body></html>
"""


def write_report(record: RolloutRecord, output: Path, store: Store | None = None) -> Report:
    """Render the run's report into `output` (replaced whole: a reader never sees half a page)."""
    report = build_report(record, store)
    page = render_html(report)
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, output)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"report {output}: cannot write: {e.strerror or e}") from None
    return report
