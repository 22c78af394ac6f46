"""``hpcckpt run`` and ``hpcckpt resume`` for the engines that start the job themselves (``files``, ``api``).

The Runner, the lease, the signals and the control socket are the same as
for a CRIU job (:mod:`hpcckpt.core.runner.session`); what differs is that the
job is *launched* by its engine (started, or started again at a resume with
its state put back or found by the program), not restored by CRIU. So that
``hpcckpt resume JOB`` can do that anywhere later, ``run`` records with the
job's lease what it takes to start it again (:func:`launch_record`):

* ``argv`` and ``cwd``, as given;
* the environment that decides *what program runs and how*
  (:data:`KEPT_ENV`): the search paths (PATH, LD_LIBRARY_PATH,
  PYTHONPATH...), the Python or Conda environment, the threading and MPI
  settings (OMP_*, OMPI_*, ...), the locale. Not the batch system's
  (SLURM_*: the new allocation's are the true ones), not hpcckpt's own
  (HPCCKPT_*: set anew for the job), and nothing else: a resume in another
  shell must behave the same, and the catalog must not collect secrets
  that happened to be in the environment (tokens, passwords);
* the engine and its options (``--app-files``, ``--app-signal``).

The CLI builds the engine (this package does not import :mod:`hpcckpt.app`)
and hands in its factory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hpcckpt import log as hlog
from hpcckpt.catalog import Catalog
from hpcckpt.context import current_user, node_name
from hpcckpt.core.launch.spawn import set_child_subreaper
from hpcckpt.core.lease import DEFAULT_TTL_S, LeaseState, acquire
from hpcckpt.core.runner.control import ControlServer
from hpcckpt.core.runner.engines import EngineFactory, EngineSetup
from hpcckpt.core.runner.runner import Runner, RunnerConfig, SignalPlan, SignalQueue
from hpcckpt.core.runner.session import (
    RESUME_FROM_ENV,
    SessionOptions,
    _refuse_finished,
    context_env,
    deadline_seconds,
    interval_chooser,
    load_site,
)
from hpcckpt.errors import UsageError
from hpcckpt.jobid import JobIdentity, resolve, validate_job_id
from hpcckpt.store.site import Site

_log = hlog.get("session")

#: Launching engines, as recorded with the lease (``options["launch"]["engine"]``).
LAUNCH_ENGINES = ("files", "api")
#: Variables kept exactly: the program's search paths and its interpreter's environment.
KEPT_ENV = ("PATH", "LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONPATH", "PYTHONHOME", "PYTHONNOUSERSITE",
            "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "LANG", "LC_ALL", "TZ", "TMPDIR", "HOME",
            "MODULEPATH", "LOADEDMODULES")
#: Variables kept by prefix: threading, maths libraries, MPI and accelerator settings.
KEPT_PREFIXES = ("OMP_", "KMP_", "MKL_", "OPENBLAS_", "GOMP_", "OMPI_", "PMIX_MCA_", "I_MPI_", "MPICH_", "UCX_",
                 "CUDA_", "NCCL_", "LC_")


def kept_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The part of ``env`` recorded for a relaunch (module docstring)."""
    return {k: v for k, v in env.items() if k in KEPT_ENV or k.startswith(KEPT_PREFIXES)}


def launch_record(engine: str, argv: Sequence[str], cwd: str, env: Mapping[str, str],
                  **engine_options: Any) -> dict[str, Any]:
    if engine not in LAUNCH_ENGINES:
        raise UsageError(f"unknown launching engine {engine!r}")
    return {"engine": engine, "argv": [str(a) for a in argv], "cwd": str(cwd), "env": kept_environment(env),
            **engine_options}


def recorded_launch(opts: SessionOptions, job_id: str) -> dict[str, Any] | None:
    """The launch record of job ``job_id`` (None: not a files/api job, or never run under hpcckpt run)."""
    user = current_user()
    cat = load_site(opts).open_catalog(user)
    try:
        lease = cat.get_lease(job_id, uid=user.uid)
    finally:
        cat.close()
    rec = None if lease is None else lease.options.get("launch")
    if isinstance(rec, dict) and rec.get("engine") in LAUNCH_ENGINES and isinstance(rec.get("argv"), list):
        return rec
    return None


@dataclass
class _Launch:
    """A files/api job's site, what its engine is set up with, and the catalog its lease is taken through."""

    site: Site
    setup: EngineSetup
    catalog: Catalog


def _site(opts: SessionOptions, job_id: str) -> _Launch:
    site = load_site(opts)
    pol = site.policy
    user = current_user()

    def opener() -> Catalog:
        return site.open_catalog(user)

    setup = EngineSetup(job_id=job_id, policy=pol, user=user, store_root=site.store_root, catalog_url=site.catalog_url,
                        open_catalog=opener, deadline_s=deadline_seconds(pol, opts.deadline))
    return _Launch(site, setup, opener())


def _job_env(site: _Launch, opts: SessionOptions, base: Mapping[str, str]) -> dict[str, str]:
    """The program's environment: ``base`` and the job's context (what hpcckpt.app.jobenv reads)."""
    s = site.setup
    env = {**base, **context_env(s.job_id, site.site)}
    if s.catalog_url:
        env["HPCCKPT_CATALOG"] = s.catalog_url
    else:
        env.pop("HPCCKPT_CATALOG", None)
    if opts.policy:
        env["HPCCKPT_POLICY"] = os.path.abspath(opts.policy)
    return env


