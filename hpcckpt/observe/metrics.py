"""Checkpoint metrics in OpenMetrics text, and the node_exporter textfile the runner refreshes.

The text is valid OpenMetrics (``prometheus_client``'s parser reads it, and
tests check that) and is also read by node_exporter's textfile collector,
which takes only the older Prometheus text format: so no ``# UNIT`` lines,
no info or stateset types, no timestamps, no blank lines. (A counter's
``_total`` samples then reach Prometheus untyped; ``rate()`` works the same.)

Labels are bounded: ``job_id`` and ``user`` (not ``job``, which Prometheus
keeps for the scrape job), and fixed enums (``result``, ``origin``). Per-node
figures carry the job's labels too, so that the files of several jobs on one
node never hold the same series (node_exporter refuses duplicates); a node's
total is ``sum by (instance)``.

The runner writes one file per job (policy ``metrics.textfile``, with
``{job}`` and ``{user}`` in it) after each checkpoint attempt, and removes it
when the job ends: a series is there while its job runs on that node.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hpcckpt import log as hlog
from hpcckpt.catalog import Catalog
from hpcckpt.context import User
from hpcckpt.errors import HpcckptError
from hpcckpt.fs import safe as fsutil
from hpcckpt.fs.layout import DONE_MARKER, STAGE_PREFIX, StagingLayout
from hpcckpt.observe.jobstats import JobStats, load_jobs

_log = hlog.get("metrics")

PREFIX = "hpcckpt_"
# Seconds: from a quick freeze of a small job to a long flush of a big one.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
TEXTFILE_MODE = 0o644  # node_exporter reads it as its own user


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(v: float) -> str:
    if isinstance(v, int) or (math.isfinite(v) and v == int(v) and abs(v) < 1e15):
        return str(int(v))
    return repr(float(v))


Labels = Sequence[tuple[str, str]]


@dataclass
class Family:
    name: str  # without the prefix, and without _total for a counter
    kind: str  # gauge | counter | histogram
    help: str
    lines: list[str] = field(default_factory=list)

    def _sample(self, suffix: str, labels: Labels, value: float) -> None:
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
        self.lines.append(f"{PREFIX}{self.name}{suffix}{{{inner}}} {_fmt(value)}" if inner
                          else f"{PREFIX}{self.name}{suffix} {_fmt(value)}")

    def add(self, labels: Labels, value: float) -> None:
        self._sample("_total" if self.kind == "counter" else "", labels, value)

    def observe_all(self, labels: Labels, values: Iterable[float]) -> None:
        """A histogram of ``values``, rebuilt from scratch (the catalog keeps every observation)."""
        vals = sorted(v for v in values if math.isfinite(v))
        i = 0
        for bound in BUCKETS:
            while i < len(vals) and vals[i] <= bound:
                i += 1
            self._sample("_bucket", [*labels, ("le", repr(bound))], i)
        self._sample("_bucket", [*labels, ("le", "+Inf")], len(vals))
        self._sample("_count", labels, len(vals))
        self._sample("_sum", labels, sum(vals))

    def render(self) -> list[str]:
        if not self.lines:
            return []
        return [f"# HELP {PREFIX}{self.name} {self.help}", f"# TYPE {PREFIX}{self.name} {self.kind}", *self.lines]


@dataclass(frozen=True)
class StagingUse:
    """One job's node-local staging on this node."""

    bytes: int
    queued: int  # complete dumps waiting for (or in) their flush


def _du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path, followlinks=False):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def staging_use(dirs: Iterable[Path]) -> StagingUse:
    """Bytes in use and complete staged dumps under a job's staging directories."""
    used = queued = 0
    for d in dirs:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        used += _du(d)
        queued += sum(1 for n in names if n.startswith(STAGE_PREFIX) and os.path.lexists(d / n / DONE_MARKER))
    return StagingUse(used, queued)


def scan_staging(bases: Iterable[Path], users: set[str] | None) -> dict[tuple[str, str], StagingUse]:
    """``(user, job dir) -> use`` for every job staged under ``BASE/USER/JOB`` (``users``: only those)."""
    out: dict[tuple[str, str], StagingUse] = {}
    for base in bases:
        try:
            user_names = sorted(os.listdir(base))
        except OSError:
            continue
        for user in user_names:
            if users is not None and user not in users:
                continue
            try:
                jobs = sorted(os.listdir(base / user))
            except OSError:
                continue
            for job in jobs:
                got = staging_use([base / user / job])
                old = out.get((user, job), StagingUse(0, 0))
                out[(user, job)] = StagingUse(old.bytes + got.bytes, old.queued + got.queued)
    return out


def default_staging_bases(disk: Path | None) -> list[Path]:
    return StagingLayout(disk).bases


