"""The runner's requests to an API program: one word a line, appended to a file named in the environment.

``hpcckpt run --engine app`` sets ``HPCCKPT_REQUESTS`` to a file of its own
(0600) and appends ``checkpoint`` (``hpcckpt checkpoint JOB``) or ``stop``
(a preemption signal reached the runner: save, then end) to it. Rank 0's
``Checkpointer.due()`` reads what was added since its last look, and the
ranks agree on it as on a signal of their own.

Why a file and not a signal: the runner's child is often ``mpirun`` or
``srun``, which would end the ranks on SIGTERM rather than pass it on; a
file reaches rank 0 whatever launches it, and costs one ``stat`` per
``due()``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

ENV = "HPCCKPT_REQUESTS"
CHECKPOINT = "checkpoint"
STOP = "stop"


class RequestWriter:
    """The runner's end: an empty file per launch, removed by :meth:`close`.

    ``path``: where (the runner's private control directory, one file per
    job, so that a runner killed outright leaves one stale file, not one per
    run); else a fresh file in ``directory`` or ``$TMPDIR``.
    """

    def __init__(self, job_id: str, directory: str | None = None, path: Path | None = None) -> None:
        if path is not None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)  # one left by an earlier run keeps its mode otherwise
            finally:
                os.close(fd)
            self.path = path
            return
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in job_id)
        fd, name = tempfile.mkstemp(prefix=f"hpcckpt-{safe}-", suffix=".requests", dir=directory)
        os.close(fd)  # mkstemp makes it 0600: only the job's user may ask
        self.path = Path(name)

    def send(self, word: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, f"{word}\n".encode())
        finally:
            os.close(fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


class RequestReader:
    """The program's end (rank 0): the words added since the last :meth:`poll`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RequestReader | None:
        path = (os.environ if env is None else env).get(ENV)
        return cls(path) if path else None

    def poll(self) -> set[str]:
        try:
            if os.stat(self.path).st_size <= self._offset:
                return set()
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except OSError:  # the runner is gone or never made it: no requests
            return set()
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # a line still being written
        return {ln.decode(errors="replace").strip() for ln in lines if ln.strip()}
