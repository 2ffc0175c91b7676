"""Run a command and sample the memory, I/O and CPU of its whole process tree from ``/proc``.

Every ``interval`` seconds the sampler walks the tree below this process
(``/proc/<pid>/task/*/children``, children of children included) and reads, per process,
``VmRSS`` / ``VmLck`` / ``VmPin`` / ``VmHWM`` from ``/proc/<pid>/status``, ``Pss`` from
``/proc/<pid>/smaps_rollup``, ``read_bytes`` / ``write_bytes`` (storage I/O) from
``/proc/<pid>/io`` and ``utime + stime`` from ``/proc/<pid>/stat``. Memory is summed over the
live processes of a sample — the tree's memory is the RSS of a lone process, and the sum of
PSS when several are alive, because a forked child shares its parent's pages until it execs
and summing RSS would count them twice (a 2.5 GB DeepSpeed process spawning a helper showed
up as 4.4 GB); I/O and CPU are
cumulative, and a process that has exited keeps the last values seen for it (processes are
told apart by pid *and* start time, so a reused pid is a new process). ``VmHWM`` is each
process's own exact peak RSS, so a single process's peak is caught even between samples, as
long as one sample follows it. When the command exits, ``wait4`` adds what sampling cannot
see: the peak RSS of the command or of its largest waited-for descendant (``ru_maxrss``, when
it is above the profiler's own RSS), and their total block I/O and CPU time.

With ``adopt_orphans`` (what ``memascend profile run`` does) this process becomes a child
subreaper (``PR_SET_CHILD_SUBREAPER``), so descendants whose parent exits — daemons, ``sh -c
'x &'`` — stay in the tree instead of moving to init; it then reaps every child itself, so
only use it in a process that has no other children to wait for.

Signals: SIGINT and SIGTERM sent to the profiler by another process (``kill``, a job
scheduler) are forwarded to the command. A Ctrl-C typed in the terminal already reaches the
command (it is in the same foreground process group), so it is not sent a second time. In
both cases the profiler keeps sampling until the command exits and then reports what it has;
the command's exit status is returned (``128 + N`` when it was killed by signal N).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ..errors import MemAscendError

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_CHILD_SUBREAPER = 36
_SI_KERNEL = 0x80
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class CommandNotFoundError(MemAscendError, FileNotFoundError):
    """The command to profile does not exist or cannot be executed."""


@dataclass(frozen=True)
class Sample:
    """One sample of the process tree.

    Attributes
    ----------
    t:
        Seconds since the command started.
    rss, vm_lck, vm_pin:
        Sums over the live processes, bytes. A page shared by two processes (a forked child
        before it execs) is in both RSS values: see :attr:`memory`.
    read_bytes, write_bytes:
        Cumulative storage I/O of every process seen so far, bytes.
    cpu_seconds:
        Cumulative user + system CPU time of every process seen so far.
    processes:
        Live processes in the tree.
    pss:
        Sum of the proportional set sizes (``Pss`` of ``/proc/<pid>/smaps_rollup``; each
        process's RSS where that file cannot be read).
    """

    t: float
    rss: int
    vm_lck: int
    vm_pin: int
    read_bytes: int
    write_bytes: int
    cpu_seconds: float
    processes: int
    pss: int = 0

    @property
    def memory(self) -> int:
        """The tree's memory: its RSS when one process is alive, else the sum of PSS (a page
        shared by several processes of the tree, e.g. right after a ``fork``, counts once)."""
        return self.rss if self.processes <= 1 else self.pss

    def to_dict(self) -> dict[str, float]:
        """The sample as a dict."""
        return {"t": round(self.t, 4), "rss": self.rss, "pss": self.pss, "memory": self.memory,
                "vm_lck": self.vm_lck, "vm_pin": self.vm_pin, "read_bytes": self.read_bytes,
                "write_bytes": self.write_bytes, "cpu_seconds": round(self.cpu_seconds, 3),
                "processes": self.processes}


@dataclass
class RunResult:
    """What ``run_profiled`` measured.

    Attributes
    ----------
    command:
        The command line.
    exit_code:
        The command's exit status (``128 + N`` if killed by signal N).
    seconds:
        Wall time from start to exit.
    samples:
        The timeline.
    interval:
        Sampling interval in seconds.
    rusage_maxrss:
        Peak RSS of the command or of its largest waited-for descendant, from ``wait4``; 0
        when it is not above the profiler's own RSS at the fork (``ru_maxrss`` survives
        ``exec`` and so counts the forked copy of the profiler).
    rusage_read_bytes, rusage_write_bytes:
        Block I/O of the command and its waited-for descendants (512-byte units), from
        ``wait4``.
    rusage_cpu_seconds:
        Their user + system CPU time, from ``wait4``.
    process_hwm:
        The largest ``VmHWM`` (a process's own lifetime peak RSS) seen in any sample.
    processes_seen:
        Distinct processes the tree held over the run.
    io_available:
        Whether ``/proc/<pid>/io`` could be read.
    interrupted:
        A SIGINT or SIGTERM arrived while the command ran (name of the first one).
    """

    command: list[str]
    exit_code: int
    seconds: float
    samples: list[Sample]
    interval: float
    rusage_maxrss: int = 0
    rusage_read_bytes: int = 0
    rusage_write_bytes: int = 0
    rusage_cpu_seconds: float = 0.0
    process_hwm: int = 0
    processes_seen: int = 0
    io_available: bool = True
    interrupted: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    def _peak(self, attr: str) -> tuple[int, float]:
        best = max(self.samples, key=lambda s: getattr(s, attr), default=None)
        return (getattr(best, attr), best.t) if best is not None else (0, 0.0)

    @property
    def sampled_peak_rss(self) -> tuple[int, float]:
        """(largest sum of RSS over the tree among the samples, its time)."""
        return self._peak("rss")

    @property
    def sampled_peak_memory(self) -> tuple[int, float]:
        """(largest tree memory — :attr:`Sample.memory` — among the samples, its time)."""
        best = max(self.samples, key=lambda s: s.memory, default=None)
        return (best.memory, best.t) if best is not None else (0, 0.0)

    @property
    def peak_rss(self) -> int:
        """Peak RSS: the tree's largest sampled memory (RSS of a lone process, PSS summed
        over several), or the largest single-process peak (``VmHWM`` / ``ru_maxrss``, exact
        but per process) if that is larger."""
        return max(self.sampled_peak_memory[0], self.process_hwm, self.rusage_maxrss)

    @property
    def peak_vm_lck(self) -> int:
        """Largest sampled ``VmLck`` sum."""
        return self._peak("vm_lck")[0]

    @property
    def peak_vm_pin(self) -> int:
        """Largest sampled ``VmPin`` sum."""
        return self._peak("vm_pin")[0]

    @property
    def read_bytes(self) -> int:
        """Storage bytes read by the tree (the larger of the sampled and ``wait4`` totals)."""
        last = self.samples[-1].read_bytes if self.samples else 0
        return max(last, self.rusage_read_bytes)

    @property
    def write_bytes(self) -> int:
        """Storage bytes written by the tree (the larger of the sampled and ``wait4`` totals)."""
        last = self.samples[-1].write_bytes if self.samples else 0
        return max(last, self.rusage_write_bytes)

    @property
    def cpu_seconds(self) -> float:
        """CPU time of the tree (the larger of the sampled and ``wait4`` totals)."""
        last = self.samples[-1].cpu_seconds if self.samples else 0.0
        return max(last, self.rusage_cpu_seconds)

    def summary(self) -> dict[str, object]:
        """The peaks and totals as a dict (no timeline)."""
        mem, t = self.sampled_peak_memory
        return {"command": self.command, "exit_code": self.exit_code,
                "seconds": round(self.seconds, 3), "interval_s": self.interval,
                "samples": len(self.samples), "peak_rss_bytes": self.peak_rss,
                "sampled_peak_memory_bytes": mem, "sampled_peak_t": round(t, 3),
                "sampled_peak_rss_bytes": self.sampled_peak_rss[0],
                "sampled_peak_pss_bytes": self._peak("pss")[0],
                "process_hwm_bytes": max(self.process_hwm, self.rusage_maxrss),
                "peak_vm_lck_bytes": self.peak_vm_lck, "peak_vm_pin_bytes": self.peak_vm_pin,
                "read_bytes": self.read_bytes, "write_bytes": self.write_bytes,
                "cpu_seconds": round(self.cpu_seconds, 3),
                "processes_seen": self.processes_seen, "io_available": self.io_available,
                "interrupted": self.interrupted, "notes": list(self.notes)}

    def to_dict(self, timeline: bool = False) -> dict[str, object]:
        """The summary, with the timeline as a list of samples if asked."""
        d = self.summary()
        if timeline:
            d["timeline"] = [s.to_dict() for s in self.samples]
        return d


# ---- /proc readers (each returns None when the process is gone) ----

def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                out.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue
    return out


def _children_by_scan(root: int) -> dict[int, list[int]]:
    """ppid -> pids over all of /proc (when ``/proc/*/task/*/children`` is missing)."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _read_stat(int(name))
        if st is not None:
            kids.setdefault(st[0], []).append(int(name))
    return kids


