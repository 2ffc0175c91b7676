/* ma_pool.h — zero-overhead pinned-buffer pool.
 *
 * A pool hands out *leases*: ranges of page-backed host memory whose size is exactly the
 * requested size rounded up to the pool's alignment (4096 by default, what O_DIRECT needs).
 * Memory comes from arenas obtained with mmap. A request at or above `large_threshold` gets an
 * arena of its own, sized exactly; smaller requests share arenas through a best-fit free list
 * whose free neighbours are coalesced on release. Shared arenas grow geometrically, from
 * `large_threshold` bytes up to `arena_bytes`, so a few small leases never map a large arena. An arena left with no
 * lease is unmapped at once, unless it is a shared arena and the pool's retain budget
 * (`retain_bytes`) still has room for it.
 *
 * Arenas are mlock'ed according to the lock mode: MA_LOCK_REQUIRED fails a lease when mlock is
 * refused, MA_LOCK_AUTO goes on with unlocked memory and counts the failure, MA_LOCK_OFF never
 * locks. Optional hooks run after an arena is mapped and before it is unmapped; the Python
 * layer uses them to register arenas with the CUDA runtime.
 *
 * Arenas of at least one transparent huge page (2 MiB on x86-64) are placed at a huge-page
 * aligned address and madvised MADV_HUGEPAGE before they are populated and locked, when the
 * huge-page mode allows it and the kernel's THP mode is "always" or "madvise". Physically
 * contiguous 2 MiB pieces let a device take a 1-8 MiB request as a few segments instead of a
 * scatter list of 4 KiB pages. Sizes do not change: an arena still maps exactly its size (the
 * alignment is got by over-mapping and unmapping the excess), and a lease is still its
 * requested size rounded to the pool alignment.
 *
 * Conventions (liburing style): every function returns 0 or -errno and never sets errno for
 * the caller to read. The pool is thread-safe (one mutex). Nothing here knows Python or torch.
 */
#ifndef MA_POOL_H
#define MA_POOL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ma_pool ma_pool_t;

enum ma_lock_mode {
    MA_LOCK_OFF = 0,      /* never mlock */
    MA_LOCK_AUTO = 1,     /* try mlock; on refusal go on unlocked, count the failure */
    MA_LOCK_REQUIRED = 2, /* mlock or fail the lease */
};

enum ma_huge_mode {
    MA_HUGE_OFF = 0,  /* 4 KiB pages only; arenas aligned to the pool alignment */
    MA_HUGE_AUTO = 1, /* huge-page aligned and MADV_HUGEPAGE arenas when THP is "always" or
                       * "madvise"; nothing is done (and no error) when THP is "never" */
};

/* Why the last failed lease failed (ma_lease_t.fail_reason). */
enum ma_fail_reason {
    MA_FAIL_NONE = 0,
    MA_FAIL_BAD_SIZE = 1,  /* zero size, or overflow when rounding */
    MA_FAIL_TOO_LARGE = 2, /* larger than the machine's physical memory */
    MA_FAIL_LIMIT = 3,     /* would push reserved bytes past limit_bytes */
    MA_FAIL_MMAP = 4,      /* mmap refused */
    MA_FAIL_MLOCK = 5,     /* mlock refused in MA_LOCK_REQUIRED mode */
    MA_FAIL_HOOK = 6,      /* the map hook returned an error */
};

typedef struct ma_pool_config {
    size_t alignment;       /* power of two in [64, 1 GiB]; lease sizes are multiples of it */
    int lock_mode;          /* enum ma_lock_mode */
    size_t arena_bytes;     /* largest size of one shared arena (rounded up to the page size) */
    size_t large_threshold; /* requests >= this get an exact-size arena of their own */
    size_t retain_bytes;    /* empty shared arenas kept mapped, in bytes (0: return at once);
                             * default 1 MiB, so a lease/release loop of small buffers does
                             * not map, lock and unmap an arena each time */
    size_t limit_bytes;     /* cap on reserved bytes (0: no cap) */
    int populate;           /* prefault arenas when mapped (mlock prefaults anyway) */
    int huge_pages;         /* enum ma_huge_mode: transparent huge pages for arenas of at
                             * least one huge page (default MA_HUGE_AUTO) */
} ma_pool_config_t;

typedef struct ma_lease {
    void *addr;         /* aligned to the pool alignment */
    size_t size;        /* requested rounded up to the alignment */
    size_t requested;   /* what the caller asked for */
    int locked;         /* 1 if the memory is mlock'ed */
    int fail_reason;    /* enum ma_fail_reason, set when ma_pool_lease fails */
    int fail_errno;     /* errno of the refused system call, when there was one */
} ma_lease_t;

