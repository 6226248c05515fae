"""Sizes as the operator reads them: binary units (KiB, MiB, GiB), one formatter for every
message, table and progress line, so 512.0 MiB means the same everywhere."""

from __future__ import annotations


def human_bytes(n: float | None) -> str:
    """1536 -> "1.5 KiB"; None (not known) -> "-"."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
