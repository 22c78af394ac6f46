"""The ``api`` engine: a program that checkpoints itself with ``hpcckpt.Checkpointer``, under the Runner.

``hpcckpt run --engine app -- CMD`` (no ``--app-files``) starts CMD with the
job's context in its environment (``HPCCKPT_JOB_ID``, ``HPCCKPT_STORE``,
``HPCCKPT_CATALOG``, ``HPCCKPT_CKPT_INTERVAL``: what
:mod:`hpcckpt.app.jobenv` reads), so its ``Checkpointer`` files its images
under the runner's job and keeps the runner's interval (``auto`` included:
the program measures its own save costs). The program decides *where* in
its loop a checkpoint is safe (``due()``); the runner:

* asks for one on ``hpcckpt checkpoint JOB`` and, on a preemption signal,
  asks for one and for the program to stop (:mod:`hpcckpt.app.requests`);
* learns of each checkpoint the program commits by watching the catalog
  for new committed rows of the job (``engine = app``), and answers the
  request that waited for it;
* after a preemption, waits for the program to save and end (until the
  deadline, then ends it), and exits 85 when an image exists.

At ``hpcckpt resume`` the recorded command is started again the same way;
its ``Checkpointer.restore()`` finds the latest image by itself.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from hpcckpt import log as hlog
from hpcckpt.app import launched
from hpcckpt.app.requests import CHECKPOINT, ENV, STOP, RequestWriter
from hpcckpt.core.checkpoint import CheckpointResult
from hpcckpt.core.runner.control import socket_path
from hpcckpt.core.runner.engines import EngineSetup, Launched, Taken
from hpcckpt.errors import DeadlineExceededError, HpcckptError

_log = hlog.get("app.api")
# An explicit checkpoint waited for without a deadline (async_flush off) gives up after this long.
WAIT_CAP_S = 600.0


class ApiEngine(launched.AppEngineBase):
    name = "api"
    image_engine = "app"

    def __init__(self, setup: EngineSetup) -> None:
        super().__init__(setup)
        self._requests: RequestWriter | None = None
        try:
            rows = self._catalog_rows()
        except HpcckptError:
            rows = []
        self.last = rows[0].ckptid if rows else None

    def launch(self, argv: Sequence[str], env: Mapping[str, str], cwd: str) -> Launched:
        # Beside the job's control socket (a private directory the ControlServer made), else in $TMPDIR.
        fixed = socket_path(self.setup.job_id, self.setup.user.uid).with_suffix(".requests")
        self._requests = RequestWriter(self.setup.job_id, path=fixed if fixed.parent.is_dir() else None)
        child_env = dict(env)
        child_env[ENV] = str(self._requests.path)
        got = launched.spawn(argv, child_env, cwd)
        self.pid = got.pid
        return got

    def _new_commits(self) -> list[CheckpointResult]:
        """Images the program committed since we last looked, oldest first, each matched to a waiting request."""
        try:
            rows = self._catalog_rows()
        except HpcckptError as err:
            hlog.event(_log, "app.catalog_unreadable", f"cannot read the catalog: {err}", 30)
            return []
        fresh = sorted((r for r in rows if self.last is None or r.ckptid > self.last), key=lambda r: r.ckptid)
        out = []
        for rec in fresh:
            key = self._pending.pop(0) if self._pending else ""
            out.append(self._result(rec, key))
            self.last = rec.ckptid
            hlog.event(_log, "app.committed", f"the program committed checkpoint {rec.ckptid}",
                       ckptid=rec.ckptid, job_id=self.setup.job_id)
        return out

    def collect(self) -> list[launched.Result]:
        self._results += self._new_commits()
        return super().collect()

    def _send(self, word: str) -> None:
        if self._requests is not None:
            self._requests.send(word)

    def take(self, pid: int) -> Taken | None:
        # The program keeps the interval itself (HPCCKPT_CKPT_INTERVAL): only it knows where a step ends.
        return None

    def request(self, pid: int) -> Taken | None:
        key = self._key()
        self._pending.append(key)
        self._send(CHECKPOINT)
        return Taken(key)

    def checkpoint(self, pid: int, *, final: bool = False, deadline: float | None = None,
                   thaw_on_failure: bool = True) -> CheckpointResult:
        """Ask for a checkpoint (``final``: and for the program to stop) and wait for its commit."""
        t0 = time.monotonic()
        until = deadline if deadline is not None else t0 + (self.setup.deadline_s if final else WAIT_CAP_S)
        key = self._key()
        self._pending.append(key)
        self._send(STOP if final else CHECKPOINT)
        mine: CheckpointResult | None = None
        while mine is None and time.monotonic() < until:
            for res in self._new_commits():
                if res.stage == key:
                    mine = res
                else:
                    self._results.append(res)
            if mine is None:
                if launched.exited(pid):
                    break
                time.sleep(0.1)
        if mine is None:
            with_key = [k for k in self._pending if k != key]
            self._pending[:] = with_key
            if final:
                launched.end_job(pid, time.monotonic())
            raise DeadlineExceededError(
                "the program committed no checkpoint before the deadline" if not launched.exited(pid)
                else "the program ended without committing the checkpoint asked for",
                hint="the program must call Checkpointer.due() and save() regularly (see docs/mpi.md)",
            )
        mine.final = final
        mine.total_s = mine.pack_s = time.monotonic() - t0
        if final:  # it saved: now it stops by itself (stop_requested), or is ended at the deadline
            launched.end_job(pid, max(until, time.monotonic() + 1.0))
        return mine

    def close(self) -> None:
        if self._requests is not None:
            self._requests.close()


def api_engine(setup: EngineSetup) -> ApiEngine:
    return ApiEngine(setup)
