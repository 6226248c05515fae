"""The operator's go-ahead after the canary (`--approve`): one answer file per rollout.

A rollout run with `--approve` stops after its canary batch, its locks held, and waits for
`<state dir>/rollouts/<id>.approve` to say `approve` or `reject`. Every way of answering writes
that one file: `imagetool approve ID [--reject]` from any terminal on the controller, the y/n
prompt of the rollout's own terminal, a CI job writing the word itself. A file needs no socket or
daemon, works wherever the state directory is, and an answer given before the question (a CI step
approving ahead) is simply there when the rollout looks.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from tenacity import Retrying, retry_if_result, stop_after_delay, stop_never, wait_fixed

Answer = Literal["approve", "reject"]
Verdict = Literal["approved", "rejected", "timed-out"]
ANSWERS: tuple[Answer, ...] = ("approve", "reject")

# How often the file is looked at, and how often a waiting rollout says it is still waiting.
POLL_INTERVAL = 0.5
REMIND_EVERY = 60.0


def approval_path(state_dir: Path, rollout_id: str) -> Path:
    return Path(state_dir) / "rollouts" / f"{rollout_id}.approve"


def answer(path: Path, what: Answer) -> None:
    """Write the answer whole (a reader sees the word or no file), replacing an earlier one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(what + "\n")
    os.replace(tmp, path)


def read_answer(path: Path) -> str | None:
    """What the file says, lower-cased and stripped; None without a file."""
    try:
        return path.read_text(errors="replace").strip().lower()
    except FileNotFoundError:
        return None


def forget(path: Path) -> None:
    """Remove an answer: a run starts with none, and uses an answer once."""
    path.unlink(missing_ok=True)


def wait_for_answer(path: Path, timeout: float | None, say: Callable[[str], None],
                    sleep: Callable[[float], None] = time.sleep) -> Verdict:
    """Wait for `approve` or `reject` in `path` (then removed), at most `timeout` seconds
    (None: as long as it takes). Anything else in the file is named once and waited past: a
    writer that is not atomic (`echo approve > F`) shows a partial word first. `say` gets a
    reminder every REMIND_EVERY seconds; `sleep` is how to wait between looks."""
    started = time.monotonic()
    remind_at, bad = started + REMIND_EVERY, ""

    def look() -> str | None:
        nonlocal remind_at, bad
        now = time.monotonic()
        if now >= remind_at:
            remind_at = now + REMIND_EVERY
            say(f"still waiting for approval ({now - started:.0f}s)")
        text = read_answer(path)
        if text in ANSWERS:
            return text
        if text and text != bad:
            bad = text
            say(f"{path} says {text[:40]!r}: expected approve or reject; still waiting")
        return None

    retrying = Retrying(retry=retry_if_result(lambda got: got is None), wait=wait_fixed(POLL_INTERVAL),
                        stop=stop_never if timeout is None else stop_after_delay(timeout),
                        sleep=sleep, retry_error_callback=lambda _: None)
    got = retrying(look)
    if got is None:
        return "timed-out"
    forget(path)
    return "approved" if got == "approve" else "rejected"
