"""A real Slurm cluster on this machine, for the end-to-end tests.

munged, slurmctld and three ``slurmd -N nodeX`` run in one temp dir, on
non-default ports and with a private munge socket, so they never clash with a
system Slurm or munge. Each node has 2 CPUs and jobs get whole nodes, so an
MPI job of 2 nodes x 2 ranks fits and one job fills one node. The cluster runs the project's own hooks: the
Prolog/Epilog/EpilogSlurmctld in slurm.conf are ``plugins/slurm/*``. Slurm
hands its hooks a fresh environment, so the hooks find hpcckpt, the store and
the site policy through the env file named by ``HPCCKPT_ENV_FILE``; a
one-line wrapper per hook sets that variable and execs the plugin script.

Every daemon runs in the foreground as our child and is stopped by its pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from hpcckpt.slurm.adapter import parse_show_job

REPO = Path(__file__).resolve().parents[2]
PLUGINS = REPO / "plugins" / "slurm"
NODES = ("node1", "node2", "node3")
# Two CPUs a node, so a 2 nodes x 2 ranks MPI job fits (the host has 2 cores;
# the "nodes" share them). Partitions are OverSubscribe=EXCLUSIVE so a job
# still takes whole nodes: one job per node, which the preemption tests rely
# on to fill the cluster with a known number of jobs.
CPUS_PER_NODE = 2
# Slurm's default is to hold a requeued job ~120 s (BeginTime); tests release it.
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"})


class ClusterError(RuntimeError):
    """The test cluster could not start or did not reach an expected state."""


def slurm_installed() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol"))


def _free_ports(n: int) -> list[int]:
    """Ports the kernel says are free now; held open together so they are distinct."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _hpcckpt_bin() -> str:
    venv = Path(sys.executable).parent / "hpcckpt"
    if venv.exists():
        return str(venv)
    found = shutil.which("hpcckpt")
    if not found:
        raise ClusterError("no hpcckpt executable next to the test interpreter or on PATH")
    return found


