"""Move jobs off a node without lost work: ``hpcckpt drain NODE``, ``hpcckpt migrate JOBID`` and the drain watch.

For each job under hpcckpt on the node:

1. a ``move`` job event naming the node goes into the job's catalog, so the
   EpilogSlurmctld keeps the restart off that node (``ExcNodeList``, see
   :func:`hpcckpt.slurm.restart_policy.pending_move`);
2. the job's batch shell gets USR1 (``scancel --batch``). For ``exec hpcckpt
   run`` that shell *is* the runner, and USR1 is one of its preemption
   signals (policy ``preemption.signals``): it takes a final checkpoint at
   once, ends the job and exits 85, and Slurm (``RequeueExit=85``) requeues
   it. Only the batch shell is signalled: the job's own processes must not
   see USR1, whose default action would kill them before the checkpoint;
3. once Slurm has requeued it, the same restart decision the EpilogSlurmctld
   takes is applied here too (node excluded, policy backoff): idempotent
   with the hook, and enough on its own where the hook is not installed;
4. the requeued job's ``hpcckpt run`` restores the final image on another
   node, as after any requeue, and records a ``restored`` job event.

Which jobs are "under hpcckpt": those whose batch script runs ``exec hpcckpt
run`` (read with ``scontrol write batch_script``, which operators may do for
every job). That is exactly the condition for step 2 to work: a signal to the
batch shell reaches the runner only if the runner *is* the batch shell. The
catalog alone would not do: a job has no rows before its first checkpoint, and
rows do not say whether the signal would reach the runner. A job whose script
mentions hpcckpt without ``exec hpcckpt run``, or that has checkpoints in the
catalog anyway (the MPI library, ``srun hpcckpt``), is left alone and listed
as such; so is every other job. The runner's control socket is no help here:
it is reachable only on the job's node.

Downtime, per moved job, from the catalog: *freeze* and *flush* are the final
checkpoint's frozen seconds (row meta ``frozen_s``) and its pack-and-publish
seconds (row ``duration``); *scheduling* runs from that row's commit to the
start of the restoring run (its ``restored`` event); *restore* is that run's
time from its start to the job running again.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hpcckpt import log as hlog
from hpcckpt.cluster.hooks import HookDeps, apply_decision
from hpcckpt.context import User
from hpcckpt.errors import HpcckptError, NotFoundError, PermissionDeniedError, SlurmError
from hpcckpt.slurm.restart_policy import EXIT_REQUEUE, MOVE_EVENT, Action, JobOutcome, decide

_log = hlog.get("slurm.drain")
RUNNER_SIGNAL = "USR1"
# Our drains say so in the node's Reason; the drain watch leaves those to the command that set them.
REASON_PREFIX = "hpcckpt drain"
# A requeued (or ended) job is in one of these states; it has left its node.
_LEFT_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETED", "FAILED",
                          "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"})
_BACK_STATES = frozenset({"RUNNING", "COMPLETING", "COMPLETED", "CONFIGURING"})


# ------------------------------------------------------------------ what a job is


def runs_hpcckpt_as_batch_shell(script: str) -> bool:
    """Whether the batch script ``exec``s ``hpcckpt run`` (or ``python -m hpcckpt run``)."""
    for raw in script.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        if not words or words[0] != "exec":
            continue
        words = words[1:]
        while words and words[0].startswith("-"):  # exec's own -c, -l, -a NAME
            if words.pop(0) == "-a" and words:
                words.pop(0)
        if words and os.path.basename(words[0]) == "env":
            words.pop(0)
        while words and ("=" in words[0] or words[0].startswith("-")):
            words.pop(0)  # VAR=value assignments (and env's options)
        if not words:
            continue
        prog, rest = os.path.basename(words[0]), words[1:]
        if prog.startswith("python") and rest[:2] == ["-m", "hpcckpt"]:
            prog, rest = "hpcckpt", rest[2:]
        if prog == "hpcckpt":
            sub = next((w for w in rest if not w.startswith("-")), None)
            if sub == "run":
                return True
    return False


def _mentions_hpcckpt(script: str) -> bool:
    return any("hpcckpt" in line.split("#", 1)[0] for line in script.splitlines()
               if not line.lstrip().startswith("#"))


@dataclass
class JobPlan:
    """One job found on the node, and what drain does with it."""

    job_id: str  # Slurm's id as squeue shows it (N, or N_M for an array task)
    user: str
    uid: int | None
    nodes: list[str]
    move: bool  # under hpcckpt: checkpoint, requeue elsewhere
    why: str  # for a job left alone: why
    catalog_ids: list[str] = field(default_factory=list)  # its ids in the catalog (N, or ARRAY_TASK)
    fields: dict[str, str] = field(default_factory=dict, repr=False)


def _uid_and_name(fields: Mapping[str, str]) -> tuple[str, int | None]:
    raw = fields.get("UserId", "")  # "alice(1000)"
    name, _, rest = raw.partition("(")
    try:
        return name, int(rest.rstrip(")"))
    except ValueError:
        return name, None


def catalog_ids(fields: Mapping[str, str], job_id: str) -> list[str]:
    """The ids hpcckpt run files the job under: ``ARRAY_TASK`` for an array task, else the job id."""
    ids = []
    arr, task = fields.get("ArrayJobId"), fields.get("ArrayTaskId")
    if arr and task and task.isdigit():
        ids.append(f"{arr}_{task}")
    ids.append(fields.get("JobId") or job_id)
    return list(dict.fromkeys([*ids, job_id]))


def plan_job(deps: HookDeps, job_id: str) -> JobPlan:
    """Read the job from Slurm and decide whether drain moves it or leaves it alone."""
    fields = deps.slurm.show_job(job_id)
    name, uid = _uid_and_name(fields)
    nodes = deps.slurm.hostnames(fields["NodeList"]) if fields.get("NodeList") not in (None, "", "(null)") else []
    ids = catalog_ids(fields, job_id)
    plan = JobPlan(job_id=job_id, user=name, uid=uid, nodes=nodes, move=False, why="", catalog_ids=ids,
                   fields=dict(fields))
    if fields.get("BatchFlag", "1") == "0":
        plan.why = "not a batch job (salloc/srun): no batch shell to signal"
        return plan
    try:
        script = deps.slurm.batch_script(job_id)
    except (SlurmError, NotFoundError) as err:
        plan.why = f"its batch script cannot be read: {err}"
        return plan
    if runs_hpcckpt_as_batch_shell(script):
        if fields.get("Requeue", "1") == "0":
            plan.why = "under hpcckpt, but submitted with --no-requeue: it could not come back elsewhere"
            return plan
        plan.move, plan.why = True, "its batch script runs 'exec hpcckpt run'"
        return plan
    if _mentions_hpcckpt(script) or _has_rows(deps, plan):
        plan.why = ("uses hpcckpt, but not as 'exec hpcckpt run' in its batch script: a signal to the batch "
                    "shell would not reach a runner; left alone")
    else:
        plan.why = "not under hpcckpt"
    return plan


def _user(deps: HookDeps, plan: JobPlan) -> User | None:
    if plan.uid is None:
        return None
    try:
        return deps.user_lookup(plan.uid)
    except KeyError:
        return None


def _has_rows(deps: HookDeps, plan: JobPlan) -> bool:
    user = _user(deps, plan)
    if user is None or deps.open_catalog is None or deps.store_root is None:
        return False
    try:
        cat = deps.open_catalog(deps.catalog_url, deps.store_root, user)
    except (HpcckptError, OSError):
        return False
    try:
        return any(cat.list(j, uid=user.uid) for j in plan.catalog_ids)
    except (HpcckptError, OSError):
        return False
    finally:
        cat.close()


# ------------------------------------------------------------------ the report


@dataclass
class Downtime:
    """Seconds the job did not run, by cause; None where the catalog has no record (yet)."""

    freeze_s: float | None = None
    flush_s: float | None = None
    scheduling_s: float | None = None
    restore_s: float | None = None

    @property
    def total_s(self) -> float | None:
        parts = [self.freeze_s, self.flush_s, self.scheduling_s, self.restore_s]
        return None if any(p is None for p in parts) else round(sum(p for p in parts if p is not None), 3)

    def to_dict(self) -> dict[str, float | None]:
        return {**asdict(self), "total_s": self.total_s}


@dataclass
class MoveResult:
    job_id: str
    user: str
    from_nodes: list[str]
    state: str  # "resumed", "requeued" (not running again yet), "failed"
    detail: str
    final_ckptid: int | None = None
    new_nodes: list[str] = field(default_factory=list)
    downtime: Downtime = field(default_factory=Downtime)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["downtime"] = self.downtime.to_dict()
        return doc


@dataclass
class DrainReport:
    node: str
    drained: bool
    reason: str
    moved: list[MoveResult] = field(default_factory=list)
    left_alone: list[JobPlan] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(m.state != "failed" for m in self.moved)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node, "drained": self.drained, "reason": self.reason, "ok": self.ok,
            "moved": [m.to_dict() for m in self.moved],
            "left_alone": [{"job_id": p.job_id, "user": p.user, "nodes": p.nodes, "why": p.why}
                           for p in self.left_alone],
        }


# ------------------------------------------------------------------ moving


@dataclass
class MoveOptions:
    stop_timeout: float = 300.0  # for the final checkpoint and Slurm's requeue
    resume_timeout: float = 300.0  # for the job to run again elsewhere (0: do not wait)
    poll: float = 0.5
    sleep: Callable[[float], None] = time.sleep
    monotonic: Callable[[], float] = time.monotonic


@dataclass
class _Moving:
    plan: JobPlan
    restarts: int
    asked: float  # wall clock, when the move was requested
    result: MoveResult
    user: User | None


def _restarts(fields: Mapping[str, str]) -> int:
    try:
        return int(fields.get("Restarts", "0") or 0)
    except ValueError:
        return 0


def _state(fields: Mapping[str, str]) -> str:
    raw = fields.get("JobState", "")
    return raw.split("+")[0].split()[0].upper() if raw else ""


def _exit_code(fields: Mapping[str, str]) -> int | None:
    code = fields.get("ExitCode", "").split(":")[0]
    return int(code) if code.isdigit() else None


def _record(deps: HookDeps, mv: _Moving, event: str, detail: str, node: str) -> None:
    if mv.user is None or deps.open_catalog is None or deps.store_root is None:
        return
    try:
        cat = deps.open_catalog(deps.catalog_url, deps.store_root, mv.user)
        try:
            cat.record_job_event(mv.plan.catalog_ids[0], uid=mv.user.uid, event=event, detail=detail, node=node)
        finally:
            cat.close()
    except (HpcckptError, OSError) as err:
        hlog.event(_log, "slurm.drain.unrecorded", f"job {mv.plan.job_id}: cannot record the {event} event: {err}",
                   logging.WARNING, job_id=mv.plan.job_id)


def _split(raw: str | None) -> list[str]:
    return [] if not raw or raw in ("(null)", "None") else [x for x in raw.split(",") if x]


def _start(deps: HookDeps, plan: JobPlan, away_from: list[str], why: str) -> _Moving:
    mv = _Moving(plan, _restarts(plan.fields), deps.clock(),
                 MoveResult(plan.job_id, plan.user, list(plan.nodes), "failed", ""), _user(deps, plan))
    # Before the signal: the EpilogSlurmctld may run the moment the runner exits.
    _record(deps, mv, MOVE_EVENT, why, ",".join(away_from))
    try:
        deps.slurm.signal_batch(plan.job_id, RUNNER_SIGNAL)
    except (SlurmError, NotFoundError) as err:
        mv.result.detail = f"cannot signal its batch shell: {err}"
        return mv
    mv.result.state, mv.result.detail = "signalled", f"SIG{RUNNER_SIGNAL} sent to its runner"
    hlog.event(_log, "slurm.drain.signalled", f"job {plan.job_id}: final checkpoint requested ({why})",
               job_id=plan.job_id, nodes=",".join(plan.nodes))
    return mv


def _await_requeue(deps: HookDeps, moving: list[_Moving], away_from: list[str], opts: MoveOptions) -> None:
    """Until every signalled job has left its node: then apply the restart decision to it."""
    waiting = [m for m in moving if m.result.state == "signalled"]
    end = opts.monotonic() + opts.stop_timeout
    while waiting:
        for mv in list(waiting):
            try:
                fields = deps.slurm.show_job(mv.plan.job_id)
            except (SlurmError, NotFoundError) as err:
                mv.result.state, mv.result.detail = "failed", f"Slurm lost the job: {err}"
                waiting.remove(mv)
                continue
            state = _state(fields)
            if _restarts(fields) <= mv.restarts and state not in _LEFT_STATES:
                continue  # still taking its final checkpoint
            waiting.remove(mv)
            _requeue_elsewhere(deps, mv, fields, away_from)
        if not waiting:
            return
        if opts.monotonic() >= end:
            for mv in waiting:
                mv.result.state = "failed"
                mv.result.detail = (f"still on its node {opts.stop_timeout:.0f} s after the signal: is "
                                    f"SIG{RUNNER_SIGNAL} among its policy's preemption.signals?")
            return
        opts.sleep(opts.poll)


def _requeue_elsewhere(deps: HookDeps, mv: _Moving, fields: Mapping[str, str], away_from: list[str]) -> None:
    state = _state(fields)
    requeued = _restarts(fields) > mv.restarts
    outcome = JobOutcome(
        state="PENDING" if requeued and state not in _LEFT_STATES else state,
        exit_code=EXIT_REQUEUE if requeued else _exit_code(fields),
        requeue_allowed=fields.get("Requeue", "1") == "1", has_checkpoint=True,
        nodes=mv.plan.nodes, excluded=_split(fields.get("ExcNodeList")), moved_from=away_from,
    )
    decision = decide(deps.rules, outcome)
    if decision.action in (Action.NONE, Action.STOP):
        mv.result.state, mv.result.detail = "failed", f"not restarted: {decision.reason}"
        return
    if apply_decision(deps, mv.plan.job_id, decision):
        mv.result.state = "requeued"
        mv.result.detail = f"requeued without {','.join(decision.exclude) or 'no node'}"
    else:
        mv.result.state, mv.result.detail = "failed", "Slurm refused the requeue (see the hook log)"


def _await_resume(deps: HookDeps, moving: list[_Moving], opts: MoveOptions) -> None:
    """Until every requeued job runs again and its restore is recorded; then read its downtime."""
    waiting = [m for m in moving if m.result.state == "requeued"]
    end = opts.monotonic() + opts.resume_timeout
    while True:
        for mv in list(waiting):
            mv.result.downtime, mv.result.final_ckptid, restored = downtime(deps, mv)
            if restored:
                waiting.remove(mv)
                mv.result.state = "resumed"
                try:
                    fields = deps.slurm.show_job(mv.plan.job_id)
                    mv.result.new_nodes = deps.slurm.hostnames(fields.get("NodeList", "")) \
                        if fields.get("NodeList") not in (None, "", "(null)") else []
                except (SlurmError, NotFoundError):
                    pass
                mv.result.detail = f"resumed from checkpoint {mv.result.final_ckptid}"
        if not waiting or opts.monotonic() >= end:
            return
        opts.sleep(opts.poll)


def downtime(deps: HookDeps, mv: _Moving) -> tuple[Downtime, int | None, bool]:
    """(downtime so far, the final checkpoint's id, whether a run restored it yet)."""
    dt = Downtime()
    if mv.user is None or deps.open_catalog is None or deps.store_root is None:
        return dt, None, False
    try:
        cat = deps.open_catalog(deps.catalog_url, deps.store_root, mv.user)
    except (HpcckptError, OSError):
        return dt, None, False
    try:
        rows = [r for j in mv.plan.catalog_ids for r in cat.list(j, uid=mv.user.uid)]
        events = [e for j in mv.plan.catalog_ids for e in cat.job_events(j, uid=mv.user.uid)]
    except (HpcckptError, OSError):
        return dt, None, False
    finally:
        cat.close()
    final = final_checkpoint(rows, mv.asked)
    if final is None:
        return dt, None, False
    meta = final.meta or {}
    frozen = meta.get("frozen_s")
    dt.freeze_s = round(float(frozen), 3) if isinstance(frozen, (int, float)) else None
    dt.flush_s = None if final.duration is None else round(float(final.duration), 3)
    for ev in events:
        if ev.get("event") != "restored":
            continue
        try:
            doc = json.loads(str(ev.get("detail") or "{}"))
        except ValueError:
            continue
        if not isinstance(doc, dict) or doc.get("ckptid") != final.ckptid:
            continue
        started, restore = doc.get("started"), doc.get("restore_s")
        if isinstance(started, (int, float)) and final.finished is not None:
            dt.scheduling_s = round(max(0.0, float(started) - float(final.finished)), 3)
        if isinstance(restore, (int, float)):
            dt.restore_s = round(float(restore), 3)
        return dt, int(final.ckptid), True
    return dt, int(final.ckptid), False


def final_checkpoint(rows: Iterable[Any], since: float) -> Any | None:
    """The checkpoint the move produced: the first committed one begun after ``since``, a final one if any."""
    fresh = sorted((r for r in rows if str(r.status) == "committed" and float(r.created or 0) >= since - 1.0),
                   key=lambda r: r.ckptid)
    finals = [r for r in fresh if (r.meta or {}).get("final")]
    return (finals or fresh or [None])[0]


def move_jobs(deps: HookDeps, plans: Sequence[JobPlan], away_from: list[str], why: str,
              opts: MoveOptions) -> list[MoveResult]:
    """Checkpoint every planned job at once, requeue each without ``away_from``, wait for them elsewhere."""
    moving = [_start(deps, p, away_from, why) for p in plans if p.move]
    _await_requeue(deps, moving, away_from, opts)
    if opts.resume_timeout > 0:
        _await_resume(deps, moving, opts)
    for mv in moving:
        if mv.result.state in ("requeued", "resumed") and mv.result.final_ckptid is None:
            mv.result.downtime, mv.result.final_ckptid, _ = downtime(deps, mv)
        hlog.event(_log, "slurm.drain.moved", f"job {mv.plan.job_id}: {mv.result.state}: {mv.result.detail}",
                   logging.INFO if mv.result.state != "failed" else logging.ERROR, job_id=mv.plan.job_id,
                   state=mv.result.state)
    return [mv.result for mv in moving]


# ------------------------------------------------------------------ who may


def check_operator(deps: HookDeps, caller: User) -> None:
    """Root, SlurmUser or a Slurm Operator/Administrator; anyone else is refused."""
    if caller.uid == 0 or deps.slurm.is_operator(caller.name):
        return
    raise PermissionDeniedError(
        f"{caller.name} may not drain nodes: only root and Slurm operators may",
        hint="ask an admin, or 'sacctmgr modify user NAME set AdminLevel=Operator'; "
             "to move one of your own jobs use 'hpcckpt migrate JOBID'")


# ------------------------------------------------------------------ the commands


def drain_node(deps: HookDeps, node: str, reason: str, caller: User, opts: MoveOptions | None = None, *,
               drain: bool = True) -> DrainReport:
    """``hpcckpt drain NODE``: drain it in Slurm, move its hpcckpt jobs elsewhere, list the others.

    ``drain=False`` (the drain watch): the node is drained already, by the admin.
    """
    opts = opts or MoveOptions()
    check_operator(deps, caller)
    deps.slurm.show_node(node)  # NotFoundError for a node Slurm does not know, before anything is done
    full_reason = f"{REASON_PREFIX}: {reason}" if reason else REASON_PREFIX
    if drain:
        deps.slurm.drain(node, full_reason)
        hlog.event(_log, "slurm.drain.node", f"node {node} drained: {full_reason}", node=node, by=caller.name)
    report = DrainReport(node=node, drained=drain, reason=full_reason if drain else reason)
    plans = []
    for job_id in deps.slurm.running_jobs(node):
        try:
            plans.append(plan_job(deps, job_id))
        except (SlurmError, NotFoundError) as err:  # ended between squeue and now
            hlog.event(_log, "slurm.drain.gone", f"job {job_id}: {err}", logging.DEBUG)
    report.left_alone = [p for p in plans if not p.move]
    report.moved = move_jobs(deps, plans, [node], f"drain of {node} by {caller.name}: {reason or 'no reason'}",
                             opts)
    return report


def migrate_job(deps: HookDeps, job_id: str, caller: User, opts: MoveOptions | None = None) -> MoveResult:
    """``hpcckpt migrate JOBID``: final checkpoint now, requeue without its current node(s), resume there."""
    opts = opts or MoveOptions()
    plan = plan_job(deps, job_id)
    if plan.uid != caller.uid and caller.uid != 0 and not deps.slurm.is_operator(caller.name):
        raise PermissionDeniedError(f"job {job_id} is {plan.user}'s, not yours",
                                    hint="only a job's owner, root or a Slurm operator may migrate it")
    if _state(plan.fields) != "RUNNING":
        raise SlurmError(f"job {job_id} is {_state(plan.fields) or 'in no known state'}, not running",
                         hint="only a running job can be migrated")
    if not plan.move:
        raise SlurmError(f"job {job_id} cannot be migrated: {plan.why}",
                         hint="submit it with 'exec hpcckpt run ...' in its batch script and --requeue "
                              "(plugins/slurm/sbatch-template.sh)")
    return move_jobs(deps, [plan], list(plan.nodes), f"migrate by {caller.name}", opts)[0]


def draining_nodes(deps: HookDeps, only: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(node, reason) of the nodes an admin drained (``state=drain``, ``reboot ASAP``) that still run jobs.

    Nodes drained by ``hpcckpt drain`` itself are left to that command. ``only``: these nodes (default all).
    """
    wanted = set(only)
    out = []
    for info in deps.slurm.all_nodes():
        node = info.get("NodeName", "")
        if wanted and node not in wanted:
            continue
        flags = {f.rstrip("*~#!%$@^-") for f in info.get("State", "").upper().split("+")}
        if not flags & {"DRAIN", "REBOOT_REQUESTED", "FAIL"}:
            continue
        reason = info.get("Reason", "")
        if reason.startswith(REASON_PREFIX):
            continue
        if flags & {"ALLOCATED", "MIXED", "COMPLETING"} or deps.slurm.running_jobs(node):
            out.append((node, reason))
    return out


def watch_once(deps: HookDeps, caller: User, only: Iterable[str] = (),
               opts: MoveOptions | None = None) -> list[DrainReport]:
    """One pass of the drain watch: move hpcckpt jobs off every node an admin is draining.

    Slurm 22.05 has no event for "a node with jobs was drained" (docs/slurm.md), so
    the watch runs periodically on the controller (a systemd timer or cron).
    """
    opts = opts or MoveOptions(resume_timeout=0)
    return [drain_node(deps, node, reason, caller, opts, drain=False) for node, reason in draining_nodes(deps, only)]
