"""The footprint model: peak host memory, locked memory and SSD traffic of a configuration.

Builds on the rules in :mod:`memascend.sizing` and puts them together per system (the two
ZeRO-3 flavours in :mod:`.zero3`, the plain path here):

- ``deepspeed``: stock DeepSpeed 0.19.8 ZeRO-3 / ZeRO-Infinity with the given config;
- ``memascend-deepspeed``: the same config with memascend's drop-in swappers (exact-size
  parameter and optimizer budgets, no partitioned reserve, chunked overflow check);
- ``memascend``: memascend's plain-PyTorch path (``offload_model``) with its two budgets.

Each :class:`Estimate` lists its components (bytes, and whether they are *locked* — pinned
swap buffers —, *resident* — other memory held from start-up on —, *transient* — alive only
in one phase —, or *virtual* — address space never touched, not RSS), the phase in which the
peak falls and that peak. Peak = the persistent components + the largest phase's transients:
start-up (``init``), forward/backward (``backward``), the optimizer step (``step``) and, with
fp16, the overflow check before it (``overflow_check``).
Activations count toward host memory only when the model computes on the CPU (``gpus=0``).
Everything here is arithmetic on shapes; reading files is the caller's business.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from .. import sizing as sz
from ..errors import ConfigError
from ..shapes import llama_parameter_shapes

KINDS = ("locked", "resident", "transient", "virtual")


@dataclass(frozen=True)
class Component:
    """One part of a footprint.

    Attributes
    ----------
    name:
        Stable identifier (``"param_pool"``, ``"optimizer_pool"``, ...).
    label:
        What it is, for people.
    nbytes:
        Its size in bytes.
    kind:
        ``"locked"``, ``"resident"``, ``"transient"`` or ``"virtual"`` (see module docstring).
    phase:
        For transients, the moment they belong to (``"init"``, ``"backward"``, ``"step"``,
        or ``"overflow_check"`` — the fp16 check at the start of a step, not at the same time
        as the step's other transients); ``""`` otherwise.
    note:
        Where the number comes from.
    """

    name: str
    label: str
    nbytes: int
    kind: str
    phase: str = ""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The component as a dict."""
        return {"name": self.name, "label": self.label, "bytes": self.nbytes, "kind": self.kind,
                "phase": self.phase, "note": self.note}


@dataclass(frozen=True)
class Estimate:
    """A footprint estimate for one system (per process / rank, and per node).

    Attributes
    ----------
    system:
        ``"deepspeed"``, ``"memascend-deepspeed"`` or ``"memascend"``.
    title:
        A one-line description.
    components:
        The parts (:class:`Component`).
    ranks:
        Training processes on this machine (one per GPU; 1 on a CPU-only run).
    ssd:
        Capacity and traffic per step, per rank.
    notes:
        Assumptions and warnings about the configuration itself.
    """

    system: str
    title: str
    components: tuple[Component, ...]
    ranks: int
    ssd: sz.SsdTraffic
    notes: tuple[str, ...] = ()

    def _sum(self, kinds: Sequence[str]) -> int:
        return sum(c.nbytes for c in self.components if c.kind in kinds)

    @property
    def persistent_bytes(self) -> int:
        """Locked plus resident bytes (held from start-up on)."""
        return self._sum(("locked", "resident"))

    @property
    def locked_bytes(self) -> int:
        """Pinned (mlock'ed) bytes per rank."""
        return self._sum(("locked",))

    def phase_bytes(self) -> dict[str, int]:
        """Transient bytes of each phase."""
        out = {"init": 0, "backward": 0, "step": 0}  # overflow_check too, when fp16
        for c in self.components:
            if c.kind == "transient":
                out[c.phase] = out.get(c.phase, 0) + c.nbytes
        return out

    @property
    def peak_phase(self) -> str:
        """The phase whose transients are largest (where the peak falls)."""
        phases = self.phase_bytes()
        return max(phases, key=lambda k: (phases[k], k == "step"))

    @property
    def peak_bytes(self) -> int:
        """Peak RSS of one rank: persistent bytes + the largest phase's transients."""
        return self.persistent_bytes + max(self.phase_bytes().values())

    @property
    def node_peak_bytes(self) -> int:
        """Peak RSS of the machine: ``ranks × peak_bytes`` (each rank has its own pools)."""
        return self.ranks * self.peak_bytes

    @property
    def virtual_bytes(self) -> int:
        """Address space reserved but never touched (not in RSS)."""
        return self._sum(("virtual",))

    def component(self, name: str) -> Optional[Component]:
        """The component called ``name``, or None."""
        return next((c for c in self.components if c.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """The estimate as a JSON-ready dict."""
        return {"system": self.system, "title": self.title, "ranks": self.ranks,
                "peak_bytes": self.peak_bytes, "node_peak_bytes": self.node_peak_bytes,
                "peak_phase": self.peak_phase, "locked_bytes": self.locked_bytes,
                "node_locked_bytes": self.ranks * self.locked_bytes,
                "persistent_bytes": self.persistent_bytes, "virtual_bytes": self.virtual_bytes,
                "phase_transient_bytes": self.phase_bytes(),
                "components": [c.to_dict() for c in self.components],
                "ssd": self.ssd.to_dict(),
                "node_ssd": {k: v * self.ranks for k, v in self.ssd.to_dict().items()},
                "notes": list(self.notes)}


@dataclass(frozen=True)
class Workload:
    """What is trained and how (shared by every system's estimate).

    Attributes
    ----------
    model:
        LLaMA-style config dict (``configs/models/*.json`` or a HF ``config.json``).
    batch, seq:
        Micro-batch size and sequence length.
    gpus:
        Training processes with one GPU each; 0 means a CPU-only run (one process, the CPU
        accelerator), where activations are in host memory.
    micro_batches:
        Gradient accumulation steps per optimizer step.
    checkpointing:
        Per-layer activation checkpointing.
    runtime_bytes:
        Override of the measured Python + torch (+ transformers, DeepSpeed) runtime.
    """

    model: Mapping[str, Any]
    batch: int = 1
    seq: int = 512
    gpus: int = 1
    micro_batches: int = 1
    checkpointing: bool = False
    runtime_bytes: Optional[int] = None

    def __post_init__(self) -> None:
        for key in ("batch", "seq", "micro_batches"):
            if int(getattr(self, key)) <= 0:
                raise ConfigError(key, f"must be positive, got {getattr(self, key)}")
        if int(self.gpus) < 0:
            raise ConfigError("gpus", f"must be >= 0, got {self.gpus}")

    @property
    def world_size(self) -> int:
        """Data-parallel ranks (1 for a CPU-only run)."""
        return max(1, int(self.gpus))

    @property
    def host_activations(self) -> bool:
        """Whether activations live in host memory (CPU-only compute)."""
        return int(self.gpus) == 0

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch."""
        return int(self.batch) * int(self.seq)


def _model_numels(model: Mapping[str, Any]) -> list[int]:
    return [math.prod(shape) for _name, shape in llama_parameter_shapes(dict(model))]


def _freed(name: str, label: str, allocations: Sequence[int], phase: str, note: str,
           heap_threshold: Optional[int]) -> list[Component]:
    """A transient made of ``allocations``. With a glibc heap model (``heap_threshold``, the
    mmap threshold in force), the allocations below the threshold stay in the heap once freed
    and count as resident (``name_heap``); the rest is mmapped and returned on free: a
    transient of ``phase`` (``name``, left out when all of it is in the heap). Without one,
    all of it is a transient."""
    total = sum(int(a) for a in allocations)
    heap = sz.heap_bytes(allocations, heap_threshold) if heap_threshold else 0
    out = []
    if total - heap or not heap:
        out.append(Component(name, label, total - heap, "transient", phase, note))
    if heap:
        out.append(Component(f"{name}_heap", f"{label}, kept in glibc's heap", heap, "resident",
                             note=f"{note}; freed below the {heap_threshold:,} B mmap threshold"))
    return out


def _activations(w: Workload, elem_bytes: int, largest: int,
                 heap_threshold: Optional[int] = None, tier: bool = False) -> list[Component]:
    """Host-memory activation components of the backward phase (CPU compute only). The saved
    activations are per-layer tensors of at most ``tokens × max(hidden, intermediate)``
    elements and the logits (``tokens × vocab``, also in fp32 when the model is not); with
    the activation tier (``tier``), what it leaves in RAM
    (:func:`memascend.sizing.llama_activation_tier_bytes`)."""
    if not w.host_activations:
        return []
    if tier:
        acts = sz.llama_activation_tier_bytes(w.model, w.batch, w.seq, elem_bytes,
                                              w.checkpointing)[0]
    else:
        acts = sz.llama_activation_bytes(w.model, w.batch, w.seq, elem_bytes, w.checkpointing)
    vocab = int(w.model["vocab_size"])
    logits = [w.tokens * vocab * elem_bytes] + ([w.tokens * vocab * 4] if elem_bytes != 4 else [])
    piece = w.tokens * max(int(w.model["hidden_size"]), int(w.model["intermediate_size"])) * \
        elem_bytes
    rest = max(0, acts - sum(logits))
    layer = [piece] * (rest // piece) + ([rest % piece] if rest % piece else [])
    return [
        *_freed("activations", "activations saved for backward" + (
                    ", the activation tier's one layer and top at a time" if tier else ""),
                logits + layer, "backward",
                f"LLaMA, {w.batch}x{w.seq} tokens" + (", checkpointed" if w.checkpointing
                                                      else ""), heap_threshold),
        *_freed("backward_temporaries", "logits gradients + one weight gradient",
                sz.backward_transient_allocations(largest, elem_bytes, w.tokens, vocab),
                "backward", "2 x tokens x vocab x 4 B + largest parameter", heap_threshold),
    ]


def estimate_offload(w: Workload, *, compute_dtype: str = "float32",
                     budget: Optional[int] = None, optimizer_budget: Optional[int] = None,
                     meta_init: bool = True, exact_undo: bool = True,
                     activations: Optional[str] = None,
                     activation_budget: Optional[int] = None) -> Estimate:
    """Footprint of memascend's plain-PyTorch path (``offload_model``) for one process.

    Persistent: the runtime, the training runtime and the two tiers' pinned arenas
    (:func:`memascend.sizing.offload_pinned_bytes`), reserved whole. Transients: at start-up
    the largest parameter materialized in fp32 (with ``meta_init``; otherwise the whole model
    built in RAM first); in backward the activations and gradients (CPU compute), the
    gradients handed to the optimizer's worker and not yet used
    (:func:`memascend.sizing.offload_queue_bytes`) and, the step being fused into backward,
    the AdamW temporaries of the largest parameter. ``offload_model`` fixes glibc's mmap
    threshold at 128 KiB (its ``heap_mmap_threshold``), so freed tensors are not retained.

    Parameters
    ----------
    w:
        The workload (``gpus`` > 1 is not supported: the plain path is one process).
    compute_dtype:
        ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    budget, optimizer_budget:
        The pinned budgets (defaults as ``offload_model``: 1 GiB, and the same).
    meta_init:
        The model is built under :func:`memascend.meta_parameters`.
    exact_undo:
        ``offload_model``'s option: with False (and the window declared) each update is
        committed as it is made: no old versions aside on SSD, no stored gradients at one
        micro-batch per step.
    activations, activation_budget:
        ``offload_model``'s options: with ``"ssd"`` the tensors forward saves wait in the
        activation tier's store (a CPU-only run keeps one layer's worth in RAM; the tier's
        pinned arena is locked; its bytes are SSD capacity and traffic). ``"pinned"`` keeps
        them in host memory as before (on a GPU machine it moves them off the GPU).

    Raises
    ------
    ConfigError
        Bad dtype or budget.
    """
    ce = sz.dtype_bytes(compute_dtype)
    numels = _model_numels(w.model)
    largest = max(numels)
    b, ob = sz.offload_budgets(budget, optimizer_budget)
    for key, val in (("budget", b), ("optimizer_budget", ob)):
        if val <= 0:
            raise ConfigError(key, f"must be positive, got {val}")
    pp, po = sz.offload_pinned_bytes(numels, ce, b, ob)
    keep_grads = sz.offload_stores_grads(w.micro_batches, accumulation_declared=not exact_undo)
    tp, to = sz.offload_tier_bytes(numels, ce, grads=keep_grads)
    notes = []
    if sz.round_up(largest * ce) > b:
        notes.append(f"the largest parameter ({sz.round_up(largest * ce):,} B) does not fit the "
                     f"parameter budget {b:,} B: offload_model raises PoolExhaustedError")
    if sz.round_up(largest * 4) > ob:
        notes.append(f"the largest fp32 tensor ({sz.round_up(largest * 4):,} B) does not fit the "
                     f"optimizer budget {ob:,} B: offload_model raises PoolExhaustedError")
    runtime = w.runtime_bytes if w.runtime_bytes is not None else sz.runtime_bytes(transformers=True)
    comps = [
        Component("runtime", "Python + torch + transformers + memascend", runtime, "resident",
                  note="measured constant" if w.runtime_bytes is None else "given"),
        Component("training_runtime", "model skeleton, kernels, autograd, swap engine",
                  sz.TRAINING_RUNTIME_BYTES, "resident", note="measured constant"),
        Component("param_pool", "parameter tier pinned arena", pp, "locked",
                  note=f"min(budget {b:,}, tier) + largest tensor"),
        Component("optimizer_pool", "optimizer tier pinned arena", po, "locked",
                  note=f"min(optimizer_budget {ob:,}, tier) + largest tensor"),
        Component("materialize", "largest parameter materialized at start-up" if meta_init
                  else "whole model built in RAM before offload", (largest if meta_init else
                                                                   sum(numels)) * 4,
                  "transient", "init", note="fp32"),
        Component("step_temporaries", "AdamW temporaries of the largest parameter "
                  "(the step runs in backward)", sz.offload_step_transient_bytes(largest),
                  "transient", "backward", note="2 x largest x 4 B"),
        Component("gradient_queue", "gradients handed to the optimizer's worker, not yet "
                  "used", sz.offload_queue_bytes(numels, ob), "transient", "backward",
                  note="max(largest, optimizer budget / 4 up to 64 MiB)"),
    ]
    fp16 = compute_dtype in ("float16", "fp16", "half")
    if fp16:
        comps.append(Component("overflow_check", "fused overflow check (chunked)",
                               sz.chunked_overflow_check_bytes(ce, True), "transient", "backward",
                               note="1 Mi elements at a time"))
    if activations not in (None, "none", "ssd", "pinned"):
        raise ConfigError("activations", f"must be 'ssd', 'pinned' or None, got {activations!r}")
    tier = activations == "ssd"
    if w.host_activations:
        comps.extend(_activations(w, ce, largest, tier=tier))
    else:
        notes.append("activations are in GPU memory (not counted); use --gpus 0 for a CPU run")
        comps.append(Component("gradient", "one weight gradient before it is offloaded",
                               largest * ce, "transient", "backward", note="largest parameter"))
    if w.gpus > 1:
        notes.append("offload_model trains in one process; --gpus > 1 is modelled as one rank")
    ssd = sz.offload_ssd_traffic(numels, ce, b, ob, micro_batches=w.micro_batches,
                                 grads=keep_grads, exact_undo=exact_undo)
    if tier:
        ab = activation_budget or sz.ACTIVATION_DEFAULT_BUDGET
        moved = sz.llama_activation_tier_bytes(w.model, w.batch, w.seq, ce, w.checkpointing)[1]
        comps.append(Component("activation_pool", "activation tier pinned arena", ab, "locked",
                               note="activation_budget"))
        ssd = dataclasses.replace(ssd, capacity=ssd.capacity + moved,
                                  capacity_peak=ssd.capacity_peak + moved,
                                  read_per_step=ssd.read_per_step + moved * w.micro_batches,
                                  written_per_step=ssd.written_per_step + moved * w.micro_batches)
    return Estimate("memascend", f"memascend offload_model ({compute_dtype}, budgets "
                                 f"{b / sz.MiB:.0f} + {ob / sz.MiB:.0f} MiB"
                                 f"{'' if exact_undo else ', exact_undo=False'}"
                                 f"{', activations on SSD' if tier else ''})",
                    tuple(comps), 1, ssd, tuple(notes))


def machine_warnings(estimates: Sequence[Estimate], phys_bytes: int,
                     lockable_bytes: Optional[int]) -> list[str]:
    """Warnings when an estimate exceeds this machine's RAM or memlock limit.

    Parameters
    ----------
    estimates:
        The estimates to check.
    phys_bytes:
        Physical memory of the machine.
    lockable_bytes:
        What this user may lock (None: unlimited).
    """
    out = []
    for est in estimates:
        if est.node_peak_bytes > phys_bytes:
            out.append(f"{est.system}: estimated peak {est.node_peak_bytes / sz.GiB:.2f} GiB exceeds "
                       f"this machine's RAM ({phys_bytes / sz.GiB:.2f} GiB)")
        locked = est.ranks * est.locked_bytes
        if lockable_bytes is not None and locked > lockable_bytes:
            consequence = ("DeepSpeed aborts (SIGABRT) when mlock fails"
                           if est.system == "deepspeed" else
                           "memascend goes on with unlocked memory (lock='auto')")
            out.append(f"{est.system}: {locked / sz.MiB:.0f} MiB locked exceeds the memlock limit "
                       f"({lockable_bytes / sz.MiB:.0f} MiB): {consequence}")
    return out


@dataclass(frozen=True)
class EstimateReport:
    """Everything ``memascend profile estimate`` reports."""

    model: Mapping[str, Any]
    parameters: int
    workload: Workload
    estimates: tuple[Estimate, ...]
    warnings: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        w = self.workload
        return {"model": dict(self.model), "parameters": self.parameters,
                "workload": {"batch": w.batch, "seq": w.seq, "gpus": w.gpus,
                             "micro_batches": w.micro_batches, "checkpointing": w.checkpointing},
                "estimates": {e.system: e.to_dict() for e in self.estimates},
                "warnings": list(self.warnings)}
