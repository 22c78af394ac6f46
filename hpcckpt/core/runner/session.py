"""Wiring for ``hpcckpt run`` and ``hpcckpt resume``: policy, store, catalog, engine, runner.

Kept apart from the CLI so that the Slurm hooks and tests start jobs the same
way the command line does.

Where things go:

* images: the store (``--store``, ``$HPCCKPT_STORE``, policy ``storage.root``);
* CRIU's raw dump: node-local staging, ``BASE/USER/JOB/stage-*``, where
  BASE is ``/dev/shm/hpcckpt-staging`` when the node has the memory for the
  dump (checked at each checkpoint), else ``$HPCCKPT_STAGING`` or policy
  ``storage.staging`` (the layouts the Slurm prolog creates and the epilog
  salvages), else ``$TMPDIR/hpcckpt-staging-UID`` or ``/var/tmp/...``;
  every level below the base is 0700 and the user's. The flusher publishes
  each staged dump in the background (:mod:`hpcckpt.core.checkpoint`);
* after a restore, the next checkpoint is incremental on the image the job
  was restored from, so the chain goes on across restarts.

When ``hpcckpt run`` resumes instead of starting: after a Slurm requeue
(same ``SLURM_JOB_ID`` and ``SLURM_RESTART_COUNT`` > 0), with
``--resume-if-possible`` (a local job id given again), or with
``$HPCCKPT_RESUME_FROM=JOBID`` (a resubmitted job, see ``hpcckpt resume
--submit``). If the job has no committed image yet, CMD is started.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hpcckpt import log as hlog
from hpcckpt.catalog import Catalog
from hpcckpt.context import User, current_user, node_name
from hpcckpt.core.checkpoint import CriuCheckpointer, JobInfo
from hpcckpt.core.launch import scratch
from hpcckpt.core.launch.network import HOST, JobNetwork
from hpcckpt.core.launch.spawn import StdioPipes, set_child_subreaper, spawn_in_pid_namespace
from hpcckpt.core.lease import DEFAULT_TTL_S, Lease, LeaseRecord, LeaseState, acquire
from hpcckpt.core.pipeline.compress import compression_workers
from hpcckpt.core.pipeline.flush import FlushSettings, Publisher, StorePublisher
from hpcckpt.core.pipeline.predump import PreDumpPlan, plan_predump
from hpcckpt.core.resume import Restored, Resumer
from hpcckpt.core.runner import lazywatch
from hpcckpt.core.runner.control import ControlServer
from hpcckpt.core.runner.runner import Runner, RunnerConfig, SignalPlan, SignalQueue
from hpcckpt.core.security import become
from hpcckpt.criu.engine import Criu
from hpcckpt.criu.interface import CheckpointEngine, DumpOptions
from hpcckpt.errors import HpcckptError, JobFinishedError, NotFoundError, UsageError
from hpcckpt.exitcodes import EXIT_REQUEUE
from hpcckpt.image.parent import index_image
from hpcckpt.image.refs import ParentIndex
from hpcckpt.jobid import JobIdentity, resolve
from hpcckpt.observe.metrics import close_job_metrics, start_job_metrics
from hpcckpt.policy import Policy
from hpcckpt.policy.daly import choose_interval
from hpcckpt.progress import terminal_progress
from hpcckpt.store.images import Store
from hpcckpt.store.retention import RetentionRules, apply_retention
from hpcckpt.store.site import Site

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

    def recorded(self) -> dict[str, Any]:
        """What a later resume keeps of this run's options (the job's lease row holds it)."""
        doc: dict[str, Any] = {}
        if self.interval is not None:
            doc["interval"] = str(self.interval)
        if self.deadline is not None:
            doc["deadline"] = float(self.deadline)
        if self.signals:
            doc["signals"] = [str(x) for x in self.signals]
        if self.policy:
            doc["policy"] = os.path.abspath(self.policy)
        return doc

    def over(self, recorded: dict[str, Any]) -> SessionOptions:
        """These options (the command line's), falling back to the job's recorded ones where not given."""
        def pick(key: str, mine: Any, kind: type | tuple[type, ...]) -> Any:
            if mine is not None:
                return mine
            value = recorded.get(key)
            return value if isinstance(value, kind) else None

        policy = pick("policy", self.policy, str)
        if policy is not None and self.policy is None and not os.path.isfile(policy):
            hlog.event(_log, "resume.policy_gone", f"the job ran with policy file {policy}, which is gone; "
                       "resuming with the default policy", 30)
            policy = None
        signals = self.signals or recorded.get("signals") or None
        deadline = pick("deadline", self.deadline, (int, float))
        return SessionOptions(store=self.store, catalog=self.catalog, policy=policy,
                              interval=pick("interval", self.interval, str),
                              deadline=None if deadline is None else float(deadline),
                              signals=[str(x) for x in signals] if signals else None)


@dataclass
class Environment:
    """Everything a run or resume needs: the site, and what it opened for this user."""

    site: Site
    user: User
    store: Store
    catalog: Catalog  # the main thread's connection; open_catalog() gives more
    engine: CheckpointEngine
    network: JobNetwork = field(default_factory=lambda: JobNetwork(HOST, outside=False))

    @property
    def policy(self) -> Policy:
        return self.site.policy

    @property
    def store_root(self) -> Path:
        return self.site.store_root

    @property
    def catalog_url(self) -> str | None:
        return self.site.catalog_url

    def open_catalog(self) -> Catalog:
        return self.site.open_catalog(self.user)


def load_site(opts: SessionOptions) -> Site:
    """The site for ``run``/``resume``: their flags, the environment, the policy (with ``--interval``)."""
    cli = {"interval": opts.interval} if opts.interval is not None else None
    return Site.load(store=opts.store, catalog=opts.catalog, policy_file=opts.policy, cli=cli)


def load_environment(opts: SessionOptions, engine: CheckpointEngine | None = None) -> Environment:
    site = load_site(opts)
    user = current_user()
    pol = site.policy
    return Environment(site, user, site.store(user), site.open_catalog(user), engine or site.engine(),
                       JobNetwork(pol.job.network, outside=pol.job.outside))


def disk_staging_base(env: Environment) -> Path:
    """Node-local disk staging: ``$HPCCKPT_STAGING`` or ``storage.staging`` (the layout the Slurm prolog
    makes), else a per-uid directory in ``$TMPDIR`` or /var/tmp. Jobs stage in ``BASE/USER/JOB``."""
    return env.site.staging().disk or Path(os.environ.get("TMPDIR") or "/var/tmp") / f"hpcckpt-staging-{env.user.uid}"


def interval_chooser(pol: Policy, record: dict[str, Any] | None = None) -> Callable[[list[float]], float | None]:
    """The runner's interval function; ``record`` (the job's JobInfo.interval) keeps the latest choice."""
    last: list[int] = []

    def choose(costs: list[float]) -> float | None:
        seconds, inputs = choose_interval(pol, costs)
        if record is not None:
            record.clear()
            record.update(inputs, seconds=seconds)
        # Said once at info level when it changes (an ``auto`` interval moves with the measured cost).
        level = 20 if last != [seconds] else 10
        last[:] = [seconds]
        hlog.event(_log, "runner.interval", f"checkpoint interval {seconds} s ({inputs.get('mode')})", level,
                   **inputs)
        return float(seconds) if seconds > 0 else None

    return choose


def deadline_seconds(pol: Policy, cli: float | None) -> float:
    if cli is not None:
        if cli <= 0:
            raise UsageError(f"--deadline must be positive, got {cli}")
        return cli
    return max(1.0, float(pol.preemption.grace_time) - float(pol.preemption.grace_margin))


PublisherFactory = Callable[[Environment], Publisher]


def store_publisher(env: Environment) -> Publisher:
    """The real publisher: the store, with a catalog connection per thread (the flusher has its own)."""
    return StorePublisher(env.store, env.open_catalog)


def _predump_plan(engine: CheckpointEngine) -> PreDumpPlan | None:
    if isinstance(engine, Criu):
        try:
            return plan_predump(engine)
        except HpcckptError as err:
            hlog.event(_log, "runner.predump_probe", f"cannot probe CRIU for memory tracking: {err}", 30)
    return None


def _chain_parent(env: Environment, restored: Restored | None) -> ParentIndex | None:
    """After a restore, the next checkpoint is incremental on the image restored from (never a gap)."""
    if restored is None or restored.image is None or not env.policy.pipeline.incremental:
        return None
    try:
        return index_image(restored.image)
    except HpcckptError as err:
        hlog.event(_log, "runner.no_parent", f"{restored.image} cannot be the next checkpoint's parent: {err}; "
                   "the next checkpoint is a full image", 30)
        return None


def _runner(env: Environment, opts: SessionOptions, ident: JobIdentity, job: JobInfo, signals: SignalQueue, *,
            parent: ParentIndex | None = None, publisher: PublisherFactory | None = None) -> Runner:
    pol = env.policy
    retention = RetentionRules.from_policy(pol)

    def apply(cat: Catalog) -> None:
        apply_retention(cat, env.store, retention, job_id=ident.job_id)

    codec = str(pol.storage.compression.codec)
    ckpt = CriuCheckpointer(
        engine=env.engine, store=env.store, catalog=env.catalog, job=job, options=DumpOptions.from_policy(pol),
        flush=FlushSettings.from_policy(pol, workers=compression_workers(codec)),
        publisher=(publisher or store_publisher)(env), disk_staging=disk_staging_base(env), parent=parent,
        retention=apply, predump=_predump_plan(env.engine), epilog_salvages=bool(os.environ.get("SLURM_JOB_ID")),
        external_connections=pol.job.external_connections, scratch_limit=int(pol.job.scratch_max),
        after_attempt=start_job_metrics(pol.metrics.textfile, ident.job_id, env.user, disk_staging_base(env),
                                        env.catalog),
    )
    cfg = RunnerConfig(
        job_id=ident.job_id,
        interval=interval_chooser(pol, job.interval),
        deadline_s=deadline_seconds(pol, opts.deadline),
        signals=signals.plan,
        async_flush=bool(pol.pipeline.async_flush),
    )
    control: ControlServer | None
    try:
        control = ControlServer(ident.job_id, uid=env.user.uid, gid=env.user.gid)
    except UsageError as err:
        # A second restore of the same image (a test of a copy, a migration in progress) still runs
        # and checkpoints; only 'hpcckpt checkpoint JOBID' cannot reach it.
        hlog.event(_log, "runner.no_control", f"{err}; this runner takes no checkpoint requests", 30)
        control = None
    return Runner(cfg, ckpt, control, signals)


def _resumer(env: Environment) -> Resumer:
    # A job restored into a fresh network namespace gets its outside link before CRIU restores a socket.
    options = replace(DumpOptions.from_policy(env.policy), on_netns=env.network.attach)
    return Resumer(engine=env.engine, catalog=env.catalog, user=env.user, disk_staging=disk_staging_base(env),
                   options=options, grown_files=env.policy.restore.grown_files,
                   stream=env.policy.restore.stream, lazy=env.policy.restore.lazy,
                   lazy_threshold=env.policy.restore.lazy_threshold)


def _restored(env: Environment, job_id: str, ckptid: int | None = None, *, as_job: str | None = None,
              before: int | None = None) -> Restored:
    started = time.time()
    restored = _resumer(env).resume(job_id, ckptid, before)
    env.network.after_restore(restored.pid, restored.summary.meta.extra)
    _record_restored(env, as_job or job_id, restored, started)
    return restored


def _scratch_of(restored: Restored) -> list[str]:
    paths = restored.summary.meta.extra.get("scratch")
    return [str(p) for p in paths] if isinstance(paths, list) else []


def _record_restored(env: Environment, job_id: str, restored: Restored, started: float) -> None:
    """A ``restored`` job event: when this run began restoring which image, and for how long.

    ``hpcckpt drain --json`` reads it to split a moved job's downtime into
    Slurm's scheduling (the final image's commit to this start) and the restore.
    """
    # restore_s: from the start of the resume (image checks, unpack or stream) until the job runs again.
    detail = {"ckptid": restored.ckptid, "started": round(started, 3), "restore_s": round(time.time() - started, 3),
              "criu_s": round(restored.restore_s, 3), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    try:
        env.catalog.record_job_event(job_id, uid=env.user.uid, event="restored", detail=json.dumps(detail),
                                     node=node_name())
    except HpcckptError as err:
        hlog.event(_log, "resume.unrecorded", f"could not record the restore as a job event: {err}", 30)


def _signal_queue(env: Environment, opts: SessionOptions) -> SignalQueue:
    """Installed before the job is started or restored: a preemption signal during a restore is not lost."""
    sq = SignalQueue(SignalPlan.from_names(list(opts.signals or env.policy.preemption.signals)))
    sq.install()
    return sq


def context_env(job_id: str, site: Site) -> dict[str, str]:
    """What the job is told of its context (hpcckpt.app.jobenv reads it, a Checkpointer in the job too)."""
    return {"HPCCKPT_JOB_ID": job_id, "HPCCKPT_STORE": str(site.store_root),
            "HPCCKPT_CKPT_INTERVAL": str(site.policy.interval)}


def _announce(ident: JobIdentity) -> None:
    if ident.source == "generated":
        sys.stderr.write(f"hpcckpt: job id {ident.job_id} (resume it with: hpcckpt resume {ident.job_id})\n")
        sys.stderr.flush()


def _catalog_opener(env: Environment) -> Callable[[], Catalog]:
    return env.open_catalog


def _ended_well(prev: LeaseRecord | None) -> bool:
    return prev is not None and prev.state is LeaseState.EXITED and prev.exit_status == 0


def _refuse_finished(job_id: str, force: bool) -> Callable[[LeaseRecord | None], None]:
    def check(prev: LeaseRecord | None) -> None:
        if prev is None or prev.state is not LeaseState.EXITED or force:
            return
        when = "at an unknown time" if prev.ended is None else \
            time.strftime("at %Y-%m-%d %H:%M:%S", time.localtime(prev.ended))
        raise JobFinishedError(
            f"job {job_id} already ended on its own: its last run exited with status {prev.exit_status} "
            f"{when} on node {prev.node or prev.host}; resuming would run finished work again (and cut its "
            "output files back to the checkpoint)",
            hint=f"resume it anyway with 'hpcckpt resume {job_id} --force'",
        )

    return check


def run_job(
    argv: Sequence[str],
    opts: SessionOptions,
    *,
    job_id: str | None = None,
    resume_if_possible: bool = False,
    engine: CheckpointEngine | None = None,
    publisher: PublisherFactory | None = None,
    lease_ttl: float = DEFAULT_TTL_S,
) -> int:
    """``hpcckpt run``: start (or auto-resume) the job, checkpoint it, return its exit status.

    ``publisher`` replaces the store publisher (tests inject a slow one). The
    job's lease is held from before the start to the end (:mod:`hpcckpt.core.lease`),
    and the options are recorded with it for a later resume.
    """
    if not argv:
        raise UsageError("no command given", hint="hpcckpt run [OPTIONS] -- COMMAND [ARGS...]")
    ident = resolve(job_id)
    env = load_environment(opts, engine)
    resume_from = os.environ.get(RESUME_FROM_ENV) or None
    want_resume = ident.requeued or resume_if_possible or resume_from is not None
    restored: Restored | None = None
    source_job = resume_from or ident.job_id
    # Before anything is started or restored: a second live copy of the job is refused here.
    lease = acquire(env.catalog, ident.job_id, options=opts.recorded(), ttl=lease_ttl)
    if want_resume and resume_from is None and _ended_well(lease.previous):
        # Slurm requeued a job that had finished (scontrol requeue after its end): Slurm would run its script
        # again, so the command starts afresh; restoring an older image would run finished work again and cut
        # its output back. A run that ended with a failure status is restored, as the restart policy wants.
        hlog.event(_log, "runner.finished_before", f"job {ident.job_id} already ended on its own with status 0; "
                   "this requeued run starts the command again instead of restoring a checkpoint", 30,
                   job_id=ident.job_id)
        want_resume = False
    set_child_subreaper()
    try:
        signals = _signal_queue(env, opts)
    except BaseException:
        lease.give_back()
        raise
    try:
        if want_resume:
            try:
                restored = _restored(env, source_job, as_job=ident.job_id)
            except NotFoundError as err:
                hlog.event(_log, "runner.fresh_start", f"nothing to resume for job {source_job} ({err}); "
                           "starting the command", job_id=ident.job_id)
        _announce(ident)
        job_env = {**os.environ, **context_env(ident.job_id, env.site)}
        if restored is not None:
            meta = restored.summary.meta
            job = JobInfo(identity=ident, user=env.user, cmdline=list(meta.cmdline), cwd=meta.cwd,
                          stdio=dict(restored.pipes.resources), interval={}, policy_digest=env.policy.digest(),
                          scratch=_scratch_of(restored))
            runner = _runner(env, opts, ident, job, signals, parent=_chain_parent(env, restored),
                             publisher=publisher)
            runner.attach(restored.pid, restored.pipes.out_r, restored.pipes.err_r)
            lazywatch.watch(runner, restored, lambda b: _restored(env, source_job, as_job=ident.job_id, before=b),
                            lambda r: _chain_parent(env, r), env.network.close)
        else:
            own_tmp = scratch.scratch_env(env.user, ident.job_id, job_env)
            scratch.prepare(env.user, own_tmp.values())
            job_env.update(own_tmp)
            pipes = StdioPipes.create()
            job = JobInfo(identity=ident, user=env.user, cmdline=list(argv), cwd=os.getcwd(),
                          stdio=dict(pipes.resources), interval={}, policy_digest=env.policy.digest(),
                          scratch=list(own_tmp.values()))
            runner = _runner(env, opts, ident, job, signals, publisher=publisher)
            try:
                pid = spawn_in_pid_namespace(argv, env=job_env, cwd=os.getcwd(), pipes=pipes,
                                             network=env.network.private, before_exec=env.network.attach)
            finally:
                pipes.close_write_ends()
            hlog.event(_log, "runner.started", f"job {ident.job_id} started as pid {pid}", job_id=ident.job_id,
                       pid=pid, node=node_name())
            runner.attach(pid, pipes.out_r, pipes.err_r)
    except BaseException:
        signals.restore()
        env.network.close()
        lease.give_back()
        raise
    return _drive(runner, env, lease, _catalog_opener(env))


def resume_job(job_id: str, opts: SessionOptions, *, ckptid: int | None = None,
               engine: CheckpointEngine | None = None, as_owner: User | None = None,
               publisher: PublisherFactory | None = None, force: bool = False,
               lease_ttl: float = DEFAULT_TTL_S) -> int:
    """``hpcckpt resume``: restore the job as our child, keep checkpointing it, return its exit status.

    ``as_owner``: root resumes that user's job by becoming the user first, for good.
    The job's lease is taken before any file is looked at: a job that runs
    elsewhere is refused (exit 15), and one whose last run ended on its own
    needs ``force`` (exit 16). The options the job ran with (interval,
    deadline, signals, policy file) apply unless ``opts`` gives others.
    """
    if as_owner is not None:
        become(as_owner)
    env = load_environment(opts, engine)
    last = env.catalog.get_lease(job_id)
    merged = opts.over(last.options if last is not None else {})
    if merged != opts:
        opts = merged
        # The store and catalog stay (the lease is taken through them); the run's policy is the job's.
        env.site = replace(env.site, policy=load_site(opts).policy)
    # The merged options are recorded again: a later resume keeps what this one ran with.
    lease = acquire(env.catalog, job_id, options=opts.recorded(), ttl=lease_ttl,
                    check=_refuse_finished(job_id, force))
    try:
        set_child_subreaper()
        signals = _signal_queue(env, opts)
    except BaseException:
        lease.give_back()
        raise
    try:
        with terminal_progress("restore"):
            restored = _restored(env, job_id, ckptid)
        meta = restored.summary.meta
        ident = JobIdentity(job_id, "cli", meta.requeue_count, meta.array_job_id, meta.array_task_id, meta.step)
        for line in restored.fallbacks:
            sys.stderr.write(f"hpcckpt: warning: {line}\n")
        sys.stderr.write(f"hpcckpt: job {job_id} resumed from checkpoint {restored.ckptid}\n")
        sys.stderr.flush()
        job = JobInfo(identity=ident, user=env.user, cmdline=list(meta.cmdline), cwd=meta.cwd,
                      stdio=dict(restored.pipes.resources), interval={}, policy_digest=env.policy.digest(),
                      scratch=_scratch_of(restored))
        runner = _runner(env, opts, ident, job, signals, parent=_chain_parent(env, restored), publisher=publisher)
        runner.attach(restored.pid, restored.pipes.out_r, restored.pipes.err_r)
        lazywatch.watch(runner, restored, lambda b: _restored(env, job_id, before=b), lambda r: _chain_parent(env, r),
                        env.network.close)
    except BaseException:
        signals.restore()
        env.network.close()
        lease.give_back()
        raise
    return _drive(runner, env, lease, _catalog_opener(env))


def _drive(runner: Runner, env: Environment, lease: Lease, opener: Callable[[], Catalog]) -> int:
    lease.keep(opener)
    code: int | None = None
    try:
        code = runner.loop()
        if code != EXIT_REQUEUE:  # ended for good; a job stopped for a requeue may be restored here
            scratch.remove(env.user, runner.ckpt.job.scratch)
        return code
    finally:
        env.network.close()
        runner.restore_signals()
        if runner.control is not None:
            runner.control.close()
        # How the run ended is what a later resume is judged by: on its own (exit status), or stopped.
        state = LeaseState.EXITED if runner.ended_on_its_own else LeaseState.STOPPED
        lease.release(state, exit_status=code)
        close_job_metrics(runner.ckpt.after_attempt)
        runner.ckpt.catalog.close()
