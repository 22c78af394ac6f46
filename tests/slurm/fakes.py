"""A fake Slurm for unit tests of the hooks' decision logic (injected, never patched in)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
    node_fields: dict[str, dict[str, str]] = field(default_factory=dict)  # show_node beyond State
    operators: set[str] = field(default_factory=set)
    # What the job does when its batch shell is signalled: called with (fake, job_id, signal).
    on_signal: Callable[[FakeSlurm, str, str], None] | None = None

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
        self.nodes[node] = self.nodes.get(node, "IDLE").split("+")[0] + "+DRAIN"
        self.node_fields.setdefault(node, {})["Reason"] = reason

    def batch_script(self, job_id: str) -> str:
        if job_id not in self.scripts:
            raise NotFoundError(f"no batch script for {job_id}")
        return self.scripts[job_id]

    def node_state(self, node: str) -> str:
        return self.nodes.get(node, "IDLE")

    def hostnames(self, expr: str) -> list[str]:
        return expr.split(",")

    def show_node(self, node: str) -> dict[str, str]:
        if node not in self.nodes and node not in self.node_fields:
            raise NotFoundError(f"Slurm does not know node {node}")
        return {"NodeName": node, "State": self.node_state(node), **self.node_fields.get(node, {})}

    def running_jobs(self, node: str) -> list[str]:
        return [j for j, f in self.jobs.items()
                if f.get("JobState") == "RUNNING" and node in f.get("NodeList", "").split(",")]

    def all_nodes(self) -> list[dict[str, str]]:
        return [self.show_node(n) for n in dict.fromkeys([*self.nodes, *self.node_fields])]

    def signal_batch(self, job_id: str, signal: str) -> None:
        self.calls.append(("signal", job_id, signal))
        if job_id not in self.jobs:
            raise NotFoundError(f"Slurm does not know job {job_id}")
        if self.on_signal is not None:
            self.on_signal(self, job_id, signal)

    def is_operator(self, user: str) -> bool:
        return user in self.operators
