"""TensorSwapper: round trips under a budget, backpressure without deadlock, learned
prefetching, dtype conversion without full-size temporaries, errors that name the key."""
from __future__ import annotations

import errno
import random
import time

import pytest
import torch

from memascend import PinnedPool, SwapEngine, SwapStore
from memascend.errors import ChecksumError, PoolExhaustedError, SwapIOError
from memascend.swapper import TensorSwapper

T = 30  # seconds: every wait in these tests is bounded


def tensors(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}": torch.randn(128, 512 + 128 * (i % 3), generator=g) for i in range(n)}


@pytest.fixture
def store(tmp_path):
    pool = PinnedPool()
    s = SwapStore(str(tmp_path / "swap"), pool=pool)
    yield s
    s.close()
    pool.close()


def fill(sw, ts):
    for k, t in ts.items():
        sw.swap_out(k, t).wait(T)
    assert sw.wait_idle(T)


def test_roundtrip_random_orders_under_budget(store):
    ts = tensors()
    total = sum(t.numel() * 4 for t in ts.values())
    largest = max(t.numel() * 4 for t in ts.values())
    budget = int(total * 0.35)
    assert largest < budget < total
    with TensorSwapper(store, budget_bytes=budget) as sw:
        fill(sw, ts)
        rng = random.Random(1)
        for _ in range(4):
            keys = list(ts)
            rng.shuffle(keys)
            sw.prefetch(keys[:3])
            for k in keys:
                v = sw.swap_in(k).wait(T)
                assert torch.equal(v, ts[k])
                sw.release(k)
            assert sw.stats().pinned_peak <= budget
        # update in place through the swapper's own view, then read back after eviction
        v = sw.swap_in("layer3").wait(T)
        v.mul_(2)
        sw.swap_out("layer3", v).wait(T)
        sw.release("layer3")
        for k in ts:  # cycle everything through to evict layer3
            sw.swap_in(k).wait(T)
            sw.release(k)
        assert torch.equal(sw.swap_in("layer3").wait(T), ts["layer3"] * 2)
        sw.release("layer3")


def test_backpressure_never_deadlocks(store):
    ts = tensors(12, seed=2)
    largest = max(t.numel() * 4 for t in ts.values())
    with TensorSwapper(store, budget_bytes=2 * largest + 4096) as sw:
        fill(sw, ts)
        rng = random.Random(3)
        held = None
        for _ in range(60):
            k = rng.choice(list(ts))
            sw.prefetch(rng.sample(list(ts), 4))  # prefetch more than fits: must not block
            if held == k:
                continue
            v = sw.swap_in(k).wait(T)
            assert torch.equal(v, ts[k])
            if held is not None:
                sw.release(held)
            held = k  # keep one tensor in use while the next one comes in
        sw.release(held)
        st = sw.stats()
        assert st.pinned_peak <= 2 * largest + 4096


def test_stats_agree_with_pool(store):
    ts = tensors(6)
    with TensorSwapper(store, budget_bytes=sum(t.numel() * 4 for t in ts.values())) as sw:
        fill(sw, ts)
        for k in ts:
            sw.swap_in(k).wait(T)
        assert sw.wait_idle(T)
        assert store.pool.stats().in_use == sw.stats().pinned_bytes
        for k in ts:
            sw.release(k)
        st = sw.stats()
        assert st.bytes_written == sum(t.numel() * 4 for t in ts.values())
    assert store.pool.stats().in_use == 0  # close gives every buffer back


def test_second_pass_prefetch_hit_rate(store):
    ts = {f"w{i}": torch.randn(256, 1024) for i in range(16)}  # 1 MiB each
    with TensorSwapper(store, budget_bytes=6 << 20 | 4096) as sw:
        fill(sw, ts)
        order = list(ts)
        rates = []
        for _ in range(3):
            s0 = sw.stats()
            for k in order:
                v = sw.swap_in(k).wait(T)
                time.sleep(0.004)  # compute
                assert torch.equal(v, ts[k])
                sw.release(k)
            sw.mark_pass()
            s1 = sw.stats()
            rates.append(((s1.hits + s1.reuse_hits) - (s0.hits + s0.reuse_hits)) / len(order))
        assert rates[0] == 0.0  # learning pass
        assert rates[2] > 0.9, rates
        st = sw.stats()
        assert not st.plan_learning and st.plan_length == 16
        assert st.pinned_peak <= (6 << 20) + 4096


def test_prefetch_never_evicts_an_unused_prefetch(store):
    """Prefetching more than fits reads each key once: a prefetch waits for budget instead
    of evicting an earlier prefetch of this pass (which would then be read twice)."""
    ts = {f"w{i}": torch.randn(256, 1024) for i in range(8)}  # 1 MiB each
    with TensorSwapper(store, budget_bytes=3 << 20, plan_prefetch=False) as sw:
        fill(sw, ts)
        sw.drop_resident()
        for _ in range(2):
            s0 = sw.stats()
            sw.prefetch(list(ts))  # 8 keys into a 3-key budget
            for k in ts:
                v = sw.swap_in(k).wait(T)
                time.sleep(0.002)
                assert torch.equal(v, ts[k])
                sw.release(k)
            sw.mark_pass()
            s1 = sw.stats()
            assert s1.bytes_read - s0.bytes_read <= 8 << 20, (s1.bytes_read - s0.bytes_read)
            assert s1.wasted_prefetches == s0.wasted_prefetches
            sw.drop_resident()


