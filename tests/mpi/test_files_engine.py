"""``--engine app``: a program's own restart files are captured, put back, and the program resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from hpcckpt.app.files_engine import SettleWatch
from hpcckpt.catalog import open_catalog
from hpcckpt.context import current_user
from hpcckpt.exitcodes import EXIT_REQUEUE

REPO = Path(__file__).resolve().parents[2]

# A program in the style of a Fortran code: counts to --until, writes
# restart.dat when sent USR1 (or every --every counts), and starts from it
# when hpcckpt says it is a restart.
PROGRAM = textwrap.dedent(
    """
    import os, signal, sys, time
    until, every = int(sys.argv[1]), int(sys.argv[2])
    n = 0
    if os.environ.get("HPCCKPT_RESTART") == "1":
        n = int(open("restart.dat").read())
        print(f"restarted from {n} ckpt {os.environ['HPCCKPT_CKPTID']}", flush=True)
    want = False
    def on_usr1(signum, frame):
        global want
        want = True
    signal.signal(signal.SIGUSR1, on_usr1)
    def dump():
        with open("restart.tmp", "w") as f:
            f.write(str(n))
        os.replace("restart.tmp", "restart.dat")
    while n < until:
        n += 1
        time.sleep(0.01)
        if want or (every and n % every == 0):
            want = False
            dump()
    print(f"done {n}", flush=True)
    """
)

@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "prog.py").write_text(PROGRAM)
    return tmp_path


def start(workdir: Path, job: str, interval: str, sig: str, until: int, every: int) -> subprocess.Popen[str]:
    """The real command line: ``hpcckpt run --engine app --app-files restart.dat ...``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPCCKPT_", "SLURM_"))}
    env.update(PYTHONPATH=str(REPO), HPCCKPT_LOG_FORMAT="json")
    argv = [sys.executable, "-m", "hpcckpt", "run", "--engine", "app", "--app-files", "restart.dat",
            "--job-id", job, "--store", str(workdir / "store")]
    if interval:
        argv += ["--interval", interval]
    if sig:
        argv += ["--app-signal", sig]
    argv += ["--", sys.executable, "prog.py", str(until), str(every)]
    return subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def committed(workdir: Path, job: str) -> list[Any]:
    if not (workdir / "store").exists():
        return []
    cat = open_catalog(None, workdir / "store", current_user())
    try:
        return cat.committed(job)  # newest first
    finally:
        cat.close()


def wait_for(pred: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_signal_mode_preempt_then_restart_resumes_from_restart_file(workdir: Path) -> None:
    proc = start(workdir, "f1", "1", "USR1", until=100_000, every=0)
    try:
        wait_for(lambda: committed(workdir, "f1"), 60)
        proc.send_signal(signal.SIGTERM)  # as Slurm does at preemption
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_REQUEUE, err[-2000:]
    rows = committed(workdir, "f1")
    saved = int((workdir / "restart.dat").read_text())
    assert rows[0].engine == "files" and saved > 0
    (workdir / "restart.dat").unlink()  # as on a fresh node: only the store survives

    proc = start(workdir, "f1", "60", "USR1", until=saved + 20, every=0)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert f"restarted from {saved} ckpt {rows[0].ckptid}" in out
    assert f"done {saved + 20}" in out


@pytest.mark.slow
def test_own_schedule_files_are_captured_once_settled(workdir: Path) -> None:
    proc = start(workdir, "f2", "", "", until=400, every=150)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    rows = committed(workdir, "f2")
    # The program wrote 150 and 300, 1.5 s apart, and ran 1 s more; a file is
    # captured once unchanged for 1 s, so 150 is, and perhaps 300.
    assert rows, err[-2000:]
    (workdir / "restart.dat").write_text("0")
    proc = start(workdir, "f2", "", "", until=410, every=0)
    out, _ = proc.communicate(timeout=120)
    assert "restarted from " in out and "done 410" in out
    restarted = int(out.split("restarted from ")[1].split()[0])
    assert restarted in (150, 300)


def test_settle_watch_waits_for_quiet_and_skips_what_was_captured() -> None:
    now = [0.0]
    fp: list[Any] = [()]
    watch = SettleWatch(lambda: tuple(fp[0]), clock=lambda: now[0], settle=1.0)
    assert watch.poll() is None  # nothing there
    fp[0] = (("/r", 1, 1),)
    assert watch.poll() is None  # just changed
    now[0] = 0.5
    assert watch.poll() is None  # not quiet long enough
    fp[0] = (("/r", 2, 2),)
    now[0] = 1.2
    assert watch.poll() is None  # changed again: the clock restarts
    now[0] = 2.3
    assert watch.poll() == (("/r", 2, 2),)
    watch.mark_captured((("/r", 2, 2),))
    now[0] = 9.0
    assert watch.poll() is None  # already captured
