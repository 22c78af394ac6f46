"""Which bytes of ``pages-N.img`` hold a restored task's page at a given address (CRIU's pagemap images).

``pagemap-PID.img`` (images/pagemap.proto) starts with a ``pagemap_head``
(``pages_id``: the task's pages are in ``pages-<pages_id>.img``), then one
``pagemap_entry`` per run of pages: ``vaddr`` (1), ``nr_pages`` (5, or the
older 32-bit field 2), ``in_parent`` (3) and ``flags`` (4: PE_PARENT 1,
PE_LAZY 2, PE_PRESENT 4). Present runs lie one after another in the pages
file, in entry order. CRIU marks a run PE_LAZY at every dump when its
mapping may be filled through userfaultfd (private anonymous memory but the
stack), lazy restore or not; a restore with ``--lazy-pages`` reads only the
other runs itself, and the lazy-pages daemon asks for the lazy ones by
address (:mod:`hpcckpt.criu.pageserver`).
"""

from __future__ import annotations

import bisect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from hpcckpt.criu.images import _Entries, _one
from hpcckpt.image.errors import CorruptImageError, UnreadableImageError, UnsupportedImageError

PAGE = 4096
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4
_PAGEMAP = re.compile(r"pagemap-(\d+)\.img")


@dataclass(frozen=True)
class Run:
    vaddr: int
    pages: int
    offset: int  # bytes into the pages file
    lazy: bool


@dataclass
class TaskPages:
    """One task's present pages: where each run lies in ``pages_file``."""

    pid: int
    pages_file: str
    runs: list[Run] = field(default_factory=list)  # sorted by address, contiguous ones merged
    _starts: list[int] = field(default_factory=list)

    def add(self, run: Run) -> None:
        last = self.runs[-1] if self.runs else None
        if (last is not None and last.lazy == run.lazy and last.vaddr + last.pages * PAGE == run.vaddr
                and last.offset + last.pages * PAGE == run.offset):
            self.runs[-1] = Run(last.vaddr, last.pages + run.pages, last.offset, last.lazy)
        else:
            self.runs.append(run)

    def seal(self) -> None:
        self.runs.sort(key=lambda r: r.vaddr)
        self._starts = [r.vaddr for r in self.runs]

    def locate(self, vaddr: int, pages: int) -> tuple[int, int]:
        """(byte offset in the pages file, pages there from ``vaddr`` on, at most ``pages``)."""
        i = bisect.bisect_right(self._starts, vaddr) - 1
        if i < 0 or vaddr >= self.runs[i].vaddr + self.runs[i].pages * PAGE:
            raise CorruptImageError(f"criu lazy-pages asked for pages at {vaddr:#x} of task {self.pid}, which "
                                    f"pagemap-{self.pid}.img does not hold")
        run = self.runs[i]
        skip = (vaddr - run.vaddr) // PAGE
        return run.offset + skip * PAGE, min(pages, run.pages - skip)

    @property
    def lazy_bytes(self) -> int:
        return sum(r.pages * PAGE for r in self.runs if r.lazy)


def read_pagemaps(images_dir: Path) -> dict[int, TaskPages]:
    """Every task's pagemap in a CRIU dump directory, by pid; CRIU parent (pre-dump) runs are refused."""
    try:
        dfd = os.open(images_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise UnreadableImageError(f"{images_dir}: cannot open: {err.strerror}") from None
    try:
        out: dict[int, TaskPages] = {}
        for name in sorted(os.listdir(dfd)):
            m = _PAGEMAP.fullmatch(name)
            if m is None:
                continue
            entries = _Entries(dfd, images_dir, name, "PAGEMAP").read(required=True)
            if not entries:
                continue
            head_off, head = entries[0]
            pages_id = _one(head, 1)
            if pages_id is None:
                raise CorruptImageError(f"{name}: its head names no pages file", path=str(images_dir / name),
                                        offset=head_off)
            task = TaskPages(int(m.group(1)), f"pages-{pages_id}.img")
            offset = 0
            for _off, e in entries[1:]:
                vaddr = _one(e, 1, 0) or 0
                pages = _one(e, 5) or _one(e, 2, 0) or 0
                flags = _one(e, 4)
                if flags is None:
                    flags = PE_PARENT if _one(e, 3, 0) else PE_PRESENT
                if flags & PE_PARENT:
                    raise UnsupportedImageError(f"{name}: pages in a CRIU parent (a pre-dump) cannot be "
                                                "served lazily")
                if flags & PE_PRESENT:
                    task.add(Run(vaddr, pages, offset, bool(flags & PE_LAZY)))
                    offset += pages * PAGE
            task.seal()
            out[task.pid] = task
        return out
    finally:
        os.close(dfd)


def lazy_ranges(tasks: dict[int, TaskPages]) -> dict[str, list[tuple[int, int]]]:
    """Per pages file, the (offset, length) byte ranges served lazily (the rest CRIU's restore reads)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for t in tasks.values():
        out.setdefault(t.pages_file, []).extend((r.offset, r.pages * PAGE) for r in t.runs if r.lazy)
    return {k: sorted(v) for k, v in out.items()}
