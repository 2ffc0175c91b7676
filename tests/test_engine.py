"""SwapEngine on every backend: exact round trips, batching, splitting, typed errors, faults."""
from __future__ import annotations

import errno
import os

import pytest
import torch

from memascend import PinnedPool
from memascend.engine import EngineConfig, IORequest, SwapEngine, probe_backends
from memascend.errors import BackendUnavailableError, ConfigError, ShortIOError, SwapIOError

AVAIL = probe_backends()


def backend_param(name):
    ok, why = AVAIL[name]
    return pytest.param(name, marks=pytest.mark.skipif(not ok, reason=f"{name}: {why}"))


BACKENDS = [backend_param(b) for b in ("uring", "threads", "pyuring")]


@pytest.fixture
def dfile(tmp_path):
    path = str(tmp_path / "area")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    os.ftruncate(fd, 32 << 20)
    yield fd, path
    os.close(fd)


@pytest.fixture(scope="module")
def pool():
    p = PinnedPool()
    yield p


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_roundtrip(backend, dfile, pool):
    fd, path = dfile
    with SwapEngine(backend=backend, queue_depth=4, chunk_bytes="256KiB") as eng:
        fid = eng.register_file(fd, path)
        w, r = pool.lease(8 << 20), pool.lease(8 << 20)
        src = w.as_tensor(torch.uint8)
        src.random_()
        sizes = [4096, 8192, 1 << 20, 3 << 20, (3 << 20) + (1 << 20) - 12288]
        reqs, off = [], 0
        for i, n in enumerate(sizes):
            reqs.append(IORequest("write", fid, w.address + off, n, off, key=f"t{i}"))
            off += n
        hs = eng.submit(reqs)
        assert [h.wait(30) for h in hs] == sizes
        assert eng.read(fid, r.address, off, 0).wait(30) == off
        assert torch.equal(r.as_tensor(torch.uint8)[:off], src[:off])
        st = eng.stats()
        assert st.errors == 0 and st.bytes_written == off and st.bytes_read == off
        assert st.submitted > len(sizes)  # big requests were split into 256 KiB pieces
        eng.unregister_file(fid)
        del src
        w.release()
        r.release()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["short", "eio", "eagain"])
