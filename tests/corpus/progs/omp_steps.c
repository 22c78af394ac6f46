/* OpenMP corpus program: 2 threads do deterministic integer work in steps.
 *
 * usage: omp_steps OUTDIR STEPS DELAY_MS
 * Each thread sums its own static share into its own slot; the slots are added in a fixed order, so the
 * result does not depend on which thread finishes first. Appends "step I SUM" to OUTDIR/trace.txt and prints
 * "step I" after every step; writes OUTDIR/result.txt at the end.
 */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define N (1 << 16)
#define THREADS 2

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
    long steps = atol(argv[2]), delay = atol(argv[3]);
    static uint64_t s[N];
    for (int j = 0; j < N; j++) s[j] = (uint64_t)(j + 1) * 0x9E3779B97F4A7C15ULL;
    char path[4096];
    snprintf(path, sizeof path, "%s/trace.txt", argv[1]);
    FILE *trace = fopen(path, "w");
    if (!trace) { perror(path); return 1; }
    int threads_seen = 0;
    for (long i = 0; i < steps; i++) {
        uint64_t part[THREADS] = {0};
#pragma omp parallel num_threads(THREADS)
        {
            int t = omp_get_thread_num();
#pragma omp single
            threads_seen = omp_get_num_threads();
#pragma omp for schedule(static)
            for (int j = 0; j < N; j++) {
                s[j] = s[j] * 6364136223846793005ULL + ((uint64_t)j ^ (uint64_t)i) + 1442695040888963407ULL;
                part[t] += s[j] >> 9;
            }
        }
        uint64_t total = 0;
        for (int t = 0; t < THREADS; t++) total += part[t] * (uint64_t)(t + 1);
        fprintf(trace, "step %ld %llu\n", i, (unsigned long long)total);
        fflush(trace);
        printf("step %ld\n", i);
        fflush(stdout);
        if (delay > 0) pause_ms(delay);
    }
    fclose(trace);
    uint64_t digest = 1469598103934665603ULL;
    for (int j = 0; j < N; j++) digest = (digest ^ s[j]) * 1099511628211ULL;
    snprintf(path, sizeof path, "%s/result.txt", argv[1]);
    FILE *res = fopen(path, "w");
    if (!res) { perror(path); return 1; }
    fprintf(res, "threads %d steps %ld digest %016llx\n", threads_seen, steps, (unsigned long long)digest);
    fclose(res);
    return 0;
}