class SlurmCluster:
    """munged + slurmctld + 3 slurmd, configured with the project's hooks."""

    def __init__(self, base: Path | None = None, *, grace_time: int = 30,
                 cpus: Mapping[str, int] | None = None) -> None:
        self.base = Path(base) if base else Path(tempfile.mkdtemp(prefix="hpcckpt-slurm-"))
        self.grace_time = grace_time
        self.cpus = {n: CPUS_PER_NODE for n in NODES} | dict(cpus or {})  # more CPUs: several jobs per node
        self.conf = self.base / "slurm.conf"
        self.store = self.base / "store"
        self.staging = self.base / "staging"
        self.site_policy = self.base / "site-policy.yaml"
        self.env_file = self.base / "hpcckpt.env"
        self.hook_log = self.base / "log" / "hooks.log"
        self.munge_socket = self.base / "munge" / "munge.socket"
        self.hpcckpt = _hpcckpt_bin()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ctld_port, *self.node_ports = _free_ports(1 + len(NODES))

    # ---- environment -------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients and for jobs submitted to this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["HPCCKPT_STORE"] = str(self.store)
        env["HPCCKPT_SITE_POLICY"] = str(self.site_policy)
        env["PATH"] = f"{Path(self.hpcckpt).parent}:{env.get('PATH', '/usr/bin:/bin')}"
        # Submitting from inside a job (pytest under srun) must not leak its ids.
        for key in list(env):
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
                del env[key]
        return env

    # ---- configuration -----------------------------------------------

    def _write_conf(self) -> None:
        b = self.base
        for d in ("state", "log", "spool", "hooks", "munge", "jobs", *(f"tmp/{n}" for n in NODES)):
            (b / d).mkdir(parents=True, exist_ok=True)
        self.store.mkdir(mode=0o755, exist_ok=True)
        self.staging.mkdir(mode=0o755, exist_ok=True)
        nodes = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus[n]} RealMemory=1000 "
            "State=UNKNOWN"
            for n, p in zip(NODES, self.node_ports, strict=True)
        )
        allnodes = f"node[1-{len(NODES)}]"
        self.conf.write_text(
            f"""# generated by tests/slurm/cluster.py
ClusterName=hpcckpttest
SlurmctldHost=localhost
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
# Per node: srun --mpi=pmix makes the ranks' PMIx directory under TmpFS, named
# by job and step only, so "nodes" sharing one host would collide in /tmp.
TmpFS={b}/tmp/%n
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd-%n.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
# At preemption Slurm sends SIGTERM to the job steps only, never to the batch
# shell (which gets it when GraceTime is over, too late to checkpoint). With
# preempt_send_user_signal a job's own --signal (B:USR1 for `exec hpcckpt run`
# as the batch shell, USR1 for srun-launched ranks) is sent at once instead.
SlurmctldParameters=preempt_send_user_signal
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=10
MessageTimeout=10
# --- hpcckpt: the settings docs/slurm.md asks for ---
JobRequeue=1
RequeueExit=85
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PrologFlags=Alloc
Prolog={b}/hooks/prolog
Epilog={b}/hooks/epilog
EpilogSlurmctld={b}/hooks/epilog_slurmctld
{nodes}
PartitionName=low Nodes={allnodes} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 \
GraceTime={self.grace_time} PreemptMode=REQUEUE OverSubscribe=EXCLUSIVE
PartitionName=high Nodes={allnodes} Default=NO MaxTime=INFINITE State=UP PriorityTier=10 \
PreemptMode=OFF OverSubscribe=EXCLUSIVE
# Jobs share nodes here, one per CPU (the drain test puts several jobs on one node).
PartitionName=shared Nodes={allnodes} Default=NO MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=OFF
"""
        )
        self.site_policy.write_text(
            "storage:\n"
            f"  root: {self.store}\n"
            f"  staging: {self.staging}\n"
            "slurm:\n"
            "  drain_on_failed_check: false\n"
            "failure:\n"
            "  max_restarts: 3\n"
            "  backoff: 0\n"
            "  exclude_failed_node: true\n"
        )
        self.env_file.write_text(
            f"HPCCKPT_BIN={self.hpcckpt}\n"
            f"HPCCKPT_STORE={self.store}\n"
            f"HPCCKPT_SITE_POLICY={self.site_policy}\n"
            f"HPCCKPT_HOOK_LOG={self.hook_log}\n"
            f"SLURM_CONF={self.conf}\n"
            f"PATH={Path(self.hpcckpt).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
            # The hooks run the code under test (a worktree on PYTHONPATH), like the jobs, which inherit it.
            + (f"PYTHONPATH={os.environ['PYTHONPATH']}\n" if os.environ.get("PYTHONPATH") else "")
        )
        for hook in ("prolog", "epilog", "epilog_slurmctld"):
            wrapper = b / "hooks" / hook
            wrapper.write_text(
                f"#!/bin/sh\nHPCCKPT_ENV_FILE={self.env_file}\nexport HPCCKPT_ENV_FILE\n"
                f"exec {PLUGINS / hook}\n"
            )
            wrapper.chmod(0o755)

    def _start_munge(self) -> None:
        mdir = self.base / "munge"
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        shutil.chown(mdir, "munge", "munge")
        mdir.chmod(0o700)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        log = open(self.base / "log" / "munged.log", "ab")  # noqa: SIM115 - lives with the daemon
        self._procs["munged"] = subprocess.Popen(
            [
                "munged", "--foreground", "--force",
                f"--key-file={key}", f"--socket={self.munge_socket}",
                f"--pid-file={mdir / 'munged.pid'}", f"--seed-file={mdir / 'munged.seed'}",
                f"--log-file={mdir / 'munged.log'}",
            ],
            user="munge", group="munge", extra_groups=[], stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_for(lambda: self.munge_socket.exists(), 15, "munged socket", "munged")

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        log = open(self.base / "log" / f"{name}.out", "ab")  # noqa: SIM115 - lives with the daemon
        env = self.env
        self._procs[name] = subprocess.Popen(
            list(argv), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start(self) -> SlurmCluster:
        # Everything under base is reached by munge (socket) and by job users.
        self.base.chmod(0o755)
        self._write_conf()
        try:
            self._start_munge()
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._wait_for(self._ctld_up, 30, "slurmctld to answer", "slurmctld")
            for n in NODES:
                self.start_node(n)
            self._wait_for(self._nodes_idle, 60, "all nodes idle", None)
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(self, node: str) -> None:
        self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])

    def stop(self) -> None:
        """Stop by pid: slurmds, then slurmctld, then munged."""
        order = [k for k in self._procs if k.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def _wait_for(self, cond: Callable[[], bool], timeout: float, what: str, proc: str | None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc and self._procs[proc].poll() is not None:
                raise ClusterError(f"{proc} exited with {self._procs[proc].returncode}; see {self.base}/log")
            if cond():
                return
            time.sleep(0.3)
        raise ClusterError(f"timed out after {timeout}s waiting for {what}; see {self.base}/log")

    # ---- clients -------------------------------------------------------

    def cmd(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full = self.env
        if env:
            full.update(env)
        res = subprocess.run(list(argv), env=full, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise ClusterError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def _ctld_up(self) -> bool:
        return self.cmd(["scontrol", "ping"], check=False).returncode == 0 and "UP" in self.cmd(
            ["scontrol", "ping"], check=False
        ).stdout

    def node_states(self) -> dict[str, str]:
        out = self.cmd(["sinfo", "-N", "-h", "-o", "%N %T"], check=False).stdout
        states: dict[str, str] = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
        return states

    def _nodes_idle(self) -> bool:
        states = self.node_states()
        return len(states) == len(NODES) and all(s.rstrip("*") == "idle" for s in states.values())

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until every node is idle again (between tests)."""
        self._wait_for(self._nodes_idle, timeout, "all nodes idle", None)

    def sbatch(self, script: str, *options: str, env: Mapping[str, str] | None = None,
               args: Sequence[str] = ()) -> str:
        """Submit ``script`` (text) with sbatch ``options`` and script ``args``; returns the job id."""
        path = Path(tempfile.mkstemp(prefix="job-", suffix=".sh", dir=self.base / "jobs")[1])
        path.write_text(script)
        res = self.cmd(["sbatch", "--parsable", *options, str(path), *args], env=env)
        return res.stdout.strip().split(";")[0]

    def show_job(self, job_id: str) -> dict[str, str]:
        res = self.cmd(["scontrol", "-o", "show", "job", job_id])
        jobs = parse_show_job(res.stdout)
        for job in jobs:
            if job.get("JobId") == job_id:
                return job
        return jobs[0] if jobs else {}

    def job_state(self, job_id: str) -> str:
        return self.show_job(job_id).get("JobState", "")

    def wait_state(self, job_id: str, states: Iterable[str], timeout: float = 60) -> dict[str, str]:
        """Wait until ``job_id`` is in one of ``states``; returns its `scontrol show job` fields."""
        want = set(states)
        deadline = time.monotonic() + timeout
        last: dict[str, str] = {}
        while time.monotonic() < deadline:
            last = self.show_job(job_id)
            if last.get("JobState") in want:
                return last
            if last.get("JobState") in TERMINAL:
                break  # it will not move on from here
            time.sleep(0.5)
        raise ClusterError(
            f"job {job_id} is {last.get('JobState')!r} (reason {last.get('Reason')!r}), "
            f"not one of {sorted(want)}; see {self.base}/log"
        )

    def wait_job(self, job_id: str, cond: Callable[[dict[str, str]], bool], what: str,
                 timeout: float = 60) -> dict[str, str]:
        """Wait until ``cond`` holds for the job's `scontrol show job` fields; returns them.

        For transitions a state cannot show reliably: a requeued job may pass
        through PENDING faster than one poll, but its ``Restarts`` stays counted.
        """
        deadline = time.monotonic() + timeout
        last: dict[str, str] = {}
        while time.monotonic() < deadline:
            last = self.show_job(job_id)
            if cond(last):
                return last
            if last.get("JobState") in TERMINAL:
                break
            time.sleep(0.5)
        raise ClusterError(
            f"job {job_id} is {last.get('JobState')!r} (reason {last.get('Reason')!r}, restarts "
            f"{last.get('Restarts')!r}), still not {what}; see {self.base}/log"
        )

    def release(self, job_id: str) -> None:
        """End the ~120 s BeginTime hold Slurm puts on a requeued job."""
        self.cmd(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=False)

    def kill_node(self, node: str, reason: str = "test: node failure") -> None:
        """Simulate a node failure: kill its slurmd, then mark it down (requeues its jobs)."""
        proc = self._procs.pop(f"slurmd-{node}", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        self.cmd(["scontrol", "update", f"nodename={node}", "state=down", f"reason={reason}"])

    def revive_node(self, node: str) -> None:
        self.start_node(node)
        self.cmd(["scontrol", "update", f"nodename={node}", "state=resume"], check=False)
        self._wait_for(lambda: self.node_states().get(node, "").rstrip("*") in ("idle", "allocated", "mixed"),
                       60, f"{node} to come back", None)

    def cancel_all(self) -> None:
        self.cmd(["scancel", "--user=root"], check=False)

    def hook_log_text(self) -> str:
        return self.hook_log.read_text() if self.hook_log.exists() else ""

