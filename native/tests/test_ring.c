/* test_ring.c — the io_uring engine moves bytes exactly and reports every completion:
 * batched O_DIRECT writes and reads of more requests than the ring depth; injected short
 * transfers are completed by resubmission; an injected EIO fails only its own request; a read
 * past end of file reports the short count; bad requests are rejected whole. Skips (77) when
 * io_uring is unavailable. */
#define _GNU_SOURCE
#include "../ma_ring.h"
#include "harness.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NREQ 40
#define RSZ (64 << 10)

static int fault_mode; /* 1: halve the first piece of each request, 2: EIO on request 7 */
static int fault(void *ctx, const ma_io_req_t *req, uint64_t done, int res)
{
    (void)ctx;
    if (fault_mode == 1 && done == 0 && res > 4096) return (res / 2) & ~4095;
    if (fault_mode == 2 && req->user_data == 7) return -EIO;
    return res;
}

static unsigned reap_all(ma_ring_t *r, ma_io_cqe_t *c, unsigned want)
{
    unsigned got = 0;
    while (got < want) {
        unsigned n = 0;
        int rc = ma_ring_reap(r, c + got, want - got, 1, 5000, &n);
        if (rc < 0 || n == 0) break;
        got += n;
    }
    return got;
}

static void roundtrip(ma_ring_t *r, char *wbuf, char *rbuf, int mode)
{
    ma_io_req_t q[NREQ];
    ma_io_cqe_t c[NREQ];
    fault_mode = mode;
    for (int i = 0; i < NREQ; i++) {
        memset(wbuf + (size_t)i * RSZ, 'a' + i % 26 + mode, RSZ);
        q[i] = (ma_io_req_t){MA_OP_WRITE, 0, wbuf + (size_t)i * RSZ, RSZ, (uint64_t)i * RSZ, (uint64_t)i};
    }
    unsigned acc = 0;
    CHECK_EQ(ma_ring_submit(r, q, NREQ, &acc), 0);
    CHECK_EQ(acc, NREQ);
    CHECK_EQ(reap_all(r, c, NREQ), NREQ);
    int seen[NREQ] = {0};
    for (int i = 0; i < NREQ; i++) {
        seen[c[i].user_data]++;
        if (mode == 2 && c[i].user_data == 7) CHECK_EQ(c[i].res, -EIO);
        else CHECK_EQ(c[i].res, RSZ);
    }
    for (int i = 0; i < NREQ; i++) CHECK_EQ(seen[i], 1);
    memset(rbuf, 0, (size_t)NREQ * RSZ);
    for (int i = 0; i < NREQ; i++)
        q[i] = (ma_io_req_t){MA_OP_READ, 0, rbuf + (size_t)i * RSZ, RSZ, (uint64_t)i * RSZ, (uint64_t)(100 + i)};
    fault_mode = mode == 1 ? 1 : 0;
    CHECK_EQ(ma_ring_submit(r, q, NREQ, &acc), 0);
    CHECK_EQ(reap_all(r, c, NREQ), NREQ);
    for (int i = 0; i < NREQ; i++) CHECK_EQ(c[i].res, RSZ);
    for (int i = 0; i < NREQ; i++) {
        if (mode == 2 && i == 7) continue; /* that write failed: its bytes are the old ones */
        CHECK(memcmp(rbuf + (size_t)i * RSZ, wbuf + (size_t)i * RSZ, RSZ) == 0);
    }
}

int main(void)
{
    int prc = ma_ring_probe();
    if (prc < 0) {
        printf("skip test_ring: io_uring unavailable (%s)\n", strerror(-prc));
        return 77;
    }
    char path2[] = "/var/tmp/ma_ring_test_XXXXXX";
    int fd = mkostemp(path2, O_DIRECT);
    if (fd < 0) {
        printf("skip test_ring: O_DIRECT refused in /var/tmp\n");
        return 77;
    }
    unlink(path2);
    ma_ring_t *r;
    CHECK_EQ(ma_ring_create(8, 4, &r), 0);
    CHECK_EQ(ma_ring_set_file(r, 0, fd), 0);
    char *wbuf = NULL, *rbuf = NULL;
    CHECK_EQ(posix_memalign((void **)&wbuf, 4096, (size_t)NREQ * RSZ), 0);
    CHECK_EQ(posix_memalign((void **)&rbuf, 4096, (size_t)NREQ * RSZ), 0);
    CHECK_EQ(ma_ring_set_fault(r, fault, NULL), 0);

    roundtrip(r, wbuf, rbuf, 0);
    ma_ring_stats_t s;
    ma_ring_stats(r, &s);
    CHECK_EQ(s.short_resubmits, 0);
    CHECK(s.enter_calls < 2 * NREQ); /* batched: fewer submit calls than requests */

    roundtrip(r, wbuf, rbuf, 1);
    ma_ring_stats(r, &s);
    CHECK(s.short_resubmits >= 2 * NREQ);

    roundtrip(r, wbuf, rbuf, 2);
    ma_ring_stats(r, &s);
    CHECK_EQ(s.errors, 1);

    /* fixed buffers, when the kernel allows registration */
    if (ma_ring_buffer_slots(r) && ma_ring_register_buffer(r, 0, rbuf, (size_t)NREQ * RSZ) == 0) {
        uint64_t before = s.fixed_ops;
        roundtrip(r, wbuf, rbuf, 0);
        ma_ring_stats(r, &s);
        CHECK_EQ(s.fixed_ops - before, NREQ);
        CHECK_EQ(ma_ring_register_buffer(r, 0, NULL, 0), 0);
    }

    /* read past end of file: short count, not an error and not silence */
    ma_io_req_t q = {MA_OP_READ, 0, rbuf, 2 * RSZ, (uint64_t)(NREQ - 1) * RSZ, 999};
    ma_io_cqe_t c;
    CHECK_EQ(ma_ring_submit(r, &q, 1, NULL), 0);
    CHECK_EQ(reap_all(r, &c, 1), 1);
    CHECK_EQ(c.user_data, 999);
    CHECK_EQ(c.res, RSZ);

    /* bad requests are rejected before anything is queued */
    ma_io_req_t bad[2] = {{MA_OP_READ, 0, rbuf, 4096, 0, 1}, {MA_OP_READ, 9, rbuf, 4096, 0, 2}};
    CHECK_EQ(ma_ring_submit(r, bad, 2, NULL), -EINVAL);
    bad[1].file = 0;
    bad[1].len = 0;
    CHECK_EQ(ma_ring_submit(r, bad, 2, NULL), -EINVAL);
    ma_ring_stats(r, &s);
    CHECK_EQ(s.inflight, 0);
    CHECK_EQ(s.pending, 0);
    unsigned n = 7;
    CHECK_EQ(ma_ring_reap(r, &c, 1, 1, 100, &n), 0); /* idle: returns at once */
    CHECK_EQ(n, 0);

    CHECK_EQ(ma_ring_destroy(r), 0);
    free(wbuf);
    free(rbuf);
    close(fd);
    TEST_DONE("test_ring");
}
