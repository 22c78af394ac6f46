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

On a preemption signal (policy ``preemption.signals``) the files are
captured one last time, the signal is passed on to the program, and hpcckpt
exits with 85 (checkpointed and stopped: requeue me). Otherwise it exits
with the program's status, or 128+N when a signal N ended it.

A file is only captured after it stayed unchanged (size and mtime) for
SETTLE seconds: a restart file caught half-written would be worse than none.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcckpt import log as hlog
from hpcckpt.app import shards
from hpcckpt.app.jobenv import JobContext, job_context
from hpcckpt.app.signals import PreemptFlag, signal_number
from hpcckpt.context import User, current_user
from hpcckpt.errors import HpcckptError, UsageError
from hpcckpt.exitcodes import EXIT_REQUEUE
from hpcckpt.image import ImageMeta, pack_dir, unpack_image

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
    policy: Any

    def _open(self) -> tuple[Any, Any]:
        from hpcckpt.catalog import open_catalog
        from hpcckpt.store.images import Store

        return (Store(self.ctx.store_root, self.user),
                open_catalog(self.ctx.catalog_url, self.ctx.store_root, self.user))

    def capture(self, paths: Sequence[Path], parent: int | None) -> int:
        """Pack ``paths`` into a new committed image; return its ckptid."""
        store, cat = self._open()
        try:
            with shards.staging_dir(self.policy.storage.staging) as stage:
                shards.capture_files(paths, stage)
                comp = self.policy.storage.compression
                with store.publish(cat, job_id=self.ctx.job_id, engine=ENGINE, node=self.ctx.node,
                                   step=self.ctx.step, parent=parent, requeue_count=self.ctx.requeue_count,
                                   meta={"files": [str(p) for p in paths]}) as pub:
                    meta = ImageMeta(
                        ckptid=pub.ckptid, job_id=self.ctx.job_id, engine=ENGINE, parent_ckptid=parent,
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


def _interval(ctx: JobContext, policy: Any) -> float:
    if ctx.interval == "auto":
        from hpcckpt.policy.daly import choose_interval

        return float(choose_interval(policy, [])[0])
    return float(ctx.interval)


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


class FilesRunner:
    """Runs the command and captures its files; ``clock``/``sleep`` are injectable for tests."""

    def __init__(self, job: FilesJob, cmd: Sequence[str], app_signal: int | None, interval: float,
                 preempt_signals: Sequence[str], grace: float) -> None:
        self.job = job
        self.cmd = list(cmd)
        self.app_signal = app_signal
        self.interval = interval
        self.preempt_signals = list(preempt_signals)
        self.grace = grace
        self.last: int | None = None
        self.watch = SettleWatch(lambda: fingerprint(matching_files(job.patterns, job.cwd)))

    def _capture_now(self, fp: Fingerprint) -> None:
        paths = [Path(p) for p, _size, _mtime in fp]
        try:
            self.last = self.job.capture(paths, self.last)
            self.watch.mark_captured(fp)
        except (OSError, UsageError) as err:
            # The files vanished or changed under us: try again at the next chance.
            hlog.event(_log, "app.files_capture_failed", f"capture failed: {err}", 30)

    def _signal_and_capture(self, child: subprocess.Popen[bytes], deadline: float) -> None:
        """Ask the program to write its restart files, wait until they settle, capture them."""
        assert self.app_signal is not None
        before = self.watch.captured
        child.send_signal(self.app_signal)
        while time.monotonic() < deadline and child.poll() is None:
            fp = self.watch.poll()
            if fp is not None and fp != before:
                self._capture_now(fp)
                return
            time.sleep(POLL)
        hlog.event(_log, "app.files_no_restart", "the program wrote no new restart files in time", 30)

    def run(self, env: Mapping[str, str]) -> int:
        flag = PreemptFlag()
        flag.install(self.preempt_signals)
        try:
            child = subprocess.Popen(self.cmd, env=dict(env), cwd=self.job.cwd)
        except OSError as err:
            flag.uninstall()
            raise UsageError(f"{self.cmd[0]}: cannot start: {err.strerror}",
                             hint="check the command after '--'") from err
        # What was just restored must not be captured again as if new.
        self.watch.mark_captured(fingerprint(matching_files(self.job.patterns, self.job.cwd)))
        next_due = time.monotonic() + self.interval
        try:
            while child.poll() is None:
                if flag.is_set:
                    return self._preempted(child, flag.signum or signal.SIGTERM)
                if self.app_signal is not None:
                    if time.monotonic() >= next_due:
                        self._signal_and_capture(child, time.monotonic() + self.grace)
                        next_due = time.monotonic() + self.interval
                else:
                    fp = self.watch.poll()
                    if fp is not None:
                        self._capture_now(fp)
                time.sleep(POLL)
            return _exit_status(child.returncode)
        finally:
            flag.uninstall()
            if child.poll() is None:
                child.kill()
                child.wait()

    def _preempted(self, child: subprocess.Popen[bytes], signum: int) -> int:
        deadline = time.monotonic() + self.grace
        hlog.event(_log, "app.files_preempted", f"signal {signum}: capturing restart files, then stopping")
        if self.app_signal is not None:
            self._signal_and_capture(child, deadline)
        else:
            fp = fingerprint(matching_files(self.job.patterns, self.job.cwd))
            if fp and fp != self.watch.captured:
                self._capture_now(fp)
        child.send_signal(signum)
        try:
            child.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        return EXIT_REQUEUE


def run_files_engine(
    cmd: Sequence[str],
    policy: Any,
    *,
    app_files: Sequence[str],
    app_signal: str | None = None,
    interval: str | None = None,
    job_id: str | None = None,
    store: str | None = None,
    catalog: str | None = None,
) -> int:
    """``hpcckpt run --engine app``: run ``cmd``, capturing its restart files ``app_files`` (globs)."""
    patterns = list(app_files)
    cmd = list(cmd)
    if not patterns:
        raise UsageError("--engine app needs --app-files", hint="e.g. --app-files 'restart.*'")
    if not cmd:
        raise UsageError("no command to run", hint="hpcckpt run --engine app --app-files 'rst.*' -- ./code")
    app_sig = signal_number(app_signal) if app_signal else None
    # Without --job-id outside Slurm, the job id must not depend on how the command was spelled,
    # so that running the same command again finds its checkpoints.
    ctx = job_context(policy, job_id=job_id, store=store, catalog=catalog, interval=interval)
    if not job_id and ctx.job_id.startswith("local-"):
        ctx = job_context(policy, job_id=f"local-{Path(cmd[0]).name}", store=store, catalog=catalog,
                          interval=interval)
    job = FilesJob(ctx, current_user(), patterns, Path.cwd(), policy)
    env = dict(os.environ)
    env["HPCCKPT_JOB_ID"] = ctx.job_id
    ckptid = job.restore_latest()
    if ckptid is not None:
        env["HPCCKPT_RESTART"] = "1"
        env["HPCCKPT_CKPTID"] = str(ckptid)
    else:
        env.pop("HPCCKPT_RESTART", None)
        env.pop("HPCCKPT_CKPTID", None)
    runner = FilesRunner(job, cmd, app_sig, _interval(ctx, policy), policy.preemption.signals,
                         float(policy.preemption.grace_time))
    runner.last = ckptid
    return runner.run(env)
