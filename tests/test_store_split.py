"""A tensor that no free extent of the area holds is split over several instead of growing it.

The store records the extents in the key's journal record; every way of reading a key (whole,
bounced into unaligned memory, ``read_range`` across an extent boundary), overwriting and
deleting it (all of its extents come back), reopening the store and exporting / importing it
must see the same bytes.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from memascend.manifest import Entry
from memascend.store import SwapStore

MIB = 1 << 20


@pytest.fixture
def pool(make_pool):
    return make_pool()


def holes(store):
    return sorted(n for _o, n in store._alloc.free_extents())


def fragmented(path, pool, **kw):
    """A store of 6 x 1 MiB keys with keys 1 and 4 deleted: two 1 MiB holes, not adjacent."""
    store = SwapStore(path, pool=pool, grow_bytes=MIB, durable=False, **kw)
    for i in range(6):
        store.write(f"k{i}", torch.full((MIB // 4,), float(i))).wait(30)
    store.delete("k1")
    store.delete("k4")
    return store


def test_a_tensor_is_split_over_holes_instead_of_growing(tmp_path, pool):
    path = str(tmp_path / "s")
    big = torch.arange(MIB // 2, dtype=torch.float32)  # 2 MiB
    with fragmented(path, pool) as store:
        area = store.stats().area_bytes
        assert holes(store) == [MIB, MIB]
        store.write("big", big).wait(30)
        s = store.stats()
        assert s.area_bytes == area and s.writes_split == 1 and holes(store) == []
        e = store.info("big")
        assert e.extents is not None and len(e.extents) == 2
        assert torch.equal(store.read_tensor("big").wait(30), big)
        # a read into unaligned memory goes through bounce buffers, across both extents
        raw = bytearray(2 * MIB + 1)
        store.read("big", memoryview(raw)[1:]).wait(30)
        assert bytes(raw[1:]) == big.numpy().tobytes()
        with pool.lease(MIB) as lease:  # a range across the boundary between the extents
            store.read_range("big", lease, MIB // 2, MIB).wait(30)
            got = torch.frombuffer(bytearray(lease.memoryview()[:MIB]), dtype=torch.float32)
            assert torch.equal(got, big[MIB // 8: MIB // 8 + MIB // 4])
        store.export(str(tmp_path / "x"))
    with SwapStore(path, pool=pool, durable=False) as store:  # the record holds the extents
        assert torch.equal(store.read_tensor("big").wait(30), big)
        assert torch.equal(store.read_tensor("k5").wait(30), torch.full((MIB // 4,), 5.0))
    with SwapStore(str(tmp_path / "y"), pool=pool) as store:
        store.import_from(str(tmp_path / "x"))
        assert torch.equal(store.read_tensor("big").wait(30), big)
        assert store.info("big").extents is None  # an export packs each key in one extent


def test_overwrite_and_delete_of_a_split_key_give_back_every_extent(tmp_path, pool):
    with fragmented(str(tmp_path / "s"), pool) as store:
        store.write("big", torch.ones(MIB // 2)).wait(30)  # split over both holes
        area = store.stats().area_bytes
        store.write("big", torch.zeros(MIB // 2)).wait(30)  # needs new room: grows once
        assert torch.equal(store.read_tensor("big").wait(30), torch.zeros(MIB // 2))
        assert store.stats().free_bytes == 2 * MIB  # the two old extents came back
        store.delete("big")
        s = store.stats()
        assert s.used_bytes == 4 * MIB and s.area_bytes >= area


def test_an_unaligned_source_is_split_too(tmp_path, pool):
    data = os.urandom(2 * MIB - 100)
    with fragmented(str(tmp_path / "s"), pool) as store:
        store.write("b", data).wait(30)
        assert store.stats().writes_split == 1
        assert store.read_tensor("b").wait(30).numpy().tobytes() == data


def test_entry_extents_round_trip_and_damage_is_refused():
    e = Entry("k", 4096, 3 * 4096 - 5, "float32", (3,), 7, 1, extents=((4096, 4096),
                                                                       (65536, 8192)))
    assert Entry.from_json(json.loads(json.dumps(e.to_json()))) == e
    assert "extents" not in Entry("k", 0, 10, None, None, None, 1).to_json()
    for bad in ([[4096, 4096]], [[4096, 4096], [65536, 4096]], [[0, 4096], [65536, 8192]],
                [[4096, 4096], [65537, 8192]], [], [[4096, 12288, 1]]):
        d = dict(e.to_json(), extents=bad)
        with pytest.raises(ValueError):
            Entry.from_json(d)


def test_a_failed_extent_fails_the_write_and_the_key_keeps_its_old_version(tmp_path, pool):
    from memascend.engine import SwapEngine
    from memascend.errors import SwapIOError

    fail_at = []

    def fault(op, path, offset, nbytes, done, res):
        if op == "write" and fail_at and offset == fail_at[0]:
            return -5  # EIO on the second extent of the split write
        return res

    with SwapEngine(backend="threads", fault=fault) as eng, \
            SwapStore(str(tmp_path / "s"), engine=eng, pool=pool, grow_bytes=MIB,
                      durable=False) as store:
        for i in range(6):
            store.write(f"k{i}", torch.full((MIB // 4,), float(i))).wait(30)
        store.write("big", torch.ones(MIB // 2)).wait(30)  # grows: one extent
        store.delete("k1")
        store.delete("k4")
        used = store.stats().used_bytes
        fail_at.append(sorted(o for o, _n in store._alloc.free_extents())[1])
        h = store.write("big", torch.zeros(MIB // 2))  # split over the two holes
        with pytest.raises(SwapIOError):
            h.wait(30)
        s = store.stats()
        assert s.writes_split == 1 and s.write_errors == 1 and s.used_bytes == used
        assert torch.equal(store.read_tensor("big").wait(30), torch.ones(MIB // 2))
