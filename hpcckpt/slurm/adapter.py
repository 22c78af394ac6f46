"""The one place hpcckpt talks to Slurm: ``scontrol`` and ``sbatch``, by argv, never a shell.

The hooks, the restart logic and ``resume --submit`` use the
:class:`SlurmAdapter` protocol; unit tests pass a fake, production passes
:class:`ScontrolAdapter`. Failures become :class:`~hpcckpt.errors.SlurmError`
carrying the command and its stderr, and "command not found" is told apart
from "Slurm said no".
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from hpcckpt import log as hlog
from hpcckpt.errors import NotFoundError, SlurmError

_log = hlog.get("slurm.adapter")

# `scontrol -o show job` prints "Key=Value Key=Value ..." on one line. Values
# such as Command or WorkDir may hold spaces, so a key starts only where a
# capitalised word followed by "=" follows whitespace; TRES values
# ("cpu=1,mem=1G") have lowercase keys after "=" or "," and stay intact.
_KEY = re.compile(r"(?:^|\s)([A-Z][A-Za-z0-9_:/]*)=")
_JOB_ID_RE = re.compile(r"^[0-9]+(?:_[0-9]+)?$")
_NODE_RE = re.compile(r"^[A-Za-z0-9._\-\[\],]+$")


def parse_show_job(text: str) -> list[dict[str, str]]:
    """Parse ``scontrol -o show job`` output: one dict per line (per job or array task)."""
    jobs: list[dict[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        keys = list(_KEY.finditer(line))
        fields: dict[str, str] = {}
        for i, m in enumerate(keys):
            end = keys[i + 1].start() if i + 1 < len(keys) else len(line)
            fields[m.group(1)] = line[m.end() : end].strip()
        if fields:
            jobs.append(fields)
    return jobs


def check_job_id(job_id: str) -> str:
    """Refuse anything but ``N`` or ``N_M``: these ids reach argv of root-run commands."""
    if not _JOB_ID_RE.match(job_id):
        raise SlurmError(f"{job_id!r} is not a Slurm job id", hint="use a number such as 4242 or 4242_7")
    return job_id


class SlurmAdapter(Protocol):
    def show_job(self, job_id: str) -> dict[str, str]: ...

    def requeue(self, job_id: str, *, hold: bool = False) -> None: ...

    def update_job(self, job_id: str, **fields: str) -> None: ...

    def cancel(self, job_id: str) -> None: ...

    def submit(self, script: str | Path, options: Sequence[str], *, env: Mapping[str, str] | None = None) -> str: ...

    def drain(self, node: str, reason: str) -> None: ...

    def batch_script(self, job_id: str) -> str: ...

    def node_state(self, node: str) -> str: ...

    def hostnames(self, expr: str) -> list[str]: ...

    def show_node(self, node: str) -> dict[str, str]: ...

    def running_jobs(self, node: str) -> list[str]: ...

    def all_nodes(self) -> list[dict[str, str]]: ...

    def signal_batch(self, job_id: str, signal: str) -> None: ...

    def is_operator(self, user: str) -> bool: ...


class ScontrolAdapter:
    """The real Slurm, through its client commands. Honors ``$SLURM_CONF``."""

    def __init__(self, *, timeout: float = 30.0, env: Mapping[str, str] | None = None) -> None:
        self.timeout = timeout
        self.env = dict(env) if env is not None else None

    def _run(self, argv: Sequence[str], *, stdin: str | None = None,
             env: Mapping[str, str] | None = None) -> str:
        full_env = dict(env) if env is not None else self.env
        try:
            res = subprocess.run(
                list(argv), input=stdin, capture_output=True, text=True, timeout=self.timeout, env=full_env,
                check=False,
            )
        except FileNotFoundError as exc:
            raise SlurmError(
                f"{argv[0]}: command not found",
                hint="install the Slurm client commands on this host, or put them on PATH",
            ) from exc
        except PermissionError as exc:
            raise SlurmError(f"{argv[0]}: permission denied: {exc.strerror}") from exc
        except subprocess.TimeoutExpired as exc:
            raise SlurmError(
                f"{' '.join(argv)}: no answer within {self.timeout:.0f}s",
                hint="is slurmctld up? try 'scontrol ping'",
            ) from exc
        if res.returncode != 0:
            err = (res.stderr or res.stdout).strip()
            if "Invalid job id" in err:
                raise NotFoundError(f"Slurm does not know job {argv[-1]}: {err}")
            raise SlurmError(f"{' '.join(argv)} failed with exit status {res.returncode}: {err}")
        hlog.event(_log, "slurm.cmd", " ".join(argv), level=10)
        return res.stdout

    def show_job(self, job_id: str) -> dict[str, str]:
        out = self._run(["scontrol", "-o", "show", "job", check_job_id(job_id)])
        jobs = parse_show_job(out)
        for job in jobs:
            if job.get("JobId") == job_id:
                return job
        if jobs:
            return jobs[0]
        raise NotFoundError(f"Slurm does not know job {job_id}")

    def requeue(self, job_id: str, *, hold: bool = False) -> None:
        self._run(["scontrol", "requeuehold" if hold else "requeue", check_job_id(job_id)])

    def update_job(self, job_id: str, **fields: str) -> None:
        if not fields:
            return
        args = [f"{k}={v}" for k, v in fields.items()]
        for a in args:
            if "\n" in a:
                raise SlurmError(f"refusing a newline in scontrol update argument {a!r}")
        self._run(["scontrol", "update", f"JobId={check_job_id(job_id)}", *args])

    def cancel(self, job_id: str) -> None:
        self._run(["scancel", check_job_id(job_id)])

    def submit(self, script: str | Path, options: Sequence[str], *, env: Mapping[str, str] | None = None) -> str:
        """Submit a script (a path, or its text on stdin); returns the new job id."""
        argv = ["sbatch", "--parsable", *options]
        if isinstance(script, Path):
            out = self._run([*argv, str(script)], env=env)
        else:
            out = self._run(argv, stdin=script, env=env)
        job_id = out.strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmError(f"sbatch printed {out.strip()!r} instead of a job id")
        return job_id

    def drain(self, node: str, reason: str) -> None:
        if not _NODE_RE.match(node):
            raise SlurmError(f"{node!r} is not a node name")
        self._run(["scontrol", "update", f"NodeName={node}", "State=DRAIN", f"Reason={reason[:200]}"])

    def batch_script(self, job_id: str) -> str:
        return self._run(["scontrol", "write", "batch_script", check_job_id(job_id), "-"])

    def node_state(self, node: str) -> str:
        """The node's State, e.g. ``IDLE``, ``DOWN*+DRAIN``, ``ALLOCATED``."""
        return self.show_node(node).get("State", "")

    def show_node(self, node: str) -> dict[str, str]:
        """``scontrol -o show node NODE`` as a dict (State, Reason, ...)."""
        if not _NODE_RE.match(node):
            raise SlurmError(f"{node!r} is not a node name")
        try:
            out = self._run(["scontrol", "-o", "show", "node", node])
        except SlurmError as err:
            if "Invalid node name" in err.message:
                raise NotFoundError(f"Slurm does not know node {node}",
                                    hint="'sinfo -N' lists the nodes") from err
            raise
        for rec in parse_show_job(out):
            if rec.get("NodeName") == node:
                return rec
        raise NotFoundError(f"Slurm does not know node {node}", hint="'sinfo -N' lists the nodes")

    def running_jobs(self, node: str) -> list[str]:
        """Ids of the jobs running on ``node`` (``N``, or ``N_M`` for an array task)."""
        if not _NODE_RE.match(node):
            raise SlurmError(f"{node!r} is not a node name")
        out = self._run(["squeue", "--noheader", "--all", f"--nodelist={node}", "--states=RUNNING",
                         "--format=%i"])
        return [j for j in (line.strip() for line in out.splitlines()) if _JOB_ID_RE.match(j)]

    def all_nodes(self) -> list[dict[str, str]]:
        """Every node, as ``scontrol -o show node`` prints it."""
        return [rec for rec in parse_show_job(self._run(["scontrol", "-o", "show", "node"])) if rec.get("NodeName")]

    def signal_batch(self, job_id: str, signal: str) -> None:
        """Send ``signal`` to the job's batch shell only (``scancel --batch``): for ``exec hpcckpt run``
        that is the runner itself, and the job's own processes are not touched."""
        if not signal.isalnum():
            raise SlurmError(f"{signal!r} is not a signal name")
        self._run(["scancel", "--batch", f"--signal={signal}", check_job_id(job_id)])

    def is_operator(self, user: str) -> bool:
        """Whether ``user`` may operate Slurm: its SlurmUser, or AdminLevel Operator/Administrator in
        Slurm's accounting. False when it cannot tell (no slurmdbd); root is checked by the caller."""
        if not user or not user.replace("-", "").replace("_", "").replace(".", "").isalnum():
            return False
        try:
            config = self._run(["scontrol", "show", "config"])
        except SlurmError:
            config = ""
        for line in config.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "SlurmUser" and value.strip().split("(")[0] == user:
                return True
        try:
            out = self._run(["sacctmgr", "--noheader", "--parsable2", "show", "user", user, "format=AdminLevel"])
        except SlurmError:
            return False
        return any(line.strip().lower() in ("operator", "administrator") for line in out.splitlines())

    def hostnames(self, expr: str) -> list[str]:
        """Expand a Slurm hostlist (``node[1-3]``) into names."""
        if not _NODE_RE.match(expr):
            raise SlurmError(f"{expr!r} is not a node list")
        if "[" not in expr:
            return [n for n in expr.split(",") if n]
        return self._run(["scontrol", "show", "hostnames", expr]).split()
