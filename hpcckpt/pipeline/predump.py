"""CRIU pre-dump with memory tracking: detected at run time, used only where the kernel has it.

``criu pre-dump --track-mem`` copies memory while the job runs and then has
the kernel's soft-dirty bits tell the final dump which pages changed, so the
freeze only copies those. Kernels without soft-dirty tracking (this project's
6.18 VM among them: "Tracking memory is not available") make it fail, so the
feature is probed with ``criu check --feature mem_dirty_track`` once per
process, and hpcckpt's own chunk hashing (incremental images) is what avoids
rewriting unchanged memory everywhere.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

FEATURE = "mem_dirty_track"
PREDUMP_DIR = "predump"


class FeatureProbe(Protocol):
    """What this needs of the engine adapter (``hpcckpt.engine.criu.Criu`` has it)."""

    path: str

    def has_feature(self, name: str) -> bool: ...


@dataclass(frozen=True)
class PreDumpPlan:
    enabled: bool
    reason: str

    def predump_args(self, predump_dir: Path) -> list[str]:
        """Arguments after ``criu pre-dump -t PID``: where the pre-dump's images go."""
        return ["-D", os.fspath(predump_dir), "--track-mem", "-o", "predump.log"]

    def dump_args(self, images_dir: Path, predump_dir: Path) -> list[str]:
        """Extra ``criu dump`` arguments: track memory against the pre-dump (a relative path, as CRIU wants)."""
        return ["--track-mem", "--prev-images-dir", os.path.relpath(predump_dir, images_dir)]


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
