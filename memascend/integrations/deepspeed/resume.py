"""What DeepSpeed's load of an NVMe-offloaded optimizer leaves out: sub-groups kept in memory.

Stage 3 keeps a sub-group's fp32 master partition (and its Adam state, in the torch
optimizer) in memory instead of on NVMe when it is smaller than the swappable minimum (1 MiB
or the aio block): a tiny model's only sub-group, or the small ones that HF's weight-decay /
no-decay parameter groups produce (every norm weight, biases). ``DeepSpeedEngine.
load_checkpoint`` with ``offload_optimizer`` on NVMe copies the swap folder back and rewrites
the parameters from the masters, but it never reads the checkpoint's ZeRO file, where those
in-memory masters and moments are: they stay as the fresh process built them, and the run
resumes from the initial weights for those tensors (measured: every RMSNorm weight and
``lm_head`` of a tiny LLaMA under HF Trainer; stock DeepSpeed 0.19.8 has the same fault).
:func:`restore_in_memory_groups`, called by the drop-in's ``load_checkpoint`` after
DeepSpeed's, reads that file and restores them the way stage 3's own
``_rigid_load_state_dict`` does for the CPU-offload case: the fp32 partitions, the torch
optimizer's state and the loss scaler (unless only the module is loaded; DeepSpeed's NVMe
path skips the loss scaler too), then the parameters from the masters.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from ...errors import MetadataError


def _tag(load_dir: str, tag: Optional[Any]) -> Optional[str]:
    if tag is not None:
        return str(tag)
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        return f.read().strip()


def in_memory_groups(optimizer: Any) -> list[int]:
    """Sub-groups of stage 3's optimizer whose fp32 master stays in memory."""
    return [i for i in range(len(optimizer.fp16_groups))
            if not optimizer._swappable_optimizer_subgroup(i)]


def restore_in_memory_groups(engine: Any, load_dir: str, tag: Optional[Any],
                             load_optimizer_states: bool = True) -> list[int]:
    """After ``engine.load_checkpoint(load_dir, tag)`` with the optimizer on NVMe: restore the
    in-memory sub-groups from the checkpoint's ZeRO file (see the module docstring); returns
    the sub-groups restored.

    Raises
    ------
    MetadataError
        The checkpoint's ZeRO file is missing or does not hold those sub-groups.
    """
    import torch
    from deepspeed.checkpoint.constants import (FP32_FLAT_GROUPS, LOSS_SCALER,
                                                OPTIMIZER_STATE_DICT)

    opt = engine.optimizer
    small = in_memory_groups(opt)
    name = _tag(load_dir, tag)
    if name is None:
        return []
    path = engine._get_zero_ckpt_name(load_dir, name)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        flats = saved[FP32_FLAT_GROUPS]
    except (OSError, KeyError, TypeError) as exc:
        raise MetadataError(f"cannot read the optimizer's ZeRO state (fp32 masters of "
                            f"its in-memory sub-groups {small}, loss scaler) ({exc}); the "
                            "checkpoint is incomplete", path=path) from exc
    if load_optimizer_states and LOSS_SCALER in saved:  # fp16: the dynamic loss scale too
        opt.loss_scaler = saved[LOSS_SCALER]
        opt.dynamic_loss_scale = saved.get("dynamic_loss_scale", opt.dynamic_loss_scale)
        opt.overflow = saved.get("overflow", opt.overflow)
    if not small:
        return []
    for i in small:
        cur = opt.fp32_partitioned_groups_flat[i]
        if i >= len(flats) or flats[i].numel() != cur.numel():
            raise MetadataError(f"sub-group {i} holds "
                                f"{flats[i].numel() if i < len(flats) else 'no'} fp32 elements, "
                                f"this model's has {cur.numel()}; a checkpoint of another model "
                                "or partitioning", path=path)
        cur.data.copy_(flats[i].data)
    if load_optimizer_states:
        opt._set_fp32_optimizer_param_groups()
        try:
            opt.optimizer.load_state_dict(saved[OPTIMIZER_STATE_DICT])
        finally:
            opt._clear_fp32_optimizer_param_groups()
    for i in small:  # the parameters from the restored masters (DeepSpeed's own write-back)
        opt._reassign_or_swap_out_partitioned_parameters(i)
    return small
