/* ring.c — the io_uring engine behind the swap store (see ma_ring.h for the contract).
 *
 * Each accepted request owns a slot while it is in flight; the slot index travels as the
 * SQE's user_data, so every completion is matched to its own request, and the caller's
 * user_data is returned only when the whole request is done. Requests beyond the ring depth
 * wait in a FIFO and are submitted as slots free up. A request larger than MA_CHUNK bytes is
 * moved in MA_CHUNK pieces (io_uring lengths are 32-bit). Submitters serialise on sq_mu;
 * the single reaper holds cq_mu while it consumes the completion queue and takes sq_mu only
 * to update a slot or resubmit.
 */
#define _GNU_SOURCE
#include "ma_ring.h"

#include <errno.h>

#ifdef MA_NO_URING
/* Built without liburing: every entry point says io_uring is unavailable, and the Python
 * engine falls back to its portable backend. */
int ma_ring_probe(void) { return -ENOSYS; }
int ma_ring_create(unsigned depth, unsigned max_files, ma_ring_t **out)
{
    (void)depth; (void)max_files;
    if (out) *out = NULL;
    return -ENOSYS;
}
int ma_ring_destroy(ma_ring_t *r) { (void)r; return -ENOSYS; }
int ma_ring_set_file(ma_ring_t *r, unsigned s, int fd) { (void)r; (void)s; (void)fd; return -ENOSYS; }
int ma_ring_register_buffer(ma_ring_t *r, unsigned s, void *b, size_t l)
{
    (void)r; (void)s; (void)b; (void)l;
    return -ENOSYS;
}
unsigned ma_ring_buffer_slots(const ma_ring_t *r) { (void)r; return 0; }
int ma_ring_submit(ma_ring_t *r, const ma_io_req_t *q, unsigned n, unsigned *a)
{
    (void)r; (void)q; (void)n;
    if (a) *a = 0;
    return -ENOSYS;
}
int ma_ring_reap(ma_ring_t *r, ma_io_cqe_t *o, unsigned c, unsigned m, int t, unsigned *n)
{
    (void)r; (void)o; (void)c; (void)m; (void)t;
    if (n) *n = 0;
    return -ENOSYS;
}
int ma_ring_set_fault(ma_ring_t *r, ma_fault_fn f, void *c) { (void)r; (void)f; (void)c; return -ENOSYS; }
int ma_ring_stats(ma_ring_t *r, ma_ring_stats_t *o) { (void)r; (void)o; return -ENOSYS; }
#else
#include <liburing.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MA_CHUNK (1u << 30)
#define MA_MAX_RETRIES 32
#define MA_BUF_SLOTS 64

typedef struct slot {
    ma_io_req_t req;
    uint64_t done;    /* bytes moved so far */
    uint32_t cur;     /* bytes asked in the SQE now in flight */
    int retries;
} slot_t;

typedef struct fixed_buf {
    char *base;
    size_t len;
} fixed_buf_t;

struct ma_ring {
    struct io_uring ring;
    pthread_mutex_t sq_mu;
    pthread_mutex_t cq_mu;
    unsigned depth, max_files;
    slot_t *slots;
    unsigned *free_stack;
    unsigned nfree;
    ma_io_req_t *pend;
    size_t pend_cap, pend_head, pend_len;
    fixed_buf_t bufs[MA_BUF_SLOTS];
    int bufs_ok; /* sparse buffer table registered */
    unsigned prepared; /* SQEs prepared and not yet submitted */
    ma_fault_fn fault;
    void *fault_ctx;
    ma_ring_stats_t st;
};

int ma_ring_probe(void)
{
    struct io_uring r;
    int rc = io_uring_queue_init(2, &r, 0);
    if (rc < 0) return rc;
    io_uring_queue_exit(&r);
    return 0;
}

