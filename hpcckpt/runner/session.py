"""Wiring for ``hpcckpt run`` and ``hpcckpt resume``: policy, store, catalog, engine, runner.

Kept apart from the CLI so that the Slurm hooks and tests start jobs the same
way the command line does.

Where things go:

* images: the store (``--store``, ``$HPCCKPT_STORE``, policy ``storage.root``);
* CRIU's raw dump: a node-local staging directory, ``STAGING/USER/JOB``
  where STAGING is ``$HPCCKPT_STAGING`` or policy ``storage.staging`` (the
  layout the Slurm prolog creates), else ``$TMPDIR/hpcckpt-staging-UID`` or
  ``/var/tmp/...``; every level below the base is 0700 and the user's.

When ``hpcckpt run`` resumes instead of starting: after a Slurm requeue
(same ``SLURM_JOB_ID`` and ``SLURM_RESTART_COUNT`` > 0), with
``--resume-if-possible`` (a local job id given again), or with
``$HPCCKPT_RESUME_FROM=JOBID`` (a resubmitted job, see ``hpcckpt resume
--submit``). If the job has no committed image yet, CMD is started.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcckpt import log as hlog
from hpcckpt.catalog import Catalog, open_catalog
from hpcckpt.checkpoint import Checkpointer, JobInfo, PackSettings
from hpcckpt.context import User, current_user, resolve_catalog_url, resolve_store_root
from hpcckpt.engine.base import CheckpointEngine, DumpOptions
from hpcckpt.engine.criu import Criu
from hpcckpt.errors import NotFoundError, UsageError
from hpcckpt.fsutil import ensure_private_dir, safe_job_component
from hpcckpt.jobid import JobIdentity, resolve
from hpcckpt.policy import Policy, load_policy
from hpcckpt.policy.daly import choose_interval
from hpcckpt.resume import Restored, Resumer
from hpcckpt.retention import RetentionPolicy, apply_retention
from hpcckpt.runner.control import ControlServer
from hpcckpt.runner.launch import StdioPipes, set_child_subreaper, spawn_in_pid_namespace
from hpcckpt.runner.runner import Runner, RunnerConfig, SignalPlan
from hpcckpt.store import Store

_log = hlog.get("session")
RESUME_FROM_ENV = "HPCCKPT_RESUME_FROM"


@dataclass
class SessionOptions:
    store: str | None = None
    catalog: str | None = None
    policy: str | None = None
    interval: str | None = None  # "600", "10m", "auto"; None: policy
    deadline: float | None = None  # seconds for a final checkpoint; None: policy grace_time - grace_margin
    signals: Sequence[str] | None = None


@dataclass
class Environment:
    """Everything a run or resume needs, resolved once."""

    policy: Policy
    user: User
    store_root: Path
    store: Store
    catalog: Catalog
    engine: CheckpointEngine


def load_environment(opts: SessionOptions, engine: CheckpointEngine | None = None) -> Environment:
    cli: dict[str, Any] = {}
    if opts.interval is not None:
        cli["interval"] = opts.interval
    pol = load_policy(user_file=Path(opts.policy) if opts.policy else None, cli=cli or None)
    user = current_user()
    root = resolve_store_root(opts.store, pol.storage.root)
    catalog = open_catalog(resolve_catalog_url(opts.catalog, pol.storage.catalog), root, user)
    return Environment(pol, user, root, Store(root, user), catalog, engine or Criu.locate())


def staging_dir(env: Environment, job_id: str) -> Path:
    configured = os.environ.get("HPCCKPT_STAGING") or env.policy.storage.staging
    if configured:
        base = Path(configured)
        path = base / env.user.name / safe_job_component(job_id)
    else:
        base = Path(os.environ.get("TMPDIR") or "/var/tmp")
        path = base / f"hpcckpt-staging-{env.user.uid}" / safe_job_component(job_id)
    ensure_private_dir(path, env.user.uid, env.user.gid, base=base)
    return path


def interval_chooser(pol: Policy) -> Callable[[list[float]], float | None]:
    def choose(costs: list[float]) -> float | None:
        seconds, inputs = choose_interval(pol, costs)
        hlog.event(_log, "runner.interval", f"next checkpoint in {seconds} s", 10, **inputs)
        return float(seconds) if seconds > 0 else None

    return choose


def deadline_seconds(pol: Policy, cli: float | None) -> float:
    if cli is not None:
        if cli <= 0:
            raise UsageError(f"--deadline must be positive, got {cli}")
        return cli
    return max(1.0, float(pol.preemption.grace_time) - float(pol.preemption.grace_margin))


def _runner(env: Environment, opts: SessionOptions, ident: JobIdentity, job: JobInfo) -> Runner:
    pol = env.policy
    retention = RetentionPolicy.from_policy(pol)

    def apply() -> None:
        apply_retention(env.catalog, env.store, retention, job_id=ident.job_id)

    ckpt = Checkpointer(
        engine=env.engine, store=env.store, catalog=env.catalog, job=job,
        staging_root=staging_dir(env, ident.job_id), options=DumpOptions.from_policy(pol),
        pack=PackSettings.from_policy(pol), retention=apply,
    )
    cfg = RunnerConfig(
        job_id=ident.job_id,
        interval=interval_chooser(pol),
        deadline_s=deadline_seconds(pol, opts.deadline),
        signals=SignalPlan.from_names(list(opts.signals or pol.preemption.signals)),
    )
    control: ControlServer | None
    try:
        control = ControlServer(ident.job_id, uid=env.user.uid, gid=env.user.gid)
    except UsageError as err:
        # A second restore of the same image (a test of a copy, a migration in progress) still runs
        # and checkpoints; only 'hpcckpt checkpoint JOBID' cannot reach it.
        hlog.event(_log, "runner.no_control", f"{err}; this runner takes no checkpoint requests", 30)
        control = None
    return Runner(cfg, ckpt, control)


def _resumer(env: Environment, job_id: str) -> Resumer:
    return Resumer(engine=env.engine, catalog=env.catalog, user=env.user, staging_root=staging_dir(env, job_id),
                   options=DumpOptions.from_policy(env.policy), grown_files=env.policy.restore.grown_files)


def _interval_for_env(pol: Policy) -> str:
    return str(pol.interval)


def _announce(ident: JobIdentity) -> None:
    if ident.source == "generated":
        sys.stderr.write(f"hpcckpt: job id {ident.job_id} (resume it with: hpcckpt resume {ident.job_id})\n")
        sys.stderr.flush()


def run_job(
    argv: Sequence[str],
    opts: SessionOptions,
    *,
    job_id: str | None = None,
    resume_if_possible: bool = False,
    engine: CheckpointEngine | None = None,
) -> int:
    """``hpcckpt run``: start (or auto-resume) the job, checkpoint it, return its exit status."""
    if not argv:
        raise UsageError("no command given", hint="hpcckpt run [OPTIONS] -- COMMAND [ARGS...]")
    ident = resolve(job_id)
    env = load_environment(opts, engine)
    resume_from = os.environ.get(RESUME_FROM_ENV) or None
    want_resume = ident.requeued or resume_if_possible or resume_from is not None
    restored: Restored | None = None
    source_job = resume_from or ident.job_id
    set_child_subreaper()
    if want_resume:
        try:
            restored = _resumer(env, ident.job_id).resume(source_job)
        except NotFoundError as err:
            hlog.event(_log, "runner.fresh_start", f"nothing to resume for job {source_job} ({err}); "
                       "starting the command", job_id=ident.job_id)
    _announce(ident)
    job_env = dict(os.environ)
    job_env.update({"HPCCKPT_JOB_ID": ident.job_id, "HPCCKPT_STORE": str(env.store_root),
                    "HPCCKPT_CKPT_INTERVAL": _interval_for_env(env.policy)})
    if restored is not None:
        meta = restored.summary.meta
        job = JobInfo(identity=ident, user=env.user, cmdline=list(meta.cmdline), cwd=meta.cwd,
                      stdio=dict(restored.pipes.resources), interval=None, policy_digest=env.policy.digest())
        runner = _runner(env, opts, ident, job)
        runner.install_signals()
        runner.attach(restored.pid, restored.pipes.out_r, restored.pipes.err_r)
    else:
        pipes = StdioPipes.create()
        job = JobInfo(identity=ident, user=env.user, cmdline=list(argv), cwd=os.getcwd(),
                      stdio=dict(pipes.resources), interval=None, policy_digest=env.policy.digest())
        runner = _runner(env, opts, ident, job)
        runner.install_signals()
        try:
            pid = spawn_in_pid_namespace(argv, env=job_env, cwd=os.getcwd(), pipes=pipes)
        finally:
            pipes.close_write_ends()
        hlog.event(_log, "runner.started", f"job {ident.job_id} started as pid {pid}", job_id=ident.job_id, pid=pid,
                   node=socket.gethostname())
        runner.attach(pid, pipes.out_r, pipes.err_r)
    return _drive(runner)


def resume_job(job_id: str, opts: SessionOptions, *, ckptid: int | None = None,
               engine: CheckpointEngine | None = None) -> int:
    """``hpcckpt resume``: restore the job as our child, keep checkpointing it, return its exit status."""
    env = load_environment(opts, engine)
    ident = JobIdentity(job_id, "cli")
    set_child_subreaper()
    restored = _resumer(env, job_id).resume(job_id, ckptid)
    meta = restored.summary.meta
    ident = JobIdentity(job_id, "cli", meta.requeue_count, meta.array_job_id, meta.array_task_id, meta.step)
    for line in restored.fallbacks:
        sys.stderr.write(f"hpcckpt: warning: {line}\n")
    sys.stderr.write(f"hpcckpt: job {job_id} resumed from checkpoint {restored.ckptid}\n")
    sys.stderr.flush()
    job = JobInfo(identity=ident, user=env.user, cmdline=list(meta.cmdline), cwd=meta.cwd,
                  stdio=dict(restored.pipes.resources), interval=None, policy_digest=env.policy.digest())
    runner = _runner(env, opts, ident, job)
    runner.install_signals()
    runner.attach(restored.pid, restored.pipes.out_r, restored.pipes.err_r)
    return _drive(runner)


def _drive(runner: Runner) -> int:
    try:
        return runner.loop()
    finally:
        runner.restore_signals()
        if runner.control is not None:
            runner.control.close()
        runner.ckpt.catalog.close()
