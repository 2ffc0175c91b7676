"""What a checkpoint of an offloaded model holds, and how it is written and restored.

A checkpoint of :class:`memascend.offload.OffloadedModel` is a folder written by
:mod:`memascend.checkpoint` (a crash at any point of a save leaves the previous or the new
checkpoint loadable): the two swap tiers exported as ``params.swp`` and ``optim.swp``, and a
state file with what is not in them: the step counts (the model's and each parameter's Adam
step), which parameters have moments yet, the fp16 loss scale and its counters, the AdamW
hyper-parameters, the compute dtype and every parameter's shape. Saving waits for the running
step (:meth:`memascend.fused.FusedAdam.settle`); loading checks the state and both tiers
against the model before anything live changes.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import torch

from . import checkpoint
from .errors import MemAscendError

TIERS = ("params.swp", "optim.swp")


def state_of(om: Any) -> dict[str, Any]:
    """The state file's content for ``om`` (between steps)."""
    f = om._fused
    return {"format": 2, "step_count": om.step_count, "loss_scale": om.loss_scale,
            "good_steps": om._good_steps, "skipped_steps": om.skipped_steps,
            "steps": {n: float(t) for n, t in f.steps.items()},
            "has_state": sorted(f.has_state), "optimizer": asdict(om.opt),
            "compute_dtype": str(om.compute_dtype).replace("torch.", ""),
            "params": {n: list(s) for n, s in om.shapes.items()}}


def save(om: Any, path: str) -> None:
    """Write ``om``'s checkpoint folder at ``path`` (see ``OffloadedModel.save``)."""
    if om._fused.micro or om._in_bwd:
        raise MemAscendError("save() between backward() and step(): accumulated gradients "
                             "are not part of a checkpoint; call step() or zero_grad()")
    om._fused.settle()
    om.params_sw.wait_idle()
    om.optim_sw.wait_idle()
    checkpoint.save(path, dict(zip(TIERS, (om.param_store, om.optim_store))), state_of(om))


def load(om: Any, path: str) -> None:
    """Restore ``om`` from the checkpoint at ``path`` (see ``OffloadedModel.load``)."""
    folder, state, entries = checkpoint.read(path, TIERS)
    got = checkpoint.check_model(folder, state, entries, shapes=om.shapes,
                                 compute_dtype=str(om.compute_dtype).split(".")[-1],
                                 fp32_master_in_params=om.fp32)
    if om._in_bwd:
        raise MemAscendError("load() during backward")
    try:
        om._fused.settle()
    except MemAscendError:
        pass  # the failed step is undone; the checkpoint replaces the state anyway
    om._fused.discard()
    om.params_sw.wait_idle()
    om.optim_sw.wait_idle()
    for store, sw, fname in ((om.param_store, om.params_sw, TIERS[0]),
                             (om.optim_store, om.optim_sw, TIERS[1])):
        sw.drop_resident()
        store.import_from(os.path.join(folder, fname))
    om.step_count = int(got["step_count"])
    om.loss_scale = float(got["loss_scale"])
    om._good_steps = int(got["good_steps"])
    om.skipped_steps = int(got["skipped_steps"])
    om._fused.steps = {n: torch.tensor(float(got["steps"][n])) for n in om.shapes}
    om._fused.has_state = set(got["has_state"])
