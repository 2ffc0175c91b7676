"""The DeepSpeed drop-in's options: what a user sets by ``enable(**options)`` or a
``"memascend": {...}`` block in the DeepSpeed config.

A module of its own, importing neither DeepSpeed nor the drop-in's runtime, so that both the
drop-in (:mod:`memascend.integrations.deepspeed.runtime`, which re-exports :class:`Options`)
and the sizing rules (:mod:`memascend.sizing.ds_config`, which validate a config's block the
way the drop-in does) import it without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

from .config import parse_size
from .errors import ConfigError
from .heap import DEFAULT_MMAP_THRESHOLD, check_threshold, set_mmap_threshold
from .sizing.common import ACTIVATION_DEFAULT_BUDGET


@dataclass(frozen=True)
class Options:
    """memascend settings for the DeepSpeed drop-in.

    Parameters
    ----------
    enabled:
        Use the memascend swappers (default True). ``False`` in the config block keeps
        DeepSpeed's stock swappers although :func:`enable` was called.
    backend:
        Engine backend: ``"auto"`` (io_uring, else threads), ``"uring"``, ``"threads"``,
        ``"pyuring"``.
    lock:
        Pool lock mode, overriding the one derived from ``pin_memory``.
    param_budget:
        Pinned bytes of the parameter tier (default: ``buffer_count`` × the largest swapped
        parameter partition, 4 KiB-rounded).
    checksum:
        ``"crc32c"`` (default; every read verified) or ``"none"``.
    stream_optimizer:
        Step swapped optimizer sub-groups in pieces (default True; see :mod:`.stream`):
        no ``buffer_count`` x sub-group buffers, Adam state never materialised whole.
        Applies to DeepSpeedCPUAdam with fp32 state; other optimizers keep DeepSpeed's
        whole-sub-group swapping.
    stream_grads:
        With ``stream_optimizer``: keep the gradient partitions of streamed sub-groups as
        pieces in the swap area instead of stage 3's flat buffer, the whole model in the
        gradient dtype (default True; see :mod:`.grads`).
    optimizer_chunk:
        Bytes of one piece of one fp32 tensor when streaming (default 16 MiB; a multiple
        of 4 KiB).
    optimizer_budget:
        Pinned bytes of the streamed optimizer tier (default 16 x ``optimizer_chunk``:
        master, m, v and gradient of the current piece and two read ahead, plus the
        write-behind; in backward, the staging of gradient piece writes; or half the
        streamed state when that is less, but at least one piece's master, m and v).
    heap_mmap_threshold:
        Bytes from which glibc maps each heap allocation on its own, so a freed tensor's
        memory goes back to the system instead of staying in the heap (default 1 MiB; 0
        leaves the C heap alone). Process-wide and irreversible; see :mod:`memascend.heap`.
    activations:
        ``"ssd"`` or ``"pinned"``: the tensors the engine's forward saves for backward (with
        transformers' gradient checkpointing, ``torch.utils.checkpoint``, each layer's
        inputs) wait in memascend's activation tier (:mod:`memascend.activations`), under
        ``<nvme_path>/memascend_activations/rank<N>``; default None. DeepSpeed's own
        ``activation_checkpointing`` keeps its inputs itself and is not affected.
    activation_budget:
        Pinned bytes of the activation tier (default 64 MiB).
    """

    enabled: bool = True
    backend: str = "auto"
    lock: Optional[str] = None
    param_budget: Optional[Any] = None
    checksum: str = "crc32c"
    stream_optimizer: bool = True
    stream_grads: bool = True
    optimizer_chunk: Any = 16 << 20
    optimizer_budget: Optional[Any] = None
    heap_mmap_threshold: int = DEFAULT_MMAP_THRESHOLD
    activations: Optional[str] = None
    activation_budget: Any = ACTIVATION_DEFAULT_BUDGET

    def __post_init__(self) -> None:
        check_threshold("memascend.heap_mmap_threshold", self.heap_mmap_threshold)
        if not isinstance(self.enabled, bool):
            raise ConfigError("memascend.enabled", f"must be true or false, got {self.enabled!r}")
        if self.lock not in (None, "auto", "required", "off"):
            raise ConfigError("memascend.lock", f"must be auto, required or off, got {self.lock!r}")
        if self.checksum not in ("crc32c", "none"):
            raise ConfigError("memascend.checksum", f"must be crc32c or none, got "
                                                    f"{self.checksum!r}")
        if not isinstance(self.stream_optimizer, bool):
            raise ConfigError("memascend.stream_optimizer",
                              f"must be true or false, got {self.stream_optimizer!r}")
        if not isinstance(self.stream_grads, bool):
            raise ConfigError("memascend.stream_grads",
                              f"must be true or false, got {self.stream_grads!r}")
        chunk = parse_size("memascend.optimizer_chunk", self.optimizer_chunk)
        if chunk < 4096 or chunk % 4096:
            raise ConfigError("memascend.optimizer_chunk",
                              f"must be a positive multiple of 4096 bytes, got {chunk}")
        object.__setattr__(self, "optimizer_chunk", chunk)
        if self.optimizer_budget is not None:
            budget = parse_size("memascend.optimizer_budget", self.optimizer_budget)
            if budget < 3 * chunk:
                raise ConfigError("memascend.optimizer_budget",
                                  f"{budget} bytes cannot hold one piece's master, m and v "
                                  f"(3 x optimizer_chunk = {3 * chunk})")
            object.__setattr__(self, "optimizer_budget", budget)
        if self.param_budget is not None:
            object.__setattr__(self, "param_budget",
                               parse_size("memascend.param_budget", self.param_budget))
        if self.activations not in (None, "ssd", "pinned"):
            raise ConfigError("memascend.activations", f"must be ssd, pinned or null, got "
                                                       f"{self.activations!r}")
        object.__setattr__(self, "activation_budget",
                           parse_size("memascend.activation_budget", self.activation_budget))

    def apply_heap(self) -> None:
        """Set the C heap's mmap threshold (``heap_mmap_threshold``) when memascend is
        enabled; 0 changes nothing (a threshold set earlier in the process stays)."""
        if self.enabled and self.heap_mmap_threshold:
            set_mmap_threshold(self.heap_mmap_threshold)

    @classmethod
    def merged(cls, base: "Options", block: Any) -> "Options":
        """``base`` overridden by a config block (a dict); unknown keys are a ConfigError."""
        if block is None:
            return base
        if not isinstance(block, dict):
            raise ConfigError("memascend", f"must be an object, got {type(block).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(block) - known)
        if unknown:
            raise ConfigError(f"memascend.{unknown[0]}",
                              f"unknown key (known: {', '.join(sorted(known))})")
        values = {f.name: getattr(base, f.name) for f in fields(cls)}
        values.update(block)
        return cls(**values)
