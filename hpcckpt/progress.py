"""Progress of long work on images, shown only at a terminal.

A person packing, unpacking or verifying a multi-GiB image at a terminal
wants to see it move; a batch job's log wants nothing but its structured
events. So a meter draws one self-overwriting line on stderr when stderr is
a terminal (``HPCCKPT_PROGRESS=always`` or ``never`` overrides), and is
otherwise absent.

Commands turn it on around their work with :func:`terminal_progress`; the
image reader counts the bytes of every image it opens by path while a meter
is active (:func:`hpcckpt.image.reader.open_source`), so no signature in the
core carries a progress argument.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TextIO

from hpcckpt.humanize import human_size

_current: ContextVar[Meter | None] = ContextVar("hpcckpt_progress", default=None)


class Meter:
    """One line per file: label, name, percent, bytes, rate; redrawn at most every ``every`` seconds."""

    def __init__(self, label: str, stream: TextIO, every: float = 0.2) -> None:
        self.label = label
        self.stream = stream
        self.every = every
        self.name = ""
        self.total = 0
        self.done = 0
        self._t0 = 0.0
        self._drawn = 0.0

    def start(self, name: str, total: int) -> None:
        self.name, self.total, self.done = name, max(0, total), 0
        self._t0 = self._drawn = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._drawn >= self.every:
            self._drawn = now
            self._draw(now, end="")

    def finish(self) -> None:
        if self.name:
            self._draw(time.monotonic(), end="\n")
            self.name = ""

    def _draw(self, now: float, end: str) -> None:
        rate = self.done / max(now - self._t0, 1e-6)
        if self.total:
            amount = f"{100 * self.done / self.total:3.0f}% {human_size(self.done)} of {human_size(self.total)}"
        else:  # a size known only at the end, such as an image being written
            amount = human_size(self.done)
        line = f"{self.label} {self.name}: {amount}, {human_size(rate)}/s"
        self.stream.write("\r\x1b[K" + line + end)
        self.stream.flush()


def wanted(stream: TextIO) -> bool:
    mode = os.environ.get("HPCCKPT_PROGRESS", "auto").lower()
    if mode in ("always", "never"):
        return mode == "always"
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def terminal_progress(label: str, stream: TextIO | None = None) -> Iterator[Meter | None]:
    """Show progress of the images read inside this block, if a person is watching."""
    out = stream or sys.stderr
    if not wanted(out):
        yield None
        return
    meter = Meter(label, out)
    token = _current.set(meter)
    try:
        yield meter
    finally:
        _current.reset(token)
        meter.finish()


def current() -> Meter | None:
    return _current.get()


class CountingReader:
    """A binary stream that reports every byte read to a meter; everything else passes through."""

    def __init__(self, raw: Any, meter: Meter) -> None:
        self._raw = raw
        self._meter = meter
        self.name = getattr(raw, "name", "<stream>")

    def readinto(self, buf: Any, /) -> int:
        n: int = self._raw.readinto(buf)
        self._meter.add(n or 0)
        return n

    def read(self, size: int = -1, /) -> bytes:
        data: bytes = self._raw.read(size)
        self._meter.add(len(data))
        return data

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._raw, attr)


class CountingWriter:
    """A binary stream that reports every byte written to a meter."""

    def __init__(self, raw: Any, meter: Meter) -> None:
        self._raw = raw
        self._meter = meter
        self.name = getattr(raw, "name", "<stream>")

    def write(self, data: Any, /) -> int:
        n: int = self._raw.write(data)
        self._meter.add(n if n is not None else len(data))
        return n

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._raw, attr)
