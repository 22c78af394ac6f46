"""h5py corpus program: appends one row per step to a resizable HDF5 dataset, flushing the file every step.

usage: python h5_append.py OUTDIR STEPS DELAY_MS
The file (OUTDIR/data.h5) is open for the whole run and changes in place as it grows (its superblock, the
dataset's shape and chunk index), as real codes' HDF5 output does. Prints "step I" after every step and writes
OUTDIR/result.txt (the dataset read back) at the end.
"""

import sys
import time

import h5py
import numpy as np

WIDTH = 64


def main() -> None:
    outdir, steps, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) / 1000
    row = np.arange(WIDTH, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    with h5py.File(f"{outdir}/data.h5", "w", libver="v110", track_order=False) as f:
        dset = f.create_dataset("steps", shape=(0, WIDTH), maxshape=(None, WIDTH), chunks=(16, WIDTH),
                                dtype=np.uint64, track_times=False)
        for i in range(steps):
            row = row * np.uint64(6364136223846793005) + np.uint64(i) + np.uint64(1442695040888963407)
            dset.resize(i + 1, axis=0)
            dset[i] = row
            dset.attrs["done"] = i + 1
            f.flush()
            print(f"step {i}", flush=True)
            if delay:
                time.sleep(delay)
    with h5py.File(f"{outdir}/data.h5", "r") as f, open(f"{outdir}/result.txt", "w") as res:
        data = f["steps"][...]
        res.write(f"rows {data.shape[0]} done {int(f['steps'].attrs['done'])}\n")
        for i in range(0, data.shape[0], max(1, data.shape[0] // 16)):
            res.write(f"{i} {int(data[i].sum(dtype=np.uint64))}\n")
        res.write(f"total {int(data.sum(dtype=np.uint64))}\n")


if __name__ == "__main__":
    main()
