"""Which committed images to delete: keep the last N, every Kth, nothing too old, a byte budget.

Two hard rules override every setting:

- a job's newest committed image is never deleted (it may be its only valid one);
- an image that a kept incremental image depends on (its ``parent`` chain)
  is never deleted, even when that image belongs to another job: a job
  restarted under a new job id goes on with the chain of the image it was
  restored from.

And with ``fallback_full`` (policy ``retention.fallback_full``, on by
default), a third: the job's newest full image that is *not* in its newest
image's chain is never deleted either. The newest image and that fallback
then share no image, so one damaged image (even the base of the newest
chain) always leaves one of them restorable. The chain policy
(:mod:`hpcckpt.core.pipeline.chain`) does its part: an image is written
incremental only while such a full image exists.

``select_for_deletion`` is pure and decides; ``apply_retention`` acts on it:
mark the row deleted first (so no reader takes it), then unlink the file. A
crash in between leaves a deleted row with a file, which gc removes later.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcckpt import log as hlog
from hpcckpt.catalog import Catalog, CkptRecord, Status
from hpcckpt.errors import PolicyError, StoreError
from hpcckpt.store.images import Store

_log = hlog.get("retention")


@dataclass(frozen=True)
class RetentionRules:
    keep_last: int = 3
    keep_every: int = 0  # 0: off; K: also keep each job's Kth, 2Kth, ... checkpoint
    max_age: float | None = None  # seconds
    max_bytes: int | None = None  # per user, over all their jobs
    # Keep the newest full image outside the newest image's chain. The policy's default is true;
    # off here so that the other rules can be reasoned about (and tested) one at a time.
    fallback_full: bool = False

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise PolicyError(f"retention.keep_last must be at least 1, got {self.keep_last}")
        if self.keep_every < 0:
            raise PolicyError(f"retention.keep_every must be 0 or positive, got {self.keep_every}")
        if self.max_age is not None and self.max_age <= 0:
            raise PolicyError(f"retention.max_age must be positive, got {self.max_age}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise PolicyError(f"retention.max_bytes must be positive, got {self.max_bytes}")

    @classmethod
    def from_policy(cls, pol: Any) -> RetentionRules:
        """From a ``hpcckpt.policy.Policy`` (its ``retention`` section)."""
        r = pol.retention
        return cls(
            keep_last=int(r.keep_last),
            keep_every=int(r.keep_every or 0),
            max_age=None if r.max_age is None else float(r.max_age),
            max_bytes=None if r.max_bytes is None else int(r.max_bytes),
            fallback_full=bool(getattr(r, "fallback_full", True)),
        )


def _ancestors(ckptid: int, by_id: dict[int, CkptRecord]) -> Iterable[int]:
    seen: set[int] = set()
    cur = by_id.get(ckptid)
    while cur is not None and cur.parent is not None and cur.parent not in seen:
        seen.add(cur.parent)
        yield cur.parent
        cur = by_id.get(cur.parent)


def chain_of(ckptid: int, by_id: dict[int, CkptRecord]) -> set[int]:
    """An image and every image it depends on."""
    return {ckptid, *_ancestors(ckptid, by_id)}


def fallback_full(rows: Sequence[CkptRecord], by_id: dict[int, CkptRecord]) -> int | None:
    """The job's newest committed full image outside its newest committed image's chain, if any.

    ``rows`` are one job's rows, oldest first.
    """
    live = [r for r in rows if r.status is Status.COMMITTED]
    if not live:
        return None
    chain = chain_of(live[-1].ckptid, by_id)
    for r in reversed(live):
        if r.parent is None and r.ckptid not in chain:
            return r.ckptid
    return None


def select_for_deletion(records: Sequence[CkptRecord], policy: RetentionRules, now: float) -> list[int]:
    """The ckptids of committed images that retention removes, ascending.

    ``records`` should hold every row of the jobs concerned, deleted ones too:
    "every Kth" counts a job's checkpoints over its whole history (committed
    and deleted), so the images it keeps do not change as older ones go.
    """
    by_id = {r.ckptid: r for r in records}
    jobs: dict[str, list[CkptRecord]] = defaultdict(list)
    for r in sorted(records, key=lambda r: r.ckptid):
        jobs[r.job_id].append(r)

    committed = {r.ckptid for r in records if r.status is Status.COMMITTED}
    protected: set[int] = set()
    keep: set[int] = set()
    for rows in jobs.values():
        live = [r for r in rows if r.status is Status.COMMITTED]
        if not live:
            continue
        protected.add(live[-1].ckptid)
        if policy.fallback_full:
            fallback = fallback_full(rows, by_id)
            if fallback is not None:
                protected.add(fallback)
        keep.update(r.ckptid for r in live[-policy.keep_last :])
        if policy.keep_every:
            history = [r for r in rows if r.status in (Status.COMMITTED, Status.DELETED)]
            for ordinal, r in enumerate(history, start=1):
                if ordinal % policy.keep_every == 0 and r.status is Status.COMMITTED:
                    keep.add(r.ckptid)

    if policy.max_age is not None:
        cutoff = now - policy.max_age
        keep = {c for c in keep if by_id[c].created >= cutoff}
    keep |= protected

    def close_over_parents(ids: set[int]) -> set[int]:
        out = set(ids)
        for c in ids:
            out.update(p for p in _ancestors(c, by_id) if p in committed)
        return out

    keep = close_over_parents(keep)

    if policy.max_bytes is not None:
        total = sum(by_id[c].size_bytes for c in keep)
        # Oldest first; an image still needed as a parent by a kept one stays.
        for c in sorted(keep - protected, key=lambda c: (by_id[c].created, c)):
            if total <= policy.max_bytes:
                break
            others = keep - {c}
            if any(c in set(_ancestors(o, by_id)) for o in others):
                continue
            keep.discard(c)
            total -= by_id[c].size_bytes
        keep = close_over_parents(keep)

    return sorted(committed - keep)


def needed_by_survivors(records: Sequence[CkptRecord], victims: set[int]) -> set[int]:
    """The victims that a committed image outside ``victims`` still depends on, through its chain."""
    by_id = {r.ckptid: r for r in records}
    needed: set[int] = set()
    for r in records:
        if r.status is Status.COMMITTED and r.ckptid not in victims:
            needed.update(p for p in _ancestors(r.ckptid, by_id) if p in victims)
    return needed


@dataclass
class RetentionResult:
    deleted: list[CkptRecord] = field(default_factory=list)
    bytes_freed: int = 0
    dry_run: bool = False
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "deleted": [r.ckptid for r in self.deleted],
            "bytes_freed": self.bytes_freed,
            "dry_run": self.dry_run,
            "errors": list(self.errors),
        }


def apply_retention(
    cat: Catalog,
    store: Store,
    policy: RetentionRules,
    *,
    job_id: str | None = None,
    now: float | None = None,
    dry_run: bool = False,
) -> RetentionResult:
    """Apply ``policy`` to one job (``job_id``) or to all of the store user's jobs.

    ``max_bytes`` is a per-user budget, so it is only meaningful without
    ``job_id``; with one, the budget is applied to that job's images alone.
    """
    now = time.time() if now is None else now
    rows = cat.list(job_id, uid=store.user.uid, include_deleted=True)
    victims = set(select_for_deletion(rows, policy, now))
    if job_id is not None and victims:
        # Other jobs' images may be incremental on this job's (a restart under a new id).
        everyone = cat.list(None, uid=store.user.uid, include_deleted=True)
        victims -= needed_by_survivors(everyone, victims)
    result = RetentionResult(dry_run=dry_run)
    for rec in rows:
        if rec.ckptid not in victims:
            continue
        result.deleted.append(rec)
        result.bytes_freed += rec.size_bytes
        if dry_run:
            continue
        cat.mark_deleted(rec.ckptid)
        try:
            if rec.path:
                store.remove_checkpoint(Path(rec.path))
        except (OSError, StoreError) as exc:
            result.errors.append(f"{rec.path}: {exc}")
        hlog.event(
            _log, "retention.deleted", f"deleted checkpoint {rec.ckptid} of job {rec.job_id}",
            ckptid=rec.ckptid, job_id=rec.job_id, size_bytes=rec.size_bytes,
        )
    return result
