"""Real jobs under real CRIU: checkpoint, crash, resume, fall back, one copy of a job at a time."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.criu.harness import PROGS, Cmd, hpcckpt, job_pid, kill_everything, wait_for

pytestmark = [pytest.mark.criu]
COUNTER = str(PROGS / "counter.py")


def committed(cmd: Cmd) -> list[dict[str, object]]:
    return cmd.events("checkpoint.committed")


def start_counter(work: Path, job: str, tag: str = "run", tick: str = "0.05") -> Cmd:
    return hpcckpt(["run", "--job-id", job, "--interval", "1", "--", sys.executable, COUNTER, "100000", tick],
                   work, tag, work / "store")


def consecutive(vals: list[int]) -> bool:
    return all(b == a + 1 for a, b in itertools.pairwise(vals))


def test_counter_resumes_from_checkpoint_not_zero(work: Path) -> None:
    """(a) two checkpoints, SIGKILL of everything, resume: the count goes on."""
    run = start_counter(work, "cnt")
    pid = job_pid("cnt")
    wait_for(lambda: len(committed(run)) >= 2, 60, "two checkpoints")
    kill_everything(run, pid)
    before = [int(x) for x in run.lines()]
    assert before and before[0] == 0 and consecutive(before)

    res = hpcckpt(["resume", "cnt", "--interval", "1000"], work, "resume", work / "store")
    wait_for(lambda: len(res.lines()) >= 10, 60, "output after the resume")
    res.proc.send_signal(signal.SIGTERM)
    assert res.wait(60) == 85
    after = [int(x) for x in res.lines()]
    assert after[0] > 0, "the resumed job started from 0"
    assert after[0] <= before[-1] + 1, "the resumed job skipped ahead of anything printed"
    assert after[0] - 1 in before, "the resumed job does not go on from a value the first run reached"
    assert consecutive(after)


def test_sigterm_final_checkpoint_and_exit_85(work: Path) -> None:
    """(d) SIGTERM: a final image within the deadline, exit 85, the image resumable."""
    run = hpcckpt(["run", "--job-id", "term", "--interval", "1000", "--deadline", "20", "--",
                   sys.executable, COUNTER, "100000", "0.05"], work, "run", work / "store")
    job_pid("term")
    wait_for(lambda: len(run.lines()) >= 5, 30, "the job to count")
    t0 = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(60) == 85
    assert time.monotonic() - t0 < 20
    finals = committed(run)
    assert len(finals) == 1 and finals[0]["final"] is True
    last = int(run.lines()[-1])
    res = hpcckpt(["resume", "term", "--interval", "1000"], work, "resume", work / "store")
    wait_for(lambda: len(res.lines()) >= 3, 60, "output after the resume")
    res.proc.send_signal(signal.SIGTERM)
    assert res.wait(60) == 85
    # The final image was taken after the last line was printed: nothing is lost or repeated.
    assert int(res.lines()[0]) == last + 1


def test_corrupt_latest_falls_back_to_previous(work: Path) -> None:
    """(e) a flipped byte in the latest image: resume says so and uses the one before it."""
    run = start_counter(work, "bad")
    pid = job_pid("bad")
    wait_for(lambda: len(committed(run)) >= 2, 60, "two checkpoints")
    kill_everything(run, pid)
    ids = [int(str(e["ckptid"])) for e in committed(run)]
    latest, previous = Path(str(committed(run)[-1]["path"])), ids[-2]
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    latest.write_bytes(bytes(data))

    res = hpcckpt(["resume", "bad", "--interval", "1000"], work, "resume", work / "store")
    wait_for(lambda: len(res.lines()) >= 3, 60, "output after the resume")
    res.proc.send_signal(signal.SIGTERM)
    assert res.wait(60) == 85
    err = res.err.read_text()
    assert f"checkpoint {ids[-1]} of job bad cannot be restored" in err
    assert f"resumed from checkpoint {previous}" in err
    assert int(res.lines()[0]) > 0


def test_same_image_restored_twice_at_once_runs_one_copy(work: Path) -> None:
    """(f) two simultaneous resumes of one job: exactly one runs it, the other is refused with exit 15.

    Two live copies would write the same output files and checkpoint into the same chain (issue 17).
    """
    run = start_counter(work, "twin")
    pid = job_pid("twin")
    wait_for(lambda: len(committed(run)) >= 1, 60, "a checkpoint")
    kill_everything(run, pid)
    ckpt = str(committed(run)[-1]["ckptid"])
    a = hpcckpt(["resume", "twin", "--ckpt", ckpt, "--interval", "1000"], work, "a", work / "store")
    b = hpcckpt(["resume", "twin", "--ckpt", ckpt, "--interval", "1000"], work, "b", work / "store")
    loser = wait_for(lambda: next((c for c in (a, b) if c.proc.poll() is not None), None), 120,
                     "one of the two resumes to be refused")
    winner = b if loser is a else a
    assert loser.proc.returncode == 15, loser.err.read_text()[-2000:]
    assert "already running" in loser.err.read_text()
    assert loser.lines() == [], "the refused resume ran the job anyway"
    wait_for(lambda: len(winner.lines()) >= 20, 60, "the one restored job to count")
    assert winner.proc.poll() is None
    winner.proc.send_signal(signal.SIGTERM)
    assert winner.wait(60) == 85
    lines = [int(x) for x in winner.lines()]
    assert lines[0] > 0 and consecutive(lines)


@pytest.mark.slow
def test_process_tree_output_equals_uninterrupted(work: Path) -> None:
    """(b) parent + 3 piped children + thread pool + appended file: killed and resumed = uninterrupted."""
    steps = "120"
    ref = work / "ref.txt"
    subprocess.run([sys.executable, str(PROGS / "tree.py"), str(ref), steps, "0"], check=True, timeout=120)
    out = work / "tree.txt"
    run = hpcckpt(["run", "--job-id", "tree", "--interval", "1", "--", sys.executable, str(PROGS / "tree.py"),
                   str(out), steps, "0.05"], work, "run", work / "store")
    pid = job_pid("tree")
    wait_for(lambda: len(committed(run)) >= 1, 60, "a checkpoint")
    time.sleep(0.5)  # let the file grow past the checkpoint, so the restore must cut it back
    kill_everything(run, pid)
    assert 0 < len(out.read_text().splitlines()) < int(steps)
    res = hpcckpt(["resume", "tree", "--interval", "1000"], work, "resume", work / "store")
    assert res.wait(180) == 0, res.err.read_text()[-2000:]
    assert out.read_text() == ref.read_text()


@pytest.mark.slow
def test_numpy_512mib_bit_identical(work: Path) -> None:
    """(c) 512 MiB of numpy state, 3 checkpoints, killed, resumed: the same digest as an uninterrupted run."""
    pytest.importorskip("numpy")
    args = ["512", "150", "0.2"]
    ref = work / "ref.sha"
    subprocess.run([sys.executable, str(PROGS / "numpy_job.py"), str(ref), *args], check=True, timeout=300)
    out = work / "out.sha"
    run = hpcckpt(["run", "--job-id", "np", "--interval", "1", "--", sys.executable,
                   str(PROGS / "numpy_job.py"), str(out), *args], work, "run", work / "store")
    pid = job_pid("np")
    wait_for(lambda: len(committed(run)) >= 3, 240, "three checkpoints", every=0.5)
    kill_everything(run, pid)
    assert not out.exists()
    res = hpcckpt(["resume", "np", "--interval", "1000"], work, "resume", work / "store")
    assert res.wait(300) == 0, res.err.read_text()[-2000:]
    assert out.read_text() == ref.read_text()
    assert os.path.getsize(out) == 65
