"""Open files' sizes at the freeze, from CRIU's own images, with the job left running.

The real-CRIU tests dump a process that holds files open in every mode and
keeps writing after the dump; the recorded sizes must be the sizes at the
freeze, not the sizes afterwards. The pure-logic tests pin down which side
(/proc or the images) each recorded field comes from.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hpcckpt.catalog import open_catalog
from hpcckpt.context import current_user
from hpcckpt.core.checkpoint import CriuCheckpointer, JobInfo
from hpcckpt.core.pipeline.flush import FlushSettings, StorePublisher
from hpcckpt.criu import images as criuimg
from hpcckpt.criu import procinfo
from hpcckpt.criu.engine import Criu
from hpcckpt.criu.images import DumpedFile
from hpcckpt.criu.interface import DumpOptions
from hpcckpt.criu.procinfo import FdState, TreeSnapshot
from hpcckpt.image.errors import CorruptImageError
from hpcckpt.jobid import JobIdentity
from hpcckpt.store.images import Store

# The job: opens R (read), W (write, not append), RW (read-write), A (append) and D (deleted),
# says "ready", then on every SIGUSR1 writes one more line to W, RW and A ("grows after the dump").
HOLDER = r"""
import os, signal, sys, time
d = sys.argv[1]
r = open(os.path.join(d, "r.txt"), "rb", buffering=0)
w = open(os.path.join(d, "w.txt"), "wb", buffering=0)
rw = open(os.path.join(d, "rw.txt"), "r+b", buffering=0)
a = open(os.path.join(d, "a.txt"), "ab", buffering=0)
gone = open(os.path.join(d, "gone.txt"), "wb", buffering=0)
os.unlink(os.path.join(d, "gone.txt"))
r.read(3)
w.write(b"w-line\n" * 3)
rw.seek(0, 2); rw.write(b"rw-line\n")
a.write(b"a-line\n" * 5)
def grow(*_):
    for f in (w, rw, a):
        f.write(b"grown after the dump\n")
    open(os.path.join(d, "grown"), "w").write("1")
signal.signal(signal.SIGUSR1, grow)
open(os.path.join(d, "ready"), "w").write("1")
while True:
    time.sleep(0.02)
"""

# Appends a numbered line every millisecond, for as long as it runs.
WRITER = r"""
import sys, time
with open(sys.argv[1], "a") as f:
    i = 0
    while True:
        f.write(f"{i:08d}\n"); f.flush(); i += 1
        time.sleep(0.001)
