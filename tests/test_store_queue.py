"""A non-durable store waits for overwrites in flight instead of growing its area.

When a write finds no free extent but overwrites in flight will release their old versions,
the store queues it (``write_window``) and starts it from its helper thread once room frees
up. These tests hold writes in flight with a slow fault injector and check that the area does
not grow, that queued writes land in order with the right bytes, survive a reopen, and that a
queued write that finds no room after all fails its own handle with ENOSPC, leaving the key
as it was.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from memascend.engine import SwapEngine
from memascend.errors import SwapIOError
from memascend.store import SwapStore

MIB = 1 << 20


@pytest.fixture
def pool(make_pool):
    return make_pool()


def slow_writes(seconds):
    def fault(op, path, offset, nbytes, done, res):
        if op == "write":
            time.sleep(seconds)
        return res
    return fault


def gated_writes():
    """A fault injector that holds every write while its event is clear."""
    gate = threading.Event()

    def fault(op, path, offset, nbytes, done, res):
        if op == "write" and not gate.is_set():
            gate.wait(30)
        return res
    return gate, fault


def rewrite_rounds(store, pool, keys, rounds):
    """Overwrite every key each round, all writes of a round issued at once, from pinned
    leases (written directly, not through the store's two bounce threads)."""
    for rnd in range(1, rounds + 1):
        leases, hs = [], []
        for i, k in enumerate(keys):
            lease = pool.lease(MIB)
            lease.as_tensor(torch.float32, (MIB // 4,)).fill_(float(rnd * 100 + i))
            leases.append(lease)
            hs.append(store.write(k, lease, dtype="float32", shape=(MIB // 4,)))
        for h in hs:
            assert h.wait(60) == MIB
        for lease in leases:
            lease.release()


@pytest.mark.parametrize("window,grows", [(0, False), (1 << 40, True)])
def test_overwrites_in_flight_wait_for_room_instead_of_growing(tmp_path, pool, window, grows):
    keys = [f"k{i}" for i in range(16)]
    with SwapEngine(backend="threads", threads=4, fault=slow_writes(0.01)) as eng, \
            SwapStore(str(tmp_path / "s"), engine=eng, pool=pool, durable=False,
                      write_window=window) as store:
        for k in keys:
            store.write(k, torch.zeros(MIB // 4)).wait(60)
        area0 = store.stats().area_bytes
        rewrite_rounds(store, pool, keys, 4)
        s = store.stats()
        for i, k in enumerate(keys):
            assert torch.equal(store.read_tensor(k).wait(60),
                               torch.full((MIB // 4,), float(400 + i)))
    assert s.stored_bytes == 16 * MIB
    # The first overwrite finds nothing in flight to wait for: the area grows once, by that
    # tensor and at most 1 MiB ahead. Without the queue each overwrite in flight needs room.
    if grows:
        assert s.writes_waited == 0 and s.area_bytes >= area0 + 8 * MIB
    else:
        assert s.writes_waited > 0 and s.area_bytes <= area0 + 2 * MIB


def test_queued_writes_of_one_key_land_in_order_and_reopen(tmp_path, pool):
    path = str(tmp_path / "s")
    with SwapEngine(backend="threads", threads=4, fault=slow_writes(0.02)) as eng, \
            SwapStore(path, engine=eng, pool=pool, durable=False, write_window=0) as store:
        for i in range(4):
            store.write(f"o{i}", torch.zeros(MIB // 4)).wait(60)
        hs = [store.write(f"o{i}", torch.ones(MIB // 4)) for i in range(4)]  # in flight
        hs += [store.write("o0", torch.full((MIB // 4,), float(v))) for v in range(2, 9)]
        for h in hs:
            h.wait(60)
        assert store.stats().writes_waited > 0
        assert torch.equal(store.read_tensor("o0").wait(60), torch.full((MIB // 4,), 8.0))
    with SwapStore(path, pool=pool, durable=False) as store:
        assert torch.equal(store.read_tensor("o0").wait(60), torch.full((MIB // 4,), 8.0))
        assert torch.equal(store.read_tensor("o3").wait(60), torch.ones(MIB // 4))


def test_queued_write_without_room_fails_its_own_handle(tmp_path, pool):
    gate, fault = gated_writes()

    with SwapEngine(backend="threads", threads=2, fault=fault) as eng, \
            SwapStore(str(tmp_path / "s"), engine=eng, pool=pool, durable=False,
                      write_window=0, capacity=4 * MIB, grow_bytes=MIB) as store:
        gate.set()
        for k in ("a", "b", "c"):
            store.write(k, torch.zeros(MIB // 4)).wait(60)
        assert store.stats().free_bytes == 0  # grown step by step to 3 MiB
        gate.clear()
        first = store.write("a", torch.ones(MIB // 4))  # grows to 4 MiB, held in flight
        d = store.write("d", torch.full((MIB // 4,), 2.0))  # waits for a's old extent
        e = store.write("e", torch.full((MIB // 4,), 3.0))  # waits behind d; then no room
        assert store.stats().writes_waited == 2
        gate.set()
        assert first.wait(60) == MIB
        assert d.wait(60) == MIB
        with pytest.raises(SwapIOError) as err:
            e.wait(60)
        assert err.value.key == "e" and "capacity" in str(err.value)
        assert "e" not in store
        assert torch.equal(store.read_tensor("a").wait(60), torch.ones(MIB // 4))
        assert torch.equal(store.read_tensor("d").wait(60), torch.full((MIB // 4,), 2.0))
        assert store.stats().area_bytes <= 4 * MIB


def test_a_queued_write_that_fails_keeps_the_old_version_and_the_queue_moves_on(tmp_path, pool):
    gate = threading.Event()
    bad: list[int] = []

    def fault(op, path, offset, nbytes, done, res):
        if op == "write" and not gate.is_set():
            gate.wait(30)
        if op == "write" and bad and offset == bad[0]:
            bad.clear()
            return -5  # EIO, once
        return res

    with SwapEngine(backend="threads", threads=2, fault=fault) as eng, \
            SwapStore(str(tmp_path / "s"), engine=eng, pool=pool, durable=False,
                      write_window=0, grow_bytes=MIB) as store:
        gate.set()
        for k in ("a", "b"):
            store.write(k, torch.zeros(MIB // 4)).wait(60)
        gate.clear()
        first = store.write("a", torch.ones(MIB // 4))  # grows, held in flight
        bad.append(store.info("a").offset)  # b's write will land in a's old extent: EIO
        second = store.write("b", torch.full((MIB // 4,), 2.0))  # waits for a's extent
        third = store.write("a", torch.full((MIB // 4,), 3.0))  # waits behind it
        assert store.stats().writes_waited == 2
        gate.set()
        assert first.wait(60) == MIB
        with pytest.raises(SwapIOError):
            second.wait(60)
        assert third.wait(60) == MIB
        assert torch.equal(store.read_tensor("b").wait(60), torch.zeros(MIB // 4))
        assert torch.equal(store.read_tensor("a").wait(60), torch.full((MIB // 4,), 3.0))


def test_a_swapper_forgets_a_resident_copy_whose_write_failed(tmp_path, pool):
    """A queued write that finds no room fails through its handle: the swapper must not keep
    serving the unwritten bytes from memory (the store holds the old version)."""
    from memascend.swapper import TensorSwapper

    gate, fault = gated_writes()

    with SwapEngine(backend="threads", threads=2, fault=fault) as eng, \
            SwapStore(str(tmp_path / "s"), engine=eng, pool=pool, durable=False,
                      write_window=0, capacity=4 * MIB, grow_bytes=MIB) as store, \
            TensorSwapper(store, pool=pool, budget_bytes=16 * MIB) as sw:
        gate.set()
        for k in ("a", "b", "c"):
            sw.swap_out(k, torch.zeros(MIB // 4)).wait(60)
        gate.clear()
        first = sw.swap_out("a", torch.ones(MIB // 4), release=False)  # grows to 4 MiB
        d = sw.swap_out("d", torch.full((MIB // 4,), 2.0), release=False)  # waits for room
        e = sw.swap_out("b", torch.full((MIB // 4,), 3.0), release=False)  # then none left
        gate.set()
        first.wait(60)
        d.wait(60)
        with pytest.raises(SwapIOError):
            e.wait(60)
        sw.wait_idle()
        assert torch.equal(sw.swap_in("b").wait(60), torch.zeros(MIB // 4))
        sw.release("b")
