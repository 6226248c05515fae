"""What every command shares: the `main` group, output consoles, JSON, error handling, options.

The output contract, in one place:
- stdout carries a command's result: its table, or with `--json` exactly one JSON document. A
  command that fails after producing a result (a rollout with failed nodes, `status` with an
  unreachable node) puts its error object into that document as `"error"`; one that fails before
  prints `{"error": {...}}` alone.
- stderr carries everything else: progress, the summary line, error messages.
- `imagetool -q` keeps errors and the final summary line only (with `--json`: the JSON only);
  `imagetool -v` adds per-node detail (every event, each helper command with its time).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape

from imagetool.errors import EXIT_CODES, ImagetoolError
from imagetool.units import human_bytes  # noqa: F401 - the commands' one byte formatter


def _width(stream: Any) -> int | None:
    """Into a file or a pipe (CI logs), tables get room instead of being cut at 80 columns."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return None if tty or "COLUMNS" in os.environ else 200


console = Console(stderr=True, soft_wrap=True, width=_width(sys.stderr))
out = Console(soft_wrap=True, width=_width(sys.stdout))


# Terminal control characters (ESC starts colour changes, window titles and OSC 8 links): shown
# as \xNN, never sent to the terminal. Newlines and tabs stay.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe(text: object) -> str:
    """Text that is not the tool's own (from nodes, manifests, journals, files, errors quoting
    them), ready to go into rich markup: markup escaped (`[/x]` would crash the print, `[link=...]`
    would show a link of the sender's choice) and control characters made visible."""
    return escape(_CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text)))


QUIET, NORMAL, VERBOSE = 0, 1, 2
# Seconds between plain progress lines when stderr is not a terminal (a CI log).
PROGRESS_INTERVAL = 10.0


class Verbosity:
    """How much this run says on stderr: QUIET (-q), NORMAL, VERBOSE (-v). The main group sets
    it for the one command a process runs; views read it when they start."""

    def __init__(self) -> None:
        self.level = NORMAL
        self._handler: logging.Handler | None = None

    @property
    def quiet(self) -> bool:
        return self.level == QUIET

    @property
    def verbose(self) -> bool:
        return self.level == VERBOSE

    def set(self, level: int) -> None:
        """Set the level; VERBOSE also shows the core's debug log (each helper command and its
        time, from `rollout.node`) on stderr."""
        self.level = level
        log = logging.getLogger("rollout")
        if self._handler is not None:
            log.removeHandler(self._handler)
            self._handler = None
        log.setLevel(logging.DEBUG if level == VERBOSE else logging.NOTSET)
        if level == VERBOSE:
            self._handler = _ConsoleHandler()
            log.addHandler(self._handler)


class _ConsoleHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        console.print(f"[dim]debug:[/] {safe(record.getMessage())}", highlight=False)


verbosity = Verbosity()


# The JSON document a command printed, held until it ends: a failure after it is added to it.
_DOCUMENT = "imagetool.json_document"
# Whether the command line asked for --json (for errors raised before the command runs).
_WANTS_JSON = "imagetool.wants_json"


def error_object(code: int, kind: str, message: str, nodes: Sequence[str] = ()) -> dict[str, Any]:
    """The `--json` error object: exit code, kind, the human message and the nodes concerned."""
    return {"error": {"code": code, "kind": kind, "message": message, "nodes": list(nodes)}}


def _fail(code: int, kind: str, message: str, nodes: Sequence[str], as_json: bool, document: Any) -> NoReturn:
    if as_json:
        error = error_object(code, kind, message, nodes)
        _echo_json({**document, **error} if isinstance(document, dict) else error)
    if not (as_json and verbosity.quiet):
        console.print(f"[bold red]error:[/] {safe(message)}", highlight=False)
    sys.exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The one place where core errors become messages and exit codes (and, with --json, an
    error object on stdout)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        meta = click.get_current_context().meta
        try:
            fn(*args, **kwargs)
        except ImagetoolError as e:
            _fail(e.exit_code, e.kind, str(e), e.nodes, as_json, meta.pop(_DOCUMENT, None))
        except KeyboardInterrupt:
            _fail(130, "interrupted", "interrupted", (), as_json, meta.pop(_DOCUMENT, None))
        if _DOCUMENT in meta:
            _echo_json(meta.pop(_DOCUMENT))

    return wrapper


