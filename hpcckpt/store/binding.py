"""An image is only the checkpoint its catalog row names: header and row must agree.

Every image's header records its ckptid, job id, owner and parent. An image
file can be intact and still be the wrong one: ``cp J/ckpt-11.hck
J/ckpt-14.hck`` leaves a perfectly valid image at checkpoint 14's path that
restores checkpoint 11's state. So before a restore, and in ``verify``, the
header is compared with the row, and a disagreement is corruption (exit 4):
the row is marked ``corrupt`` and the image is not used.
"""

from __future__ import annotations

from hpcckpt.image.errors import CorruptImageError
from hpcckpt.image.model import ImageMeta
from hpcckpt.store.resolve import CkptRef


def row_mismatches(meta: ImageMeta, row: CkptRef) -> list[str]:
    """What the header says that the row does not (empty: they agree)."""
    out: list[str] = []
    if meta.ckptid != row.ckptid:
        out.append(f"the header says checkpoint {meta.ckptid}")
    if row.job_id is not None and meta.job_id != row.job_id:
        out.append(f"job {meta.job_id!r} (the catalog says {row.job_id!r})")
    if meta.uid != row.uid:
        out.append(f"owner uid {meta.uid} (the catalog says {row.uid})")
    if row.job_id is not None and meta.parent_ckptid != row.parent:
        def name(p: int | None) -> str:
            return "none" if p is None else str(p)

        out.append(f"parent {name(meta.parent_ckptid)} (the catalog says {name(row.parent)})")
    return out


def check_bound(meta: ImageMeta, row: CkptRef, path: str) -> None:
    """Raise :class:`CorruptImageError` unless the image at ``path`` is the checkpoint ``row`` names."""
    wrong = row_mismatches(meta, row)
    if wrong:
        raise CorruptImageError(
            f"is not checkpoint {row.ckptid}: " + "; ".join(wrong),
            path=path,
            hint=f"the file was replaced or copied over; checkpoint {row.ckptid} is marked corrupt and an "
            "older one is used (see 'hpcckpt list JOBID')",
        )
