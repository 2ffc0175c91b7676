/* test_pool_threads.c — four threads lease, fill, check and release concurrently; no lease
 * is ever shared between threads (each fills its memory with its own pattern and checks it
 * before release) and the pool ends empty. */
#include "../ma_pool.h"
#include "harness.h"

#include <pthread.h>
#include <string.h>

static ma_pool_t *pool;
static int bad[4];

static void *worker(void *arg)
{
    int id = (int)(intptr_t)arg;
    unsigned seed = 1234u + (unsigned)id;
    ma_lease_t l[8];
    memset(l, 0, sizeof l);
    for (int it = 0; it < 4000; it++) {
        int i = (int)(rand_r(&seed) % 8);
        if (l[i].addr) {
            unsigned char *m = l[i].addr;
            for (size_t k = 0; k < l[i].requested; k += 1024)
                if (m[k] != (unsigned char)(id * 8 + i)) bad[id]++;
            if (ma_pool_release(pool, l[i].addr) != 0) bad[id]++;
            l[i].addr = NULL;
        } else {
            size_t n = 1 + rand_r(&seed) % (300 << 10);
            if (ma_pool_lease(pool, n, &l[i]) != 0) bad[id]++;
            else memset(l[i].addr, id * 8 + i, n);
        }
    }
    for (int i = 0; i < 8; i++)
        if (l[i].addr && ma_pool_release(pool, l[i].addr) != 0) bad[id]++;
    return NULL;
}

int main(void)
{
    ma_pool_config_t c;
    ma_pool_config_default(&c);
    c.lock_mode = MA_LOCK_OFF;
    c.arena_bytes = 2 << 20;
    c.large_threshold = 256 << 10;
    CHECK_EQ(ma_pool_create(&c, &pool), 0);
    pthread_t t[4];
    for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, worker, (void *)(intptr_t)i);
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    for (int i = 0; i < 4; i++) CHECK_EQ(bad[i], 0);
    ma_pool_stats_t s;
    CHECK_EQ(ma_pool_trim(pool), 0); /* the default retain budget may keep an arena */
    ma_pool_stats(pool, &s);
    CHECK_EQ(s.leases, 0);
    CHECK_EQ(s.reserved, 0);
    CHECK_EQ(s.in_use, 0);
    CHECK(s.leases_total > 1000);
    CHECK_EQ(ma_pool_destroy(pool), 0);
    TEST_DONE("test_pool_threads");
}