"""


def wait_file(path: Path, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)


def spawn(script: str, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    """The job as pid 1 and session leader of its own PID namespace, as the runner starts it."""
    outer = subprocess.Popen(["unshare", "-p", "-f", "setsid", sys.executable, "-c", script, *args],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        kids = psutil.Process(outer.pid).children()
        if kids:
            return outer, kids[0].pid
        time.sleep(0.02)
    raise AssertionError("job did not start")


def stop(outer: subprocess.Popen[bytes], pid: int) -> None:
    for p in reversed(procinfo.tree_pids(pid)):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    outer.kill()
    outer.wait(10)


def state(pid: int) -> str:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2]


@pytest.fixture
def holder(tmp_path: Path, criu_ok: None) -> Iterator[tuple[Path, int]]:
    d = tmp_path / "files"
    d.mkdir()
    (d / "r.txt").write_bytes(b"read me\n" * 100)
    (d / "rw.txt").write_bytes(b"x" * 10)
    (d / "a.txt").write_bytes(b"before\n")
    outer, pid = spawn(HOLDER, str(d))
    wait_file(d / "ready")
    yield d, pid
    stop(outer, pid)


@pytest.mark.criu
def test_dumped_files_are_the_sizes_at_the_freeze(holder: tuple[Path, int], tmp_path: Path) -> None:
    d, pid = holder
    sizes = {n: (d / n).stat().st_size for n in ("r.txt", "w.txt", "rw.txt", "a.txt")}
    snap = procinfo.snapshot(pid)
    images = tmp_path / "dump"
    images.mkdir()
    Criu.locate().dump(pid, images, options=DumpOptions(), after="running")
    assert state(pid) != "T", "the job was left stopped"
    os.kill(pid, signal.SIGUSR1)  # the job runs on and its files grow past what was dumped
    wait_file(d / "grown")
    assert (d / "a.txt").stat().st_size > sizes["a.txt"]

    dumped = {Path(f.path).name: f for f in criuimg.dumped_files(images)}
    assert {"r.txt", "w.txt", "rw.txt", "a.txt", "gone.txt"} <= set(dumped)
    assert all(f.pid == 1 for f in dumped.values())  # pids inside the job's namespace
    assert dumped["r.txt"].size == sizes["r.txt"] and dumped["r.txt"].pos == 3
    assert dumped["r.txt"].flags & os.O_ACCMODE == os.O_RDONLY
    assert dumped["w.txt"].size == sizes["w.txt"] == 21
    assert dumped["rw.txt"].size == sizes["rw.txt"] == 18
    # CRIU records (and checks) no size for O_WRONLY|O_APPEND: the offset after the last append stands in.
    assert dumped["a.txt"].size is None and dumped["a.txt"].flags & os.O_APPEND
    assert dumped["a.txt"].pos == sizes["a.txt"]
    assert dumped["gone.txt"].remapped

    files = {Path(f.path).name: f for f in procinfo.files_at_dump(snap, list(dumped.values()))}
    assert "gone.txt" not in files  # deleted: CRIU restores its own copy, there is no path to check
    assert {n: files[n].size for n in sizes} == sizes
    assert {n: files[n].mode for n in sizes} == {"r.txt": "r", "w.txt": "w", "rw.txt": "rw", "a.txt": "a"}
    assert all(f.pid == pid for f in files.values())  # back to host pids
    st = (d / "r.txt").stat()
    assert (files["r.txt"].inode, files["r.txt"].dev, files["r.txt"].mtime_ns) == (st.st_ino, st.st_dev,
                                                                                   st.st_mtime_ns)


@pytest.mark.criu
def test_corrupt_files_img_names_file_and_offset(holder: tuple[Path, int], tmp_path: Path) -> None:
    _d, pid = holder
    images = tmp_path / "dump"
    images.mkdir()
    Criu.locate().dump(pid, images, options=DumpOptions(), after="running")
    files_img = images / "files.img"
    data = bytearray(files_img.read_bytes())
    struct.pack_into("<I", data, 8, len(data))  # the first entry claims more bytes than the file has
    files_img.write_bytes(bytes(data))
    with pytest.raises(CorruptImageError) as err:
        criuimg.dumped_files(images)
    assert str(files_img) in str(err.value) and "offset 8" in str(err.value)


@pytest.mark.criu
def test_stage_leaves_job_running_and_records_the_frozen_size(tmp_path: Path, criu_ok: None) -> None:
    """A job appending every millisecond: the recorded size ends on a whole line, and the job never stops."""
    out = tmp_path / "out.txt"
    outer, pid = spawn(WRITER, str(out))
    try:
        wait_file(out)
        me = current_user()
        store = Store(tmp_path / "store", me)
        job = JobInfo(identity=JobIdentity("freeze", "cli"), user=me, cmdline=["w"], cwd="/", stdio={},
                      interval=None)
        ck = CriuCheckpointer(engine=Criu.locate(), store=store, catalog=open_catalog(None, store.root, me), job=job,
                          options=DumpOptions(), flush=FlushSettings(),
                          publisher=StorePublisher(store, lambda: open_catalog(None, store.root, me)),
                          disk_staging=tmp_path / "staging", tmpfs=None)
        taken = ck.stage(pid)
        assert state(pid) != "T"
        rec = [f for f in taken.staged.files if f.path == str(out)]
        assert len(rec) == 1 and rec[0].mode == "a"
        text = out.read_bytes()
        assert rec[0].size % 9 == 0 and 0 < rec[0].size <= len(text)
        assert text[: rec[0].size].endswith(b"\n")
        taken.staged.remove()

        final = ck.stage(pid, final=True)  # a final checkpoint's tree stays stopped until its commit
        assert state(pid) == "T"
        procinfo_pids = procinfo.tree_pids(pid)
        for p in procinfo_pids:
            os.kill(p, signal.SIGCONT)
        final.staged.remove()
        ck.finish(10)
    finally:
        stop(outer, pid)


# --- pure logic: which side each field comes from --------------------------------------


def _st(path: str, size: int, flags: int = os.O_WRONLY | os.O_APPEND) -> FdState:
    return FdState(path=path, flags=flags, size=size, mtime_ns=7, inode=11, dev=3)


def test_files_at_dump_takes_paths_and_modes_from_proc_and_sizes_from_criu() -> None:
    snap = TreeSnapshot(root=100, fds={
        (100, 3): _st("/out/a", 50),  # append: CRIU has no size, offset 80 > 50 seen before the dump
        (100, 4): _st("/out/b", 90),  # append: offset 0 (opened by C's fopen("a"), not written yet)
        (100, 5): _st("/in/r", 10, os.O_RDONLY),
        (100, 6): _st("/etc/other", 10, os.O_RDONLY),  # CRIU says fd 6 is another path: the image is not trusted
    }, host_pids={1: 100})
    dumped = [
        DumpedFile(1, 3, "/out/a", os.O_WRONLY | os.O_APPEND, 80, None),
        DumpedFile(1, 4, "/out/b", os.O_WRONLY | os.O_APPEND, 0, None),
        DumpedFile(1, 5, "/in/r", os.O_RDWR, 0, 10),  # flags in the image claim rw: /proc's "r" wins
        DumpedFile(1, 6, "/etc/shadow", os.O_RDWR, 0, 0),
        DumpedFile(1, 9, "/gone", os.O_RDWR, 0, 5, remapped=True),
    ]
    got = procinfo.files_at_dump(snap, dumped, late_fd=lambda pid, fd: None, late_pid=lambda root, v: None)
    assert [(f.path, f.size, f.mode, f.pid) for f in got] == [
        ("/out/a", 80, "a", 100), ("/out/b", 90, "a", 100), ("/in/r", 10, "r", 100),
    ]


def test_files_at_dump_looks_again_for_what_was_opened_after_the_snapshot() -> None:
    snap = TreeSnapshot(root=100, host_pids={1: 100})
    late = {(100, 3): _st("/out/new", 999), (200, 4): _st("/out/child", 5, os.O_RDWR)}
    dumped = [
        DumpedFile(1, 3, "/out/new", os.O_WRONLY | os.O_APPEND, 40, None),  # grown since: the offset, not 999
        DumpedFile(2, 4, "/out/child", os.O_RDWR, 0, 4),  # a task forked after the snapshot
        DumpedFile(3, 5, "/out/x", os.O_RDWR, 0, 4),  # a task that is gone: nothing to vouch for it
    ]
    got = procinfo.files_at_dump(snap, dumped, late_fd=lambda pid, fd: late.get((pid, fd)),
                                 late_pid=lambda root, v: {2: 200}.get(v))
    assert [(f.path, f.size, f.pid) for f in got] == [("/out/new", 40, 100), ("/out/child", 4, 200)]
