"""PinnedPool / Lease behaviour: exact sizes, zero-copy views, lifetimes, bad input."""
from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch

from memascend import (ConfigError, LeaseReleasedError, PinnedPool, PoolBusyError,
                       PoolConfig, PoolExhaustedError)
from memascend.pinning import HostOnlyRegistrar
from memascend.sysinfo import phys_bytes


@pytest.mark.parametrize("nbytes,expect", [(1, 4096), (4096, 4096), (4097, 8192),
                                           (300_000, 303_104), ((5 << 20) + 3, (5 << 20) + 4096)])
def test_lease_is_exact_rounded_to_alignment(make_pool, nbytes, expect):
    pool = make_pool(lock="off")
    with pool.lease(nbytes) as lease:
        assert lease.nbytes == nbytes
        assert lease.size == expect
        assert lease.address % 4096 == 0
        st = pool.stats()
        assert st.requested == nbytes
        assert st.in_use == expect


@pytest.mark.parametrize("alignment", [512, 65536])
def test_other_alignments(make_pool, alignment):
    pool = make_pool(lock="off", alignment=alignment, large_threshold=1 << 20)
    leases = [pool.lease(n) for n in (1, 1000, alignment + 1, 3 << 20)]
    for lease in leases:
        assert lease.address % alignment == 0
        assert lease.size % alignment == 0 and lease.size - lease.nbytes < alignment
    for lease in leases:
        lease.release()


def test_tensor_view_is_zero_copy(make_pool):
    pool = make_pool()
    lease = pool.lease(4 * 1000)
    t = lease.as_tensor(torch.float32, (10, 100))
    assert t.data_ptr() == lease.address
    t.fill_(2.5)
    arr = lease.as_numpy(np.float32)
    assert arr.shape == (1000,)
    assert arr.ctypes.data == lease.address
    assert float(arr.sum()) == 2500.0
    bf = lease.as_tensor(torch.bfloat16, (8,), offset=16)
    assert bf.data_ptr() == lease.address + 16
    del t, arr, bf
    lease.release()


def test_view_bounds_and_offsets(make_pool):
    pool = make_pool()
    with pool.lease(100) as lease:
        assert lease.as_tensor(torch.uint8, (4096,)).numel() == 4096  # padding is usable
        with pytest.raises(ValueError, match="does not fit"):
            lease.as_tensor(torch.uint8, (4097,))
        with pytest.raises(ValueError, match="multiple of the element size"):
            lease.as_tensor(torch.float32, (2,), offset=2)
        with pytest.raises(ValueError, match="negative"):
            lease.as_tensor(torch.float32, (-1,))
        assert lease.as_tensor(torch.float32, (0,)).numel() == 0


@pytest.mark.parametrize("bad", [0, -1, -(1 << 40)])
def test_zero_and_negative_sizes_name_the_size(make_pool, bad):
    pool = make_pool()
    with pytest.raises(ValueError, match=str(bad)):
        pool.lease(bad)


@pytest.mark.parametrize("bad", [1.5, "4096", None])
def test_non_integer_sizes(make_pool, bad):
    with pytest.raises(ValueError, match="integer"):
        make_pool().lease(bad)


def test_absurd_size_raises_pool_exhausted(make_pool):
    pool = make_pool()
    n = phys_bytes() + 1
    with pytest.raises(PoolExhaustedError, match=str(n)) as info:
        pool.lease(n)
    assert info.value.nbytes == n and info.value.reason == "too-large"
    with pytest.raises(PoolExhaustedError):
        pool.lease(1 << 62)
    assert pool.stats().reserved == 0


def test_limit_bytes(make_pool):
    pool = make_pool(limit_bytes="8MiB")
    a = pool.lease(6 << 20)
    with pytest.raises(PoolExhaustedError, match="limit_bytes=8388608") as info:
        pool.lease(6 << 20)
    assert info.value.reason == "limit"
    a.release()
    pool.lease(6 << 20).release()


def test_double_release_and_use_after_release(make_pool):
    pool = make_pool()
    lease = pool.lease(8192)
    lease.release()
    assert lease.released
    with pytest.raises(LeaseReleasedError, match="double release"):
        lease.release()
    with pytest.raises(LeaseReleasedError):
        lease.as_tensor(torch.uint8)
    with pytest.raises(LeaseReleasedError):
        lease.memoryview()
    assert pool.stats().leases == 0


