"""The store on real devices: ENOSPC on a small loop-mounted ext4, and a raw block device.

Both need root (mount, losetup); they skip with the reason otherwise.
"""
from __future__ import annotations

import errno
import os
import subprocess

import pytest
import torch

from memascend import PinnedPool
from memascend.errors import SwapIOError
from memascend.store import SwapStore

from conftest import need_root


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)


@pytest.fixture
def loop_device(tmp_path):
    """A 24 MiB loop block device."""
    need_root("losetup")
    img = tmp_path / "dev.img"
    with open(img, "wb") as f:
        f.truncate(24 << 20)
    r = _run("losetup", "-f", "--show", str(img))
    if r.returncode:
        pytest.skip(f"cannot attach a loop device here: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev
    finally:
        _run("losetup", "-d", dev)


def test_enospc_on_full_filesystem_loses_nothing(small_ext4):
    pool = PinnedPool()
    path = os.path.join(small_ext4, "swap")
    stored = {}
    with SwapStore(path, grow_bytes="4MiB", pool=pool) as store:
        err = None
        for i in range(20):  # 20 x 3 MiB > 23 MiB free
            t = torch.full(((3 << 20) // 4,), float(i))
            try:
                store.write(f"t{i}", t).wait(30)
                stored[f"t{i}"] = t
            except SwapIOError as exc:
                err, failed = exc, (f"t{i}", t)
                break
        assert err is not None, "the filesystem never filled up"
        assert err.errno == errno.ENOSPC
        assert err.key == failed[0] and err.path == path
        assert torch.equal(failed[1], torch.full(((3 << 20) // 4,), float(int(failed[0][1:]))))
        assert len(stored) >= 4
        for k, t in stored.items():  # everything stored before stays readable
            assert torch.equal(store.read_tensor(k).wait(30), t)
        # deleting makes room again (after the sync that recycles quarantined space)
        first = next(iter(stored))
        store.delete(first)
        store.sync()
        store.write("again", torch.ones((3 << 20) // 4)).wait(30)
    with SwapStore(path, pool=pool) as store:
        assert set(store.keys()) == (set(stored) - {first}) | {"again"}


def test_grow_step_larger_than_the_free_space_falls_back_to_what_is_needed(small_ext4):
    """A 256 MiB grow step on a 32 MiB filesystem: the store grows by what each tensor needs
    instead of failing with ENOSPC while the tensor would fit."""
    pool = PinnedPool()
    t = torch.arange((4 << 20) // 4, dtype=torch.float32)
    with SwapStore(os.path.join(small_ext4, "swap"), grow_bytes="256MiB", pool=pool) as store:
        store.write("a", t).wait(30)
        store.write("b", t * 2).wait(30)
        assert store.stats().area_bytes < 32 << 20
        assert torch.equal(store.read_tensor("b").wait(30), t * 2)


def test_raw_block_device(loop_device, tmp_path):
    pool = PinnedPool()
    meta = str(tmp_path / "meta")
    with pytest.raises(Exception, match="meta_dir"):
        SwapStore(loop_device, pool=pool)
    tensors = {f"w{i}": torch.randn(1000 + 999 * i) for i in range(6)}
    with SwapStore(loop_device, meta_dir=meta, pool=pool) as store:
        assert store.direct is True
        assert store.stats().area_bytes == 24 << 20
        for k, t in tensors.items():
            store.write(k, t).wait(30)
        with pytest.raises(SwapIOError) as info:
            store.write("huge", torch.ones((30 << 20) // 4))
        assert info.value.errno == errno.ENOSPC and info.value.key == "huge"
    with SwapStore(loop_device, meta_dir=meta, pool=pool) as store:
        for k, t in tensors.items():
            assert torch.equal(store.read_tensor(k).wait(30), t)
