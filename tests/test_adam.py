"""The one AdamW update (memascend.adam): the sliced in-place form is bitwise torch's
AdamW(foreach=False) for every size around the slice boundaries, with and without weight
decay, over several steps; it allocates no full-size temporary; a torch whose formula changed
makes it fall back to torch's function with a warning; other forms go to torch's kernels."""
from __future__ import annotations

import pytest
import torch

from memascend import adam


def _twin_steps(shape, steps, **hp):
    """Run torch.optim.AdamW(foreach=False) and adamw_update side by side; both states."""
    gen = torch.Generator().manual_seed(sum(shape) + steps)
    p0 = torch.randn(*shape, generator=gen)
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([ref], foreach=False, **hp)
    ours = p0.clone()
    m, v, step = torch.zeros_like(p0), torch.zeros_like(p0), torch.tensor(0.0)
    for _ in range(steps):
        g = torch.randn(*shape, generator=gen)
        ref.grad = g.clone()
        opt.step()
        adam.adamw_update(ours, g, m, v, step, lr=hp.get("lr", 1e-3),
                          betas=hp.get("betas", (0.9, 0.999)), eps=hp.get("eps", 1e-8),
                          weight_decay=hp.get("weight_decay", 1e-2))
    st = opt.state[ref]
    return (ref.detach(), st["exp_avg"], st["exp_avg_sq"], st["step"]), (ours, m, v, step)


@pytest.mark.parametrize("shape", [(1,), (7,), (adam.CHUNK - 1,), (adam.CHUNK,),
                                   (adam.CHUNK + 1,), (3, adam.CHUNK // 2 + 5),
                                   (4 * adam.CHUNK + 17,)])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_sliced_update_is_torchs_bitwise(shape, wd):
    ref, ours = _twin_steps(shape, 4, lr=3e-4, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    assert adam._slices_agree()
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)


def test_sliced_update_has_no_full_size_temporary():
    n = 8 * adam.CHUNK
    p, g = torch.randn(n), torch.randn(n)
    m, v, step = torch.zeros(n), torch.zeros(n), torch.tensor(0.0)
    adam.adamw_update(p, g, m, v, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                      weight_decay=0.01)  # the one-time check runs outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        adam.adamw_update(p, g, m, v, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=0.01)
    biggest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert 0 < biggest <= adam.CHUNK * 4  # the scratch slice, nothing of n elements
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        adam._torch_adamw(p, g, m, v, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=0.01)
    assert max(e.cpu_memory_usage for e in prof.events()) >= n * 4  # what it replaces


def test_changed_torch_formula_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(adam, "_AGREE", None)
    monkeypatch.setattr(adam, "_check_slices", lambda: False)
    called = []
    monkeypatch.setattr(adam, "_sliced_adamw", lambda *a, **k: called.append(1))
    with pytest.warns(RuntimeWarning, match="does not match"):
        ref, ours = _twin_steps((100,), 2)
    assert not called
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)
    monkeypatch.setattr(adam, "_check_slices", lambda: True)
    monkeypatch.setattr(adam, "_AGREE", None)
    assert adam._slices_agree()


def test_the_check_detects_a_different_formula(monkeypatch):
    real = adam._sliced_adamw

    def off_by_eps(param, grad, m, v, step, *, eps, **hp):
        real(param, grad, m, v, step, eps=eps * 2, **hp)

    monkeypatch.setattr(adam, "_sliced_adamw", off_by_eps)
    assert adam._check_slices() is False


@pytest.mark.parametrize("kind", ["fused", "foreach", "float64", "strided"])
def test_other_forms_use_torchs_kernels(kind, monkeypatch):
    monkeypatch.setattr(adam, "_sliced_adamw",
                        lambda *a, **k: pytest.fail("sliced form used for " + kind))
    dtype = torch.float64 if kind == "float64" else torch.float32
    p = torch.randn(64, 2, dtype=dtype)
    if kind == "strided":
        p = p.t()
    g, m, v = torch.randn_like(p), torch.zeros_like(p), torch.zeros_like(p)
    adam.adamw_update(p, g, m, v, torch.tensor(0.0), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                      weight_decay=0.0, fused=kind == "fused", foreach=kind == "foreach")
    assert torch.isfinite(p).all()
