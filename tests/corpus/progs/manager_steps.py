"""multiprocessing.Manager corpus program: a manager server process, a worker process and the main process,
talking over the manager's socket through proxies.

usage: python manager_steps.py OUTDIR STEPS DELAY_MS
Each step the main process puts a task on a managed queue; the worker computes it and stores the answer in a
managed dict; the main process waits for it, appends "step I VALUE" to OUTDIR/trace.txt and prints "step I".
"""

import multiprocessing as mp
import sys
import time

MASK = (1 << 64) - 1


def work(i: int, x: int) -> int:
    for _ in range(200):
        x = (x * 6364136223846793005 + i + 1442695040888963407) & MASK
    return x


def worker(tasks: "mp.queues.Queue[tuple[int, int] | None]", answers: "dict[int, int]") -> None:
    while True:
        task = tasks.get()
        if task is None:
            return
        i, x = task
        answers[i] = work(i, x)


def main() -> None:
    outdir, steps, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) / 1000
    with mp.Manager() as manager:
        tasks = manager.Queue()
        answers = manager.dict()
        history = manager.list()
        proc = mp.Process(target=worker, args=(tasks, answers))
        proc.start()
        x = 1
        with open(f"{outdir}/trace.txt", "w") as trace:
            for i in range(steps):
                tasks.put((i, x))
                while i not in answers:
                    time.sleep(0.001)
                x = answers.pop(i)
                history.append(x % 1000003)
                trace.write(f"step {i} {x}\n")
                trace.flush()
                print(f"step {i}", flush=True)
                if delay:
                    time.sleep(delay)
        tasks.put(None)
        proc.join()
        with open(f"{outdir}/result.txt", "w") as res:
            res.write(f"steps {steps} last {x} history {sum(history)} {len(history)}\n")


if __name__ == "__main__":
    main()