/* Current and peak values are bytes (leases/arenas: counts); *_total are monotonic counts. */
typedef struct ma_pool_stats {
    uint64_t requested, requested_peak; /* sum of live leases' requested sizes */
    uint64_t in_use, in_use_peak;       /* sum of live leases' rounded sizes */
    uint64_t reserved, reserved_peak;   /* bytes mapped in arenas (live and retained) */
    uint64_t locked, locked_peak;       /* bytes of arenas that are mlock'ed */
    uint64_t leases, leases_peak;       /* live leases */
    uint64_t arenas, arenas_peak;       /* mapped arenas */
    uint64_t retained;                  /* bytes of empty shared arenas kept mapped */
    uint64_t lock_failures;             /* arenas left unlocked because mlock was refused */
    uint64_t leases_total;              /* leases ever granted */
    uint64_t arenas_mapped_total;       /* mmap calls that succeeded */
    uint64_t arenas_unmapped_total;     /* munmap calls */
    uint64_t huge_advised, huge_advised_peak; /* bytes of arenas madvised MADV_HUGEPAGE (the
                                               * kernel decides how much it backs with huge
                                               * pages: AnonHugePages in smaps) */
    uint64_t huge_advise_failures;      /* arenas whose MADV_HUGEPAGE was refused (they go on
                                         * with small pages; not an error) */
} ma_pool_stats_t;

/* One mapped arena, as reported by ma_pool_arenas (for I/O buffer registration). */
typedef struct ma_arena_info {
    void *base;
    size_t size;
    int locked;
    int shared;
} ma_arena_info_t;

/* Called with the pool mutex held; must not call back into the pool. */
typedef int (*ma_map_hook_fn)(void *ctx, void *base, size_t size, int locked);
typedef void (*ma_unmap_hook_fn)(void *ctx, void *base, size_t size);

/* Fill *cfg with the defaults: alignment 4096, MA_LOCK_AUTO, shared arenas up to 4 MiB,
 * 256 KiB large threshold, 1 MiB retain, no limit, populate on, MA_HUGE_AUTO. */
void ma_pool_config_default(ma_pool_config_t *cfg);

/* Create a pool. -EINVAL for a bad config (alignment not a power of two in range, zero arena
 * size, threshold above the arena size, unknown lock or huge-page mode), -ENOMEM when out of
 * memory. Under MA_HUGE_AUTO the kernel's THP mode is read here, once. */
int ma_pool_create(const ma_pool_config_t *cfg, ma_pool_t **out);

/* Destroy a pool. -EBUSY (and nothing freed) while leases are live; -EINVAL for NULL. */
int ma_pool_destroy(ma_pool_t *pool);

/* Install hooks (either may be NULL). -EBUSY if arenas are mapped already. */
int ma_pool_set_hooks(ma_pool_t *pool, ma_map_hook_fn on_map, ma_unmap_hook_fn on_unmap,
                      void *ctx);

/* Lease nbytes. On success fills *out and returns 0. On failure returns -errno and sets
 * out->fail_reason (and out->fail_errno): -EINVAL zero size, -ENOMEM too large / limit / mmap,
 * the mlock errno (-ENOMEM, -EPERM, -EAGAIN) under MA_LOCK_REQUIRED, the hook's error. */
int ma_pool_lease(ma_pool_t *pool, size_t nbytes, ma_lease_t *out);

/* Return the lease starting at addr. -EINVAL if addr is not a live lease (double release). */
int ma_pool_release(ma_pool_t *pool, void *addr);

/* Snapshot of the counters. */
int ma_pool_stats(ma_pool_t *pool, ma_pool_stats_t *out);

/* Unmap retained empty arenas now. */
int ma_pool_trim(ma_pool_t *pool);

/* Copy up to cap arena descriptors into out; *count receives the number of arenas. */
int ma_pool_arenas(ma_pool_t *pool, ma_arena_info_t *out, size_t cap, size_t *count);

/* *out = the huge-page size this pool aligns and advises arenas for, 0 when it uses small
 * pages only (MA_HUGE_OFF, or THP "never" or absent). -EINVAL for NULL. */
int ma_pool_huge_page_size(ma_pool_t *pool, size_t *out);

/* Physical memory of the machine in bytes (sysconf), used to reject absurd sizes. */
uint64_t ma_phys_bytes(void);

#ifdef __cplusplus
}
#endif
#endif
