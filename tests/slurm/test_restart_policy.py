"""The restart decision, case by case (pure logic, no Slurm)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hpcckpt.slurm.restart_policy import (
    MAX_BACKOFF_S,
    MAX_EXCLUDED_NODES,
    Action,
    JobOutcome,
    RestartKind,
    RestartRules,
    decide,
)

RULES = RestartRules(max_restarts=2, backoff=10, exclude_failed_node=True, requeue=True)


def test_completed_job_is_left_alone() -> None:
    d = decide(RULES, JobOutcome(state="COMPLETED", exit_code=0, has_checkpoint=True))
    assert d.action is Action.NONE and d.kind is RestartKind.FINAL


def test_application_failure_is_not_restarted() -> None:
    d = decide(RULES, JobOutcome(state="FAILED", exit_code=1, has_checkpoint=True))
    assert d.action is Action.NONE
    assert "its own failure" in d.reason


def test_cancelled_job_is_never_restarted() -> None:
    d = decide(RULES, JobOutcome(state="CANCELLED", exit_signal=15, has_checkpoint=True))
    assert d.action is Action.NONE


def test_node_failure_requeues_and_excludes_the_node() -> None:
    out = JobOutcome(state="NODE_FAIL", has_checkpoint=True, nodes=["node1"], failed_nodes=["node1"],
                     excluded=["node7"])
    d = decide(RULES, out)
    assert d.action is Action.REQUEUE and d.kind is RestartKind.FAILURE
    assert d.exclude == ["node7", "node1"]
    assert d.delay == 10


def test_slurm_requeued_after_node_failure_gets_adjusted() -> None:
    out = JobOutcome(state="PENDING", has_checkpoint=True, nodes=["node2"], failed_nodes=["node2"])
    d = decide(RULES, out)
    assert d.action is Action.ADJUST
    assert d.exclude == ["node2"]


def test_voluntary_requeue_does_not_count_or_exclude() -> None:
    out = JobOutcome(state="PENDING", exit_code=85, prior_failures=99, nodes=["node1"])
    d = decide(RULES, out)
    assert d.action is Action.ADJUST and d.kind is RestartKind.VOLUNTARY
    assert d.exclude == [] and d.delay == 10


def test_failure_backoff_doubles_and_is_capped() -> None:
    d0 = decide(RULES, JobOutcome(state="NODE_FAIL", has_checkpoint=True, prior_failures=0))
    d1 = decide(RULES, JobOutcome(state="NODE_FAIL", has_checkpoint=True, prior_failures=1))
    assert (d0.delay, d1.delay) == (10, 20)
    big = RestartRules(max_restarts=100, backoff=1000)
    d = decide(big, JobOutcome(state="NODE_FAIL", has_checkpoint=True, prior_failures=20))
    assert d.delay == MAX_BACKOFF_S


def test_restart_limit_stops_a_requeued_job_and_leaves_an_ended_one() -> None:
    requeued = decide(RULES, JobOutcome(state="PENDING", failed_nodes=["n1"], prior_failures=2))
    assert requeued.action is Action.STOP
    ended = decide(RULES, JobOutcome(state="NODE_FAIL", has_checkpoint=True, prior_failures=2))
    assert ended.action is Action.NONE and "limit" in ended.reason


def test_no_requeue_without_image_permission_or_policy() -> None:
    base = JobOutcome(state="NODE_FAIL", has_checkpoint=True)
    assert decide(RULES, JobOutcome(state="NODE_FAIL", has_checkpoint=False)).action is Action.NONE
    assert decide(RULES, JobOutcome(state="NODE_FAIL", has_checkpoint=True,
                                    requeue_allowed=False)).action is Action.NONE
    no_policy = RestartRules(requeue=False)
    assert decide(no_policy, base).action is Action.NONE


def test_timeout_without_final_image_restarts_from_periodic_one() -> None:
    d = decide(RULES, JobOutcome(state="TIMEOUT", has_checkpoint=True))
    assert d.action is Action.REQUEUE and d.kind is RestartKind.FAILURE


def test_exclusion_list_is_bounded() -> None:
    out = JobOutcome(state="NODE_FAIL", has_checkpoint=True, failed_nodes=["new"],
                     excluded=[f"n{i}" for i in range(20)])
    d = decide(RULES, out)
    assert len(d.exclude) == MAX_EXCLUDED_NODES and d.exclude[-1] == "new"


@given(
    state=st.sampled_from(["COMPLETED", "FAILED", "NODE_FAIL", "TIMEOUT", "PENDING", "CANCELLED", "PREEMPTED"]),
    code=st.one_of(st.none(), st.integers(0, 255)),
    prior=st.integers(0, 10),
    ckpt=st.booleans(),
)
def test_failures_never_exceed_the_limit(state: str, code: int | None, prior: int, ckpt: bool) -> None:
    d = decide(RULES, JobOutcome(state=state, exit_code=code, prior_failures=prior, has_checkpoint=ckpt))
    if d.restarts and d.kind is RestartKind.FAILURE:
        assert prior + 1 <= RULES.max_restarts
    if d.action is Action.REQUEUE:
        assert ckpt
