"""Durations and sizes as people write them in policy files and on the command line.

Durations: a plain number of seconds (``30``) or one or more ``<number><unit>``
parts with units ``s``, ``m``, ``h``, ``d``, ``w`` (``30s``, ``10m``, ``1h30m``,
``1.5h``). Sizes: a plain number of bytes or ``<number><unit>``; ``K M G T P``
with or without ``iB`` are powers of 1024 (as in Slurm, where ``--mem=500G``
means GiB), while ``KB MB GB TB PB`` are powers of 1000 for people who mean
that. Both give whole numbers (seconds, bytes), rounded down.
"""

from __future__ import annotations

import re
from fractions import Fraction

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_DURATION_FULL = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_PLAIN_NUMBER = re.compile(r"\d+(?:\.\d+)?")

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)(b?)", re.IGNORECASE)
_SIZE_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_duration(text: str) -> int:
    """Seconds in ``text``; raises ValueError when it is not a duration."""
    s = text.strip().lower()
    if _PLAIN_NUMBER.fullmatch(s):
        return int(Fraction(s))
    if not _DURATION_FULL.fullmatch(s):
        raise ValueError(text)
    total = Fraction(0)
    for number, unit in _DURATION_PART.findall(s):
        total += Fraction(number) * _DURATION_UNITS[unit]
    return int(total)


def parse_size(text: str) -> int:
    """Bytes in ``text``; raises ValueError when it is not a size."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(text)
    number, prefix, binary, byte = m.groups()
    prefix = prefix.lower()
    if binary and not prefix:  # "5iB" means nothing
        raise ValueError(text)
    # "GB" is decimal; "G", "GiB" (and "Gi") are binary.
    base = 1000 if (byte and not binary and prefix) else 1024
    # Fraction, not float: byte counts above 2**53 must stay exact.
    return int(Fraction(number) * base ** _SIZE_POWER[prefix])


def format_duration(seconds: int) -> str:
    """The shortest exact spelling: 3600 -> '1h', 5400 -> '1h30m', 61 -> '1m1s'."""
    if seconds == 0:
        return "0s"
    parts = []
    rest = seconds
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, rest = divmod(rest, size)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts)


def format_size(nbytes: int) -> str:
    """Exact binary spelling when there is one: 4194304 -> '4MiB', 1000 -> '1000'."""
    for unit, power in (("PiB", 5), ("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        size = 1024**power
        if nbytes >= size and nbytes % size == 0:
            return f"{nbytes // size}{unit}"
    return str(nbytes)
