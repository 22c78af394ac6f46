"""``hpcckpt run --engine app`` through the real CLI, with real OpenMPI and real processes.

* an API program (examples/mpi_integrate.py, 4 ranks under mpirun) and a
  restart-files program are killed with their runner after two committed
  checkpoints, resumed with ``hpcckpt resume JOB``, and end with the same
  result bytes as an uninterrupted run;
* SIGTERM to the runner makes the program save and stop, and the runner
  exit 85; ``hpcckpt checkpoint JOB`` reaches the program;
* an image the program wrote itself is never handed to CRIU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from hpcckpt.catalog import open_catalog
from hpcckpt.context import current_user
from hpcckpt.core.runner.control import socket_path
from hpcckpt.exitcodes import EXIT_REQUEUE, EXIT_USAGE

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "mpi_integrate.py"
MPIRUN = shutil.which("mpirun")
_needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="OpenMPI's mpirun is not installed")


def mpi(test: Callable[..., None]) -> Callable[..., None]:
    """Real OpenMPI: the suite's ``mpi`` marker, and skipped where mpirun is missing."""
    marked: Callable[..., None] = pytest.mark.mpi(_needs_mpirun(test))
    return marked
pytestmark = pytest.mark.slow

STEPS, CELLS, SLEEP = "500", "2000", "0.02"  # >= 10 s: killed well before its end

# A restart-files program: a deterministic chain of integer steps; writes
# restart.dat when sent USR1, and result.txt only when it is done.
FILES_PROG = textwrap.dedent(
    """
    import os, signal, sys, time
    until = int(sys.argv[1])
    n, x = 0, 1
    if os.environ.get("HPCCKPT_RESTART") == "1":
        n, x = map(int, open("restart.dat").read().split())
        print(f"restarted from {n}", flush=True)
    want = False
    def on_usr1(signum, frame):
        global want
        want = True
    signal.signal(signal.SIGUSR1, on_usr1)
    while n < until:
        n += 1
        x = (x * 6364136223846793005 + n) % (1 << 61)
        time.sleep(0.01)
        if want:
            want = False
            with open("restart.tmp", "w") as f:
                f.write(f"{n} {x}")
            os.replace("restart.tmp", "restart.dat")
    with open("result.txt", "w") as f:
        f.write(f"{n} {x}\\n")
    """
)


def base_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPCCKPT_", "SLURM_"))}
    env.update(PYTHONPATH=str(REPO), HPCCKPT_LOG_FORMAT="json", OMPI_MCA_rmaps_base_oversubscribe="1",
               # Ranks killed with SIGKILL leave their shared memory behind: in the test's directory, not /dev/shm.
               OMPI_MCA_btl_vader_backing_directory=str(tmp))
    return env


def hpcckpt(*args: str) -> list[str]:
    return [sys.executable, "-m", "hpcckpt", *args]


def mpi_prog(*extra: str) -> list[str]:
    assert MPIRUN is not None
    return [MPIRUN, "-n", "4", "--oversubscribe", "--allow-run-as-root", sys.executable, str(EXAMPLE),
            "--steps", STEPS, "--cells", CELLS, "--sleep", SLEEP, "--out", "result.json", *extra]


def committed(store: Path, job: str) -> list[Any]:
    if not store.exists():
        return []
    cat = open_catalog(None, store, current_user())
    try:
        return cat.committed(job)  # newest first
    finally:
        cat.close()


