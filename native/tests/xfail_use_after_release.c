/* xfail_use_after_release.c — expected to FAIL under AddressSanitizer: it writes through a
 * lease after releasing it. The arena stays mapped (another lease keeps it alive), so only
 * the pool's poisoning can catch this; `make asan` checks that ASan reports it. */
#include "../ma_pool.h"

#include <stdio.h>
#include <string.h>

int main(void)
{
    ma_pool_config_t c;
    ma_pool_config_default(&c);
    c.lock_mode = MA_LOCK_OFF;
    ma_pool_t *p;
    if (ma_pool_create(&c, &p) != 0) return 2;
    ma_lease_t keep, gone;
    if (ma_pool_lease(p, 4096, &keep) || ma_pool_lease(p, 4096, &gone)) return 2;
    ma_pool_release(p, gone.addr);
    volatile char *stale = gone.addr;
    stale[10] = 42; /* use after release */
    printf("use after release was not caught\n");
    return 0;
}
