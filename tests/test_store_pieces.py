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

import threading
import time

import pytest
import torch

from memascend.engine import SwapEngine
from memascend.errors import ConfigError, SwapIOError
from memascend.store import StoreConfig, SwapStore
from memascend.store_pieces import replace_range

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


def gated():
    gate = threading.Event()

    def fault(op, path, offset, nbytes, done, res):
        if op == "write" and not gate.is_set():
            gate.wait(30)
        return res
    return gate, fault


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
    gate, fault = gated()
    with SwapEngine(backend="threads", fault=fault) as eng, \
            scratch(tmp_path / "s", eng, pool) as store:
        gate.set()
        store.write("big", ramp(0)).wait(60)
        gate.clear()
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
    gate, fault = gated()
    with SwapEngine(backend="threads", fault=fault) as eng, \
            scratch(tmp_path / "s", eng, pool) as store:
        gate.set()
        store.write("big", ramp(0)).wait(60)
        gate.clear()
        h1 = store.write("big", ramp(1))  # in pieces
        h2 = store.write("big", ramp(2))  # atomic: a write of the key is in flight
        gate.set()
        h1.wait(60)
        h2.wait(60)
        assert torch.equal(store.read_tensor("big").wait(60), ramp(2))
        assert store.wait_idle(10) and store.stats().used_bytes == 16 * MIB
        gate.clear()
        h3 = store.write("big", ramp(3))
        deleter = threading.Thread(target=store.delete, args=("big",))
        deleter.start()
        time.sleep(0.1)
        assert deleter.is_alive()  # waits for the piecewise write
        gate.set()
        deleter.join(30)
        h3.wait(60)
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
