"""What every command shares: the `main` group, output consoles, JSON, error handling, options."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

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


# Terminal control characters (ESC starts colour changes, window titles and OSC 8 links): shown
# as \xNN, never sent to the terminal. Newlines and tabs stay.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe(text: object) -> str:
    """Text that is not the tool's own (from nodes, manifests, journals, files, errors quoting
    them), ready to go into rich markup: markup escaped (`[/x]` would crash the print, `[link=...]`
    would show a link of the sender's choice) and control characters made visible."""
    return escape(_CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text)))


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The one place where core errors become messages and exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ImagetoolError as e:
            console.print(f"[bold red]error:[/] {safe(e)}", highlight=False)
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
