/* test_pool_vmlck.c — the pool's locked-bytes counter equals the growth of VmLck in
 * /proc/self/status, for shared and exact arenas (the exact ones here are huge-page arenas
 * when THP is on), and drops back when they are released.
 * Skips (exit 77) when mlock is refused for this user beyond the memlock limit, and under
 * AddressSanitizer, whose mlock interceptor does nothing. */
#include "../ma_pool.h"
#include "harness.h"

#include <string.h>

static long vmlck_kb(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "VmLck:", 6) == 0) kb = atol(line + 6);
    if (f) fclose(f);
    return kb;
}

int main(void)
{
#if defined(__SANITIZE_ADDRESS__)
    /* ASan intercepts mlock and makes it a no-op, so VmLck cannot move under it. */
    printf("skip test_pool_vmlck: mlock is a no-op under AddressSanitizer\n");
    return 77;
#endif
    ma_pool_config_t c;
    ma_pool_config_default(&c);
    c.lock_mode = MA_LOCK_AUTO;
    c.arena_bytes = 4 << 20;
    c.large_threshold = 1 << 20;
    c.retain_bytes = 0;
    ma_pool_t *p;
    CHECK_EQ(ma_pool_create(&c, &p), 0);
    long base = vmlck_kb();
    ma_lease_t a, b, h;
    CHECK_EQ(ma_pool_lease(p, 10000, &a), 0);
    CHECK_EQ(ma_pool_lease(p, (3 << 20) + 5, &b), 0);
    CHECK_EQ(ma_pool_lease(p, 8 << 20, &h), 0);
    ma_pool_stats_t s;
    ma_pool_stats(p, &s);
    if (s.lock_failures) {
        printf("skip test_pool_vmlck: mlock refused (memlock limit)\n");
        return 77;
    }
    CHECK_EQ(s.locked, (1 << 20) + (3 << 20) + 4096 + (8 << 20)); /* first shared = threshold */
    CHECK_EQ(s.locked, s.reserved);
    CHECK_EQ((vmlck_kb() - base) * 1024, (long)s.locked);
    ma_pool_release(p, h.addr);
    ma_pool_stats(p, &s);
    CHECK_EQ((vmlck_kb() - base) * 1024, (long)s.locked);
    ma_pool_release(p, b.addr);
    ma_pool_stats(p, &s);
    CHECK_EQ((vmlck_kb() - base) * 1024, (long)s.locked);
    ma_pool_release(p, a.addr);
    CHECK_EQ(vmlck_kb(), base);
    CHECK_EQ(ma_pool_destroy(p), 0);
    TEST_DONE("test_pool_vmlck");
}
