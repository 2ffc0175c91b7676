"""The ``memascend`` command line.

Subcommands: ``info`` (what this machine and process allow: native build, memlock, io_uring,
and which swap-engine backend ``auto`` picks and why)
and ``demo`` (for now a pool self-check: it will run the SSD-offloaded training demo once
that exists). Every command that reports numbers takes ``--json``. The library never prints;
this module does. Bad input exits with status 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any, Sequence

from . import __version__, _native
from .errors import MemAscendError
from .sysinfo import (fmt_bytes, has_cap_ipc_lock, io_uring_sysctl, lockable_bytes,
                      memlock_hard_limit, memlock_limit, phys_bytes)


def _probe_mlock(nbytes: int = 1 << 16) -> tuple[bool, str]:
    """Try to lock ``nbytes`` through the pool with lock='required'."""
    if not _native.AVAILABLE:
        return False, "native extension not built"
    from .pool import PinnedPool

    try:
        with PinnedPool(lock="required", arena_bytes=nbytes, large_threshold=nbytes) as pool:
            with pool.lease(nbytes):
                pass
        return True, f"locked a {fmt_bytes(nbytes)} probe"
    except MemAscendError as exc:
        return False, str(exc)


def collect_info() -> dict[str, Any]:
    """Everything ``memascend info`` reports, as a dict."""
    try:
        import torch

        torch_version = torch.__version__
        cuda = bool(torch.cuda.is_available())
    except ImportError:
        torch_version, cuda = None, False
    ok, detail = _probe_mlock()
    sysctl = io_uring_sysctl()
    backends: dict[str, Any] = {}
    chosen, reason = None, "native extension not built"
    if _native.AVAILABLE:
        from .engine import probe_backends

        backends = {k: {"available": v[0], "detail": v[1]} for k, v in probe_backends().items()}
        if backends["uring"]["available"]:
            chosen, reason = "uring", backends["uring"]["detail"]
        else:
            chosen = "threads"
            reason = "io_uring unusable: " + backends["uring"]["detail"]
    return {
        "version": __version__,
        "python": platform.python_version(),
        "torch": torch_version,
        "cuda_available": cuda,
        "native": {
            "built": _native.AVAILABLE,
            "path": getattr(getattr(_native, "_lib", None), "__file__", None),
            "error": None if _native.AVAILABLE else str(_native.IMPORT_ERROR),
        },
        "memory": {"physical_bytes": phys_bytes()},
        "memlock": {
            "soft_limit_bytes": memlock_limit(),
            "hard_limit_bytes": memlock_hard_limit(),
            "cap_ipc_lock": has_cap_ipc_lock(),
            "lockable_bytes": lockable_bytes(),
            "mlock_works": ok,
            "detail": detail,
        },
        "io_uring": {
            "sysctl_io_uring_disabled": sysctl,
            "built_with_liburing": bool(_native.AVAILABLE and _native.lib.MA_BUILT_WITH_URING),
        },
        "engine": {"auto_backend": chosen, "reason": reason, "backends": backends},
        "crc32c_hardware": bool(_native.AVAILABLE and _native.lib.ma_crc32c_hw()),
    }


def _print_info(info: dict[str, Any]) -> None:
    ml = info["memlock"]
    nat = info["native"]
    print(f"memascend {info['version']}  (python {info['python']}, torch {info['torch']}, "
          f"CUDA {'yes' if info['cuda_available'] else 'no'})")
    print(f"native core      : {'built, ' + str(nat['path']) if nat['built'] else 'MISSING: ' + str(nat['error'])}")
    print(f"physical memory  : {fmt_bytes(info['memory']['physical_bytes'])}")
    print(f"memlock limit    : soft {fmt_bytes(ml['soft_limit_bytes'])}, hard "
          f"{fmt_bytes(ml['hard_limit_bytes'])}, CAP_IPC_LOCK {'yes' if ml['cap_ipc_lock'] else 'no'}"
          f" -> may lock {fmt_bytes(ml['lockable_bytes'])}")
    print(f"mlock            : {'works' if ml['mlock_works'] else 'REFUSED'} ({ml['detail']})")
    if ml["lockable_bytes"] is not None:
        print("                   past that limit the pool runs unlocked (lock='auto') and "
              "counts lock failures")
    sysctl = info["io_uring"]["sysctl_io_uring_disabled"]
    state = {0: "enabled", 1: "restricted to a group", 2: "disabled", None: "unknown"}.get(sysctl, str(sysctl))
    print(f"io_uring sysctl  : {state}; native core built "
          f"{'with' if info['io_uring']['built_with_liburing'] else 'WITHOUT'} liburing")
    eng = info["engine"]
    print(f"swap engine      : backend 'auto' -> {eng['auto_backend']} ({eng['reason']})")
    for name, b in eng["backends"].items():
        print(f"  {name:<15}: {'yes' if b['available'] else 'no '}  {b['detail']}")


def cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .selfcheck import run_selfcheck

    info = collect_info()
    if not info["native"]["built"]:
        print(f"memascend: native core missing: {info['native']['error']}", file=sys.stderr)
        return 1
    result = run_selfcheck(lock=args.lock)
    if args.json:
        print(json.dumps({"info": info, "pool_selfcheck": result.to_dict()}, indent=2))
        return 0 if result.ok else 1
    _print_info(info)
    print()
    print(f"pool self-check ({result.leases} swap buffers of a small LLaMA-style decoder):")
    print(f"  requested {result.requested_bytes:>12,d} B   reserved {result.reserved_bytes:>12,d} B"
          f"   overhead {result.overhead:.4f}x")
    print(f"  locked    {result.locked_bytes:>12,d} B   VmLck grew {result.vmlck_delta_bytes:>12,d} B"
          f"   VmRSS grew {result.vmrss_delta_bytes:,d} B")
    for name, ok in result.checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    for note in result.notes:
        print(f"  note: {note}")
    print("the SSD-offloaded training demo is not part of this version yet")
    return 0 if result.ok else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``memascend`` command."""
    p = argparse.ArgumentParser(prog="memascend", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"memascend {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what this machine allows: native build, memlock, io_uring")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="run the demo (currently: the pinned-pool self-check)")
    demo.add_argument("--json", action="store_true", help="print JSON")
    demo.add_argument("--lock", choices=["auto", "required", "off"], default="auto",
                      help="pool lock mode (default auto)")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memascend`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except MemAscendError as exc:
        print(f"memascend: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memascend: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