def _read_stat(pid: int) -> Optional[tuple[int, int, float]]:
    """(ppid, starttime ticks, cpu seconds) from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    try:
        # after the comm: state(0) ppid(1) ... utime(11) stime(12) ... starttime(19)
        return int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (IndexError, ValueError):
        return None


def _read_status(pid: int) -> Optional[dict[str, int]]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("VmRSS", "VmLck", "VmPin", "VmHWM")):
                    key, _, rest = line.partition(":")
                    parts = rest.split()
                    if len(parts) == 2:
                        out[key] = int(parts[0]) * 1024
    except OSError:
        return None
    return out


def _read_pss(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_io(pid: int) -> Optional[tuple[int, int]]:
    try:
        with open(f"/proc/{pid}/io", encoding="ascii") as f:
            vals = dict(line.split(":", 1) for line in f if ":" in line)
        return int(vals["read_bytes"]), int(vals["write_bytes"])
    except (OSError, KeyError, ValueError):
        return None


class TreeSampler:
    """Samples the process tree below ``root`` (default: this process, which is excluded).

    Parameters
    ----------
    root:
        The pid whose descendants are sampled.
    """

    def __init__(self, root: Optional[int] = None):
        self.root = os.getpid() if root is None else root
        self._last: dict[tuple[int, int], tuple[int, int, float]] = {}  # (pid, start) -> io, cpu
        self.process_hwm = 0
        self.io_available = True
        self._use_children_files = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")

    def descendants(self) -> list[int]:
        """Pids of every live descendant of ``root``."""
        out: list[int] = []
        if self._use_children_files:
            todo = _children(self.root)
            while todo:
                pid = todo.pop()
                out.append(pid)
                todo.extend(_children(pid))
            return out
        kids = _children_by_scan(self.root)
        todo = list(kids.get(self.root, []))
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(kids.get(pid, []))
        return out

    def sample(self, t: float) -> Sample:
        """Read every descendant once and return the tree's sample at time ``t``."""
        rss = pss = lck = pin = live = 0
        for pid in self.descendants():
            st = _read_stat(pid)
            status = _read_status(pid)
            if st is None or status is None or "VmRSS" not in status:
                continue  # exited meanwhile, or a zombie (no memory left)
            live += 1
            rss += status.get("VmRSS", 0)
            p = _read_pss(pid)
            pss += status.get("VmRSS", 0) if p is None else p
            lck += status.get("VmLck", 0)
            pin += status.get("VmPin", 0)
            self.process_hwm = max(self.process_hwm, status.get("VmHWM", 0))
            io = _read_io(pid)
            key = (pid, st[1])
            if io is None:
                self.io_available = False
                old = self._last.get(key)
                io = (old[0], old[1]) if old else (0, 0)
            self._last[key] = (io[0], io[1], st[2])
        rb = sum(v[0] for v in self._last.values())
        wb = sum(v[1] for v in self._last.values())
        cpu = sum(v[2] for v in self._last.values())
        return Sample(t, rss, lck, pin, rb, wb, cpu, live, pss)

    @property
    def processes_seen(self) -> int:
        """Distinct processes sampled so far."""
        return len(self._last)


