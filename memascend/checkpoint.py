"""Checkpoint folders of the plain path: swap tiers exported beside a state file, saved so
that a crash at any point leaves one that loads.

A checkpoint is a folder (0700) holding one exported store per tier (``<name>`` and
``<name>.meta``, see :meth:`memascend.store.SwapStore.export`) and ``state.json`` (0600), the
training state, written last. A folder is complete when its state file exists. Saving writes
``path.tmp`` and puts it in place with :func:`memascend.files.replace_dir`; a save or load
first resolves ``path`` to the newest complete copy among ``path``, ``path.tmp`` and
``path.old`` (a save killed between its two renames leaves no ``path``), so ``load(path)``
always finds the previous or the new checkpoint. Loading checks every tier's metadata before
any live tier is changed.
"""
from __future__ import annotations

import errno
import json
import os
from typing import Any, Mapping

from .errors import MemAscendError, MetadataError
from .files import private_dirs, recover_dir, replace_dir, resolve_dir, write_atomic
from .manifest import Entry
from .store import SwapStore, read_export

STATE = "state.json"


def _complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, STATE))


def save(path: str, tiers: Mapping[str, SwapStore], state: dict[str, Any]) -> None:
    """Write the checkpoint ``path``: each tier exported as its name, then the state file.

    Raises
    ------
    SwapIOError
        Exporting a tier or writing the state failed (e.g. ENOSPC); the previous checkpoint
        at ``path``, if any, is unchanged.
    """
    path = os.path.abspath(path)
    recover_dir(path, _complete)  # finish an interrupted save before touching anything
    tmp = path + ".tmp"
    private_dirs(tmp)
    for name, store in tiers.items():
        store.export(os.path.join(tmp, name))
    try:
        write_atomic(os.path.join(tmp, STATE), json.dumps(state).encode())
    except OSError as exc:
        raise MetadataError(f"cannot write the checkpoint state {tmp}/{STATE}: "
                            f"{exc.strerror or exc}", path=os.path.join(tmp, STATE),
                            code=exc.errno or errno.EIO) from exc
    replace_dir(tmp, path)


def read(path: str, tiers: tuple[str, ...]) -> tuple[str, dict[str, Any],
                                                     dict[str, dict[str, Entry]]]:
    """Find and check the checkpoint ``path``: ``(folder, state, entries per tier)``.

    ``folder`` is ``path``, or ``path.tmp`` / ``path.old`` when a save was interrupted
    between its renames. Nothing is changed on disk.

    Raises
    ------
    MetadataError
        No complete checkpoint at ``path`` (errno ENOENT), a state file that is not a JSON
        object, or a tier that is missing or damaged; each names the file.
    """
    path = os.path.abspath(path)
    folder = resolve_dir(path, _complete)
    if folder is None:
        raise MetadataError(f"no checkpoint at {path}: no complete folder there (nor "
                            f"{os.path.basename(path)}.tmp / .old from an interrupted save)",
                            path=path, code=errno.ENOENT)
    state_path = os.path.join(folder, STATE)
    try:
        with open(state_path, "rb") as f:
            state = json.loads(f.read())
    except ValueError as exc:
        raise MetadataError(f"checkpoint state {state_path} is not valid JSON ({exc})",
                            path=state_path, offset=getattr(exc, "pos", 0)) from None
    except OSError as exc:
        raise MetadataError(f"cannot read checkpoint state {state_path}: {exc.strerror}",
                            path=state_path, code=exc.errno or errno.EIO) from exc
    if not isinstance(state, dict):
        raise MetadataError(f"checkpoint state {state_path} holds a {type(state).__name__}, "
                            "not an object", path=state_path, offset=0)
    entries = {name: read_export(os.path.join(folder, name))[0] for name in tiers}
    return folder, state, entries


def check_model(folder: str, state: dict[str, Any], entries: dict[str, dict[str, Entry]], *,
                shapes: Mapping[str, tuple[int, ...]], compute_dtype: str,
                fp32_master_in_params: bool) -> dict[str, Any]:
    """Check an ``offload_model`` checkpoint (from :func:`read`) against the model; its
    counters, step counts and which parameters have Adam moments.

    ``fp32_master_in_params``: the parameter tier holds the fp32 masters (fp32 compute);
    otherwise the optimizer tier holds them as ``master/<name>``.

    Raises
    ------
    MemAscendError
        The checkpoint is for another model or compute dtype.
    MetadataError
        A field of the state has the wrong type, or a tier lacks a tensor the state needs.
    """
    want = {n: list(s) for n, s in shapes.items()}
    if field(state, "params", dict, folder) != want:
        raise MemAscendError(f"checkpoint {folder} is for a different model (parameters or "
                             "shapes differ)")
    if field(state, "compute_dtype", str, folder) != compute_dtype:
        raise MemAscendError(f"checkpoint {folder} was trained in {state['compute_dtype']}")
    out = {k: field(state, k, (int, float), folder)
           for k in ("step_count", "loss_scale", "good_steps", "skipped_steps")}
    out["steps"] = steps = field(state, "steps", dict, folder)
    out["has_state"] = has_state = field(state, "has_state", list, folder)
    need = {"params.swp": [f"p/{n}" for n in shapes],
            "optim.swp": ([] if fp32_master_in_params else [f"master/{n}" for n in shapes]) +
            [f"{k}/{n}" for n in has_state for k in ("m", "v")]}
    for tier, keys in need.items():
        missing = [k for k in keys if k not in entries[tier]]
        if missing or any(not isinstance(steps.get(n), (int, float)) for n in shapes):
            raise MetadataError(f"checkpoint {folder} is incomplete: tier {tier} lacks "
                                f"{missing[:4]} or the state lacks step counts",
                                path=os.path.join(folder, tier))
    return out


def field(state: dict[str, Any], name: str, kind: type | tuple[type, ...], folder: str) -> Any:
    """``state[name]`` if it is a ``kind``; else a MetadataError naming the state file."""
    v = state.get(name)
    if not isinstance(v, kind) or isinstance(v, bool) and kind in (int, float, (int, float)):
        raise MetadataError(f"checkpoint state {os.path.join(folder, STATE)}: field {name!r} "
                            f"is {v!r}, not a {getattr(kind, '__name__', kind)}",
                            path=os.path.join(folder, STATE))
    return v
