"""The DeepSpeed drop-in reached without code: ``memascend run`` with HF Trainer, accelerate
and torchrun.

The training scripts (tests/_hf_worker.py) never mention memascend. Under ``memascend run``
every Python process they start (also each rank of ``torchrun`` and of the ``deepspeed``
launcher) enables the drop-in when it imports ``deepspeed``: before
``from_pretrained``/``from_config`` builds the model under ``zero.Init``, so the parameter
swapper is memascend's too. Reference: the same script and config with ``offload_*`` on
``cpu``, stock DeepSpeed (no aio op needed). Trainer uses HF's default optimizer (fused
AdamW), which the drop-in streams. Losses agree to 1e-6 relative, as in
tests/test_deepspeed.py; a run resumed from a checkpoint (Trainer's ``checkpoint-2``,
accelerate's ``save_state``) continues with exactly the losses of the uninterrupted run.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

WORKER = os.path.join(os.path.dirname(__file__), "_hf_worker.py")
MEMASCEND_RUN = [sys.executable, "-m", "memascend.cli", "run"]
REL = 1e-6


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_port()), OMP_NUM_THREADS="1")
    env.pop("MEMASCEND_DEEPSPEED_OPTIONS", None)
    env.update(extra)
    return env


def train(tmp_path, name, launcher=(), **spec):
    spec.setdefault("swap", str(tmp_path / f"swap-{name}"))
    spec.setdefault("out", str(tmp_path / f"out-{name}"))
    path = tmp_path / f"spec-{name}.json"
    path.write_text(json.dumps(spec))
    cmd = [*launcher, sys.executable, WORKER, str(path)]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    log = p.stdout + p.stderr
    assert p.returncode == 0, f"{name} failed ({p.returncode}):\n{log[-4000:]}"
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):]), spec


def close(a, b):
    assert len(a) == len(b) > 0, (a, b)
    for x, y in zip(a, b):
        assert abs(x - y) <= REL * max(abs(x), abs(y)), (a, b)


def assert_memascend(res):
    assert res["memascend_enabled"] is True
    assert res["param_swapper"] == "MemAscendParamSwapper"
    assert res["optimizer_swapper"] == "StreamingOptimizerSwapper"


@pytest.mark.parametrize("client", ["trainer", "accelerate"])
def test_an_unmodified_script_under_memascend_run_trains_and_resumes(tmp_path, client):
    pytest.importorskip("accelerate")
    ref, _ = train(tmp_path, "cpu", client=client, device="cpu", steps=4, save_step=2)
    assert ref["memascend_enabled"] is False and ref["param_swapper"] is None
    got, spec = train(tmp_path, "nvme", MEMASCEND_RUN + ["--"], client=client, device="nvme",
                      steps=4, save_step=2)
    assert_memascend(got)
    close(got["losses"], ref["losses"])
    ckpt = os.path.join(spec["out"], "checkpoint-2" if client == "trainer" else "state-2")
    assert os.path.isdir(ckpt)
    resumed, _ = train(tmp_path, "resumed", MEMASCEND_RUN + ["--"], client=client,
                       device="nvme", steps=4, save_step=0, resume=ckpt, resume_step=2)
    assert_memascend(resumed)
    assert resumed["losses"] == got["losses"][2:]
    if client == "trainer":  # save_model() under ZeRO-3 saves a DeepSpeed checkpoint
        assert os.listdir(os.path.join(spec["out"], "final"))


def _python(code, *args, launcher=(), env=None):
    return subprocess.run([*launcher, sys.executable, "-c", textwrap.dedent(code), *args],
                          env=env or _env(), capture_output=True, text=True, timeout=300)


PROBE = """
import sys
import deepspeed
import memascend.integrations.deepspeed as d
from memascend.integrations.deepspeed import state
print("ENABLED", d.enabled(), state.options().param_budget, flush=True)
"""


def test_memascend_run_reaches_child_processes_and_keeps_a_hidden_sitecustomize(tmp_path):
    hidden = tmp_path / "site"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text("print('HIDDEN-SITECUSTOMIZE', flush=True)\n")
    env = _env(PYTHONPATH=str(hidden))
    plain = _python(PROBE, env=env)
    assert "ENABLED False" in plain.stdout and "HIDDEN-SITECUSTOMIZE" in plain.stdout
    nested = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {PROBE!r}])"
    got = _python(nested, launcher=MEMASCEND_RUN + ["--set", "param_budget=64MiB", "--"],
                  env=env)
    assert got.returncode == 0, got.stderr[-3000:]
    assert f"ENABLED True {64 << 20}" in got.stdout  # the grandchild enabled itself
    # still run in every process: the launcher's own, the child and the grandchild
    assert got.stdout.count("HIDDEN-SITECUSTOMIZE") == 3


def test_memascend_run_refuses_bad_options_and_a_missing_command(tmp_path):
    bad = _python("print('ran')", launcher=MEMASCEND_RUN + ["--set", "bogus=1", "--"])
    assert bad.returncode == 2 and "bogus" in bad.stderr and "ran" not in bad.stdout
    none = subprocess.run(MEMASCEND_RUN, capture_output=True, text=True, env=_env())
    assert none.returncode == 2 and "no command" in none.stderr
    missing = subprocess.run(MEMASCEND_RUN + ["--", "no-such-command-xyz"],
                             capture_output=True, text=True, env=_env())
    assert missing.returncode == 127 and "not found" in missing.stderr
    # options that reach a process some other way are checked when deepspeed is imported:
    # the import fails, the run never goes on with stock swappers
    env = _env(MEMASCEND_DEEPSPEED_OPTIONS='{"bogus": 1}')
    from memascend.integrations.deepspeed import launch

    env["PYTHONPATH"] = launch.HOOK_DIR
    failed = _python(PROBE, env=env)
    assert failed.returncode != 0 and "ConfigError" in failed.stderr
    assert "ENABLED" not in failed.stdout


def _rank_probe(tmp_path):
    """A script that prints whether the drop-in is enabled and its rank, and an environment
    without rank variables (the launcher sets them)."""
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(PROBE) +
                      "import os; print('RANK', os.environ['RANK'], flush=True)\n")
    env = _env()
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key)
    return script, env


def test_memascend_run_reaches_every_torchrun_rank(tmp_path):
    script, env = _rank_probe(tmp_path)
    p = subprocess.run(MEMASCEND_RUN + ["--", sys.executable, "-m", "torch.distributed.run",
                                        "--nproc_per_node=2", f"--master_port={_port()}",
                                        str(script)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("ENABLED True") == 2, p.stdout
    assert sorted(line for line in p.stdout.splitlines() if line.startswith("RANK")) == \
        ["RANK 0", "RANK 1"]


def test_memascend_run_reaches_every_rank_of_the_deepspeed_launcher(tmp_path):
    script, env = _rank_probe(tmp_path)
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    p = subprocess.run(MEMASCEND_RUN + ["--", launcher, "--num_gpus", "2",
                                        "--master_port", str(_port()), str(script)],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    ranks = sorted(line.split()[-1] for line in p.stdout.splitlines() if "RANK " in line
                   and not line.startswith("ENABLED"))
    assert ranks == ["0", "1"], p.stdout[-3000:]
    assert p.stdout.count("ENABLED True") == 2
