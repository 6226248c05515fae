"""The rollout journal: what every rollout did, one JSON line per event, kept on the controller.

Each rollout or rollback writes `<state dir>/rollouts/<id>.jsonl`:

    {"time": ..., "event": "begin", "kind": "rollout", "target": ..., "nodes": [...], ...}
    {"time": ..., "event": "step", "node": "node1", "step": "activate", "outcome": "running", "detail": ...}
    ...
    {"time": ..., "event": "end", "exit_code": 0, "outcome": "done", "reason": null, ...}

A run killed with -9 simply has no "end" line: `history` shows it as interrupted, and the next
run against the same nodes reconciles from the nodes' real state (the journal is a record, never
the source of truth). Lines are appended with one write() each, so a reader never sees half a line
from a live writer.

The state directory is $IMAGETOOL_STATE_DIR, else $XDG_STATE_HOME/imagetool, else
~/.local/state/imagetool.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagetool.errors import InputError

ROLLOUT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Steps that end a node's part in a rollout; their outcome is the step itself.
FINAL_STEPS = {"done", "skipped", "failed", "rolled-back", "unreachable", "not-started", "planned"}


def check_rollout_id(value: str, where: str = "rollout id") -> str:
    if not ROLLOUT_ID_RE.match(value or "") or ".." in value:
        raise InputError(f"{where} {value!r}: expected letters, digits, '.', '_' or '-' (at most 64), "
                         "like 20261123T120000-a1b2c3")
    return value


def state_dir(override: str | os.PathLike[str] | None = None) -> Path:
    if override:
        return Path(override)
    if os.environ.get("IMAGETOOL_STATE_DIR"):
        return Path(os.environ["IMAGETOOL_STATE_DIR"])
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "imagetool"


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class Journal:
    """Appends one rollout's events. Thread-safe: nodes report from worker threads."""

    def __init__(self, directory: Path, rollout_id: str) -> None:
        check_rollout_id(rollout_id)
        self.path = Path(directory) / "rollouts" / f"{rollout_id}.jsonl"
        self.rollout_id = rollout_id
        self._lock = threading.Lock()
        # The file is made by the first event: a run refused before it began (a bad --to, nodes
        # named twice) leaves no empty journal behind for `history` to list.
        self._fd: int | None = None
        self._closed = False

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise InputError(f"journal {self.path}: cannot write: {e.strerror}") from None

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"time": _now(), "event": event, **fields}, default=str, sort_keys=True) + "\n"
        with self._lock:
            if self._closed:
                return
            if self._fd is None:
                self._fd = self._open()
            os.write(self._fd, line.encode())

    def step(self, node: str, step: str, detail: str = "") -> None:
        outcome = step if step in FINAL_STEPS else ("warning" if step == "warning" else "running")
        self.write("step", node=node, step=step, outcome=outcome, detail=detail)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._closed = True


@dataclass
class RolloutRecord:
    """One rollout as its journal tells it."""

    id: str
    path: Path
    kind: str = "?"
    target: str | None = None
    command: str | None = None
    owner: str | None = None
    nodes: list[str] = field(default_factory=list)
    started: str | None = None
    ended: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    dry_run: bool = False
    resumes: list[str] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.ended is None:
            return "interrupted"
        if self.exit_code != 0:
            # A plan that failed (unreachable nodes, a node it cannot move) failed: say so.
            return f"exit {self.exit_code}" + (" (dry run)" if self.dry_run else "")
        return "dry-run" if self.dry_run else "ok"

    def to_dict(self, events: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "kind": self.kind, "target": self.target, "command": self.command,
             "owner": self.owner, "nodes": self.nodes, "started": self.started, "ended": self.ended,
             "state": self.state, "exit_code": self.exit_code, "reason": self.reason,
             "resumes": self.resumes, "outcomes": self.outcomes, "journal": str(self.path)}
        if events:
            d["events"] = self.events
        return d


# A journal line is one event: a few hundred bytes, a few KiB with a long error. Longer is not a
# line this tool wrote; a journal this long is not one rollout's either.
MAX_LINE_BYTES = 1 << 20
MAX_JOURNAL_LINES = 1_000_000


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def read_record(path: Path) -> RolloutRecord:
    """The rollout a journal tells; lines that are not events (torn by a power loss, damaged,
    too long) are skipped, and a journal that cannot be read at all is an InputError."""
    rec = RolloutRecord(id=path.name.removesuffix(".jsonl"), path=path)
    try:
        f = open(path, "rb")
    except IsADirectoryError:
        raise InputError(f"journal {path}: is a directory, not a journal file") from None
    except OSError as e:
        raise InputError(f"journal {path}: cannot read: {e.strerror or e}") from None
    with f:
        for _ in range(MAX_JOURNAL_LINES):
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                break
            if len(line) > MAX_LINE_BYTES:
                while line and not line.endswith(b"\n"):  # skip the rest of the overlong line
                    line = f.readline(MAX_LINE_BYTES)
                continue
            try:
                ev = json.loads(line.decode("utf-8", errors="replace"))
            except ValueError:
                continue  # a torn last line (power loss): skip it, keep the rest
            if not isinstance(ev, dict):
                continue
            rec.events.append(ev)
            kind = ev.get("event")
            if kind == "begin":
                rec.kind, rec.target = str(ev.get("kind", "?")), _text(ev.get("target"))
                rec.command, rec.owner = _text(ev.get("command")), _text(ev.get("owner"))
                nodes = ev.get("nodes")
                rec.nodes = [str(n) for n in nodes] if isinstance(nodes, list) else []
                rec.started = _text(ev.get("time"))
                rec.dry_run = bool(ev.get("dry_run"))
            elif kind == "step" and ev.get("outcome") in FINAL_STEPS:
                rec.outcomes[str(ev.get("node"))] = ev["outcome"]
            elif kind == "takeover" and ev.get("rollout"):
                rec.resumes.append(str(ev["rollout"]))
            elif kind == "end":
                code = ev.get("exit_code")
                rec.ended, rec.reason = _text(ev.get("time")) or "?", _text(ev.get("reason"))
                rec.exit_code = code if isinstance(code, int) and not isinstance(code, bool) else 1
    return rec


def list_records(directory: Path) -> list[RolloutRecord]:
    """Every journaled rollout, oldest first (ids sort by time)."""
    root = Path(directory) / "rollouts"
    if not root.is_dir():
        return []
    # A directory or unreadable file among the journals is skipped here (history of the rest still
    # shows) and named when asked for by id.
    return [read_record(p) for p in sorted(root.glob("*.jsonl")) if p.is_file()]


def find_record(directory: Path, rollout_id: str) -> RolloutRecord:
    """One rollout by id, or by a unique prefix of it."""
    check_rollout_id(rollout_id)
    root = Path(directory) / "rollouts"
    exact = root / f"{rollout_id}.jsonl"
    if exact.exists():
        return read_record(exact)
    matches = sorted(root.glob(f"{rollout_id}*.jsonl")) if root.is_dir() else []
    if len(matches) == 1:
        return read_record(matches[0])
    if not matches:
        raise InputError(f"no rollout {rollout_id!r} in {root} (see `imagetool history`)")
    raise InputError(f"rollout id {rollout_id!r} is ambiguous: "
                     + ", ".join(m.name.removesuffix(".jsonl") for m in matches))
