from __future__ import annotations

import pytest

from imagetool.errors import InputError
from rollout.batch import parse_batches, parse_threshold, split


@pytest.mark.parametrize(
    "spec, n, expected",
    [
        ("1", 3, [1, 1, 1]),
        ("2", 5, [2, 2, 1]),
        ("25%", 8, [2, 2, 2, 2]),
        ("25%", 3, [1, 1, 1]),  # rounded down, but at least one
        ("1,2,25%", 10, [1, 2, 2, 2, 2, 1]),
        ("1,2,25%", 2, [1, 1]),
        ("1,50%", 9, [1, 4, 4]),
        ("100%", 7, [7]),
        ("1,100%", 7, [1, 6]),
        ("10", 3, [3]),
        ("1, 2", 4, [1, 2, 1]),
        ("1", 0, []),
    ],
)
def test_parse_batches(spec: str, n: int, expected: list[int]) -> None:
    assert parse_batches(spec, n) == expected
    assert sum(expected) == n


@pytest.mark.parametrize("spec", ["", "0", "0%", "abc", "1,,2", "-1", "150%", "1.5", "2,x"])
def test_parse_batches_rejects(spec: str) -> None:
    with pytest.raises(InputError, match="--batch"):
        parse_batches(spec, 10)


def test_split() -> None:
    assert split(list("abcdef"), [1, 2, 3]) == [["a"], ["b", "c"], ["d", "e", "f"]]
    assert split([], []) == []
    with pytest.raises(ValueError):
        split(list("abc"), [1, 1])


@pytest.mark.parametrize(
    "spec, total, expected",
    [("0", 10, 0), ("2", 10, 2), ("10%", 20, 2), ("10%", 5, 0), ("50%", 5, 2), ("100%", 7, 7), ("12.5%", 16, 2)],
)
def test_parse_threshold(spec: str, total: int, expected: int) -> None:
    assert parse_threshold(spec, total) == expected


@pytest.mark.parametrize("spec", ["x", "-1", "101%", "1.5"])
def test_parse_threshold_rejects(spec: str) -> None:
    with pytest.raises(InputError, match="--max-failures"):
        parse_threshold(spec, 10)
