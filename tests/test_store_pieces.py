"""Overwrites in pieces (``piece_bytes``, memascend/store_pieces.py).

A scratch store writes a large overwrite in pieces, each freeing its range of the old version
when it lands, so the area needs room for the pieces in flight rather than for the whole
tensor twice. These tests check that the area stays small where atomic overwrites grow it,
that every byte and the checksum are right afterwards, that a read issued meanwhile waits for
the whole new version, that a failed piece fails the write naming its range and leaves that
range old, that a newer write or a delete meanwhile wins without leaking extents, and that
the store still closes and reopens.
"""
from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

from memascend.engine import SwapEngine
from memascend.errors import ConfigError, SwapIOError
from memascend.store import StoreConfig, SwapStore
from memascend.store_pieces import replace_range
from test_store_queue import gated_writes

MIB = 1 << 20
N = 16 * MIB // 4  # float32 elements of the big tensor (16 MiB)


@pytest.fixture
def pool(make_pool):
    return make_pool()


def scratch(path, eng, pool, **kw):
    opts = dict(engine=eng, pool=pool, durable=False, journal=False, reset=True,
                piece_bytes=MIB, write_window=2 * MIB)
    opts.update(kw)
    return SwapStore(str(path), **opts)


@contextlib.contextmanager
def held_store(tmp_path, pool, hold=None, threads=4, **options):
    """A scratch store holding ``big`` (``ramp(0)``) whose writes from now on are held
    until the gate is set (``hold(gate)``: another fault injector built on the gate)."""
    if hold is None:
        gate, fault = gated_writes()
    else:
        gate = threading.Event()
        fault = hold(gate)
    gate.set()
    with SwapEngine(backend="threads", threads=threads, fault=fault) as eng, \
            scratch(tmp_path / "s", eng, pool, **options) as store:
        store.write("big", ramp(0)).wait(60)
        gate.clear()
        try:
            yield store, gate
        finally:
            gate.set()


def slow(op, path, offset, nbytes, done, res):
    if op == "write":
        time.sleep(0.002)
    return res


def ramp(v):
    return torch.arange(N, dtype=torch.float32) + v


def test_replace_range_moves_the_range_and_gives_back_the_old_extents():
    spans = ((0, 8192), (40960, 4096), (81920, 12288))  # a key of 24 KiB in three extents
    new, old = replace_range(spans, 4096, ((200704, 8192),))
    assert new == ((0, 4096), (200704, 8192), (81920, 12288))
    assert old == [(4096, 4096), (40960, 4096)]
    new, old = replace_range(spans, 0, ((8192, 4096),))
    assert new == ((8192, 4096), (4096, 4096), (40960, 4096), (81920, 12288))
    new2, old2 = replace_range(((0, 8192), (16384, 4096)), 4096, ((4096, 8192),))
    assert new2 == ((0, 12288),) and old2 == [(4096, 4096), (16384, 4096)]  # merged
    new, old = replace_range(spans, 12288, ((102400, 12288),))  # the tail
    assert new == ((0, 8192), (40960, 4096), (102400, 12288)) and old == [(81920, 12288)]
    assert sum(n for _o, n in new) == sum(n for _o, n in spans)


def test_piece_bytes_needs_a_scratch_store():
    with pytest.raises(ConfigError, match="journal=False"):
        StoreConfig(durable=False, piece_bytes=MIB)
    with pytest.raises(ConfigError, match="piece_bytes"):
        StoreConfig(durable=False, journal=False, piece_bytes=100)
    assert StoreConfig(durable=False, journal=False, piece_bytes="1MiB").piece_bytes == MIB


