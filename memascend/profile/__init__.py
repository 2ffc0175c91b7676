"""Memory profiling of SSD-offloaded training: estimate before a run, measure during one.

- :mod:`.estimate`: the footprint model (peak host memory, locked memory, SSD capacity and
  traffic per step) of stock DeepSpeed ZeRO-Infinity, memascend's DeepSpeed drop-in and
  memascend's plain-PyTorch path, from the rules in :mod:`memascend.sizing` (the ZeRO-3
  flavours in :mod:`.zero3`);
- :mod:`.sampler`: runs a command and samples its whole process tree from ``/proc``;
- :mod:`.report`: text, JSON and timeline plots of both.

``memascend profile estimate`` and ``memascend profile run`` are the command-line front ends.
"""
from __future__ import annotations

from .estimate import (Component, Estimate, EstimateReport, Workload, estimate_offload,
                       machine_warnings)
from .zero3 import estimate_deepspeed
from .sampler import CommandNotFoundError, RunResult, Sample, TreeSampler, run_profiled

__all__ = ["Component", "Estimate", "EstimateReport", "Workload", "estimate_deepspeed",
           "estimate_offload", "machine_warnings", "CommandNotFoundError", "RunResult", "Sample",
           "TreeSampler", "run_profiled"]
