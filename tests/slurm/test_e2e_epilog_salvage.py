"""The Epilog publishes the pipeline's complete staged dumps, then cleans both staging places.

A real store, a real SQLite catalog and real staged dumps
(:class:`~hpcckpt.core.pipeline.staging.StagedCheckpoint`); Slurm is the fake and
the node's tmpfs is a temp dir, so nothing here touches /dev/shm.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpcckpt.catalog import Status, open_catalog
from hpcckpt.cluster import hooks
from hpcckpt.context import User, current_user
from hpcckpt.core.pipeline.staging import TMPFS_SUBDIR, StagedCheckpoint
from hpcckpt.image import ImageMeta, verify_image
from hpcckpt.slurm.env import SlurmEnv
from hpcckpt.slurm.restart_policy import RestartRules
from tests.slurm.fakes import FakeSlurm

JOB = "5151"


@pytest.fixture
def user() -> User:
    return current_user()


def _deps(tmp_path: Path) -> hooks.HookDeps:
    shm = tmp_path / "shm"
    shm.mkdir(mode=0o755)
    fake = FakeSlurm(jobs={JOB: {"JobId": JOB, "JobState": "RUNNING", "Requeue": "1"}},
                     scripts={JOB: "#!/bin/sh\nexec hpcckpt run -- ./sim\n"})
    return hooks.HookDeps(slurm=fake, store_root=tmp_path / "store", staging_root=tmp_path / "staging",
                          open_catalog=open_catalog, rules=RestartRules(), tmpfs=shm)


def _env(user: User) -> SlurmEnv:
    return SlurmEnv(job_id=JOB, node="node1", uid=user.uid, gid=user.gid, user=user.name)


def _stage(root: Path, user: User, pages: bytes, *, done: bool) -> StagedCheckpoint:
    staged = StagedCheckpoint.create(root, user)
    (staged.dump_dir / "pages-1.img").write_bytes(pages)
    (staged.dump_dir / "pagemap-1.img").write_bytes(b"pm" * 40)
    if done:
        staged.mark_done(ImageMeta(ckptid=0, job_id=JOB, engine="criu", uid=user.uid, gid=user.gid,
                                   user=user.name, node="node1"), user)
    return staged


def test_epilog_publishes_complete_staged_dumps_and_cleans_tmpfs_and_disk(tmp_path: Path, user: User) -> None:
    deps = _deps(tmp_path)
    assert hooks.prolog(_env(user), deps) == 0
    shm_dir = tmp_path / "shm" / TMPFS_SUBDIR / user.name / JOB
    disk_dir = tmp_path / "staging" / user.name / JOB
    assert shm_dir.is_dir() and disk_dir.is_dir(), "the Prolog makes both staging places"
    assert (shm_dir.parent.parent.stat().st_uid, shm_dir.parent.parent.stat().st_mode & 0o777) == (0, 0o755)

    pages = os.urandom(200_000)
    _stage(shm_dir, user, pages, done=True)  # the runner's flush never got to it
    _stage(shm_dir, user, os.urandom(1000), done=False)  # the dump was interrupted: never published
    _stage(disk_dir, user, pages[:100_000], done=True)

    assert hooks.epilog(_env(user), deps) == 0

    cat = open_catalog(None, tmp_path / "store", user)
    try:
        rows = [r for r in cat.list(JOB, uid=user.uid) if r.status is Status.COMMITTED]
        events = cat.job_events(JOB, uid=user.uid)
    finally:
        cat.close()
    assert len(rows) == 2, "each complete staged dump becomes one committed checkpoint; the partial one none"
    for rec in rows:
        assert rec.path and verify_image(rec.path).meta.job_id == JOB
        assert str((rec.meta or {}).get("stage", "")).startswith("stage-")
    assert not shm_dir.exists() and not disk_dir.exists(), "both staging dirs are removed"
    assert any("published staged" in str(e.get("detail")) for e in events if e.get("event") == "epilog")


def test_epilog_leaves_a_user_owned_tmpfs_base_alone(tmp_path: Path, user: User) -> None:
    """/dev/shm is world-writable: a base a user made first must not be walked by root."""
    deps = _deps(tmp_path)
    assert deps.tmpfs is not None
    base = deps.tmpfs / TMPFS_SUBDIR
    base.mkdir(mode=0o777)
    base.chmod(0o777)  # as a user's `mkdir` in /dev/shm would leave it, group/other writable
    victim = base / user.name / JOB
    _stage(victim, user, b"x" * 5000, done=True)
    assert hooks.epilog(_env(user), deps) == 0
    assert victim.exists(), "nothing below an untrusted base is published or removed"
    cat = open_catalog(None, tmp_path / "store", user)
    try:
        assert not [r for r in cat.list(JOB, uid=user.uid) if r.status is Status.COMMITTED]
    finally:
        cat.close()
