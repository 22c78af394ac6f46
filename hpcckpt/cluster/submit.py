"""``hpcckpt resume JOBID --submit``: a new Slurm job that carries on from JOBID's latest image.

For a job that failed and was not requeued. The new job runs the old job's
own batch script with the old job's resources (from ``scontrol show job``
while Slurm still remembers it, else from ``slurm-job.json`` the Prolog saved
at start), and with ``HPCCKPT_RESUME_FROM=JOBID`` in its environment: the
script's ``hpcckpt run`` sees it and restores JOBID's latest image instead of
starting afresh. Lineage is recorded both ways: the checkpoint row gets
``new_job_id``, the old job gets a ``resubmitted`` event.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hpcckpt import log as hlog
from hpcckpt.cluster.hooks import JOB_INFO_FILE, job_dir
from hpcckpt.context import User, current_user
from hpcckpt.errors import NotFoundError, SlurmError
from hpcckpt.fs import safe as fsutil
from hpcckpt.slurm.adapter import ScontrolAdapter, SlurmAdapter, check_job_id
from hpcckpt.store.site import Site

_log = hlog.get("slurm.submit")
RESUME_ENV = "HPCCKPT_RESUME_FROM"
_UNSET = ("", "(null)", "None", "N/A", "UNLIMITED", "Partition_Limit", "0")


def _val(fields: Mapping[str, str], key: str) -> str | None:
    raw = fields.get(key, "").strip()
    return None if raw in _UNSET else raw


def resubmit_options(fields: Mapping[str, str]) -> list[str]:
    """sbatch options that give a new job the resources of the job ``fields`` describes.

    Output paths are left to the script's own ``#SBATCH`` lines, so a ``%j``
    pattern names the new job's file instead of overwriting the old one.
    """
    opts: list[str] = []
    for key, flag in (
        ("JobName", "--job-name"),
        ("Partition", "--partition"),
        ("Account", "--account"),
        ("QOS", "--qos"),
        ("TimeLimit", "--time"),
        ("NumNodes", "--nodes"),
        ("NumTasks", "--ntasks"),
        ("CPUs/Task", "--cpus-per-task"),
        ("WorkDir", "--chdir"),
        ("Features", "--constraint"),
        ("Reservation", "--reservation"),
    ):
        value = _val(fields, key)
        if value is not None:
            opts.append(f"{flag}={value}")
    mem = _val(fields, "MinMemoryNode")
    if mem is not None:
        opts.append(f"--mem={mem}")
    mem_cpu = _val(fields, "MinMemoryCPU")
    if mem_cpu is not None and mem is None:
        opts.append(f"--mem-per-cpu={mem_cpu}")
    excluded = _val(fields, "ExcNodeList")
    if excluded is not None:
        opts.append(f"--exclude={excluded}")
    opts.append("--requeue" if fields.get("Requeue", "1") == "1" else "--no-requeue")
    task = _val(fields, "ArrayTaskId")
    if task is not None and task.isdigit():
        # One task of the array, with the same task id, even if the script says --array=1-100.
        opts.append(f"--array={task}")
    return opts


def load_job_info(job_id: str, *, store_root: Path, user: User,
                  slurm: SlurmAdapter) -> tuple[dict[str, str], str]:
    """The job's fields and batch script: from Slurm if it still knows the job, else as saved at start."""
    try:
        fields = slurm.show_job(job_id)
        script = slurm.batch_script(job_id)
        if script.strip():
            return fields, script
    except (NotFoundError, SlurmError) as err:
        hlog.event(_log, "slurm.submit.gone", f"job {job_id}: Slurm no longer has it ({err}); using the saved "
                   "settings", level=10)
    path = job_dir(store_root, user, job_id)
    try:
        dir_fd = fsutil.open_private_dir(path, user.uid, user.gid, base=store_root, create=False)
    except FileNotFoundError as exc:
        raise NotFoundError(f"no store directory {path} for job {job_id}",
                            hint="check the job id and the store (--store or $HPCCKPT_STORE)") from exc
    try:
        fd = os.open(JOB_INFO_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        with os.fdopen(fd, "r", encoding="utf-8") as fh:
            doc: Any = json.load(fh)
    except FileNotFoundError as exc:
        raise NotFoundError(
            f"{path / JOB_INFO_FILE}: missing, and Slurm no longer knows job {job_id}",
            hint="the hpcckpt Prolog saves it at job start: is Prolog= set in slurm.conf (docs/slurm.md)? "
            "Otherwise submit your batch script again with --export=ALL,HPCCKPT_RESUME_FROM=" + job_id,
        ) from exc
    except ValueError as exc:
        raise SlurmError(f"{path / JOB_INFO_FILE}: not valid JSON: {exc}",
                         hint="the file is damaged; resubmit the batch script by hand with "
                         f"HPCCKPT_RESUME_FROM={job_id}") from exc
    finally:
        os.close(dir_fd)
    if not isinstance(doc, dict) or not isinstance(doc.get("fields"), dict) or not doc.get("script"):
        raise SlurmError(f"{path / JOB_INFO_FILE}: has no 'fields' or no batch 'script'",
                         hint=f"resubmit the batch script by hand with HPCCKPT_RESUME_FROM={job_id}")
    return {str(k): str(v) for k, v in doc["fields"].items()}, str(doc["script"])


def submit_resume(
    job_id: str,
    *,
    catalog: Any,
    user: User,
    store_root: Path,
    slurm: SlurmAdapter | None = None,
    extra_options: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> str:
    """Submit a job that resumes ``job_id`` from its latest committed image; returns the new job id."""
    check_job_id(job_id)
    slurm = slurm or ScontrolAdapter()
    latest = catalog.latest(job_id, uid=user.uid)
    if latest is None:
        raise NotFoundError(f"job {job_id} has no committed checkpoint to resume from",
                            hint="'hpcckpt list' shows your jobs and checkpoints")
    fields, script = load_job_info(job_id, store_root=store_root, user=user, slurm=slurm)
    options = [*resubmit_options(fields), *extra_options, f"--export=ALL,{RESUME_ENV}={job_id}"]
    submit_env = dict(os.environ if env is None else env)
    # sbatch reads SBATCH_* and inherits SLURM_*; from inside another job they would leak into the new one.
    for key in [k for k in submit_env if k.startswith(("SLURM_", "SBATCH_")) and k != "SLURM_CONF"]:
        del submit_env[key]
    submit_env[RESUME_ENV] = job_id
    new_id = slurm.submit(script, options, env=submit_env)
    catalog.record_resume(latest.ckptid, resumed_by="sbatch", new_job_id=new_id)
    catalog.record_job_event(job_id, uid=user.uid, event="resubmitted",
                             detail=f"new job {new_id} resumes checkpoint {latest.ckptid}")
    hlog.event(_log, "slurm.submit", f"job {job_id}: submitted job {new_id} to resume checkpoint {latest.ckptid}",
               job_id=job_id, new_job_id=new_id, ckptid=latest.ckptid)
    return new_id


def resubmit(
    job_id: str,
    *,
    store: str | None = None,
    catalog: str | None = None,
    policy: str | None = None,
    extra_options: Sequence[str] = (),
    slurm: SlurmAdapter | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """``hpcckpt resume JOBID --submit``: resolve store, catalog and policy as ``hpcckpt run`` does, then submit.

    ``store``, ``catalog`` and ``policy`` are the command line's ``--store``,
    ``--catalog`` and ``--policy`` (None: environment, then policy, then defaults).
    Returns the new job id.
    """
    site = Site.load(store=store, catalog=catalog, policy_file=policy)
    user = current_user()
    root = site.store_root
    cat = site.open_catalog(user)
    try:
        return submit_resume(job_id, catalog=cat, user=user, store_root=root, slurm=slurm,
                             extra_options=extra_options, env=env)
    finally:
        cat.close()
