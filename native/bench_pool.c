/* bench_pool.c — what one allocate/free pair of a pinned buffer costs.
 *
 * For buffer sizes 4 KiB, 64 KiB, 1 MiB and 16 MiB this times, with CLOCK_MONOTONIC, N
 * allocate → touch first byte → free pairs of four allocators:
 *   ma_pool         ma_pool lease+release, MA_LOCK_AUTO, retain_bytes 0 (defaults otherwise:
 *                   populate, 256 KiB large threshold): an empty arena goes back to the OS,
 *                   so each pair maps, locks and unmaps;
 *   ma_pool_retain  the same with retain_bytes 64 MiB: below the large threshold the shared
 *                   arena stays mapped and pairs reuse it (steady state, no system call); at
 *                   or above it every lease still maps an exact-size arena of its own;
 *   memalign_mlock  posix_memalign(4096) + mlock + munlock + free: what DeepSpeed's
 *                   new_cpu_locked_tensor does for each swap buffer;
 *   memalign        posix_memalign(4096) + free, no locking (glibc's heap or its mmap path).
 * N comes from argv[1]; without it each case is calibrated to run about 0.2 s. The result is
 * one JSON object on stdout: ns per pair and, per case, how many pairs ran unlocked (a
 * refused mlock under RLIMIT_MEMLOCK) and how many arenas the pool mapped while timed.
 */
#define _GNU_SOURCE
#include "ma_pool.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>

#define TARGET_NS 200000000.0 /* about 0.2 s per case when N is not given */
#define CALIB_NS 20000000.0   /* calibrate until 20 ms have passed */
#define MAX_ITERS 100000000L
#define RETAIN_BYTES ((size_t)64 << 20)

enum bench_kind { K_POOL, K_POOL_RETAIN, K_MLOCK, K_PLAIN, K_COUNT };

static const char *const KIND_NAMES[K_COUNT] = {"ma_pool", "ma_pool_retain", "memalign_mlock",
                                                "memalign"};
static const size_t SIZES[] = {(size_t)4 << 10, (size_t)64 << 10, (size_t)1 << 20,
                               (size_t)16 << 20};

typedef struct bench_result {
    double ns_per_pair;
    long iterations;
    long unlocked;       /* pairs whose buffer was not mlock'ed */
    long arenas_mapped;  /* pool cases: arenas mapped during the timed loop */
} bench_result_t;

static int now_ns(double *out)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) return -errno;
    *out = (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
    return 0;
}

static void touch(void *p)
{
    *(volatile char *)p = 1;
}

/* iters lease/touch/release pairs on pool; counts unlocked leases. 0 or -errno. */
static int pool_pairs(ma_pool_t *pool, size_t size, long iters, long *unlocked)
{
    for (long i = 0; i < iters; i++) {
        ma_lease_t l;
        int rc = ma_pool_lease(pool, size, &l);
        if (rc != 0) {
            fprintf(stderr, "bench_pool: ma_pool_lease(%zu) failed: %s (reason %d)\n", size,
                    strerror(-rc), l.fail_reason);
            return rc;
        }
        touch(l.addr);
        if (!l.locked) *unlocked += 1;
        rc = ma_pool_release(pool, l.addr);
        if (rc != 0) {
            fprintf(stderr, "bench_pool: ma_pool_release failed: %s\n", strerror(-rc));
            return rc;
        }
    }
    return 0;
}

/* iters posix_memalign/touch/(mlock/munlock)/free pairs. 0 or -errno. */
static int memalign_pairs(size_t size, long iters, int lock, long *unlocked)
{
    for (long i = 0; i < iters; i++) {
        void *p = NULL;
        int rc = posix_memalign(&p, 4096, size);
        if (rc != 0) {
            fprintf(stderr, "bench_pool: posix_memalign(%zu) failed: %s\n", size, strerror(rc));
            return -rc;
        }
        int locked = 0;
        if (lock) {
            if (mlock(p, size) == 0) locked = 1;
            else *unlocked += 1;
        }
        touch(p);
        if (locked && munlock(p, size) != 0) {
            int err = errno;
            fprintf(stderr, "bench_pool: munlock failed: %s\n", strerror(err));
            free(p);
            return -err;
        }
        free(p);
    }
    return 0;
}

/* One timed run of iters pairs of kind on a fresh pool (pool kinds). 0 or -errno. */
static int run_once(int kind, size_t size, long iters, bench_result_t *res)
{
    ma_pool_t *pool = NULL;
    ma_pool_stats_t before, after;
    int rc;
    memset(res, 0, sizeof *res);
    res->iterations = iters;
    if (kind == K_POOL || kind == K_POOL_RETAIN) {
        ma_pool_config_t cfg;
        ma_pool_config_default(&cfg);
        cfg.lock_mode = MA_LOCK_AUTO;
        cfg.retain_bytes = kind == K_POOL_RETAIN ? RETAIN_BYTES : 0;
        if ((rc = ma_pool_create(&cfg, &pool)) != 0) {
            fprintf(stderr, "bench_pool: ma_pool_create failed: %s\n", strerror(-rc));
            return rc;
        }
        long warm_unlocked = 0; /* one untimed pair: the retained arena gets mapped here */
        if ((rc = pool_pairs(pool, size, 1, &warm_unlocked)) != 0 ||
            (rc = ma_pool_stats(pool, &before)) != 0)
            goto out;
    }
    double t0 = 0.0, t1 = 0.0;
    if ((rc = now_ns(&t0)) != 0) goto out;
    if (pool) rc = pool_pairs(pool, size, iters, &res->unlocked);
    else rc = memalign_pairs(size, iters, kind == K_MLOCK, &res->unlocked);
    if (rc != 0) goto out;
    if ((rc = now_ns(&t1)) != 0) goto out;
    res->ns_per_pair = (t1 - t0) / (double)iters;
    if (kind == K_PLAIN) res->unlocked = iters;
    if (pool) {
        if ((rc = ma_pool_stats(pool, &after)) != 0) goto out;
        res->arenas_mapped = (long)(after.arenas_mapped_total - before.arenas_mapped_total);
    }
out:
    if (pool) {
        int drc = ma_pool_destroy(pool);
        if (drc != 0) {
            fprintf(stderr, "bench_pool: ma_pool_destroy failed: %s\n", strerror(-drc));
            if (rc == 0) rc = drc;
        }
    }
    return rc;
}

