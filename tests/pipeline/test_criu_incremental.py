"""Incremental images of real CRIU dumps: pack the 2nd dump against the 1st, unpack, restore."""

from __future__ import annotations

import contextlib
import filecmp
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hpcckpt.image import ImageMeta, pack_dir, unpack_image, verify_image

CRIU = os.environ.get("HPCCKPT_CRIU") or shutil.which("criu") or "/usr/local/sbin/criu"
MiB = 1 << 20

pytestmark = [
    pytest.mark.criu,
    pytest.mark.skipif(os.geteuid() != 0, reason="criu dump needs root here"),
    pytest.mark.skipif(not os.path.exists(CRIU), reason="criu is not installed"),
]

# 64 MiB of random bytes (incompressible, so refs are the only saving); on
# SIGUSR1 it rewrites 2 MiB of it (about 3%) and says so in a file.
SCRIPT = """
import mmap, os, signal, sys, time
buf = mmap.mmap(-1, 64 << 20)
buf[:] = os.urandom(64 << 20)
def change(*_):
    buf[8 << 20 : 10 << 20] = os.urandom(2 << 20)
    open(sys.argv[1], "w").write("changed")
signal.signal(signal.SIGUSR1, change)
open(sys.argv[1], "w").write("ready")
while True:
    time.sleep(0.05)
"""


def _meta(ckptid: int) -> ImageMeta:
    return ImageMeta(ckptid=ckptid, job_id="criu-inc", engine="criu", uid=0, user="root")


def _wait_for(path: Path, text: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.exists() and path.read_text() == text:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never said {text!r}")


def _dump(pid: int, dest: Path) -> None:
    dest.mkdir()
    res = subprocess.run([CRIU, "dump", "-t", str(pid), "-D", str(dest), "-o", "dump.log", "--shell-job",
                          "--leave-running"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, (dest / "dump.log").read_text()[-3000:]
    (dest / "dump.log").unlink()  # the log differs between dumps and is not part of the image


@pytest.fixture
def two_dumps(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    flag = tmp_path / "flag"
    outer = subprocess.Popen(["unshare", "-p", "-f", "setsid", "python3", "-c", SCRIPT, str(flag)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = 0
    try:
        _wait_for(flag, "ready")
        pid = psutil.Process(outer.pid).children()[0].pid
        _dump(pid, tmp_path / "d1")
        os.kill(pid, signal.SIGUSR1)
        _wait_for(flag, "changed")
        _dump(pid, tmp_path / "d2")
        yield tmp_path / "d1", tmp_path / "d2"
    finally:
        # unshare does not take its child with it: end the job's pid 1 (the namespace) first.
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if outer.poll() is None:
            outer.kill()
        outer.wait()


def test_incremental_criu_image_unpacks_identical_and_restores(two_dumps: tuple[Path, Path], tmp_path: Path) -> None:
    d1, d2 = two_dumps
    images = {1: tmp_path / "ckpt-1.hck", 2: tmp_path / "ckpt-2.hck"}
    with open(images[1], "wb") as f:
        full = pack_dir(d1, f, _meta(1), codec="lz4", chunk_size=MiB)
    with open(images[2], "wb") as f:
        inc = pack_dir(d2, f, _meta(2), codec="lz4", chunk_size=MiB, parent=full.index)
    # 2 MiB of 64 changed: most of the memory must have become references
    assert inc.ref_bytes >= 48 * MiB, inc
    assert inc.bytes_out < full.bytes_out * 0.25
    summary = verify_image(images[2], images.__getitem__)
    assert summary.parents == [1] and summary.parents_verified
    out = tmp_path / "restore"
    unpack_image(images[2], out, images.__getitem__)
    names = sorted(p.name for p in d2.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(d2, out, names, shallow=False)
    assert (mismatch, errors) == ([], []) and sorted(match) == names
    pidfile = tmp_path / "restored.pid"
    res = subprocess.run([CRIU, "restore", "-D", str(out), "-o", "restore.log", "--shell-job", "-d",
                          "--pidfile", str(pidfile)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, (out / "restore.log").read_text()[-3000:]
    pid = int(pidfile.read_text())
    try:
        assert psutil.Process(pid).is_running()
    finally:
        os.kill(pid, signal.SIGKILL)
