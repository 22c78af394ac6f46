"""A fake Slurm for unit tests of the hooks' decision logic (injected, never patched in)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hpcckpt.errors import NotFoundError, SlurmError


@dataclass
class FakeSlurm:
    jobs: dict[str, dict[str, str]] = field(default_factory=dict)
    scripts: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    submitted: list[tuple[str, list[str], dict[str, str]]] = field(default_factory=list)
    fail_requeues: int = 0  # refuse this many requeues, as Slurm does while a job completes
    next_id: int = 1000

    def show_job(self, job_id: str) -> dict[str, str]:
        if job_id not in self.jobs:
            raise NotFoundError(f"Slurm does not know job {job_id}")
        return dict(self.jobs[job_id])

    def requeue(self, job_id: str, *, hold: bool = False) -> None:
        self.calls.append(("requeue", job_id))
        if self.fail_requeues > 0:
            self.fail_requeues -= 1
            raise SlurmError("Job is currently being completed")
        self.jobs[job_id]["JobState"] = "PENDING"

    def update_job(self, job_id: str, **fields: str) -> None:
        self.calls.append(("update", job_id, *(f"{k}={v}" for k, v in sorted(fields.items()))))
        self.jobs[job_id].update(fields)

    def cancel(self, job_id: str) -> None:
        self.calls.append(("cancel", job_id))
        self.jobs[job_id]["JobState"] = "CANCELLED"

    def submit(self, script: str | Path, options: Sequence[str], *, env: Mapping[str, str] | None = None) -> str:
        self.next_id += 1
        self.submitted.append((str(script), list(options), dict(env or {})))
        return str(self.next_id)

    def drain(self, node: str, reason: str) -> None:
        self.calls.append(("drain", node, reason))

    def batch_script(self, job_id: str) -> str:
        if job_id not in self.scripts:
            raise NotFoundError(f"no batch script for {job_id}")
        return self.scripts[job_id]

    def node_state(self, node: str) -> str:
        return self.nodes.get(node, "IDLE")

    def hostnames(self, expr: str) -> list[str]:
        return expr.split(",")
