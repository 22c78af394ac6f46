"""Progress on long image work: a meter at a terminal, nothing in batch logs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcckpt.image import ImageMeta, pack_dir, verify_image
from hpcckpt.progress import terminal_progress

REPO = Path(__file__).resolve().parent.parent


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def image(tmp_path: Path) -> Path:
    src = tmp_path / "dump"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(3 << 20))
    (src / "core-1.img").write_bytes(b"core" * 100)
    out = tmp_path / "ckpt-1.hck"
    with open(out, "wb") as f:
        pack_dir(src, f, ImageMeta(ckptid=1, job_id="p", engine="criu"), chunk_size=1 << 20)
    return out


def test_meter_counts_every_byte_of_the_image_at_a_terminal(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HPCCKPT_PROGRESS", raising=False)
    tty = Tty()
    with terminal_progress("verify", tty) as meter:
        assert meter is not None
        verify_image(image)
    line = tty.getvalue().split("\r\x1b[K")[-1]
    assert line.startswith(f"verify {image.name}: 100%") and line.endswith("\n")
    assert meter.done == image.stat().st_size


def test_no_meter_off_a_terminal(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HPCCKPT_PROGRESS", raising=False)
    pipe = io.StringIO()
    with terminal_progress("verify", pipe) as meter:
        assert meter is None
        verify_image(image)
    assert pipe.getvalue() == ""


@pytest.mark.parametrize(("mode", "shown"), [("always", True), (None, False)])
def test_cli_verify_progress(image: Path, mode: str | None, shown: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HPCCKPT_PROGRESS"}
    env["PYTHONPATH"] = str(REPO)
    if mode:
        env["HPCCKPT_PROGRESS"] = mode
    proc = subprocess.run([sys.executable, "-m", "hpcckpt", "verify", str(image)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert ("100%" in proc.stderr) is shown
    assert "100%" not in proc.stdout, "progress never mixes into the command's output"
