/* ma_ring.h — batched, checked io_uring I/O for the swap engine.
 *
 * A ring takes batches of read/write requests (registered file index, buffer, length, offset,
 * user_data), submits as many as its depth allows with one io_uring_enter, queues the rest,
 * and reports one completion per request with that request's own result: the total bytes
 * moved, or -errno. Nothing is silent: a short transfer is resubmitted for its remainder,
 * -EAGAIN and -EINTR are retried a bounded number of times, and any other error, or a read
 * that hits end of file, ends the request with its result (a short read reports the bytes it
 * did get, so the caller can tell it apart from success).
 *
 * Files are used through a registered (sparse) file table. Buffers inside ranges registered
 * with ma_ring_register_buffer use READ_FIXED/WRITE_FIXED. A fault hook lets tests turn
 * completions into short transfers or errors.
 *
 * Threading: any number of threads may submit; one thread at a time reaps. Every function
 * returns 0 or -errno. Built without liburing (MA_NO_URING) every call returns -ENOSYS.
 * Nothing here knows Python or torch.
 */
#ifndef MA_RING_H
#define MA_RING_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ma_ring ma_ring_t;

enum ma_io_op { MA_OP_READ = 0, MA_OP_WRITE = 1 };

typedef struct ma_io_req {
    int op;             /* enum ma_io_op */
    int file;           /* index in the ring's file table */
    void *buf;
    uint64_t len;       /* bytes, > 0 */
    uint64_t offset;    /* file offset */
    uint64_t user_data; /* returned with the completion */
} ma_io_req_t;

typedef struct ma_io_cqe {
    uint64_t user_data;
    int64_t res;        /* bytes moved (== len on success; < len: short read at EOF), or -errno */
} ma_io_cqe_t;

typedef struct ma_ring_stats {
    uint64_t submitted;      /* requests accepted */
    uint64_t completed;      /* requests completed (success or error) */
    uint64_t errors;         /* requests completed with -errno */
    uint64_t short_resubmits;/* remainders resubmitted after a short transfer */
    uint64_t retries;        /* -EAGAIN / -EINTR resubmissions */
    uint64_t enter_calls;    /* io_uring_submit calls that submitted something */
    uint64_t fixed_ops;      /* requests that used a registered buffer */
    uint64_t bytes_read, bytes_written;
    uint64_t inflight, pending;
} ma_ring_stats_t;

/* Fault hook: may rewrite a completion's result before the ring interprets it. Called with
 * the request, the bytes done so far and the kernel's result; returns the result to use. */
typedef int (*ma_fault_fn)(void *ctx, const ma_io_req_t *req, uint64_t done, int res);

/* Create a ring with `depth` requests in flight at most (1..4096) and `max_files` slots in
 * its file table. -EINVAL for bad sizes; io_uring_queue_init's error otherwise (-ENOSYS
 * without io_uring, -EPERM when it is disabled or filtered by seccomp). */
int ma_ring_create(unsigned depth, unsigned max_files, ma_ring_t **out);

/* Destroy a ring. -EBUSY while requests are in flight or pending. */
int ma_ring_destroy(ma_ring_t *ring);

/* Put fd in file slot `slot` (fd -1 clears it). -EINVAL for a bad slot. */
int ma_ring_set_file(ma_ring_t *ring, unsigned slot, int fd);

/* Register [base, base+len) as fixed buffer `slot` (len 0 clears it). Fails with the
 * kernel's error, e.g. -ENOMEM past RLIMIT_MEMLOCK; the ring then works without it. */
int ma_ring_register_buffer(ma_ring_t *ring, unsigned slot, void *base, size_t len);

/* Number of fixed-buffer slots (set at create). */
unsigned ma_ring_buffer_slots(const ma_ring_t *ring);

/* Queue n requests and submit what fits. All are checked first: -EINVAL (nothing queued) for
 * a bad op, file slot or zero length. *accepted receives n on success. */
int ma_ring_submit(ma_ring_t *ring, const ma_io_req_t *reqs, unsigned n, unsigned *accepted);

/* Collect up to cap finished requests into out. Waits until at least min_complete are
 * available or timeout_ms passes (-1: no timeout; 0: do not wait); returns at once when
 * nothing is in flight or pending. *n receives the count (possibly 0). Only one thread may
 * reap at a time. */
int ma_ring_reap(ma_ring_t *ring, ma_io_cqe_t *out, unsigned cap, unsigned min_complete,
                 int timeout_ms, unsigned *n);

/* Install a fault hook (NULL removes it). For tests. */
int ma_ring_set_fault(ma_ring_t *ring, ma_fault_fn fn, void *ctx);

int ma_ring_stats(ma_ring_t *ring, ma_ring_stats_t *out);

/* Probe whether io_uring can be set up here: 0, or the error (-ENOSYS, -EPERM, ...). */
int ma_ring_probe(void);

#ifdef __cplusplus
}
#endif
#endif
