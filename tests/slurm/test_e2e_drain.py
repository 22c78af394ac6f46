"""End to end on the real cluster: ``hpcckpt drain NODE`` and ``hpcckpt migrate JOBID``.

The jobs checkpoint rarely (interval 600 s), so the only image each has is
the final one the drain asks for: a job that goes on counting where it was
stopped (and not from 0) went on from that final checkpoint. The counters
never finish on their own: once one has counted on after its resume it is
cancelled, which keeps the tests short.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.slurm.cluster import SlurmCluster, slurm_installed
from tests.slurm.e2e_helpers import Counter, checkpointed_step, image_path, parse_output, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.criu, pytest.mark.slow]


def _hpcckpt(cluster: SlurmCluster, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpcckpt", "-v", *args], env=cluster.env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _steps(counter: Counter) -> int:
    return len(counter.trace.read_text().split()) if counter.trace.exists() else 0


def _check_moved(cluster: SlurmCluster, counter: Counter, job: str, moved: dict[str, Any], away: str) -> None:
    """Resumed elsewhere from the final checkpoint, with its downtime in four parts, and counting on."""
    assert moved["state"] == "resumed", moved
    assert away not in moved["new_nodes"] and moved["new_nodes"], moved
    dt = moved["downtime"]
    for part in ("freeze_s", "flush_s", "scheduling_s", "restore_s"):
        assert dt[part] is not None and dt[part] >= 0, f"{part} missing from {dt}"
    assert dt["total_s"] == pytest.approx(dt["freeze_s"] + dt["flush_s"] + dt["scheduling_s"] + dt["restore_s"],
                                          abs=0.01)
    _check_counted_on(cluster, counter, job, moved["final_ckptid"])


def _check_counted_on(cluster: SlurmCluster, counter: Counter, job: str, final: int) -> None:
    """The job went on from checkpoint ``final`` at the next step and counts on; then it is cancelled."""
    at = _steps(counter)
    wait_for(lambda: _steps(counter) >= at + 3, 60, f"job {job} to count on after its resume")
    cluster.cmd(["scancel", job])
    cluster.wait_state(job, ["CANCELLED"], 60)
    runs = parse_output(counter.output(job))
    assert runs.restored_from == [final], "the job resumed from the final checkpoint of its move"
    stopped = checkpointed_step(image_path(cluster, final), counter.trace)
    assert stopped == runs.segments[0][-1] > 0, "the final checkpoint holds the last step the first run made"
    assert runs.segments[1][0] == stopped + 1, "the resumed run went on at the next step, none lost or redone"
    done = counter.trace.read_text().split()
    assert done == [str(i) for i in range(len(done))], "the counter went on, it did not start again"


@pytest.fixture(scope="module")
def roomy() -> Iterator[SlurmCluster]:
    """A cluster of its own whose node1 has 3 CPUs: three jobs of partition shared fit on it at once.

    (The session's cluster has 2 CPUs a node, and Slurm 22.05 did not oversubscribe
    cores here with OverSubscribe=FORCE or YES under preempt/partition_prio.)
    """
    if not slurm_installed() or os.geteuid() != 0:
        pytest.skip("needs Slurm and root (see tests/slurm/fixtures.py)")
    cluster = SlurmCluster(cpus={"node1": 3}).start()
    try:
        yield cluster
    finally:
        cluster.cancel_all()
        cluster.stop()


def test_drain_moves_hpcckpt_jobs_and_leaves_plain_one(roomy: SlurmCluster, tmp_path: Path) -> None:
    cluster = roomy
    cluster.cancel_all()  # what an earlier test here may have left
    cluster.wait_idle(60)
    # Only node1 is free while the jobs start: all three land there (partition shared).
    for node in ("node2", "node3"):
        cluster.cmd(["scontrol", "update", f"nodename={node}", "state=drain", "reason=test: keep free"])
    counters = [Counter(tmp_path / f"c{i}", steps=1000, delay=0.25, interval=600) for i in (1, 2)]
    try:
        jobs = []
        for c in counters:
            c.dir.mkdir()
            jobs.append(cluster.sbatch(c.script("--requeue", "--partition=shared")))
        plain = cluster.sbatch("#!/bin/sh\nsleep 600\n", "--partition=shared", f"--output={tmp_path}/plain.out")
        for job in [*jobs, plain]:
            assert cluster.wait_state(job, ["RUNNING"], 60)["NodeList"] == "node1"
        for node in ("node2", "node3"):
            cluster.cmd(["scontrol", "update", f"nodename={node}", "state=resume"])
        wait_for(lambda: all(_steps(c) >= 4 for c in counters), 60, "both counters to count")

        res = _hpcckpt(cluster, "drain", "node1", "--reason", "test maintenance", "--json", "--timeout", "120")
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        assert report["drained"] and report["reason"] == "hpcckpt drain: test maintenance"
        assert [p["job_id"] for p in report["left_alone"]] == [plain]
        assert report["left_alone"][0]["why"] == "not under hpcckpt"
        assert sorted(m["job_id"] for m in report["moved"]) == sorted(jobs), res.stderr
        # The plain job runs on, untouched, on the draining node.
        info = cluster.show_job(plain)
        assert info["JobState"] == "RUNNING" and info["NodeList"] == "node1" and info["Restarts"] == "0"
        for c, job in zip(counters, jobs, strict=True):
            _check_moved(cluster, c, job, next(m for m in report["moved"] if m["job_id"] == job), "node1")
        assert cluster.node_states()["node1"] == "draining"
        cluster.cmd(["scancel", plain])
        wait_for(lambda: cluster.node_states().get("node1") == "drained", 60, "node1 to be drained")
    finally:
        for node in ("node1", "node2", "node3"):
            cluster.cmd(["scontrol", "update", f"nodename={node}", "state=resume"], check=False)


def test_migrate_moves_one_job_off_its_node(roomy: SlurmCluster, tmp_path: Path) -> None:
    cluster = roomy
    cluster.cancel_all()  # what an earlier test here may have left
    cluster.wait_idle(60)
    counter = Counter(tmp_path, steps=1000, delay=0.25, interval=600)
    job = cluster.sbatch(counter.script("--requeue", "--partition=low"))
    node = cluster.wait_state(job, ["RUNNING"], 60)["NodeList"]
    wait_for(lambda: _steps(counter) >= 4, 60, "the counter to count")
    res = _hpcckpt(cluster, "migrate", job, "--json", "--timeout", "120")
    assert res.returncode == 0, res.stderr
    moved = json.loads(res.stdout)
    assert moved["from_nodes"] == [node]
    assert node in cluster.show_job(job)["ExcNodeList"].split(",")
    _check_moved(cluster, counter, job, moved, node)
    # A plain job is refused, with the reason and Slurm's exit code.
    plain = cluster.sbatch("#!/bin/sh\nsleep 600\n", "--partition=low", f"--output={tmp_path}/plain.out")
    cluster.wait_state(plain, ["RUNNING"], 60)
    res = _hpcckpt(cluster, "migrate", plain)
    assert res.returncode == 12 and "not under hpcckpt" in res.stderr, res.stderr
    assert cluster.show_job(plain)["JobState"] == "RUNNING"
    cluster.cmd(["scancel", plain])


def test_drain_watch_moves_jobs_off_a_node_the_admin_drained(roomy: SlurmCluster, tmp_path: Path) -> None:
    """`scontrol update state=drain` runs no hook (docs/slurm.md): the periodic drain watch moves the job."""
    cluster = roomy
    cluster.cancel_all()  # what an earlier test here may have left
    cluster.wait_idle(60)
    counter = Counter(tmp_path, steps=1000, delay=0.25, interval=600)
    job = cluster.sbatch(counter.script("--requeue", "--partition=low"))
    node = cluster.wait_state(job, ["RUNNING"], 60)["NodeList"]
    wait_for(lambda: _steps(counter) >= 4, 60, "the counter to count")
    try:
        cluster.cmd(["scontrol", "update", f"nodename={node}", "state=drain", "reason=admin: fan"])
        res = _hpcckpt(cluster, "slurm", "drain-watch", "--json", "--timeout", "120")
        assert res.returncode == 0, res.stderr
        [report] = json.loads(res.stdout)
        assert report["node"] == node and not report["drained"] and report["reason"].startswith("admin: fan")
        [moved] = report["moved"]
        assert moved["job_id"] == job and moved["state"] == "requeued", moved
        info = cluster.wait_state(job, ["RUNNING"], 60)
        assert info["NodeList"] != node and node in info["ExcNodeList"].split(",")
        # The watch does not wait for the resume: its report has the final checkpoint's part of the downtime.
        assert moved["downtime"]["freeze_s"] is not None and moved["downtime"]["flush_s"] is not None
        _check_counted_on(cluster, counter, job, moved["final_ckptid"])
    finally:
        cluster.cmd(["scontrol", "update", f"nodename={node}", "state=resume"], check=False)
