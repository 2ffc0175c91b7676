/* test_pool_basic.c — leases are exact (rounded only to the alignment), aligned, disjoint;
 * stats equal the sum of live leases; free neighbours coalesce so a freed arena can serve one
 * lease as large as the arena; empty arenas go back to the OS; bad sizes and double releases
 * return -errno; arenas of 2 MiB or more are huge-page aligned and advised when THP is on,
 * with sizes unchanged, and MA_HUGE_OFF changes nothing. */
#include "../ma_pool.h"
#include "harness.h"

#include <errno.h>
#include <stdint.h>
#include <string.h>

static ma_pool_t *mk(size_t arena, size_t thresh, size_t retain)
{
    ma_pool_config_t c;
    ma_pool_config_default(&c);
    c.lock_mode = MA_LOCK_OFF;
    c.arena_bytes = arena;
    c.large_threshold = thresh;
    c.retain_bytes = retain;
    ma_pool_t *p = NULL;
    CHECK_EQ(ma_pool_create(&c, &p), 0);
    return p;
}

static void exact_sizes(void)
{
    ma_pool_t *p = mk(1 << 20, 256 << 10, 0);
    ma_lease_t a, b, c;
    CHECK_EQ(ma_pool_lease(p, 1, &a), 0);
    CHECK_EQ(a.size, 4096);
    CHECK_EQ(ma_pool_lease(p, 8192, &b), 0);
    CHECK_EQ(b.size, 8192);
    CHECK_EQ(ma_pool_lease(p, (1 << 20) + 1, &c), 0); /* large: own arena */
    CHECK_EQ(c.size, (1 << 20) + 4096);
    CHECK_EQ((uintptr_t)a.addr % 4096, 0);
    CHECK_EQ((uintptr_t)b.addr % 4096, 0);
    CHECK((char *)a.addr + a.size <= (char *)b.addr || (char *)b.addr + b.size <= (char *)a.addr);
    memset(a.addr, 1, a.size);
    memset(b.addr, 2, b.size);
    memset(c.addr, 3, c.size);
    ma_pool_stats_t s;
    ma_pool_stats(p, &s);
    CHECK_EQ(s.requested, 1 + 8192 + (1 << 20) + 1);
    CHECK_EQ(s.in_use, 4096 + 8192 + (1 << 20) + 4096);
    CHECK_EQ(s.reserved, (256 << 10) + (1 << 20) + 4096); /* first shared arena: threshold */
    CHECK_EQ(s.leases, 3);
    CHECK_EQ(s.arenas, 2);
    CHECK_EQ(ma_pool_release(p, c.addr), 0);
    ma_pool_stats(p, &s);
    CHECK_EQ(s.reserved, 256 << 10); /* the large arena went back at once */
    CHECK_EQ(ma_pool_release(p, a.addr), 0);
    CHECK_EQ(ma_pool_release(p, a.addr), -EINVAL); /* double release */
    CHECK_EQ(ma_pool_release(p, (char *)b.addr + 4096), -EINVAL); /* not a lease start */
    CHECK_EQ(ma_pool_destroy(p), -EBUSY);            /* b still live */
    CHECK_EQ(ma_pool_release(p, b.addr), 0);
    ma_pool_stats(p, &s);
    CHECK_EQ(s.reserved, 0);
    CHECK_EQ(s.requested, 0);
    CHECK_EQ(s.in_use, 0);
    CHECK_EQ(s.leases, 0);
    CHECK_EQ(s.leases_total, 3);
    CHECK_EQ(s.requested_peak, 1 + 8192 + (1 << 20) + 1);
    CHECK_EQ(ma_pool_destroy(p), 0);
}

static void coalescing(void)
{
    /* Fill one 1 MiB arena with 64 KiB leases, free them in a scattered order and check the
     * space merges back: a lease of the whole arena then fits without a new mapping. */
    ma_pool_t *p = mk(1 << 20, 1 << 20, 1 << 20);
    ma_lease_t l[16];
    for (int i = 0; i < 16; i++) CHECK_EQ(ma_pool_lease(p, 64 << 10, &l[i]), 0);
    ma_pool_stats_t s;
    ma_pool_stats(p, &s);
    CHECK_EQ(s.arenas, 1);
    int order[16] = {3, 7, 0, 15, 8, 1, 12, 5, 9, 2, 14, 4, 11, 6, 13, 10};
    for (int i = 0; i < 16; i++) CHECK_EQ(ma_pool_release(p, l[order[i]].addr), 0);
    ma_pool_stats(p, &s);
    CHECK_EQ(s.retained, 1 << 20);
    CHECK_EQ(s.reserved, 1 << 20);
    ma_lease_t big;
    CHECK_EQ(ma_pool_lease(p, (1 << 20) - 4096, &big), 0);
    ma_pool_stats(p, &s);
    CHECK_EQ(s.arenas_mapped_total, 1); /* served from the coalesced arena */
    CHECK_EQ(s.retained, 0);
    CHECK_EQ(ma_pool_release(p, big.addr), 0);
    CHECK_EQ(ma_pool_trim(p), 0);
    ma_pool_stats(p, &s);
    CHECK_EQ(s.reserved, 0);
    CHECK_EQ(s.retained, 0);
    CHECK_EQ(ma_pool_destroy(p), 0);
}

