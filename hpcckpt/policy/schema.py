"""Every policy key: its kind, its built-in default and one line on what it does.

This table is the single source of truth for validation, for defaults and for
``hpcckpt policy show``; ``configs/default.yaml`` documents the same keys at
length, and a test keeps the three in step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hpcckpt.policy.kinds import (
    ArgListKind,
    BoolKind,
    DurationKind,
    EnumKind,
    FloatKind,
    IntKind,
    Invalid,
    Kind,
    PathKind,
    SignalListKind,
    SizeKind,
)

MiB = 1 << 20

ENGINES = ("criu", "app")
CODECS = ("none", "zstd", "lz4")
# The levels each codec's library accepts; "none" ignores the level.
CODEC_LEVELS: dict[str, tuple[int, int]] = {"zstd": (1, 22), "lz4": (0, 16)}

# criu.extra_args a *user* policy may carry. The runner can run CRIU with
# root's capabilities, so options that run programs (--action-script,
# --exec-cmd, --lib), pick paths CRIU writes or reads (-D, -W, --config,
# --root, --log-file, --pidfile) or reach outside the job (--external,
# --inherit-fd) are for the site policy only.
CRIU_USER_OPTIONS = frozenset(
    {
        "--shell-job",
        "--tcp-close",
        "--skip-in-flight",
        "--ghost-limit",
        "--file-validation",
        "--timeout",
        "--evasive-devices",
        "--skip-file-rwx-check",
        "--display-stats",
        "--leave-stopped",
        "-v0",
        "-v1",
        "-v2",
        "-v3",
        "-v4",
    }
)


@dataclass(frozen=True)
class Field:
    path: str
    kind: Kind
    default: Any
    doc: str
    site_only: bool = False  # only the site policy may set it
    # Extra check for values from the user or command-line layers: raises
    # Invalid (with the offending item as ``got``) when the value is refused.
    user_check: Callable[[Any], None] | None = None


def _criu_user_args(args: list[str]) -> None:
    for arg in args:
        name = arg.split("=", 1)[0]
        if name not in CRIU_USER_OPTIONS:
            raise Invalid(
                "",
                arg,
                suffix=f"'{name}' is not allowed in a user policy (CRIU may run with root's privileges); "
                f"allowed: {', '.join(sorted(CRIU_USER_OPTIONS))}. Ask your site to set it in the site policy",
            )


_FIELDS: tuple[Field, ...] = (
    Field("interval", DurationKind(minimum=1, allow_auto=True), 3600,
          "time between periodic checkpoints, or 'auto' for Daly's optimum from site.mtbf"),
    Field("engine", EnumKind(choices=ENGINES), "criu",
          "'criu' checkpoints the whole process tree; 'app' asks the application to save itself"),
    Field("storage.root", PathKind(), None,
          "store root; images go to ROOT/USER/JOBID/ckpt-N.hck (null: $HPCCKPT_STORE or ~/.local/share)"),
    Field("storage.staging", PathKind(), None,
          "node-local directory to write images to first and flush to the root in the background"),
    Field("storage.layout", EnumKind(choices=("user/job",)), "user/job",
          "directory layout under the root; 'user/job' is ROOT/USER/JOBID/"),
    Field("storage.catalog", PathKind(url_schemes=("postgresql", "postgres")), None,
          "catalog: a postgresql:// URL or a SQLite file (null: ROOT/USER/catalog.sqlite)"),
    Field("storage.compression.codec", EnumKind(choices=CODECS), "zstd", "compression of image data"),
    Field("storage.compression.level", IntKind(minimum=0, maximum=22), 3,
          "compression level (zstd 1-22, lz4 0-16)"),
    Field("retention.keep_last", IntKind(minimum=1), 3, "always keep this many newest checkpoints of a job"),
    Field("retention.keep_every", IntKind(minimum=0), 0,
          "also keep every Nth checkpoint (0: off)"),
    Field("retention.max_age", DurationKind(minimum=1, nullable=True), None,
          "delete checkpoints older than this (beyond keep_last); null: no age limit"),
    Field("retention.max_bytes", SizeKind(minimum=1, nullable=True), None,
          "most bytes of checkpoints per user; oldest go first (beyond keep_last); null: no limit"),
    Field("retention.fallback_full", BoolKind(), True,
          "keep a full image outside the newest image's chain, so that no single damaged image loses the job"),
    Field("preemption.signals", SignalListKind(), ["TERM", "USR1"],
          "signals that mean 'you are about to be preempted or timed out: checkpoint now'"),
    Field("preemption.grace_margin", DurationKind(), 5,
          "seconds kept in hand before the grace time ends, to finish writing"),
    Field("preemption.grace_time", DurationKind(minimum=1), 30,
          "grace time assumed when Slurm does not tell us the partition's GraceTime"),
    Field("preemption.action", EnumKind(choices=("checkpoint_and_requeue", "checkpoint_and_stop")),
          "checkpoint_and_requeue", "what to do after the preemption checkpoint"),
    Field("failure.max_restarts", IntKind(minimum=0), 10, "give up after this many automatic restarts"),
    Field("failure.exclude_failed_node", BoolKind(), True,
          "resubmit with --exclude of the node the job failed on"),
    Field("failure.backoff", DurationKind(), 0, "wait this long before an automatic restart"),
    Field("slurm.requeue", BoolKind(), True, "requeue the job with scontrol (false: resubmit a new job)"),
    Field("slurm.resubmit_options", ArgListKind(expected_text="a list of sbatch options such as "
                                                "['--partition=long']"), [],
          "extra sbatch options when a job is resubmitted"),
    Field("slurm.drain_on_failed_check", BoolKind(), False,
          "drain a node whose prolog check (criu check) fails"),
    Field("job.network", EnumKind(choices=("private", "host")), "private",
          "'private': the job gets a network namespace of its own (its loopback TCP is checkpointed and "
          "restores never clash on ports); 'host': the node's own network"),
    Field("job.outside", BoolKind(), True,
          "give a private job a route to the outside (slirp4netns; false: loopback only)"),
    Field("job.external_connections", EnumKind(choices=("close", "skip")), "close",
          "a checkpoint finds a connection to a peer outside the job: 'close' checkpoints anyway and "
          "the restored job finds it closed; 'skip' skips that checkpoint"),
    Field("job.scratch_max", SizeKind(minimum=0), 1 << 30,
          "most bytes of the job's own temporary directories (its TMPDIR, OpenMPI's shared memory) carried "
          "in each checkpoint, so that it can be restored on another node (0: none)"),
    Field("criu.tcp_established", BoolKind(), False,
          "always pass --tcp-established (hpcckpt passes it by itself when the job holds connections)"),
    Field("criu.ext_unix_sk", BoolKind(), False, "allow unix sockets connected outside the job"),
    Field("criu.file_locks", BoolKind(), True, "checkpoint file locks (flock, fcntl)"),
    Field("criu.link_remap", BoolKind(), False, "allow open files that were unlinked"),
    Field("criu.extra_args", ArgListKind(expected_text="a list of CRIU options such as ['--shell-job']"), [],
          "more CRIU options, each as one '--opt=value' item", user_check=_criu_user_args),
    Field("restore.grown_files", EnumKind(choices=("truncate", "keep", "refuse")), "truncate",
          "a file the job writes grew since the checkpoint: truncate it back, keep it, or refuse"),
    Field("restore.stream", BoolKind(), True,
          "stream memory pages to CRIU as they are checked (false: unpack the whole image to staging first)"),
    Field("restore.lazy", EnumKind(choices=("auto", "on", "off"), bools=("on", "off")), "off",
          "run the job as soon as its non-page state is restored and bring its memory in on demand and in the "
          "background (CRIU lazy pages); 'auto': only at restore.lazy_threshold bytes of memory or more"),
    Field("restore.lazy_threshold", SizeKind(minimum=0), 2048 * MiB,
          "the job memory from which restore.lazy 'auto' restores lazily"),
    Field("pipeline.async_flush", BoolKind(), True, "let the job run on while the image is flushed"),
    Field("pipeline.on_busy", EnumKind(choices=("skip", "queue")), "skip",
          "a checkpoint falls due while the last is still flushing: skip it or queue it"),
    Field("pipeline.incremental", BoolKind(), True, "write only what changed since the parent image"),
    Field("pipeline.full_every", IntKind(minimum=1), 8, "a full image after this many incremental ones"),
    Field("pipeline.max_chain_ratio", FloatKind(minimum=1.0), 2.0,
          "a full image when a chain's bytes exceed this times a full image"),
    Field("pipeline.chunk_size", SizeKind(minimum=64 << 10, maximum=1 << 30), 4 * MiB,
          "size of the chunks image data is cut into (checksummed and compressed each)"),
    Field("mpi.coordination_timeout", DurationKind(minimum=1), 300,
          "how long ranks wait for each other to reach a checkpoint"),
    Field("metrics.textfile", PathKind(), None,
          "node_exporter textfile the runner rewrites after each checkpoint attempt; {job} and {user} are "
          "replaced (null: off)"),
    Field("logging.level", EnumKind(choices=("debug", "info", "warning", "error"), lower=True), "info",
          "log level"),
    Field("logging.format", EnumKind(choices=("auto", "json", "human")), "auto",
          "'auto': JSON lines off a terminal, readable text on one"),
    Field("site.mtbf", DurationKind(minimum=1, nullable=True), None,
          "mean time between failures a job sees (for interval: auto)", site_only=True),
    Field("site.interval_min", DurationKind(minimum=1), 60, "shortest interval 'auto' may pick",
          site_only=True),
    Field("site.interval_max", DurationKind(minimum=1), 86400, "longest interval 'auto' may pick",
          site_only=True),
)

FIELDS: dict[str, Field] = {f.path: f for f in _FIELDS}
SECTIONS: frozenset[str] = frozenset(
    ".".join(p.split(".")[:i]) for p in FIELDS for i in range(1, p.count(".") + 1)
)
# Keys only a site policy has, outside the policy proper.
SITE_META_KEYS = ("locks", "bounds")


def children(section: str) -> list[str]:
    """The key names directly under a section ("" for the top level)."""
    prefix = section + "." if section else ""
    names: list[str] = []
    for path in list(FIELDS) + sorted(SECTIONS):
        if path.startswith(prefix):
            name = path[len(prefix):].split(".")[0]
            if name not in names:
                names.append(name)
    return names


def defaults() -> dict[str, Any]:
    """Every key's built-in default, by dotted path (lists copied, so callers may keep them)."""
    return {p: (list(f.default) if isinstance(f.default, list) else f.default) for p, f in FIELDS.items()}
