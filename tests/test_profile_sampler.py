"""``memascend profile run``: process-tree sampling from /proc, exit codes, signals, plot.

Each test runs the real command line in a subprocess (the profiler becomes a child
subreaper and reaps every child, which must not happen inside pytest) on small commands: a
Python child that allocates and locks memory, a shell that spawns grandchildren, I/O and CPU.
"""
from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from memascend.profile.sampler import CommandNotFoundError, TreeSampler, run_profiled

MIB = 1 << 20
PY = sys.executable


def profile(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "memascend.cli", "profile", "run", *args],
                          capture_output=True, text=True, timeout=timeout, **kw)


def run_json(*cmd: str, interval: str = "20", extra: tuple[str, ...] = ()) -> tuple[dict, int]:
    out = profile("--json", "--interval", interval, *extra, "--", *cmd)
    return json.loads(out.stdout[out.stdout.index("{"):]), out.returncode


ALLOC_AND_LOCK = textwrap.dedent("""
    import ctypes, mmap, time
    buf = bytearray(160 << 20)          # resident: bytearray zero-fills
    m = mmap.mmap(-1, 4 << 20)
    m.write(b"x" * (4 << 20))
    libc = ctypes.CDLL(None, use_errno=True)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    locked = libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(4 << 20)) == 0
    print("locked" if locked else "not-locked", flush=True)
    time.sleep(0.6)
""")


def test_python_child_memory_and_locked_memory():
    doc, rc = run_json(PY, "-c", ALLOC_AND_LOCK)
    assert rc == 0 and doc["exit_code"] == 0
    assert doc["peak_rss_bytes"] >= 160 * MIB
    assert doc["sampled_peak_rss_bytes"] >= 160 * MIB  # seen by sampling too (0.6 s alive)
    assert doc["peak_rss_bytes"] < 400 * MIB
    assert doc["peak_vm_lck_bytes"] < 5 * MIB  # 4 MiB when mlock is allowed, else 0
    assert doc["samples"] >= 5


def test_locked_memory_is_reported_when_mlock_works():
    code = ALLOC_AND_LOCK
    probe = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=30)
    if "not-locked" in probe.stdout:
        pytest.skip("mlock of 4 MiB refused here (RLIMIT_MEMLOCK)")
    doc, _ = run_json(PY, "-c", code)
    assert 4 * MIB <= doc["peak_vm_lck_bytes"] < 5 * MIB


def test_shell_with_grandchildren_is_summed():
    child = "import time; b = bytearray({n} << 20); time.sleep(0.8)"
    cmd = (f"{PY} -c '{child.format(n=120)}' & {PY} -c '{child.format(n=80)}' & wait")
    doc, rc = run_json("sh", "-c", cmd)
    assert rc == 0
    # both grandchildren alive at once: the tree sum exceeds either process
    assert doc["sampled_peak_rss_bytes"] >= 200 * MIB
    assert doc["process_hwm_bytes"] < doc["sampled_peak_rss_bytes"]
    assert doc["processes_seen"] >= 3


def test_forked_child_sharing_pages_is_not_counted_twice():
    """A fork shares the parent's pages until they are written: the tree's memory (PSS
    summed) counts them once, the plain RSS sum twice."""
    code = textwrap.dedent("""
        import os, time
        b = bytearray(200 << 20)
        pid = os.fork()
        time.sleep(0.8)
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    """)
    doc, rc = run_json(PY, "-c", code)
    assert rc == 0
    assert doc["sampled_peak_rss_bytes"] >= 380 * MIB
    assert 200 * MIB <= doc["peak_rss_bytes"] < 300 * MIB


def test_orphaned_grandchild_stays_in_the_tree():
    """The intermediate shell exits at once; the subreaper keeps its child in the tree."""
    child = "import time; b = bytearray(100 << 20); time.sleep(1.0)"
    cmd = f"( {PY} -c '{child}' & ) ; sleep 0.8"
    doc, rc = run_json("sh", "-c", cmd)
    assert rc == 0
    assert doc["sampled_peak_rss_bytes"] >= 100 * MIB


@pytest.mark.parametrize("cmd,code", [("exit 0", 0), ("exit 7", 7), ("kill -TERM $$", 143),
                                      ("kill -KILL $$", 137)])
def test_exit_code_passes_through(cmd, code):
    out = profile("--", "sh", "-c", cmd)
    assert out.returncode == code
    assert f"exit code {code}" in out.stderr


def test_io_and_cpu_are_counted(tmp_path):
    path = tmp_path / "data"
    code = textwrap.dedent(f"""
        import os, time
        fd = os.open({str(path)!r}, os.O_WRONLY | os.O_CREAT)
        for _ in range(24):
            os.write(fd, b"x" * (1 << 20))
        os.fsync(fd); os.close(fd)
        t = time.process_time()
        while time.process_time() - t < 0.6:
            pass
    """)
    doc, rc = run_json(PY, "-c", code)
    assert rc == 0
    if not doc["io_available"]:
        pytest.skip("/proc/<pid>/io not readable here")
    assert doc["write_bytes"] >= 24 * MIB
    assert doc["cpu_seconds"] >= 0.5