int ma_ring_create(unsigned depth, unsigned max_files, ma_ring_t **out)
{
    if (!out || depth == 0 || depth > 4096 || max_files == 0 || max_files > 65536)
        return -EINVAL;
    *out = NULL;
    ma_ring_t *r = calloc(1, sizeof *r);
    if (!r) return -ENOMEM;
    r->depth = depth;
    r->max_files = max_files;
    r->slots = calloc(depth, sizeof *r->slots);
    r->free_stack = calloc(depth, sizeof *r->free_stack);
    r->pend_cap = 64;
    r->pend = calloc(r->pend_cap, sizeof *r->pend);
    if (!r->slots || !r->free_stack || !r->pend) {
        free(r->slots);
        free(r->free_stack);
        free(r->pend);
        free(r);
        return -ENOMEM;
    }
    for (unsigned i = 0; i < depth; i++) r->free_stack[i] = depth - 1 - i;
    r->nfree = depth;
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_CQSIZE;
    p.cq_entries = depth * 2;
    int rc = io_uring_queue_init_params(depth, &r->ring, &p);
    if (rc < 0) {
        free(r->slots);
        free(r->free_stack);
        free(r->pend);
        free(r);
        return rc;
    }
    rc = io_uring_register_files_sparse(&r->ring, max_files);
    if (rc < 0) {
        io_uring_queue_exit(&r->ring);
        free(r->slots);
        free(r->free_stack);
        free(r->pend);
        free(r);
        return rc;
    }
    r->bufs_ok = io_uring_register_buffers_sparse(&r->ring, MA_BUF_SLOTS) == 0;
    pthread_mutex_init(&r->sq_mu, NULL);
    pthread_mutex_init(&r->cq_mu, NULL);
    *out = r;
    return 0;
}

int ma_ring_destroy(ma_ring_t *r)
{
    if (!r) return -EINVAL;
    pthread_mutex_lock(&r->sq_mu);
    int busy = r->nfree != r->depth || r->pend_len;
    pthread_mutex_unlock(&r->sq_mu);
    if (busy) return -EBUSY;
    io_uring_queue_exit(&r->ring);
    pthread_mutex_destroy(&r->sq_mu);
    pthread_mutex_destroy(&r->cq_mu);
    free(r->slots);
    free(r->free_stack);
    free(r->pend);
    free(r);
    return 0;
}

int ma_ring_set_file(ma_ring_t *r, unsigned slot, int fd)
{
    if (!r || slot >= r->max_files) return -EINVAL;
    pthread_mutex_lock(&r->sq_mu);
    int rc = io_uring_register_files_update(&r->ring, slot, &fd, 1);
    pthread_mutex_unlock(&r->sq_mu);
    return rc < 0 ? rc : 0;
}

unsigned ma_ring_buffer_slots(const ma_ring_t *r) { return r && r->bufs_ok ? MA_BUF_SLOTS : 0; }

int ma_ring_register_buffer(ma_ring_t *r, unsigned slot, void *base, size_t len)
{
    if (!r || slot >= MA_BUF_SLOTS) return -EINVAL;
    if (!r->bufs_ok) return -EOPNOTSUPP;
    struct iovec iov = {.iov_base = len ? base : NULL, .iov_len = len};
    __u64 tag = 0;
    pthread_mutex_lock(&r->sq_mu);
    int rc = io_uring_register_buffers_update_tag(&r->ring, slot, &iov, &tag, 1);
    if (rc >= 0) {
        r->bufs[slot].base = len ? base : NULL;
        r->bufs[slot].len = len;
    }
    pthread_mutex_unlock(&r->sq_mu);
    return rc < 0 ? rc : 0;
}

int ma_ring_set_fault(ma_ring_t *r, ma_fault_fn fn, void *ctx)
{
    if (!r) return -EINVAL;
    pthread_mutex_lock(&r->sq_mu);
    r->fault = fn;
    r->fault_ctx = ctx;
    pthread_mutex_unlock(&r->sq_mu);
    return 0;
}

int ma_ring_stats(ma_ring_t *r, ma_ring_stats_t *out)
{
    if (!r || !out) return -EINVAL;
    pthread_mutex_lock(&r->sq_mu);
    *out = r->st;
    out->inflight = r->depth - r->nfree;
    out->pending = r->pend_len;
    pthread_mutex_unlock(&r->sq_mu);
    return 0;
}

/* ---- submission side (sq_mu held) ---- */
static int fixed_index(const ma_ring_t *r, const char *buf, size_t len)
{
    if (!r->bufs_ok) return -1;
    for (int i = 0; i < MA_BUF_SLOTS; i++) {
        const fixed_buf_t *b = &r->bufs[i];
        if (b->len && buf >= b->base && buf + len <= b->base + b->len) return i;
    }
    return -1;
}

