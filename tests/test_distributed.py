"""Data parallelism on CPU with gloo: 2 processes under torchrun against 1 process, and checkpoints that
move between layouts."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_MODEL_FLAGS
from model import load_checkpoint

pytestmark = pytest.mark.slow


def run_train(out_dir: str, data_dir: str, nproc: int, *flags: str) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--standalone"] if nproc > 1 else [sys.executable]
    result = subprocess.run([*launcher, os.path.join(ROOT, "train.py"), f"--data_dir={data_dir}",
                             "--dataset=tiny", f"--out_dir={out_dir}", *TINY_MODEL_FLAGS, "--batch_size=4",
                             "--eval_iters=3", "--log_interval=1", "--warmup_iters=2", "--lr_decay_iters=6",
                             "--dropout=0", *flags],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def logged_losses(out_dir: str) -> dict[int, float]:
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def assert_same_run(a: str, b: str, atol: float = 1e-5) -> None:
    losses_a, losses_b = logged_losses(a), logged_losses(b)
    assert losses_a.keys() == losses_b.keys()
    for step in losses_a:
        assert losses_a[step] == pytest.approx(losses_b[step], abs=atol), step
    weights_a = load_checkpoint(os.path.join(a, "ckpt.pt"))["model"]
    weights_b = load_checkpoint(os.path.join(b, "ckpt.pt"))["model"]
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0, atol=atol, msg=name)


def test_ddp_on_two_processes_matches_one_process_with_twice_the_accumulation(tiny_data_dir, tmp_path):
    """The global batch is one seeded stream of windows: 2 processes x 2 micro-batches see the same
    windows as 1 process x 4 micro-batches, and the averaged gradients give the same update."""
    run_train(str(tmp_path / "one"), tiny_data_dir, 1, "--gradient_accumulation_steps=4", "--max_iters=6",
              "--eval_interval=3")
    run_train(str(tmp_path / "two"), tiny_data_dir, 2, "--gradient_accumulation_steps=2", "--max_iters=6",
              "--eval_interval=3")
    assert_same_run(str(tmp_path / "one"), str(tmp_path / "two"))


def test_checkpoint_saved_under_ddp_resumes_on_one_process(tiny_data_dir, tmp_path):
    """Optimizer state is stored by parameter name and the batch order by the step's generator state, so a
    run saved by 2 processes continues on 1 (with the same global batch) as if nothing had changed."""
    straight, moved = str(tmp_path / "straight"), str(tmp_path / "moved")
    run_train(straight, tiny_data_dir, 2, "--gradient_accumulation_steps=2", "--max_iters=6",
              "--eval_interval=3")
    run_train(moved, tiny_data_dir, 2, "--gradient_accumulation_steps=2", "--max_iters=3", "--eval_interval=3")
    run_train(moved, tiny_data_dir, 1, "--gradient_accumulation_steps=4", "--max_iters=6", "--eval_interval=3",
              "--init_from=resume")
    assert_same_run(straight, moved)
