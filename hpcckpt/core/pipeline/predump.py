"""CRIU pre-dump with memory tracking: detected at run time, used only where the kernel has it.

``criu pre-dump --track-mem`` copies memory while the job runs and then has
the kernel's soft-dirty bits tell the final dump which pages changed, so the
freeze only copies those. Kernels without soft-dirty tracking (this project's
6.18 VM among them: "Tracking memory is not available") make it fail, so the
feature is probed with ``criu check --feature mem_dirty_track`` once per
process, and hpcckpt's own chunk hashing (incremental images) is what avoids
rewriting unchanged memory everywhere.

Where it is available, each checkpoint is a pre-dump into ``STAGE/predump``
while the job runs, then ``criu dump --track-mem --prev-images-dir`` that
freezes the job only to write the pages changed since; the pre-dump then
becomes the dump's ``parent/`` directory (:func:`adopt_parent`), so the image
holds both and restores without any other file. CRIU cannot stream an image
with a parent, so such an image (``meta.extra["predump"]``) is unpacked
before its restore. A pre-dump that fails turns pre-dumps off for the rest
of the run and the checkpoint is taken with a plain dump.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from hpcckpt.criu.interface import DumpOptions, DumpResult

FEATURE = "mem_dirty_track"
PREDUMP_DIR = "predump"
PARENT = "parent"  # CRIU's name for a dump's link to its parent images (CR_PARENT_LINK)


class FeatureProbe(Protocol):
    """What this needs of the engine adapter (``hpcckpt.criu.engine.Criu`` has it)."""

    path: str

    def has_feature(self, name: str) -> bool: ...


@runtime_checkable
class PreDumpEngine(Protocol):
    """An engine that can pre-dump and then dump only what changed (``hpcckpt.criu.engine.Criu``)."""

    def pre_dump(self, pid: int, images_dir: Path, *, options: DumpOptions, timeout: float | None = None
                 ) -> DumpResult: ...

    def dump(self, pid: int, images_dir: Path, *, options: DumpOptions, after: str = "running",
             timeout: float | None = None, track_from: Path | None = None) -> DumpResult: ...


@dataclass(frozen=True)
class PreDumpPlan:
    enabled: bool
    reason: str


def adopt_parent(dump_dir: Path, predump_dir: Path) -> None:
    """Make the pre-dump the dump's ``parent`` directory itself, in place of CRIU's symlink to it.

    An image holds files and directories only, and CRIU opens ``parent``
    whether it is a link or a directory, so the unpacked image restores as
    the pair did. Both lie in the job's private staging directory.
    """
    link = dump_dir / PARENT
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise OSError(f"{link}: expected CRIU's parent link")
    os.rename(predump_dir, link)
    with contextlib.suppress(FileNotFoundError):
        (link / "predump.log").unlink()  # differs every time; not part of the job's state


_cache: dict[str, PreDumpPlan] = {}
_lock = threading.Lock()


def plan_predump(criu: FeatureProbe, *, wanted: bool = True) -> PreDumpPlan:
    """Whether to pre-dump, probing the kernel through CRIU once per binary."""
    if not wanted:
        return PreDumpPlan(False, "pre-dump not requested")
    with _lock:
        hit = _cache.get(criu.path)
        if hit is None:
            ok = criu.has_feature(FEATURE)
            hit = _cache[criu.path] = PreDumpPlan(
                ok, f"criu check --feature {FEATURE}: {'available' if ok else 'not available on this kernel'}"
            )
        return hit