@pytest.mark.parametrize("pieces", [MIB, 0])
def test_the_area_needs_room_for_pieces_in_flight_not_for_the_tensor(tmp_path, pool, pieces):
    with SwapEngine(backend="threads", threads=4, fault=slow) as eng, \
            scratch(tmp_path / "s", eng, pool, piece_bytes=pieces, grow_bytes=MIB) as store:
        store.write("big", ramp(0)).wait(60)
        for i in range(4):
            store.write(f"small{i}", torch.full((MIB // 4,), float(i))).wait(60)
        area0 = store.stats().area_bytes
        for rnd in range(1, 4):
            src = ramp(rnd)
            store.write("big", src).wait(60)
            assert torch.equal(store.read_tensor("big").wait(60), src)  # checksum verified
        s = store.stats()
        entry = store.info("big")
    grown = s.area_bytes - area0
    if pieces:
        assert s.writes_pieced == 3 and s.writes == 8 and s.write_errors == 0
        assert entry.crc is not None and entry.shape == (N,)
        assert grown <= 5 * MIB, grown  # the window and a piece, not the 16 MiB tensor
    else:
        assert s.writes_pieced == 0 and grown >= 16 * MIB
    assert s.used_bytes == 20 * MIB  # nothing leaked
    assert s.bytes_written == 20 * MIB + 3 * 16 * MIB


def test_a_read_issued_meanwhile_waits_for_the_whole_new_version(tmp_path, pool):
    with held_store(tmp_path, pool) as (store, gate):
        h = store.write("big", ramp(7))
        dst = torch.empty(N)
        r = store.read("big", dst)
        part = torch.empty(MIB // 4)
        lease = pool.lease(MIB)
        rr = store.read_range("big", lease, 3 * MIB, MIB)
        time.sleep(0.2)
        assert not r.done() and not rr.done() and not h.done()
        gate.set()
        assert h.wait(60) == 16 * MIB and r.wait(60) == 16 * MIB and rr.wait(60) == MIB
        part.copy_(lease.as_tensor(torch.float32, (MIB // 4,)))
        lease.release()
        assert torch.equal(dst, ramp(7))
        assert torch.equal(part, ramp(7)[3 * MIB // 4:4 * MIB // 4])
        assert store.wait_idle(10)


def test_a_failed_piece_fails_the_write_naming_its_range_and_keeps_it_old(tmp_path, pool):
    fail = {"n": 0, "armed": False}

    def fault(op, path, offset, nbytes, done, res):
        if op == "write" and fail["armed"]:
            fail["n"] += 1
            if fail["n"] == 3:  # the third piece written
                return -5
        return res

    with SwapEngine(backend="threads", threads=1, fault=fault) as eng, \
            scratch(tmp_path / "s", eng, pool, write_window=0) as store:
        store.write("big", ramp(0)).wait(60)
        fail["armed"] = True
        with pytest.raises(SwapIOError, match=r"1 failed .*keep the previous version") as ei:
            store.write("big", ramp(1)).wait(60)
        assert ei.value.key == "big"
        got = store.read_tensor("big").wait(60)  # unchecked now: part old, part new
        new = (got == ramp(1)).reshape(16, -1).all(dim=1)
        old = (got == ramp(0)).reshape(16, -1).all(dim=1)
        assert int(old.sum()) == 1 and int(new.sum()) == 15 and bool((new | old).all())
        assert f"[{int(old.nonzero()) * MIB}, {(int(old.nonzero()) + 1) * MIB})" in str(ei.value)
        s = store.stats()
        assert store.info("big").crc is None
        assert s.write_errors == 1 and s.used_bytes == 16 * MIB
        fail["armed"] = False
        store.write("big", ramp(2)).wait(60)  # whole again: checksummed again
        assert store.info("big").crc is not None
        assert torch.equal(store.read_tensor("big").wait(60), ramp(2))


def test_a_newer_write_or_a_delete_meanwhile_wins_and_nothing_leaks(tmp_path, pool):
    with held_store(tmp_path, pool) as (store, gate):
        h1 = store.write("big", ramp(1))  # in pieces
        h2 = store.write("big", ramp(2))  # atomic: a write of the key is in flight
        gate.set()
        h1.wait(60)
        h2.wait(60)
        assert torch.equal(store.read_tensor("big").wait(60), ramp(2))
        assert store.wait_idle(10) and store.stats().used_bytes == 16 * MIB
        gate.clear()
        h3 = store.write("big", ramp(3))
        store.delete("big")  # does not wait: the pieces still to land lose
        assert "big" not in store and not h3.done()
        gate.set()
        h3.wait(60)
        assert store.wait_idle(10)
        assert "big" not in store and store.stats().used_bytes == 0
        assert store.stats().writes_pieced == 2


def test_unaligned_sources_sizes_and_reopen(tmp_path, pool):
    n = 3 * MIB // 4 + 25  # a tail piece that is not whole blocks
    with SwapEngine(backend="threads") as eng:
        with scratch(tmp_path / "s", eng, pool) as store:
            store.write("odd", torch.zeros(n)).wait(60)
            src = torch.arange(n + 1, dtype=torch.float32)[1:]  # not 4096-aligned
            store.write("odd", src).wait(60)
            assert store.stats().writes_pieced == 1
            assert torch.equal(store.read_tensor("odd").wait(60), src)
            store.write("odd", torch.ones(n - 1)).wait(60)  # another size: atomic
            assert store.stats().writes_pieced == 1
            store.write("odd", src).wait(60)
        with SwapStore(str(tmp_path / "s"), engine=eng, pool=pool, durable=False,
                       journal=False, piece_bytes=MIB) as again:
            assert torch.equal(again.read_tensor("odd").wait(60), src)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_writes_deletes_and_renames_keep_the_table_and_the_area_consistent(
        tmp_path, pool, seed):
    """Random overwrites (most the same size: in pieces), other sizes, deletes and renames,
    several writes of a key in flight at once, writes landing in random order: after each
    round every key holds the last value written to it, checksummed, and the extents of the
    keys and the free list tile the area exactly."""
    import random

    from memascend.extents import round_up

    rng = random.Random(seed)
    kib = 1024

    def jitter(op, path, offset, nbytes, done, res):
        if op == "write":
            time.sleep(rng.random() * 0.002)
        return res

    sizes = [40 * kib, 200 * kib + 12, 333 * kib]
    model: dict[str, torch.Tensor] = {}
    handles: dict[str, list] = {}
    with SwapEngine(backend="threads", threads=4, fault=jitter) as eng, \
            scratch(tmp_path / "s", eng, pool, piece_bytes=64 * kib,
                    write_window=128 * kib) as store:
        for rnd in range(12):
            for _ in range(30):
                op = rng.random()
                key = f"k{rng.randrange(6)}"
                if op < 0.75 or key not in model:
                    n = model[key].numel() * 4 if key in model and rng.random() < 0.8 \
                        else rng.choice(sizes)
                    src = torch.randint(0, 1 << 20, (n // 4,)).float()
                    handles.setdefault(key, []).append(store.write(key, src))
                    model[key] = src
                elif op < 0.85:
                    if rng.random() < 0.5:  # else it may still be a first write in flight
                        for h in handles.pop(key, []):
                            h.wait(60)
                    if key in store:
                        store.delete(key)  # writes of it in flight lose
                        del model[key]
                else:
                    new = f"k{rng.randrange(6)}"
                    for k in (key, new):  # a rename wins over writes in flight: settle them
                        for h in handles.pop(k, []):
                            h.wait(60)
                    store.rename(key, new)
                    model[new] = model.pop(key)
            for hs in handles.values():
                for h in hs:
                    h.wait(60)
            handles.clear()
            assert store.wait_idle(30)
            assert sorted(store.keys()) == sorted(model)
            for key, want in model.items():
                assert store.info(key).crc is not None
                assert torch.equal(store.read_tensor(key).wait(60), want), (rnd, key)
            spans = sorted(s for k in model for s in store.info(k).spans())
            tiles = sorted(spans + store._alloc.free_extents())
            pos = 0
            for off, n in tiles:
                assert off == pos, (rnd, tiles)
                pos += n
            assert pos == store.stats().area_bytes
            assert store.stats().used_bytes == sum(round_up(v.numel() * 4)
                                                   for v in model.values())
        assert store.stats().writes_pieced > 20


def test_a_read_in_flight_keeps_an_overwrite_atomic_and_bad_reads_raise_at_once(tmp_path,
                                                                                 pool):
    """Pieces free old ranges without looking at pins, so an overwrite issued while a read of
    the key is in flight is written atomically; a read issued while pieces are in flight
    checks its arguments at once (the new version has the same size) and then waits."""
    def hold_all(gate):
        def fault(op, path, offset, nbytes, done, res):
            if not gate.is_set():
                gate.wait(30)
            return res
        return fault

    with held_store(tmp_path, pool, hold_all, threads=8, write_window=64 * MIB) as \
            (store, gate):
        dst = torch.empty(N)
        r = store.read("big", dst)  # held in flight: the entry is pinned
        w = store.write("big", ramp(1))
        gate.set()
        r.wait(60)
        w.wait(60)
        assert torch.equal(dst, ramp(0)) and store.stats().writes_pieced == 0
        gate.clear()
        w = store.write("big", ramp(2))  # in pieces
        with pytest.raises(ValueError, match="destination holds"):
            store.read("big", torch.empty(16))
        lease = pool.lease(MIB)
        with pytest.raises(ValueError, match="range"):
            store.read_range("big", lease, 100, MIB)
        lease.release()
        gate.set()
        w.wait(60)
        assert store.stats().writes_pieced == 1
        assert torch.equal(store.read_tensor("big").wait(60), ramp(2))


def test_export_waits_for_pieces_in_flight_and_copies_whole_versions(tmp_path, pool,
                                                                     monkeypatch):
    """An overwrite in pieces issued right after export() waited for the I/O in flight (as
    another thread could) must not free the extents the export copies: the export waits for
    it under the lock, and the copy holds whole versions."""
    import memascend.store_exchange as exchange

    with SwapEngine(backend="threads") as eng:
        with scratch(tmp_path / "s", eng, pool) as store:
            store.write("big", ramp(0)).wait(60)
            store.write("small", torch.ones(1024)).wait(60)
            issued = []
            real_wait, real_copy = store.wait_idle, exchange._copy_range

            def wait_idle(timeout=None):
                done = real_wait(timeout)
                if not issued:
                    issued.append(store.write("big", ramp(5)))
                return done

            def copy(*args, **kw):
                issued[0].wait(60)  # the pieces land before the copy reads
                return real_copy(*args, **kw)

            monkeypatch.setattr(store, "wait_idle", wait_idle)
            monkeypatch.setattr(exchange, "_copy_range", copy)
            store.export(str(tmp_path / "x"))
            monkeypatch.undo()
        with SwapStore(str(tmp_path / "x"), engine=eng, pool=pool) as copy_of:
            assert torch.equal(copy_of.read_tensor("big").wait(60), ramp(5))  # checksummed
            assert torch.equal(copy_of.read_tensor("small").wait(60), torch.ones(1024))


def test_a_failed_piece_after_a_newer_write_won_says_so(tmp_path, pool):
    """A piece failing after a newer (atomic) write took the key: the older write fails
    saying so, and the key holds the newer version, checksummed, with nothing leaked."""
    count = {"n": 0}
    lock = threading.Lock()

    def hold_and_fail_third(gate):
        def fault(op, path, offset, nbytes, done, res):
            if op == "write" and nbytes == MIB and not gate.is_set():
                gate.wait(30)
                with lock:
                    count["n"] += 1
                    if count["n"] == 3:
                        return -5
            return res
        return fault

    with held_store(tmp_path, pool, hold_and_fail_third, threads=20,
                    write_window=64 * MIB) as (store, gate):
        leases = []
        for v in (1, 2):
            lease = pool.lease(16 * MIB)
            lease.as_tensor(torch.float32, (N,)).copy_(ramp(v))
            leases.append(lease)
        w1 = store.write("big", leases[0], dtype="float32", shape=(N,))  # in pieces, held
        w2 = store.write("big", leases[1], dtype="float32", shape=(N,))  # atomic: lands
        w2.wait(60)
        gate.set()
        with pytest.raises(SwapIOError, match="newer write, a delete or a rename"):
            w1.wait(60)
        assert store.wait_idle(10)
        assert store.info("big").crc is not None
        assert torch.equal(store.read_tensor("big").wait(60), ramp(2))
        assert store.stats().used_bytes == 16 * MIB
        for lease in leases:
            lease.release()


def test_a_delete_from_a_completion_callback_does_not_wait_for_pieces(tmp_path, pool):
    """A delete never blocks, so one called from an I/O completion (on the engine's own
    completion thread with io_uring) cannot wait for pieces whose completions need that
    thread; the pieces still to land lose and give their extents back."""
    with SwapEngine() as eng, scratch(tmp_path / "s", eng, pool) as store:
        store.write("big", ramp(0)).wait(60)
        store.write("small", torch.zeros(1024)).wait(60)
        done = threading.Event()
        h = store.write("big", ramp(1))  # in pieces (16 x 1 MiB, window 2 MiB)
        lease = pool.lease(4096)
        store.read("small", lease).add_done_callback(
            lambda _h: (store.delete("big"), done.set()))
        assert done.wait(30)
        h.wait(60)
        lease.release()
        assert store.wait_idle(10) and "big" not in store
        assert store.stats().used_bytes == 4096
