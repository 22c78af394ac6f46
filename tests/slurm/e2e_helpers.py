"""What the end-to-end tests share: a counter workload, and the checks that it resumed.

The workload counts ``0..N-1``, one step every ``delay`` seconds. Each step
goes to two places:

* ``step I`` on stdout, which the runner copies into the job's Slurm output
  file. That file is only ever appended to, so it keeps every run: the
  runner's ``resume.restored`` event (one JSON line on stderr, same file)
  separates what the first run printed from what the restored one printed.
* ``I`` on a *trace* file the workload keeps open. Its size is in every
  image (the job's open files), and a restore cuts a file that grew back to
  that size; so the image tells which step the checkpoint held, and a job
  that went on from its checkpoint leaves a trace of exactly ``0..N-1``.

At the end the workload writes the sum of its steps, the "final result" an
uninterrupted run also writes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hpcckpt.catalog import Status, open_catalog
from hpcckpt.context import current_user
from hpcckpt.image import verify_image
from tests.slurm.cluster import SlurmCluster

WORKLOAD = """\
import sys, time
n, trace, result, delay = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
total = 0
with open(trace, "a") as t:
    for i in range(n):
        total += i
        t.write(f"{i}\\n")
        t.flush()
        print(f"step {i}", flush=True)
        time.sleep(delay)
with open(result, "w") as f:
    f.write(f"{total}\\n")
"""


@dataclass
class Counter:
    """One counter job's files, all in the test's temp dir (never the repo)."""

    dir: Path
    steps: int
    delay: float = 0.5
    interval: int = 3
    tag: str = ""  # an array task's files: trace-TAG, result-TAG

    @property
    def trace(self) -> Path:
        return self.dir / f"trace{self.tag}"

    @property
    def result(self) -> Path:
        return self.dir / f"result{self.tag}"

    @property
    def expected(self) -> int:
        return sum(range(self.steps))

    def output(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.out"

    def script(self, *sbatch: str, tag_var: str = "") -> str:
        """The batch script: ``#SBATCH`` lines (output and workdir in the temp dir), then ``exec hpcckpt run``.

        Output and working dir are in the script itself, so a job resubmitted
        from its saved script (``resume --submit``) writes there too. ``tag_var``
        (e.g. ``$SLURM_ARRAY_TASK_ID``) gives each array task its own files.
        """
        prog = self.dir / "counter.py"
        prog.write_text(WORKLOAD)
        # Keep every image: the test reads the one each run was restored from.
        policy = self.dir / "policy.yaml"
        policy.write_text("retention:\n  keep_last: 1000\n")
        lines = [
            "#!/bin/sh",
            f"#SBATCH --output={self.dir}/%j.out",
            "#SBATCH --open-mode=append",
            f"#SBATCH --chdir={self.dir}",
            *(f"#SBATCH {opt}" for opt in sbatch),
            f"exec hpcckpt run --policy {policy} --interval {self.interval} -- /usr/bin/python3 -u {prog} {self.steps} "
            f"{self.dir}/trace{tag_var} {self.dir}/result{tag_var} {self.delay}",
        ]
        return "\n".join(lines) + "\n"


@dataclass
class Runs:
    """The job's output file, cut at each ``resume.restored`` event."""

    segments: list[list[int]] = field(default_factory=list)  # step values printed by each run
    restored_from: list[int] = field(default_factory=list)  # ckptid each restored run started from
    events: list[dict[str, object]] = field(default_factory=list)  # every JSON log line, in order


# One of the runner's log lines. The job's own output and the runner's log share the Slurm output
# file, and a job may write a line in parts (``python -u`` writes ``print``'s text and its newline
# with two calls), so a log line can land in the middle of one of the job's lines.
_LOG_LINE = re.compile(r'(\{"ts":[^\n]*\n)')