def _launch(site: _Launch, opts: SessionOptions, factory: EngineFactory, options: dict[str, Any],
            argv: Sequence[str], cwd: str, env: Mapping[str, str], lease_ttl: float,
            check: Any = None) -> int:
    s = site.setup
    lease = acquire(site.catalog, s.job_id, options=options, ttl=lease_ttl, check=check)
    engine = None
    signals: SignalQueue | None = None
    control: ControlServer | None = None
    try:
        set_child_subreaper()  # ranks whose launcher died are ours to reap, not init's
        signals = SignalQueue(SignalPlan.from_names(list(opts.signals or s.policy.preemption.signals)))
        signals.install()
        engine = factory(s)
        cfg = RunnerConfig(job_id=s.job_id, interval=interval_chooser(s.policy), deadline_s=s.deadline_s,
                           signals=signals.plan, async_flush=True)
        try:
            control = ControlServer(s.job_id, uid=s.user.uid, gid=s.user.gid)
        except UsageError as err:
            hlog.event(_log, "runner.no_control", f"{err}; this runner takes no checkpoint requests", 30)
        runner = Runner(cfg, engine, control, signals)
        got = engine.launch(argv, _job_env(site, opts, env), cwd)
        hlog.event(_log, "runner.started", f"job {s.job_id} started as pid {got.pid} ({engine.name} engine)",
                   job_id=s.job_id, pid=got.pid, node=node_name(), engine=engine.name)
        runner.attach(got.pid, got.out_r, got.err_r)
    except BaseException:
        if signals is not None:
            signals.restore()
        if control is not None:
            control.close()
        if engine is not None:
            engine.close()
        lease.give_back()
        site.catalog.close()
        raise
    assert engine is not None
    lease.keep(s.open_catalog)
    code: int | None = None
    try:
        code = runner.loop()
        return code
    finally:
        runner.restore_signals()
        if control is not None:
            control.close()
        lease.release(LeaseState.EXITED if runner.ended_on_its_own else LeaseState.STOPPED, exit_status=code)
        engine.close()
        site.catalog.close()


def run_launched(argv: Sequence[str], opts: SessionOptions, factory: EngineFactory, record: dict[str, Any], *,
                 job_id: str | None = None, lease_ttl: float = DEFAULT_TTL_S) -> int:
    """``hpcckpt run --engine app``: start ``argv`` under its engine and the Runner; record how to relaunch it."""
    if not argv:
        raise UsageError("no command given", hint="hpcckpt run --engine app [OPTIONS] -- COMMAND [ARGS...]")
    ident: JobIdentity = resolve(job_id)
    resume_from = os.environ.get(RESUME_FROM_ENV) or None
    if resume_from and not job_id and resume_from != ident.job_id:
        # A resubmitted job ('hpcckpt resume --submit'): the program finds its images by job id (its
        # Checkpointer, or the files engine), so it goes on under the job it continues.
        hlog.event(_log, "runner.continues", f"this run continues job {resume_from} ({RESUME_FROM_ENV}); its "
                   f"checkpoints are filed under {resume_from}", job_id=resume_from, slurm_job=ident.job_id)
        ident = JobIdentity(validate_job_id(resume_from), "cli", ident.restart_count, ident.array_job_id,
                            ident.array_task_id, ident.step)
    site = _site(opts, ident.job_id)
    if ident.source == "generated":
        sys.stderr.write(f"hpcckpt: job id {ident.job_id} (resume it with: hpcckpt resume {ident.job_id})\n")
        sys.stderr.flush()
    options = {**opts.recorded(), "launch": record}
    return _launch(site, opts, factory, options, argv, record["cwd"], os.environ, lease_ttl)


def resume_launched(job_id: str, opts: SessionOptions, factory: EngineFactory, record: dict[str, Any], *,
                    force: bool = False, lease_ttl: float = DEFAULT_TTL_S) -> int:
    """``hpcckpt resume`` of a files/api job: the recorded command, started again under the Runner."""
    site = _site(opts, job_id)
    last = site.catalog.get_lease(job_id, uid=site.setup.user.uid)
    merged = opts.over(last.options if last is not None else {})
    if merged != opts:
        site.catalog.close()
        opts = merged
        site = _site(opts, job_id)
    cwd = str(record["cwd"])
    if not os.path.isdir(cwd):
        site.catalog.close()
        raise UsageError(f"job {job_id} ran in {cwd}, which does not exist here",
                         hint="resume it on a node that has that directory (a shared file system)")
    env = {**os.environ, **{str(k): str(v) for k, v in dict(record.get("env") or {}).items()}}
    sys.stderr.write(f"hpcckpt: job {job_id} relaunched from its recorded command ({record['engine']} engine)\n")
    sys.stderr.flush()
    options = {**opts.recorded(), "launch": record}
    return _launch(site, opts, factory, options, [str(a) for a in record["argv"]], cwd, env, lease_ttl,
                   check=_refuse_finished(job_id, force))
