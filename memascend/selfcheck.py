"""Pool self-check: lease a realistic mix of buffers, use them, and prove the accounting.

Used by ``memascend demo`` (until the training demo exists) and by the tests. It leases the
swap buffers a small LLaMA-style decoder would need (attention and MLP projections, norms,
embedding), writes a pattern through zero-copy torch views, reads it back, and checks the
pool's counters against the kernel's: locked bytes against the growth of ``VmLck``, and that
everything returns to the baseline when the leases are released.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .pool import PinnedPool
from .sysinfo import proc_status


@dataclass
class SelfCheckResult:
    """Outcome of :func:`run_selfcheck`. ``ok`` is True only if every check passed."""

    ok: bool
    checks: dict[str, bool]
    leases: int
    requested_bytes: int
    reserved_bytes: int
    locked_bytes: int
    vmlck_delta_bytes: int
    vmrss_delta_bytes: int
    lock_failures: int
    overhead: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-serialisable dict."""
        return asdict(self)


def decoder_buffer_sizes(hidden: int = 512, intermediate: int = 1376, layers: int = 4,
                         vocab: int = 4096, elem: int = 2) -> list[int]:
    """Byte sizes of the parameter swap buffers of a small LLaMA-style decoder."""
    sizes = [vocab * hidden * elem]
    for _ in range(layers):
        sizes += [hidden * hidden * elem] * 4            # q, k, v, o
        sizes += [hidden * intermediate * elem] * 3      # gate, up, down
        sizes += [hidden * elem] * 2                     # two RMSNorm weights
    sizes += [hidden * elem, vocab * hidden * elem]      # final norm, lm_head
    return sizes


def run_selfcheck(lock: str = "auto") -> SelfCheckResult:
    """Lease, fill, verify and release a decoder's buffers; compare stats with /proc.

    Parameters
    ----------
    lock:
        Lock mode for the pool (``"auto"`` works for every user).
    """
    import torch

    sizes = decoder_buffer_sizes()
    before = proc_status()
    checks: dict[str, bool] = {}
    notes: list[str] = []
    with PinnedPool(lock=lock) as pool:
        leases = [pool.lease(n) for n in sizes]
        for i, lease in enumerate(leases):
            lease.as_tensor(torch.int16).fill_(i)
        checks["data_roundtrip"] = all(
            bool((lease.as_tensor(torch.int16) == i).all()) for i, lease in enumerate(leases))
        addrs = sorted((l.address, l.size) for l in leases)
        checks["no_overlap"] = all(a + s <= b for (a, s), (b, _) in zip(addrs, addrs[1:]))
        checks["aligned"] = all(l.address % pool.config.alignment == 0 for l in leases)
        st = pool.stats()
        during = proc_status()
        vmlck = during.get("VmLck", 0) - before.get("VmLck", 0)
        vmrss = during.get("VmRSS", 0) - before.get("VmRSS", 0)
        checks["requested_exact"] = st.requested == sum(sizes)
        checks["locked_matches_vmlck"] = st.locked == vmlck
        if st.lock_failures:
            notes.append(f"mlock was refused for {st.lock_failures} arenas (memlock limit); "
                         "the pool went on with unlocked memory (lock='auto')")
        for lease in leases:
            lease.release()
        pool.trim()  # the retain budget may keep an empty shared arena mapped
        end = pool.stats()
        checks["back_to_baseline"] = end.reserved == 0 and end.leases == 0 and end.locked == 0
        checks["vmlck_back"] = proc_status().get("VmLck", 0) == before.get("VmLck", 0)
    return SelfCheckResult(
        ok=all(checks.values()), checks=checks, leases=len(sizes), requested_bytes=st.requested,
        reserved_bytes=st.reserved, locked_bytes=st.locked, vmlck_delta_bytes=vmlck,
        vmrss_delta_bytes=vmrss, lock_failures=st.lock_failures,
        overhead=st.reserved / st.requested, notes=notes)
