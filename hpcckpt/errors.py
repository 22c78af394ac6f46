"""Every error hpcckpt raises, each a class with its exit code (the codes: :mod:`hpcckpt.exitcodes`).

The image's own errors (corrupt, unsupported, unreadable, unsafe) are in
:mod:`hpcckpt.image.errors`, with the format they guard.

``str(err)`` is the message, naming the file, line or offset where known;
``hint`` says what to do next. The CLI prints both and exits with the code.
"""

from __future__ import annotations

from hpcckpt.exitcodes import (
    EXIT_CATALOG,
    EXIT_ENGINE,
    EXIT_INCOMPATIBLE,
    EXIT_INTERNAL,
    EXIT_JOB_FINISHED,
    EXIT_JOB_RUNNING,
    EXIT_MPI,
    EXIT_NOT_FOUND,
    EXIT_PERMISSION,
    EXIT_POLICY,
    EXIT_RUNNER,
    EXIT_SLURM,
    EXIT_STORE,
    EXIT_USAGE,
)


class HpcckptError(Exception):
    """Base class. ``str(err)`` is the message; ``hint`` says what to do next."""

    exit_code: int = EXIT_INTERNAL

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def render(self) -> str:
        """The message and hint, as shown to a user."""
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class UsageError(HpcckptError):
    exit_code = EXIT_USAGE


class PolicyError(HpcckptError):
    """A policy file or setting is invalid, or tries to override a site lock."""

    exit_code = EXIT_POLICY


class CatalogError(HpcckptError):
    exit_code = EXIT_CATALOG


class CatalogVersionError(CatalogError):
    """The catalog schema is newer than this hpcckpt."""


class StoreError(HpcckptError):
    exit_code = EXIT_STORE


class UnsafePathError(StoreError):
    """A path that code running with privilege must not follow (symlink, wrong owner)."""


class EngineError(HpcckptError):
    """The checkpoint engine failed. ``log_excerpt`` holds the relevant part of its log."""

    exit_code = EXIT_ENGINE

    def __init__(self, message: str, *, hint: str | None = None, log_excerpt: str = "") -> None:
        super().__init__(message, hint=hint)
        self.log_excerpt = log_excerpt


class EngineNotFoundError(EngineError):
    pass


class ExternalConnectionError(EngineError):
    """A checkpoint was skipped: the job holds a connection to a peer outside it (job.external_connections)."""


class IncompatibleError(HpcckptError):
    """The image cannot run here: CPU, kernel or the job's files differ."""

    exit_code = EXIT_INCOMPATIBLE


class PermissionDeniedError(HpcckptError):
    exit_code = EXIT_PERMISSION


class NotFoundError(HpcckptError):
    exit_code = EXIT_NOT_FOUND


class SlurmError(HpcckptError):
    exit_code = EXIT_SLURM


class MPIError(HpcckptError):
    exit_code = EXIT_MPI


class RunnerUnreachableError(HpcckptError):
    exit_code = EXIT_RUNNER


class JobRunningError(HpcckptError):
    """Another runner holds the job's lease and is alive: a second live copy would fork its history."""

    exit_code = EXIT_JOB_RUNNING


class JobFinishedError(HpcckptError):
    """The job's last run ended on its own; resuming it would run finished work again."""

    exit_code = EXIT_JOB_FINISHED


class DeadlineExceededError(HpcckptError):
    """A checkpoint could not finish before its deadline (for example Slurm's GraceTime)."""

    exit_code = EXIT_ENGINE
