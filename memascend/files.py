"""Private, crash-safe metadata files and folders: how memascend creates what it keeps on disk.

Everything memascend creates besides swap-area data (manifests, journals, locks, checkpoint
state, exported checkpoints, the folders holding them) goes through here, so two rules hold
everywhere:

- **Private.** Folders are created 0700 and files 0600, whatever the umask (tensor names,
  shapes and training state are nobody else's business on a shared box). Folders that already
  exist are left as they are: they may be the user's.
- **Never half-written.** A file is replaced by writing a temporary beside it, fsync'ing it
  and renaming it over the old one (then fsync'ing the folder), so a reader sees the old or
  the new bytes. A folder (a checkpoint) is replaced by two renames, ``path -> path.old`` and
  ``path.tmp -> path``; a crash between them leaves no ``path``, and :func:`resolve_dir` /
  :func:`recover_dir` find the complete copy in ``path.tmp`` or ``path.old``. Whether a
  folder is complete is the caller's rule (e.g. "its state file exists", written last).
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, Optional

DIR_MODE = 0o700
FILE_MODE = 0o600

_rename = os.rename  # an indirection so tests can kill a process between two renames


def private_dirs(path: str) -> None:
    """Create ``path`` and any missing parents as 0700 folders (existing ones untouched).

    Raises
    ------
    OSError
        A component cannot be created, or exists and is not a folder.
    """
    path = os.path.abspath(path)
    missing = []
    p = path
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
            continue  # created concurrently (e.g. another rank): not ours to chmod
        os.chmod(d, DIR_MODE)  # the umask may have taken bits from the owner


def private_open(path: str, flags: int) -> int:
    """``os.open(path, flags | O_CREAT, 0600)``, and the file made exactly 0600 whatever the
    umask (an existing one too: it is memascend's own metadata)."""
    fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o777 != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def fsync_dir(path: str) -> None:
    """fsync a folder (makes renames and creations inside it durable)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - os.write raises instead
            raise OSError(5, "write returned 0")
        view = view[n:]


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``, 0600: a crash leaves the old or the new file.

    Raises
    ------
    OSError
        Writing failed (e.g. ENOSPC); ``path`` is unchanged and no temporary is left.
    """
    tmp = path + ".tmp"
    try:
        fd = private_open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def resolve_dir(path: str, complete: Callable[[str], bool]) -> Optional[str]:
    """The folder holding the checkpoint ``path`` names: ``path`` when complete, else the
    complete one of ``path.tmp`` (a save that finished writing and was killed between its
    renames) and ``path.old`` (the previous one); None when there is none."""
    for cand in (path, path + ".tmp", path + ".old"):
        if os.path.isdir(cand) and complete(cand):
            return cand
    return None


def recover_dir(path: str, complete: Callable[[str], bool]) -> None:
    """Finish or undo a :func:`replace_dir` that a crash interrupted: afterwards ``path`` is
    the newest complete copy (if any) and no ``path.tmp`` / ``path.old`` is left."""
    found = resolve_dir(path, complete)
    if found is not None and found != path:
        if os.path.lexists(path):
            _remove(path)  # incomplete
        _rename(found, path)
        fsync_dir(os.path.dirname(path))
    for stale in (path + ".tmp", path + ".old"):
        _remove(stale)


def replace_dir(tmp: str, path: str) -> None:
    """Put the complete folder ``tmp`` (== ``path + ".tmp"``) in place of ``path``.

    Call :func:`recover_dir` before writing ``tmp`` so that ``path`` holds the newest
    complete copy; a crash anywhere in here leaves one that :func:`resolve_dir` finds.
    """
    fsync_dir(tmp)
    parent = os.path.dirname(os.path.abspath(path))
    old = path + ".old"
    _remove(old)
    if os.path.lexists(path):
        _rename(path, old)
    _rename(tmp, path)
    fsync_dir(parent)
    _remove(old)
