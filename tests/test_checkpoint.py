"""Plain-path checkpoints: a process killed at any point of ``save()`` leaves a checkpoint that
``load(path)`` finds (the previous or the new one, exactly); damaged or missing state is a
typed error naming the file; checkpoint files are private.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from memascend import files
from memascend.errors import MemAscendError, MetadataError
from memascend.offload import AdamW, offload_model

HERE = os.path.dirname(os.path.abspath(__file__))


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)


def train_step(om, net, step: int) -> None:
    x, y = data(step)
    om.backward(torch.nn.functional.cross_entropy(net(x), y))
    om.step()


def eval_loss(net) -> float:
    x, y = data(999)
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(net(x), y).item()


# Child: train, save ckpt at step 1 (complete), train a step more, then save again and get
# killed at the chosen point of that second save. It prints the eval loss after each step.
CHILD = r"""
import json, os, signal, sys
sys.path.insert(0, sys.argv[3])
from test_checkpoint import model, train_step, eval_loss
from memascend import files, checkpoint
from memascend.offload import AdamW, offload_model
swap, ckpt, point = sys.argv[1], sys.argv[2], sys.argv[4]
net = model()
om = offload_model(net, swap, budget="1MiB", optimizer=AdamW(lr=1e-2))
losses = {}
for step in (1, 2):
    train_step(om, net, step)
    losses[om.step_count] = eval_loss(net)
    if step == 1:
        om.save(ckpt)
print(json.dumps(losses), flush=True)
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_rename, real_write = files._rename, files.write_atomic
calls = []
def rename(a, b):
    calls.append((a, b))
    if point == "before-first-rename" and len(calls) == 1:
        die()
    real_rename(a, b)
    if point == "between-renames" and len(calls) == 1:
        die()
    if point == "after-renames" and len(calls) == 2:
        die()
def write_atomic(p, data):
    if point == "before-state":
        die()
    real_write(p, data)
files._rename = rename
checkpoint.write_atomic = write_atomic
om.save(ckpt)
"""


@pytest.mark.parametrize("point,expect_step", [
    ("before-state", 1), ("before-first-rename", 1), ("between-renames", 2),
    ("after-renames", 2)])
def test_a_save_killed_anywhere_leaves_a_loadable_checkpoint(tmp_path, point, expect_step):
    ckpt = str(tmp_path / "ckpt")
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "swap"), ckpt, HERE, point],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    losses = {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}
    if point == "between-renames":
        assert not os.path.exists(ckpt)  # the window the old rename scheme left
    net = model(seed=7)  # other initial weights: the load must replace them all
    with offload_model(net, str(tmp_path / "swap2"), budget="1MiB",
                       optimizer=AdamW(lr=1e-2)) as om:
        om.load(ckpt)
        assert om.step_count == expect_step
        assert eval_loss(net) == losses[expect_step]
        train_step(om, net, 3)  # and training goes on; the next save cleans up
        om.save(ckpt)
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "swap", "swap2"]


def test_missing_and_damaged_checkpoints_are_typed_errors(tmp_path):
    net = model()
    with offload_model(net, str(tmp_path / "swap"), budget="1MiB") as om:
        with pytest.raises(MetadataError) as info:
            om.load(str(tmp_path / "nothing"))
        assert info.value.errno == errno.ENOENT and "nothing" in str(info.value)
        train_step(om, net, 1)
        om.save(str(tmp_path / "ckpt"))
        state_path = str(tmp_path / "ckpt" / "state.json")
        good = open(state_path).read()
        for bad in ("[]", "null", "{", json.dumps({**json.loads(good), "steps": None}),
                    json.dumps({**json.loads(good), "has_state": ["0.weight", "x"]})):
            open(state_path, "w").write(bad)
            with pytest.raises(MetadataError) as info:
                om.load(str(tmp_path / "ckpt"))
            assert "ckpt" in str(info.value)
        open(state_path, "w").write(good)
        snap = str(tmp_path / "ckpt" / "optim.swp.meta" / "manifest.json")
        good_snap = open(snap).read()
        open(snap, "w").write("[]")
        before = eval_loss(net)
        with pytest.raises(MetadataError) as info:
            om.load(str(tmp_path / "ckpt"))
        assert info.value.path.endswith("optim.swp.meta/manifest.json")
        assert eval_loss(net) == before  # nothing was imported
    other = torch.nn.Sequential(torch.nn.Linear(16, 8))
    with offload_model(other, str(tmp_path / "swap3"), budget="1MiB") as om:
        open(snap, "w").write(good_snap)
        with pytest.raises(MemAscendError, match="different model"):
            om.load(str(tmp_path / "ckpt"))


def test_checkpoint_and_swap_files_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        net = model()
        with offload_model(net, str(tmp_path / "swap"), budget="1MiB") as om:
            train_step(om, net, 1)
            om.save(str(tmp_path / "ckpt"))
    finally:
        os.umask(old)
    for root in (tmp_path / "swap", tmp_path / "ckpt"):
        for dirpath, dirnames, filenames in os.walk(root):
            assert os.stat(dirpath).st_mode & 0o777 == 0o700, dirpath
            for f in filenames:
                assert os.stat(os.path.join(dirpath, f)).st_mode & 0o777 == 0o600, f


def test_recover_dir_prefers_a_complete_copy(tmp_path):
    def complete(d):
        return os.path.exists(os.path.join(d, "done"))

    path = str(tmp_path / "c")
    for name, done in (("c.tmp", True), ("c.old", True)):
        os.makedirs(tmp_path / name)
        if done:
            open(tmp_path / name / "done", "w").close()
    os.makedirs(path)  # an incomplete folder at the path itself
    assert files.resolve_dir(path, complete) == path + ".tmp"
    files.recover_dir(path, complete)
    assert sorted(os.listdir(tmp_path)) == ["c"] and complete(path)
