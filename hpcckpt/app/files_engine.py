"""``hpcckpt run --engine app``: checkpoints made of the restart files a program writes itself.

Many simulation codes already write restart files, on their own schedule or
when sent a signal, and know how to start from them. For those, hpcckpt
does not touch the process: it captures the declared files (``--app-files``
globs, relative to the working directory) into an image and records it, and
at restart puts them back before running the command again with
``HPCCKPT_RESTART=1`` and ``HPCCKPT_CKPTID=<id>`` in its environment.

When to capture:

* with ``--app-signal SIG``: every interval, and on preemption, hpcckpt sends
  SIG to the program, waits for the files to change and then stay unchanged
  for ``SETTLE`` seconds, and captures them;
* without it: the files are watched, and captured each time they changed
  and settled (the program's own schedule).

The same :class:`~hpcckpt.runner.runner.Runner` as for CRIU jobs drives it
(:class:`FilesEngine`): the interval, ``hpcckpt checkpoint JOB`` (captures
the files now), and preemption: on a preemption signal (policy
``preemption.signals``) the files are captured one last time, the program
gets SIGTERM (KILL at the deadline), and hpcckpt exits with 85 (checkpointed
and stopped: requeue me). Otherwise it exits with the program's status, or
128+N when a signal N ended it. ``hpcckpt resume JOB`` runs the recorded
command again, with the files put back.

A file is only captured after it stayed unchanged (size and mtime) for
SETTLE seconds: a restart file caught half-written would be worse than none.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hpcckpt import log as hlog
from hpcckpt.app import launched, shards
from hpcckpt.app.jobenv import JobContext, job_context
from hpcckpt.app.signals import signal_number
from hpcckpt.catalog import Catalog, open_catalog
from hpcckpt.context import User
from hpcckpt.core.checkpoint import CheckpointResult
from hpcckpt.core.runner.engines import EngineSetup, Launched, Taken
from hpcckpt.errors import DeadlineExceededError, HpcckptError, UsageError
from hpcckpt.image import ImageMeta, pack_dir, unpack_image
from hpcckpt.policy import Policy
from hpcckpt.store.images import Store

_log = hlog.get("app.files")

ENGINE = "files"
SETTLE = 1.0  # seconds a file set must stay unchanged before it is captured
POLL = 0.2

Fingerprint = tuple[tuple[str, int, int], ...]


def matching_files(patterns: Sequence[str], cwd: Path) -> list[Path]:
    """Regular files matching the globs (relative to ``cwd``), sorted, without duplicates."""
    found: set[Path] = set()
    for pattern in patterns:
        full = pattern if os.path.isabs(pattern) else str(cwd / pattern)
        for name in glob.glob(full, recursive=True):
            path = Path(name)
            if path.is_file() and not path.is_symlink():
                found.add(path.absolute())
    return sorted(found)


def fingerprint(paths: Sequence[Path]) -> Fingerprint:
    out = []
    for p in paths:
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        out.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(out)


class SettleWatch:
    """Decides when a changing file set has settled; pure logic over a clock and a fingerprint source."""

    def __init__(self, probe: Callable[[], Fingerprint], clock: Callable[[], float] = time.monotonic,
                 settle: float = SETTLE) -> None:
        self._probe = probe
        self._clock = clock
        self._settle = settle
        self.captured: Fingerprint = ()
        self._seen: Fingerprint = ()
        self._since = clock()

    def mark_captured(self, fp: Fingerprint) -> None:
        self.captured = fp

    def poll(self) -> Fingerprint | None:
        """The fingerprint to capture now, or None (unchanged since the last capture, or still changing)."""
        fp = self._probe()
        now = self._clock()
        if fp != self._seen:
            self._seen, self._since = fp, now
            return None
        if fp and fp != self.captured and now - self._since >= self._settle:
            return fp
        return None


@dataclass
class FilesJob:
    """One ``--engine app`` job: its context, and how to capture and restore its files."""

    ctx: JobContext
    user: User
    patterns: list[str]
    cwd: Path
    policy: Policy

    def _open(self) -> tuple[Store, Catalog]:
        return (Store(self.ctx.store_root, self.user),
                open_catalog(self.ctx.catalog_url, self.ctx.store_root, self.user))

    def capture(self, paths: Sequence[Path], parent: int | None) -> int:
        """Pack ``paths`` into a new committed image; return its ckptid.

        The image is whole (it refers to no chunk of another), so it names no parent: retention may
        delete the one before. ``parent``, the capture before, is kept in the row's meta as ``previous``.
        """
        store, cat = self._open()
        try:
            with shards.staging_dir(self.policy.storage.staging) as stage:
                shards.capture_files(paths, stage)
                comp = self.policy.storage.compression
                with store.publish(cat, job_id=self.ctx.job_id, engine=ENGINE, node=self.ctx.node,
                                   step=self.ctx.step, requeue_count=self.ctx.requeue_count,
                                   meta={"files": [str(p) for p in paths], "previous": parent}) as pub:
                    meta = ImageMeta(
                        ckptid=pub.ckptid, job_id=self.ctx.job_id, engine=ENGINE,
                        step=self.ctx.step, slurm=dict(self.ctx.slurm), uid=self.user.uid, gid=self.user.gid,
                        user=self.user.name, node=self.ctx.node, cmdline=list(self.ctx.cmdline),
                        cwd=str(self.cwd), policy_digest=self.policy.digest(),
                        requeue_count=self.ctx.requeue_count, extra={"patterns": list(self.patterns)},
                    )
                    pack_dir(stage, pub.file, meta, codec=comp.codec, level=comp.level,
                             chunk_size=self.policy.pipeline.chunk_size)
                    ckptid = int(pub.ckptid)
        finally:
            cat.close()
        hlog.event(_log, "app.files_captured", f"captured {len(paths)} restart file(s) as checkpoint {ckptid}",
                   ckptid=ckptid, files=len(paths), job_id=self.ctx.job_id)
        return ckptid

    def restore_latest(self) -> int | None:
        """Put back the files of the newest good checkpoint; return its ckptid, or None if there is none."""
        _store, cat = self._open()
        try:
            for rec in cat.committed(self.ctx.job_id, uid=self.user.uid):
                if rec.engine != ENGINE:
                    continue
                with shards.staging_dir(self.policy.storage.staging) as stage:
                    try:
                        unpack_image(Path(rec.path), stage / "f")
                        files = shards.read_files_index(stage / "f", rec.path)
                    except HpcckptError as err:  # a damaged or unreadable image: fall back to an older one
                        hlog.event(_log, "app.files_bad_image",
                                   f"checkpoint {rec.ckptid} unusable ({err}); trying an older one", 30)
                        continue
                    shards.put_back(files)
                cat.record_resume(rec.ckptid, resumed_by="app-files", new_job_id=self.ctx.job_id)
                hlog.event(_log, "app.files_restored", f"put back {len(files)} file(s) of checkpoint {rec.ckptid}",
                           ckptid=rec.ckptid)
                return int(rec.ckptid)
        finally:
            cat.close()
        return None


class FilesEngine(launched.AppEngineBase):
    """The ``files`` engine under the Runner: captures the program's restart files (module docstring)."""

    name = "files"
    image_engine = ENGINE
    poll_s: float | None = POLL

    def __init__(self, setup: EngineSetup, patterns: Sequence[str], app_signal: int | None) -> None:
        super().__init__(setup)
        if not patterns:
            raise UsageError("the files engine needs --app-files", hint="e.g. --app-files 'restart.*'")
        ctx = job_context(setup.policy, job_id=setup.job_id, store=setup.store_root, catalog=setup.catalog_url)
        self.job = FilesJob(ctx, setup.user, list(patterns), Path.cwd(), setup.policy)
        self.app_signal = app_signal
        self.grace = float(setup.policy.preemption.grace_time)
        self.watch = SettleWatch(lambda: fingerprint(matching_files(self.job.patterns, self.job.cwd)))

    def launch(self, argv: Sequence[str], env: Mapping[str, str], cwd: str) -> Launched:
        """Put back the newest image's files (if any), then start the program, told whether it restarts."""
        self.job.cwd = Path(cwd)
        ckptid = self.job.restore_latest()
        child_env = dict(env)
        if ckptid is not None:
            child_env["HPCCKPT_RESTART"] = "1"
            child_env["HPCCKPT_CKPTID"] = str(ckptid)
        else:
            child_env.pop("HPCCKPT_RESTART", None)
            child_env.pop("HPCCKPT_CKPTID", None)
        self.last = ckptid
        # What was just restored must not be captured again as if new.
        self.watch.mark_captured(fingerprint(matching_files(self.job.patterns, self.job.cwd)))
        got = launched.spawn(argv, child_env, cwd)
        self.pid = got.pid
        return got

    def _row(self, ckptid: int, key: str, t0: float) -> CheckpointResult | None:
        for rec in self._catalog_rows():
            if rec.ckptid == ckptid:
                return self._result(rec, key, seconds=time.monotonic() - t0)
        return None

    def _capture_now(self, fp: Fingerprint, key: str) -> CheckpointResult | None:
        t0 = time.monotonic()
        paths = [Path(p) for p, _size, _mtime in fp]
        try:
            self.last = self.job.capture(paths, self.last)
            self.watch.mark_captured(fp)
        except (OSError, UsageError) as err:
            # The files vanished or changed under us: try again at the next chance.
            hlog.event(_log, "app.files_capture_failed", f"capture failed: {err}", 30)
            return None
        return self._row(self.last, key, t0)

    def _signal_and_capture(self, pid: int, until: float, key: str) -> CheckpointResult | None:
        """Ask the program to write its restart files, wait until they settle, capture them."""
        assert self.app_signal is not None
        before = self.watch.captured
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, self.app_signal)
        while time.monotonic() < until and not launched.exited(pid):
            fp = self.watch.poll()
            if fp is not None and fp != before:
                return self._capture_now(fp, key)
            time.sleep(POLL)
        hlog.event(_log, "app.files_no_restart", "the program wrote no new restart files in time", 30)
        return None

    def _current(self, key: str) -> CheckpointResult | None:
        """The files as they are now, captured if they changed since the last capture."""
        fp = fingerprint(matching_files(self.job.patterns, self.job.cwd))
        if fp and fp != self.watch.captured:
            return self._capture_now(fp, key)
        return None

    def _latest(self, key: str) -> CheckpointResult | None:
        """Nothing new to capture: the newest image already holds the files as they are."""
        rows = self._catalog_rows()
        return self._result(rows[0], key) if rows else None

    def collect(self) -> list[launched.Result]:
        if self.app_signal is None and self.pid > 0 and not launched.exited(self.pid):
            fp = self.watch.poll()  # the program's own schedule: capture what settled
            if fp is not None:
                res = self._capture_now(fp, self._pending.pop(0) if self._pending else "")
                if res is not None:
                    self._results.append(res)
        return super().collect()

    def take(self, pid: int) -> Taken | None:
        if self.app_signal is None:
            return None  # captured as the program writes them (collect)
        key = self._key()
        res = self._signal_and_capture(pid, time.monotonic() + self.grace, key)
        if res is None:
            return None
        self._results.append(res)
        # The cost an 'auto' interval weighs: from the signal to the capture (the runner waited that long).
        return Taken(key, res.total_s)

    def request(self, pid: int) -> Taken | None:
        key = self._key()
        if self.app_signal is not None:
            res = self._signal_and_capture(pid, time.monotonic() + self.grace, key)
        else:
            res = self._current(key)
        res = res or self._latest(key)
        if res is None:
            raise UsageError("the program has written no restart files yet (nothing matches "
                             f"{' '.join(self.job.patterns)!r} in {self.job.cwd})")
        self._results.append(res)
        return Taken(key)

    def checkpoint(self, pid: int, *, final: bool = False, deadline: float | None = None,
                   thaw_on_failure: bool = True) -> CheckpointResult:
        until = deadline if deadline is not None else time.monotonic() + self.grace
        key = self._key()
        res = self._signal_and_capture(pid, until, key) if self.app_signal is not None else self._current(key)
        res = res or self._latest(key)
        if final:
            # The program is ended as the scheduler would have: TERM, then KILL at the deadline.
            launched.signal_job(pid, signal.SIGTERM)
            launched.end_job(pid, max(until, time.monotonic() + 1.0))
        if res is None:
            raise DeadlineExceededError("no restart files could be captured: the program wrote none "
                                        f"matching {' '.join(self.job.patterns)!r}")
        res.final = final
        return res


def files_engine(patterns: Sequence[str], app_signal: str | None) -> Callable[[EngineSetup], FilesEngine]:
    """The factory ``hpcckpt run --engine app --app-files GLOB`` hands to the session."""
    sig = signal_number(app_signal) if app_signal else None
    pats = list(patterns)
    return lambda setup: FilesEngine(setup, pats, sig)
