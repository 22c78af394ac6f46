"""hpcckpt: checkpoint/restart for HPC batch jobs on Slurm.

The application-assisted API is importable from here::

    from hpcckpt import Checkpointer
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Checkpointer", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import hpcckpt` in the CLI and hooks stays cheap and never
    # pulls in numpy or MPI.
    if name == "Checkpointer":
        from hpcckpt.app.checkpointer import Checkpointer

        return Checkpointer
    raise AttributeError(name)
