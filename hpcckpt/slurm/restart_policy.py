"""Whether and how a job that ended comes back: the pure decision behind EpilogSlurmctld.

No I/O here: the hook gathers the facts (:class:`JobOutcome`) and the policy
numbers (:class:`RestartRules`), this module decides, the hook applies the
decision through the Slurm adapter. Unit tests drive it directly.

Two kinds of comeback are told apart, because they deserve different limits:

* *voluntary*: the runner checkpointed and asked to be requeued (exit 85:
  preemption, walltime) or Slurm preempted it. Nothing is wrong with the job
  or the node, so these never count against ``failure.max_restarts`` and get
  only the base backoff.
* *failure*: the node died (NODE_FAIL, a down node), the job hit its time
  limit without a final image (TIMEOUT), or the runner was killed. These
  count, back off exponentially, and, for node failures, keep the node out of
  the next attempt (``ExcNodeList``).

A job that ended by itself (any exit status but 85), was cancelled, or ran
out of memory is never restarted: doing it again from the last image would
end the same way.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

EXIT_REQUEUE = 85
# Job states in which Slurm has already put the job back in the queue.
_REQUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING"})
_FAILURE_STATES = frozenset({"NODE_FAIL", "BOOT_FAIL", "TIMEOUT"})
_NEVER_STATES = frozenset({"COMPLETED", "CANCELLED", "OUT_OF_MEMORY", "DEADLINE"})
# Exponential backoff stops growing here, so a long-failing job is still retried hourly at most.
MAX_BACKOFF_S = 3600
# An ExcNodeList that grows without bound can make a job unschedulable.
MAX_EXCLUDED_NODES = 8


class Action(str, enum.Enum):
    NONE = "none"  # leave the job as it is
    ADJUST = "adjust"  # Slurm requeued it: set StartTime / ExcNodeList on the pending job
    REQUEUE = "requeue"  # Slurm did not requeue it: requeue it ourselves
    STOP = "stop"  # Slurm requeued it but the restart limit is reached: cancel it


class RestartKind(str, enum.Enum):
    VOLUNTARY = "voluntary"
    FAILURE = "failure"
    FINAL = "final"


@dataclass(frozen=True)
class RestartRules:
    """The policy's say (``failure.*`` and ``slurm.requeue``)."""

    max_restarts: int = 3
    backoff: int = 0
    exclude_failed_node: bool = True
    requeue: bool = True


@dataclass(frozen=True)
class JobOutcome:
    """What EpilogSlurmctld saw. ``state`` is Slurm's JobState without flags."""

    state: str
    exit_code: int | None = None
    exit_signal: int | None = None
    requeue_allowed: bool = True  # the job's Requeue=1 (sbatch --requeue or JobRequeue=1)
    has_checkpoint: bool = False  # a committed image exists for this job
    prior_failures: int = 0  # failure restarts already done, from the catalog's job events
    nodes: Sequence[str] = ()  # the nodes it ran on
    failed_nodes: Sequence[str] = ()  # of those, the ones Slurm now reports down / not responding
    excluded: Sequence[str] = ()  # the job's current ExcNodeList
    # Nodes an admin or the owner moved the job off (`hpcckpt drain` / `hpcckpt migrate`): a voluntary
    # comeback that must not land there again, whatever failure.exclude_failed_node says.
    moved_from: Sequence[str] = ()


@dataclass(frozen=True)
class RestartDecision:
    action: Action
    kind: RestartKind
    reason: str
    delay: int | None = None  # seconds until it may start; None leaves Slurm's own hold
    exclude: list[str] = field(default_factory=list)  # the full new ExcNodeList, or [] to leave it

    @property
    def restarts(self) -> bool:
        return self.action in (Action.ADJUST, Action.REQUEUE)


MOVE_EVENT = "move"


