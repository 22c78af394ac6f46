"""Drive the real ``hpcckpt run`` / ``hpcckpt resume`` commands in tests and read what they did."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcckpt.core.runner.control import request
from hpcckpt.criu import procinfo

REPO = Path(__file__).resolve().parents[2]
PROGS = Path(__file__).resolve().parent / "progs"


def wait_for(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class Cmd:
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        docs = []
        for line in self.err.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if name is None or doc.get("event") == name:
                    docs.append(doc)
        return docs

    def lines(self) -> list[str]:
        return self.out.read_text(errors="replace").split()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)


def hpcckpt(args: Sequence[str], workdir: Path, tag: str, store: Path, extra_env: dict[str, str] | None = None
            ) -> Cmd:
    out, err = workdir / f"{tag}.out", workdir / f"{tag}.err"
    # The job's own temporary directories (hpcckpt.core.launch.scratch) go below the test's directory.
    env = dict(os.environ, HPCCKPT_LOG_FORMAT="json", HPCCKPT_STORE=str(store),
               HPCCKPT_STAGING=str(workdir / "staging"), PYTHONPATH=str(REPO), TMPDIR=str(workdir),
               OMPI_MCA_btl_vader_backing_directory=str(workdir))
    for k in [k for k in env if k.startswith("SLURM_")]:
        del env[k]
    env.update(extra_env or {})
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "hpcckpt", *args], stdout=o, stderr=e, cwd=workdir,
                                env=env, stdin=subprocess.DEVNULL)
    return Cmd(proc, out, err)


def job_pid(job_id: str, timeout: float = 30) -> int:
    def ask() -> int | None:
        try:
            return int(request(job_id, {"op": "status"}, timeout=5)["pid"])
        except Exception:
            return None

    return int(wait_for(ask, timeout, f"the runner of {job_id} to answer"))


def kill_everything(cmd: Cmd, pid: int) -> None:
    """SIGKILL the job's whole tree and its runner: a node crash, as far as these processes can tell."""
    pids = procinfo.tree_pids(pid)
    cmd.proc.kill()
    for p in reversed(pids):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cmd.proc.wait(10)
    # A dump in progress holds the tasks (ptrace) until it ends: SIGKILL lands after it, seconds later under load.
    wait_for(lambda: all(gone(p) for p in pids), 60, "the job to die")


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie. Orphans of a killed runner are reparented to the nearest child
    subreaper, which is this pytest process once an in-process runner test has made it one; reap them."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")
