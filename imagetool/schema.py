"""Validating what the tool reads (release files, manifests, inventories) into dataclasses.

One set of checks for all three, each error naming the file, the key and the problem, e.g.
`webapp.yaml: key 'packages[2]': expected a string, got 3 (an integer)`. A `Where` is a place in a
file; the checks take the value and its `Where` and either return the value or raise.

Two ways of writing the key, both long in operators' hands: release files and manifests say
`key 'health_checks[0].timeout'`; inventories say `nodes.web1.port` (list items by their name
where they have one, e.g. `health_checks.http`).
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Iterable
from typing import Any, Literal

from imagetool.errors import ImagetoolError, InputError

Style = Literal["key", "path"]


def type_name(value: Any) -> str:
    """What a YAML or JSON value is, as an operator reads it."""
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 80, 80


def short(value: Any) -> str:
    """repr(value), cut short: an error message quotes what it refuses, never all of it (a value
    may be megabytes long, or a tree shared a million times over by YAML aliases)."""
    return _REPR.repr(value)


class Where:
    """A key path in a file, and how errors about it are raised."""

    def __init__(
        self,
        file: object,
        keys: tuple[str, ...] = (),
        *,
        style: Style = "key",
        error: type[ImagetoolError] = InputError,
    ) -> None:
        self.file = str(file)
        self.keys = keys
        self.style = style
        self.error_class = error

    def _child(self, keys: tuple[str, ...]) -> Where:
        return Where(self.file, keys, style=self.style, error=self.error_class)

    def __truediv__(self, key: object) -> Where:
        """The value under `key` of the mapping here."""
        return self._child((*self.keys, str(key)))

    def __getitem__(self, index: int) -> Where:
        """Item `index` of the list here."""
        if self.style == "path" or not self.keys:
            return self / index
        return self._child((*self.keys[:-1], f"{self.keys[-1]}[{index}]"))

    @property
    def key(self) -> str:
        return ".".join(self.keys)

    def __str__(self) -> str:
        """The message prefix for this place, e.g. "webapp.yaml: key 'name'"."""
        if self.style == "path":
            return f"{self.file}: {self.key}" if self.keys else self.file
        return f"{self.file}: key '{self.key}'" if self.keys else f"{self.file}: top level"

    def error(self, problem: str) -> ImagetoolError:
        return self.error_class(f"{self}: {problem}")

    def got(self, expected: str, value: Any) -> ImagetoolError:
        return self.error(f"expected {expected}, got {short(value)} ({type_name(value)})")

    def missing(self, key: str, hint: str = "") -> ImagetoolError:
        """`key` is required in the mapping here and absent."""
        if self.style == "path":
            return self.error(f"missing '{key}'" + (f" ({hint})" if hint else ""))
        return (self / key).error("missing (required)" + (f": {hint}" if hint else ""))

    def unknown(self, keys: list[str], allowed: tuple[str, ...]) -> ImagetoolError:
        allowed_text = f"(allowed: {', '.join(allowed)})"
        if self.style == "path":
            s = "s" if len(keys) > 1 else ""
            return self.error(f"unknown key{s} {', '.join(repr(k) for k in keys)} {allowed_text}")
        return (self / keys[0]).error(f"unknown key {allowed_text}")


# --- checks ------------------------------------------------------------------------------------


def mapping(value: Any, where: Where, allowed: Iterable[str] | None = None, *,
            required: Iterable[str] = (), optional: bool = True) -> dict[str, Any]:
    """A mapping with only `allowed` keys (any string keys if None) and all `required` ones.
    Absent (None) reads as empty unless `optional` is false."""
    if value is None and optional:
        value = {}
    if not isinstance(value, dict):
        expected = f"a mapping with keys {', '.join(allowed)}" if allowed is not None else "a mapping"
        raise where.got(expected, value)
    if allowed is not None:
        allowed = tuple(allowed)
        unknown = [str(k) for k in value if k not in allowed]
        if unknown:
            raise where.unknown(unknown, allowed)
    elif not all(isinstance(k, str) for k in value):
        raise where.got("a mapping of names to values", value)
    for key in required:
        if value.get(key) is None:
            raise where.missing(key)
    return value


def string(value: Any, where: Where, pattern: re.Pattern[str] | None = None, what: str = "", *,
           non_empty: bool = False) -> str:
    """A string; matching `pattern` (else "'x' is not a valid WHAT") and not blank if asked."""
    if not isinstance(value, str) or (non_empty and not value.strip()):
        raise where.got("a non-empty string" if non_empty else "a string", value)
    if pattern is not None and not pattern.match(value):
        raise where.error(f"{short(value)} is not a valid {what}")
    return value


def sequence(value: Any, where: Where, *, optional: bool = True) -> list[Any]:
    """A list; absent (None) reads as empty unless `optional` is false."""
    if value is None and optional:
        return []
    if not isinstance(value, list):
        raise where.got("a list", value)
    return value


def string_list(value: Any, where: Where, pattern: re.Pattern[str] | None = None, what: str = "", *,
                unique: bool = True, optional: bool = True) -> tuple[str, ...]:
    """A list of strings, each checked as by `string`; absent reads as empty."""
    items: list[str] = []
    for i, item in enumerate(sequence(value, where, optional=optional)):
        item = string(item, where[i], pattern, what)
        if unique and item in items:
            raise where[i].error(f"{item!r} is listed twice")
        items.append(item)
    return tuple(items)


def boolean(value: Any, where: Where) -> bool:
    """true or false (YAML's booleans), not a string or a number."""
    if not isinstance(value, bool):
        raise where.got("true or false", value)
    return value


def integer(value: Any, where: Where, *, minimum: int | None = None, maximum: int | None = None,
            what: str = "an integer") -> int:
    """An integer (not a boolean, not a string of digits) in [minimum, maximum]."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and minimum is not None and value < minimum or ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
        if minimum is not None and maximum is not None:
            what = f"{what} {minimum}-{maximum}"
        elif minimum is not None:
            what = f"{what} >= {minimum}"
        raise where.got(what, value)
    return value


def number(value: Any, where: Where, *, minimum: float, exclusive: bool = False,
           maximum: float | None = None) -> float:
    """A finite number (int or float, not a boolean) >= minimum (> if exclusive), <= maximum.
    `.nan` and `.inf` are YAML floats: refused here, or a timeout would never run out."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if (not ok or value < minimum or (exclusive and value == minimum)
            or (maximum is not None and value > maximum)):
        expected = f"a number {'>' if exclusive else '>='} {minimum:g}"
        raise where.got(expected + (f" and <= {maximum:g}" if maximum is not None else ""), value)
    return value


# The longest timeout or interval a file may ask for: a day. Longer is a typo, and large enough
# values overflow the system's timers.
MAX_SECONDS = 86400.0


def port(value: Any, where: Where) -> int:
    """A TCP port; a string of digits too (ssh config values are strings)."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    return integer(value, where, minimum=1, maximum=65535, what="a port number")


def one_of(value: Any, where: Where, choices: Iterable[str], what: str = "") -> str:
    choices = tuple(choices)
    if value not in choices:
        raise where.error(f"{short(value)} is not {what or 'supported'}; choose one of: {', '.join(choices)}")
    return value
