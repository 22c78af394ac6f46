"""``hpcckpt catalog rebuild``: recreate catalog rows from the images on disk.

Images describe themselves: the header carries the ckptid the catalog gave
them, the job, the user, the node and the parent. So a lost or damaged
``catalog.sqlite`` can be rebuilt by reading each ``ckpt-N.hck`` header and
inserting a committed row with that same ckptid. Rows already present are
left alone; the ckptid counter moves past the largest id found, so new
checkpoints never reuse an id.

What the images cannot tell (the error text of failed attempts, lineage set
by later resumes, deleted history) is not recovered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcckpt import image
from hpcckpt import log as hlog
from hpcckpt.catalog.base import Catalog
from hpcckpt.catalog.model import CkptRecord, Status
from hpcckpt.errors import HpcckptError
from hpcckpt.store.images import Store

_log = hlog.get("catalog")

#: Reads an image's header; hpcckpt.image.read_header, or verify_image(...).meta for --verify.
HeaderReader = Callable[[Path], Any]


@dataclass
class RebuildReport:
    added: list[int] = field(default_factory=list)
    present: list[int] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"added": self.added, "present": self.present, "skipped": self.skipped}


def default_reader(verify: bool) -> HeaderReader:
    if verify:
        return lambda p: image.verify_image(p).meta
    return image.read_header


def record_from_header(meta: Any, path: Path, size: int, mtime: float, store: Store) -> CkptRecord:
    """The committed row an image's header implies."""
    return CkptRecord(
        ckptid=int(meta.ckptid),
        job_id=str(meta.job_id),
        step=meta.step,
        array_job_id=meta.array_job_id,
        array_task_id=meta.array_task_id,
        uid=store.user.uid,
        user=store.user.name,
        node=meta.node,
        path=str(path),
        size_bytes=size,
        engine=meta.engine,
        status=Status.COMMITTED,
        parent=meta.parent_ckptid,
        created=float(meta.created) or mtime,
        finished=mtime,
        requeue_count=int(meta.requeue_count),
        meta={"rebuilt": True},
    )


def rebuild_catalog(
    cat: Catalog,
    store: Store,
    *,
    read_header: HeaderReader | None = None,
    verify: bool = False,
) -> RebuildReport:
    """Add a committed row for every image of the store's user that has none."""
    reader = read_header or default_reader(verify)
    report = RebuildReport()
    existing = {r.ckptid for r in cat.list(uid=store.user.uid, include_deleted=True)}
    new: list[CkptRecord] = []
    for e in store.scan():
        if e.temp or e.ckptid is None or e.companion is not None:
            continue
        if e.ckptid in existing:
            report.present.append(e.ckptid)
            continue
        try:
            meta = reader(e.path)
        except (HpcckptError, OSError) as exc:
            report.skipped.append({"path": str(e.path), "reason": str(exc)})
            continue
        if int(meta.ckptid) != e.ckptid:
            report.skipped.append(
                {"path": str(e.path), "reason": f"file name says ckptid {e.ckptid}, header says {meta.ckptid}"}
            )
            continue
        if meta.uid != store.user.uid:
            # The file sits in this user's dir, but its header names someone else: do not adopt it.
            report.skipped.append(
                {"path": str(e.path), "reason": f"header uid {meta.uid} is not {store.user.name}'s ({store.user.uid})"}
            )
            continue
        new.append(record_from_header(meta, e.path, e.size, e.mtime, store))
    cat.insert_records(new)
    report.added = sorted(r.ckptid for r in new)
    hlog.event(
        _log, "catalog.rebuilt", f"rebuilt {len(new)} rows from images", added=len(new),
        present=len(report.present), skipped=len(report.skipped), catalog=cat.location,
    )
    return report