def pending_move(events: Sequence[Mapping[str, Any]]) -> list[str]:
    """The nodes of the job's last ``move`` event (drain, migrate) if no ``end`` event came after it.

    ``hpcckpt drain`` and ``hpcckpt migrate`` record the event before they signal
    the job; the run that took the final checkpoint then ends, and the restart
    that follows must keep off those nodes. Events are the catalog's, oldest first.
    """
    nodes: list[str] = []
    for ev in events:
        if ev.get("event") == MOVE_EVENT:
            nodes = [n for n in str(ev.get("node") or "").split(",") if n]
        elif ev.get("event") == "end":
            nodes = []  # that move was for a run that has ended already (the hook reads before it records)
    return nodes


def classify(out: JobOutcome) -> RestartKind:
    state = out.state.upper()
    if out.failed_nodes or state in _FAILURE_STATES:
        return RestartKind.FAILURE
    if out.exit_code == EXIT_REQUEUE or state in ("PREEMPTED",):
        return RestartKind.VOLUNTARY
    if state in _REQUEUED_STATES:
        # Slurm requeued it without a node failure: preemption or RequeueExit.
        return RestartKind.VOLUNTARY
    if state == "FAILED" and out.exit_signal == 9 and out.exit_code in (0, None):
        # SIGKILL of the whole job with no status of its own: its runner was killed
        # from outside (slurmd restart, node trouble), not by the application.
        return RestartKind.FAILURE
    return RestartKind.FINAL


def backoff_delay(rules: RestartRules, kind: RestartKind, failures: int) -> int:
    """Base backoff for voluntary restarts; doubling per earlier failure for failures."""
    if rules.backoff <= 0:
        return 0
    if kind is RestartKind.FAILURE:
        return int(min(MAX_BACKOFF_S, rules.backoff * (2 ** max(0, failures))))
    return int(min(MAX_BACKOFF_S, rules.backoff))


def _exclusions(rules: RestartRules, out: JobOutcome) -> list[str]:
    failed = list(out.failed_nodes) if rules.exclude_failed_node else []
    if not failed and not out.moved_from:
        return []
    merged = list(dict.fromkeys([*out.excluded, *failed, *out.moved_from]))
    return merged[-MAX_EXCLUDED_NODES:]


def decide(rules: RestartRules, out: JobOutcome) -> RestartDecision:
    """The restart decision for one job (or one array task: the caller acts on that task only)."""
    state = out.state.upper()
    already_requeued = state in _REQUEUED_STATES
    if state in _NEVER_STATES and not already_requeued:
        return RestartDecision(Action.NONE, RestartKind.FINAL, f"job ended {state}; nothing to restart")
    kind = classify(out)
    if kind is RestartKind.FINAL:
        why = "it finished" if out.exit_code == 0 else "its own failure"
        return RestartDecision(
            Action.NONE, kind,
            f"job ended {state} with exit status {out.exit_code}: {why}, not restarted",
        )
    failures = out.prior_failures + (1 if kind is RestartKind.FAILURE else 0)
    if kind is RestartKind.FAILURE and failures > rules.max_restarts:
        if already_requeued:
            return RestartDecision(
                Action.STOP, kind,
                f"restart limit reached: {failures - 1} failure restarts done, failure.max_restarts="
                f"{rules.max_restarts}",
            )
        return RestartDecision(
            Action.NONE, kind, f"restart limit reached (failure.max_restarts={rules.max_restarts})"
        )
    delay = backoff_delay(rules, kind, failures - 1 if kind is RestartKind.FAILURE else 0)
    exclude = _exclusions(rules, out)
    if already_requeued:
        return RestartDecision(Action.ADJUST, kind, f"Slurm requeued the job ({kind.value})", delay, exclude)
    if not rules.requeue:
        return RestartDecision(Action.NONE, kind, "policy slurm.requeue is false")
    if not out.requeue_allowed:
        return RestartDecision(Action.NONE, kind, "the job was submitted with --no-requeue")
    if not out.has_checkpoint:
        return RestartDecision(Action.NONE, kind, "no committed checkpoint to restart from")
    return RestartDecision(Action.REQUEUE, kind, f"job ended {state}; restarting from its latest image",
                           delay, exclude)
