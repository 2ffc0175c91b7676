"""memascend.readahead.ForwardReadAhead: the first forward's order is recorded; later
forwards, half-way through, ask once for the state of the parameters backward reaches first
(forward's order reversed), within the byte limit, and only when a fused backward is
expected; in offload_model it reads ahead and training stays bitwise."""
from __future__ import annotations

import torch

from memascend import AdamW, offload_model
from memascend.readahead import ForwardReadAhead


def _ra(expect=True, limit=10_000):
    asked: list[list[str]] = []
    shapes = {"a": (100,), "b": (200,), "c": (300,), "d": (400,)}
    ra = ForwardReadAhead(shapes, lambda n: [f"m/{n}", f"v/{n}"], lambda: expect,
                          asked.append, limit)
    return ra, asked


def test_first_forward_is_recorded_then_half_way_asks_once_in_reverse():
    ra, asked = _ra()
    for names in (["a"], ["b", "c"], ["d"], ["a"]):  # a module called twice
        ra.fetched(names)
    assert ra.order == ["a", "b", "c", "d"] and asked == []
    ra.backward_starts()
    ra.fetched(["a"])
    assert asked == []  # a quarter of the way
    ra.fetched(["b"])
    # d, c and b fit in 10,000 bytes (3,200 + 2,400 + 1,600); a would make 8,000: fits too
    assert asked == [["m/d", "v/d", "m/c", "v/c", "m/b", "v/b", "m/a", "v/a"]]
    ra.fetched(["c", "d"])
    assert len(asked) == 1  # once per forward
    ra.backward_starts()
    ra.fetched(["a", "b"])
    assert len(asked) == 2 and ra.issued_bytes == 2 * 8000


def test_limit_and_no_fused_backward_expected():
    ra, asked = _ra(limit=6000)
    ra.fetched(["a", "b", "c", "d"])
    ra.backward_starts()
    ra.fetched(["a", "b"])
    assert asked == [["m/d", "v/d", "m/c", "v/c"]]  # b would pass 6,000 bytes
    ra2, asked2 = _ra(expect=False)
    ra2.fetched(["a", "b", "c", "d"])
    ra2.backward_starts()
    ra2.fetched(["a", "b", "c", "d"])
    assert asked2 == []


def test_offload_model_reads_moments_ahead_in_forward_and_stays_bitwise(tmp_path):
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(),  # noqa: E731
                                       torch.nn.Linear(64, 64), torch.nn.Linear(64, 10))
    model = make()
    ref = make()
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 32, generator=gen), torch.randn(8, 10, generator=gen))
            for _ in range(4)]
    with offload_model(model, str(tmp_path), budget="2MiB", optimizer=AdamW(lr=1e-2),
                       accumulation_steps=1) as om:
        for x, y in data:
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            om.step()
            om.zero_grad()
            want = torch.nn.functional.mse_loss(ref(x), y)
            want.backward()
            opt.step()
            opt.zero_grad()
            assert loss.item() == want.item()
        assert om._readahead.order and om._readahead.issued_bytes > 0
        assert om.optim_sw.stats().wasted_prefetches == 0


def test_evaluation_forward_does_not_use_up_the_read_ahead(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    with offload_model(model, str(tmp_path), budget="2MiB", accumulation_steps=1) as om:
        for _ in range(2):
            model(torch.randn(2, 16)).sum().backward()
            om.step()
            om.zero_grad()
        before = om._readahead.issued_bytes
        with torch.no_grad():
            model(torch.randn(2, 16))  # evaluation: no backward follows
        assert om._readahead.issued_bytes == before
        model(torch.randn(2, 16)).sum().backward()  # the training forward still reads ahead
        om.step()
        assert om._readahead.issued_bytes > before
