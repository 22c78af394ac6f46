"""``hpcckpt gc``: clear what dead writers and deletions left behind, then apply retention.

What is removed, and when:

- a ``writing`` row whose writer is gone: its temp or uncommitted final file
  is removed and the row marked failed. A writer on this node is gone when
  its pid (with the same start time) no longer exists and ``grace`` passed;
  a writer on another node cannot be asked, so only after ``stale_after``;
- temp files (``.tmp-*``) older than ``grace`` that no live writer owns;
- files whose row is ``deleted`` or ``failed``;
- committed images that retention selects.

Images with no row at all are never removed: they are what
``catalog rebuild`` recovers from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hpcckpt import log as hlog
from hpcckpt.catalog.base import Catalog
from hpcckpt.catalog.model import CkptRecord, Status
from hpcckpt.errors import StoreError
from hpcckpt.store.check import temp_ckptid, user_rows
from hpcckpt.store.images import Store, writer_alive
from hpcckpt.store.retention import RetentionResult, RetentionRules, apply_retention

_log = hlog.get("gc")

DEFAULT_GRACE_S = 300.0
DEFAULT_STALE_AFTER_S = 6 * 3600.0


@dataclass
class GcReport:
    dry_run: bool
    failed_rows: list[int] = field(default_factory=list)
    removed_files: list[dict[str, Any]] = field(default_factory=list)
    retention: RetentionResult | None = None
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "failed_rows": list(self.failed_rows),
            "removed_files": list(self.removed_files),
            "retention": self.retention.to_dict() if self.retention else None,
            "errors": list(self.errors),
        }


def writer_gone(rec: CkptRecord, now: float, *, grace: float, stale_after: float) -> bool:
    age = now - rec.created
    writer = rec.meta.get("writer") if isinstance(rec.meta, dict) else None
    alive = writer_alive(writer) if isinstance(writer, dict) else None
    if alive is None:
        return age >= stale_after
    return not alive and age >= grace


def collect_garbage(
    cat: Catalog,
    store: Store,
    retention: RetentionRules | None,
    *,
    dry_run: bool = False,
    grace: float = DEFAULT_GRACE_S,
    stale_after: float = DEFAULT_STALE_AFTER_S,
    now: float | None = None,
) -> GcReport:
    now = time.time() if now is None else now
    report = GcReport(dry_run=dry_run)
    rows = user_rows(cat, store)
    by_id = {r.ckptid: r for r in rows}
    entries = store.scan()

    dead_writing = {
        r.ckptid
        for r in rows
        if r.status is Status.WRITING and writer_gone(r, now, grace=grace, stale_after=stale_after)
    }

    def remove(path: Any, ckptid: int | None, reason: str) -> None:
        report.removed_files.append({"path": str(path), "ckptid": ckptid, "reason": reason})
        if dry_run:
            return
        try:
            store.remove(path)
        except (OSError, StoreError) as exc:
            report.errors.append(f"{path}: {exc}")

    for e in entries:
        if e.temp:
            owner = temp_ckptid(e.path.name)
            row = by_id.get(owner) if owner is not None else None
            live = row is not None and row.status is Status.WRITING and owner not in dead_writing
            if not live and now - e.mtime >= grace:
                remove(e.path, owner, "temp file of a writer that is gone")
            continue
        row = by_id.get(e.ckptid) if e.ckptid is not None else None
        if row is None:
            continue  # untracked: rebuild material, never ours to delete
        if row.status in (Status.DELETED, Status.FAILED):
            remove(e.path, e.ckptid, f"row is {row.status.value}")
        elif row.ckptid in dead_writing:
            remove(e.path, e.ckptid, "image never committed; its writer is gone")

    for ckptid in sorted(dead_writing):
        report.failed_rows.append(ckptid)
        if not dry_run:
            cat.fail(ckptid, "writer died before commit (found by gc)")

    if retention is not None:
        report.retention = apply_retention(cat, store, retention, now=now, dry_run=dry_run)
        report.errors.extend(report.retention.errors)

    hlog.event(
        _log, "gc.done", "gc finished" + (" (dry run)" if dry_run else ""),
        failed_rows=len(report.failed_rows), removed_files=len(report.removed_files),
        retention_deleted=len(report.retention.deleted) if report.retention else 0,
    )
    return report
