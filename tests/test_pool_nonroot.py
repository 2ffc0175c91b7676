"""Behaviour for users who may lock only a little memory (most real users, not root).

The kernel refuses mlock past RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK. Two ways to
get there from this test run:
- as uid 65534 (nobody) through ``setpriv``, the situation the issue describes; this needs the
  interpreter to be readable by that user, otherwise the test skips and says why;
- as root with CAP_IPC_LOCK dropped from the bounding set (same kernel check: ``mlock`` compares
  the locked total with RLIMIT_MEMLOCK when the capability is absent).
In both, RLIMIT_MEMLOCK is set to 8 MiB. ``lock="auto"`` must work and count lock failures;
``lock="required"`` must raise MemoryLockError naming RLIMIT_MEMLOCK and the fix (DeepSpeed
aborts with SIGABRT here); ``memascend info`` must report the limit.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys

import pytest

LIMIT = 8 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json
import torch
from memascend import MemoryLockError, PinnedPool
from memascend.cli import collect_info

out = {}
with PinnedPool(lock="auto") as pool:
    leases = [pool.lease(4 << 20) for _ in range(8)]
    for i, lease in enumerate(leases):
        lease.as_tensor(torch.uint8).fill_(i)
    ok = all(int(l.as_tensor(torch.uint8).max()) == i for i, l in enumerate(leases))
    st = pool.stats()
    out.update(auto_ok=ok, lock_failures=st.lock_failures, locked=st.locked,
               reserved=st.reserved, unlocked_leases=sum(not l.locked for l in leases))
    for lease in leases:
        lease.release()
try:
    with PinnedPool(lock="required") as pool:
        held = [pool.lease(4 << 20) for _ in range(4)]
    out["required_error"] = None
except MemoryLockError as exc:
    out.update(required_error=str(exc), limit=exc.limit, errno=exc.errno, nbytes=exc.nbytes)
info = collect_info()["memlock"]
out.update(info_lockable=info["lockable_bytes"], info_mlock_works=info["mlock_works"])
print("RESULT " + json.dumps(out))
"""


def _limit_memlock() -> None:
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (LIMIT, LIMIT))


def _run(prefix: list[str]) -> dict:
    proc = subprocess.run(prefix + [sys.executable, "-c", CHILD], capture_output=True,
                          text=True, timeout=120, preexec_fn=_limit_memlock, cwd="/",
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _check(res: dict) -> None:
    assert res["auto_ok"]
    assert res["lock_failures"] >= 1
    assert res["locked"] <= LIMIT
    assert res["reserved"] == 8 * (4 << 20)
    assert res["unlocked_leases"] >= 6
    msg = res["required_error"]
    assert msg is not None, "lock='required' did not raise past the memlock limit"
    assert "RLIMIT_MEMLOCK" in msg and "ulimit -l" in msg and "8.00 MiB" in msg
    assert res["limit"] == LIMIT and res["nbytes"] == 4 << 20
    assert res["info_lockable"] == LIMIT and res["info_mlock_works"]


def test_nobody_user_with_8mib_memlock():
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or not setpriv:
        pytest.skip("needs root and setpriv to switch to uid 65534")
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    probe = subprocess.run(prefix + [sys.executable, "-c", "import memascend._native._lib"],
                           capture_output=True, text=True, timeout=60, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"uid 65534 cannot run {sys.executable} with memascend "
                    f"({probe.stderr.strip().splitlines()[-1:]}); "
                    "test_without_cap_ipc_lock covers the same kernel check")
    _check(_run(prefix))


def test_without_cap_ipc_lock():
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if not setpriv:
            pytest.skip("setpriv (util-linux) is needed to drop CAP_IPC_LOCK")
        prefix = [setpriv, "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", "--"]
    else:
        from memascend.sysinfo import has_cap_ipc_lock

        if has_cap_ipc_lock():
            pytest.skip("non-root process holds CAP_IPC_LOCK and cannot drop it here")
        prefix = []
    _check(_run(prefix))
