/* pool.c — the zero-overhead pinned-buffer pool (see ma_pool.h for the contract).
 *
 * An arena is one mmap'ed range, split into blocks kept in address order. Blocks of shared
 * arenas that are free sit on one pool-wide free list searched best-fit; releasing a block
 * merges it with free neighbours, so free space never fragments into adjacent pieces. Live
 * leases are found by address in a small chained hash table, which makes a double release a
 * clean -EINVAL instead of a corrupted list. Every byte the pool maps, locks or hands out is
 * counted in one stats struct, updated under the pool mutex.
 *
 * Arenas of at least one huge page are mapped huge-page aligned and madvised MADV_HUGEPAGE
 * before anything touches them, so the first fault (populate or mlock) can take whole 2 MiB
 * pages; see map_arena_memory.
 *
 * Under AddressSanitizer the free parts of arenas are poisoned, so a write through a released
 * lease is reported (use-after-poison) even though the pool keeps the memory mapped.
 */
#define _GNU_SOURCE
#include "ma_pool.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define MA_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MA_ASAN 1
#endif
#endif
#ifdef MA_ASAN
#include <sanitizer/asan_interface.h>
#define MA_POISON(a, n) ASAN_POISON_MEMORY_REGION((a), (n))
#define MA_UNPOISON(a, n) ASAN_UNPOISON_MEMORY_REGION((a), (n))
#else
#define MA_POISON(a, n) ((void)(a), (void)(n))
#define MA_UNPOISON(a, n) ((void)(a), (void)(n))
#endif

typedef struct ma_arena ma_arena_t;

typedef struct ma_block {
    struct ma_block *prev, *next;   /* neighbours in address order within the arena */
    struct ma_block *fprev, *fnext; /* free list links (free blocks of shared arenas) */
    struct ma_block *hnext;         /* hash chain (live blocks) */
    ma_arena_t *arena;
    size_t off, size, requested;
    int free;
} ma_block_t;

struct ma_arena {
    ma_arena_t *prev, *next;
    char *base;
    size_t size;
    size_t live; /* live leases in this arena */
    int locked, shared;
    int huge;     /* madvised MADV_HUGEPAGE */
    int retained; /* empty, kept mapped under the retain budget */
    ma_block_t *first;
};

struct ma_pool {
    pthread_mutex_t mu;
    ma_pool_config_t cfg;
    size_t page;
    size_t huge; /* huge-page size arenas are aligned and advised for; 0: small pages only */
    uint64_t phys;
    ma_map_hook_fn on_map;
    ma_unmap_hook_fn on_unmap;
    void *hook_ctx;
    ma_arena_t *arenas;
    ma_block_t *free_head;
    ma_block_t **buckets;
    size_t nbuckets;
    size_t shared_reserved; /* bytes of shared arenas mapped */
    ma_pool_stats_t st;
};

static size_t round_up(size_t n, size_t a) { return (n + a - 1) & ~(a - 1); }
static int is_pow2(size_t x) { return x && !(x & (x - 1)); }

uint64_t ma_phys_bytes(void)
{
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || psz <= 0) return UINT64_MAX;
    return (uint64_t)pages * (uint64_t)psz;
}

void ma_pool_config_default(ma_pool_config_t *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->alignment = 4096;
    cfg->lock_mode = MA_LOCK_AUTO;
    cfg->arena_bytes = 4u << 20;
    cfg->large_threshold = 256u << 10;
    cfg->retain_bytes = 1u << 20;
    cfg->limit_bytes = 0;
    cfg->populate = 1;
    cfg->huge_pages = MA_HUGE_AUTO;
}

/* The PMD huge-page size when transparent huge pages are on for madvised memory (mode
 * "always" or "madvise"), else 0. Read once per pool: the mode is a machine setting. */
