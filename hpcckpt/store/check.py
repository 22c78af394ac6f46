"""Where the catalog and the store disagree, for ``hpcckpt catalog check`` and ``gc``.

The store is the truth about bytes, the catalog about validity. Each finding
says what is wrong and what fixes it: ``gc`` cleans leftovers of dead writers
and deleted rows; ``catalog rebuild`` re-adds images that lost their rows.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from typing import Any

from hpcckpt.catalog.base import Catalog
from hpcckpt.catalog.model import CkptRecord, Status
from hpcckpt.store.images import Store, StoreEntry

_TEMP_CKPT = re.compile(r"\.tmp-ckpt-([1-9][0-9]*)\.hck\..*")

# Finding kinds, and what to do about each.
FIXES = {
    "missing_file": "the committed image is gone; mark it failed or restore the file ('hpcckpt gc' does not)",
    "size_mismatch": "the image changed after commit; run 'hpcckpt verify' on it",
    "untracked_image": "an image with no catalog row; 'hpcckpt catalog rebuild' adds it",
    "stale_file": "the row is deleted or failed but its file remains; 'hpcckpt gc' removes it",
    "uncommitted_image": "a complete image whose writer never committed it; 'hpcckpt gc' removes it once stale",
    "temp_file": "a partly written image; 'hpcckpt gc' removes it once its writer is gone",
    "writing": "a checkpoint still being written, or its writer died; 'hpcckpt gc' fails it once stale",
}


@dataclass(frozen=True)
class Finding:
    kind: str
    ckptid: int | None
    path: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["fix"] = FIXES.get(self.kind, "")
        return doc


def temp_ckptid(name: str) -> int | None:
    m = _TEMP_CKPT.fullmatch(name)
    return int(m.group(1)) if m else None


def user_rows(cat: Catalog, store: Store) -> list[CkptRecord]:
    return cat.list(uid=store.user.uid, include_deleted=True)


def check_consistency(
    cat: Catalog,
    store: Store,
    *,
    rows: list[CkptRecord] | None = None,
    entries: list[StoreEntry] | None = None,
    now: float | None = None,
) -> list[Finding]:
    """Every disagreement between the store user's rows and files; empty when consistent."""
    now = time.time() if now is None else now
    rows = user_rows(cat, store) if rows is None else rows
    entries = store.scan() if entries is None else entries
    by_id = {r.ckptid: r for r in rows}
    files = {e.ckptid: e for e in entries if not e.temp and e.ckptid is not None and e.companion is None}
    out: list[Finding] = []

    for r in rows:
        f = files.get(r.ckptid)
        if r.status is Status.COMMITTED:
            if f is None:
                out.append(Finding("missing_file", r.ckptid, r.path, f"job {r.job_id}: committed image not on disk"))
            elif f.size != r.size_bytes:
                detail = f"catalog says {r.size_bytes} B, file has {f.size} B"
                out.append(Finding("size_mismatch", r.ckptid, str(f.path), detail))
        elif r.status is Status.WRITING:
            age = now - r.created
            out.append(Finding("writing", r.ckptid, r.path, f"job {r.job_id}: writing for {age:.0f}s"))
            if f is not None:
                out.append(Finding("uncommitted_image", r.ckptid, str(f.path), f"row is still {r.status.value}"))
        elif f is not None:
            out.append(Finding("stale_file", r.ckptid, str(f.path), f"row is {r.status.value}"))

    for ckptid, f in files.items():
        if ckptid not in by_id:
            out.append(Finding("untracked_image", ckptid, str(f.path), f"{f.size} B, no catalog row"))
    for e in entries:
        if e.temp:
            out.append(Finding("temp_file", temp_ckptid(e.path.name), str(e.path), f"{now - e.mtime:.0f}s old"))
    return out
