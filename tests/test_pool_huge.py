"""Transparent huge pages for large arenas: 2 MiB alignment, exact sizes, the "off" mode."""
from __future__ import annotations

import pytest

from memascend import ConfigError, PinnedPool, PoolConfig
from memascend.sysinfo import proc_status

MiB = 1 << 20


def thp_mode() -> str:
    """The kernel's THP mode: "always", "madvise", "never", or "absent"."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            text = f.read()
    except OSError:
        return "absent"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else "absent"


def huge_page_size() -> int:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 * MiB


def anon_huge_bytes(address: int, size: int) -> int:
    """AnonHugePages of the mappings overlapping [address, address + size), in bytes."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo < address + size and hi > address
            elif inside and line.startswith("AnonHugePages:"):
                total += int(line.split()[1]) * 1024
    return total


THP_ON = thp_mode() in ("always", "madvise")
needs_thp = pytest.mark.skipif(not THP_ON, reason=f"transparent huge pages are {thp_mode()!r} "
                                                  "here (need 'always' or 'madvise')")


@needs_thp
@pytest.mark.parametrize("lock", ["off", "auto"])
def test_auto_large_lease_is_huge_page_aligned_and_exact(make_pool, lock):
    pool = make_pool(lock=lock, huge_pages="auto")
    hp = huge_page_size()
    with pool.lease(8 * MiB) as a, pool.lease(5 * MiB + 3) as b:
        assert a.address % hp == 0 and b.address % hp == 0
        assert a.size == 8 * MiB and b.size == 5 * MiB + 4096  # exact, as without huge pages
        st = pool.stats()
        assert st.huge_page_size == hp
        assert st.reserved == a.size + b.size  # the over-mapped head/tail went back
        assert st.huge_advised == st.reserved
        assert st.huge_advise_failures == 0
        a.as_numpy("u1")[:] = 7
        assert int(a.as_numpy("u1")[-1]) == 7
    st = pool.stats()
    assert st.reserved == 0 and st.huge_advised == 0 and st.huge_advised_peak == 13 * MiB + 4096


@needs_thp
def test_small_leases_and_small_arenas_are_not_advised(make_pool):
    pool = make_pool(lock="off", huge_pages="auto", retain_bytes=0)
    with pool.lease(1 * MiB), pool.lease(4096):
        st = pool.stats()
        assert st.huge_advised == 0  # a 1 MiB arena and a 256 KiB shared arena
        assert st.reserved == 1 * MiB + 256 * 1024


def test_off_keeps_small_pages_and_the_same_sizes(make_pool):
    pool = make_pool(lock="off", huge_pages="off")
    with pool.lease(8 * MiB) as lease:
        assert lease.size == 8 * MiB and lease.address % 4096 == 0
        st = pool.stats()
        assert st.huge_page_size == 0
        assert st.huge_advised == 0 and st.huge_advise_failures == 0
        assert st.reserved == 8 * MiB
        if thp_mode() == "madvise":  # under "always" the kernel may use huge pages by itself
            assert anon_huge_bytes(lease.address, lease.size) == 0


@needs_thp
def test_advised_arena_gets_anon_huge_pages(make_pool):
    pool = make_pool(lock="off", huge_pages="auto", populate=True)
    with pool.lease(8 * MiB) as lease:
        got = anon_huge_bytes(lease.address, lease.size)
        if got == 0:
            pytest.skip("THP is on but the fault path gave no huge pages (memory fragmented, "
                        "or the defrag setting does not compact on fault)")
        assert 0 < got <= 8 * MiB
        assert got % huge_page_size() == 0


@needs_thp
def test_huge_arenas_keep_rss_and_vmlck_exact(make_pool):
    before = proc_status()
    pool = make_pool(lock="auto", huge_pages="auto", populate=True)
    with pool.lease(16 * MiB):
        st = pool.stats()
        now = proc_status()
        assert now["VmLck"] - before["VmLck"] == st.locked
        assert now["VmRSS"] - before["VmRSS"] >= 16 * MiB * 0.98
    pool.trim()
    assert pool.stats().reserved == 0
    assert proc_status()["VmLck"] == before["VmLck"]


def test_huge_pages_config(monkeypatch):
    assert PoolConfig().huge_pages == "auto"
    with pytest.raises(ConfigError, match="huge_pages"):
        PoolConfig(huge_pages="always")
    monkeypatch.setenv("MEMASCEND_POOL_HUGE_PAGES", "off")
    assert PoolConfig.from_env().huge_pages == "off"
    with PinnedPool(lock="off") as pool:
        assert pool.config.huge_pages == "off"
        assert pool.stats().huge_page_size == 0
