"""Pure logic of run/resume, with fakes injected through the engine protocol (no CRIU, no root)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from hpcckpt.catalog import open_catalog
from hpcckpt.context import current_user
from hpcckpt.core.checkpoint import CriuCheckpointer, JobInfo
from hpcckpt.core.pipeline.flush import FlushSettings, StorePublisher
from hpcckpt.core.resume import FileState, plan_files
from hpcckpt.core.runner.control import ControlServer, request
from hpcckpt.criu.engine import log_excerpt
from hpcckpt.criu.interface import DumpOptions, DumpResult, RestoreResult
from hpcckpt.criu.streamer import Source as StreamSource
from hpcckpt.errors import EngineError, RunnerUnreachableError, UsageError
from hpcckpt.image import OpenFile, verify_image
from hpcckpt.jobid import resolve
from hpcckpt.store.images import Store


def test_job_identity_from_slurm_array_cli_and_generated() -> None:
    env = {"SLURM_JOB_ID": "101", "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "7", "SLURM_RESTART_COUNT": "2"}
    ident = resolve(None, env)
    assert (ident.job_id, ident.source, ident.requeued) == ("100_7", "slurm-array", True)
    assert resolve(None, {"SLURM_JOB_ID": "55"}).job_id == "55"
    assert resolve("mine", env).job_id == "mine"
    gen = resolve(None, {})
    assert gen.source == "generated" and gen.job_id.startswith("local-") and not gen.requeued
    with pytest.raises(UsageError):
        resolve("a/b", {})


def rec(path: str, size: int, mode: str, inode: int = 5, mtime: int = 10) -> OpenFile:
    return OpenFile(pid=1, fd=3, path=path, size=size, mtime_ns=mtime, mode=mode, inode=inode, dev=1)


def fs(states: Mapping[str, FileState | None]):  # type: ignore[no-untyped-def]
    return lambda p: states.get(p)


def test_plan_files_truncates_grown_output_and_names_every_problem() -> None:
    files = [rec("/o", 100, "a"), rec("/in", 50, "r"), rec("/gone", 1, "w"), rec("/small", 10, "w"),
             rec("/repl", 10, "w", inode=5)]
    now = {"/o": FileState(150, 99, 5, 1), "/in": FileState(50, 11, 5, 1), "/gone": None,
           "/small": FileState(3, 10, 5, 1), "/repl": FileState(10, 10, 6, 1)}
    plan = plan_files(files, "truncate", fs(now))
    assert plan.truncate == [("/o", 100, 5)]
    text = "\n".join(plan.problems)
    for word in ("/in: the job reads", "/gone: the job had it open", "/small: shrank", "/repl: was replaced"):
        assert word in text
    assert plan_files([rec("/o", 100, "a")], "refuse", fs(now)).problems[0].startswith("/o: grew")
    assert plan_files([rec("/o", 100, "a")], "keep", fs(now)).truncate == []
    with pytest.raises(UsageError):
        plan_files([], "bogus")


def test_log_excerpt_keeps_errors_and_drops_rlimit_noise(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text("(00.01) rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
                   "(00.02) Dumping pid 5\n(00.03) Error (criu/cr-dump.c:1): pid 5 is gone\n")
    assert log_excerpt(log) == "(00.03) Error (criu/cr-dump.c:1): pid 5 is gone"


def test_control_socket_round_trip_and_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(RunnerUnreachableError):
        request("nojob", {"op": "status"}, timeout=2)
    srv = ControlServer("j1")
    assert oct(os.stat(srv.path.parent).st_mode & 0o777) == "0o700"
    import threading

    from hpcckpt.core.runner.control import reply

    def serve() -> None:
        for _ in range(50):
            got = srv.accept()
            if got:
                reply(got[0], {"ok": True, "echo": got[1]["op"]})
                return
            threading.Event().wait(0.05)

    t = threading.Thread(target=serve)
    t.start()
    assert request("j1", {"op": "status"}, timeout=5) == {"ok": True, "echo": "status"}
    t.join()
    with pytest.raises(UsageError):
        ControlServer("j1")  # a live runner holds the socket
    srv.close()


class FailingEngine:
    """Dumps fail like CRIU does; the pipeline must record it and re-raise."""

    name = "criu"

    def version(self) -> str:
        return "0-fake"

    def dump(self, pid: int, images_dir: Path, *, options: DumpOptions, after: str = "running",
             timeout: float | None = None) -> DumpResult:
        raise EngineError("criu dump of pid 1 failed (exit 1)", log_excerpt="Error (x.c:1): cannot seize")

    def restore(self, images_dir: Path, *, options: DumpOptions, inherit_fds: Mapping[int, str] | None = None,
                timeout: float | None = None, source: StreamSource | None = None,
                gate: Callable[[], None] | None = None, lazy_pages: bool = False) -> RestoreResult:
        raise AssertionError("not used")

    def cpuinfo_dump(self, images_dir: Path) -> None:
        pass

    def cpuinfo_check(self, images_dir: Path) -> tuple[bool, str]:
        return True, ""


class FileEngine(FailingEngine):
    """Writes a small fake dump, so the pack/publish half of the pipeline runs for real."""

    def dump(self, pid: int, images_dir: Path, *, options: DumpOptions, after: str = "running",
             timeout: float | None = None) -> DumpResult:
        (images_dir / "pages-1.img").write_bytes(os.urandom(4096))
        return DumpResult(0.001, images_dir / "dump.log", images_dir)


def user_name() -> str:
    return current_user().name


def make(tmp_path: Path, engine: FailingEngine) -> CriuCheckpointer:
    user = current_user()
    cat = open_catalog(None, tmp_path / "store", user)
    job = JobInfo(identity=resolve("unit", {}), user=user, cmdline=["x"], cwd="/", stdio={}, interval=None)
    (tmp_path / "stage").mkdir()
    store = Store(tmp_path / "store", user)
    pub = StorePublisher(store, lambda: open_catalog(None, store.root, user))
    return CriuCheckpointer(engine=engine, store=store, catalog=cat, job=job, options=DumpOptions(),
                        flush=FlushSettings(), publisher=pub, disk_staging=tmp_path / "stage", tmpfs=None)


def test_failed_dump_is_recorded_with_criu_log_and_previous_stays_latest(tmp_path: Path) -> None:
    good = make(tmp_path, FileEngine())
    first = good.checkpoint(os.getpid())
    assert verify_image(first.path).meta.ckptid == first.ckptid
    good.engine = FailingEngine()
    with pytest.raises(EngineError):
        good.checkpoint(os.getpid())
    rows = good.catalog.list("unit")
    failed = [r for r in rows if r.status == "failed"]
    assert len(failed) == 1 and "cannot seize" in (failed[0].error or "")
    latest = good.catalog.latest("unit")
    assert latest is not None and latest.ckptid == first.ckptid
    assert not any((tmp_path / "stage" / user_name() / "unit").iterdir())


def test_deadline_passed_commits_nothing(tmp_path: Path) -> None:
    ck = make(tmp_path, FileEngine())
    import time

    from hpcckpt.errors import DeadlineExceededError

    with pytest.raises(DeadlineExceededError):
        ck.checkpoint(os.getpid(), deadline=time.monotonic() - 1)
    assert ck.catalog.latest("unit") is None
    assert not list((tmp_path / "store").glob("*/unit/ckpt-*.hck"))

