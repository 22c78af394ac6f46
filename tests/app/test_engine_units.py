"""Logic of the app engines' wiring: the request channel, what a relaunch records, the engine choice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpcckpt.app.engines import engine_factory, engine_record
from hpcckpt.app.requests import CHECKPOINT, STOP, RequestReader, RequestWriter
from hpcckpt.core.runner.relaunch import kept_environment
from hpcckpt.errors import PolicyError, UsageError


def test_requests_are_read_once_and_a_half_written_line_waits(tmp_path: Path) -> None:
    w = RequestWriter("job/with odd:name", directory=str(tmp_path))
    try:
        assert w.path.parent == tmp_path and "/" not in w.path.name.removeprefix("hpcckpt-")
        assert (w.path.stat().st_mode & 0o777) == 0o600
        r = RequestReader(str(w.path))
        assert r.poll() == set()
        w.send(CHECKPOINT)
        assert r.poll() == {CHECKPOINT}
        assert r.poll() == set()  # read once
        with open(w.path, "ab") as fh:
            fh.write(b"st")  # a writer caught mid-line
        assert r.poll() == set()
        with open(w.path, "ab") as fh:
            fh.write(b"op\n")
        assert r.poll() == {STOP}
    finally:
        w.close()
    assert not w.path.exists()
    assert r.poll() == set()  # the runner is gone: no requests, no error


def test_reader_comes_from_the_environment_only_when_named() -> None:
    assert RequestReader.from_env({}) is None
    got = RequestReader.from_env({"HPCCKPT_REQUESTS": "/x"})
    assert got is not None and got.path == "/x"


def test_relaunch_keeps_what_decides_the_program_and_nothing_else() -> None:
    env = {"PATH": "/bin", "PYTHONPATH": "/src", "OMP_NUM_THREADS": "4", "OMPI_MCA_btl": "self,tcp",
           "VIRTUAL_ENV": "/venv", "LC_CTYPE": "C.UTF-8", "SLURM_JOB_ID": "12", "HPCCKPT_JOB_ID": "old",
           "GITHUB_TOKEN": "secret", "AWS_SECRET_ACCESS_KEY": "secret", "DISPLAY": ":0"}
    assert kept_environment(env) == {"PATH": "/bin", "PYTHONPATH": "/src", "OMP_NUM_THREADS": "4",
                                     "OMPI_MCA_btl": "self,tcp", "VIRTUAL_ENV": "/venv", "LC_CTYPE": "C.UTF-8"}


def test_engine_record_chooses_files_or_api_and_refuses_nonsense() -> None:
    api = engine_record(["mpirun", "prog"], "/w", {"PATH": "/bin"}, app_files=[], app_signal=None)
    assert api["engine"] == "api" and api["argv"] == ["mpirun", "prog"] and api["cwd"] == "/w"
    files = engine_record(["./code"], "/w", os.environ, app_files=["restart.*"], app_signal="USR1")
    assert files["engine"] == "files" and files["app_files"] == ["restart.*"] and files["app_signal"] == "USR1"
    assert callable(engine_factory(api)) and callable(engine_factory(files))
    with pytest.raises(UsageError, match="needs --app-files"):
        engine_record(["./code"], "/w", {}, app_files=[], app_signal="USR1")
    with pytest.raises(PolicyError):
        engine_record(["./code"], "/w", {}, app_files=["r"], app_signal="NOPE")
    with pytest.raises(UsageError, match="unknown engine"):
        engine_factory({"engine": "criu2"})


def test_request_file_at_a_fixed_path_starts_empty(tmp_path: Path) -> None:
    fixed = tmp_path / "job.requests"
    fixed.write_text("stop\n")  # left by a runner that was killed outright
    w = RequestWriter("job", path=fixed)
    assert w.path == fixed and fixed.read_text() == "" and (fixed.stat().st_mode & 0o777) == 0o600
    w.send(CHECKPOINT)
    assert RequestReader(str(fixed)).poll() == {CHECKPOINT}
    w.close()
    assert not fixed.exists()