static size_t thp_size(size_t page)
{
    char buf[128] = {0};
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "re");
    if (!f) return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    if (!strstr(buf, "[always]") && !strstr(buf, "[madvise]")) return 0;
    unsigned long long sz = 2u << 20;
    f = fopen("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "re");
    if (f) {
        if (fscanf(f, "%llu", &sz) != 1) sz = 0;
        fclose(f);
    }
    /* A huge page must be a power of two above the base page; 1 GiB caps the over-map. */
    if (sz <= page || sz > (1ull << 30) || !is_pow2((size_t)sz)) return 0;
    return (size_t)sz;
}

/* ---- stats helpers (mutex held) ---- */
static void bump(uint64_t *cur, uint64_t *peak, uint64_t add)
{
    *cur += add;
    if (*cur > *peak) *peak = *cur;
}

/* ---- live-lease hash table ---- */
static size_t hslot(const ma_pool_t *p, const void *addr)
{
    uint64_t k = (uint64_t)(uintptr_t)addr;
    k ^= k >> 29;
    k *= 0x9E3779B97F4A7C15ull;
    return (size_t)(k >> 17) & (p->nbuckets - 1);
}

static int hgrow(ma_pool_t *p)
{
    size_t n = p->nbuckets * 2;
    ma_block_t **nb = calloc(n, sizeof *nb);
    if (!nb) return -ENOMEM;
    ma_block_t **old = p->buckets;
    size_t on = p->nbuckets;
    p->buckets = nb;
    p->nbuckets = n;
    for (size_t i = 0; i < on; i++) {
        ma_block_t *b = old[i];
        while (b) {
            ma_block_t *nx = b->hnext;
            size_t s = hslot(p, b->arena->base + b->off);
            b->hnext = nb[s];
            nb[s] = b;
            b = nx;
        }
    }
    free(old);
    return 0;
}

static void hput(ma_pool_t *p, ma_block_t *b)
{
    size_t s = hslot(p, b->arena->base + b->off);
    b->hnext = p->buckets[s];
    p->buckets[s] = b;
}

static ma_block_t *htake(ma_pool_t *p, void *addr)
{
    ma_block_t **pp = &p->buckets[hslot(p, addr)];
    for (; *pp; pp = &(*pp)->hnext) {
        ma_block_t *b = *pp;
        if (b->arena->base + b->off == (char *)addr) {
            *pp = b->hnext;
            b->hnext = NULL;
            return b;
        }
    }
    return NULL;
}

/* ---- free list ---- */
static void fl_push(ma_pool_t *p, ma_block_t *b)
{
    b->fprev = NULL;
    b->fnext = p->free_head;
    if (p->free_head) p->free_head->fprev = b;
    p->free_head = b;
}

static void fl_remove(ma_pool_t *p, ma_block_t *b)
{
    if (b->fprev) b->fprev->fnext = b->fnext;
    else p->free_head = b->fnext;
    if (b->fnext) b->fnext->fprev = b->fprev;
    b->fprev = b->fnext = NULL;
}

/* ---- arenas ---- */

/* Fault in size bytes at base, writable. MADV_POPULATE_WRITE (Linux 5.14) does it in the
 * kernel; older kernels refuse it with EINVAL and get a store per page. */
static void prefault(char *base, size_t size, size_t page)
{
#ifdef MADV_POPULATE_WRITE
    if (madvise(base, size, MADV_POPULATE_WRITE) == 0 || errno != EINVAL) return;
#endif
    for (size_t off = 0; off < size; off += page) ((volatile char *)base)[off] = 0;
}

/* Map exactly size bytes at an address aligned to max(page, pool alignment), and to the huge
 * page when the arena holds at least one (then *huge is set and MADV_HUGEPAGE applied, or
 * *huge_failed set when the kernel refused the advice). An aligned range is got by mapping
 * align - page bytes more and unmapping the excess head and tail at once, so only size bytes
 * stay mapped. Population comes last: MAP_POPULATE when nothing needed trimming or advising,
 * else after the advice, so the kernel can fault whole huge pages and the trimmed excess is
 * never touched. Returns the base, or NULL with *err = errno of mmap. */
