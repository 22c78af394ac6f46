"""The effective policy: frozen dataclasses, one per section.

Field names are the keys of the policy file; :mod:`hpcckpt.policy.schema`
holds each key's kind, default and documentation, and a test checks that the
two agree. Values are already checked and normalised: durations are whole
seconds, sizes whole bytes, signal names without ``SIG``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from hpcckpt.errors import PolicyError
from hpcckpt.policy.diagnostics import did_you_mean


@dataclass(frozen=True)
class CompressionPolicy:
    codec: str
    level: int


@dataclass(frozen=True)
class StoragePolicy:
    root: str | None
    staging: str | None
    layout: str
    catalog: str | None
    compression: CompressionPolicy


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int
    keep_every: int
    max_age: int | None
    max_bytes: int | None
    fallback_full: bool


@dataclass(frozen=True)
class PreemptionPolicy:
    signals: list[str]
    grace_margin: int
    grace_time: int
    action: str


@dataclass(frozen=True)
class FailurePolicy:
    max_restarts: int
    exclude_failed_node: bool
    backoff: int


@dataclass(frozen=True)
class SlurmPolicy:
    requeue: bool
    resubmit_options: list[str]
    drain_on_failed_check: bool


@dataclass(frozen=True)
class JobPolicy:
    network: str
    outside: bool
    external_connections: str
    scratch_max: int


@dataclass(frozen=True)
class CriuPolicy:
    tcp_established: bool
    ext_unix_sk: bool
    file_locks: bool
    link_remap: bool
    extra_args: list[str]


@dataclass(frozen=True)
class RestorePolicy:
    grown_files: str
    stream: bool
    lazy: str
    lazy_threshold: int


@dataclass(frozen=True)
class PipelinePolicy:
    async_flush: bool
    on_busy: str
    incremental: bool
    full_every: int
    max_chain_ratio: float
    chunk_size: int


@dataclass(frozen=True)
class MpiPolicy:
    coordination_timeout: int


@dataclass(frozen=True)
class MetricsPolicy:
    textfile: str | None


@dataclass(frozen=True)
class LoggingPolicy:
    level: str
    format: str


@dataclass(frozen=True)
class SitePolicy:
    mtbf: int | None
    interval_min: int
    interval_max: int


@dataclass(frozen=True)
class Bound:
    """A site's limits on one numeric key; ``origin`` is where the site set them."""

    minimum: int | float | None
    maximum: int | float | None
    origin: str


SECTION_CLASSES: dict[str, type] = {
    "storage": StoragePolicy,
    "storage.compression": CompressionPolicy,
    "retention": RetentionPolicy,
    "preemption": PreemptionPolicy,
    "failure": FailurePolicy,
    "slurm": SlurmPolicy,
    "job": JobPolicy,
    "criu": CriuPolicy,
    "restore": RestorePolicy,
    "pipeline": PipelinePolicy,
    "mpi": MpiPolicy,
    "metrics": MetricsPolicy,
    "logging": LoggingPolicy,
    "site": SitePolicy,
}


@dataclass(frozen=True)
class Policy:
    interval: int | str  # seconds, or "auto" (see hpcckpt.policy.daly.choose_interval)
    engine: str
    storage: StoragePolicy
    retention: RetentionPolicy
    preemption: PreemptionPolicy
    failure: FailurePolicy
    slurm: SlurmPolicy
    job: JobPolicy
    criu: CriuPolicy
    restore: RestorePolicy
    pipeline: PipelinePolicy
    mpi: MpiPolicy
    metrics: MetricsPolicy
    logging: LoggingPolicy
    site: SitePolicy
    # Provenance, not policy: excluded from equality and from the digest.
    origins: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    locks: tuple[str, ...] = field(default=(), compare=False, repr=False)
    bounds: dict[str, Bound] = field(default_factory=dict, compare=False, repr=False)
    sources: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The effective values as nested plain data (JSON- and YAML-able)."""
        out = dataclasses.asdict(self)
        for name in ("origins", "locks", "bounds", "sources"):
            out.pop(name)
        return out

    def digest(self) -> str:
        """sha256 of the canonical JSON of the effective values: equal policies, equal digests."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canon.encode("ascii")).hexdigest()

    def get(self, path: str) -> Any:
        """The value at a dotted key path, such as ``"storage.compression.codec"``."""
        node: Any = self
        for part in path.split("."):
            if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
                raise PolicyError(f"no policy key '{path}'{did_you_mean(path, self.origins)}")
            node = getattr(node, part)
        return node

    def origin(self, path: str) -> str:
        """Where the value of a key came from: ``default``, ``site:FILE:LINE``, ``user:FILE:LINE``,
        ``cli:--flag``."""
        try:
            return self.origins[path]
        except KeyError:
            raise PolicyError(f"no policy key '{path}'{did_you_mean(path, self.origins)}") from None

    def is_locked(self, path: str) -> bool:
        return any(path == lock or path.startswith(lock + ".") for lock in self.locks)
