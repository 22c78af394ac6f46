"""Image pack/unpack throughput against a plain copy of the same bytes, same filesystem, same run.

    .venv/bin/python benchmarks/bench_image.py [--mib 256] [--dir /scratch/tmp] [--src CRIU_DUMP_DIR]

Every write is fsynced (copy, pack and unpack alike), so the ratios compare
what a checkpoint really costs. Also prints the record checksum's speed on
one core against the measured write bandwidth: the format needs it to be at
least 3 times faster, so that checksumming never limits a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcckpt.image import ImageMeta, pack_dir, unpack_image

PAGE = 4096


def make_source(root: Path, mib: int) -> None:
    """A CRIU-dump-like tree: one big pages file (half random, half low-entropy pages) and small images."""
    root.mkdir(parents=True)
    rnd = os.urandom(1 << 20)
    text = (b"step=000123 energy=-1.234567e+02 residual=3.2e-09\n" * 21000)[: 1 << 20]
    with open(root / "pages-1.img", "wb") as f:
        for i in range(mib):
            f.write(rnd if i % 2 else text)
    for i in range(40):
        (root / f"core-{i}.img").write_bytes(os.urandom(PAGE) + bytes(PAGE))


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def timed(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="size of the generated pages file (default 256)")
    ap.add_argument("--dir", default=None, help="filesystem to test (default: the system temp dir)")
    ap.add_argument("--src", default=None, help="a real directory (e.g. a CRIU dump) instead of generated data")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is kept")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hpcckpt-bench-", dir=args.dir))
    try:
        src = Path(args.src) if args.src else work / "src"
        if not args.src:
            make_source(src, args.mib)
        nbytes = tree_bytes(src)
        mib = nbytes / (1 << 20)
        meta = ImageMeta(ckptid=1, job_id="bench", engine="files")
        n = [0]

        def fresh(name: str) -> Path:
            n[0] += 1
            return work / f"{name}-{n[0]}"

        def copy() -> None:
            dst = fresh("copy")
            shutil.copytree(src, dst)
            fsync_tree(dst)
            shutil.rmtree(dst)

        def pack(codec: str) -> Callable[[], None]:
            def run() -> None:
                out = fresh(f"img-{codec}")
                with open(out, "wb", buffering=1 << 20) as f:
                    pack_dir(src, f, meta, codec=codec)
                    f.flush()
                    os.fsync(f.fileno())
                out.unlink()

            return run

        images: dict[str, Path] = {}
        for codec in ("none", "zstd", "lz4"):
            images[codec] = work / f"keep-{codec}.hck"
            with open(images[codec], "wb") as f:
                pack_dir(src, f, meta, codec=codec)

        def unpack(codec: str) -> Callable[[], None]:
            def run() -> None:
                dst = fresh(f"out-{codec}")
                unpack_image(images[codec], dst)
                fsync_tree(dst)
                shutil.rmtree(dst)

            return run

        base = timed(copy, args.repeat)
        print(f"data: {mib:.0f} MiB in {sum(1 for _ in src.rglob('*'))} files at {work}")
        print("vs copy = copy time / operation time: above 1 is faster than a plain copy")
        print(f"{'operation':<22}{'seconds':>9}{'MiB/s':>9}{'vs copy':>9}{'image MiB':>11}")
        print(f"{'plain copy + fsync':<22}{base:>9.3f}{mib / base:>9.0f}{1.0:>9.2f}{'':>11}")
        for codec in ("none", "zstd", "lz4"):
            size = images[codec].stat().st_size / (1 << 20)
            for label, fn in ((f"pack {codec}", pack(codec)), (f"unpack {codec}", unpack(codec))):
                t = timed(fn, args.repeat)
                print(f"{label:<22}{t:>9.3f}{mib / t:>9.0f}{base / t:>9.2f}{size:>11.1f}")

        disk = mib / base
        buf = os.urandom(64 << 20)
        print(f"\nchecksums on one core (64 MiB buffer) against the copy bandwidth {disk:.0f} MiB/s:")
        hashes: tuple[tuple[str, Callable[[bytes], object]], ...] = (
            ("xxh3_64 (records)", xxhash.xxh3_64_intdigest),
            ("xxh3_128 (chunks)", xxhash.xxh3_128_digest),
            ("zlib.crc32", zlib.crc32),
        )
        for name, hfn in hashes:
            t = timed(lambda hfn=hfn: hfn(buf), 3)  # type: ignore[misc]
            rate = 64 / t
            print(f"  {name:<20}{rate:>9.0f} MiB/s  {rate / disk:>6.1f}x the disk")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
