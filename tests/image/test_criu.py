"""Real CRIU dumps survive pack and unpack byte for byte, and restore from the unpacked copy."""

from __future__ import annotations

import filecmp
import io
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hpcckpt.image import TaskInfo, pack_dir, unpack_image, verify_image
from tests.image.conftest import meta

CRIU = os.environ.get("HPCCKPT_CRIU") or shutil.which("criu") or "/usr/local/sbin/criu"

pytestmark = [
    pytest.mark.criu,
    pytest.mark.skipif(os.geteuid() != 0, reason="criu dump needs root here"),
    pytest.mark.skipif(not os.path.exists(CRIU), reason="criu is not installed"),
]


def _inner_pid(outer: subprocess.Popen[bytes]) -> int:
    # unshare -f forks: the process to dump is its child, pid 1 of the new namespace
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kids = psutil.Process(outer.pid).children()
        if kids and kids[0].name() == "python3":
            return kids[0].pid
        time.sleep(0.05)
    raise AssertionError("the namespaced process did not start")


@pytest.fixture
def dumped(tmp_path: Path) -> Iterator[Path]:
    """A CRIU dump of a small python process (pid 1 in its own PID namespace)."""
    script = "import time\nx = bytearray(b'hpcckpt' * 300000)\nwhile True: time.sleep(0.1)\n"
    outer = subprocess.Popen(
        ["unshare", "-p", "-f", "setsid", "python3", "-c", script],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        pid = _inner_pid(outer)
        dump = tmp_path / "dump"
        dump.mkdir()
        res = subprocess.run(
            [CRIU, "dump", "-t", str(pid), "-D", str(dump), "-o", "dump.log", "--shell-job"],
            capture_output=True, text=True, timeout=120,
        )
        assert res.returncode == 0, (dump / "dump.log").read_text()[-3000:]
        yield dump
    finally:
        if outer.poll() is None:
            outer.kill()
        outer.wait()


def test_criu_dump_roundtrip_byte_identical(dumped: Path, tmp_path: Path) -> None:
    files = sorted(p.name for p in dumped.iterdir())
    assert any(n.startswith("pages-") for n in files) and "inventory.img" in files
    for codec in ("none", "zstd", "lz4"):
        image = tmp_path / f"ckpt-{codec}.hck"
        with open(image, "wb") as f:
            stats = pack_dir(dumped, f, meta(engine="criu"), codec=codec, tasks=[TaskInfo(1, 0, 1, 1, "python3", [])])
        assert stats.bytes_out == image.stat().st_size
        s = verify_image(image)
        assert sorted(x.name for x in s.sections) == files
        out = tmp_path / f"out-{codec}"
        unpack_image(image, out)
        match, mismatch, errors = filecmp.cmpfiles(dumped, out, files, shallow=False)
        assert (mismatch, errors) == ([], []) and sorted(match) == files
        if codec == "zstd":  # the process's repeated bytes must have compressed
            assert stats.bytes_out < stats.bytes_in / 2


def test_criu_restores_from_unpacked_image(dumped: Path, tmp_path: Path) -> None:
    buf = io.BytesIO()
    pack_dir(dumped, buf, meta(engine="criu"), codec="zstd")
    out = tmp_path / "restore"
    unpack_image(io.BytesIO(buf.getvalue()), out)
    pidfile = tmp_path / "restored.pid"
    res = subprocess.run(
        [CRIU, "restore", "-D", str(out), "-o", "restore.log", "--shell-job", "-d", "--pidfile", str(pidfile)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, (out / "restore.log").read_text()[-3000:]
    pid = int(pidfile.read_text())
    try:
        proc = psutil.Process(pid)
        assert proc.is_running() and "python3" in proc.name()
    finally:
        os.kill(pid, signal.SIGKILL)
