"""Every error hpcckpt raises, with its exit code, in one place.

Exit codes (also in docs/cli.md):

====  ===============================================================
 0    success
 1    unexpected internal error (a bug: please report it)
 2    usage error (bad command-line arguments)
 3    policy or configuration error
 4    image is corrupt (checksum, length, magic or structure), or records a failed checkpoint
 5    image is unreadable (missing, not a regular file, I/O error)
 6    catalog error
 7    store error (cannot write, disk full, unsafe path)
 8    checkpoint engine error (CRIU missing, failed dump/restore)
 9    restore refused: this node or the job's files do not match the image
10    permission denied: not the owner of the job or checkpoint, or not allowed to read its image
11    not found: no such job or checkpoint
12    Slurm error
13    MPI / application-assisted checkpoint error
14    the job's runner cannot be reached
15    the job is already running (its lease is held by a live runner)
16    the job already ended on its own: resuming it needs ``--force``
85    the job was checkpointed and stopped: requeue it
      (put ``RequeueExit=85`` in slurm.conf so Slurm does it by itself)
141   the reader of hpcckpt's output went away (``hpcckpt list | head``): 128 + SIGPIPE,
      as a shell reports any program killed by a closed pipe
====  ===============================================================

A job that runs to its end exits with its own status, and a job killed by
signal N exits with 128+N, as a shell would report it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_POLICY = 3
EXIT_CORRUPT = 4
EXIT_UNREADABLE = 5
EXIT_CATALOG = 6
EXIT_STORE = 7
EXIT_ENGINE = 8
EXIT_INCOMPATIBLE = 9
EXIT_PERMISSION = 10
EXIT_NOT_FOUND = 11
EXIT_SLURM = 12
EXIT_MPI = 13
EXIT_RUNNER = 14
EXIT_JOB_RUNNING = 15
EXIT_JOB_FINISHED = 16
EXIT_REQUEUE = 85
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


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


class ImageError(HpcckptError):
    """Base for image problems."""

    exit_code = EXIT_CORRUPT


class CorruptImageError(ImageError):
    """The image's bytes are wrong: bad magic, length, checksum or structure.

    ``offset`` is the byte offset in the file, ``record`` the record index and
    ``rtype`` the record type name, where known.
    """

    exit_code = EXIT_CORRUPT

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        offset: int | None = None,
        record: int | None = None,
        rtype: str | None = None,
        hint: str | None = None,
    ) -> None:
        where = []
        if path is not None:
            where.append(str(path))
        if offset is not None:
            where.append(f"offset {offset}")
        if record is not None:
            where.append(f"record {record}" + (f" ({rtype})" if rtype else ""))
        full = f"{', '.join(where)}: {message}" if where else message
        super().__init__(
            full,
            hint=hint
            or "the image cannot be trusted; resume from an older checkpoint (hpcckpt list JOBID) "
            "and run 'hpcckpt verify' on it",
        )
        self.path = path
        self.offset = offset
        self.record = record
        self.rtype = rtype


class UnsupportedImageError(ImageError):
    """A well-formed image of a format version this hpcckpt does not understand."""

    exit_code = EXIT_CORRUPT


class UnreadableImageError(ImageError):
    exit_code = EXIT_UNREADABLE


class UnsafeImageError(ImageError):
    """The image is intact but its content is refused (path traversal, devices, foreign uids)."""

    exit_code = EXIT_CORRUPT


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