def _set_subreaper(on: bool) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def run_profiled(argv: Sequence[str], *, interval: float = 0.1, adopt_orphans: bool = False,
                 env: Optional[dict[str, str]] = None,
                 on_sample: Optional[Callable[[Sample], None]] = None,
                 stdin=None, stdout=None, stderr=None) -> RunResult:
    """Run ``argv`` and sample its process tree until it exits (see the module docstring).

    Parameters
    ----------
    argv:
        The command and its arguments (looked up on ``PATH``).
    interval:
        Seconds between samples (> 0).
    adopt_orphans:
        Become a child subreaper and reap every child (only in a process with no other
        children, e.g. the CLI).
    env:
        Environment of the command (default: this one).
    on_sample:
        Called with each :class:`Sample`.
    stdin, stdout, stderr:
        As for :class:`subprocess.Popen` (default: inherited).

    Returns
    -------
    RunResult

    Raises
    ------
    CommandNotFoundError
        The command does not exist or is not executable.
    ValueError
        Empty command or a non-positive interval.
    """
    if not argv:
        raise ValueError("no command to run")
    if not interval > 0:
        raise ValueError(f"interval must be > 0, got {interval}")
    main_thread = threading.current_thread() is threading.main_thread()
    notes: list[str] = []
    subreaper = adopt_orphans and _set_subreaper(True)
    if adopt_orphans and not subreaper:
        notes.append("could not become a child subreaper: orphaned descendants leave the tree")
    old_mask = None
    try:
        # Block the signals before the child exists (so none can be lost) and unblock them in
        # the child before it execs (so it gets the default dispositions).
        if main_thread:
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        own_rss = (_read_status(os.getpid()) or {}).get("VmRSS", 0)
        try:
            proc = subprocess.Popen(list(argv), env=env, stdin=stdin, stdout=stdout,
                                    stderr=stderr,
                                    preexec_fn=(lambda: signal.pthread_sigmask(
                                        signal.SIG_UNBLOCK, _SIGNALS)) if main_thread else None)
        except FileNotFoundError as exc:
            raise CommandNotFoundError(f"command not found: {argv[0]}") from exc
        except PermissionError as exc:
            raise CommandNotFoundError(f"command not executable: {argv[0]}: {exc.strerror}") from exc
        except OSError as exc:
            raise CommandNotFoundError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
        t0 = time.monotonic()
        sampler = TreeSampler()
        samples: list[Sample] = []
        try:
            status, rusage, interrupted = _sample_until_exit(
                proc, sampler, samples, t0, interval, adopt_orphans, main_thread, on_sample)
        except BaseException:
            # A failure of the profiler itself (or of on_sample): do not leave the command
            # running unobserved.
            try:
                proc.kill()
                proc.wait()
            except OSError:
                pass
            raise
        seconds = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        if adopt_orphans:
            _reap_all()
        res = RunResult(command=list(argv), exit_code=code, seconds=seconds, samples=samples,
                        interval=interval, process_hwm=sampler.process_hwm,
                        processes_seen=sampler.processes_seen, io_available=sampler.io_available,
                        interrupted=interrupted, notes=notes)
        if rusage is not None:
            # ru_maxrss survives exec, so it includes the forked copy of *this* process
            # (whose RSS it shares until exec): only a value above our own RSS at the fork is
            # certainly the peak of the command or of a descendant.
            maxrss = rusage.ru_maxrss * 1024
            res.rusage_maxrss = maxrss if maxrss > own_rss else 0
            res.rusage_read_bytes = rusage.ru_inblock * 512
            res.rusage_write_bytes = rusage.ru_oublock * 512
            res.rusage_cpu_seconds = rusage.ru_utime + rusage.ru_stime
        if not sampler.io_available:
            res.notes.append("/proc/<pid>/io was not readable for some processes (another "
                             "user's?): their I/O is missing from the timeline")
        return res
    finally:
        if main_thread and old_mask is not None:
            while signal.sigtimedwait(_SIGNALS, 0) is not None:
                pass  # drop what arrived after the command exited; do not raise it here
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if subreaper:
            _set_subreaper(False)


