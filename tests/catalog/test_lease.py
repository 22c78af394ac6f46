"""The job lease: the pure decision (fakes for /proc and Slurm), then taking it on real SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from hpcckpt.catalog import Catalog
from hpcckpt.catalog.model import LeaseRecord, LeaseState
from hpcckpt.context import User
from hpcckpt.core.lease import Holder, acquire, judge
from hpcckpt.core.runner.session import SessionOptions
from hpcckpt.errors import JobFinishedError, JobRunningError, SlurmError
from tests.criu.harness import wait_for

NOW = 1_000_000.0
HERE = Holder(node="node1", host="hostA", boot_id="boot-1", pid=500, pid_start=42)


class FakeProbes:
    def __init__(self, pids: dict[int, int] | None = None, slurm: dict[str, dict[str, str] | None] | None = None,
                 slurm_down: bool = False) -> None:
        self.pids = pids or {}
        self.slurm = slurm or {}
        self.slurm_down = slurm_down
        self.asked: list[str] = []

    def pid_start(self, pid: int) -> int | None:
        return self.pids.get(pid)

    def slurm_job(self, job_id: str) -> dict[str, str] | None:
        self.asked.append(job_id)
        if self.slurm_down:
            raise SlurmError("scontrol: no answer")
        return self.slurm.get(job_id)


def lease(**kw: object) -> LeaseRecord:
    base = LeaseRecord(uid=1000, job_id="J", token="t", state=LeaseState.LIVE, node="node1", host="hostA",
                       boot_id="boot-1", pid=77, pid_start=9, acquired=NOW - 100, renewed=NOW - 10, expires=NOW + 80)
    return replace(base, **kw)  # type: ignore[arg-type]


# -- judge: the pure decision --------------------------------------------------


def test_no_lease_or_ended_run_is_free() -> None:
    assert judge(None, HERE, NOW, FakeProbes()).free
    assert judge(lease(state=LeaseState.STOPPED), HERE, NOW, FakeProbes()).free
    assert judge(lease(state=LeaseState.EXITED), HERE, NOW, FakeProbes()).free


def test_same_machine_the_pid_and_its_start_time_decide() -> None:
    alive = FakeProbes(pids={77: 9})
    assert not judge(lease(), HERE, NOW, alive).free
    # Even long expired: on its own machine a live pid is proof, an expiry is not.
    assert not judge(lease(expires=NOW - 1000), HERE, NOW, alive).free
    assert judge(lease(), HERE, NOW, FakeProbes()).free  # no such pid
    reused = judge(lease(), HERE, NOW, FakeProbes(pids={77: 10}))
    assert reused.free and "another process" in reused.reason


def test_same_hostname_other_boot_is_not_the_same_machine() -> None:
    probes = FakeProbes(pids={77: 9})
    # Not a pid question any more: the lease is current, so it is held.
    assert not judge(lease(boot_id="boot-0"), HERE, NOW, probes).free
    assert judge(lease(boot_id="boot-0", expires=NOW - 1), HERE, NOW, probes).free


def test_other_node_without_slurm_waits_for_expiry() -> None:
    other = lease(host="hostB", node="node2")
    assert not judge(other, HERE, NOW, FakeProbes()).free
    v = judge(replace(other, expires=NOW - 5), HERE, NOW, FakeProbes())
    assert v.free and "expired" in v.reason


@pytest.mark.parametrize("state", ["COMPLETED", "CANCELLED", "FAILED", "NODE_FAIL", "PENDING", "TIMEOUT"])
def test_other_node_slurm_job_no_longer_running_is_dead(state: str) -> None:
    other = lease(host="hostB", slurm_job_id="4242")
    v = judge(other, HERE, NOW, FakeProbes(slurm={"4242": {"JobState": state, "Restarts": "0"}}))
    assert v.free and state in v.reason


def test_other_node_slurm_decides_before_expiry() -> None:
    other = lease(host="hostB", slurm_job_id="4242")
    running = FakeProbes(slurm={"4242": {"JobState": "RUNNING", "Restarts": "0"}})
    assert not judge(other, HERE, NOW, running).free
    assert judge(other, HERE, NOW, FakeProbes(slurm={"4242": None})).free  # purged: Slurm does not know it
    requeued = FakeProbes(slurm={"4242": {"JobState": "RUNNING", "Restarts": "1"}})
    assert judge(other, HERE, NOW, requeued).free


def test_slurm_unreachable_falls_back_to_expiry() -> None:
    other = lease(host="hostB", slurm_job_id="4242")
    assert not judge(other, HERE, NOW, FakeProbes(slurm_down=True)).free
    assert judge(replace(other, expires=NOW - 1), HERE, NOW, FakeProbes(slurm_down=True)).free


def test_a_later_run_of_our_own_slurm_job_takes_over() -> None:
    me = replace(HERE, slurm_job_id="4242", restart_count=1)
    earlier = lease(host="hostB", slurm_job_id="4242", restart_count=0)
    probes = FakeProbes(slurm={"4242": {"JobState": "RUNNING", "Restarts": "1"}})
    assert judge(earlier, me, NOW, probes).free
    # The same run of the same Slurm job (two runners in one batch script): held.
    assert not judge(replace(earlier, restart_count=1), me, NOW, probes).free
    # On the same machine too: Slurm, not a leftover process of the earlier run, says where the job runs.
    assert judge(lease(slurm_job_id="4242"), me, NOW, FakeProbes(pids={77: 9})).free


# -- taking it, on both backends -------------------------------------------------


def holder(pid: int, host: str = "hostA", slurm: str | None = None) -> Holder:
    return Holder(node=f"n-{host}", host=host, boot_id="boot-1", pid=pid, pid_start=pid * 10, slurm_job_id=slurm,
                  slurm_step="0" if slurm else None)


def test_second_taker_of_a_live_job_is_refused_with_where_it_runs(cat: Catalog) -> None:
    probes = FakeProbes(pids={100: 1000})
    first = acquire(cat, "J", here=holder(100, slurm="777"), probes=probes, clock=lambda: NOW,
                    options={"interval": "2"})
    with pytest.raises(JobRunningError) as err:
        acquire(cat, "J", here=holder(200), probes=probes, clock=lambda: NOW)
    assert err.value.exit_code == 15
    text = str(err.value)
    assert "pid 100" in text and "n-hostA" in text and "Slurm job 777 step 0" in text
    # Another job id is independent.
    acquire(cat, "K", here=holder(200), probes=probes, clock=lambda: NOW).release(LeaseState.EXITED, exit_status=0)
    first.release(LeaseState.STOPPED, exit_status=85)
    row = cat.get_lease("J")
    assert row is not None and row.state is LeaseState.STOPPED and row.exit_status == 85
    assert row.options == {"interval": "2"}


def test_dead_holder_is_taken_over_and_loses_its_renewals(cat: Catalog) -> None:
    dead = acquire(cat, "J", here=holder(100), probes=FakeProbes(), clock=lambda: NOW)
    # pid 100 is gone (the fake knows no pids): the next taker wins, and keeps the recorded options.
    cat.swap_lease(replace(dead.record, options={"interval": "5"}), expect_token=dead.record.token)
    second = acquire(cat, "J", here=holder(200), probes=FakeProbes(pids={200: 2000}), clock=lambda: NOW)
    assert second.previous is not None and second.previous.pid == 100
    assert second.record.options == {"interval": "5"}
    assert not cat.renew_lease("J", dead.record.token, expires=NOW + 999)
    assert cat.renew_lease("J", second.record.token, expires=NOW + 999)
    assert cat.get_lease("J").expires == NOW + 999  # type: ignore[union-attr]
    # The dead runner's late release does not clobber the live lease.
    dead.release(LeaseState.EXITED, exit_status=0)
    row = cat.get_lease("J")
    assert row is not None and row.state is LeaseState.LIVE and row.pid == 200


def test_finished_job_check_and_give_back_restore_the_row(cat: Catalog) -> None:
    run = acquire(cat, "J", here=holder(100), probes=FakeProbes(), clock=lambda: NOW)
    run.release(LeaseState.EXITED, exit_status=3)

    def refuse(prev: LeaseRecord | None) -> None:
        if prev is not None and prev.state is LeaseState.EXITED:
            raise JobFinishedError("ended")

    with pytest.raises(JobFinishedError):
        acquire(cat, "J", here=holder(200), probes=FakeProbes(), check=refuse)
    assert cat.get_lease("J").state is LeaseState.EXITED  # type: ignore[union-attr]
    forced = acquire(cat, "J", here=holder(200), probes=FakeProbes())
    assert cat.get_lease("J").state is LeaseState.LIVE  # type: ignore[union-attr]
    forced.give_back()  # the restore failed: the job is still one that ended, with its status
    row = cat.get_lease("J")
    assert row is not None and row.state is LeaseState.EXITED and row.exit_status == 3


def test_concurrent_takers_exactly_one_wins(make_catalog: Callable[[User], Catalog], me: User) -> None:
    """Eight runners, each with its own connection, all judging a free job at once: one lease, seven refusals."""
    n = 8
    cats = [make_catalog(me) for _ in range(n)]
    alive = FakeProbes(pids={1000 + i: (1000 + i) * 10 for i in range(n)})
    start = threading.Barrier(n)
    won: list[int] = []
    refused: list[int] = []

    def take(i: int) -> None:
        start.wait()
        try:
            acquire(cats[i], "race", here=holder(1000 + i), probes=alive)
            won.append(i)
        except JobRunningError:
            refused.append(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(won) == 1 and len(refused) == n - 1
    row = cats[0].get_lease("race")
    assert row is not None and row.pid == 1000 + won[0]


def test_keeper_renews_and_notices_a_takeover(cat: Catalog, make_catalog: Callable[[User], Catalog],
                                              me: User) -> None:
    clock = [NOW]
    held = acquire(cat, "J", here=holder(100), probes=FakeProbes(), ttl=0.3, clock=lambda: clock[0])
    held.keep(lambda: make_catalog(me))
    clock[0] = NOW + 50
    wait_for(lambda: (cat.get_lease("J") or held.record).expires > NOW + 50, 30, "a renewal")
    # Someone judged us dead and took over: the keeper sees it and stops.
    acquire(cat, "J", here=holder(200), probes=FakeProbes(), clock=lambda: NOW + 100)
    wait_for(held.lost, 30, "the keeper to notice the takeover")
    held.release(LeaseState.EXITED, exit_status=0)
    assert cat.get_lease("J").pid == 200  # type: ignore[union-attr]


# -- the run options a resume keeps ------------------------------------------------


def test_resume_options_fall_back_to_the_recorded_ones(tmp_path: Path) -> None:
    pol = tmp_path / "p.yaml"
    pol.write_text("{}\n")
    ran = SessionOptions(interval="2", deadline=30.0, signals=["USR1"], policy=str(pol))
    recorded = ran.recorded()
    assert recorded == {"interval": "2", "deadline": 30.0, "signals": ["USR1"], "policy": str(pol.resolve())}
    # A bare resume gets them all back; the command line wins where it says something.
    assert SessionOptions().over(recorded).recorded() == recorded
    cli = SessionOptions(interval="600", store="/s").over(recorded)
    assert cli.interval == "600" and cli.deadline == 30.0 and cli.store == "/s" and cli.signals == ["USR1"]
    # A policy file that is gone is not an error for a resume: the default policy applies.
    pol.unlink()
    assert SessionOptions().over(recorded).policy is None
    # Nothing recorded (a job from before leases): nothing changes.
    assert SessionOptions(interval="5").over({}) == SessionOptions(interval="5")
