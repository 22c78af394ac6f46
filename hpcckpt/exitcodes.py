"""What hpcckpt's exit status means: one table, for users, scripts and Slurm (``RequeueExit=85``).

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
