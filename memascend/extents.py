"""Extent allocator: where tensors live inside one swap area.

The swap area is one range of bytes (a file that grows, or a block device). Extents are
4096-aligned, sized to the rounded tensor size, chosen best-fit among free extents; a freed
extent merges with free neighbours, so the area does not splinter; a tensor that no free
extent holds may be given several (:meth:`ExtentAllocator.alloc_spans`). The allocator only does
arithmetic: growing the file and deciding when freed space may be reused are the store's job.
"""
from __future__ import annotations

import bisect
from typing import Optional

ALIGN = 4096


def round_up(n: int, a: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``a``."""
    return -(-n // a) * a


class ExtentAllocator:
    """Best-fit allocation of aligned extents in ``[0, size)``.

    Parameters
    ----------
    size:
        Current size of the area (a multiple of the alignment).
    """

    def __init__(self, size: int = 0):
        if size % ALIGN:
            raise ValueError(f"area size {size} is not a multiple of {ALIGN}")
        self.size = 0
        self._starts: list[int] = []   # sorted offsets of free extents
        self._free: dict[int, int] = {}  # offset -> length
        self.free_bytes = 0
        if size:
            self.grow(size)

    def grow(self, new_size: int) -> None:
        """Extend the area to ``new_size``; the new tail becomes free."""
        if new_size % ALIGN or new_size < self.size:
            raise ValueError(f"cannot grow from {self.size} to {new_size}")
        if new_size > self.size:
            start, self.size = self.size, new_size
            self.free(start, new_size - start)

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a free extent of ``round_up(nbytes)`` bytes, or None if none fits."""
        need = round_up(nbytes)
        best = None
        for off in self._starts:
            length = self._free[off]
            if length >= need and (best is None or length < self._free[best]):
                best = off
                if length == need:
                    break
        if best is None:
            return None
        length = self._free.pop(best)
        self._starts.remove(best)
        if length > need:
            self._free[best + need] = length - need
            bisect.insort(self._starts, best + need)
        self.free_bytes -= need
        return best

    def alloc_spans(self, nbytes: int, min_span: int,
                    max_spans: int) -> Optional[tuple[tuple[int, int], ...]]:
        """Room for ``round_up(nbytes)`` bytes in several free extents, for when no single
        one fits: the largest first, each at least ``min_span`` bytes (smaller holes are not
        worth a request), at most ``max_spans`` of them; ``(offset, length)`` pairs in the
        order they hold the bytes, or None (nothing taken) when they cannot."""
        need = round_up(nbytes)
        holes = sorted(((n, o) for o, n in self._free.items() if n >= min_span),
                       reverse=True)[:max_spans]
        if sum(n for n, _o in holes) < need:
            return None
        spans = []
        left = need
        for n, o in holes:
            take = min(n, left)
            spans.append((o, take))
            left -= take
            if not left:
                break
        for o, take in spans:
            self.reserve(o, take)
        return tuple(spans)

    def reserve(self, offset: int, nbytes: int) -> None:
        """Mark ``[offset, offset+round_up(nbytes))`` used (when reloading a manifest).

        Raises
        ------
        ValueError
            The range is not entirely free.
        """
        need = round_up(nbytes)
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0:
            raise ValueError(f"extent {offset}+{need} is not free")
        start = self._starts[i]
        length = self._free[start]
        if offset + need > start + length:
            raise ValueError(f"extent {offset}+{need} is not free")
        del self._free[start]
        self._starts.pop(i)
        if offset > start:
            self._free[start] = offset - start
            bisect.insort(self._starts, start)
        tail = start + length - (offset + need)
        if tail:
            self._free[offset + need] = tail
            bisect.insort(self._starts, offset + need)
        self.free_bytes -= need

    def free(self, offset: int, nbytes: int) -> None:
        """Return an extent, merging it with free neighbours.

        Raises
        ------
        ValueError
            The extent is misaligned, outside the area, or overlaps free space (double free).
        """
        length = round_up(nbytes)
        if offset % ALIGN or offset < 0 or offset + length > self.size or length <= 0:
            raise ValueError(f"bad extent {offset}+{length} in an area of {self.size} bytes")
        i = bisect.bisect_left(self._starts, offset)
        if i < len(self._starts) and self._starts[i] < offset + length:
            raise ValueError(f"extent {offset}+{length} overlaps free space (double free?)")
        if i > 0:
            p = self._starts[i - 1]
            if p + self._free[p] > offset:
                raise ValueError(f"extent {offset}+{length} overlaps free space (double free?)")
        self.free_bytes += length
        # merge with the next free extent
        if i < len(self._starts) and self._starts[i] == offset + length:
            length += self._free.pop(self._starts[i])
            self._starts.pop(i)
        # merge with the previous one
        if i > 0:
            p = self._starts[i - 1]
            if p + self._free[p] == offset:
                self._free[p] += length
                return
        self._free[offset] = length
        self._starts.insert(i, offset)

    def free_extents(self) -> list[tuple[int, int]]:
        """The free extents as sorted ``(offset, length)`` pairs."""
        return [(o, self._free[o]) for o in self._starts]

    @property
    def used_bytes(self) -> int:
        """Bytes allocated."""
        return self.size - self.free_bytes