/* Prepare the SQE for the next piece of slot idx. */
static int prep(ma_ring_t *r, unsigned idx)
{
    slot_t *s = &r->slots[idx];
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) {
        int rc = io_uring_submit(&r->ring);
        if (rc < 0) return rc;
        r->prepared = 0;
        sqe = io_uring_get_sqe(&r->ring);
        if (!sqe) return -EBUSY;
    }
    char *buf = (char *)s->req.buf + s->done;
    uint64_t rest = s->req.len - s->done;
    unsigned len = rest > MA_CHUNK ? MA_CHUNK : (unsigned)rest;
    uint64_t off = s->req.offset + s->done;
    int fi = fixed_index(r, buf, len);
    if (s->req.op == MA_OP_READ) {
        if (fi >= 0) io_uring_prep_read_fixed(sqe, s->req.file, buf, len, off, fi);
        else io_uring_prep_read(sqe, s->req.file, buf, len, off);
    } else {
        if (fi >= 0) io_uring_prep_write_fixed(sqe, s->req.file, buf, len, off, fi);
        else io_uring_prep_write(sqe, s->req.file, buf, len, off);
    }
    if (fi >= 0 && s->done == 0 && s->retries == 0) r->st.fixed_ops += 1;
    sqe->flags |= IOSQE_FIXED_FILE;
    io_uring_sqe_set_data64(sqe, idx);
    s->cur = len;
    r->prepared += 1;
    return 0;
}

static int flush_sq(ma_ring_t *r)
{
    if (!r->prepared) return 0;
    int rc;
    do {
        rc = io_uring_submit(&r->ring);
    } while (rc == -EINTR);
    if (rc < 0) return rc;
    r->prepared = 0;
    r->st.enter_calls += 1;
    return 0;
}

/* Move pending requests into free slots and submit them. */
static int pump(ma_ring_t *r)
{
    while (r->nfree && r->pend_len) {
        unsigned idx = r->free_stack[--r->nfree];
        slot_t *s = &r->slots[idx];
        memset(s, 0, sizeof *s);
        s->req = r->pend[r->pend_head];
        r->pend_head = (r->pend_head + 1) % r->pend_cap;
        r->pend_len -= 1;
        int rc = prep(r, idx);
        if (rc < 0) {
            /* Put it back at the head; a later pump retries it. */
            r->pend_head = (r->pend_head + r->pend_cap - 1) % r->pend_cap;
            r->pend[r->pend_head] = s->req;
            r->pend_len += 1;
            r->free_stack[r->nfree++] = idx;
            flush_sq(r);
            return rc;
        }
    }
    return flush_sq(r);
}

static int pend_reserve(ma_ring_t *r, size_t extra)
{
    if (r->pend_len + extra <= r->pend_cap) return 0;
    size_t cap = r->pend_cap;
    while (cap < r->pend_len + extra) cap *= 2;
    ma_io_req_t *np = calloc(cap, sizeof *np);
    if (!np) return -ENOMEM;
    for (size_t i = 0; i < r->pend_len; i++) np[i] = r->pend[(r->pend_head + i) % r->pend_cap];
    free(r->pend);
    r->pend = np;
    r->pend_cap = cap;
    r->pend_head = 0;
    return 0;
}

int ma_ring_submit(ma_ring_t *r, const ma_io_req_t *reqs, unsigned n, unsigned *accepted)
{
    if (accepted) *accepted = 0;
    if (!r || (n && !reqs)) return -EINVAL;
    for (unsigned i = 0; i < n; i++) {
        const ma_io_req_t *q = &reqs[i];
        if ((q->op != MA_OP_READ && q->op != MA_OP_WRITE) || q->file < 0 ||
            (unsigned)q->file >= r->max_files || q->len == 0 || !q->buf)
            return -EINVAL;
    }
    pthread_mutex_lock(&r->sq_mu);
    int rc = pend_reserve(r, n);
    if (rc == 0) {
        for (unsigned i = 0; i < n; i++) {
            r->pend[(r->pend_head + r->pend_len) % r->pend_cap] = reqs[i];
            r->pend_len += 1;
        }
        r->st.submitted += n;
        if (accepted) *accepted = n;
        rc = pump(r);
        if (rc == -EBUSY || rc == -EAGAIN) rc = 0; /* stays pending; the reaper pumps again */
    }
    pthread_mutex_unlock(&r->sq_mu);
    return rc;
}