def render(jobs: Sequence[JobStats], staging: dict[tuple[str, str], StagingUse] | None = None,
           *, run_start: dict[str, float] | None = None) -> str:
    """OpenMetrics text for ``jobs`` and this node's ``staging`` (keyed by user and job id)."""
    fams = {f.name: f for f in (
        Family("last_success_timestamp_seconds", "gauge", "Unix time of the job's last committed checkpoint."),
        Family("job_start_timestamp_seconds", "gauge",
               "Unix time the job's current run began (runner start, else its latest restore or first row)."),
        Family("checkpoints", "counter", "Checkpoint attempts of the job, by result (committed or failed)."),
        Family("consecutive_failures", "gauge", "How many of the job's latest checkpoint attempts failed in a row."),
        Family("checkpoint_freeze_seconds", "histogram", "Time the job was frozen for each committed checkpoint."),
        Family("checkpoint_flush_seconds", "histogram",
               "Time to write each committed image to the store (packing, fsync, catalog commit)."),
        Family("checkpoint_total_seconds", "histogram", "Time from each checkpoint's freeze to its commit."),
        Family("written_bytes", "counter", "Bytes of committed images written to the store."),
        Family("image_bytes", "counter", "Bytes committed checkpoints held, before deduplication and compression."),
        Family("dedup_saved_bytes", "counter",
               "Bytes committed checkpoints took from their parent image instead of writing them again."),
        Family("restores", "counter", "Restores of the job from one of its checkpoints."),
        Family("fallbacks", "counter", "Checkpoints a restore could not use, so it fell back to an older one."),
        Family("interval_seconds", "gauge",
               "Checkpoint interval in force, by origin (fixed by policy, or Daly's optimum for interval: auto)."),
        Family("checkpoint_cost_seconds", "gauge",
               "Measured cost of a checkpoint to the job (Daly's delta: median recent freeze)."),
        Family("staging_bytes", "gauge", "Node-local staging the job uses on this node."),
        Family("flush_queue_depth", "gauge", "The job's complete staged dumps waiting for, or in, their flush."),
    )}
    starts = run_start or {}
    for job in jobs:
        lab: list[tuple[str, str]] = [("job_id", job.job_id), ("user", job.user)]
        last = job.last_success
        if last is not None:
            fams["last_success_timestamp_seconds"].add(lab, last.finished or last.created)
        fams["job_start_timestamp_seconds"].add(lab, starts.get(job.job_id, job.run_start))
        fams["checkpoints"].add([*lab, ("result", "committed")], len(job.committed))
        fams["checkpoints"].add([*lab, ("result", "failed")], len(job.failed))
        fams["consecutive_failures"].add(lab, job.consecutive_failures)
        done = job.committed
        fams["checkpoint_freeze_seconds"].observe_all(lab, [a.frozen_s for a in done if a.frozen_s is not None])
        fams["checkpoint_flush_seconds"].observe_all(lab, [a.flush_s for a in done if a.flush_s is not None])
        fams["checkpoint_total_seconds"].observe_all(lab, [a.total_s for a in done if a.total_s is not None])
        fams["written_bytes"].add(lab, job.total("written_bytes"))
        fams["image_bytes"].add(lab, job.total("image_bytes"))
        fams["dedup_saved_bytes"].add(lab, job.total("saved_bytes"))
        fams["restores"].add(lab, len(job.restores))
        fams["fallbacks"].add(lab, len(job.fallbacks))
        iv = job.interval
        if iv is not None:
            fams["interval_seconds"].add([*lab, ("origin", iv[1])], iv[0])
        cost = job.cost_s
        if cost is not None:
            fams["checkpoint_cost_seconds"].add(lab, cost)
    for (user, job_id), use in sorted((staging or {}).items()):
        lab = [("job_id", job_id), ("user", user)]
        fams["staging_bytes"].add(lab, use.bytes)
        fams["flush_queue_depth"].add(lab, use.queued)
    out: list[str] = []
    for fam in fams.values():
        out.extend(fam.render())
    out.append("# EOF")
    return "\n".join(out) + "\n"


def textfile_path(template: str, job_id: str, user: str) -> Path:
    """The policy's ``metrics.textfile`` for one job: ``{job}`` and ``{user}`` as safe file name parts."""
    path = template.replace("{job}", fsutil.safe_job_component(job_id)).replace("{user}", user)
    return Path(os.path.expanduser(path))


def write_textfile(path: Path, text: str, user: User) -> None:
    """Atomically (temp, fsync, rename), readable by node_exporter (0644)."""
    fsutil.atomic_write_bytes(path, text.encode(), uid=user.uid, gid=user.gid, mode=TEXTFILE_MODE)


class JobMetrics:
    """The runner's hook: rewrite the job's textfile from the catalog after each checkpoint attempt."""

    def __init__(self, path: Path, job_id: str, user: User, disk_staging: Path | None) -> None:
        self.path = path
        self.job_id = job_id
        self.user = user
        self.staging_dirs = StagingLayout(disk_staging).candidates(user, job_id)
        self.started = time.time()

    def text(self, cat: Catalog) -> str:
        jobs = load_jobs(cat, uid=self.user.uid, job_id=self.job_id)
        if not jobs:  # before the first attempt: the job is there, with nothing done yet
            jobs = [JobStats(self.job_id, self.user.name, self.user.uid, [])]
        use = staging_use(self.staging_dirs)
        return render(jobs, {(self.user.name, self.job_id): use}, run_start={self.job_id: self.started})

    def __call__(self, cat: Catalog) -> None:
        write_textfile(self.path, self.text(cat), self.user)

    def remove(self) -> None:
        """The job ended here: its series go with it."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def start_job_metrics(template: str | None, job_id: str, user: User, disk_staging: Path | None,
                      cat: Catalog) -> JobMetrics | None:
    """When the policy asks for a textfile: a :class:`JobMetrics`, its file written once already (so the
    job shows before its first checkpoint); else None. A file that cannot be written is logged, not fatal."""
    if not template:
        return None
    hook = JobMetrics(textfile_path(template, job_id, user.name), job_id, user, disk_staging)
    try:
        hook(cat)
    except (HpcckptError, OSError) as err:
        hlog.event(_log, "metrics.write_failed", f"{hook.path}: cannot write the metrics textfile: {err}", 30,
                   hint="check policy metrics.textfile: its directory must exist and be writable by the user")
    return hook


def close_job_metrics(hook: object) -> None:
    """At the runner's end: remove the job's textfile, if it writes one."""
    if isinstance(hook, JobMetrics):
        try:
            hook.remove()
        except OSError as err:
            hlog.event(_log, "metrics.remove_failed", f"{hook.path}: could not remove: {err}", 30)