def parse_output(*paths: Path) -> Runs:
    """Split the output file at each ``resume.restored`` event; a job line belongs to the run that began it."""
    runs = Runs(segments=[[]])
    for path in paths:
        pending, owner = "", 0  # the job's line being assembled, and the segment it began in
        for piece in _LOG_LINE.split(path.read_text(errors="replace")):
            if piece.startswith('{"ts":'):
                try:
                    doc = json.loads(piece)
                except ValueError:
                    continue
                runs.events.append(doc)
                if doc.get("event") == "resume.restored":
                    runs.segments.append([])
                    runs.restored_from.append(int(str(doc["ckptid"])))
                    if not pending:
                        owner = len(runs.segments) - 1
                continue
            *lines, rest = (pending + piece).split("\n")
            for line in lines:
                line = line.strip()
                if line.startswith("step "):
                    runs.segments[owner].append(int(line.split()[1]))
                owner = len(runs.segments) - 1
            pending = rest
        if pending.strip().startswith("step "):
            runs.segments[owner].append(int(pending.split()[1]))
    return runs


def checkpointed_step(image: str | Path, trace: Path) -> int:
    """The last step the job had done in ``image``: read from the trace size the image recorded."""
    summary = verify_image(image)
    sizes = [f.size for f in summary.files if f.path == str(trace)]
    if not sizes:
        raise AssertionError(f"{image}: the trace {trace} is not among the job's open files")
    done = trace.read_bytes()[: sizes[0]].decode().split()
    return int(done[-1]) if done else -1


def assert_resumed(counter: Counter, runs: Runs, image_of: Callable[[int], str]) -> list[int]:
    """Each restored run went on at its image's step + 1, and the job ended as an uninterrupted run.

    Returns the step each restored run started at.
    """
    assert int(counter.result.read_text()) == counter.expected, "final result differs from an uninterrupted run"
    assert counter.trace.read_text().split() == [str(i) for i in range(counter.steps)], (
        "the trace must hold each step once: restores went on from their image, not from scratch"
    )
    assert runs.restored_from, f"no resume.restored event in the output; runs: {runs.segments}"
    assert runs.segments[0][:1] == [0], "the first run started at step 0"
    starts = []
    for seg, ckptid in zip(runs.segments[1:], runs.restored_from, strict=True):
        at = checkpointed_step(image_of(ckptid), counter.trace)
        assert seg, f"the run restored from checkpoint {ckptid} printed nothing"
        assert seg[0] == at + 1 > 0, f"restored from checkpoint {ckptid} at step {at}, but went on at {seg[0]}"
        assert seg == list(range(seg[0], seg[0] + len(seg))), f"restored run skipped steps: {seg}"
        starts.append(seg[0])
    assert runs.segments[-1][-1] == counter.steps - 1, "the last run counted to the end"
    return starts


def catalog_rows(cluster: SlurmCluster, job_id: str, *, committed: bool = True) -> list[object]:
    user = current_user()
    cat = open_catalog(None, cluster.store, user)
    try:
        rows = cat.list(job_id, uid=user.uid)
    finally:
        cat.close()
    return [r for r in rows if not committed or r.status is Status.COMMITTED]


def image_path(cluster: SlurmCluster, ckptid: int) -> str:
    user = current_user()
    cat = open_catalog(None, cluster.store, user)
    try:
        rec = cat.get(ckptid)
    finally:
        cat.close()
    assert rec is not None and rec.path, f"checkpoint {ckptid} is not in the catalog"
    return str(rec.path)


