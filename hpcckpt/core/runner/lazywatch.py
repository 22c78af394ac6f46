"""A lazily restored job under its runner: no checkpoint before its memory is all in; a failure falls back.

:mod:`hpcckpt.core.lazyrestore` kills the job at once when its memory cannot be
brought in (a chunk that fails its checks, a store that cannot be read, the
lazy-pages daemon gone). The runner then sees its job die; here that death
is turned into a resume from the checkpoint before the one that failed,
said in the log, instead of the end of the job. The job loses only what it
did since the restore (no checkpoint can have been taken from it: the
Checkpointer waits for :attr:`~hpcckpt.core.lazyrestore.LazyRestore.resident`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from hpcckpt import log as hlog
from hpcckpt.core.lazyrestore import LazyRestore, describe_failure
from hpcckpt.core.resume import Restored
from hpcckpt.core.runner.runner import Runner
from hpcckpt.errors import DeadlineExceededError, EngineError, HpcckptError
from hpcckpt.image.refs import ParentIndex

_log = hlog.get("runner.lazy")

# Resume from an image older than the given ckptid (the fallback), or raise.
ResumeBefore = Callable[[int], Restored]
ChainParent = Callable[[Restored], ParentIndex | None]


def resident_gate(lazy: LazyRestore) -> Callable[[float | None], None]:
    """The Checkpointer's wait: until every page is in, or the deadline; raises if it cannot be."""

    def wait(deadline: float | None) -> None:
        if lazy.resident.is_set():
            return
        t0 = time.monotonic()
        left = None if deadline is None else max(0.0, deadline - t0)
        if lazy.wait_resident(left):
            hlog.event(_log, "checkpoint.waited_resident", f"the checkpoint waited {time.monotonic() - t0:.2f} s "
                       "for the lazily restored memory to be all in", seconds=round(time.monotonic() - t0, 3))
            return
        if lazy.failure is not None:
            raise EngineError(f"the job's memory could not be restored: {describe_failure(lazy.failure)}")
        raise DeadlineExceededError("the deadline passed before the lazily restored job's memory was all in")

    return wait


def watch(runner: Runner, restored: Restored, resume_before: ResumeBefore, chain_parent: ChainParent,
          reset: Callable[[], None] = lambda: None) -> None:
    """Wire ``restored`` (lazy or not) into ``runner``; a no-op for a job restored whole.

    ``reset`` runs before a fallback restore: it ends what belonged to the
    killed job (its network namespace's outside link).
    """
    current = [restored]

    def wire(r: Restored) -> None:
        runner.ckpt.resident = resident_gate(r.lazy) if r.lazy is not None else None

    def relaunch() -> tuple[int, int, int] | None:
        lazy = current[0].lazy
        if lazy is None or lazy.failure is None:
            return None
        failed = current[0].ckptid
        msg = (f"checkpoint {failed} of job {runner.cfg.job_id} failed after the job restarted from it: "
               f"{describe_failure(lazy.failure)}; the job was stopped and resumes from the checkpoint before it")
        hlog.event(_log, "resume.lazy_fallback", msg, 30, ckptid=failed)
        reset()
        try:
            new = resume_before(failed)
        except HpcckptError as err:
            hlog.event(_log, "resume.lazy_fallback_failed", f"no older checkpoint could be restored: {err}", 40)
            return None
        new.fallbacks.insert(0, msg)
        current[0] = new
        wire(new)
        runner.ckpt.flusher.parent = chain_parent(new)
        return new.pid, new.pipes.out_r, new.pipes.err_r

    if restored.lazy is None:
        return
    wire(restored)
    runner.relaunch = relaunch
