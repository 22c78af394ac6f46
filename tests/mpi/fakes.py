"""A Coordinator for unit tests: N ranks as N threads of one process.

Each collective deposits every rank's value on a shared board between two
barrier waits, so the protocol code runs exactly as over MPI, minus MPI.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ThreadGroup:
    def __init__(self, size: int) -> None:
        self.size = size
        self.board: list[Any] = [None] * size
        self.barrier = threading.Barrier(size, timeout=60)

    def exchange(self, rank: int, value: Any) -> list[Any]:
        self.barrier.wait()
        self.board[rank] = value
        self.barrier.wait()
        values = list(self.board)
        self.barrier.wait()
        return values

    def run(self, fn: Callable[[ThreadCoordinator], Any]) -> list[Any]:
        """Run ``fn`` on every rank; return the results (an exception is returned, not raised)."""
        results: list[Any] = [None] * self.size

        def body(rank: int) -> None:
            try:
                results[rank] = fn(ThreadCoordinator(self, rank))
            except BaseException as err:  # collected for the test to assert on
                results[rank] = err

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return results


class ThreadCoordinator:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self._group = group
        self._rank = rank

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._group.size

    def bcast(self, obj: T, root: int = 0) -> T:
        value: T = self._group.exchange(self._rank, obj)[root]
        return value

    def gather(self, obj: T, root: int = 0) -> list[T] | None:
        values = self._group.exchange(self._rank, obj)
        return values if self._rank == root else None

    def allreduce_bits(self, bits: int) -> int:
        out = 0
        for v in self._group.exchange(self._rank, bits):
            out |= v
        return out

    def all_true(self, flag: bool) -> bool:
        return all(self._group.exchange(self._rank, flag))

    def barrier(self) -> None:
        self._group.exchange(self._rank, None)
