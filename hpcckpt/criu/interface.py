"""The contract between the checkpoint pipeline and a checkpoint engine.

The pipeline (:mod:`hpcckpt.core.checkpoint`, :mod:`hpcckpt.core.resume`) needs four
things from an engine: freeze-and-dump a tree into a directory, restore a
tree from a directory, and record / check the CPU features the dump depends
on. CRIU is the production engine; unit tests inject a fake that writes a few
files, so that failure handling can be exercised without root.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from hpcckpt.criu.streamer import Source as StreamSource


@dataclass(frozen=True)
class DumpOptions:
    """What the policy's ``criu`` section asks for, in engine-neutral words."""

    tcp_established: bool = False
    ext_unix_sk: bool = False
    file_locks: bool = False
    link_remap: bool = False
    extra_args: Sequence[str] = ()
    # "private": the job has a network namespace of its own (policy job.network); criu then dumps
    # from inside it and restores into a fresh one. "host": the node's own, as before.
    network: str = "host"
    # Restore only: called with the pid that holds the fresh network namespace, before CRIU restores
    # any socket into it (the runner attaches the job's link to the outside there).
    on_netns: Callable[[int], None] | None = field(default=None, compare=False)

    @classmethod
    def from_policy(cls, pol: object) -> DumpOptions:
        c = getattr(pol, "criu", None)
        if c is None:
            return cls()
        job = getattr(pol, "job", None)
        return cls(
            network=str(getattr(job, "network", "host")),
            tcp_established=bool(c.tcp_established),
            ext_unix_sk=bool(c.ext_unix_sk),
            file_locks=bool(c.file_locks),
            link_remap=bool(c.link_remap),
            extra_args=tuple(c.extra_args or ()),
        )

    def recorded(self) -> dict[str, object]:
        """What a restore must know of how the dump was taken (kept in the image's metadata)."""
        return {"network": self.network, "tcp_established": self.tcp_established}

    def for_image(self, extra: Mapping[str, object]) -> DumpOptions:
        """The options to restore an image with: how its job was dumped, whatever today's policy says."""
        net = extra.get("network")
        return replace(self, network=net if net in ("private", "host") else "host",
                       tcp_established=self.tcp_established or extra.get("tcp_established") is True)


@dataclass
class DumpResult:
    frozen_s: float  # wall time the tree was stopped (the whole dump run)
    log_path: Path
    images_dir: Path


@dataclass
class RestoreResult:
    pid: int  # host pid of the restored root task
    seconds: float
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)


# What becomes of the tree once its dump is written.
AFTER_DUMP = ("running", "stopped", "kill")


class CheckpointEngine(Protocol):
    name: str

    def version(self) -> str: ...

    def dump(
        self,
        pid: int,
        images_dir: Path,
        *,
        options: DumpOptions,
        after: str = "running",
        timeout: float | None = None,
    ) -> DumpResult: ...

    def restore(
        self,
        images_dir: Path,
        *,
        options: DumpOptions,
        inherit_fds: Mapping[int, str] | None = None,
        timeout: float | None = None,
        source: StreamSource | None = None,
        gate: Callable[[], None] | None = None,
        lazy_pages: bool = False,
    ) -> RestoreResult: ...

    def cpuinfo_dump(self, images_dir: Path) -> None: ...

    def cpuinfo_check(self, images_dir: Path) -> tuple[bool, str]: ...