/* ---- completion side ---- */

/* Interpret one kernel completion for slot idx. Returns 1 and fills *out when the request is
 * finished, 0 when it was resubmitted (sq_mu held). */
static int complete_one(ma_ring_t *r, unsigned idx, int res, ma_io_cqe_t *out)
{
    slot_t *s = &r->slots[idx];
    if (r->fault) res = r->fault(r->fault_ctx, &s->req, s->done, res);
    int64_t final;
    if ((res == -EAGAIN || res == -EINTR) && s->retries < MA_MAX_RETRIES) {
        s->retries += 1;
        r->st.retries += 1;
        if (prep(r, idx) == 0) return 0;
        final = res;
    } else if (res < 0) {
        final = res;
    } else if (res == 0) {
        /* End of file on a read (short read), or a write that moved nothing. */
        final = s->req.op == MA_OP_READ ? (int64_t)s->done : -EIO;
    } else {
        s->done += (uint64_t)res;
        if (s->done < s->req.len) {
            if ((unsigned)res < s->cur) r->st.short_resubmits += 1;
            if (prep(r, idx) == 0) return 0;
            final = -EIO;
        } else {
            final = (int64_t)s->done;
        }
    }
    if (final >= 0) {
        if (s->req.op == MA_OP_READ) r->st.bytes_read += (uint64_t)final;
        else r->st.bytes_written += (uint64_t)final;
    } else {
        r->st.errors += 1;
    }
    out->user_data = s->req.user_data;
    out->res = final;
    r->st.completed += 1;
    r->free_stack[r->nfree++] = idx;
    return 1;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int ma_ring_reap(ma_ring_t *r, ma_io_cqe_t *out, unsigned cap, unsigned min_complete,
                 int timeout_ms, unsigned *n)
{
    if (!r || !n || (cap && !out)) return -EINVAL;
    *n = 0;
    if (min_complete > cap) min_complete = cap;
    pthread_mutex_lock(&r->cq_mu);
    int64_t deadline = timeout_ms >= 0 ? now_ms() + timeout_ms : -1;
    unsigned got = 0;
    int rc = 0;
    while (got < cap) {
        struct io_uring_cqe *cqe = NULL;
        rc = io_uring_peek_cqe(&r->ring, &cqe);
        if (rc == -EAGAIN || !cqe) {
            rc = 0;
            if (got >= min_complete) break;
            pthread_mutex_lock(&r->sq_mu);
            int idle = r->nfree == r->depth && r->pend_len == 0;
            if (!idle) pump(r);
            pthread_mutex_unlock(&r->sq_mu);
            if (idle) break; /* nothing in flight: waiting could only time out */
            struct __kernel_timespec ts, *tsp = NULL;
            if (deadline >= 0) {
                int64_t left = deadline - now_ms();
                if (left <= 0) break;
                ts.tv_sec = left / 1000;
                ts.tv_nsec = (left % 1000) * 1000000;
                tsp = &ts;
            }
            rc = io_uring_wait_cqe_timeout(&r->ring, &cqe, tsp);
            if (rc == -ETIME || rc == -EINTR) {
                rc = 0;
                continue;
            }
            if (rc < 0) break;
            continue;
        }
        unsigned idx = (unsigned)io_uring_cqe_get_data64(cqe);
        int res = cqe->res;
        io_uring_cqe_seen(&r->ring, cqe);
        if (idx >= r->depth) continue; /* not ours (cannot happen): never index out of range */
        pthread_mutex_lock(&r->sq_mu);
        int fin = complete_one(r, idx, res, &out[got]);
        if (fin) got += 1;
        pump(r);
        pthread_mutex_unlock(&r->sq_mu);
    }
    pthread_mutex_unlock(&r->cq_mu);
    *n = got;
    return rc;
}
#endif /* MA_NO_URING */
