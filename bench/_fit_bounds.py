"""The two bounds a training step under SSD offload cannot beat, measured on this machine.

A step must move its bytes through the disk and must do its arithmetic; with perfect overlap
it takes max(I/O time, compute time). This module measures both, outside the training run.
The compute time is a bound for a design that overlaps the optimizer step with backward, as
memascend's fused step does: neither phase runs faster than it does alone in RAM, and the two
together cannot use more than the machine's cores, so the bound is max(forward + backward,
AdamW, their CPU-seconds over the cores) (``serial_seconds`` keeps their sum; on this 2-core
machine each phase alone keeps about one core busy, so the sum overstated the bound):

* **Disk bandwidth** (:func:`measure_bandwidth`): memascend's :class:`~memascend.SwapEngine`
  in its default configuration (the one training uses) writes then reads one preallocated
  O_DIRECT file from a pinned lease, one request per direction, ``reps`` times. The I/O bound
  of a step is then its bytes read / read bandwidth + bytes written / write bandwidth.
* **Compute** (:func:`measure_compute`): the step's arithmetic with every weight in RAM,
  measured for the *whole* model, not extrapolated from a part. Forward + backward runs the
  real graph — embedding, then ``num_hidden_layers`` calls of one ``LlamaDecoderLayer``, each
  under reentrant activation checkpointing as in training (forward, then recompute +
  backward), final norm, head and cross-entropy — with the one layer's weights shared by all
  layer calls, since a model of identical layers does the same arithmetic either way, and the
  measurement stays small on a shared machine (llama-1b's weights and gradients alone would
  take 8.8 GB). Each
  weight's gradient is dropped as it arrives (a post-accumulate hook sets ``.grad`` to None),
  as memascend does after moving it to SSD, so the shared weights never accumulate gradients.
  AdamW runs ``torch.optim.adamw.adamw`` (single tensor, as ``om.step()`` calls it) once per
  parameter of the model, in model order, on fp32 master, gradient and moments of that
  parameter's shape. Tensors of one shape rotate among enough buffer sets that the set of
  each shape spans at least ``2 x`` the 32 MiB last-level cache here, so updates do not run
  from cache (only tensors too small to matter stay there: the norms, 0.01 % of the
  parameters). The second moments are non-negative, as real ones are: negative ones make
  ``sqrt`` return NaN, and NaN arithmetic made this update ~2x slower here.
  A layer's weights (176 MB for llama-1b) are far larger than that cache too, so sharing them
  across layer calls does not make the forward or backward faster than with distinct weights.

Copies into pinned buffers, CRC32C and the swappers' bookkeeping are host work the offload
adds; they are not compute, and an overlap efficiency below 1 exposes them.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import statistics
import time
from typing import Any, Callable

from bench._proc import cpu_seconds, other_cpu

MiB = 1 << 20
CACHE_SPAN = 64 * MiB  # 2x the last-level cache of this machine (32 MiB)


def measure_bandwidth(directory: str, nbytes: int, reps: int = 2) -> dict[str, Any]:
    """Write then read ``nbytes`` of an O_DIRECT file in ``directory`` through a default
    SwapEngine, ``reps`` times.

    Returns
    -------
    dict
        ``write_bytes_per_s`` and ``read_bytes_per_s`` (medians), every sample, the backend.
    """
    import torch

    from memascend import PinnedPool, SwapEngine

    path = os.path.join(directory, "bandwidth.bin")
    pool = engine = lease = None
    fd = -1
    fid = None
    samples: dict[str, list[float]] = {"write": [], "read": []}
    try:
        pool = PinnedPool(lock="auto")
        engine = SwapEngine()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        os.posix_fallocate(fd, 0, nbytes)
        fid = engine.register_file(fd, path)
        lease = pool.lease(nbytes)
        t = lease.as_tensor(torch.uint8)
        pattern = torch.randint(0, 256, (64 * MiB,), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(7))
        for off in range(0, nbytes, pattern.numel()):
            n = min(pattern.numel(), nbytes - off)
            t[off:off + n].copy_(pattern[:n])
        del t  # the pool frees a lease only when no tensor views it
        engine.write(fid, lease.address, nbytes, 0).wait()  # allocate the extents once
        os.fsync(fd)
        for _ in range(reps):
            for op in ("write", "read"):
                t0 = time.perf_counter()
                getattr(engine, op)(fid, lease.address, nbytes, 0).wait()
                samples[op].append(nbytes / (time.perf_counter() - t0))
        backend = engine.backend
    finally:
        if lease is not None:
            lease.release()
        if fid is not None and engine is not None:
            engine.unregister_file(fid)
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        if engine is not None:
            engine.close()
        if pool is not None:
            pool.close()
    return {"bytes": nbytes, "backend": backend,
            "write_bytes_per_s": statistics.median(samples["write"]),
            "read_bytes_per_s": statistics.median(samples["read"]), "samples": samples,
            "method": "SwapEngine() default config, one O_DIRECT request of `bytes` per "
                      "direction from a pinned lease, write then read, medians"}


def _timed(fn: Callable[[], None], warmups: int, reps: int) -> list[dict[str, float]]:
    """Run ``fn`` ``warmups`` times untimed, then ``reps`` times; each timed run's seconds and
    the CPU others took meanwhile."""
    for _ in range(warmups):
        fn()
    out = []
    for _ in range(reps):
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        fn()
        out.append({"seconds": time.perf_counter() - t0, **other_cpu(c0, cpu_seconds())})
    return out


def measure_compute(cfg_dict: dict[str, Any], shapes: list[tuple[str, tuple[int, ...]]],
                    batch: int, seq_len: int, lr: float, warmups: int = 1,
                    reps: int = 2) -> dict[str, Any]:
    """One round of the whole model's forward + backward and AdamW compute, weights in RAM,
    fp32 (see the module docstring).

    Parameters
    ----------
    cfg_dict:
        ``transformers.LlamaConfig`` keyword arguments.
    shapes:
        (name, shape) of every parameter in model order (the AdamW pass follows it).
    batch, seq_len:
        The training batch; token ids are random bytes, as the training corpus is.
    lr:
        AdamW learning rate (irrelevant to the time; the training one for fidelity).

    Returns
    -------
    dict
        ``forward_backward`` and ``adamw``: the timed samples of each.
    """
    import torch
    import torch.optim.adamw as adamw_mod

    fb = _timed(_forward_backward(cfg_dict, batch, seq_len), warmups, reps)

    per_shape = collections.Counter(s for _n, s in shapes)
    sets: dict[tuple[int, ...], list[list[Any]]] = {}
    for shape, count in per_shape.items():
        nbytes = 4 * 4 * math.prod(shape)  # master, gradient, m, v in fp32
        k = min(count, max(1, -(-CACHE_SPAN // nbytes)))
        sets[shape] = [[torch.randn(shape) * 0.02, torch.randn(shape) * 1e-3,
                        torch.randn(shape) * 1e-4, torch.rand(shape) * 1e-6] for _ in range(k)]
    step_t = [torch.tensor(1.0) for _ in shapes]

    def adamw() -> None:
        used: collections.Counter = collections.Counter()
        for i, (_n, shape) in enumerate(shapes):
            master, grad, m, vv = sets[shape][used[shape] % len(sets[shape])]
            used[shape] += 1
            adamw_mod.adamw([master], [grad], [m], [vv], [], [step_t[i]], foreach=False,
                            capturable=False, differentiable=False, fused=None, amsgrad=False,
                            beta1=0.9, beta2=0.999, lr=lr, weight_decay=0.0, eps=1e-8,
                            maximize=False)

    ad = _timed(adamw, warmups, reps)
    return {"forward_backward": fb, "adamw": ad, "torch_threads": torch.get_num_threads(),
            "adamw_buffer_bytes": sum(16 * math.prod(s) * len(b) for s, b in sets.items())}


def _forward_backward(cfg_dict: dict[str, Any], batch: int, seq_len: int) -> Callable[[], None]:
    """A function running the whole model's forward + backward with one decoder layer's
    weights shared by every layer call (see the module docstring)."""
    import torch
    import torch.utils.checkpoint
    import transformers
    from transformers.models.llama.modeling_llama import (LlamaDecoderLayer, LlamaRMSNorm,
                                                          LlamaRotaryEmbedding)

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(**cfg_dict, attn_implementation="sdpa")
    h, v = cfg.hidden_size, cfg.vocab_size
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, layer_idx=0)
    embed, norm = torch.nn.Embedding(v, h), LlamaRMSNorm(h, eps=cfg.rms_norm_eps)
    head = torch.nn.Linear(h, v, bias=False)
    rotary = LlamaRotaryEmbedding(cfg)
    for m in (embed, layer, norm, head):
        m.train()
        for p in m.parameters():
            if p.dim() > 1:
                with torch.no_grad():
                    p.normal_(0.0, cfg.initializer_range)  # as the model's _init_weights
            p.register_post_accumulate_grad_hook(_drop_grad)
    ids = torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(seq_len).unsqueeze(0).expand(batch, seq_len)

    def forward_backward() -> None:
        x = embed(ids)
        call = functools.partial(layer, position_embeddings=rotary(x, pos),
                                 attention_mask=None, position_ids=pos)  # no kwargs reentrant
        for _ in range(cfg.num_hidden_layers):
            out = torch.utils.checkpoint.checkpoint(call, x, use_reentrant=True)
            x = out[0] if isinstance(out, tuple) else out
        logits = head(norm(x))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v).float(),
                                                 ids[:, 1:].reshape(-1))
        loss.backward()

    return forward_backward


def _drop_grad(p: Any) -> None:
    p.grad = None


def combine_compute(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Whole-model compute seconds from measurement rounds: for forward + backward and for
    AdamW, the least-disturbed (minimum) timed run over all rounds (the 2 cores are shared:
    another busy process halves a 2-thread matmul, so the minimum is the closest to the
    arithmetic alone, and an error makes the compute look smaller, not larger)."""
    best = {part: min((s for r in rounds for s in r[part]), key=lambda s: s["seconds"])
            for part in ("forward_backward", "adamw")}
    fb, ad = best["forward_backward"]["seconds"], best["adamw"]["seconds"]
    # Cores the rest of the machine used, on average, during the samples kept: above ~0.2 the
    # compute is inflated (and the efficiency with it) by contention no minimum can remove.
    others = sum(b["other_cpu_s"] for b in best.values()) / (fb + ad)
    cpu = sum(b["own_cpu_s"] for b in best.values())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    return {"seconds": max(fb, ad, cpu / cores), "serial_seconds": fb + ad,
            "cpu_seconds": cpu, "cores": cores, "forward_backward_s": fb, "adamw_s": ad,
            "others_cores_during_best": others,
            "forward_backward_median_s": statistics.median(
                s["seconds"] for r in rounds for s in r["forward_backward"]),
            "adamw_median_s": statistics.median(s["seconds"] for r in rounds for s in r["adamw"]),
            "torch_threads": rounds[0]["torch_threads"], "rounds": rounds,
            "method": "whole model, weights in RAM, fp32: embedding + num_hidden_layers calls "
                      "of one LlamaDecoderLayer (weights shared, reentrant checkpoint: fwd, "
                      "recompute + bwd, gradients dropped as they arrive) + norm + lm_head + "
                      "cross-entropy; then torch adamw (single tensor) once per parameter in "
                      "model order, buffers rotated per shape over >= 64 MiB; each the "
                      "minimum timed run over the rounds (before and after the memascend "
                      "training); the bound: max(forward + backward, AdamW, their CPU-seconds "
                      "over the cores), as the optimizer step overlaps backward"}
