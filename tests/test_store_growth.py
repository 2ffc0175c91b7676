"""Growing a swap area never makes the disk full for anyone else.

A store grows ahead (``grow_bytes``, 256 MiB by default) only into space the filesystem has
to spare; on a small real filesystem shared by two stores, an ``offload_model`` and another
writer, every write that fits in the free space succeeds. Growth errors name the tensor's
size and the growth tried, separately.
"""
from __future__ import annotations

import errno
import os
import threading

import pytest
import torch

from conftest import loop_ext4
from memascend.errors import SwapIOError
from memascend.offload import AdamW, offload_model
from memascend.store import SwapStore


def writer(path: str, total: int, stop: threading.Event, errors: list) -> None:
    """Another program on the same disk: appends ``total`` bytes in 64 KiB pieces."""
    try:
        with open(path, "wb") as f:
            for _ in range(total // (64 << 10)):
                f.write(b"\1" * (64 << 10))
                f.flush()
                os.fsync(f.fileno())
                if stop.is_set():
                    break
    except OSError as exc:
        errors.append(exc)


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_default_growth_takes_only_spare_space(tmp_path):
    with loop_ext4(tmp_path, 64 << 20) as mnt:
        before = free_bytes(mnt)
        with SwapStore(os.path.join(mnt, "a.swp")) as store:  # default 256 MiB step
            store.write("t", torch.ones(1000)).wait(30)
            area = store.stats().area_bytes
        assert 4096 <= area <= before // 2, (area, before)
        assert free_bytes(mnt) >= before // 2 - (1 << 20)


def test_two_stores_and_another_writer_all_fit(tmp_path):
    with loop_ext4(tmp_path, 64 << 20) as mnt:
        free = free_bytes(mnt)
        stores = [SwapStore(os.path.join(mnt, f"{n}.swp")) for n in ("a", "b")]
        stop, errors = threading.Event(), []
        other = threading.Thread(target=writer, args=(os.path.join(mnt, "other"), free // 4,
                                                      stop, errors))
        other.start()
        try:
            # each store holds 8 x 1 MiB and rewrites it 3 times: ~16 MiB with old versions
            for rnd in range(4):
                for i in range(8):
                    for s in stores:
                        s.write(f"k{i}", torch.full((1 << 18,), float(rnd))).wait(30)
        finally:
            stop.set()
            other.join()
            for s in stores:
                s.close()
        assert errors == []
        for n in ("a", "b"):
            with SwapStore(os.path.join(mnt, f"{n}.swp")) as s:
                assert torch.equal(s.read_tensor("k7").wait(30), torch.full((1 << 18,), 3.0))


@pytest.mark.parametrize("attempt", range(4))
def test_offload_model_beside_another_writer_never_fails(tmp_path, attempt):
    """The reported failure: a ~7 MB training state on a 64 MiB ext4, default growth."""
    with loop_ext4(tmp_path, 64 << 20) as mnt:
        torch.manual_seed(attempt)
        model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(),
                                    torch.nn.Linear(512, 256))
        stop, errors = threading.Event(), []
        other = threading.Thread(target=writer, args=(os.path.join(mnt, "other"), 8 << 20,
                                                      stop, errors))
        other.start()
        try:
            with offload_model(model, os.path.join(mnt, "swap"), budget="4MiB",
                               optimizer=AdamW(lr=1e-3)) as om:
                x = torch.randn(4, 256)
                for _ in range(3):
                    om.backward(model(x).square().mean())
                    om.step()
        finally:
            stop.set()
            other.join()
        assert errors == []


def test_growth_error_names_tensor_size_and_growth_separately(small_ext4):
    big = torch.ones((64 << 20) // 4)  # larger than the filesystem
    with SwapStore(os.path.join(small_ext4, "swap")) as store:
        with pytest.raises(SwapIOError) as info:
            store.write("big", big).wait(30)
    err = info.value
    assert err.errno == errno.ENOSPC and err.key == "big" and err.nbytes == 64 << 20
    assert "+67108864" in str(err) and "to place 67108864 bytes" in str(err)


def test_a_small_grow_step_still_works(tmp_path):
    with SwapStore(str(tmp_path / "swap"), grow_bytes="64KiB") as store:
        for i in range(20):
            store.write(f"k{i}", torch.full((10000,), float(i))).wait(30)
        assert store.stats().area_bytes <= 20 * 40960 + (64 << 10)
    with SwapStore(str(tmp_path / "swap")) as store:
        assert torch.equal(store.read_tensor("k19").wait(30), torch.full((10000,), 19.0))


def test_growing_ahead_stays_page_aligned_and_close_to_the_need(tmp_path):
    """Areas past 16 MiB grow ahead by 1/16 of their size, rounded to whole pages (an
    unaligned step failed the allocator: "cannot grow from 106872832 to 114420736"), and
    the area stays within ~1.06x of what it holds plus 1 MiB."""
    pages = 4097  # an odd number of pages: the area's size is no multiple of 64 KiB
    with SwapStore(str(tmp_path / "swap")) as store:
        for i in range(12):
            store.write(f"k{i}", torch.ones(pages * 1024)).wait(30)  # 16 MiB + 4 KiB each
            st = store.stats()
            assert st.area_bytes % 4096 == 0
            assert st.area_bytes <= st.stored_bytes * 17 // 16 + (1 << 20) + pages * 4096, st
