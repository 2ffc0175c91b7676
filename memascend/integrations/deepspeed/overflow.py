"""Stage 3's fp16 overflow check, replaced by memascend's chunked (fused) one.

DeepSpeed's ``DeepSpeedZeroOptimizer_Stage3.has_overflow`` runs ``torch.isinf`` and
``torch.isnan`` over the whole flat gradient partition: two boolean temporaries as large as
the partition, at the step, when memory peaks. :func:`has_overflow` gives the same answer
(including the all-reduce over the data-parallel and model-parallel groups) with
:func:`memascend.overflow.has_inf_or_nan`, whose largest temporary is one 1 Mi-element chunk.
:func:`~memascend.integrations.deepspeed.enable` installs it. Gradients streamed to the
swap area (:mod:`.grads`) were checked as each partition arrived; their flag is used here.
"""
from __future__ import annotations

from typing import Any

import torch
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator

from ...overflow import has_inf_or_nan


def has_overflow(self: Any, partition_gradients: bool = True) -> bool:
    """Drop-in for ``DeepSpeedZeroOptimizer_Stage3.has_overflow`` (see the module docstring)."""
    device = get_accelerator().current_device_name()
    if partition_gradients:
        grads = getattr(self, "_ma_grads", None)  # streamed partitions: checked on arrival
        bad = (grads is not None and grads.overflow) or \
            has_inf_or_nan(self.grad_partitions_flat_buffer)
        flag = torch.tensor([int(bad)], dtype=torch.uint8, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.dp_process_group)
    else:
        bad = any(p.grad is not None and has_inf_or_nan(p.grad.data)
                  for group in self.fp16_groups for p in group)
        flag = torch.tensor([int(bad)], dtype=torch.uint8, device=device)
    self._model_parallel_all_reduce(tensor=flag, op=dist.ReduceOp.MAX)
    return bool(flag[0].item())
