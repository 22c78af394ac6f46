"""Slurm's Prolog, Epilog and EpilogSlurmctld for hpcckpt.

They run as root (the node hooks in users' store directories), so:

* They never crash Slurm. Every hook returns 0: a failing Prolog or Epilog
  makes Slurm drain the node, which hpcckpt does itself, with a reason, only
  when the site policy says so (``slurm.drain_on_failed_check``). Errors are
  logged as events and the hook goes on with what it can still do.
* They never follow a user-planted symlink: every directory below the
  admin's store root is opened with ``O_NOFOLLOW`` relative to its parent
  (:mod:`hpcckpt.fs.safe`), and files are opened through those descriptors.
* Their collaborators (Slurm, the catalog, the node check) come in through
  :class:`HookDeps`, so unit tests run them against fakes.

Layout they own: the job's store dir ``STORE/USER/JOB``, its staging dirs
``STAGING/USER/JOB`` (node-local disk) and ``/dev/shm/hpcckpt-staging/USER/JOB``
(tmpfs, see :mod:`hpcckpt.core.pipeline.staging`), all 0700 and owned by the job's
user, and in the job dir ``slurm-job.json``: the job's sbatch settings and
batch script, saved at start so ``hpcckpt resume --submit`` can resubmit a job
Slurm has forgotten.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcckpt import log as hlog
from hpcckpt.catalog import Catalog, Status, open_catalog
from hpcckpt.cluster.nodecheck import node_problems
from hpcckpt.context import User, user_by_uid
from hpcckpt.core.pipeline.flush import FlushSettings, StorePublisher, salvage_staging
from hpcckpt.core.pipeline.staging import TMPFS, staging_candidates, tmpfs_base
from hpcckpt.criu import restorelock
from hpcckpt.errors import HpcckptError, NotFoundError, SlurmError
from hpcckpt.fs import safe as fsutil
from hpcckpt.fs.layout import StoreLayout
from hpcckpt.fs.tree import remove_tree_at
from hpcckpt.image import verify_image
from hpcckpt.image.errors import ImageError
from hpcckpt.slurm.adapter import ScontrolAdapter, SlurmAdapter
from hpcckpt.slurm.env import SlurmEnv
from hpcckpt.slurm.restart_policy import (
    Action,
    JobOutcome,
    RestartDecision,
    RestartKind,
    RestartRules,
    decide,
    pending_move,
)
from hpcckpt.store.images import Store
from hpcckpt.store.images import image_name as store_image_name
from hpcckpt.store.images import parse_image_name as store_parse
from hpcckpt.store.site import Site

_log = hlog.get("slurm.hooks")
JOB_INFO_FILE = "slurm-job.json"
HOOK_OK = 0
# Node states in which a job's node is taken to have failed under it.
_FAILED_NODE_FLAGS = ("DOWN", "FAIL", "NOT_RESPONDING", "POWER_DOWN", "POWERED_DOWN")


@dataclass
class HookDeps:
    """What the hooks act on. :func:`default_deps` builds the real ones."""

    slurm: SlurmAdapter
    store_root: Path | None
    staging_root: Path | None = None
    catalog_url: str | None = None
    drain_on_failed_check: bool = False
    rules: RestartRules = field(default_factory=RestartRules)
    open_catalog: Callable[[str | None, Path, User], Catalog] | None = None
    node_problems: Callable[[], list[str]] = list
    user_lookup: Callable[[int], User] = user_by_uid
    clock: Callable[[], float] = time.time
    # How EpilogSlurmctld applies a requeue: Slurm refuses one while the job is
    # still completing, which it is while this hook runs, so by default the
    # work goes to a detached process that retries after the hook returns.
    background: Callable[[Callable[[], None]], None] = field(default=lambda fn: fn())
    retry_wait: float = 1.0
    retry_attempts: int = 60
    # The pipeline's packing settings (policy pipeline.* and storage.compression), for
    # the staged dumps the Epilog publishes; and the node's tmpfs (/dev/shm in
    # production; None, the default, leaves tmpfs staging alone, as unit tests want).
    flush: FlushSettings = field(default_factory=FlushSettings)
    tmpfs: Path | None = None


def default_deps(site: Site | None = None) -> HookDeps:
    """The real collaborators, configured by the site (the site policy and the hook env file)."""
    # Hooks act for the site: only the site policy counts, never a user's file,
    # not even one named by $HPCCKPT_POLICY in the hook's environment.
    site = site or Site.for_hooks()
    pol = site.policy
    # No store named anywhere: the hooks have nothing to act on (never root's own default store).
    configured = bool(os.environ.get("HPCCKPT_STORE") or pol.storage.root)
    return HookDeps(
        slurm=ScontrolAdapter(),
        store_root=site.store_root if configured else None,
        staging_root=site.staging().disk,
        catalog_url=site.catalog_url,
        drain_on_failed_check=bool(pol.slurm.drain_on_failed_check),
        rules=RestartRules(
            max_restarts=int(pol.failure.max_restarts),
            backoff=int(pol.failure.backoff),
            exclude_failed_node=bool(pol.failure.exclude_failed_node),
            requeue=bool(pol.slurm.requeue),
        ),
        open_catalog=open_catalog,
        node_problems=node_problems,
        background=run_detached,
        flush=FlushSettings.from_policy(pol),
        tmpfs=TMPFS,
    )


def run_detached(fn: Callable[[], None]) -> None:
    """Run ``fn`` in a grandchild that outlives the hook (slurmctld waits only for the hook)."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    # First child: new session, fork again and exit so the grandchild is reparented.
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        fn()
    except BaseException:  # the grandchild must never return into the hook's code
        _log.exception("background hook work failed")
    finally:
        os._exit(0)


