"""cffi build script for the private native binding ``memascend._native._lib``.

API mode: the C sources in ``native/`` are compiled into one extension module by the package
build (``setup.py`` names this file in ``cffi_modules``). The cdef below mirrors
``native/ma_pool.h``; keep the two in step. The C core knows nothing of Python: the only
Python-facing pieces are the two ``extern "Python"`` hooks through which the pool tells the
Python layer that an arena was mapped or is about to be unmapped (CUDA host registration).
"""
from __future__ import annotations

import os

from cffi import FFI

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NATIVE = os.path.join(ROOT, "native")

CDEF = """
typedef struct ma_pool ma_pool_t;
enum ma_lock_mode { MA_LOCK_OFF = 0, MA_LOCK_AUTO = 1, MA_LOCK_REQUIRED = 2 };
enum ma_fail_reason { MA_FAIL_NONE = 0, MA_FAIL_BAD_SIZE = 1, MA_FAIL_TOO_LARGE = 2,
                      MA_FAIL_LIMIT = 3, MA_FAIL_MMAP = 4, MA_FAIL_MLOCK = 5, MA_FAIL_HOOK = 6 };
typedef struct ma_pool_config {
    size_t alignment; int lock_mode; size_t arena_bytes; size_t large_threshold;
    size_t retain_bytes; size_t limit_bytes; int populate;
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
uint64_t ma_phys_bytes(void);

extern "Python" int _ma_on_map(void *ctx, void *base, size_t size, int locked);
extern "Python" void _ma_on_unmap(void *ctx, void *base, size_t size);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "memascend._native._lib",
    '#include "ma_pool.h"',
    sources=[os.path.relpath(os.path.join(NATIVE, "pool.c"), ROOT)],
    include_dirs=[NATIVE],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