static char *map_arena_memory(const ma_pool_t *p, size_t size, int *huge, int *huge_failed,
                              int *err)
{
    size_t align = p->cfg.alignment > p->page ? p->cfg.alignment : p->page;
    int want_huge = p->huge && size >= p->huge;
    if (want_huge && align < p->huge) align = p->huge;
    size_t span = size + (align - p->page);
    int populate_now = p->cfg.populate && span == size && !want_huge;
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | (populate_now ? MAP_POPULATE : 0);
    char *raw = mmap(NULL, span, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (raw == MAP_FAILED) {
        *err = errno;
        return NULL;
    }
    char *base = (char *)round_up((uintptr_t)raw, align);
    if (base > raw) munmap(raw, (size_t)(base - raw));
    char *end = base + size, *rend = raw + span;
    if (rend > end) munmap(end, (size_t)(rend - end));
    *huge = *huge_failed = 0;
    if (want_huge) {
        if (madvise(base, size, MADV_HUGEPAGE) == 0) *huge = 1;
        else *huge_failed = 1; /* e.g. a kernel built without THP: small pages, still correct */
    }
    if (p->cfg.populate && !populate_now) prefault(base, size, p->page);
    return base;
}

static void unmap_arena(ma_pool_t *p, ma_arena_t *a)
{
    if (p->on_unmap) p->on_unmap(p->hook_ctx, a->base, a->size);
    MA_UNPOISON(a->base, a->size);
    munmap(a->base, a->size);
    if (a->prev) a->prev->next = a->next;
    else p->arenas = a->next;
    if (a->next) a->next->prev = a->prev;
    p->st.reserved -= a->size;
    if (a->huge) p->st.huge_advised -= a->size;
    if (a->shared) p->shared_reserved -= a->size;
    if (a->locked) p->st.locked -= a->size;
    p->st.arenas -= 1;
    p->st.arenas_unmapped_total += 1;
    ma_block_t *b = a->first;
    while (b) {
        ma_block_t *nx = b->next;
        free(b);
        b = nx;
    }
    free(a);
}

/* Map a new arena holding one free block covering it. Returns the arena or NULL with *out
 * failure fields set. */
static ma_arena_t *new_arena(ma_pool_t *p, size_t size, int shared, ma_lease_t *out, int *rc)
{
    if (p->cfg.limit_bytes && p->st.reserved + size > p->cfg.limit_bytes) {
        out->fail_reason = MA_FAIL_LIMIT;
        *rc = -ENOMEM;
        return NULL;
    }
    ma_arena_t *a = calloc(1, sizeof *a);
    ma_block_t *b = calloc(1, sizeof *b);
    if (!a || !b) {
        free(a);
        free(b);
        out->fail_reason = MA_FAIL_MMAP;
        out->fail_errno = ENOMEM;
        *rc = -ENOMEM;
        return NULL;
    }
    int err = 0, huge_failed = 0;
    a->base = map_arena_memory(p, size, &a->huge, &huge_failed, &err);
    if (!a->base) {
        free(a);
        free(b);
        out->fail_reason = MA_FAIL_MMAP;
        out->fail_errno = err;
        *rc = -err;
        return NULL;
    }
    a->size = size;
    a->shared = shared;
    /* Pinned memory must not be shared copy-on-write with a forked child. */
    madvise(a->base, size, MADV_DONTFORK);
    if (p->cfg.lock_mode != MA_LOCK_OFF) {
        if (mlock(a->base, size) == 0) {
            a->locked = 1;
        } else {
            err = errno;
            munlock(a->base, size);
            if (p->cfg.lock_mode == MA_LOCK_REQUIRED) {
                munmap(a->base, size);
                free(a);
                free(b);
                out->fail_reason = MA_FAIL_MLOCK;
                out->fail_errno = err;
                *rc = -err;
                return NULL;
            }
        }
    }
    if (p->on_map) {
        int hr = p->on_map(p->hook_ctx, a->base, size, a->locked);
        if (hr != 0) {
            munmap(a->base, size);
            free(a);
            free(b);
            out->fail_reason = MA_FAIL_HOOK;
            out->fail_errno = hr < 0 ? -hr : hr;
            *rc = hr < 0 ? hr : -hr;
            return NULL;
        }
    }
    if (p->cfg.lock_mode != MA_LOCK_OFF && !a->locked) p->st.lock_failures += 1;
    if (huge_failed) p->st.huge_advise_failures += 1;
    if (shared) MA_POISON(a->base, size);
    b->arena = a;
    b->off = 0;
    b->size = size;
    b->free = 1;
    a->first = b;
    a->next = p->arenas;
    if (p->arenas) p->arenas->prev = a;
    p->arenas = a;
    bump(&p->st.reserved, &p->st.reserved_peak, size);
    if (a->locked) bump(&p->st.locked, &p->st.locked_peak, size);
    if (a->huge) bump(&p->st.huge_advised, &p->st.huge_advised_peak, size);
    bump(&p->st.arenas, &p->st.arenas_peak, 1);
    if (shared) p->shared_reserved += size;
    p->st.arenas_mapped_total += 1;
    return a;
}

int ma_pool_create(const ma_pool_config_t *cfg, ma_pool_t **out)
{
    if (!cfg || !out) return -EINVAL;
    *out = NULL;
    long psz = sysconf(_SC_PAGESIZE);
    size_t page = psz > 0 ? (size_t)psz : 4096;
    if (!is_pow2(cfg->alignment) || cfg->alignment < 64 || cfg->alignment > (1u << 30))
        return -EINVAL;
    if (cfg->lock_mode < MA_LOCK_OFF || cfg->lock_mode > MA_LOCK_REQUIRED) return -EINVAL;
    if (cfg->huge_pages != MA_HUGE_OFF && cfg->huge_pages != MA_HUGE_AUTO) return -EINVAL;
    if (cfg->arena_bytes == 0 || cfg->large_threshold == 0) return -EINVAL;
    size_t arena = round_up(cfg->arena_bytes, page > cfg->alignment ? page : cfg->alignment);
    if (cfg->large_threshold > arena) return -EINVAL;
    ma_pool_t *p = calloc(1, sizeof *p);
    if (!p) return -ENOMEM;
    p->cfg = *cfg;
    p->cfg.arena_bytes = arena;
    p->page = page;
    p->huge = cfg->huge_pages == MA_HUGE_AUTO ? thp_size(page) : 0;
    p->phys = ma_phys_bytes();
    p->nbuckets = 64;
    p->buckets = calloc(p->nbuckets, sizeof *p->buckets);
    if (!p->buckets) {
        free(p);
        return -ENOMEM;
    }
    int rc = pthread_mutex_init(&p->mu, NULL);
    if (rc) {
        free(p->buckets);
        free(p);
        return -rc;
    }
    *out = p;
    return 0;
}

int ma_pool_destroy(ma_pool_t *p)
{
    if (!p) return -EINVAL;
    pthread_mutex_lock(&p->mu);
    if (p->st.leases) {
        pthread_mutex_unlock(&p->mu);
        return -EBUSY;
    }
    while (p->arenas) {
        ma_arena_t *a = p->arenas;
        if (a->retained) fl_remove(p, a->first);
        unmap_arena(p, a);
    }
    p->st.retained = 0;
    pthread_mutex_unlock(&p->mu);
    pthread_mutex_destroy(&p->mu);
    free(p->buckets);
    free(p);
    return 0;
}

int ma_pool_set_hooks(ma_pool_t *p, ma_map_hook_fn on_map, ma_unmap_hook_fn on_unmap, void *ctx)
{
    if (!p) return -EINVAL;
    pthread_mutex_lock(&p->mu);
    int rc = 0;
    if (p->arenas) {
        rc = -EBUSY;
    } else {
        p->on_map = on_map;
        p->on_unmap = on_unmap;
        p->hook_ctx = ctx;
    }
    pthread_mutex_unlock(&p->mu);
    return rc;
}

/* Smallest free block of at least size bytes, or NULL. */
static ma_block_t *best_fit(ma_pool_t *p, size_t size)
{
    ma_block_t *best = NULL;
    for (ma_block_t *b = p->free_head; b; b = b->fnext) {
        if (b->size >= size && (!best || b->size < best->size)) {
            best = b;
            if (b->size == size) break;
        }
    }
    return best;
}

/* Carve size bytes off the front of free block b (shared arena); the rest stays free. */
static int split(ma_pool_t *p, ma_block_t *b, size_t size)
{
    if (b->size > size) {
        ma_block_t *r = calloc(1, sizeof *r);
        if (!r) return -ENOMEM;
        r->arena = b->arena;
        r->off = b->off + size;
        r->size = b->size - size;
        r->free = 1;
        r->prev = b;
        r->next = b->next;
        if (b->next) b->next->prev = r;
        b->next = r;
        b->size = size;
        fl_push(p, r);
    }
    fl_remove(p, b);
    return 0;
}

/* Shared arenas grow geometrically: the first is large_threshold bytes, each next one as
 * large as all shared arenas together, capped at arena_bytes. A pool serving few small leases
 * thus maps little, and one serving many maps few arenas. */
static size_t shared_arena_size(const ma_pool_t *p)
{
    size_t unit = p->page > p->cfg.alignment ? p->page : p->cfg.alignment;
    size_t size = p->shared_reserved > p->cfg.large_threshold ? p->shared_reserved
                                                               : p->cfg.large_threshold;
    if (size > p->cfg.arena_bytes) size = p->cfg.arena_bytes;
    return round_up(size, unit);
}

static int lease_locked(ma_pool_t *p, size_t nbytes, ma_lease_t *out)
{
    size_t size = round_up(nbytes, p->cfg.alignment);
    ma_block_t *b;
    int rc = 0;
    if (p->st.leases >= p->nbuckets * 2 && hgrow(p) != 0) {
        out->fail_reason = MA_FAIL_MMAP;
        out->fail_errno = ENOMEM;
        return -ENOMEM;
    }
    if (size >= p->cfg.large_threshold) {
        size_t span = round_up(size, p->page > p->cfg.alignment ? p->page : p->cfg.alignment);
        ma_arena_t *a = new_arena(p, span, 0, out, &rc);
        if (!a) return rc;
        b = a->first;
        b->size = size; /* the page tail past the lease stays unused slack of this arena */
    } else {
        b = best_fit(p, size);
        if (!b) {
            ma_arena_t *a = new_arena(p, shared_arena_size(p), 1, out, &rc);
            if (!a) return rc;
            b = a->first;
            fl_push(p, b);
        }
        if ((rc = split(p, b, size)) != 0) {
            out->fail_reason = MA_FAIL_MMAP;
            out->fail_errno = -rc;
            return rc;
        }
        if (b->arena->retained) { /* a retained arena is back in use */
            b->arena->retained = 0;
            p->st.retained -= b->arena->size;
        }
    }
    b->free = 0;
    b->requested = nbytes;
    b->arena->live += 1;
    hput(p, b);
    char *addr = b->arena->base + b->off;
    MA_UNPOISON(addr, size);
    bump(&p->st.requested, &p->st.requested_peak, nbytes);
    bump(&p->st.in_use, &p->st.in_use_peak, size);
    bump(&p->st.leases, &p->st.leases_peak, 1);
    p->st.leases_total += 1;
    out->addr = addr;
    out->size = size;
    out->requested = nbytes;
    out->locked = b->arena->locked;
    return 0;
}

int ma_pool_lease(ma_pool_t *p, size_t nbytes, ma_lease_t *out)
{
    if (!p || !out) return -EINVAL;
    memset(out, 0, sizeof *out);
    if (nbytes == 0 || nbytes > SIZE_MAX - (1u << 30)) {
        out->fail_reason = nbytes == 0 ? MA_FAIL_BAD_SIZE : MA_FAIL_TOO_LARGE;
        return nbytes == 0 ? -EINVAL : -ENOMEM;
    }
    if ((uint64_t)nbytes > p->phys) {
        out->fail_reason = MA_FAIL_TOO_LARGE;
        return -ENOMEM;
    }
    pthread_mutex_lock(&p->mu);
    int rc = lease_locked(p, nbytes, out);
    pthread_mutex_unlock(&p->mu);
    return rc;
}

/* Free block b of a shared arena: merge with free neighbours, then unmap or retain an arena
 * left empty. */
static void free_shared(ma_pool_t *p, ma_block_t *b)
{
    ma_arena_t *a = b->arena;
    b->free = 1;
    ma_block_t *nx = b->next;
    if (nx && nx->free) {
        fl_remove(p, nx);
        b->size += nx->size;
        b->next = nx->next;
        if (nx->next) nx->next->prev = b;
        free(nx);
    }
    ma_block_t *pv = b->prev;
    if (pv && pv->free) {
        fl_remove(p, pv);
        pv->size += b->size;
        pv->next = b->next;
        if (b->next) b->next->prev = pv;
        free(b);
        b = pv;
    }
    fl_push(p, b);
    if (a->live == 0) {
        if (p->st.retained + a->size <= p->cfg.retain_bytes) {
            a->retained = 1;
            p->st.retained += a->size;
        } else {
            fl_remove(p, b);
            unmap_arena(p, a);
        }
    }
}

int ma_pool_release(ma_pool_t *p, void *addr)
{
    if (!p || !addr) return -EINVAL;
    pthread_mutex_lock(&p->mu);
    ma_block_t *b = htake(p, addr);
    if (!b) {
        pthread_mutex_unlock(&p->mu);
        return -EINVAL;
    }
    ma_arena_t *a = b->arena;
    p->st.requested -= b->requested;
    p->st.in_use -= b->size;
    p->st.leases -= 1;
    a->live -= 1;
    b->requested = 0;
    if (!a->shared) {
        unmap_arena(p, a);
    } else {
        MA_POISON(addr, b->size);
        free_shared(p, b);
    }
    pthread_mutex_unlock(&p->mu);
    return 0;
}

int ma_pool_stats(ma_pool_t *p, ma_pool_stats_t *out)
{
    if (!p || !out) return -EINVAL;
    pthread_mutex_lock(&p->mu);
    *out = p->st;
    pthread_mutex_unlock(&p->mu);
    return 0;
}

int ma_pool_huge_page_size(ma_pool_t *p, size_t *out)
{
    if (!p || !out) return -EINVAL;
    *out = p->huge; /* set once at creation: no lock needed */
    return 0;
}

int ma_pool_trim(ma_pool_t *p)
{
    if (!p) return -EINVAL;
    pthread_mutex_lock(&p->mu);
    ma_arena_t *a = p->arenas;
    while (a) {
        ma_arena_t *nx = a->next;
        if (a->retained) {
            fl_remove(p, a->first);
            p->st.retained -= a->size;
            unmap_arena(p, a);
        }
        a = nx;
    }
    pthread_mutex_unlock(&p->mu);
    return 0;
}

int ma_pool_arenas(ma_pool_t *p, ma_arena_info_t *out, size_t cap, size_t *count)
{
    if (!p || !count || (cap && !out)) return -EINVAL;
    pthread_mutex_lock(&p->mu);
    size_t n = 0;
    for (ma_arena_t *a = p->arenas; a; a = a->next, n++) {
        if (n < cap) {
            out[n].base = a->base;
            out[n].size = a->size;
            out[n].locked = a->locked;
            out[n].shared = a->shared;
        }
    }
    *count = n;
    pthread_mutex_unlock(&p->mu);
    return 0;
}