def test_release_with_live_view_is_deferred(make_pool):
    pool = make_pool()
    lease = pool.lease(1 << 20)
    view = lease.as_tensor(torch.int32)[10:20]  # a derived view keeps the storage alive
    view.fill_(7)
    lease.release()
    st = pool.stats()
    assert st.deferred_releases == 1 and st.leases == 1  # memory still backs the view
    assert int(view.sum()) == 70
    del view
    st = pool.stats()
    assert st.deferred_releases == 0 and st.leases == 0 and st.reserved == 0


def test_dropped_lease_is_returned(make_pool):
    pool = make_pool()
    pool.lease(12345)
    gc.collect()
    assert pool.stats().leases == 0


def test_close_with_live_leases(make_pool):
    pool = PinnedPool()
    lease = pool.lease(4096)
    with pytest.raises(PoolBusyError, match="1 leases"):
        pool.close()
    lease.release()
    pool.close()
    pool.close()  # idempotent
    with pytest.raises(PoolBusyError):
        pool.lease(1)


def test_default_retain_keeps_one_small_arena(make_pool):
    pool = make_pool(lock="off")
    pool.lease(100).release()
    pool.lease(100).release()
    st = pool.stats()
    assert st.arenas_mapped_total == 1 and st.retained == 256 << 10
    with pool.lease(1 << 20):
        pass
    assert pool.stats().reserved == 256 << 10  # exact arenas are never retained
    pool.trim()
    assert pool.stats().reserved == 0


def test_retain_and_trim(make_pool):
    pool = make_pool(lock="off", retain_bytes="1MiB")
    a = pool.lease(8192)
    a.release()
    st = pool.stats()
    assert st.retained == st.reserved == 256 << 10
    b = pool.lease(8192)
    assert pool.stats().arenas_mapped_total == 1  # reused, not re-mapped
    b.release()
    pool.trim()
    assert pool.stats().reserved == 0


def test_config_validation_and_env(monkeypatch):
    with pytest.raises(ConfigError, match="lock"):
        PoolConfig(lock="sometimes")
    with pytest.raises(ConfigError, match="alignment"):
        PoolConfig(alignment=3000)
    with pytest.raises(ConfigError, match="large_threshold"):
        PoolConfig(arena_bytes="1MiB", large_threshold="2MiB")
    with pytest.raises(ConfigError, match="lokc"):
        PinnedPool(lokc="off")
    assert PoolConfig(arena_bytes="2MiB").arena_bytes == 2 << 20
    monkeypatch.setenv("MEMASCEND_POOL_LOCK", "off")
    monkeypatch.setenv("MEMASCEND_POOL_RETAIN_BYTES", "1MiB")
    cfg = PoolConfig.from_env()
    assert cfg.lock == "off" and cfg.retain_bytes == 1 << 20
    assert PoolConfig.from_env(lock="required").lock == "required"  # explicit wins
    monkeypatch.setenv("MEMASCEND_POOL_LOKC", "off")
    with pytest.raises(ConfigError, match="MEMASCEND_POOL_LOKC"):
        PoolConfig.from_env()


def test_registrar_sees_every_arena():
    reg = HostOnlyRegistrar()
    with PinnedPool(registrar=reg) as pool:
        leases = [pool.lease(n) for n in (4096, 8192, 1 << 20, 3 << 20)]
        arenas = {base: size for base, size, _l, _s in pool.arenas()}
        assert reg.ranges == arenas and len(arenas) == 3
        assert pool.stats().registered_arenas == 3
        for lease in leases:
            lease.release()
        pool.trim()
        assert reg.ranges == {}
    assert reg.registered_total == 3


class _FailingRegistrar(HostOnlyRegistrar):
    name = "failing"

    def register(self, base, size):
        raise OSError(5, "device says no")


def test_registration_failure_required_vs_auto():
    with PinnedPool(lock="required", registrar=_FailingRegistrar()) as pool:
        with pytest.raises(PoolExhaustedError, match="device says no") as info:
            pool.lease(4096)
        assert info.value.reason == "register"
        assert pool.stats().reserved == 0
    with PinnedPool(lock="auto", registrar=_FailingRegistrar()) as pool:
        with pool.lease(4096) as lease:
            lease.as_tensor(torch.uint8).fill_(1)
            assert pool.stats().register_failures == 1


def test_threads_share_a_pool(make_pool):
    pool = make_pool(lock="off")
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(300):
                n = int(rng.integers(1, 600_000))
                with pool.lease(n) as lease:
                    t = lease.as_tensor(torch.uint8, (n,))
                    t.fill_(seed)
                    if int(t.min()) != seed or int(t.max()) != seed:
                        raise AssertionError("lease shared between threads")
                    del t
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    pool.trim()
    st = pool.stats()
    assert st.leases == 0 and st.reserved == 0 and st.leases_total == 1200
