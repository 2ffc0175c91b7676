"""SwapStore: exact round trips on every backend, reopen, overwrite safety, checksums,
alignment handling, capacity, locking, and the O_DIRECT fallback."""
from __future__ import annotations

import errno
import os

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from memascend import PinnedPool
from memascend.engine import SwapEngine, probe_backends
from memascend.errors import (ChecksumError, ConfigError, KeyNotFoundError, StoreLockedError,
                              SwapIOError)
from memascend.store import SwapStore

AVAIL = probe_backends()
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not AVAIL[b][0], reason=AVAIL[b][1]))
            for b in ("uring", "threads", "pyuring")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.int32]


@pytest.fixture(scope="module")
def pool():
    return PinnedPool()


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request):
    eng = SwapEngine(backend=request.param, chunk_bytes="256KiB")
    yield eng
    eng.close()


ops = st.lists(st.tuples(
    st.sampled_from(["write", "write", "write", "read", "delete", "reopen"]),
    st.sampled_from(["a", "b", "c", "layers.0.weight", "ü/ñ key"]),
    st.integers(1, 300_000),
    st.integers(0, len(DTYPES) - 1),
    st.integers(0, 3)), min_size=1, max_size=25)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_roundtrip_model(engine, pool, tmp_path_factory, ops):
    """Random writes (tensors, leases, bytes; aligned or not), reads, deletes and reopens
    agree with a dict model; bytes come back exactly."""
    d = tmp_path_factory.mktemp("store")
    path = str(d / "swap")
    model: dict[str, bytes] = {}
    store = SwapStore(path, engine=engine, pool=pool, grow_bytes="1MiB")
    rng = np.random.default_rng(len(ops))
    try:
        for op, key, nbytes, di, form in ops:
            if op == "write":
                dtype = DTYPES[di]
                item = torch.empty((), dtype=dtype).element_size()
                n = max(1, nbytes // item)
                raw = rng.integers(0, 256, n * item, dtype=np.uint8).tobytes()
                if form == 0:  # a tensor (64-byte aligned by torch)
                    src = torch.frombuffer(bytearray(raw), dtype=dtype).clone()
                elif form == 1:  # a tensor at an odd offset inside a bigger one
                    big = torch.frombuffer(bytearray(b"\0" * item + raw), dtype=torch.uint8)
                    src = big[item:]
                elif form == 2:  # a pool lease
                    src = pool.lease(len(raw))
                    src.memoryview()[:len(raw)] = raw
                else:  # plain bytes
                    src = raw
                assert store.write(key, src).wait(30) == len(raw)
                if form == 2:
                    src.release()
                model[key] = raw
            elif op == "read":
                if key in model:
                    got = store.read_tensor(key).wait(30)
                    assert got.contiguous().view(torch.uint8).numpy().tobytes() == model[key]
                else:
                    with pytest.raises(KeyNotFoundError, match="no key"):
                        store.read_tensor(key)
            elif op == "delete":
                if key in model:
                    store.delete(key)
                    del model[key]
                else:
                    with pytest.raises(KeyNotFoundError):
                        store.delete(key)
            else:
                store.close()
                store = SwapStore(path, engine=engine, pool=pool, grow_bytes="1MiB")
            assert sorted(store.keys()) == sorted(model)
        for key, raw in model.items():
            out = bytearray(len(raw) + 5)
            assert store.read(key, out).wait(30) == len(raw)
            assert bytes(out[:len(raw)]) == raw
    finally:
        store.close()


def test_dtype_shape_recorded(tmp_path, pool):
    with SwapStore(str(tmp_path / "s"), pool=pool) as store:
        t = torch.randn(3, 5, 7).to(torch.bfloat16)
        store.write("w", t).wait(30)
        e = store.info("w")
        assert e.dtype == "bfloat16" and e.shape == (3, 5, 7) and e.nbytes == t.numel() * 2
        assert torch.equal(store.read_tensor("w").wait(30), t)


def test_overwrite_failure_keeps_old_version(tmp_path, pool):
    fail = {"on": False}

    def fault(op, path, offset, nbytes, done, res):
        return -errno.EIO if fail["on"] and op == "write" else res

    with SwapEngine(fault=fault) as eng, SwapStore(str(tmp_path / "s"), engine=eng,
                                                  pool=pool) as store:
        old = torch.arange(50_000, dtype=torch.float32)
        store.write("k", old).wait(30)
        fail["on"] = True
        new = old + 1
        with pytest.raises(SwapIOError) as info:
            store.write("k", new).wait(30)
        assert info.value.errno == errno.EIO and info.value.key == "k"
        fail["on"] = False
        assert torch.equal(store.read_tensor("k").wait(30), old)
        assert torch.equal(new, old + 1)  # the source is untouched
        assert store.stats().write_errors == 1


def test_checksum_detects_corruption(tmp_path, pool):
    path = str(tmp_path / "s")
    with SwapStore(path, pool=pool) as store:
        store.write("k", torch.ones(10_000)).wait(30)
        off = store.info("k").offset
    with open(path, "r+b") as f:
        f.seek(off + 777)
        f.write(b"\x13")
    with SwapStore(path, pool=pool) as store:
        with pytest.raises(ChecksumError, match="'k'") as info:
            store.read_tensor("k").wait(30)
        assert info.value.offset == off and info.value.nbytes == 40_000
        assert store.stats().checksum_failures == 1
    with SwapStore(path, pool=pool, checksum="none") as store:
        store.write("n", torch.ones(10)).wait(30)
        assert store.info("n").crc is None


def test_capacity_enospc_loses_nothing(tmp_path, pool):
    with SwapStore(str(tmp_path / "s"), capacity="1MiB", grow_bytes="256KiB",
                   pool=pool) as store:
        kept = {}
        for i in range(3):
            kept[f"k{i}"] = torch.full((60_000,), float(i))  # 240 KB each
            store.write(f"k{i}", kept[f"k{i}"]).wait(30)
        big = torch.ones(200_000)  # 800 KB: does not fit next to the others
        with pytest.raises(SwapIOError) as info:
            store.write("big", big)
        e = info.value
        assert e.errno == errno.ENOSPC and e.key == "big" and e.nbytes == 800_000
        assert "capacity" in str(e)
        assert torch.equal(big, torch.ones(200_000))
        for k, t in kept.items():
            assert torch.equal(store.read_tensor(k).wait(30), t)
        assert "big" not in store


def test_freed_space_is_reused_after_sync(tmp_path, pool):
    with SwapStore(str(tmp_path / "s"), capacity="1MiB", grow_bytes="1MiB",
                   pool=pool) as store:
        store.write("a", torch.ones(100_000)).wait(30)  # 400 KB
        store.write("b", torch.ones(100_000)).wait(30)
        store.delete("a")  # quarantined until the next sync, not reused before
        assert store.stats().quarantined_bytes == 401_408
        store.write("c", torch.full((100_000,), 3.0)).wait(30)  # needs a's extent: syncs
        st = store.stats()
        assert st.syncs >= 1 and st.quarantined_bytes == 0
        assert torch.equal(store.read_tensor("c").wait(30), torch.full((100_000,), 3.0))
        # an overwrite needs room for both versions at once (crash safety): say so
        with pytest.raises(SwapIOError, match="old and new version") as info:
            store.write("c", torch.ones(150_000))
        assert info.value.errno == errno.ENOSPC
        assert torch.equal(store.read_tensor("c").wait(30), torch.full((100_000,), 3.0))


def test_bad_inputs(tmp_path, pool):
    with SwapStore(str(tmp_path / "s"), pool=pool) as store:
        with pytest.raises(ValueError, match="non-empty string"):
            store.write("", torch.ones(1))
        with pytest.raises(ValueError, match="contiguous"):
            store.write("t", torch.ones(4, 4).t())
        store.write("k", torch.ones(100)).wait(30)
        with pytest.raises(ValueError, match="holds 40 bytes"):
            store.read("k", bytearray(40))
        with pytest.raises(ValueError, match="read-only"):
            store.read("k", bytes(400))
    with pytest.raises(ConfigError, match="checksum"):
        SwapStore(str(tmp_path / "x"), checksum="md5")
    with pytest.raises(ConfigError, match="nope"):
        SwapStore(str(tmp_path / "x"), nope=1)
    with pytest.raises(ValueError, match="closed"):
        store.write("k", torch.ones(1))


def test_second_open_is_refused(tmp_path, pool):
    path = str(tmp_path / "s")
    with SwapStore(path, pool=pool):
        with pytest.raises(StoreLockedError, match="open elsewhere"):
            SwapStore(path, pool=pool)
    SwapStore(path, pool=pool).close()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_tmpfs_refuses_o_direct(pool):
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        try:
            fd = os.open(os.path.join(d, "probe"), os.O_RDWR | os.O_CREAT | os.O_DIRECT)
            os.close(fd)
            pytest.skip("this /dev/shm accepts O_DIRECT")
        except OSError:
            pass
        with pytest.raises(SwapIOError, match="refuses O_DIRECT"):
            SwapStore(os.path.join(d, "s1"), direct="on", pool=pool)
        with SwapStore(os.path.join(d, "s2"), pool=pool) as store:
            assert store.direct is False
            store.write("k", torch.arange(1000)).wait(30)
            assert torch.equal(store.read_tensor("k").wait(30), torch.arange(1000))


def test_o_direct_refusal_fallback(tmp_path, pool, monkeypatch):
    """A filesystem that refuses O_DIRECT (EINVAL at open): 'on' is a clear error, 'auto'
    falls back to buffered I/O and says so."""
    import memascend.store as store_mod

    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT and str(path).endswith("swap"):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(store_mod.os, "open", no_direct)
    with pytest.raises(SwapIOError, match="refuses O_DIRECT"):
        SwapStore(str(tmp_path / "on" / "swap"), direct="on", pool=pool)
    with SwapStore(str(tmp_path / "swap"), pool=pool) as store:
        assert store.direct is False and store.stats().direct is False
        store.write("k", torch.arange(5000)).wait(30)
        assert torch.equal(store.read_tensor("k").wait(30), torch.arange(5000))


def test_delete_during_inflight_overwrite_wins(tmp_path, pool):
    import threading

    gate, hold = threading.Event(), threading.Event()

    def fault(op, path, offset, nbytes, done, res):
        if op == "write" and gate.is_set():
            hold.wait(10)  # hold the overwrite until the delete happened
        return res

    path = str(tmp_path / "s")
    with SwapEngine(backend="threads", fault=fault) as eng:
        with SwapStore(path, engine=eng, pool=pool) as store:
            store.write("k", torch.ones(1000)).wait(30)
            gate.set()
            h = store.write("k", torch.zeros(1000))
            store.delete("k")
            hold.set()
            assert h.wait(30) == 4000
            assert "k" not in store
    with SwapStore(path, pool=pool) as store:
        assert "k" not in store


@pytest.mark.parametrize("slack", [0.0, 1.0])
def test_overwrites_reclaim_with_few_fsyncs_and_bounded_area(tmp_path, slack):
    pool = PinnedPool()
    data = {f"k{i}": torch.full((1 << 18,), float(i)) for i in range(8)}  # 8 x 1 MiB
    with SwapStore(str(tmp_path / "s"), pool=pool, grow_bytes=1 << 20, sync_slack=slack) as store:
        for rnd in range(4):
            for k, t in data.items():
                store.write(k, t + rnd).wait()
        s = store.stats()
        for k, t in data.items():
            assert torch.equal(store.read_tensor(k).wait(), t + 3)
    pool.close()
    if slack == 0.0:  # reclaim as soon as a grow step's worth is quarantined
        assert s.syncs >= 16 and s.area_bytes <= 10 << 20
    else:  # reclaim once the quarantine reaches the stored bytes: ~1 fsync per rewrite
        assert s.syncs <= 4 and s.area_bytes <= (2 * 8 + 1) << 20


def test_capacity_reached_reclaims_quarantine_before_failing(tmp_path):
    pool = PinnedPool()
    with SwapStore(str(tmp_path / "s"), capacity=9 << 20, pool=pool, grow_bytes=1 << 20,
                   sync_slack=4.0) as store:
        for rnd in range(3):
            for i in range(8):
                store.write(f"k{i}", torch.full((1 << 18,), float(rnd))).wait()
        assert store.stats().area_bytes <= 9 << 20
        assert torch.equal(store.read_tensor("k7").wait(), torch.full((1 << 18,), 2.0))
    pool.close()


def test_non_durable_store_reclaims_without_fsync(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    pool = PinnedPool()
    with SwapStore(str(tmp_path / "s"), pool=pool, grow_bytes=1 << 20,
                   durable=False) as store:
        for rnd in range(3):
            for i in range(4):
                store.write(f"k{i}", torch.full((1 << 18,), float(rnd))).wait()
        # an overwritten extent is reused at once (no sync_slack): the 4 MiB stored and
        # room for one overwrite, where a durable store grows to about twice its bytes
        st = store.stats()
        assert st.area_bytes <= 5 << 20 and st.quarantined_bytes == 0, st
        during = len(calls)
        assert torch.equal(store.read_tensor("k3").wait(), torch.full((1 << 18,), 2.0))
    pool.close()
    assert during == 0


def test_rename_moves_a_key_without_io_and_survives_reopen_and_kill(tmp_path):
    import subprocess
    import sys

    path = str(tmp_path / "swap")
    child = f"""
import os, signal, torch
from memascend.store import SwapStore
s = SwapStore({path!r})
s.write("a", torch.full((5000,), 1.0)).wait(30)
s.write("b", torch.full((5000,), 2.0)).wait(30)
s.rename("a", "a~")          # keep the old version aside
s.write("a", torch.full((5000,), 3.0)).wait(30)
s.rename("b", "a~")          # replaces the kept version (released like an overwrite)
reads = s.stats().reads
os.kill(os.getpid(), signal.SIGKILL)
"""
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert r.returncode == -9, r.stderr[-2000:]
    with SwapStore(path) as s:
        assert sorted(s.keys()) == ["a", "a~"]
        assert torch.equal(s.read_tensor("a").wait(30), torch.full((5000,), 3.0))
        assert torch.equal(s.read_tensor("a~").wait(30), torch.full((5000,), 2.0))
        with pytest.raises(KeyError):
            s.rename("zz", "y")
        s.rename("a~", "a")
        assert s.keys() == ["a"]
        assert torch.equal(s.read_tensor("a").wait(30), torch.full((5000,), 2.0))
    with SwapStore(path) as s:
        assert s.keys() == ["a"]


def test_deletes_of_many_unique_keys_leave_no_tombstones(tmp_path, pool):
    """The activation tier writes and deletes a new key per saved tensor: the store must not
    remember every deleted key (a tombstone is kept only while a write of it is in flight)."""
    with SwapStore(str(tmp_path / "s"), pool=pool, durable=False) as store:
        for i in range(200):
            store.write(f"a/{i}", torch.full((1024,), float(i))).wait(30)
            store.delete(f"a/{i}")
        store.write("k", torch.ones(1024)).wait(30)
        store.rename("k", "j")
        assert store._tombstones == {} and store._issued == {}
