"""End to end on the real cluster: the time limit, and array tasks.

Walltime: ``--signal=B:USR1@40`` reaches ``exec hpcckpt run`` (the batch
shell) before the limit; it takes a final checkpoint and exits 85, Slurm
requeues the job (RequeueExit=85), and it goes on from that image, as many
times as the work needs. Arrays: each task is checkpointed under
``ARRAYJOB_TASK`` and only the task that is stopped comes back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcckpt.image import verify_image
from tests.slurm.cluster import SlurmCluster
from tests.slurm.e2e_helpers import (
    Counter,
    assert_resumed,
    catalog_rows,
    image_path,
    parse_output,
    wait_committed,
    wait_done,
    wait_restarted,
)

pytestmark = [pytest.mark.slurm, pytest.mark.criu, pytest.mark.slow]


def test_walltime_signal_checkpoints_and_requeues_before_the_limit(cluster: SlurmCluster, tmp_path: Path) -> None:
    # 40 s of work under a 1 min limit, signalled 20 to 50 s in: it cannot finish in one run. Slurm checks
    # time limits every 30 s, so USR1@40 comes 20 to 50 s into each run.
    counter = Counter(tmp_path, steps=100, delay=0.4, interval=5)
    job = cluster.sbatch(counter.script("--requeue", "--time=1", "--signal=B:USR1@40"))
    wait_restarted(cluster, job, 1, timeout=120)
    info = wait_done(cluster, job, 240)
    runs = parse_output(counter.output(job))
    assert_resumed(counter, runs, lambda c: image_path(cluster, c))
    stops = [e for e in runs.events if e.get("event") == "runner.preempted"]
    assert len(stops) == len(runs.restored_from) == int(info["Restarts"]) >= 1
    assert all(e.get("signal") == "SIGUSR1" for e in stops), "every stop came from the walltime warning"
    finals = [e for e in runs.events if e.get("event") == "checkpoint.committed" and e.get("final")]
    assert [e["ckptid"] for e in finals] == runs.restored_from, "each run went on from the final image"
    for seg, nxt in zip(runs.segments, runs.segments[1:], strict=False):
        assert nxt[0] == seg[-1] + 1, "a final checkpoint loses no step"


def test_array_tasks_checkpoint_and_resume_independently(cluster: SlurmCluster, tmp_path: Path) -> None:
    tasks = {t: Counter(tmp_path, steps=40, delay=0.4, interval=2, tag=f"-{t}") for t in ("1", "2")}
    script = tasks["1"].script("--requeue", "--array=1-2", tag_var="-$SLURM_ARRAY_TASK_ID").replace(
        f"--output={tmp_path}/%j.out", f"--output={tmp_path}/%A_%a.out")
    array = cluster.sbatch(script)
    one, two = f"{array}_1", f"{array}_2"
    for t in (one, two):
        cluster.wait_state(t, ["RUNNING"], 60)
        wait_committed(cluster, t, 1)
    # USR1 to task 1's batch shell only: final checkpoint, exit 85, RequeueExit.
    cluster.cmd(["scancel", "--batch", "--signal=USR1", one])
    wait_restarted(cluster, one, 1)
    wait_done(cluster, one, 120)
    done_two = wait_done(cluster, two, 120)
    assert done_two["Restarts"] == "0", "the other task was never requeued"

    run_one = parse_output(tmp_path / f"{array}_1.out")
    assert_resumed(tasks["1"], run_one, lambda c: image_path(cluster, c))
    run_two = parse_output(tmp_path / f"{array}_2.out")
    assert not run_two.restored_from and run_two.segments[0] == list(range(40))
    assert int(tasks["2"].result.read_text()) == tasks["2"].expected
    for task, rows in ((t, catalog_rows(cluster, t)) for t in (one, two)):
        assert rows and all(r.job_id == task for r in rows)  # type: ignore[attr-defined]
    restored = verify_image(image_path(cluster, run_one.restored_from[0])).meta
    assert (restored.job_id, restored.array_job_id, restored.array_task_id) == (one, array, "1")