def print_json(data: Any) -> None:
    """The command's JSON result; printed when the command ends (see handle_errors)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        _echo_json(data)
    else:
        ctx.meta[_DOCUMENT] = data


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@contextmanager
def working(text: str) -> Iterator[Callable[[str], None]]:
    """A long step's progress on stderr; yields update(text). In a terminal a spinner; in a log
    a plain line at each change of text and every PROGRESS_INTERVAL seconds (with the time so
    far), so a CI log shows the work is alive; nothing with -q."""
    started = time.monotonic()
    if verbosity.quiet:
        yield lambda _text: None
        return
    if console.is_terminal:
        with console.status(text) as status:
            yield lambda t: status.update(f"{t}  ({time.monotonic() - started:.0f}s)")
        return
    current = [text]

    def line() -> None:
        console.print(f"{current[0]}  ({time.monotonic() - started:.0f}s)", highlight=False)

    def update(t: str) -> None:
        if t != current[0]:
            current[0] = t
            line()

    line()
    with Ticker(line):
        yield update


class Ticker:
    """Calls `tick` every PROGRESS_INTERVAL seconds on a thread of its own while the block runs:
    the heartbeat of plain progress lines."""

    def __init__(self, tick: Callable[[], None]) -> None:
        self.tick = tick
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="progress-ticker", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(PROGRESS_INTERVAL):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a broken progress line must not end the work it reports on
                pass

    def __enter__(self) -> Ticker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


EPILOG = "Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items())


def _wants_json(args: Sequence[str]) -> bool:
    args = list(args)
    return "--json" in (args[: args.index("--")] if "--" in args else args)


class MainGroup(click.Group):
    """The main group: click's own usage errors (exit 2) become --json error objects too, when
    the command line asked for --json; click still prints its usage message on stderr."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        wants_json = _wants_json(args)
        try:
            ctx = super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as e:
            _usage_error(e, wants_json)
            raise
        ctx.meta[_WANTS_JSON] = wants_json
        return ctx

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            _usage_error(e, bool(ctx.meta.get(_WANTS_JSON)))
            raise


def _usage_error(e: click.ClickException, wants_json: bool) -> None:
    if wants_json:
        _echo_json(error_object(e.exit_code, "usage" if isinstance(e, click.UsageError) else "error",
                                e.format_message()))


@click.group(cls=MainGroup, epilog=EPILOG)
@click.version_option(package_name="imagetool")
@click.option("-q", "--quiet", is_flag=True,
              help="Only errors and the final summary line (with --json: only the JSON).")
@click.option("-v", "--verbose", is_flag=True,
              help="Per-node detail: every step of every node, each node helper command and its time.")
def main(quiet: bool, verbose: bool) -> None:
    """Build read-only root images, roll them out node by node behind health gates, roll back."""
    if quiet and verbose:
        raise click.UsageError("-q and -v: choose one")
    verbosity.set(QUIET if quiet else VERBOSE if verbose else NORMAL)


store_option = click.option(
    "--store", type=click.Path(file_okay=False), default=None,
    help="Release store directory (default: $IMAGETOOL_STORE or ./releases).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], units[t[-1]]) if t and t[-1] in units else (t, 1)
    try:
        size = int(float(num) * unit)  # nan: ValueError; inf: OverflowError
    except (ValueError, OverflowError):
        raise click.BadParameter(f"{text!r} is not a size (e.g. 4G, 512M)") from None
    if size <= 0:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 4G, 512M)")
    return size


class Seconds(click.ParamType):
    """A finite number of seconds in [minimum, maximum]. click's FloatRange lets `nan` through
    (it compares false with both bounds) and `inf` too when there is no maximum: either would
    turn a timeout off rather than set it."""

    name = "seconds"

    def __init__(self, minimum: float = 0, maximum: float = 86400) -> None:
        self.minimum, self.maximum = minimum, maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(number) or not self.minimum <= number <= self.maximum:
            self.fail(f"{value!r} is not a number of seconds from {self.minimum:g} to {self.maximum:g}", param, ctx)
        return number
