"""The hooks against a real store, real SQLite catalog and real images; Slurm is the fake."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest

from hpcckpt.catalog import Status, open_catalog
from hpcckpt.cluster import hooks
from hpcckpt.cluster.submit import RESUME_ENV, resubmit_options, submit_resume
from hpcckpt.context import User, current_user
from hpcckpt.image import ImageMeta, pack_dir
from hpcckpt.slurm.env import SlurmEnv
from hpcckpt.slurm.restart_policy import RestartRules
from tests.slurm.fakes import FakeSlurm

JOB = "4242"


@pytest.fixture
def user() -> User:
    return current_user()


@pytest.fixture
def fake() -> FakeSlurm:
    return FakeSlurm(
        jobs={JOB: {"JobId": JOB, "JobName": "sim", "JobState": "RUNNING", "Requeue": "1", "Partition": "low",
                    "TimeLimit": "01:00:00", "NumNodes": "1", "NumTasks": "1", "CPUs/Task": "1",
                    "WorkDir": "/tmp", "Restarts": "0", "ExcNodeList": "(null)"}},
        scripts={JOB: "#!/bin/sh\nexec hpcckpt run -- ./sim\n"},
    )


def deps_for(tmp_path: Path, fake: FakeSlurm, **kw: object) -> hooks.HookDeps:
    args: dict[str, object] = dict(
        slurm=fake, store_root=tmp_path / "store", staging_root=tmp_path / "staging",
        open_catalog=open_catalog, rules=RestartRules(max_restarts=2, backoff=0), retry_wait=0.0,
    )
    args.update(kw)
    return hooks.HookDeps(**args)  # type: ignore[arg-type]


def env_for(user: User, job: str = JOB, **kw: object) -> SlurmEnv:
    return SlurmEnv(job_id=job, node="node1", uid=user.uid, gid=user.gid, user=user.name, **kw)  # type: ignore[arg-type]


def image_bytes(tmp_path: Path, ckptid: int, job: str = JOB) -> bytes:
    src = tmp_path / f"src-{ckptid}"
    src.mkdir()
    (src / "pages.img").write_bytes(os.urandom(5000))
    buf = io.BytesIO()
    pack_dir(src, buf, ImageMeta(ckptid=ckptid, job_id=job, engine="files"))
    return buf.getvalue()


def test_prolog_prepares_private_dirs_and_saves_the_job(tmp_path: Path, user: User, fake: FakeSlurm) -> None:
    deps = deps_for(tmp_path, fake)
    assert hooks.prolog(env_for(user), deps) == 0
    jdir = tmp_path / "store" / user.name / JOB
    sdir = tmp_path / "staging" / user.name / JOB
    for d in (jdir, sdir, jdir.parent):
        st = d.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == user.uid
    info = jdir / hooks.JOB_INFO_FILE
    assert stat.S_IMODE(info.stat().st_mode) == 0o600
    doc = json.loads(info.read_text())
    assert doc["fields"]["Partition"] == "low" and "exec hpcckpt run" in doc["script"]
    assert not [c for c in fake.calls if c[0] == "drain"]


def test_prolog_drains_only_when_policy_says(tmp_path: Path, user: User, fake: FakeSlurm) -> None:
    broken = lambda: ["criu check: vdso"]  # noqa: E731
    assert hooks.prolog(env_for(user), deps_for(tmp_path, fake, node_problems=broken)) == 0
    assert not [c for c in fake.calls if c[0] == "drain"]
    deps = deps_for(tmp_path, fake, node_problems=broken, drain_on_failed_check=True)
    assert hooks.prolog(env_for(user), deps) == 0
    [(_, node, reason)] = [c for c in fake.calls if c[0] == "drain"]
    assert node == "node1" and "cannot checkpoint" in reason and "vdso" in reason


def test_prolog_never_follows_a_planted_symlink(tmp_path: Path, user: User, fake: FakeSlurm) -> None:
    target = tmp_path / "victim"
    target.mkdir()
    udir = tmp_path / "store" / user.name
    udir.mkdir(parents=True, mode=0o700)
    (udir / JOB).symlink_to(target)
    assert hooks.prolog(env_for(user), deps_for(tmp_path, fake)) == 0
    assert list(target.iterdir()) == []


def test_epilog_salvages_a_complete_publish_and_aborts_a_partial_one(
    tmp_path: Path, user: User, fake: FakeSlurm
) -> None:
    deps = deps_for(tmp_path, fake)
    hooks.prolog(env_for(user), deps)
    cat = open_catalog(None, tmp_path / "store", user)
    full = cat.begin(job_id=JOB, uid=user.uid, user=user.name, node="node1", engine="files")
    part = cat.begin(job_id=JOB, uid=user.uid, user=user.name, node="node1", engine="files")
    renamed = cat.begin(job_id=JOB, uid=user.uid, user=user.name, node="node1", engine="files")
    jdir = tmp_path / "store" / user.name / JOB
    sdir = tmp_path / "staging" / user.name / JOB
    (jdir / f".tmp-ckpt-{full}.hck.1.aa").write_bytes(image_bytes(tmp_path, full))
    (jdir / f".tmp-ckpt-{part}.hck.1.bb").write_bytes(image_bytes(tmp_path, part)[:-100])
    (jdir / f"ckpt-{renamed}.hck").write_bytes(image_bytes(tmp_path, renamed))

    assert hooks.epilog(env_for(user), deps) == 0

    rows = {r.ckptid: r for r in cat.list(JOB, uid=user.uid)}
    assert rows[full].status == Status.COMMITTED and Path(rows[full].path) == jdir / f"ckpt-{full}.hck"
    assert rows[renamed].status == Status.COMMITTED
    assert rows[part].status == Status.FAILED and "before this checkpoint was fully written" in rows[part].error
    assert sorted(p.name for p in jdir.iterdir()) == sorted(
        [hooks.JOB_INFO_FILE, f"ckpt-{full}.hck", f"ckpt-{renamed}.hck"]
    )
    assert not sdir.exists()
    assert cat.latest(JOB, uid=user.uid) is not None
    assert [e["event"] for e in cat.job_events(JOB, uid=user.uid)] == ["epilog"]
    cat.close()


def _committed(tmp_path: Path, user: User, job: str = JOB) -> int:
    cat = open_catalog(None, tmp_path / "store", user)
    ck = cat.begin(job_id=job, uid=user.uid, user=user.name, node="node1", engine="files")
    cat.commit(ck, path="/x", size_bytes=1, duration=0.1)
    cat.close()
    return ck


def test_ctld_epilog_requeues_a_node_failure_without_the_node(tmp_path: Path, user: User,
                                                              fake: FakeSlurm) -> None:
    _committed(tmp_path, user)
    fake.jobs[JOB]["JobState"] = "NODE_FAIL"
    fake.nodes["node1"] = "DOWN*"
    fake.fail_requeues = 2  # Slurm refuses while the job is still completing
    deps = deps_for(tmp_path, fake)
    assert hooks.ctld_epilog(env_for(user, nodelist="node1"), deps) == 0
    assert fake.calls == [("requeue", JOB)] * 3 + [("update", JOB, "ExcNodeList=node1", "StartTime=now")]
    cat = open_catalog(None, tmp_path / "store", user)
    events = [(e["event"], e["detail"]) for e in cat.job_events(JOB, uid=user.uid)]
    cat.close()
    assert events[0][0] == "end" and "state=NODE_FAIL" in events[0][1]
    assert events[1][0] == "restart" and events[1][1].startswith("failure")


def test_ctld_epilog_stops_after_max_failures(tmp_path: Path, user: User, fake: FakeSlurm) -> None:
    _committed(tmp_path, user)
    fake.nodes["node1"] = "DOWN"
    deps = deps_for(tmp_path, fake)
    for _ in range(2):
        fake.jobs[JOB]["JobState"] = "PENDING"  # Slurm requeued it after the node died
        hooks.ctld_epilog(env_for(user, nodelist="node1"), deps)
    fake.jobs[JOB]["JobState"] = "PENDING"
    hooks.ctld_epilog(env_for(user, nodelist="node1"), deps)
    assert fake.calls[-1] == ("cancel", JOB)


def test_ctld_epilog_ignores_jobs_hpcckpt_does_not_know(tmp_path: Path, user: User, fake: FakeSlurm) -> None:
    fake.jobs[JOB]["JobState"] = "NODE_FAIL"
    assert hooks.ctld_epilog(env_for(user, nodelist="node1"), deps_for(tmp_path, fake)) == 0
    assert fake.calls == []


def test_ctld_epilog_acts_on_the_array_task_only(tmp_path: Path, user: User, fake: FakeSlurm) -> None:
    task = "4250"
    fake.jobs[task] = {"JobId": task, "ArrayJobId": "4248", "ArrayTaskId": "2", "JobState": "NODE_FAIL",
                       "Requeue": "1"}
    fake.nodes["node1"] = "DOWN"
    _committed(tmp_path, user, job=task)
    env = env_for(user, job=task, array_job_id="4248", array_task_id="2", nodelist="node1")
    hooks.ctld_epilog(env, deps_for(tmp_path, fake))
    assert {c[1] for c in fake.calls} == {task}


def test_resubmit_options_carry_resources() -> None:
    opts = resubmit_options({"JobName": "sim", "Partition": "low", "TimeLimit": "01:00:00", "NumNodes": "2",
                             "Account": "(null)", "MinMemoryNode": "2G", "Requeue": "0", "ArrayTaskId": "3"})
    assert opts == ["--job-name=sim", "--partition=low", "--time=01:00:00", "--nodes=2", "--mem=2G",
                    "--no-requeue", "--array=3"]


def test_submit_resume_uses_saved_settings_and_records_lineage(tmp_path: Path, user: User,
                                                               fake: FakeSlurm) -> None:
    deps = deps_for(tmp_path, fake)
    hooks.prolog(env_for(user), deps)
    ck = _committed(tmp_path, user)
    del fake.jobs[JOB]  # Slurm has forgotten the job: the prolog's saved copy must do
    cat = open_catalog(None, tmp_path / "store", user)
    new = submit_resume(JOB, catalog=cat, user=user, store_root=tmp_path / "store", slurm=fake,
                        env={"SLURM_JOB_ID": "99", "PATH": "/bin"})
    [(script, opts, env)] = fake.submitted
    assert "exec hpcckpt run" in script
    assert "--partition=low" in opts and f"--export=ALL,{RESUME_ENV}={JOB}" in opts
    assert env[RESUME_ENV] == JOB and "SLURM_JOB_ID" not in env
    rec = cat.get(ck)
    assert rec is not None and rec.new_job_id == new
    assert cat.job_events(JOB, uid=user.uid)[-1]["event"] == "resubmitted"
    cat.close()


def test_restart_never_requeues_a_run_that_has_already_started(tmp_path: Path, user: User,
                                                               fake: FakeSlurm) -> None:
    """Exit 85 + RequeueExit: Slurm may requeue and start the job again before the decision is applied.

    Requeueing then would kill the new run (seen on the real cluster: SIGTERM one second after the restart).
    """
    from hpcckpt.slurm.restart_policy import Action, RestartDecision, RestartKind

    fake.jobs[JOB]["JobState"] = "RUNNING"  # the next run, already going
    decision = RestartDecision(Action.REQUEUE, RestartKind.VOLUNTARY, "exit 85", 0, [])
    assert hooks.apply_decision(deps_for(tmp_path, fake), JOB, decision) is True
    assert fake.calls == [], "no requeue and no update of a job that runs again"
    fake.jobs[JOB]["JobState"] = "FAILED"  # not back yet: then it is requeued and released
    assert hooks.apply_decision(deps_for(tmp_path, fake), JOB, decision) is True
    assert fake.calls == [("requeue", JOB), ("update", JOB, "StartTime=now")]