def wait_for(cond: Callable[[], bool], timeout: float, what: str, poll: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_committed(cluster: SlurmCluster, job_id: str, n: int, timeout: float = 60) -> None:
    wait_for(lambda: len(catalog_rows(cluster, job_id)) >= n, timeout, f"{n} committed checkpoints of {job_id}")


def wait_restarted(cluster: SlurmCluster, job_id: str, restarts: int, timeout: float = 90,
                   release_after: float = 20) -> dict[str, str]:
    """Wait until the job runs again after its ``restarts``-th requeue; returns its fields.

    The EpilogSlurmctld lifts Slurm's ~120 s BeginTime hold (policy backoff 0);
    should it not within ``release_after`` seconds, the test lifts it, so a slow
    hook costs time, not the test.
    """
    t0 = time.monotonic()
    released = False

    def running_again() -> bool:
        nonlocal released
        info = cluster.show_job(job_id)
        if int(info.get("Restarts", "0") or 0) < restarts:
            return False
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime" and not released \
                and time.monotonic() - t0 > release_after:
            cluster.release(job_id)
            released = True
        return info.get("JobState") in ("RUNNING", "COMPLETED")

    wait_for(running_again, timeout, f"job {job_id} to run again after restart {restarts} "
             f"(now {_brief(cluster, job_id)})", poll=0.5)
    return cluster.show_job(job_id)


def wait_done(cluster: SlurmCluster, job_id: str, timeout: float = 180, release_after: float = 20) -> dict[str, str]:
    """Wait for COMPLETED through any number of requeues, lifting a BeginTime hold the hook left."""
    held_since: dict[str, float] = {}

    def done() -> bool:
        info = cluster.show_job(job_id)
        state = info.get("JobState")
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            raise AssertionError(f"job {job_id} ended {state} ({_brief(cluster, job_id)}); see {cluster.base}/log")
        if state == "PENDING" and info.get("Reason") == "BeginTime":
            since = held_since.setdefault(info.get("Restarts", "0"), time.monotonic())
            if time.monotonic() - since > release_after:
                cluster.release(job_id)
        return state == "COMPLETED"

    wait_for(done, timeout, f"job {job_id} to complete (now {_brief(cluster, job_id)})", poll=0.5)
    return cluster.show_job(job_id)


def _brief(cluster: SlurmCluster, job_id: str) -> str:
    info = cluster.show_job(job_id)
    return " ".join(f"{k}={info.get(k)}" for k in ("JobState", "Reason", "Restarts", "NodeList", "ExitCode"))


# ---- processes -----------------------------------------------------------------


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _pids() -> Iterable[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def _ours(env: dict[str, str], cluster: SlurmCluster) -> bool:
    # Other test clusters on this machine number their jobs from 1 too: only
    # processes started under this cluster's slurm.conf are this test's.
    return env.get("SLURM_CONF") == str(cluster.conf)


def job_processes(cluster: SlurmCluster, job_id: str) -> list[int]:
    """Pids whose environment says they belong to job ``job_id``: its runner and the whole job tree.

    A restored job keeps the environment it was checkpointed with, so the
    tree carries ``HPCCKPT_JOB_ID`` (set by the runner for its job) and the
    Slurm job id it first ran under.
    """
    me = os.getpid()
    out = []
    for pid in _pids():
        if pid == me:
            continue
        env = _environ(pid)
        if _ours(env, cluster) and (env.get("SLURM_JOB_ID") == job_id or env.get("HPCCKPT_JOB_ID") == job_id):
            out.append(pid)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def stepd_pids(cluster: SlurmCluster, job_id: str) -> list[int]:
    """The job's slurmstepd processes (``slurmstepd: [JOB.batch]`` and friends)."""
    return [p for p in _pids() if cmdline(p).startswith(f"slurmstepd: [{job_id}.") and _ours(_environ(p), cluster)]


def outside_step(cluster: SlurmCluster, job_id: str, pids: Iterable[int]) -> list[int]:
    """Of ``pids``, those with no ``slurmstepd: [JOB...]`` among their ancestors."""
    stepds = set(stepd_pids(cluster, job_id))
    bad = []
    for pid in pids:
        cur, seen = pid, 0
        while cur > 1 and cur not in stepds and seen < 64:
            cur, seen = ppid(cur), seen + 1
        if cur not in stepds and cmdline(pid):
            bad.append(pid)
    return bad


def kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def fail_node(cluster: SlurmCluster, node: str, job_id: str) -> list[int]:
    """A node failure as the job sees it: its slurmd, its slurmstepd and its processes die at once.

    Killing slurmd alone leaves the job running, so the job's step daemon and
    every process of the job are SIGKILLed too (by pid), before the node is
    marked down. Returns the pids killed.
    """
    procs = cluster._procs.get(f"slurmd-{node}")  # the test cluster owns this slurmd
    victims = [*stepd_pids(cluster, job_id), *job_processes(cluster, job_id)]
    assert victims, f"no process of job {job_id} found to kill"
    if procs is not None:
        procs.kill()
        procs.wait(10)
    kill_pids(victims)
    wait_for(lambda: not [p for p in victims if Path(f"/proc/{p}").exists() and _alive(p)], 20,
             f"the processes of job {job_id} on {node} to die")
    cluster.kill_node(node)
    return victims


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