def test_plan_prefetch_off_reads_only_what_is_asked(store):
    ts = {f"w{i}": torch.randn(256, 1024) for i in range(6)}  # 1 MiB each
    for plan, extra in ((True, True), (False, False)):
        with TensorSwapper(store, budget_bytes=4 << 20, plan_prefetch=plan) as sw:
            fill(sw, ts)
            for _ in range(2):  # learn the order
                for k in ts:
                    sw.swap_in(k).wait(T)
                    sw.release(k)
                sw.mark_pass()
            sw.drop_resident()
            before = sw.stats().reads
            sw.swap_in("w0").wait(T)  # the plan would now read w1, w2 ... ahead
            sw.release("w0")
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and sw.stats().reads == before + 1:
                time.sleep(0.01)
            assert (sw.stats().reads > before + 1) == extra, (plan, sw.stats().reads - before)


def test_too_large_and_held_budget_errors(store):
    with TensorSwapper(store, budget_bytes="1MiB") as sw:
        with pytest.raises(PoolExhaustedError, match="'huge'.*budget of 1048576"):
            sw.swap_out("huge", torch.ones(300_000))
        sw.swap_out("a", torch.ones(150_000)).wait(T)  # 600 KB
        sw.swap_out("b", torch.ones(150_000)).wait(T)
        sw.swap_in("a").wait(T)
        with pytest.raises(PoolExhaustedError, match="'a'"):
            sw.swap_in("b")  # 'a' in use holds the budget: waiting could never end
        sw.release("a")
        assert torch.equal(sw.swap_in("b").wait(T), torch.ones(150_000))
        sw.release("b")
        with pytest.raises(ValueError, match="not swapped in"):
            sw.release("b")