def wait_for(pred: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen[str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the runner ended ({proc.returncode}) before {what}: {out[-1000:]} {err[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL to the runner and every process below it, all at once (a node that died)."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.communicate(timeout=30)
    psutil.wait_procs(tree, timeout=10)


def stop(proc: subprocess.Popen[str], job: str) -> None:
    if proc.poll() is None:
        kill_tree(proc)
    # A runner killed outright leaves its request file (hpcckpt.app.requests) beside its control socket.
    socket_path(job).with_suffix(".requests").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def mpi_reference(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The uninterrupted run's result file (the program run directly, no checkpoint taken)."""
    work = tmp_path_factory.mktemp("ref")
    env = {**base_env(work), "HPCCKPT_STORE": str(work / "store"), "HPCCKPT_JOB_ID": "ref"}
    done = subprocess.run(mpi_prog(), cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return (work / "result.json").read_bytes()


def start(work: Path, job: str, *args: str) -> subprocess.Popen[str]:
    argv = hpcckpt("run", "--engine", "app", "--job-id", job, "--store", str(work / "store"), *args)
    return subprocess.Popen(argv, cwd=work, env=base_env(work), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def resume(work: Path, job: str) -> subprocess.CompletedProcess[str]:
    # From another directory, as a later batch job would: the recorded cwd is used.
    return subprocess.run(hpcckpt("resume", job, "--store", str(work / "store")), cwd="/", env=base_env(work),
                          capture_output=True, text=True, timeout=120)


@mpi
def test_api_program_killed_after_two_checkpoints_resumes_bit_identical(tmp_path: Path,
                                                                         mpi_reference: bytes) -> None:
    job = f"api-{uuid.uuid4().hex[:8]}"
    store = tmp_path / "store"
    proc = start(tmp_path, job, "--interval", "1", "--", *mpi_prog())
    try:
        wait_for(lambda: len(committed(store, job)) >= 2, 50, "two committed checkpoints", proc)
    finally:
        stop(proc, job)
    assert not (tmp_path / "result.json").exists(), "the program finished before it was killed"
    rows = committed(store, job)
    assert {r.engine for r in rows} == {"app"} and len(rows) >= 2

    done = resume(tmp_path, job)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "relaunched from its recorded command" in done.stderr
    assert "resumed at step" in done.stdout, done.stdout[-2000:]
    step = int(done.stdout.split("resumed at step ")[1].split()[0])
    assert 0 < step < int(STEPS)
    assert (tmp_path / "result.json").read_bytes() == mpi_reference


@mpi
def test_sigterm_saves_and_stops_with_85_and_checkpoint_request_reaches_program(tmp_path: Path,
                                                                                 mpi_reference: bytes) -> None:
    job = f"pre-{uuid.uuid4().hex[:8]}"
    store = tmp_path / "store"
    # No interval checkpoint: every image here was asked for (the request, then the preemption).
    proc = start(tmp_path, job, "--interval", "1h", "--", *mpi_prog())
    try:
        asked = wait_for(lambda: _checkpoint_now(tmp_path, job), 40, "an answered checkpoint request", proc)
        rows = committed(store, job)
        assert [r.ckptid for r in rows] == [asked["ckptid"]]
        proc.send_signal(signal.SIGTERM)  # as Slurm does at preemption
        out, err = proc.communicate(timeout=50)
    finally:
        stop(proc, job)
    assert proc.returncode == EXIT_REQUEUE, err[-3000:]
    assert "preempted: stopping at step" in out, out[-2000:]
    rows = committed(store, job)
    assert len(rows) == 2 and rows[0].ckptid > asked["ckptid"], "no checkpoint was saved after SIGTERM"
    assert not (tmp_path / "result.json").exists()

    done = resume(tmp_path, job)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"from checkpoint {rows[0].ckptid}" in done.stdout
    assert (tmp_path / "result.json").read_bytes() == mpi_reference


def _checkpoint_now(work: Path, job: str) -> dict[str, Any] | None:
    """``hpcckpt checkpoint JOB --json``; None while no runner answers yet (it is still starting)."""
    got = subprocess.run(hpcckpt("checkpoint", job, "--json", "--timeout", "30"), env=base_env(work),
                         capture_output=True, text=True, timeout=60)
    if got.returncode != 0:
        assert "no runner" in got.stderr or "not running" in got.stderr, got.stderr[-2000:]
        return None
    doc: dict[str, Any] = json.loads(got.stdout)
    return doc


def test_restart_files_program_killed_after_two_checkpoints_resumes_identical(tmp_path: Path) -> None:
    (tmp_path / "ref").mkdir()
    for d in (tmp_path, tmp_path / "ref"):
        (d / "prog.py").write_text(FILES_PROG)
    until = "1500"  # >= 15 s: killed well before its end
    # The uninterrupted run, beside the interrupted one.
    ref = subprocess.Popen([sys.executable, "prog.py", until], cwd=tmp_path / "ref", stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        _files_run_kill_resume(tmp_path, until)
        _out, err = ref.communicate(timeout=60)
        assert ref.returncode == 0, err
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.communicate()
    assert (tmp_path / "result.txt").read_bytes() == (tmp_path / "ref" / "result.txt").read_bytes()


def _files_run_kill_resume(work: Path, until: str) -> None:
    job = f"files-{uuid.uuid4().hex[:8]}"
    store = work / "store"
    proc = start(work, job, "--interval", "1", "--app-files", "restart.dat", "--app-signal", "USR1",
                 "--", sys.executable, "prog.py", until)
    try:
        wait_for(lambda: len(committed(store, job)) >= 2, 40, "two captured restart files", proc)
        asked = wait_for(lambda: _checkpoint_now(work, job), 30, "an answered checkpoint request", proc)
        assert asked["ckptid"] in {r.ckptid for r in committed(store, job)}
    finally:
        stop(proc, job)
    assert not (work / "result.txt").exists(), "the program finished before it was killed"
    assert {r.engine for r in committed(store, job)} == {"files"}
    (work / "restart.dat").unlink()  # only the store survives: the files come back from it

    done = resume(work, job)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "relaunched from its recorded command" in done.stderr
    restarted = int(done.stdout.split("restarted from ")[1].split()[0]) if "restarted from " in done.stdout else 0
    assert 0 < restarted < int(until), done.stdout


def test_resume_never_hands_a_program_written_image_to_criu(tmp_path: Path) -> None:
    """A program that checkpointed itself, started without 'hpcckpt run': resume says so, CRIU never runs."""
    (tmp_path / "p.py").write_text("from hpcckpt import Checkpointer\nCheckpointer().save({'x': 1})\n")
    env = {**base_env(tmp_path), "HPCCKPT_STORE": str(tmp_path / "store"), "HPCCKPT_JOB_ID": "direct"}
    subprocess.run([sys.executable, "p.py"], cwd=tmp_path, env=env, check=True, timeout=60)
    done = resume(tmp_path, "direct")
    assert done.returncode == EXIT_USAGE, done.stderr
    assert "written by the program itself (app engine), not by CRIU" in done.stderr
    assert "magic" not in done.stderr and "Traceback" not in done.stderr


def test_resubmitted_api_job_goes_on_under_the_job_it_continues(tmp_path: Path) -> None:
    """``hpcckpt resume --submit`` sets HPCCKPT_RESUME_FROM: the program must find that job's images."""
    (tmp_path / "p.py").write_text(textwrap.dedent(
        """
        from hpcckpt import Checkpointer
        with Checkpointer() as ck:
            got = ck.restore()
            if got is None:
                ck.save({"v": 41})
                print("fresh", ck.job_id, flush=True)
            else:
                print("restored", got["v"], ck.job_id, flush=True)
        """
    ))
    job = f"sub-{uuid.uuid4().hex[:8]}"
    argv = ["run", "--engine", "app", "--store", str(tmp_path / "store")]
    first = subprocess.run(hpcckpt(*argv, "--job-id", job, "--", sys.executable, "p.py"), cwd=tmp_path,
                           env=base_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and f"fresh {job}" in first.stdout, first.stderr[-2000:]
    env = {**base_env(tmp_path), "HPCCKPT_RESUME_FROM": job}
    again = subprocess.run(hpcckpt(*argv, "--", sys.executable, "p.py"), cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"restored 41 {job}" in again.stdout, again.stdout + again.stderr[-2000:]


def test_app_engine_images_are_kept_by_the_retention_policy(tmp_path: Path) -> None:
    """The runner applies retention to an app job's images as to a CRIU job's: only keep_last stay."""
    (tmp_path / "prog.py").write_text(FILES_PROG)
    (tmp_path / "policy.yaml").write_text("retention:\n  keep_last: 2\n  fallback_full: false\n")
    job = f"keep-{uuid.uuid4().hex[:8]}"
    store = tmp_path / "store"
    proc = start(tmp_path, job, "--interval", "1", "--policy", str(tmp_path / "policy.yaml"), "--app-files",
                 "restart.dat", "--app-signal", "USR1", "--", sys.executable, "prog.py", "3000")
    try:
        first = wait_for(lambda: committed(store, job), 40, "a first capture", proc)[-1].ckptid
        wait_for(lambda: committed(store, job)[0].ckptid >= first + 4, 60, "five captures", proc)
    finally:
        stop(proc, job)
    rows = committed(store, job)
    # Two kept after each commit; a kill between a commit and the runner's next look can leave a third.
    assert 1 <= len(rows) <= 3 and first not in {r.ckptid for r in rows}, [r.ckptid for r in rows]
    on_disk = sorted(p.name for p in store.rglob("ckpt-*.hck"))
    assert len(on_disk) == len(rows), on_disk
