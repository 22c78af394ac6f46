"""``hpcckpt status``: for each job, whether it runs and where, its last good checkpoint, and warnings.

Warnings (each a short sentence, for people and for ``--json``):

- ``stale``: no committed checkpoint in two intervals, counted from the last
  good checkpoint or from the start of the current run, whichever is later.
  Checked for a job that runs, or whose runner cannot be asked from here but
  that made an attempt within two intervals (it most likely runs elsewhere);
  a job that ended is not stale.
- ``failing``: its last three checkpoint attempts failed.

Whether a job runs is asked of its runner's control socket, which is
node-local (:func:`liveness`); a catalog lease can replace that function
without changing anything else here.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hpcckpt.context import node_name
from hpcckpt.core.runner import control
from hpcckpt.observe.jobstats import JobStats

FAILING_RUN = 3  # this many failed attempts in a row is a warning
STALE_INTERVALS = 2


@dataclass(frozen=True)
class Liveness:
    running: bool | None  # None: cannot tell from here (no runner on this node)
    where: str = ""  # the node it runs on
    pid: int | None = None
    how: str = ""  # what told us


def _socket_candidates(job_id: str, uid: int) -> list[Path]:
    """Where the job's runner listens: under its owner's XDG_RUNTIME_DIR (the usual /run/user/UID), or /tmp."""
    seen: list[Path] = []
    for env in ({"XDG_RUNTIME_DIR": f"/run/user/{uid}"}, {}, dict(os.environ)):
        path = control.socket_path(job_id, uid, environ=env)
        if path not in seen:
            seen.append(path)
    return seen


def _ask(path: Path, timeout: float) -> dict[str, Any] | None:
    """One ``status`` request to the runner listening at ``path``; None if nobody answers."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(os.fspath(path))
        s.sendall(b'{"op": "status"}\n')
        buf = b""
        while b"\n" not in buf and len(buf) < 1 << 20:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        ans = json.loads(buf.split(b"\n", 1)[0])
    except (OSError, ValueError):
        return None
    finally:
        s.close()
    return ans if isinstance(ans, dict) else None


def liveness(job_id: str, uid: int) -> Liveness:
    """Ask the job's runner on this node over its control socket. (The place a catalog lease goes.)"""
    for path in _socket_candidates(job_id, uid):
        if not path.exists():
            continue
        ans = _ask(path, 3.0)
        if ans is not None and ans.get("ok") and str(ans.get("job_id")) == job_id:
            pid = ans.get("pid")
            return Liveness(True, node_name(), int(pid) if isinstance(pid, int) else None, "control socket")
    return Liveness(None, "", None, f"no runner on {node_name()}")


@dataclass
class JobStatus:
    job_id: str
    user: str
    uid: int
    running: bool | None
    where: str
    how: str
    last_good_ckptid: int | None
    last_good_at: float | None
    last_good_age_s: float | None
    interval_s: float | None
    interval_origin: str | None
    committed: int
    failed: int
    consecutive_failures: int
    last_error: str
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def assess(job: JobStats, live: Liveness, now: float) -> JobStatus:
    last = job.last_success
    last_at = (last.finished or last.created) if last is not None else None
    iv = job.interval
    fails = [a for a in job.attempts if a.failed]
    st = JobStatus(
        job_id=job.job_id, user=job.user, uid=job.uid, running=live.running, where=live.where, how=live.how,
        last_good_ckptid=last.ckptid if last is not None else None, last_good_at=last_at,
        last_good_age_s=now - last_at if last_at is not None else None,
        interval_s=iv[0] if iv else None, interval_origin=iv[1] if iv else None,
        committed=len(job.committed), failed=len(fails), consecutive_failures=job.consecutive_failures,
        last_error=fails[-1].error.splitlines()[0] if fails and fails[-1].error else "",
    )
    if st.consecutive_failures >= FAILING_RUN:
        st.warnings.append(f"failing: its last {st.consecutive_failures} checkpoints failed"
                           + (f" ({st.last_error})" if st.last_error else ""))
    if iv is not None:
        limit = STALE_INTERVALS * iv[0]
        since = max(last_at or 0.0, job.run_start)
        maybe_running = live.running is True or (live.running is None and now - job.last_activity <= limit)
        if maybe_running and now - since > limit:
            what = "no committed checkpoint" if last_at is None else "no committed checkpoint since the last one"
            st.warnings.append(f"stale: {what} in {now - since:.0f} s, over {STALE_INTERVALS} intervals "
                               f"({iv[0]:.0f} s each)")
    return st


def job_statuses(jobs: list[JobStats], *, now: float | None = None,
                 live: Callable[[str, int], Liveness] = liveness) -> list[JobStatus]:
    t = time.time() if now is None else now
    return [assess(j, live(j.job_id, j.uid), t) for j in jobs]