static void geometric_growth(void)
{
    /* 64 KiB leases: shared arenas of 256K, 256K, 512K, 1M, 1M (capped at arena_bytes). */
    ma_pool_t *p = mk(1 << 20, 256 << 10, 0);
    ma_lease_t l[48];
    for (int i = 0; i < 48; i++) CHECK_EQ(ma_pool_lease(p, 64 << 10, &l[i]), 0);
    ma_pool_stats_t s;
    ma_pool_stats(p, &s);
    CHECK_EQ(s.arenas, 5);
    CHECK_EQ(s.reserved, (256 << 10) * 2 + (512 << 10) + (1 << 20) * 2);
    CHECK_EQ(s.in_use, 48 * (64 << 10));
    for (int i = 0; i < 48; i++) CHECK_EQ(ma_pool_release(p, l[i].addr), 0);
    ma_pool_stats(p, &s);
    CHECK_EQ(s.reserved, 0);
    CHECK_EQ(ma_pool_destroy(p), 0);
}

static void best_fit(void)
{
    /* Holes of 3, 1 and 2 pages: a 1-page lease must take the 1-page hole. */
    ma_pool_t *p = mk(1 << 20, 1 << 20, 0);
    ma_lease_t h3, s1, h1, s2, h2, s3;
    ma_pool_lease(p, 3 * 4096, &h3);
    ma_pool_lease(p, 4096, &s1);
    ma_pool_lease(p, 4096, &h1);
    ma_pool_lease(p, 4096, &s2);
    ma_pool_lease(p, 2 * 4096, &h2);
    ma_pool_lease(p, 4096, &s3);
    ma_pool_release(p, h3.addr);
    ma_pool_release(p, h1.addr);
    ma_pool_release(p, h2.addr);
    ma_lease_t x;
    CHECK_EQ(ma_pool_lease(p, 100, &x), 0);
    CHECK(x.addr == h1.addr);
    ma_pool_release(p, x.addr);
    ma_pool_release(p, s1.addr);
    ma_pool_release(p, s2.addr);
    ma_pool_release(p, s3.addr);
    CHECK_EQ(ma_pool_destroy(p), 0);
}

static void bad_input(void)
{
    ma_pool_t *p = mk(1 << 20, 1 << 20, 0);
    ma_lease_t l;
    CHECK_EQ(ma_pool_lease(p, 0, &l), -EINVAL);
    CHECK_EQ(l.fail_reason, MA_FAIL_BAD_SIZE);
    CHECK_EQ(ma_pool_lease(p, (size_t)-1, &l), -ENOMEM);
    CHECK_EQ(l.fail_reason, MA_FAIL_TOO_LARGE);
    CHECK_EQ(ma_pool_lease(p, (size_t)(ma_phys_bytes() + 1), &l), -ENOMEM);
    CHECK_EQ(l.fail_reason, MA_FAIL_TOO_LARGE);
    CHECK_EQ(ma_pool_release(p, NULL), -EINVAL);
    CHECK_EQ(ma_pool_destroy(p), 0);
    ma_pool_config_t c;
    ma_pool_config_default(&c);
    c.alignment = 3000;
    CHECK_EQ(ma_pool_create(&c, &p), -EINVAL);
    ma_pool_config_default(&c);
    c.large_threshold = c.arena_bytes * 2;
    CHECK_EQ(ma_pool_create(&c, &p), -EINVAL);
    ma_pool_config_default(&c);
    c.lock_mode = 7;
    CHECK_EQ(ma_pool_create(&c, &p), -EINVAL);
    ma_pool_config_default(&c);
    c.huge_pages = 2;
    CHECK_EQ(ma_pool_create(&c, &p), -EINVAL);
    CHECK_EQ(ma_pool_destroy(NULL), -EINVAL);
}

