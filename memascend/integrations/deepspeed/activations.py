"""The activation tier in a DeepSpeed engine: what the engine's forward saves for backward
waits on SSD (``"memascend": {"activations": "ssd"}``).

``deepspeed.initialize`` (wrapped, :mod:`.wrappers`) calls :func:`attach_activations` once the
engine is built: an :class:`~memascend.activations.ActivationTier` per rank under
``<nvme_path>/memascend_activations/rank<N>`` (the ``nvme_path`` of ``offload_param``, else
of ``offload_optimizer``), its saved-tensor hooks pushed around the engine module's forward.
DeepSpeed's semantics are unchanged: the hooks only copy tensors autograd saves and give
them back bit for bit. What they see: every tensor saved by ordinary ops and custom
functions, including the inputs of ``torch.utils.checkpoint`` (transformers' gradient
checkpointing, reentrant or not). What they cannot see: DeepSpeed's own
``activation_checkpointing`` (``deepspeed.checkpointing.checkpoint``) keeps each checkpoint's
inputs as an attribute of its autograd context (``ctx.deepspeed_saved_tensors``), not through
``save_for_backward``, and moves them itself (``cpu_checkpointing``, ``partition_activations``);
taking them would mean replacing its ``CheckpointFunction``, which the drop-in does not do.
The tier is ``engine.memascend_activations`` (its ``stats()``); it is scratch, never part of
a checkpoint.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from ...errors import ConfigError


def _nvme_path(cfg: Optional[dict]) -> Optional[str]:
    zero = (cfg or {}).get("zero_optimization") or {}
    for key in ("offload_param", "offload_optimizer"):
        block = zero.get(key) or {}
        if block.get("device") == "nvme" and block.get("nvme_path"):
            return str(block["nvme_path"])
    return None


def attach_activations(engine: Any, cfg: Optional[dict], options: Any) -> Any:
    """Give ``engine`` an activation tier (see the module docstring); returns it.

    Raises
    ------
    ConfigError
        ``activations`` is ``"ssd"`` and the config offloads nothing to NVMe (no folder).
    """
    from ...activations import ActivationTier, attach

    folder = None
    if options.activations == "ssd":
        base = _nvme_path(cfg)
        if base is None:
            raise ConfigError("memascend.activations",
                              "ssd needs a zero_optimization offload_param or "
                              "offload_optimizer with device nvme and an nvme_path")
        rank = int(getattr(engine, "global_rank", 0) or 0)
        folder = os.path.join(base, "memascend_activations", f"rank{rank}")
        os.makedirs(folder, exist_ok=True)
    tier = ActivationTier(options.activations, folder, budget=options.activation_budget)
    engine.memascend_activations = tier
    engine._memascend_activation_hooks = attach(tier, engine.module)
    return tier
