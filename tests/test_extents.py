"""ExtentAllocator against a byte-map model: extents never overlap, stay aligned, coalesce."""
from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from memascend.extents import ALIGN, ExtentAllocator, round_up


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5 * ALIGN + 7)), max_size=80))
def test_alloc_free_model(ops):
    a = ExtentAllocator(64 * ALIGN)
    live: dict[int, int] = {}
    for do_alloc, n in ops:
        if do_alloc or not live:
            off = a.alloc(n)
            if off is None:
                assert a.free_bytes < round_up(n) or all(l < round_up(n) for _o, l in a.free_extents())
                a.grow(a.size + round_up(n))
                off = a.alloc(n)
            assert off is not None and off % ALIGN == 0
            for o, m in live.items():
                assert off + round_up(n) <= o or o + round_up(m) <= off
            live[off] = n
        else:
            off = sorted(live)[n % len(live)]
            a.free(off, live.pop(off))
        assert a.used_bytes == sum(round_up(m) for m in live.values())
        ext = a.free_extents()
        for (o1, l1), (o2, _l2) in zip(ext, ext[1:]):
            assert o1 + l1 < o2, "adjacent free extents were not merged"
    for off, n in list(live.items()):
        a.free(off, n)
    assert a.free_extents() == [(0, a.size)]


def test_double_free_and_reserve():
    a = ExtentAllocator(16 * ALIGN)
    off = a.alloc(ALIGN * 2)
    a.free(off, ALIGN * 2)
    with pytest.raises(ValueError, match="double free"):
        a.free(off, ALIGN)
    a.reserve(4 * ALIGN, ALIGN)
    with pytest.raises(ValueError, match="not free"):
        a.reserve(4 * ALIGN, 1)
    assert a.used_bytes == ALIGN
    assert a.alloc(100) == 0  # best fit: the 4-block hole before the reserved block


def test_alloc_spans_takes_the_largest_holes_first_and_nothing_when_it_cannot():
    a = ExtentAllocator(16 * ALIGN)
    for off in (0, 3 * ALIGN, 10 * ALIGN):  # holes of 2, 5 and 6 blocks between them
        a.reserve(off, ALIGN)
    a.reserve(2 * ALIGN, ALIGN)
    assert [n // ALIGN for _o, n in a.free_extents()] == [1, 6, 5]
    before = a.free_extents()
    assert a.alloc_spans(13 * ALIGN, ALIGN, 8) is None  # 12 blocks free
    assert a.alloc_spans(12 * ALIGN, 2 * ALIGN, 8) is None  # the 1-block hole is too small
    assert a.alloc_spans(11 * ALIGN, ALIGN, 1) is None  # more holes than allowed
    assert a.free_extents() == before
    spans = a.alloc_spans(9 * ALIGN - 5, 2 * ALIGN, 8)
    assert spans == ((4 * ALIGN, 6 * ALIGN), (11 * ALIGN, 3 * ALIGN))
    assert a.free_bytes == 3 * ALIGN
    for off, n in spans:
        a.free(off, n)
    assert a.free_extents() == before
