"""Lazy restores under real CRIU: the job runs before its memory is in, and the result is still exact.

A numpy job holding hundreds of MiB is checkpointed by ``hpcckpt run``,
killed with its runner (a node crash), and resumed with ``restore.lazy:
on``: ``criu restore --lazy-pages`` with ``criu lazy-pages`` asking our page
server (hpcckpt.criu.pageserver) for every page, which answers from the
image, chunk by checked chunk. The job's final digest must equal that of an
uninterrupted run of the same program.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hpcckpt.catalog import open_catalog
from hpcckpt.context import current_user
from hpcckpt.core.resume import Resumer
from hpcckpt.criu.engine import Criu
from hpcckpt.criu.interface import DumpOptions, RestoreResult
from hpcckpt.errors import EngineError
from hpcckpt.image import format as F
from tests.criu.harness import PROGS, Cmd, hpcckpt, job_pid, kill_everything, wait_for
from tests.criu.test_stream_restore import page_chunks

pytestmark = [pytest.mark.criu]
NUMPY_JOB = str(PROGS / "numpy_job.py")


def reference(work: Path, size: int, steps: int) -> str:
    """The digest of an uninterrupted run (the program is deterministic; no tick needed)."""
    out = work / "reference.txt"
    subprocess.run([sys.executable, NUMPY_JOB, str(out), str(size), str(steps), "0"], check=True, timeout=300)
    return out.read_text().strip()


def run_job(work: Path, job: str, pol: Path, size: int, steps: int, checkpoints: int) -> tuple[Cmd, Path]:
    out = work / f"{job}.digest"
    run = hpcckpt(["run", "--job-id", job, "--interval", "1", "--policy", str(pol), "--", sys.executable, NUMPY_JOB,
                   str(out), str(size), str(steps), "0.15"], work, "run", work / "store")
    pid = job_pid(job)
    wait_for(lambda: run.lines(), 120, "the job's first step")  # its whole array exists: the images hold it all
    before = len(run.events("checkpoint.committed")) + 1  # one may have been dumped before that step
    wait_for(lambda: len(run.events("checkpoint.committed")) >= before + checkpoints, 180,
             f"{checkpoints} checkpoints")
    kill_everything(run, pid)
    assert not out.exists(), "the job finished before it was killed: give it more steps"
    return run, out


def resume(work: Path, job: str, pol: Path, interval: str = "1000") -> Cmd:
    res = hpcckpt(["resume", job, "--interval", interval, "--policy", str(pol)], work, "resume", work / "store")
    assert res.wait(300) == 0, res.err.read_text()[-3000:]
    return res


def test_a_lazily_resumed_512_mib_job_ends_bit_identical_to_an_uninterrupted_run(work: Path) -> None:
    pol = work / "policy.yaml"
    pol.write_text("restore:\n  lazy: \"on\"\n")
    _run, out = run_job(work, "lz512", pol, 512, 60, 1)
    res = resume(work, "lz512", pol)
    restored = res.events("resume.restored")
    assert len(restored) == 1 and restored[0]["lazy"] is True
    started, resident = res.events("lazy.started"), res.events("lazy.resident")
    assert started and started[0]["lazy_bytes"] >= 500 << 20, "the job's memory did not come lazily"
    assert resident, "the lazy restore never reported every page resident"
    assert out.read_text().strip() == reference(work, 512, 60)


def test_a_corrupt_chunk_found_while_the_job_runs_kills_it_and_the_previous_image_finishes_it(work: Path) -> None:
    pol = work / "policy.yaml"
    pol.write_text("restore:\n  lazy: \"on\"\npipeline:\n  incremental: false\n")  # every image stores its pages
    run, out = run_job(work, "lzbad", pol, 384, 60, 2)
    done = run.events("checkpoint.committed")
    latest, previous = Path(str(done[-1]["path"])), int(str(done[-2]["ckptid"]))
    chunks = page_chunks(latest)
    bad = chunks[len(chunks) // 2]  # the middle of the job's array: served lazily, not before the job runs
    raw = bytearray(latest.read_bytes())
    raw[bad + F.RECORD_HEADER.size + F.CHUNK.size + 100] ^= 0x01
    latest.write_bytes(bytes(raw))

    res = resume(work, "lzbad", pol)
    events = [e for e in res.events() if e.get("event") in ("resume.restored", "lazy.failed", "resume.lazy_fallback")]
    names = [e["event"] for e in events]
    # The job was running (restored lazily from the latest image) when the chunk was found bad.
    assert names[:3] == ["resume.restored", "lazy.failed", "resume.lazy_fallback"], names
    assert events[0]["ckptid"] == done[-1]["ckptid"] and events[0]["lazy"] is True
    assert f"{latest}, offset {bad}" in str(events[1]["msg"]) and "checksum mismatch" in str(events[1]["msg"])
    assert "resumes from the checkpoint before it" in str(events[2]["msg"])
    again = [e for e in events[3:] if e["event"] == "resume.restored"]
    assert again and again[0]["ckptid"] == previous
    assert out.read_text().strip() == reference(work, 384, 60)


def test_an_incremental_chain_restores_lazily(work: Path) -> None:
    pol = work / "policy.yaml"
    pol.write_text("restore:\n  lazy: \"on\"\npipeline:\n  full_every: 50\n  max_chain_ratio: 100\n")
    # 100 steps of 0.15 s: room for three checkpoints of 256 MiB on a loaded machine before the job ends
    run, out = run_job(work, "lzchain", pol, 256, 100, 3)
    done = run.events("checkpoint.committed")
    assert done[-1]["parent"] is not None, "the latest image is not incremental"
    res = resume(work, "lzchain", pol, interval="1")  # checkpoints fall due while pages still come
    restored = res.events("resume.restored")
    assert restored[0]["ckptid"] == done[-1]["ckptid"] and restored[0]["lazy"] is True
    resident, waited = res.events("lazy.resident"), res.events("checkpoint.waited_resident")
    assert resident, "the lazily restored memory never came in"
    # A checkpoint that fell due while pages still came waited for them (whether one fell due depends on
    # how fast the pages came: under load the first interval can end after they are all in).
    assert all(str(w["ts"]) >= str(resident[0]["ts"]) for w in waited), "a dump started before all pages were in"
    after = res.events("checkpoint.committed")
    assert after and str(after[0]["ts"]) >= str(resident[0]["ts"])
    assert after[0]["parent"] == done[-1]["ckptid"], "the next checkpoint did not chain on"
    assert out.read_text().strip() == reference(work, 256, 100)


class FailingStore:
    """The job's store directory served back through FUSE (tests/criu/failfs.py), whose reads can be failed.

    Nothing is faked in hpcckpt: the kernel returns EIO to its reads, as for a
    disk or a network filesystem that stopped answering.
    """

    def __init__(self, job_dir: Path, work: Path) -> None:
        self.mount = job_dir
        self.backing = work / "backing"
        self.control = work / "failfs.control"
        self.control.write_text("")
        job_dir.rename(self.backing)
        job_dir.mkdir(mode=0o700)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("failfs.py")), str(self.backing),
                                      str(job_dir), str(self.control)], stdin=subprocess.DEVNULL)
        wait_for(lambda: os.path.ismount(job_dir) or self.proc.poll() is not None, 30, "the FUSE mount")
        assert self.proc.poll() is None, "failfs.py did not mount"

    def fail(self, name: str, lo: int, hi: int) -> None:
        self.control.write_text(f"{name} {lo} {hi}")

    def close(self) -> None:
        subprocess.run(["fusermount", "-u", str(self.mount)], check=False, timeout=60)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def test_a_store_that_stops_answering_during_the_prefetch_kills_the_job_and_the_previous_image_finishes_it(
        work: Path) -> None:
    if shutil.which("fusermount") is None or not Path("/dev/fuse").exists():
        pytest.skip("needs FUSE (fusermount, /dev/fuse; scripts/setup.sh installs fuse and libfuse2)")
    pytest.importorskip("fuse", reason="needs fusepy (the test extra)")
    pol = work / "policy.yaml"
    pol.write_text("restore:\n  lazy: \"on\"\npipeline:\n  incremental: false\n")
    run, out = run_job(work, "lzeio", pol, 256, 60, 2)
    done = run.events("checkpoint.committed")
    latest, previous = Path(str(done[-1]["path"])), int(str(done[-2]["ckptid"]))
    chunks = page_chunks(latest)
    rec = chunks[len(chunks) // 2]
    store = FailingStore(latest.parent, work)
    try:
        # Inside the chunk's data only: the record headers, read before CRIU starts, stay readable; the
        # data is read by the prefetch (or a fault) once the job runs.
        data = rec + F.RECORD_HEADER.size + F.CHUNK.size
        store.fail(latest.name, data + 4096, data + 8192)
        res = resume(work, "lzeio", pol)
        events = [e for e in res.events() if e.get("event") in ("resume.restored", "lazy.failed",
                                                                 "resume.lazy_fallback")]
        names = [e["event"] for e in events]
        assert names[:3] == ["resume.restored", "lazy.failed", "resume.lazy_fallback"], names
        assert events[0]["ckptid"] == done[-1]["ckptid"] and events[0]["lazy"] is True
        assert "read error" in str(events[1]["msg"]) and str(latest) in str(events[1]["msg"])
        again = [e for e in events[3:] if e["event"] == "resume.restored"]
        assert again and again[0]["ckptid"] == previous
        assert out.read_text().strip() == reference(work, 256, 60)
    finally:
        store.close()


class LazyRefusingCriu(Criu):
    """Real CRIU, except that ``criu restore --lazy-pages`` is refused, as a node without userfaultfd would."""

    def restore(self, images_dir: Path, **kw: Any) -> RestoreResult:
        if kw.get("lazy_pages"):
            raise EngineError("criu restore failed (exit 1): Lazy pages are not available: Operation not permitted")
        return super().restore(images_dir, **kw)


def test_criu_refusing_the_lazy_restore_restores_the_same_image_streamed(work: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    pol = work / "policy.yaml"
    pol.write_text("restore:\n  lazy: \"on\"\n")
    run, _out = run_job(work, "lzref", pol, 128, 200, 1)
    latest = run.events("checkpoint.committed")[-1]
    me = current_user()
    catalog = open_catalog(None, work / "store", me)
    resumer = Resumer(engine=LazyRefusingCriu(Criu.locate().path), catalog=catalog, user=me,
                      disk_staging=work / "staging", options=DumpOptions(), lazy="on")
    try:
        with caplog.at_level(logging.INFO):
            restored = resumer.resume("lzref")
        try:
            assert restored.ckptid == latest["ckptid"] and restored.lazy is None and restored.streamed
            assert restored.fallbacks == []  # the same image, not an older one
            assert any("restoring it streamed" in r.getMessage() for r in caplog.records)
        finally:
            os.kill(restored.pid, signal.SIGKILL)
            os.waitpid(restored.pid, 0)
            for fd in (restored.pipes.out_r, restored.pipes.err_r):
                os.close(fd)
    finally:
        catalog.close()
