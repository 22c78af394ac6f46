from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpcckpt.policy.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 30), ("30s", 30), ("10m", 600), ("1h", 3600), ("2d", 172800), ("1h30m", 5400), ("1.5h", 5400),
     ("1w", 604800), (" 5M ", 300), ("0", 0)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "10 m", "1h-5m", "5y", "-1", "1e3", "auto"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [("4096", 4096), ("64K", 65536), ("500G", 500 << 30), ("1.5TiB", int(1.5 * (1 << 40))), ("4MiB", 4 << 20),
     ("500GB", 500 * 10**9), ("2 M", 2 << 20), ("7b", 7), ("1Gi", 1 << 30)],
)
def test_sizes(text: str, nbytes: int) -> None:
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["", "G", "5iB", "1.2.3G", "5X", "-5G", "lots"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@given(st.integers(0, 10**9))
def test_duration_spelling_round_trips(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(0, 1 << 55))
def test_size_spelling_round_trips(nbytes: int) -> None:
    assert parse_size(format_size(nbytes)) == nbytes
