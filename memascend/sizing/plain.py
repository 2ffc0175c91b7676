"""memascend's plain path (``offload_model``): budgets, tier bytes, arenas, transients and
the activations of a LLaMA forward (see :mod:`memascend.sizing`).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from .common import OFFLOAD_DEFAULT_BUDGET, round_up


# ---------------------------------------------------------------------------------------------
# memascend's plain path (offload_model)
# ---------------------------------------------------------------------------------------------

def offload_budgets(budget: Optional[int] = None,
                    optimizer_budget: Optional[int] = None) -> tuple[int, int]:
    """The two pinned budgets ``offload_model`` uses: ``budget`` (default 1 GiB) and
    ``optimizer_budget`` (default: ``budget``), as ``offload_model`` resolves them
    (:class:`memascend.offload_types.OffloadOptions`)."""
    b = OFFLOAD_DEFAULT_BUDGET if budget is None else int(budget)
    return b, (int(optimizer_budget) if optimizer_budget else b)


def offload_tier_bytes(numels: Sequence[int], compute_bytes: int,
                       grads: bool = True) -> tuple[int, int]:
    """Bytes each tier of ``offload_model`` stores, as pool leases / store extents (4096-
    rounded per tensor): the parameter tier one compute-dtype copy per parameter (in fp32 it
    is the master weight itself); the optimizer tier AdamW's ``m`` and ``v``, the fp32 master
    when the compute dtype is not fp32, and the accumulated gradient ``g`` when gradients are
    stored (``grads``: see :func:`offload_stores_grads`), fp32 each.

    Returns
    -------
    (param_tier_bytes, optimizer_tier_bytes)
    """
    p = sum(round_up(n * compute_bytes) for n in numels)
    per = 2 + (compute_bytes != 4) + bool(grads)
    o = per * sum(round_up(n * 4) for n in numels)
    return p, o


def offload_stores_grads(micro_batches: int = 1, accumulation_declared: bool = False,
                         clipping: bool = False) -> bool:
    """Whether ``offload_model`` keeps gradients in its optimizer tier at steady state: when
    micro-batches accumulate, when the window length is learned rather than declared
    (``accumulation_steps=None``, the default: a fused window keeps its gradients so that a
    longer one can be undone), or with gradient clipping (to redo a clipped window)."""
    return micro_batches > 1 or not accumulation_declared or clipping


def offload_arena_bytes(numels: Sequence[int], compute_bytes: int,
                        budget: Optional[int] = None,
                        optimizer_budget: Optional[int] = None) -> tuple[int, int]:
    """The pinned arena ``offload_model`` maps (and locks) once per tier: the tier's budget,
    or what the tier can use if less (the parameter copies; up to four fp32 tensors per
    parameter in the optimizer tier), plus the tier's largest tensor as slack against
    fragmentation. The whole arena is reserved at the first lease and kept until close.

    Returns
    -------
    (param_arena, optimizer_arena)
    """
    b, ob = offload_budgets(budget, optimizer_budget)
    numels = list(numels) or [1]
    per_opt = 3 if compute_bytes == 4 else 4  # m, v, g (+ the fp32 master)
    need_p = sum(round_up(n * compute_bytes) for n in numels)
    need_o = sum(per_opt * round_up(n * 4) for n in numels)
    big = max(numels)
    return (min(b, need_p) + round_up(big * compute_bytes),
            min(ob, need_o) + round_up(big * 4))


def offload_pinned_bytes(numels: Sequence[int], compute_bytes: int, budget: Optional[int] = None,
                         optimizer_budget: Optional[int] = None) -> tuple[int, int]:
    """Pinned bytes of each of ``offload_model``'s two tiers: its arena
    (:func:`offload_arena_bytes`), reserved and locked whole from the first lease.

    Returns
    -------
    (param_pinned, optimizer_pinned)
    """
    return offload_arena_bytes(numels, compute_bytes, budget, optimizer_budget)


def offload_queue_bytes(numels: Sequence[int], optimizer_budget: int) -> int:
    """Most gradient bytes backward hands to the optimizer's worker before it waits: the
    largest parameter's fp32 bytes, or a quarter of the optimizer budget up to 64 MiB."""
    return max(max(numels, default=1) * 4, min(int(optimizer_budget) // 4, 64 << 20))


def offload_step_transient_bytes(largest_numel: int) -> int:
    """Unpinned peak of one AdamW update: the single-tensor form computes
    ``exp_avg_sq.sqrt()`` and divides it (two fp32 temporaries of the parameter's size). With
    the step fused into backward this is on the worker thread during backward."""
    return 2 * int(largest_numel) * 4


def backward_transient_allocations(largest_numel: int, compute_bytes: int, tokens: int,
                                   vocab_size: int) -> list[int]:
    """Unpinned transients at the start of backward, on top of the saved activations: the
    gradient of the log-softmax input and output (2 × tokens × vocab fp32) and one weight
    gradient in the compute dtype (the largest) before its hook (or DeepSpeed's bucket) takes
    it."""
    return [int(tokens) * int(vocab_size) * 4] * 2 + [int(largest_numel) * compute_bytes]


def llama_activation_bytes(cfg: Mapping[str, Any], batch: int, seq: int, elem_bytes: int,
                           checkpointing: bool = False) -> int:
    """Bytes autograd saves in a LLaMA forward pass for backward (transformers
    ``LlamaForCausalLM`` with SDPA attention, which on CPU does not keep the S × S matrix).

    Per token and decoder layer: ``5h + 3·q_dim + 2·kv_dim + 4·I`` elements (the RMSNorm
    inputs and outputs, rotated q and k, v, the attention output and its contiguous copy, and
    the four MLP tensors: gate, up, SiLU(gate), their product); per token once: ``3h + V``
    (final norm, log-softmax output). Counted with ``saved_tensors_hooks`` (unique storages)
    for three shapes, within 0.3 %. With per-layer activation checkpointing only each layer's
    input is kept, plus one layer's worth during its recompute.

    Parameters
    ----------
    cfg:
        LLaMA config dict (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
        ``num_attention_heads``, optional ``num_key_value_heads``, ``head_dim``,
        ``vocab_size``).
    batch, seq:
        Sequences per micro-batch and tokens per sequence.
    elem_bytes:
        Compute dtype size (4 for fp32). A non-fp32 model also keeps fp32 logits.
    checkpointing:
        Per-layer activation checkpointing.
    """
    h = int(cfg["hidden_size"])
    inter = int(cfg["intermediate_size"])
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    vocab = int(cfg["vocab_size"])
    tokens = int(batch) * int(seq)
    per_layer = 5 * h + 3 * heads * head_dim + 2 * kv * head_dim + 4 * inter
    top = 3 * h + vocab
    if checkpointing:
        elems = layers * h + per_layer + top
    else:
        elems = layers * per_layer + top
    extra_fp32_logits = tokens * vocab * 4 if elem_bytes != 4 else 0
    return tokens * elems * elem_bytes + extra_fp32_logits


def llama_activation_tier_bytes(cfg: Mapping[str, Any], batch: int, seq: int, elem_bytes: int,
                                checkpointing: bool = False) -> tuple[int, int]:
    """What ``offload_model(..., activations="ssd")`` does to :func:`llama_activation_bytes`:
    every tensor forward saves goes to the activation tier's store and comes back when
    backward needs it, so RAM holds one layer's worth (the layer being recomputed or
    backpropagated) and the top of the model (final norm, log-probabilities) at a time, an
    upper bound that counts both at once; the tier writes and reads the rest: each layer's
    input with checkpointing, every layer's saved tensors without, and the top.

    Returns
    -------
    (bytes left in RAM, bytes the tier writes and reads back per micro-batch)
    """
    total = llama_activation_bytes(cfg, batch, seq, elem_bytes, checkpointing)
    ram = llama_activation_bytes(dict(cfg, num_hidden_layers=1), batch, seq, elem_bytes)
    if not checkpointing:
        return ram, total
    one_layer = ram - llama_activation_bytes(dict(cfg, num_hidden_layers=0), batch, seq,
                                             elem_bytes)
    return ram, total - one_layer  # a recomputed layer's tensors are used at once