def test_injected_faults(backend, kind, dfile, pool):
    fd, path = dfile
    calls = {"n": 0}

    def fault(op, p, offset, nbytes, done, res):
        calls["n"] += 1
        if kind == "short" and done == 0 and res > 4096:
            return (res // 3) & ~4095 or 4096
        if kind == "eio" and offset == 1 << 20:
            return -errno.EIO
        if kind == "eagain" and done == 0 and calls["n"] % 2:
            return -errno.EAGAIN
        return res

    with SwapEngine(backend=backend, chunk_bytes="1MiB", fault=fault) as eng:
        fid = eng.register_file(fd, path)
        w, r = pool.lease(4 << 20), pool.lease(4 << 20)
        w.as_tensor(torch.uint8).random_()
        hs = [eng.write(fid, w.address + i * (1 << 20), 1 << 20, i * (1 << 20), key=f"k{i}")
              for i in range(4)]
        if kind == "eio":
            with pytest.raises(SwapIOError) as info:
                hs[1].wait(30)
            e = info.value
            assert e.errno == errno.EIO and e.key == "k1" and e.path == path
            assert e.offset == 1 << 20 and e.nbytes == 1 << 20
            for i in (0, 2, 3):
                assert hs[i].wait(30) == 1 << 20
        else:
            assert all(h.wait(30) == 1 << 20 for h in hs)
            assert eng.read(fid, r.address, 4 << 20, 0).wait(30) == 4 << 20
            assert torch.equal(r.as_tensor(torch.uint8), w.as_tensor(torch.uint8))
            st = eng.stats()
            if kind == "short":
                assert st.short_resubmits >= 4
            else:
                assert st.retries >= 1
        w.release()
        r.release()


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_past_eof_is_short(backend, tmp_path, pool):
    path = str(tmp_path / "small")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    os.ftruncate(fd, 8192)
    try:
        with SwapEngine(backend=backend) as eng:
            fid = eng.register_file(fd, path)
            with pool.lease(16384) as r:
                with pytest.raises(ShortIOError, match="8192 of 16384") as info:
                    eng.read(fid, r.address, 16384, 0, key="tail").wait(30)
                assert info.value.key == "tail" and info.value.path == path
    finally:
        os.close(fd)


def test_bad_requests_and_config(dfile):
    fd, path = dfile
    with SwapEngine(backend="threads") as eng:
        fid = eng.register_file(fd, path)
        with pytest.raises(ValueError, match="unknown file id"):
            eng.read(fid + 7, 0, 4096, 0)
        with pytest.raises(ValueError, match="nbytes=0"):
            eng.read(fid, 4096, 0, 0)
        with pytest.raises(ValueError, match="unknown op"):
            eng.submit([IORequest("erase", fid, 0, 4096, 0)])
    with pytest.raises(ConfigError, match="backend"):
        SwapEngine(backend="libaio")
    with pytest.raises(ConfigError, match="queue_depth"):
        EngineConfig(queue_depth=0)
    with pytest.raises(ConfigError, match="chunk_bytes"):
        EngineConfig(chunk_bytes=1000)
    with pytest.raises(ConfigError, match="frobs"):
        SwapEngine(frobs=1)


def test_auto_falls_back_to_threads(monkeypatch):
    from memascend._backends import uring

    monkeypatch.setattr(uring, "available", lambda: (False, "io_uring is disabled (test)"))
    with SwapEngine() as eng:
        assert eng.backend == "threads"
        assert "io_uring is disabled (test)" in eng.backend_reason
    with pytest.raises(BackendUnavailableError, match="disabled"):
        SwapEngine(backend="uring")


@pytest.mark.skipif(not AVAIL["uring"][0], reason="io_uring unavailable")
def test_fixed_buffers_are_used(dfile, pool):
    fd, path = dfile
    with SwapEngine(backend="uring") as eng:
        fid = eng.register_file(fd, path)
        with pool.lease(2 << 20) as buf:
            if not eng.register_buffer(buf.address, buf.size):
                pytest.skip("kernel refused buffer registration (memlock limit)")
            buf.as_tensor(torch.uint8).fill_(9)
            eng.write(fid, buf.address, 2 << 20, 0).wait(30)
            buf.as_tensor(torch.uint8).zero_()
            eng.read(fid, buf.address, 2 << 20, 0).wait(30)
            assert int(buf.as_tensor(torch.uint8).min()) == 9
            assert eng.stats().fixed_ops == 2
            eng.unregister_buffer(buf.address)


SYSCTL = "/proc/sys/kernel/io_uring_disabled"

CHILD = r"""
import json, os
from memascend.engine import SwapEngine
from memascend import PinnedPool
with SwapEngine() as eng, PinnedPool() as pool:
    path = os.environ["AREA"]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    fid = eng.register_file(fd, path)
    with pool.lease(1 << 20) as w, pool.lease(1 << 20) as r:
        w.memoryview()[:5] = b"hello"
        eng.write(fid, w.address, 1 << 20, 0).wait(30)
        eng.read(fid, r.address, 1 << 20, 0).wait(30)
        ok = bytes(r.memoryview()[:5]) == b"hello"
    eng.unregister_file(fid)
    os.close(fd)
    print("RESULT " + json.dumps({"backend": eng.backend, "reason": eng.backend_reason, "ok": ok}))
"""


def test_io_uring_disabled_by_sysctl_uses_threads(tmp_path):
    """With io_uring really disabled (sysctl, as root), auto picks threads and works."""
    import json
    import subprocess
    import sys

    if os.geteuid() != 0 or not os.path.exists(SYSCTL):
        pytest.skip("needs root and the io_uring_disabled sysctl")
    with open(SYSCTL) as f:
        old = f.read().strip()
    try:
        try:
            with open(SYSCTL, "w") as f:
                f.write("2")
        except OSError as exc:
            pytest.skip(f"cannot write {SYSCTL}: {exc}")
        proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "AREA": str(tmp_path / "a")})
    finally:
        with open(SYSCTL, "w") as f:
            f.write(old)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.split("RESULT ")[-1])
    assert res["backend"] == "threads" and res["ok"]
    assert "disabled" in res["reason"]
