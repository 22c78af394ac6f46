"""The one interface the :class:`~hpcckpt.runner.runner.Runner` drives, whatever takes the checkpoints.

Three engines implement it:

* ``criu`` (transparent): :class:`CriuEngine` here, over
  :class:`hpcckpt.core.checkpoint.CriuCheckpointer`; the job is frozen and dumped;
* ``files`` (a program's own restart files) and ``api`` (a program that
  uses ``hpcckpt.CriuCheckpointer``): in :mod:`hpcckpt.app`, which the CLI
  hands in (this package never imports it: the dependencies go one way).

The Runner owns the schedule (interval and ``auto``), the signals, the
control socket and the exit status; an engine only knows how to take a
checkpoint of its job and how to tell what was committed. ``final=True``
means "checkpoint, then the job is ended": a CRIU dump kills the tree, an
app engine asks the program to save and stop and ends it at the deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from hpcckpt.catalog import Catalog
from hpcckpt.context import User
from hpcckpt.core.checkpoint import CheckpointResult, CriuCheckpointer
from hpcckpt.core.pipeline.flush import FlushResult
from hpcckpt.errors import HpcckptError
from hpcckpt.policy import Policy

Result = CheckpointResult | FlushResult


@dataclass
class Taken:
    """A checkpoint begun but not yet committed: ``key`` is the ``stage`` of the result that ends it."""

    key: str
    frozen_s: float = 0.0


@dataclass
class Launched:
    """A job the engine started: the Runner waits for ``pid`` and copies the two pipes."""

    pid: int
    out_r: int
    err_r: int


@runtime_checkable
class JobEngine(Protocol):
    """What the Runner needs of an engine (see the module docstring)."""

    name: str
    #: Set by the Runner: call it from any thread when a result is ready for :meth:`collect`.
    notify: Callable[[], None] | None
    #: Seconds between calls of :meth:`collect` when nothing else wakes the loop (None: only when woken).
    poll_s: float | None

    def collect(self) -> list[Result]: ...

    def take(self, pid: int) -> Taken | None:
        """A periodic checkpoint (None: nothing taken, e.g. the program keeps its own schedule)."""

    def request(self, pid: int) -> Taken | None:
        """An explicit request (``hpcckpt checkpoint``); answered through :meth:`collect`."""

    def checkpoint(self, pid: int, *, final: bool = False, deadline: float | None = None,
                   thaw_on_failure: bool = True) -> CheckpointResult:
        """A checkpoint waited for; with ``final`` the job is ended afterwards."""

    def finish(self, timeout: float | None, *, job_ended: bool = True) -> bool: ...

    def cleanup_staging(self) -> None: ...

    def in_flight(self) -> list[str]: ...

    def has_image(self) -> bool:
        """Whether the job has any committed checkpoint (a preempted job is then worth requeuing)."""

    def describe(self) -> dict[str, Any]:
        """The engine's part of ``hpcckpt status``: name, parent, what it skipped."""

    def close(self) -> None: ...


class LaunchingEngine(JobEngine, Protocol):
    """An engine that starts (or, at resume, restarts) the job itself: ``files`` and ``api``."""

    def launch(self, argv: Sequence[str], env: Mapping[str, str], cwd: str) -> Launched: ...


@dataclass
class EngineSetup:
    """What the session resolved for a job, handed to an app engine's factory."""

    job_id: str
    policy: Policy
    user: User
    store_root: Path
    catalog_url: str | None
    open_catalog: Callable[[], Catalog]  # a connection of the engine's own
    deadline_s: float  # time allowed for a final checkpoint


EngineFactory = Callable[[EngineSetup], LaunchingEngine]


class CriuEngine:
    """The transparent engine: :class:`hpcckpt.core.checkpoint.CriuCheckpointer` seen through :class:`JobEngine`."""

    name = "criu"
    poll_s: float | None = None

    def __init__(self, ckpt: CriuCheckpointer) -> None:
        self.ckpt = ckpt

    @property
    def notify(self) -> Callable[[], None] | None:
        return self.ckpt.notify

    @notify.setter
    def notify(self, fn: Callable[[], None] | None) -> None:
        self.ckpt.notify = fn if fn is not None else (lambda: None)

    def collect(self) -> list[Result]:
        return self.ckpt.collect()

    def take(self, pid: int) -> Taken | None:
        staged = self.ckpt.take(pid)
        return None if staged is None else Taken(staged.staged.name, staged.frozen_s)

    def request(self, pid: int) -> Taken | None:
        staged = self.ckpt.request(pid)
        return None if staged is None else Taken(staged.staged.name, staged.frozen_s)

    def checkpoint(self, pid: int, *, final: bool = False, deadline: float | None = None,
                   thaw_on_failure: bool = True) -> CheckpointResult:
        return self.ckpt.checkpoint(pid, final=final, deadline=deadline, thaw_on_failure=thaw_on_failure)

    def finish(self, timeout: float | None, *, job_ended: bool = True) -> bool:
        return self.ckpt.finish(timeout, job_ended=job_ended)

    def cleanup_staging(self) -> None:
        self.ckpt.cleanup_staging()

    def in_flight(self) -> list[str]:
        return self.ckpt.in_flight()

    def has_image(self) -> bool:
        try:
            job = self.ckpt.job
            return self.ckpt.catalog.latest(job.identity.job_id, uid=job.user.uid) is not None
        except HpcckptError:
            return False

    def describe(self) -> dict[str, Any]:
        parent = self.ckpt.parent
        return {"engine": self.name, "skipped": self.ckpt.flusher.skipped,
                "parent": None if parent is None else parent.ckptid}

    def close(self) -> None:
        self.ckpt.catalog.close()