def test_served_bf16_stored_fp32_streams_in_chunks(store):
    src = torch.randn(1000, 333)
    store.write("w", src).wait(T)  # stored fp32 by someone else (e.g. the optimizer tier)
    served = 1000 * 333 * 2
    chunk = 64 << 10
    budget = -(-served // 4096) * 4096 + chunk
    with TensorSwapper(store, budget_bytes=budget, chunk_bytes=chunk) as sw:
        sw.register("w", (1000, 333), torch.bfloat16, stored_dtype=torch.float32)
        v = sw.swap_in("w").wait(T)
        assert v.dtype == torch.bfloat16 and torch.equal(v, src.to(torch.bfloat16))
        assert sw.stats().pinned_peak <= budget  # no full-size fp32 temporary was pinned
        sw.release("w")
    with TensorSwapper(store, budget_bytes=8 << 20, chunk_bytes=4096) as sw:
        store.write("small", torch.randn(3000)).wait(T)  # 3 pages of fp32 through 1 page
        sw.register("small", (3000,), torch.bfloat16, stored_dtype=torch.float32)
        assert torch.equal(sw.swap_in("small").wait(T),
                           store.read_tensor("small").wait(T).to(torch.bfloat16))
        sw.release("small")
        sw.register("w2", (10, 10), torch.bfloat16, stored_dtype=torch.float32)
        x = torch.randn(10, 10).to(torch.bfloat16)
        sw.swap_out("w2", x).wait(T)
        assert store.info("w2").dtype == "float32"
        assert torch.equal(store.read_tensor("w2").wait(T), x.float())


def test_converted_read_checks_crc(store, tmp_path):
    store.write("w", torch.randn(50_000)).wait(T)
    off = store.info("w").offset
    with open(store.path, "r+b") as f:
        f.seek(off + 5000)
        f.write(b"\x00\x01\x02")
    with TensorSwapper(store, budget_bytes=1 << 20, chunk_bytes=16384) as sw:
        sw.register("w", (50_000,), torch.bfloat16, stored_dtype=torch.float32)
        with pytest.raises(ChecksumError, match="'w'"):
            sw.swap_in("w").wait(T)


def test_read_error_surfaces_and_swapper_recovers(tmp_path):
    fail = {"on": False}

    def fault(op, path, offset, nbytes, done, res):
        return -errno.EIO if fail["on"] and op == "read" else res

    pool = PinnedPool()
    with SwapEngine(fault=fault) as eng, \
            SwapStore(str(tmp_path / "s"), engine=eng, pool=pool) as store:
        with TensorSwapper(store, budget_bytes=4 << 20) as sw:
            sw.swap_out("k", torch.ones(1000)).wait(T)
        with TensorSwapper(store, budget_bytes=4 << 20) as sw:  # nothing resident: real reads
            fail["on"] = True
            with pytest.raises(SwapIOError) as info:
                sw.swap_in("k").wait(T)
            assert info.value.key == "k" and info.value.errno == errno.EIO
            fail["on"] = False
            assert torch.equal(sw.swap_in("k").wait(T), torch.ones(1000))
            sw.release("k")
            assert sw.stats().pinned_bytes <= 4 << 20


def test_demand_load_survives_completion_race(store):
    """Regression: a read that completed before swap_in attached its callback ran the
    completion inline; the prefetches it started could evict the just-loaded, not yet claimed
    buffer, and swap_in returned a view on a recycled buffer. Many shuffled passes under a
    tight budget make that interleaving likely."""
    ts = tensors(10, seed=5)
    budget = int(sum(t.numel() * 4 for t in ts.values()) * 0.35)
    with TensorSwapper(store, budget_bytes=budget) as sw:
        fill(sw, ts)
        rng = random.Random(7)
        for _ in range(25):
            keys = list(ts)
            rng.shuffle(keys)
            sw.prefetch(keys[:3])
            for k in keys:
                v = sw.swap_in(k).wait(T)
                assert torch.equal(v, ts[k]), k
                del v  # no view may outlive its release
                sw.release(k)
        assert sw.wait_idle(T)
        assert store.pool.stats().in_use == sw.stats().pinned_bytes


EXIT_CHILD = r"""
import sys, torch
from memascend import PinnedPool, SwapStore
from memascend.swapper import TensorSwapper
store = SwapStore(sys.argv[1], pool=PinnedPool(), grow_bytes="4MiB")
sw = TensorSwapper(store, budget_bytes=3 << 20)
for i in range(8):
    sw.swap_out(f"k{i}", torch.full((200_000,), float(i)))
for i in range(8):
    sw.prefetch([f"k{(i + 1) % 8}", f"k{(i + 2) % 8}"])
    sw.swap_in(f"k{i}").wait(30)
    sw.release(f"k{i}")
sw.prefetch([f"k{i}" for i in range(8)])
# exit with I/O in flight and nothing closed
"""


def test_exit_with_io_in_flight_is_clean(tmp_path):
    """Regression: leases were unmapped by atexit finalizers while reads still completed into
    them (segfault), and completion threads ran torch code during interpreter teardown."""
    import subprocess
    import sys

    for i in range(4):
        proc = subprocess.run([sys.executable, "-c", EXIT_CHILD, str(tmp_path / f"s{i}")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_write_refused_on_full_disk_leaves_swapper_usable(small_ext4):
    pool = PinnedPool()
    store = SwapStore(small_ext4 + "/swap", pool=pool, grow_bytes=1 << 20)
    sw = TensorSwapper(store, budget_bytes=96 << 20)
    try:
        with pytest.raises(SwapIOError) as info:
            sw.swap_out("big", torch.ones(64 << 18))  # 64 MiB on a 32 MiB filesystem
        assert info.value.errno == errno.ENOSPC
        del info  # its traceback's frames view the staging buffer
        assert sw.wait_idle(T)  # nothing counted as in flight
        sw.swap_out("small", torch.ones(1024)).wait(T)
        assert torch.equal(sw.swap_in("small").wait(T), torch.ones(1024))
        sw.release("small")
        assert sw.stats().pinned_bytes <= 96 << 20
    finally:
        sw.close()
        store.close()
        pool.close()


def test_forget_drops_a_stale_resident_copy(store):
    """A key rewritten in the store behind the swapper's back: after forget() the swapper
    reads the new bytes instead of serving its resident (stale) copy."""
    with TensorSwapper(store, budget_bytes=8 << 20) as sw:
        sw.swap_out("k", torch.full((1024,), 1.0), release=False).wait()
        assert float(sw.swap_in("k").wait()[0]) == 1.0
        store.write("k", torch.full((1024,), 2.0)).wait()
        with pytest.raises(ValueError, match="still swapped in"):
            sw.forget("k")
        sw.release("k")
        assert float(sw.swap_in("k").wait()[0]) == 1.0  # still the resident copy
        sw.release("k")
        sw.forget("k")
        sw.forget("never-seen")  # nothing resident: a no-op
        assert float(sw.swap_in("k").wait()[0]) == 2.0
        sw.release("k")


def test_limit_budget_lowers_what_stays_pinned(store):
    """Lowering the budget after tensors are resident: the next requests evict down to it,
    and the tensors read back unchanged."""
    from memascend.errors import ConfigError

    ts = tensors(6)
    total = sum(t.numel() * 4 for t in ts.values())
    with TensorSwapper(store, budget_bytes=total) as sw:
        fill(sw, ts)
        for k in ts:
            sw.swap_in(k).wait(T)
            sw.release(k)
        assert sw.stats().pinned_bytes > total // 2
        low = max(t.numel() * 4 for t in ts.values()) * 2
        sw.limit_budget(low)
        assert sw.stats().budget_bytes == low
        for k in ts:
            assert torch.equal(sw.swap_in(k).wait(T), ts[k])
            sw.release(k)
            assert sw.stats().pinned_bytes <= low
        with pytest.raises(ConfigError):
            sw.limit_budget(0)
