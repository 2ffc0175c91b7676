"""memascend as a drop-in for DeepSpeed ZeRO-3 / ZeRO-Infinity's swappers.

One line before ``deepspeed.initialize`` (and before ``zero.Init``)::

    import memascend.integrations.deepspeed as ma_ds
    ma_ds.enable()                      # or enable(param_budget="512MiB", backend="uring")

From then on, DeepSpeed builds memascend's parameter swapper and optimizer swappers wherever
it would build its own, with the rest of the user's config unchanged. The same options can
be given in the DeepSpeed config as a ``"memascend": {...}`` block (keys of
:class:`~.runtime.Options`; an unknown key is a ConfigError; ``"enabled": false`` keeps the
stock swappers). DeepSpeed's ``offload_*``/``aio`` settings are honoured as described in
:mod:`.runtime`.

What changes (see :mod:`.params`, :mod:`.optim`, :mod:`.stream`, :mod:`.aio`,
:mod:`.overflow`): the optimizer steps each swapped sub-group in small pieces under its own
byte budget (no ``buffer_count`` x sub-group buffers, gradients read from stage 3's buffer
instead of swapped, Adam moments and step counts restored exactly from checkpoints); exact-size
pinned leases under a byte budget instead of fixed slots; one swap area per tier and rank
instead of one file per tensor; io_uring with every completion checked instead of libaio with
none (and no JIT-built ``async_io`` op); no "Not enough buffers" failure; no SIGABRT when
mlock is refused; the fp16 overflow check scans in chunks (no full-size temporaries).
Checkpoints made with memascend enabled hold the optimizer's swap area as one exported file
and load only with memascend enabled: they record their writer (:mod:`.marker`), and stock
DeepSpeed loading one is a ``MetadataError``, as is the drop-in loading stock's.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ...config import from_env
from ...errors import ConfigError
from . import patches, state
from .runtime import Options, current_runtime, shutdown

__all__ = ["enable", "disable", "enabled", "stats", "check", "Options", "shutdown"]


def check() -> list[str]:
    """What about the installed DeepSpeed differs from what the drop-in supports (version,
    a missing internal, a changed upstream body it copies); empty when all is as expected.
    See :mod:`.patches`."""
    return patches.check()


def enable(**options: Any) -> None:
    """Make DeepSpeed build memascend's swappers from now on (idempotent; call before
    ``deepspeed.initialize`` and before ``zero.Init``, e.g. before ``from_pretrained`` with
    a ZeRO-3 config).

    The installed DeepSpeed is checked first against :mod:`.patches` (the one table of what
    the drop-in replaces and relies on); then every patch is installed, or none.

    Parameters
    ----------
    **options:
        Fields of :class:`~.runtime.Options` (``backend``, ``lock``, ``param_budget``,
        ``checksum``, ``heap_mmap_threshold``, ...); a field not given comes from
        ``MEMASCEND_DROPIN_<FIELD>`` when set (:mod:`memascend.config`); a ``"memascend"``
        block in the DeepSpeed config overrides them all. Unless ``heap_mmap_threshold`` is
        0 (here or in the block), the first ``zero.Init`` or ``deepspeed.initialize`` after
        this also fixes glibc's mmap threshold for the whole process (:mod:`memascend.heap`),
        so freed tensors leave RSS instead of staying in the heap.

    Raises
    ------
    ConfigError
        An unknown or invalid option; or the installed DeepSpeed is not one the drop-in
        supports (the message names the version or the first internal that differs, and the
        supported versions). Nothing is patched then.
    ImportError
        DeepSpeed is not installed.
    """
    base = from_env(Options, "DROPIN", options, given=True)
    if not patches.installed():
        problems = patches.check()
        if problems:
            more = f" (and {len(problems) - 1} more: memascend.integrations.deepspeed." \
                   "check() lists them)" if len(problems) > 1 else ""
            raise ConfigError("deepspeed", f"the drop-in supports DeepSpeed "
                                            f">={patches.SUPPORTED[0]},<{patches.SUPPORTED[1]} "
                                            f"(tested: {patches.TESTED}); here: "
                                            f"{problems[0]}{more}")
        patches.install()
    state.set_options(base, base=True)


def disable() -> None:
    """Undo :func:`enable`: DeepSpeed builds its stock swappers again. Engines built while it
    was enabled keep memascend's swappers, which need the patches: finish with them first."""
    if not patches.installed():
        return
    patches.uninstall()
    state.set_options(None, base=True)


def enabled() -> bool:
    """Whether :func:`enable` is in effect."""
    return state.enabled()


def stats() -> dict[str, Any]:
    """Pinned pool, engine and lease-recycling counters of the process's memascend runtime
    (empty before DeepSpeed built a memascend swapper)."""
    rt = current_runtime()
    if rt is None:
        return {}
    return {"pool": rt.pool.stats().to_dict(), "engine": dataclasses.asdict(rt.engine.stats()),
            "leases": rt.lease_stats()}
