"""How the ranks of one application agree: the MPI adapter.

The checkpoint protocol needs only five collectives, so it is written against
this small Protocol rather than against mpi4py. ``SingleCoordinator`` serves
programs without MPI (one process, rank 0 of 1); ``MPICoordinator`` wraps an
mpi4py communicator. Unit tests inject a thread-based fake (tests/mpi/fakes.py).

Objects passed through the collectives are small control messages (ids,
votes, paths); state data never travels through them, because every rank
writes its own shard.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, runtime_checkable

from hpcckpt.errors import MPIError

T = TypeVar("T")


@runtime_checkable
class Coordinator(Protocol):
    """The collectives the checkpoint protocol uses. Every rank must call each one."""

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    def bcast(self, obj: T, root: int = 0) -> T:
        """Return ``root``'s ``obj`` on every rank."""
        ...

    def gather(self, obj: T, root: int = 0) -> list[T] | None:
        """On ``root`` the list of every rank's ``obj`` (index = rank); None elsewhere."""
        ...

    def allreduce_bits(self, bits: int) -> int:
        """Bitwise OR of ``bits`` over all ranks, on every rank."""
        ...

    def all_true(self, flag: bool) -> bool:
        """True on every rank iff ``flag`` is true on every rank."""
        ...

    def barrier(self) -> None: ...


class SingleCoordinator:
    """The one-process case: every collective is the identity."""

    @property
    def rank(self) -> int:
        return 0

    @property
    def size(self) -> int:
        return 1

    def bcast(self, obj: T, root: int = 0) -> T:
        return obj

    def gather(self, obj: T, root: int = 0) -> list[T] | None:
        return [obj]

    def allreduce_bits(self, bits: int) -> int:
        return bits

    def all_true(self, flag: bool) -> bool:
        return flag

    def barrier(self) -> None:
        return None


class MPICoordinator:
    """Collectives over an mpi4py communicator.

    A private duplicate of the communicator is used, so that the checkpoint
    protocol's messages can never match a receive the application posted on
    its own communicator.
    """

    def __init__(self, comm: Any) -> None:
        try:
            from mpi4py import MPI
        except ImportError as err:  # pragma: no cover - mpi4py is installed wherever comm exists
            raise MPIError(
                "a communicator was given but mpi4py cannot be imported",
                hint="install hpcckpt with the 'mpi' extra (pip install 'hpcckpt[mpi]')",
            ) from err
        self._mpi = MPI
        self._comm = comm.Dup()
        self._rank = int(self._comm.Get_rank())
        self._size = int(self._comm.Get_size())

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    def bcast(self, obj: T, root: int = 0) -> T:
        result: T = self._comm.bcast(obj, root=root)
        return result

    def gather(self, obj: T, root: int = 0) -> list[T] | None:
        result: list[T] | None = self._comm.gather(obj, root=root)
        return result

    def allreduce_bits(self, bits: int) -> int:
        return int(self._comm.allreduce(int(bits), op=self._mpi.BOR))

    def all_true(self, flag: bool) -> bool:
        return bool(self._comm.allreduce(bool(flag), op=self._mpi.LAND))

    def barrier(self) -> None:
        self._comm.Barrier()

    def free(self) -> None:
        """Release the duplicated communicator (before MPI_Finalize)."""
        if self._comm is not None and self._comm != self._mpi.COMM_NULL:
            self._comm.Free()


def coordinator_for(comm: Any | None) -> Coordinator:
    """The Coordinator for ``comm``: an MPI one, or the single-process one for None."""
    if comm is None:
        return SingleCoordinator()
    if isinstance(comm, Coordinator):
        return comm
    return MPICoordinator(comm)
