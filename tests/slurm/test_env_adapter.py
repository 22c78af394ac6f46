"""SLURM_* parsing and `scontrol -o show job` parsing."""

from __future__ import annotations

import pytest

from hpcckpt.errors import SlurmError
from hpcckpt.slurm.adapter import check_job_id, parse_show_job
from hpcckpt.slurm.env import from_environ

SHOW = (
    "JobId=7 ArrayJobId=5 ArrayTaskId=2 JobName=my job UserId=root(0) JobState=PENDING Reason=BeginTime "
    "Requeue=1 Restarts=1 ExitCode=0:0 NodeList=(null) ExcNodeList=node1 TRES=cpu=1,mem=1000M,node=1 "
    "Command=/home/a b/run.sh WorkDir=/home/a b StdOut=/home/a b/slurm-5_2.out"
)


def test_parse_show_job_keeps_spaces_and_tres() -> None:
    [job] = parse_show_job(SHOW + "\n\n")
    assert job["JobId"] == "7" and job["ArrayTaskId"] == "2"
    assert job["JobName"] == "my job"
    assert job["TRES"] == "cpu=1,mem=1000M,node=1"
    assert job["WorkDir"] == "/home/a b"
    assert job["Command"] == "/home/a b/run.sh"
    assert job["ExcNodeList"] == "node1"


def test_env_of_an_array_task_in_ctld_epilog() -> None:
    env = from_environ({
        "SLURM_JOB_ID": "7", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "2",
        "SLURM_JOB_UID": "1000", "SLURM_JOB_EXIT_CODE2": "85:0", "SLURM_RESTART_COUNT": "3",
        "SLURM_SCRIPT_CONTEXT": "epilog_slurmctld", "SLURM_JOB_NODELIST": "node[1-2]",
    })
    assert env.job_id == "7" and env.display_id == "5_2" and env.in_array
    assert (env.exit_code, env.exit_signal, env.restart_count, env.uid) == (85, 0, 3, 1000)
    assert env.nodelist == "node[1-2]" and env.context == "epilog_slurmctld"


def test_raw_wait_status_is_decoded() -> None:
    env = from_environ({"SLURM_JOB_ID": "1", "SLURM_JOB_EXIT_CODE": str(85 << 8)})
    assert (env.exit_code, env.exit_signal) == (85, 0)
    env = from_environ({"SLURM_JOB_ID": "1", "SLURM_JOB_EXIT_CODE": "9"})
    assert (env.exit_code, env.exit_signal) == (0, 9)


def test_missing_job_id_and_bad_numbers_are_clear_errors() -> None:
    with pytest.raises(SlurmError, match="SLURM_JOB_ID is not set"):
        from_environ({})
    with pytest.raises(SlurmError, match=r"\$SLURM_JOB_UID='x'"):
        from_environ({"SLURM_JOB_ID": "1", "SLURM_JOB_UID": "x"})


@pytest.mark.parametrize("bad", ["", "1;rm", "../1", "1 2", "-1", "1_"])
def test_job_ids_reaching_argv_are_checked(bad: str) -> None:
    with pytest.raises(SlurmError):
        check_job_id(bad)
    assert check_job_id("4242_7") == "4242_7"