def _event(name: str, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    hlog.event(_log, name, msg, level, **fields)


def _job_user(env: SlurmEnv, deps: HookDeps) -> User | None:
    if env.uid is None:
        _event("slurm.hook.nouser", f"job {env.job_id}: SLURM_JOB_UID is not set; skipping", logging.WARNING)
        return None
    try:
        return deps.user_lookup(env.uid)
    except KeyError:
        _event("slurm.hook.nouser", f"job {env.job_id}: uid {env.uid} has no passwd entry on this host",
               logging.WARNING)
        return None


def job_dir(root: Path, user: User, job_id: str) -> Path:
    return StoreLayout(root).job_dir(user, job_id)


def staging_dir(staging_root: Path, user: User, job_id: str) -> Path:
    """Where the runner stages images of ``job_id`` before the (async) flush to the store."""
    return job_dir(staging_root, user, job_id)


@contextlib.contextmanager
def _catalog(deps: HookDeps, user: User) -> Iterator[Any]:
    if deps.open_catalog is None or deps.store_root is None:
        raise HpcckptError("no catalog configured for the hooks")
    cat = deps.open_catalog(deps.catalog_url, deps.store_root, user)
    try:
        yield cat
    finally:
        cat.close()


# ---------------------------------------------------------------- Prolog


def prolog(env: SlurmEnv, deps: HookDeps | None = None) -> int:
    """Before the job: its dirs, its saved settings, and whether this node can checkpoint."""
    deps = deps or default_deps()
    user = _job_user(env, deps)
    if user is not None and deps.store_root is not None:
        try:
            _prepare_dirs(env, deps, user)
        except HpcckptError as err:
            _event("slurm.prolog.dirs", f"job {env.job_id}: cannot prepare its directories: {err.render()}",
                   logging.ERROR, job_id=env.job_id, user=user.name)
        except OSError as exc:
            _event("slurm.prolog.dirs", f"job {env.job_id}: cannot prepare its directories: {exc}",
                   logging.ERROR, job_id=env.job_id, user=user.name)
        else:
            try:
                save_job_info(env, deps, user)
            except (HpcckptError, OSError) as exc:
                # Only resume --submit of a long-gone job needs it; the job itself runs fine.
                _event("slurm.prolog.jobinfo", f"job {env.job_id}: cannot save its sbatch settings: {exc}",
                       logging.WARNING, job_id=env.job_id)
    _check_node(env, deps)
    return HOOK_OK


def _prepare_dirs(env: SlurmEnv, deps: HookDeps, user: User) -> None:
    assert deps.store_root is not None
    made = [fsutil.ensure_private_dir(job_dir(deps.store_root, user, env.job_id), user.uid, user.gid,
                                      base=deps.store_root)]
    if deps.staging_root is not None:
        made.append(fsutil.ensure_private_dir(staging_dir(deps.staging_root, user, env.job_id), user.uid,
                                              user.gid, base=deps.staging_root))
    tmpfs_base = _tmpfs_base(deps, create=True)
    if tmpfs_base is not None:
        made.append(fsutil.ensure_private_dir(job_dir(tmpfs_base, user, env.job_id), user.uid, user.gid,
                                              base=tmpfs_base))
    if deps.tmpfs is not None:
        restorelock.prepare(deps.tmpfs / restorelock.LOCK.name)  # root's, so that no user can hold it for ever
    _event("slurm.prolog.dirs", f"job {env.job_id}: prepared {', '.join(map(str, made))}",
           job_id=env.job_id, user=user.name, node=env.node)


def _tmpfs_base(deps: HookDeps, *, create: bool) -> Path | None:
    """``/dev/shm/hpcckpt-staging`` if it is root's own directory (made here if asked), else None.

    /dev/shm is world-writable: a user who made this directory first, or put a
    symlink there, would own the tree root walks through in the Epilog. Root
    makes it 0755 before any job runs on the node (the Prolog).
    """
    return None if deps.tmpfs is None else tmpfs_base(deps.tmpfs, create=create)


def save_job_info(env: SlurmEnv, deps: HookDeps, user: User) -> Path:
    """Write ``slurm-job.json`` (settings + batch script) into the job's store dir, 0600, as the user."""
    assert deps.store_root is not None
    fields = deps.slurm.show_job(env.job_id)
    try:
        script = deps.slurm.batch_script(env.job_id)
    except SlurmError as err:
        script = ""  # an salloc/srun job has none
        _event("slurm.prolog.jobinfo", f"job {env.job_id}: no batch script: {err}", logging.DEBUG)
    doc = {"job_id": env.job_id, "saved": deps.clock(), "node": env.node, "fields": fields, "script": script,
           "env": env.to_dict()}
    path = job_dir(deps.store_root, user, env.job_id)
    dir_fd = fsutil.open_private_dir(path, user.uid, user.gid, base=deps.store_root, create=False)
    try:
        tmp = fsutil.temp_name(JOB_INFO_FILE)
        fd = fsutil.open_private_file_at(dir_fd, tmp, user.uid, user.gid)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, JOB_INFO_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path / JOB_INFO_FILE


def _check_node(env: SlurmEnv, deps: HookDeps) -> None:
    try:
        problems = deps.node_problems()
    except Exception as exc:  # a broken check must not take the node down with it
        _event("slurm.prolog.check", f"node check crashed: {exc!r}", logging.ERROR)
        return
    if not problems:
        return
    reason = "hpcckpt: cannot checkpoint: " + "; ".join(problems)
    if not deps.drain_on_failed_check or not env.node:
        _event("slurm.prolog.check", f"node {env.node} {reason} (not draining: slurm.drain_on_failed_check is "
               "false)", logging.WARNING, node=env.node, job_id=env.job_id)
        return
    try:
        deps.slurm.drain(env.node, reason)
        _event("slurm.prolog.drain", f"drained node {env.node}: {reason}", logging.ERROR, node=env.node)
    except SlurmError as err:
        _event("slurm.prolog.drain", f"node {env.node} {reason}, and draining it failed: {err}",
               logging.ERROR, node=env.node)


# ---------------------------------------------------------------- Epilog


@dataclass
class EpilogSalvageReport:
    committed: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    staged: list[int] = field(default_factory=list)  # published from pipeline staging

    def __str__(self) -> str:
        return (f"salvaged {self.committed or 'none'}, aborted {self.failed or 'none'}, "
                f"removed {len(self.removed)} partial file(s), published staged {self.staged or 'none'}")


def epilog(env: SlurmEnv, deps: HookDeps | None = None) -> int:
    """After the job: finish or abort its publish in flight, clean staging, log the end in the catalog."""
    deps = deps or default_deps()
    user = _job_user(env, deps)
    if user is None or deps.store_root is None:
        return HOOK_OK
    report = EpilogSalvageReport()
    try:
        with _catalog(deps, user) as cat:
            report = salvage(env, deps, user, cat)
            cat.record_job_event(env.job_id, uid=user.uid, event="epilog", detail=str(report), node=env.node)
    except (HpcckptError, OSError) as exc:
        _event("slurm.epilog.salvage", f"job {env.job_id}: salvage failed: {exc}", logging.ERROR,
               job_id=env.job_id)
    # Before staging is cleaned: publish the complete staged dumps the runner's
    # background flush did not get to (the job ended or was killed mid-flush).
    report.staged = salvage_pipeline(env, deps, user)
    for root in _staging_roots(deps):
        _clean_staging(env, root, user)
    _event("slurm.epilog", f"job {env.job_id} on {env.node}: {report}", job_id=env.job_id, node=env.node)
    return HOOK_OK


def _staging_roots(deps: HookDeps) -> list[Path]:
    """The bases below which the job's staging dirs are ``USER/JOB``: node disk, then tmpfs."""
    roots = [] if deps.staging_root is None else [deps.staging_root]
    tmpfs_base = _tmpfs_base(deps, create=False)
    if tmpfs_base is not None:
        roots.append(tmpfs_base)
    return roots


def salvage_pipeline(env: SlurmEnv, deps: HookDeps, user: User) -> list[int]:
    """Publish every complete staged dump of the job (pipeline staging), oldest first; their ckptids."""
    if deps.store_root is None or deps.open_catalog is None:
        return []
    open_cat = deps.open_catalog
    store_root = deps.store_root
    roots = _staging_roots(deps)
    trusted = {r / user.name for r in roots}
    published: list[int] = []
    publisher = StorePublisher(Store(store_root, user), lambda: open_cat(deps.catalog_url, store_root, user))
    try:
        tmpfs = deps.tmpfs if deps.tmpfs is not None else TMPFS
        for path in staging_candidates(user, env.job_id, deps.staging_root, tmpfs=tmpfs):
            # salvage_staging trusts the parent of the path it is given; only parents
            # below a base checked above (root's, or the admin's storage.staging) qualify.
            if path.parent not in trusted:
                continue
            try:
                rep = salvage_staging(path, publisher, user, deps.flush)
            except (HpcckptError, OSError) as exc:
                _event("slurm.epilog.staged", f"job {env.job_id}: cannot salvage {path}: {exc}", logging.ERROR,
                       job_id=env.job_id, path=str(path))
                continue
            published.extend(rep.published)
            for err in rep.errors:
                _event("slurm.epilog.staged", f"job {env.job_id}: {err}", logging.ERROR, job_id=env.job_id)
            if rep.published:
                _event("slurm.epilog.staged", f"job {env.job_id}: published staged checkpoint(s) "
                       f"{rep.published} from {path}", job_id=env.job_id, ckptids=rep.published)
    finally:
        publisher.close()
    return published


def _writing_rows(cat: Any, env: SlurmEnv, uid: int) -> dict[int, Any]:
    rows: dict[int, Any] = {}
    for jid in dict.fromkeys([env.job_id, env.display_id]):
        for rec in cat.list(jid, uid=uid):
            if rec.status == Status.WRITING:
                rows[rec.ckptid] = rec
    return rows


def image_name(ckptid: int) -> str:
    return store_image_name(ckptid)


def parse_image_name(name: str) -> int | None:
    return store_parse(name)


def _verified_ckptid(dir_fd: int, name: str) -> int | None:
    """The ckptid of a complete, intact image file ``name``; None when it is partial or corrupt."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return None
        try:
            return int(verify_image(fh).meta.ckptid)
        except ImageError as err:
            _event("slurm.epilog.partial", f"{name}: not a complete image: {err}", logging.INFO)
            return None


def salvage(env: SlurmEnv, deps: HookDeps, user: User, cat: Any) -> EpilogSalvageReport:
    """Commit every fully written image of a publish the job's end interrupted; abort the rest.

    An image is only committed when all its bytes verify and its header names
    a catalog row of this job still marked writing: what the runner would
    have done had it lived another moment (SCR issues 531 and 210).
    """
    assert deps.store_root is not None
    report = EpilogSalvageReport()
    rows = _writing_rows(cat, env, user.uid)
    path = job_dir(deps.store_root, user, env.job_id)
    try:
        dir_fd = fsutil.open_private_dir(path, user.uid, user.gid, base=deps.store_root, create=False)
    except FileNotFoundError:
        dir_fd = -1
    try:
        if dir_fd >= 0:
            for name, st in list(fsutil.iter_dir_nofollow(dir_fd)):
                if not stat.S_ISREG(st.st_mode) or st.st_uid not in (user.uid, 0):
                    continue  # not a plain file of this user's: leave it for an admin
                named = parse_image_name(name)
                if named is not None:
                    # Renamed to its final name, but the runner died before the catalog commit.
                    if named in rows and _verified_ckptid(dir_fd, name) == named:
                        rec = rows.pop(named)
                        cat.commit(named, path=str(path / name), size_bytes=st.st_size,
                                   duration=max(0.0, deps.clock() - float(rec.created or 0)))
                        report.committed.append(named)
                    continue
                if not name.startswith(fsutil.TEMP_PREFIX):
                    continue
                ckptid = _verified_ckptid(dir_fd, name)
                if ckptid is not None and ckptid in rows:
                    final = image_name(ckptid)
                    os.rename(name, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                    os.fsync(dir_fd)
                    rec = rows.pop(ckptid)
                    cat.commit(ckptid, path=str(path / final), size_bytes=st.st_size,
                               duration=max(0.0, deps.clock() - float(rec.created or 0)))
                    report.committed.append(ckptid)
                    _event("slurm.epilog.salvaged", f"job {env.job_id}: committed checkpoint {ckptid} its runner "
                           "had fully written", job_id=env.job_id, ckptid=ckptid)
                elif name.startswith(fsutil.TEMP_PREFIX + "ckpt-") or ckptid is None:
                    os.unlink(name, dir_fd=dir_fd)
                    report.removed.append(name)
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)
    for ckptid in rows:
        cat.fail(ckptid, "the job ended before this checkpoint was fully written; removed by the Slurm epilog")
        report.failed.append(ckptid)
    return report


def _clean_staging(env: SlurmEnv, root: Path, user: User) -> None:
    user_fd = -1
    try:
        user_fd = fsutil.open_private_dir(root / user.name, user.uid, user.gid, base=root, create=False)
        remove_tree_at(user_fd, fsutil.safe_job_component(env.job_id))
    except FileNotFoundError:
        pass
    except (HpcckptError, OSError) as exc:
        _event("slurm.epilog.staging", f"job {env.job_id}: cannot clean staging: {exc}", logging.WARNING)
    finally:
        if user_fd >= 0:
            os.close(user_fd)


# ---------------------------------------------------------------- EpilogSlurmctld


def _base_state(raw: str) -> str:
    return raw.split("+")[0].split()[0].upper() if raw else ""


def _failed_nodes(deps: HookDeps, nodes: list[str]) -> list[str]:
    failed = []
    for node in nodes:
        try:
            state = deps.slurm.node_state(node)
        except (SlurmError, NotFoundError):
            continue
        flags = {f.rstrip("*") for f in state.upper().split("+")}
        if state.endswith("*") or flags & set(_FAILED_NODE_FLAGS):
            failed.append(node)
    return failed


def _split_list(raw: str | None) -> list[str]:
    if not raw or raw in ("(null)", "None"):
        return []
    return [x for x in raw.split(",") if x]


def ctld_epilog(env: SlurmEnv, deps: HookDeps | None = None) -> int:
    """On the controller after the job: record its end; requeue it, or adjust Slurm's requeue, by policy.

    Acts on this job id only, so in an array only the task concerned comes back.
    Jobs hpcckpt knows nothing about (no catalog rows) are left alone.
    """
    deps = deps or default_deps()
    user = _job_user(env, deps)
    if user is None or deps.store_root is None:
        return HOOK_OK
    try:
        job = deps.slurm.show_job(env.job_id)
    except (SlurmError, NotFoundError) as err:
        _event("slurm.ctld_epilog", f"job {env.job_id}: cannot read it from Slurm: {err}", logging.ERROR)
        return HOOK_OK
    state = _base_state(job.get("JobState", ""))
    try:
        nodes = deps.slurm.hostnames(env.nodelist) if env.nodelist else []
    except SlurmError:
        nodes = [env.nodelist] if env.nodelist else []
    try:
        with _catalog(deps, user) as cat:
            known = [r for j in dict.fromkeys([env.job_id, env.display_id]) for r in cat.list(j, uid=user.uid)]
            if not known:
                return HOOK_OK
            has_ckpt = any(r.status.value == "committed" for r in known)
            events = cat.job_events(env.job_id, uid=user.uid)
            prior = sum(1 for e in events if e.get("event") == "restart"
                        and str(e.get("detail", "")).startswith(RestartKind.FAILURE.value))
            outcome = JobOutcome(
                state=state, exit_code=env.exit_code, exit_signal=env.exit_signal,
                requeue_allowed=job.get("Requeue", "1") == "1", has_checkpoint=has_ckpt,
                prior_failures=prior, nodes=nodes, failed_nodes=_failed_nodes(deps, nodes),
                excluded=_split_list(job.get("ExcNodeList")), moved_from=pending_move(events),
            )
            decision = decide(deps.rules, outcome)
            cat.record_job_event(
                env.job_id, uid=user.uid, event="end",
                detail=f"state={state} exit={env.exit_code}:{env.exit_signal} restarts={job.get('Restarts', '0')}",
                node=",".join(nodes),
            )
            if decision.restarts:
                cat.record_job_event(env.job_id, uid=user.uid, event="restart",
                                     detail=f"{decision.kind.value}: {decision.reason}", node=",".join(nodes))
            elif decision.action is Action.STOP or decision.kind is not RestartKind.FINAL:
                cat.record_job_event(env.job_id, uid=user.uid, event="no-restart", detail=decision.reason,
                                     node=",".join(nodes))
    except (HpcckptError, OSError) as exc:
        _event("slurm.ctld_epilog", f"job {env.job_id}: catalog unavailable, no restart decision: {exc}",
               logging.ERROR, job_id=env.job_id)
        return HOOK_OK
    _event("slurm.ctld_epilog", f"job {env.job_id} ended {state}: {decision.action.value} ({decision.reason})",
           job_id=env.job_id, action=decision.action.value, kind=decision.kind.value, delay=decision.delay,
           exclude=",".join(decision.exclude))
    if decision.action is not Action.NONE:
        deps.background(lambda: _apply(deps, env.job_id, decision))
    return HOOK_OK


# A job in one of these states has come back already: nothing to requeue or adjust.
_BACK_STATES = frozenset({"RUNNING", "CONFIGURING", "SUSPENDED", "STOPPED", "RESIZING"})


def _apply(deps: HookDeps, job_id: str, decision: RestartDecision) -> None:
    apply_decision(deps, job_id, decision)


def apply_decision(deps: HookDeps, job_id: str, decision: RestartDecision) -> bool:
    """Carry out a decision on this one job id; retries while Slurm still finishes the job."""
    for attempt in range(max(1, deps.retry_attempts)):
        try:
            if decision.action is Action.STOP:
                deps.slurm.cancel(job_id)
            else:
                state = _base_state(deps.slurm.show_job(job_id).get("JobState", ""))
                if state == "COMPLETING":
                    # Slurm is still ending it, and may requeue it itself (RequeueExit=85):
                    # a StartTime set now would be overwritten by that requeue's ~120 s hold.
                    raise SlurmError(f"job {job_id} is still completing")
                if state in _BACK_STATES:
                    # Already running again (Slurm's own requeue was quick): another requeue
                    # now would kill the new run, and its StartTime can no longer change.
                    _event("slurm.restart.applied", f"job {job_id} is already {state}; nothing to do",
                           job_id=job_id)
                    return True
                if decision.action is Action.REQUEUE and state not in ("PENDING", "REQUEUED"):
                    deps.slurm.requeue(job_id)
                fields: dict[str, str] = {}
                if decision.exclude:
                    fields["ExcNodeList"] = ",".join(decision.exclude)
                if decision.delay is not None:
                    fields["StartTime"] = "now" if decision.delay == 0 else f"now+{decision.delay}"
                deps.slurm.update_job(job_id, **fields)
            _event("slurm.restart.applied", f"job {job_id}: {decision.action.value} done", job_id=job_id)
            return True
        except (SlurmError, NotFoundError) as err:
            if attempt + 1 >= deps.retry_attempts:
                _event("slurm.restart.failed", f"job {job_id}: {decision.action.value} failed: {err}",
                       logging.ERROR, job_id=job_id)
                return False
            time.sleep(deps.retry_wait)
    return False
