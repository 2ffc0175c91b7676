"""The drop-in's gradient norm scratch gives stage 3's norm bit for bit.

Stage 3 takes the float64 2-norm of every gradient partition it receives
(``_constant_buffered_norm2``: a fresh float64 copy per part). With streamed gradients the
drop-in converts each part into one reused scratch instead (``GradPieces.norm2``), so a fixed
mmap threshold does not map and fault in a fresh copy per partition. These tests check the
result against DeepSpeed's own method on random sizes, offsets and split sizes, and that the
scratch is counted and given back at the end of a backward.
"""
from __future__ import annotations

import random

import pytest
import torch

from memascend.integrations.deepspeed.grads import GradPieces

stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")


def _pieces(n: int) -> GradPieces:
    swapper = type("Sw", (), {"piece_numel": n, "rt": None})()
    return GradPieces(swapper, [])


def test_norm2_has_stage3s_bits():
    ds_norm = stage3.DeepSpeedZeroOptimizer_Stage3._constant_buffered_norm2
    g = _pieces(1 << 20)
    rnd = random.Random(7)
    for _ in range(300):
        n = rnd.choice([rnd.randint(1, 3000), rnd.randint(1, 1 << 20), (1 << 20) + 5])
        scale = rnd.choice([1e-4, 1.0, 1e4])
        gen = torch.Generator().manual_seed(rnd.randrange(1 << 30))
        base = torch.randn(n + 32, generator=gen) * scale
        x = base.narrow(0, rnd.randint(0, 31), n)  # any alignment
        split = rnd.choice([250000000, 999, 65536])
        want = ds_norm(None, x, split)
        got = g.norm2(x, split, torch.float64)
        assert got.dtype == want.dtype
        assert got.item() == want.item(), (n, split)


def test_norm2_scratch_is_counted_reused_and_freed():
    g = _pieces(1 << 16)
    g.norm2(torch.ones(1000), 250000000, torch.float64)
    assert g.stats()["norm_scratch_bytes"] == 8000
    buf = g._norm_buf
    g.norm2(torch.ones(500), 250000000, torch.float64)
    assert g._norm_buf is buf  # a smaller part reuses it
    g.norm2(torch.ones(3000), 250000000, torch.float64)
    assert g.stats()["norm_scratch_bytes"] == 24000
    g.norm2(torch.ones((1 << 16) + 1), 250000000, torch.float64)  # over a piece: fresh copy
    assert g.stats()["norm_scratch_bytes"] == 24000
    g._free_scratch()
    assert g._norm_buf is None and g.stats()["norm_scratch_bytes"] == 0