/* Time kind at size: iters pairs if iters > 0, else calibrated to about TARGET_NS. */
static int bench(int kind, size_t size, long iters, bench_result_t *res)
{
    int rc;
    if (iters <= 0) {
        long n = 1;
        for (;;) {
            if ((rc = run_once(kind, size, n, res)) != 0) return rc;
            if (res->ns_per_pair * (double)n >= CALIB_NS || n >= MAX_ITERS) break;
            n *= 4;
        }
        double want = TARGET_NS / (res->ns_per_pair > 1.0 ? res->ns_per_pair : 1.0);
        iters = want < 1.0 ? 1 : (want > (double)MAX_ITERS ? MAX_ITERS : (long)want);
    }
    return run_once(kind, size, iters, res);
}

static int parse_iters(int argc, char **argv, long *out)
{
    *out = 0;
    if (argc == 1) return 0;
    if (argc > 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) return -1;
    char *end = NULL;
    errno = 0;
    long n = strtol(argv[1], &end, 10);
    if (errno != 0 || end == argv[1] || *end != '\0' || n <= 0 || n > MAX_ITERS) return -1;
    *out = n;
    return 0;
}

int main(int argc, char **argv)
{
    long iters;
    if (parse_iters(argc, argv, &iters) != 0) {
        fprintf(stderr, "usage: %s [N]\n  N: allocate/free pairs per case, 1..%ld "
                        "(default: calibrated to about 0.2 s per case)\n", argv[0], MAX_ITERS);
        return 2;
    }
    ma_pool_config_t defaults;
    ma_pool_config_default(&defaults);
    struct rlimit rl;
    int have_rl = getrlimit(RLIMIT_MEMLOCK, &rl) == 0;

    size_t nsizes = sizeof SIZES / sizeof SIZES[0];
    bench_result_t res[sizeof SIZES / sizeof SIZES[0]][K_COUNT];
    for (size_t s = 0; s < nsizes; s++) {
        for (int k = 0; k < K_COUNT; k++) {
            int rc = bench(k, SIZES[s], iters, &res[s][k]);
            if (rc != 0) {
                fprintf(stderr, "bench_pool: case %s at %zu bytes failed: %s\n", KIND_NAMES[k],
                        SIZES[s], strerror(-rc));
                return 1;
            }
        }
    }

    printf("{\"benchmark\": \"alloc_free_pair\", \"clock\": \"CLOCK_MONOTONIC\", \"unit\": \"ns\",\n");
    if (iters > 0) printf(" \"iterations_arg\": %ld,", iters);
    else printf(" \"iterations_arg\": null,");
    printf(" \"target_seconds_per_case\": %.1f,\n", TARGET_NS / 1e9);
    if (have_rl && rl.rlim_cur != RLIM_INFINITY)
        printf(" \"memlock_limit_bytes\": %llu,\n", (unsigned long long)rl.rlim_cur);
    else printf(" \"memlock_limit_bytes\": null,\n");
    printf(" \"pool\": {\"alignment\": %zu, \"large_threshold\": %zu, \"arena_bytes\": %zu, "
           "\"populate\": %d, \"lock\": \"auto\", \"retain_bytes\": {\"ma_pool\": 0, "
           "\"ma_pool_retain\": %zu}},\n",
           defaults.alignment, defaults.large_threshold, defaults.arena_bytes, defaults.populate,
           RETAIN_BYTES);
    printf(" \"results\": [\n");
    for (size_t s = 0; s < nsizes; s++) {
        printf("  {\"bytes\": %zu", SIZES[s]);
        for (int k = 0; k < K_COUNT; k++) {
            const bench_result_t *r = &res[s][k];
            printf(",\n   \"%s\": {\"ns_per_pair\": %.1f, \"iterations\": %ld, "
                   "\"unlocked_pairs\": %ld", KIND_NAMES[k], r->ns_per_pair, r->iterations,
                   r->unlocked);
            if (k == K_POOL || k == K_POOL_RETAIN)
                printf(", \"arenas_mapped\": %ld", r->arenas_mapped);
            if (k == K_POOL_RETAIN && SIZES[s] >= defaults.large_threshold)
                printf(", \"note\": \"size >= large_threshold: each lease maps its own "
                       "arena, retain_bytes does not apply\"");
            printf("}");
        }
        printf("}%s\n", s + 1 < nsizes ? "," : "");
    }
    printf(" ]}\n");
    if (fflush(stdout) != 0) {
        perror("bench_pool: stdout");
        return 1;
    }
    return 0;
}