def test_timeline_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "t.png"
    doc, rc = run_json(PY, "-c", "import time; b = bytearray(50 << 20); time.sleep(0.5)",
                       extra=("--timeline", "--plot", str(png)))
    assert rc == 0 and doc["plot"] == str(png)
    assert png.stat().st_size > 10_000
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    tl = doc["timeline"]
    assert len(tl) == doc["samples"] and tl[0]["t"] <= tl[-1]["t"]
    assert max(s["rss"] for s in tl) == doc["sampled_peak_rss_bytes"]


def test_human_report_on_stderr_child_output_untouched():
    out = profile("--", PY, "-c", "print('hello from child')")
    assert out.returncode == 0
    assert out.stdout == "hello from child\n"
    assert "peak RSS" in out.stderr and "storage written" in out.stderr


@pytest.mark.parametrize("args,needle", [
    (("--", "memascend-no-such-command-xyz"), "command not found: memascend-no-such-command-xyz"),
    (("--", "/etc/passwd"), "not executable"),
    ((), "nothing to run"),
    (("--interval", "0", "--", "true"), "must be positive"),
    (("--plot", "/nonexistent-dir/x.png", "--", "true"), "does not exist"),
])
def test_bad_input_is_one_line_exit_2(args, needle):
    out = profile(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr


WAIT_FOR_SIGINT = textwrap.dedent("""
    import signal, sys, time
    hits = []
    signal.signal(signal.SIGINT, lambda s, f: hits.append(s))
    open(sys.argv[1], "w").close()          # ready
    deadline = time.monotonic() + 20
    while not hits and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)                          # a duplicate would arrive meanwhile
    print(f"sigints={len(hits)}", flush=True)
    sys.exit(5 if hits else 1)
""")


def _wait_for(path, timeout=20.0):
    t0 = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(path)
        time.sleep(0.02)


def test_sigint_to_the_profiler_is_forwarded_once(tmp_path):
    ready = tmp_path / "ready"
    p = subprocess.Popen([PY, "-m", "memascend.cli", "profile", "run", "--json", "--interval", "20",
                          "--", PY, "-c", WAIT_FOR_SIGINT, str(ready)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(ready)
        os.kill(p.pid, signal.SIGINT)       # only the profiler: it must forward
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 5, err
    assert "sigints=1" in out
    doc = json.loads(out[out.index("{"):])
    assert doc["interrupted"] == "SIGINT" and doc["exit_code"] == 5
    assert doc["samples"] >= 1


def test_sigterm_to_the_profiler_is_forwarded(tmp_path):
    p = subprocess.Popen([PY, "-m", "memascend.cli", "profile", "run", "--", "sleep", "30"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.8)
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143
    assert "interrupted by SIGTERM" in err


def test_terminal_ctrl_c_reaches_the_command_once(tmp_path):
    """A Ctrl-C typed on the controlling terminal goes to the whole foreground process
    group; the profiler must not send a second one, and still reports."""
    ready = tmp_path / "ready"
    report = tmp_path / "report.json"
    master, slave = pty.openpty()
    cmd = [PY, "-c", textwrap.dedent(f"""
        import fcntl, os, signal, subprocess, sys, termios
        signal.signal(signal.SIGINT, lambda *a: None)   # this wrapper is in the group too
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        with open({str(report)!r}, "w") as out:
            r = subprocess.run([sys.executable, "-m", "memascend.cli", "profile", "run", "--json",
                                "--interval", "20", "--", sys.executable, "-c", {WAIT_FOR_SIGINT!r},
                                {str(ready)!r}], stdout=out)
        sys.exit(r.returncode)
    """)]
    p = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    try:
        _wait_for(ready)
        time.sleep(0.2)
        os.write(master, b"\x03")            # the terminal's interrupt character
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    text = report.read_text()
    assert "sigints=1" in text, text
    doc = json.loads(text[text.index("{"):])
    assert doc["interrupted"] == "SIGINT" and doc["exit_code"] == 5
    assert p.returncode == 5


def test_library_api_samples_and_rejects_missing_command():
    res = run_profiled([PY, "-c", "import time; b = bytearray(64 << 20); time.sleep(0.4)"],
                       interval=0.02)
    assert res.exit_code == 0 and res.peak_rss >= 64 * MIB
    assert res.samples and all(s.processes <= 1 for s in res.samples)
    with pytest.raises(CommandNotFoundError):
        run_profiled(["memascend-no-such-command-xyz"])
    with pytest.raises(ValueError):
        run_profiled([], interval=0.1)


def test_tree_sampler_sees_only_descendants():
    s = TreeSampler().sample(0.0)
    assert s.processes == 0 and s.rss == 0