def _sample_until_exit(proc: subprocess.Popen, sampler: TreeSampler, samples: list[Sample],
                       t0: float, interval: float, adopt_orphans: bool, main_thread: bool,
                       on_sample: Optional[Callable[[Sample], None]]):
    """The sampling loop: (wait status, rusage, first signal name or None)."""
    interrupted: Optional[str] = None
    while True:
        s = sampler.sample(time.monotonic() - t0)
        samples.append(s)
        if on_sample is not None:
            on_sample(s)
        status, rusage = _reap(proc.pid, adopt_orphans)
        if status is not None:
            return status, rusage, interrupted
        deadline = time.monotonic() + interval
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not main_thread:
                time.sleep(left)
                break
            info = signal.sigtimedwait(_SIGNALS, left)
            if info is None:
                break
            interrupted = interrupted or signal.Signals(info.si_signo).name
            if info.si_code != _SI_KERNEL and info.si_pid != proc.pid:
                # Sent by a process (kill, timeout, a scheduler): the command did not get it.
                # A terminal's Ctrl-C (SI_KERNEL) reached the whole foreground group already.
                try:
                    os.kill(proc.pid, info.si_signo)
                except ProcessLookupError:
                    pass


def _reap(pid: int, any_child: bool):
    """(wait status, rusage) of ``pid`` if it has exited, else (None, None); with
    ``any_child`` also reaps adopted orphans that have exited."""
    if not any_child:
        got, status, ru = os.wait4(pid, os.WNOHANG)
        return (status, ru) if got == pid else (None, None)
    while True:
        try:
            got, status, ru = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return None, None
        if got == 0:
            return None, None
        if got == pid:
            return status, ru


def _reap_all() -> None:
    while True:
        try:
            got, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if got == 0:
            return
