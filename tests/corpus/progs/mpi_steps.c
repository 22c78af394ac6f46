/* MPI corpus program: deterministic integer work in steps, with a ring exchange and an allreduce per step.
 *
 * usage: mpi_steps OUTDIR STEPS DELAY_MS
 * Rank 0 appends "step I SUM" to OUTDIR/trace.txt and prints "step I" on stdout after every step; at the end
 * every rank's final state digest is gathered and rank 0 writes OUTDIR/result.txt. Integers only, so the
 * output is the same bytes on every run (no floating-point reduction order to depend on).
 * Run as a singleton (no mpirun: MPI_Init starts an orted and talks to it over loopback TCP) or under mpirun.
 */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define N 4096

static void pause_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s OUTDIR STEPS DELAY_MS\n", argv[0]);
        return 2;
    }
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    long steps = atol(argv[2]), delay = atol(argv[3]);
    static uint64_t s[N];
    for (int j = 0; j < N; j++) s[j] = (uint64_t)(j + 1) * 0x9E3779B97F4A7C15ULL + (uint64_t)rank;
    FILE *trace = NULL;
    if (rank == 0) {
        char path[4096];
        snprintf(path, sizeof path, "%s/trace.txt", argv[1]);
        trace = fopen(path, "w");
        if (!trace) { perror(path); MPI_Abort(MPI_COMM_WORLD, 1); }
    }
    int right = (rank + 1) % size, left = (rank + size - 1) % size;
    for (long i = 0; i < steps; i++) {
        uint64_t local = 0;
        for (int j = 0; j < N; j++) {
            s[j] = s[j] * 6364136223846793005ULL + ((uint64_t)j ^ (uint64_t)i) + 1442695040888963407ULL;
            local += s[j] >> 7;
        }
        uint64_t from_left = 0, total = 0;
        MPI_Sendrecv(&local, 1, MPI_UINT64_T, right, 0, &from_left, 1, MPI_UINT64_T, left, 0, MPI_COMM_WORLD,
                     MPI_STATUS_IGNORE);
        s[i % N] ^= from_left;
        MPI_Allreduce(&local, &total, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
        if (rank == 0) {
            fprintf(trace, "step %ld %llu\n", i, (unsigned long long)total);
            fflush(trace);
            printf("step %ld\n", i);
            fflush(stdout);
        }
        if (delay > 0) pause_ms(delay);
    }
    uint64_t digest = 1469598103934665603ULL;
    for (int j = 0; j < N; j++) digest = (digest ^ s[j]) * 1099511628211ULL;
    uint64_t *all = rank == 0 ? malloc(sizeof(uint64_t) * (size_t)size) : NULL;
    MPI_Gather(&digest, 1, MPI_UINT64_T, all, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        fclose(trace);
        char path[4096];
        snprintf(path, sizeof path, "%s/result.txt", argv[1]);
        FILE *res = fopen(path, "w");
        if (!res) { perror(path); MPI_Abort(MPI_COMM_WORLD, 1); }
        fprintf(res, "ranks %d steps %ld\n", size, steps);
        for (int r = 0; r < size; r++) fprintf(res, "rank %d %016llx\n", r, (unsigned long long)all[r]);
        fclose(res);
        free(all);
    }
    MPI_Finalize();
    return 0;
}
