"""One job's checkpoint attempts and events, read from the catalog, as plain figures.

What each figure comes from (nothing is kept anywhere else, so the figures
are the same on every node and across restarts):

- committed: rows ``committed``, and rows ``deleted`` by retention that had
  been committed (only a commit sets ``duration``);
- failed: rows ``failed``, and deleted rows that were never committed;
- freeze: row meta ``frozen_s`` (the job stopped for CRIU's dump), recorded
  when the dump was staged;
- flush: the row's ``duration`` (from the image file's creation to the commit);
- total: ``finished`` - meta ``frozen_at`` (from the freeze to the commit);
- bytes written: ``size_bytes`` (the image file); image size: meta
  ``bytes_in`` (what a full image would hold, before compression); saved by
  deduplication: meta ``ref_bytes`` (taken from the parent image instead);
- interval and its origin: meta ``interval``, the choice in force when the
  checkpoint was taken (``fixed``, or ``daly`` for ``interval: auto``, with
  Daly's measured cost ``delta``);
- restores and fallbacks: job events ``restore`` and ``fallback`` that
  :class:`hpcckpt.core.resume.Resumer` records.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from hpcckpt.catalog import Catalog, CkptRecord, Status

FIXED = "fixed"
DALY = "daly"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


@dataclass(frozen=True)
class Attempt:
    """One checkpoint attempt: a catalog row."""

    ckptid: int
    created: float
    status: str  # committed | failed | writing | deleted
    committed: bool  # committed, now or before retention deleted it
    finished: float | None
    frozen_s: float | None
    flush_s: float | None
    total_s: float | None
    written_bytes: int
    image_bytes: int | None
    saved_bytes: int | None
    interval_s: float | None
    origin: str | None  # fixed | daly
    cost_s: float | None  # Daly's delta: the median of recent freezes, when interval is auto
    requeue_count: int
    node: str
    error: str

    @property
    def failed(self) -> bool:
        return self.status == Status.FAILED.value or (self.status == Status.DELETED.value and not self.committed)

    @classmethod
    def from_record(cls, r: CkptRecord) -> Attempt:
        meta = r.meta or {}
        status = Status(r.status).value
        committed = status == Status.COMMITTED.value or (status == Status.DELETED.value and r.duration is not None)
        iv = meta.get("interval") if isinstance(meta.get("interval"), dict) else {}
        seconds = _num(iv.get("seconds", iv.get("interval"))) if iv else None
        origin = (FIXED if iv.get("mode") == "fixed" else DALY) if iv else None
        frozen_at = _num(meta.get("frozen_at"))
        total = r.finished - frozen_at if committed and r.finished is not None and frozen_at is not None else None
        return cls(
            ckptid=r.ckptid, created=r.created, status=status, committed=committed, finished=r.finished,
            frozen_s=_num(meta.get("frozen_s")), flush_s=r.duration if committed else None,
            total_s=max(0.0, total) if total is not None else None,
            written_bytes=int(r.size_bytes or 0) if committed else 0,
            image_bytes=int(meta["bytes_in"]) if _num(meta.get("bytes_in")) is not None else None,
            saved_bytes=int(meta["ref_bytes"]) if _num(meta.get("ref_bytes")) is not None else None,
            interval_s=seconds, origin=origin, cost_s=_num(iv.get("delta")) if iv else None,
            requeue_count=int(r.requeue_count or 0), node=r.node, error=(r.error or "").strip(),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JobStats:
    job_id: str
    user: str
    uid: int
    attempts: list[Attempt]  # in ckptid order
    events: list[dict[str, Any]] = field(default_factory=list)  # job events, oldest first

    @property
    def committed(self) -> list[Attempt]:
        return [a for a in self.attempts if a.committed]

    @property
    def failed(self) -> list[Attempt]:
        return [a for a in self.attempts if a.failed]

    @property
    def last_success(self) -> Attempt | None:
        done = self.committed
        return done[-1] if done else None

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    @property
    def restores(self) -> list[dict[str, Any]]:
        return self.events_named("restore")

    @property
    def fallbacks(self) -> list[dict[str, Any]]:
        return self.events_named("fallback")

    @property
    def interval(self) -> tuple[float, str] | None:
        """The interval in force at the latest attempt that recorded one, and its origin."""
        for a in reversed(self.attempts):
            if a.interval_s is not None and a.origin is not None:
                return a.interval_s, a.origin
        return None

    @property
    def cost_s(self) -> float | None:
        """The measured cost of a checkpoint to the job: Daly's delta, else the median recent freeze."""
        for a in reversed(self.attempts):
            if a.cost_s is not None:
                return a.cost_s
        freezes = [a.frozen_s for a in self.committed[-10:] if a.frozen_s is not None]
        return statistics.median(freezes) if freezes else None

    @property
    def consecutive_failures(self) -> int:
        """How many of the latest finished attempts failed in a row."""
        n = 0
        for a in reversed(self.attempts):
            if a.status == Status.WRITING.value:
                continue
            if not a.failed:
                break
            n += 1
        return n

    @property
    def first_seen(self) -> float:
        times = [a.created for a in self.attempts] + [float(e["ts"]) for e in self.events]
        return min(times) if times else 0.0

    @property
    def last_activity(self) -> float:
        times = [a.finished or a.created for a in self.attempts] + [float(e["ts"]) for e in self.events]
        return max(times) if times else 0.0

    @property
    def run_start(self) -> float:
        """When the current run began, as far as the catalog knows: the latest restore, else the first row."""
        restores = self.restores
        return float(restores[-1]["ts"]) if restores else self.first_seen

    def total(self, name: str) -> int:
        """Sum of an Attempt byte field over committed attempts."""
        return sum(int(getattr(a, name) or 0) for a in self.committed)


def load_jobs(cat: Catalog, *, uid: int | None = None, job_id: str | None = None,
              since: float | None = None) -> list[JobStats]:
    """Every job the catalog shows ``cat``'s user (root: everyone, or ``uid``), active since ``since``."""
    groups: dict[tuple[int, str], list[CkptRecord]] = {}
    for rec in cat.list(job_id, uid=uid, include_deleted=True):
        groups.setdefault((rec.uid, rec.job_id), []).append(rec)
    jobs: list[JobStats] = []
    for (owner, jid), recs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        job = JobStats(jid, recs[-1].user, owner, [Attempt.from_record(r) for r in recs],
                       cat.job_events(jid, uid=owner))
        if since is None or job.last_activity >= since:
            jobs.append(job)
    return jobs
