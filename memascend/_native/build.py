"""cffi build script for the private native binding ``memascend._native._lib``.

API mode: the C sources in ``native/`` are compiled into one extension module by the package
build (``setup.py`` names this file in ``cffi_modules``). The cdef below mirrors
``native/ma_pool.h``, ``ma_ring.h`` and ``ma_crc.h``; keep them in step. Without liburing's
headers the ring is compiled as stubs returning -ENOSYS (``MA_NO_URING``) and the engine uses
its portable backend; set ``MEMASCEND_NO_URING=1`` to force that build. The C core knows nothing of Python: the only
Python-facing pieces are the two ``extern "Python"`` hooks through which the pool tells the
Python layer that an arena was mapped or is about to be unmapped (CUDA host registration).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from cffi import FFI

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NATIVE = os.path.join(ROOT, "native")

CDEF = """
typedef struct ma_pool ma_pool_t;
enum ma_lock_mode { MA_LOCK_OFF = 0, MA_LOCK_AUTO = 1, MA_LOCK_REQUIRED = 2 };
enum ma_huge_mode { MA_HUGE_OFF = 0, MA_HUGE_AUTO = 1 };
enum ma_fail_reason { MA_FAIL_NONE = 0, MA_FAIL_BAD_SIZE = 1, MA_FAIL_TOO_LARGE = 2,
                      MA_FAIL_LIMIT = 3, MA_FAIL_MMAP = 4, MA_FAIL_MLOCK = 5, MA_FAIL_HOOK = 6 };
typedef struct ma_pool_config {
    size_t alignment; int lock_mode; size_t arena_bytes; size_t large_threshold;
    size_t retain_bytes; size_t limit_bytes; int populate; int huge_pages;
} ma_pool_config_t;
typedef struct ma_lease {
    void *addr; size_t size; size_t requested; int locked; int fail_reason; int fail_errno;
} ma_lease_t;
typedef struct ma_pool_stats {
    uint64_t requested, requested_peak; uint64_t in_use, in_use_peak;
    uint64_t reserved, reserved_peak; uint64_t locked, locked_peak;
    uint64_t leases, leases_peak; uint64_t arenas, arenas_peak; uint64_t retained;
    uint64_t lock_failures; uint64_t leases_total; uint64_t arenas_mapped_total;
    uint64_t arenas_unmapped_total;
    uint64_t huge_advised, huge_advised_peak; uint64_t huge_advise_failures;
} ma_pool_stats_t;
typedef struct ma_arena_info { void *base; size_t size; int locked; int shared; } ma_arena_info_t;
typedef int (*ma_map_hook_fn)(void *ctx, void *base, size_t size, int locked);
typedef void (*ma_unmap_hook_fn)(void *ctx, void *base, size_t size);
void ma_pool_config_default(ma_pool_config_t *cfg);
int ma_pool_create(const ma_pool_config_t *cfg, ma_pool_t **out);
int ma_pool_destroy(ma_pool_t *pool);
int ma_pool_set_hooks(ma_pool_t *pool, ma_map_hook_fn on_map, ma_unmap_hook_fn on_unmap, void *ctx);
int ma_pool_lease(ma_pool_t *pool, size_t nbytes, ma_lease_t *out);
int ma_pool_release(ma_pool_t *pool, void *addr);
int ma_pool_stats(ma_pool_t *pool, ma_pool_stats_t *out);
int ma_pool_trim(ma_pool_t *pool);
int ma_pool_arenas(ma_pool_t *pool, ma_arena_info_t *out, size_t cap, size_t *count);
int ma_pool_huge_page_size(ma_pool_t *pool, size_t *out);
uint64_t ma_phys_bytes(void);
static const int MA_BUILT_WITH_URING;

enum ma_io_op { MA_OP_READ = 0, MA_OP_WRITE = 1 };
typedef struct ma_ring ma_ring_t;
typedef struct ma_io_req { int op; int file; void *buf; uint64_t len; uint64_t offset;
                           uint64_t user_data; } ma_io_req_t;
typedef struct ma_io_cqe { uint64_t user_data; int64_t res; } ma_io_cqe_t;
typedef struct ma_ring_stats {
    uint64_t submitted; uint64_t completed; uint64_t errors; uint64_t short_resubmits;
    uint64_t retries; uint64_t enter_calls; uint64_t fixed_ops; uint64_t bytes_read, bytes_written;
    uint64_t inflight, pending;
} ma_ring_stats_t;
typedef int (*ma_fault_fn)(void *ctx, const ma_io_req_t *req, uint64_t done, int res);
int ma_ring_create(unsigned depth, unsigned max_files, ma_ring_t **out);
int ma_ring_destroy(ma_ring_t *ring);
int ma_ring_set_file(ma_ring_t *ring, unsigned slot, int fd);
int ma_ring_register_buffer(ma_ring_t *ring, unsigned slot, void *base, size_t len);
unsigned ma_ring_buffer_slots(const ma_ring_t *ring);
int ma_ring_submit(ma_ring_t *ring, const ma_io_req_t *reqs, unsigned n, unsigned *accepted);
int ma_ring_reap(ma_ring_t *ring, ma_io_cqe_t *out, unsigned cap, unsigned min_complete,
                 int timeout_ms, unsigned *n);
int ma_ring_set_fault(ma_ring_t *ring, ma_fault_fn fn, void *ctx);
int ma_ring_stats(ma_ring_t *ring, ma_ring_stats_t *out);
int ma_ring_probe(void);

int ma_crc32c(uint32_t *crc, const void *buf, size_t len);
int ma_crc32c_hw(void);
int ma_crc32c_sw(uint32_t *crc, const void *buf, size_t len);

extern "Python" int _ma_fault(void *ctx, const ma_io_req_t *req, uint64_t done, int res);
extern "Python" int _ma_on_map(void *ctx, void *base, size_t size, int locked);
extern "Python" void _ma_on_unmap(void *ctx, void *base, size_t size);
"""



def have_liburing() -> bool:
    """Whether a program using liburing compiles and links here."""
    if os.environ.get("MEMASCEND_NO_URING") == "1":
        return False
    cc = os.environ.get("CC", "cc").split()[0]
    if not shutil.which(cc):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write("#include <liburing.h>\nint main(void){struct io_uring r;"
                    "return io_uring_queue_init(2,&r,0)==-1;}\n")
        rc = subprocess.run([cc, src, "-o", os.path.join(tmp, "probe"), "-luring"],
                            capture_output=True)
        return rc.returncode == 0


HAVE_URING = have_liburing()
SOURCES = [os.path.relpath(os.path.join(NATIVE, name), ROOT) for name in ("pool.c", "ring.c", "crc.c")]

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "memascend._native._lib",
    '#include "ma_pool.h"\n#include "ma_ring.h"\n#include "ma_crc.h"\n'
    "int ma_crc32c_sw(uint32_t *crc, const void *buf, size_t len);\n"
    f"static const int MA_BUILT_WITH_URING = {int(HAVE_URING)};\n",
    sources=SOURCES,
    include_dirs=[NATIVE],
    define_macros=[] if HAVE_URING else [("MA_NO_URING", "1")],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra"],
    libraries=["pthread"] + (["uring"] if HAVE_URING else []),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
