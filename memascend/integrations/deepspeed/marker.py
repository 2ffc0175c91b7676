"""Which swapper wrote a DeepSpeed checkpoint: recorded by the drop-in's save, checked on load.

The drop-in's checkpoint holds the offloaded optimizer state as one exported swap area
(:mod:`.optim`). DeepSpeed's stock NVMe swapper cannot read it, and would not say so: its
load copies the checkpoint's folder beside its own per-tensor files and trains on from the
state the process had (measured: a tiny LLaMA went on from its initial weights, with no
error). The other way round, the drop-in refuses a checkpoint without its export
(:meth:`.optim._StoreBacked.end_import`). So a save records its writer twice:

* ``memascend-layout.json`` beside the export in each rank's offloaded folder
  (:func:`layout_of` of the swapper: its class, the layout of the stored state — pieces of
  ``piece_numel`` elements or whole sub-groups — the sub-group sizes, memascend's version).
  The drop-in's load compares it with its own swapper's (:func:`check_layout`): a checkpoint
  of another layout is a ``MetadataError`` naming both, before any state is read.
* a ``"memascend"`` entry in the model-states file (``client_state`` of DeepSpeed's save), a
  :class:`WrittenBy` whose unpickling checks the reader. Unpickled inside
  ``DeepSpeedEngine._load_checkpoint`` of an engine whose optimizer swapper is not
  memascend's (stock DeepSpeed, the drop-in disabled by the config, or an optimizer not on
  NVMe), it raises a ``MetadataError`` naming the writer and the reader; anywhere else (the
  drop-in's load, ``zero_to_fp32``, a plain ``torch.load``) it is the plain dict of the
  layout. Found by walking the stack, because the model-states file is the only part of the
  checkpoint that stock DeepSpeed's NVMe load reads. Renaming :func:`_written_by` breaks the
  loading of earlier checkpoints.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

from ...errors import MetadataError

LAYOUT_NAME = "memascend-layout.json"
CLIENT_KEY = "memascend"


def layout_of(swapper: Any) -> dict[str, Any]:
    """What a checkpoint records about the memascend optimizer swapper that wrote it."""
    from ... import __version__

    info: dict[str, Any] = {"writer": "memascend", "version": __version__,
                            "swapper": type(swapper).__name__}
    piece = getattr(swapper, "piece_numel", None)
    if piece is not None:  # the streamed step: pieces per sub-group
        info["layout"] = "pieces"
        info["piece_numel"] = int(piece)
        info["sub_groups"] = {str(k): int(v) for k, v in sorted(swapper._numel.items())}
    else:  # DeepSpeed's whole-sub-group swappers, on memascend's store
        info["layout"] = "sub-groups"
        info["sub_groups"] = {str(k): int(v.numel())
                              for k, v in sorted(swapper.swap_params_info.items())}
    return info


def _describe(info: dict[str, Any]) -> str:
    what = f"{info.get('swapper', '?')} (memascend {info.get('version', '?')}"
    if info.get("layout") == "pieces":
        what += f", pieces of {info.get('piece_numel')} elements"
    elif info.get("layout"):
        what += ", whole sub-groups"
    return what + f", {len(info.get('sub_groups', {}))} sub-groups)"


def write_layout(folder: str, swapper: Any) -> None:
    """Write ``memascend-layout.json`` for ``swapper`` into an export folder."""
    path = os.path.join(folder, LAYOUT_NAME)
    with open(path, "w") as f:
        json.dump(layout_of(swapper), f, indent=1, sort_keys=True)


def read_layout(folder: str) -> Optional[dict[str, Any]]:
    """The layout recorded in an exchange folder (None: a checkpoint of a memascend from
    before the record, which is accepted on its export alone).

    Raises
    ------
    MetadataError
        The record is there but unreadable.
    """
    path = os.path.join(folder, LAYOUT_NAME)
    try:
        with open(path) as f:
            info = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise MetadataError(f"cannot read the checkpoint's layout record: {exc}",
                            path=path) from exc
    if not isinstance(info, dict):
        raise MetadataError("the checkpoint's layout record is not a JSON object", path=path)
    return info


def check_layout(saved: Optional[dict[str, Any]], swapper: Any, path: str) -> None:
    """Refuse a checkpoint whose offloaded state this swapper would misread.

    Raises
    ------
    MetadataError
        The layouts differ (another step mode, piece size or sub-group partitioning); names
        both.
    """
    if saved is None:
        return
    mine = layout_of(swapper)
    why = None
    if saved.get("layout") != mine["layout"]:
        why = "the optimizer state is stored in another layout"
    elif mine["layout"] == "pieces" and saved.get("piece_numel") != mine["piece_numel"]:
        why = ("the pieces have another size (set the \"optimizer_chunk\" option to "
               f"{4 * int(saved.get('piece_numel') or 0)} bytes to load it)")
    elif saved.get("sub_groups") != mine["sub_groups"]:
        why = ("the sub-groups differ (another model, sub_group_size, parameter groups or "
               "world size)")
    if why is not None:
        raise MetadataError(f"the checkpoint was written by {_describe(saved)}; this engine "
                            f"uses {_describe(mine)}: {why}", path=path)


class WrittenBy:
    """The model-states entry of a drop-in checkpoint (see the module docstring)."""

    def __init__(self, info: dict[str, Any]):
        self.info = dict(info)

    def __reduce__(self) -> tuple:
        return (_written_by, (dict(self.info),))


def _loading_engine() -> tuple[Any, Any]:
    """The DeepSpeed engine whose ``_load_checkpoint`` is on the stack, and its frame."""
    engine_mod = sys.modules.get("deepspeed.runtime.engine")
    if engine_mod is None:
        return None, None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_load_checkpoint":
            me = frame.f_locals.get("self")
            if isinstance(me, engine_mod.DeepSpeedEngine):
                return me, frame
        frame = frame.f_back
    return None, None


def refuse_reader(engine: Any, info: dict[str, Any], where: str = "") -> None:
    """Raise unless ``engine``'s optimizer swapper is memascend's (see the module docstring).

    Raises
    ------
    MetadataError
        The engine would not read the checkpoint's offloaded optimizer state.
    """
    from .optim import _StoreBacked

    sw = getattr(getattr(engine, "optimizer", None), "optimizer_swapper", None)
    if isinstance(sw, _StoreBacked):
        return
    reader = (f"DeepSpeed's stock {type(sw).__name__}" if sw is not None
              else "an optimizer whose state is not offloaded to NVMe")
    raise MetadataError(
        f"this checkpoint was saved by memascend's DeepSpeed drop-in with {_describe(info)}: "
        "its offloaded optimizer state is one exported swap area, which this engine's "
        f"optimizer ({reader}) cannot read; it would train on from this process's state "
        "without an error. Load it with the drop-in enabled and the optimizer on NVMe: "
        "memascend.integrations.deepspeed.enable() before deepspeed.initialize, or run the "
        "script under `memascend run -- ...`", path=where or "(model states)")


def _written_by(info: dict[str, Any]) -> dict[str, Any]:
    """Unpickling of :class:`WrittenBy`: check the reader, then return the plain record."""
    engine, frame = _loading_engine()
    if engine is not None and not frame.f_locals.get("load_module_only", False):
        where = os.path.join(str(frame.f_locals.get("load_dir", "")),
                             str(frame.f_locals.get("tag", "")))
        refuse_reader(engine, info, where)
    return dict(info)