static void limit(void)
{
    ma_pool_config_t c;
    ma_pool_config_default(&c);
    c.lock_mode = MA_LOCK_OFF;
    c.limit_bytes = 8 << 20;
    ma_pool_t *p;
    CHECK_EQ(ma_pool_create(&c, &p), 0);
    ma_lease_t a, b;
    CHECK_EQ(ma_pool_lease(p, 6 << 20, &a), 0);
    CHECK_EQ(ma_pool_lease(p, 6 << 20, &b), -ENOMEM);
    CHECK_EQ(b.fail_reason, MA_FAIL_LIMIT);
    CHECK_EQ(ma_pool_release(p, a.addr), 0);
    CHECK_EQ(ma_pool_lease(p, 6 << 20, &b), 0);
    CHECK_EQ(ma_pool_release(p, b.addr), 0);
    CHECK_EQ(ma_pool_destroy(p), 0);
}

static int maps, unmaps;
static int on_map(void *ctx, void *base, size_t size, int locked)
{
    (void)base; (void)size; (void)locked;
    maps++;
    return *(int *)ctx;
}
static void on_unmap(void *ctx, void *base, size_t size)
{
    (void)ctx; (void)base; (void)size;
    unmaps++;
}

static void hooks(void)
{
    ma_pool_t *p = mk(1 << 20, 512 << 10, 0);
    int hook_rc = 0;
    CHECK_EQ(ma_pool_set_hooks(p, on_map, on_unmap, &hook_rc), 0);
    ma_lease_t a, b;
    CHECK_EQ(ma_pool_lease(p, 4096, &a), 0);
    CHECK_EQ(ma_pool_set_hooks(p, NULL, NULL, NULL), -EBUSY);
    CHECK_EQ(ma_pool_lease(p, 600 << 10, &b), 0);
    CHECK_EQ(maps, 2);
    hook_rc = -EIO;
    ma_lease_t c;
    CHECK_EQ(ma_pool_lease(p, 700 << 10, &c), -EIO);
    CHECK_EQ(c.fail_reason, MA_FAIL_HOOK);
    ma_pool_release(p, a.addr);
    ma_pool_release(p, b.addr);
    CHECK_EQ(unmaps, 2);
    ma_arena_info_t info[4];
    size_t n = 99;
    CHECK_EQ(ma_pool_arenas(p, info, 4, &n), 0);
    CHECK_EQ(n, 0);
    CHECK_EQ(ma_pool_destroy(p), 0);
}

/* 1 when the kernel's THP mode is "always" or "madvise". */
static int thp_on(void)
{
    char buf[128] = {0};
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (!f) return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    return strstr(buf, "[always]") || strstr(buf, "[madvise]");
}

/* A field of /proc/self/status, in KiB. */
static long status_kb(const char *key)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    size_t k = strlen(key);
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, key, k) == 0 && line[k] == ':') kb = atol(line + k + 1);
    if (f) fclose(f);
    return kb;
}

/* AnonHugePages (KiB) summed over the smaps entries that overlap [addr, addr + size). */
static long anon_huge_kb(const void *addr, size_t size)
{
    FILE *f = fopen("/proc/self/smaps", "r");
    char line[512];
    long kb = 0;
    int in = 0;
    uintptr_t a = (uintptr_t)addr, e = a + size;
    while (f && fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2) in = lo < e && hi > a;
        else if (in && strncmp(line, "AnonHugePages:", 14) == 0) kb += atol(line + 14);
    }
    if (f) fclose(f);
    return kb;
}

static ma_pool_t *mk_huge(int mode)
{
    ma_pool_config_t c;
    ma_pool_config_default(&c);
    c.lock_mode = MA_LOCK_OFF;
    c.retain_bytes = 0;
    c.huge_pages = mode;
    ma_pool_t *p = NULL;
    CHECK_EQ(ma_pool_create(&c, &p), 0);
    return p;
}

