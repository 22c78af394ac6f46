"""The corpus: real kinds of program, built from Debian's packages at test time, each with a deterministic output.

Every program takes ``OUTDIR STEPS DELAY_MS``, does ``STEPS`` steps of deterministic integer work (sleeping
``DELAY_MS`` after each, which changes nothing but the run time), appends one line per step to
``OUTDIR/trace.txt``, prints ``step I`` on stdout after each step (so a test can see where a restored run went
on), and writes its final output at the end. The files named in :attr:`Case.outputs` must be the same bytes
after a run that was killed and resumed as after an uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PROGS = Path(__file__).resolve().parent / "progs"
MPICC = shutil.which("mpicc")
MPIRUN = shutil.which("mpirun")
GCC = shutil.which("gcc")


@dataclass(frozen=True)
class Built:
    """The corpus's compiled programs and the interpreter of its Python ones."""

    mpi_steps: Path
    omp_steps: Path
    python: str = sys.executable


@dataclass(frozen=True)
class Case:
    name: str
    steps: int
    delay_ms: int  # per step, in the interrupted runs: long enough for 2 checkpoints before the end
    outputs: tuple[str, ...] = ("trace.txt", "result.txt")
    mpi: bool = False  # needs OpenMPI (and mpi4py for the Python ranks)
    tcp: bool = False  # the job talks over loopback TCP inside itself

    def argv(self, built: Built, outdir: Path, *, delay_ms: int | None = None) -> list[str]:
        delay = str(self.delay_ms if delay_ms is None else delay_ms)
        tail = [str(outdir), str(self.steps), delay]
        py = [built.python]
        if self.name == "mpi-singleton":
            return [str(built.mpi_steps), *tail]
        if self.name == "mpirun-c":
            return [*mpirun(4), str(built.mpi_steps), *tail]
        if self.name == "mpirun-mpi4py":
            return [*mpirun(4), *py, str(PROGS / "mpi4py_steps.py"), *tail]
        if self.name == "openmp":
            return [str(built.omp_steps), *tail]
        if self.name == "mp-manager":
            return [*py, str(PROGS / "manager_steps.py"), *tail]
        if self.name == "tcp-pair":
            return [*py, str(PROGS / "tcp_pair.py"), *tail]
        if self.name == "h5py-append":
            return [*py, str(PROGS / "h5_append.py"), *tail]
        if self.name == "tee-pipeline":
            return ["/bin/sh", str(PROGS / "tee_pipeline.sh"), *tail]
        raise ValueError(f"no such corpus case: {self.name}")


CASES: tuple[Case, ...] = (
    Case("mpi-singleton", steps=300, delay_ms=40, mpi=True, tcp=True),
    Case("mpirun-c", steps=300, delay_ms=50, mpi=True, tcp=True),
    Case("mpirun-mpi4py", steps=300, delay_ms=50, mpi=True, tcp=True),
    Case("openmp", steps=300, delay_ms=40),
    Case("mp-manager", steps=300, delay_ms=40),
    Case("tcp-pair", steps=300, delay_ms=40, tcp=True),
    Case("h5py-append", steps=300, delay_ms=40, outputs=("data.h5", "result.txt")),
    Case("tee-pipeline", steps=300, delay_ms=40),
)
BY_NAME = {c.name: c for c in CASES}


def mpirun(n: int) -> list[str]:
    assert MPIRUN is not None
    return [MPIRUN, "-n", str(n), "--allow-run-as-root", "--oversubscribe"]


def missing_tools(case: Case) -> str | None:
    """Why ``case`` cannot run here, or None."""
    if case.mpi and not (MPICC and MPIRUN):
        return "OpenMPI's mpicc/mpirun are not installed (apt-get install openmpi-bin libopenmpi-dev)"
    if case.name == "openmp" and not GCC:
        return "gcc is not installed"
    modules = {"mpirun-mpi4py": "mpi4py", "h5py-append": "h5py"}
    if case.name in modules:
        try:
            __import__(modules[case.name])
        except ImportError:
            return f"{modules[case.name]} is not installed (pip install -e '.[test,mpi]')"
    return None


def build(dest: Path) -> Built:
    """Compile the C programs into ``dest`` (the test session's temp dir)."""
    dest.mkdir(parents=True, exist_ok=True)
    mpi_steps, omp_steps = dest / "mpi_steps", dest / "omp_steps"
    if MPICC:
        subprocess.run([MPICC, "-O2", "-o", str(mpi_steps), str(PROGS / "mpi_steps.c")], check=True, timeout=120)
    if GCC:
        subprocess.run([GCC, "-O2", "-fopenmp", "-o", str(omp_steps), str(PROGS / "omp_steps.c")], check=True,
                       timeout=120)
    return Built(mpi_steps, omp_steps)


def job_env(scratch: Path, *, under_hpcckpt: bool = True) -> dict[str, str]:
    """What a corpus job needs in its environment, with the scratch files of OpenMPI and Python below ``scratch``.

    ``scratch`` is short (unix socket paths end at 108 bytes). Under hpcckpt the job gets its own directories
    below it (TMPDIR=scratch/hpcckpt-UID/JOB) and in /dev/shm for OpenMPI's shared memory
    (hpcckpt.core.launch.scratch), as any user's job does; the uninterrupted reference run keeps both in ``scratch``.
    """
    env = {
        "TMPDIR": str(scratch),
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
        "OMP_NUM_THREADS": "2",
    }
    if not under_hpcckpt:
        env["OMPI_MCA_btl_vader_backing_directory"] = str(scratch)
    return env


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A short, private scratch directory under /tmp, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="hc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_uninterrupted(case: Case, built: Built, outdir: Path) -> None:
    """The reference: ``case`` run to its end, without hpcckpt and without the per-step delay."""
    outdir.mkdir(parents=True, exist_ok=True)
    with scratch_dir() as scratch:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HPCCKPT_", "OMPI_"))}
        env.update(job_env(scratch, under_hpcckpt=False))
        proc = subprocess.run(case.argv(built, outdir, delay_ms=0), env=env, capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise AssertionError(f"the uninterrupted {case.name} run failed ({proc.returncode}): {proc.stderr[-2000:]}")


def steps_printed(text: str) -> list[int]:
    """The step numbers a run printed (``step I`` lines), in order."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "step" and parts[1].isdigit():
            out.append(int(parts[1]))
    return out


def differing_outputs(case: Case, got: Path, ref: Path) -> list[str]:
    """The output files of ``case`` in ``got`` that are not byte for byte those in ``ref``, with why."""
    bad = []
    for name in case.outputs:
        a, b = got / name, ref / name
        if not a.exists():
            bad.append(f"{name}: missing")
        elif a.read_bytes() != b.read_bytes():
            bad.append(f"{name}: {a.stat().st_size} bytes differ from the uninterrupted run's {b.stat().st_size}")
    return bad
