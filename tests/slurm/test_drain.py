"""The decision logic of ``hpcckpt drain`` / ``migrate`` / ``slurm drain-watch``: fake Slurm, real SQLite catalog.

The fake's ``on_signal`` plays the runner and Slurm: a signalled hpcckpt job
commits a final checkpoint, exits 85 and is requeued (PENDING, Restarts + 1);
once the drain has excluded the node, the "next run" records its restore.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcckpt.catalog import open_catalog
from hpcckpt.cluster import drain, hooks
from hpcckpt.context import User, current_user
from hpcckpt.errors import PermissionDeniedError, SlurmError
from hpcckpt.slurm.env import SlurmEnv
from hpcckpt.slurm.restart_policy import JobOutcome, RestartRules, decide, pending_move
from tests.slurm.fakes import FakeSlurm

RUNNER = "#!/bin/bash\n#SBATCH --requeue\nmodule load sim\nexec hpcckpt run --interval 30m -- ./sim in.nml\n"


@pytest.fixture
def user() -> User:
    return current_user()


def _job(job_id: str, user: User, node: str = "node1", **kw: str) -> dict[str, str]:
    return {"JobId": job_id, "JobState": "RUNNING", "Requeue": "1", "Restarts": "0", "NodeList": node,
            "ExcNodeList": "(null)", "UserId": f"{user.name}({user.uid})", "BatchFlag": "1", **kw}


def _deps(tmp_path: Path, fake: FakeSlurm) -> hooks.HookDeps:
    return hooks.HookDeps(slurm=fake, store_root=tmp_path / "store", open_catalog=open_catalog,
                          rules=RestartRules(backoff=0), retry_wait=0.0, retry_attempts=3)


def _runner_and_slurm(tmp_path: Path, user: User) -> FakeSlurm:
    """A fake whose hpcckpt jobs checkpoint, exit 85 and are requeued when their batch shell is signalled."""

    def on_signal(fake: FakeSlurm, job_id: str, sig: str) -> None:
        assert sig == "USR1"
        cat = open_catalog(None, tmp_path / "store", user)
        try:
            ck = cat.begin(job_id=job_id, uid=user.uid, user=user.name, node="node1", engine="criu",
                           meta={"frozen_s": 0.4, "final": True})
            cat.commit(ck, path=f"/store/{job_id}/ckpt-{ck}.hck", size_bytes=10, duration=1.5)
            fake.jobs[job_id].update(JobState="PENDING", Restarts="1", Reason="BeginTime", NodeList="(null)")
            # The next run (elsewhere) restores it and says so, as hpcckpt run does.
            started = float(cat.get(ck).finished or 0) + 2.0  # type: ignore[union-attr]
            cat.record_job_event(job_id, uid=user.uid, event="restored", node="node2",
                                 detail=json.dumps({"ckptid": ck, "started": started, "restore_s": 0.7}))
        finally:
            cat.close()

    return FakeSlurm(nodes={"node1": "MIXED", "node2": "IDLE"}, on_signal=on_signal)


def test_runner_as_batch_shell_is_recognised() -> None:
    yes = [RUNNER, "exec /opt/hpcckpt/bin/hpcckpt -v run -- ./a", "exec env OMP_NUM_THREADS=4 hpcckpt run -- ./a",
           "exec python3 -m hpcckpt run --interval 10m -- ./a", "  exec -a sim hpcckpt run -- ./a  # comment"]
    no = ["hpcckpt run -- ./a", "# exec hpcckpt run -- ./a", "exec srun hpcckpt run -- ./a",
          "exec hpcckpt resume 42", "exec ./a", "srun ./a; exec echo hpcckpt run", "exec 'unbalanced"]
    for script in yes:
        assert drain.runs_hpcckpt_as_batch_shell(script), script
    for script in no:
        assert not drain.runs_hpcckpt_as_batch_shell(script), script


def test_drain_moves_hpcckpt_jobs_and_lists_the_others(tmp_path: Path, user: User) -> None:
    fake = _runner_and_slurm(tmp_path, user)
    for j in ("11", "12", "13", "14"):
        fake.jobs[j] = _job(j, user)
    fake.jobs["15"] = _job("15", user, node="node2")  # another node: not touched
    fake.scripts.update({"11": RUNNER, "12": RUNNER, "13": "#!/bin/sh\n./plain\n", "15": RUNNER,
                         "14": "#!/bin/sh\nhpcckpt run -- ./sim   # no exec\n"})
    report = drain.drain_node(_deps(tmp_path, fake), "node1", "DIMM errors", user,
                              drain.MoveOptions(poll=0, sleep=lambda s: None))

    assert fake.calls[0] == ("drain", "node1", "hpcckpt drain: DIMM errors"), "drained before anything else"
    assert [c for c in fake.calls if c[0] == "signal"] == [("signal", "11", "USR1"), ("signal", "12", "USR1")]
    for j in ("11", "12"):
        assert ("update", j, "ExcNodeList=node1", "StartTime=now") in fake.calls
    assert {m.job_id: m.state for m in report.moved} == {"11": "resumed", "12": "resumed"}
    assert report.ok
    left = {p.job_id: p.why for p in report.left_alone}
    assert left["13"] == "not under hpcckpt" and "not as 'exec hpcckpt run'" in left["14"]
    assert set(left) == {"13", "14"}
    dt = report.moved[0].downtime
    assert (dt.freeze_s, dt.flush_s, dt.scheduling_s, dt.restore_s) == (0.4, 1.5, 2.0, 0.7)
    assert dt.total_s == 4.6
    # The move is in the job's catalog before the signal: the EpilogSlurmctld reads it.
    cat = open_catalog(None, tmp_path / "store", user)
    events = cat.job_events("11", uid=user.uid)
    cat.close()
    assert events[0]["event"] == "move" and events[0]["node"] == "node1"
    doc = report.to_dict()
    assert doc["moved"][0]["downtime"]["total_s"] == 4.6 and doc["left_alone"][0]["job_id"] == "13"


def test_only_root_or_an_operator_may_drain(tmp_path: Path) -> None:
    fake = FakeSlurm(nodes={"node1": "ALLOCATED"}, operators={"opal"})
    alice = User("alice", 1000, 1000, "/home/alice")
    with pytest.raises(PermissionDeniedError) as err:
        drain.drain_node(_deps(tmp_path, fake), "node1", "", alice)
    assert err.value.exit_code == 10 and fake.calls == []
    opal = User("opal", 1001, 1001, "/home/opal")
    report = drain.drain_node(_deps(tmp_path, fake), "node1", "", opal)
    assert report.drained and fake.calls == [("drain", "node1", "hpcckpt drain")]


def test_a_job_that_does_not_stop_is_reported_not_waited_for_forever(tmp_path: Path, user: User) -> None:
    fake = FakeSlurm(nodes={"node1": "ALLOCATED"}, jobs={"21": _job("21", user)}, scripts={"21": RUNNER})
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += 10

    report = drain.drain_node(_deps(tmp_path, fake), "node1", "x", user,
                              drain.MoveOptions(stop_timeout=60, sleep=sleep, monotonic=lambda: now[0]))
    assert report.moved[0].state == "failed" and "preemption.signals" in report.moved[0].detail
    assert not report.ok and not [c for c in fake.calls if c[0] in ("requeue", "update")]


def test_runner_exit_85_without_requeueexit_is_requeued_here(tmp_path: Path, user: User) -> None:
    def on_signal(fake: FakeSlurm, job_id: str, sig: str) -> None:
        fake.jobs[job_id].update(JobState="FAILED", ExitCode="85:0")  # a site without RequeueExit=85

    fake = FakeSlurm(nodes={"node1": "ALLOCATED"}, jobs={"31": _job("31", user)}, scripts={"31": RUNNER},
                     on_signal=on_signal)
    result = drain.migrate_job(_deps(tmp_path, fake), "31", user, drain.MoveOptions(resume_timeout=0, poll=0))
    assert result.state == "requeued"
    assert fake.calls[-2:] == [("requeue", "31"), ("update", "31", "ExcNodeList=node1", "StartTime=now")]


def test_migrate_is_for_the_owner_and_for_hpcckpt_jobs(tmp_path: Path, user: User) -> None:
    bob = User("bob", 4321, 4321, "/home/bob")
    fake = FakeSlurm(jobs={"41": _job("41", bob), "42": _job("42", user, node="node3"),
                           "43": _job("43", user, Requeue="0")},
                     scripts={"41": RUNNER, "42": "#!/bin/sh\n./plain\n", "43": RUNNER})
    deps = _deps(tmp_path, fake)
    with pytest.raises(PermissionDeniedError, match="bob's"):
        drain.migrate_job(deps, "41", User("carol", 999, 999, "/home/carol"))
    with pytest.raises(SlurmError, match="not under hpcckpt"):
        drain.migrate_job(deps, "42", user)
    with pytest.raises(SlurmError, match="--no-requeue"):
        drain.migrate_job(deps, "43", user)
    assert not [c for c in fake.calls if c[0] == "signal"]


def test_ctld_epilog_keeps_a_moved_job_off_its_node(tmp_path: Path, user: User) -> None:
    """Exit 85 after a move: Slurm requeued it; the hook excludes the node even with exclude_failed_node off."""
    fake = FakeSlurm(jobs={"51": _job("51", user, JobState="PENDING", Restarts="1")})
    deps = _deps(tmp_path, fake)
    deps.rules = RestartRules(backoff=0, exclude_failed_node=False)
    cat = open_catalog(None, tmp_path / "store", user)
    ck = cat.begin(job_id="51", uid=user.uid, user=user.name, node="node1", engine="criu")
    cat.commit(ck, path="/x", size_bytes=1, duration=0.1)
    cat.record_job_event("51", uid=user.uid, event="move", node="node1", detail="migrate by x")
    cat.close()
    env = SlurmEnv(job_id="51", node="node1", uid=user.uid, gid=user.gid, user=user.name, nodelist="node1",
                   exit_code=85)
    assert hooks.ctld_epilog(env, deps) == 0
    assert fake.calls == [("update", "51", "ExcNodeList=node1", "StartTime=now")]
    # The next end of the job (it ran elsewhere since) no longer carries the move.
    fake.calls.clear()
    fake.jobs["51"]["JobState"] = "PENDING"
    hooks.ctld_epilog(env, deps)
    assert fake.calls == [("update", "51", "StartTime=now")]


def test_pending_move_and_exclusions() -> None:
    assert pending_move([{"event": "move", "node": "n1,n2"}]) == ["n1", "n2"]
    assert pending_move([{"event": "move", "node": "n1"}, {"event": "end"}]) == []
    assert pending_move([{"event": "end"}, {"event": "move", "node": "n3"}]) == ["n3"]
    d = decide(RestartRules(exclude_failed_node=False),
               JobOutcome(state="PENDING", exit_code=85, excluded=["n9"], moved_from=["n1"]))
    assert d.exclude == ["n9", "n1"] and d.delay == 0


def test_drain_watch_picks_nodes_an_admin_is_draining(tmp_path: Path, user: User) -> None:
    fake = FakeSlurm(
        nodes={"n1": "MIXED+DRAIN", "n2": "ALLOCATED+DRAIN", "n3": "IDLE+DRAIN", "n4": "ALLOCATED",
               "n5": "MIXED+DRAIN+REBOOT_REQUESTED"},
        node_fields={"n1": {"Reason": "bad fan"}, "n2": {"Reason": "hpcckpt drain: ours"},
                     "n5": {"Reason": "Reboot ASAP"}})
    deps = _deps(tmp_path, fake)
    assert drain.draining_nodes(deps) == [("n1", "bad fan"), ("n5", "Reboot ASAP")]
    reports = drain.watch_once(deps, user)
    assert [(r.node, r.drained, r.reason) for r in reports] == [("n1", False, "bad fan"),
                                                                 ("n5", False, "Reboot ASAP")]
    assert not [c for c in fake.calls if c[0] == "drain"], "the admin drained them already"
