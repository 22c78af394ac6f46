"""Streamed restores under real CRIU: a bad page chunk found while CRIU reads, and the unpacking fallback mode."""

from __future__ import annotations

import fnmatch
import signal
import sys
from pathlib import Path

import pytest

from hpcckpt.image import format as F
from tests.criu.harness import PROGS, Cmd, hpcckpt, job_pid, kill_everything, wait_for

pytestmark = [pytest.mark.criu]
COUNTER = str(PROGS / "counter.py")


def page_chunks(image: Path) -> list[int]:
    """Record offsets of the CHUNK records (stored data, not refs) of the image's pages-*.img sections."""
    data = image.read_bytes()
    off, section, out = F.PREAMBLE.size, "", []
    while off < len(data):
        rtype, _, length, _ = F.RECORD_HEADER.unpack_from(data, off)
        body = off + F.RECORD_HEADER.size
        if rtype == F.T_SECTION_BEGIN:
            section = data[body + F.SECTION_BEGIN.size : body + length].decode()
        elif rtype == F.T_CHUNK and fnmatch.fnmatchcase(section, "pages-*.img") and length > F.CHUNK.size:
            out.append(off)
        off = body + length
    return out


def counter(work: Path, job: str, pol: Path) -> Cmd:
    return hpcckpt(["run", "--job-id", job, "--interval", "1", "--policy", str(pol), "--", sys.executable, COUNTER,
                    "100000", "0.05"], work, "run", work / "store")


def resume_and_stop(work: Path, job: str, pol: Path) -> Cmd:
    res = hpcckpt(["resume", job, "--interval", "1000", "--policy", str(pol)], work, "resume", work / "store")
    wait_for(lambda: len(res.lines()) >= 3, 60, "output after the resume")
    res.proc.send_signal(signal.SIGTERM)
    assert res.wait(60) == 85, res.err.read_text()[-2000:]
    return res


def test_bad_page_chunk_is_caught_while_criu_reads_and_the_previous_image_is_used(work: Path) -> None:
    pol = work / "policy.yaml"
    pol.write_text("pipeline:\n  incremental: false\n")  # every image stores its own pages
    run = counter(work, "sbad", pol)
    pid = job_pid("sbad")
    wait_for(lambda: len(run.events("checkpoint.committed")) >= 2, 60, "two checkpoints")
    kill_everything(run, pid)
    done = run.events("checkpoint.committed")
    latest, previous = Path(str(done[-1]["path"])), int(str(done[-2]["ckptid"]))
    chunks = page_chunks(latest)
    assert chunks, "the latest image stores no page data"
    bad = chunks[len(chunks) // 2]
    raw = bytearray(latest.read_bytes())
    raw[bad + F.RECORD_HEADER.size + F.CHUNK.size + 100] ^= 0x01  # one bit of the job's memory
    latest.write_bytes(bytes(raw))

    res = resume_and_stop(work, "sbad", pol)
    err = res.err.read_text()
    # Found by the streamer, chunk by chunk, while criu restored: the image's structure was sound.
    assert f"{latest}, offset {bad}" in err and "chunk checksum mismatch" in err
    restored = res.events("resume.restored")
    assert restored[0]["ckptid"] == previous and restored[0]["streamed"] is True
    after = [int(x) for x in res.lines()]
    assert after[0] > 0 and after == list(range(after[0], after[0] + len(after)))


def test_restore_stream_false_unpacks_first(work: Path) -> None:
    pol = work / "policy.yaml"
    pol.write_text("restore:\n  stream: false\n")
    run = counter(work, "sunp", pol)
    pid = job_pid("sunp")
    wait_for(lambda: len(run.events("checkpoint.committed")) >= 1, 60, "a checkpoint")
    kill_everything(run, pid)
    res = resume_and_stop(work, "sunp", pol)
    assert res.events("resume.restored")[0]["streamed"] is False
    assert int(res.lines()[0]) > 0
