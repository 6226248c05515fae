"""Batches: how many nodes activate at once, in Ansible's `serial` terms.

"1,2,25%" means a canary of one node, then two, then a quarter of the nodes at a time until all
are covered: the last entry repeats. Percentages are of the nodes this run activates (nodes
already on the target take no batch slot), rounded down but at least one, so "25%" of three
nodes is still a batch of one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from imagetool.errors import InputError

T = TypeVar("T")

# A canary of one node, then a quarter of the fleet at a time.
DEFAULT_BATCHES = "1,25%"

_ENTRY_RE = re.compile(r"^(\d+(?:\.\d+)?)(%?)$")


def _entry(text: str, what: str) -> tuple[float, bool]:
    m = _ENTRY_RE.match(text.strip())
    if not m:
        raise InputError(f"{what}: {text.strip()!r} is neither a number of nodes (e.g. 2) nor a percentage (e.g. 25%)")
    value, percent = float(m.group(1)), bool(m.group(2))
    if not percent and not value.is_integer():
        raise InputError(f"{what}: {text.strip()!r}: a number of nodes must be a whole number")
    return value, percent


@dataclass(frozen=True)
class BatchSpec:
    """A parsed --batch value: each entry a node count or a percentage; the last one repeats."""

    text: str
    entries: tuple[tuple[float, bool], ...]

    @classmethod
    def parse(cls, spec: str) -> BatchSpec:
        what = f"--batch {spec!r}"
        texts = str(spec).split(",")
        if not spec or any(not e.strip() for e in texts):
            raise InputError(f"{what}: expected a comma-separated list like '1,2,25%'")
        entries = []
        for text in texts:
            value, percent = _entry(text, what)
            if percent and (value <= 0 or value > 100):
                raise InputError(f"{what}: {text.strip()!r}: a percentage must be above 0% and at most 100%")
            if not percent and value < 1:
                raise InputError(f"{what}: {text.strip()!r}: a batch needs at least one node")
            entries.append((value, percent))
        return cls(str(spec), tuple(entries))

    def sizes(self, n_nodes: int) -> list[int]:
        """Batch sizes covering `n_nodes`: percentages are of `n_nodes`, rounded down, at least 1."""
        sizes = [max(1, math.floor(n_nodes * v / 100)) if percent else int(v) for v, percent in self.entries]
        return cover(sizes, n_nodes)


def cover(sizes: Sequence[int], n_nodes: int) -> list[int]:
    """`sizes` cut or extended (the last size repeats) to add up to exactly `n_nodes`."""
    out: list[int] = []
    covered = 0
    while covered < n_nodes:
        size = min(sizes[min(len(out), len(sizes) - 1)], n_nodes - covered)
        out.append(size)
        covered += size
    return out


def parse_batches(spec: str, n_nodes: int) -> list[int]:
    """Batch sizes covering `n_nodes`, e.g. parse_batches("1,2,25%", 10) == [1, 2, 2, 2, 2, 1]."""
    return BatchSpec.parse(spec).sizes(n_nodes)


def split(nodes: Sequence[T], sizes: Sequence[int]) -> list[list[T]]:
    """Cut `nodes` into consecutive batches of `sizes` (which must add up to len(nodes))."""
    if sum(sizes) != len(nodes):
        raise ValueError(f"batch sizes {list(sizes)} do not add up to {len(nodes)} nodes")
    out: list[list[T]] = []
    start = 0
    for size in sizes:
        out.append(list(nodes[start:start + size]))
        start += size
    return out


def parse_threshold(spec: str | int, size: int) -> int:
    """How many failed nodes a batch of `size` nodes tolerates: "2" is two, "10%" is a tenth of
    the batch rounded down.

    A rollout stops when a batch's failures exceed this number (see policy.should_stop), so the
    default "0" stops at the first failure and "100%" never stops. Rounding down is Ansible's
    max_fail_percentage exactly: it stops when failed/size > P/100, unrounded, which for a whole
    number of failures is failed > floor(size * P / 100).
    """
    what = f"--max-failures {spec!r}"
    value, percent = _entry(str(spec), what)
    if percent:
        if value > 100:
            raise InputError(f"{what}: a percentage must be at most 100%")
        return math.floor(size * value / 100)
    return int(value)