static void huge_pages(void)
{
    const size_t huge = 2u << 20;
    int on = thp_on();
    ma_pool_t *p = mk_huge(MA_HUGE_AUTO);
    size_t hp = 99;
    CHECK_EQ(ma_pool_huge_page_size(p, &hp), 0);
    CHECK_EQ(hp, on ? huge : 0);
    ma_lease_t warm, a, b;
    CHECK_EQ(ma_pool_lease(p, 4096, &warm), 0); /* heap and hash set up before VmSize counts */
    long vm0 = status_kb("VmSize");
    CHECK_EQ(ma_pool_lease(p, 8 << 20, &a), 0);
    CHECK_EQ(ma_pool_lease(p, (5 << 20) + 3, &b), 0);
    CHECK_EQ(a.size, 8 << 20);            /* sizes are as exact as without huge pages */
    CHECK_EQ(b.size, (5 << 20) + 4096);
    ma_pool_stats_t s;
    ma_pool_stats(p, &s);
    CHECK_EQ(s.reserved, (256 << 10) + (8 << 20) + (5 << 20) + 4096);
    /* The over-mapped head and tail were unmapped: the address space grew by exactly the
     * two arenas. */
    CHECK_EQ((status_kb("VmSize") - vm0) * 1024, (8 << 20) + (5 << 20) + 4096);
    CHECK_EQ(s.huge_advise_failures, 0);
    if (on) {
        CHECK_EQ((uintptr_t)a.addr % huge, 0);
        CHECK_EQ((uintptr_t)b.addr % huge, 0);
        CHECK_EQ(s.huge_advised, (8 << 20) + (5 << 20) + 4096);
        long kb = anon_huge_kb(a.addr, a.size);
        if (kb == 0) printf("note test_pool_basic: THP on but the 8 MiB arena got no huge pages\n");
        CHECK(kb <= (8 << 10));
    } else {
        printf("note test_pool_basic: THP is off here; huge-page alignment not checked\n");
        CHECK_EQ(s.huge_advised, 0);
    }
    memset(a.addr, 7, a.size);
    memset(b.addr, 9, b.size);
    CHECK_EQ(ma_pool_release(p, a.addr), 0);
    ma_pool_stats(p, &s);
    CHECK_EQ(s.huge_advised, on ? (5 << 20) + 4096 : 0);
    CHECK_EQ(s.huge_advised_peak, on ? (13 << 20) + 4096 : 0);
    CHECK_EQ(ma_pool_release(p, b.addr), 0);
    CHECK_EQ(ma_pool_release(p, warm.addr), 0);
    ma_pool_stats(p, &s);
    CHECK_EQ(s.reserved, 0);
    CHECK_EQ(s.huge_advised, 0);
    CHECK_EQ(status_kb("VmSize"), vm0 - 256); /* the warm-up arena went back too */
    CHECK_EQ(ma_pool_destroy(p), 0);

    /* Shared arenas grow 256K, 256K, 512K, 1M, 2M, 4M: the last two are huge-page arenas. */
    p = mk_huge(MA_HUGE_AUTO);
    ma_lease_t l[128];
    for (int i = 0; i < 128; i++) CHECK_EQ(ma_pool_lease(p, 64 << 10, &l[i]), 0);
    ma_arena_info_t info[8];
    size_t n = 0, big = 0;
    CHECK_EQ(ma_pool_arenas(p, info, 8, &n), 0);
    CHECK_EQ(n, 6);
    for (size_t i = 0; i < n && i < 8; i++) {
        CHECK(info[i].shared);
        if (info[i].size >= huge) {
            big += info[i].size;
            if (on) CHECK_EQ((uintptr_t)info[i].base % huge, 0);
        }
    }
    CHECK_EQ(big, 6u << 20);
    ma_pool_stats(p, &s);
    CHECK_EQ(s.huge_advised, on ? big : 0);
    for (int i = 0; i < 128; i++) CHECK_EQ(ma_pool_release(p, l[i].addr), 0);
    ma_pool_stats(p, &s);
    CHECK_EQ(s.reserved, 0);
    CHECK_EQ(s.huge_advised, 0);
    CHECK_EQ(ma_pool_destroy(p), 0);

    /* MA_HUGE_OFF: no advice, nothing counted, sizes the same. */
    p = mk_huge(MA_HUGE_OFF);
    CHECK_EQ(ma_pool_huge_page_size(p, &hp), 0);
    CHECK_EQ(hp, 0);
    CHECK_EQ(ma_pool_lease(p, 8 << 20, &a), 0);
    CHECK_EQ(a.size, 8 << 20);
    CHECK_EQ((uintptr_t)a.addr % 4096, 0);
    ma_pool_stats(p, &s);
    CHECK_EQ(s.reserved, 8 << 20);
    CHECK_EQ(s.huge_advised, 0);
    CHECK_EQ(s.huge_advise_failures, 0);
    CHECK_EQ(ma_pool_release(p, a.addr), 0);
    CHECK_EQ(ma_pool_destroy(p), 0);
    CHECK_EQ(ma_pool_huge_page_size(NULL, &hp), -EINVAL);
}

int main(void)
{
    exact_sizes();
    coalescing();
    geometric_growth();
    best_fit();
    bad_input();
    limit();
    hooks();
    huge_pages();
    TEST_DONE("test_pool_basic");
}
