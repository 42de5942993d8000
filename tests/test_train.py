"""train.py: the schedule, accumulation, exact resume, and the training loop end to end."""
import json
import math
import os

import pytest
import torch

import train
from conftest import TINY_MODEL_FLAGS
from model import GPT, GPTConfig, load_checkpoint


def test_lr_schedule_warmup_peak_and_end():
    cfg = train.TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    assert train.get_lr(0, cfg) == pytest.approx(1e-3 / 11)          # warmup starts above zero
    assert train.get_lr(10, cfg) == pytest.approx(1e-3)              # end of warmup: the peak
    assert train.get_lr(60, cfg) == pytest.approx((1e-3 + 1e-4) / 2)  # half-way through the cosine
    assert train.get_lr(110, cfg) == pytest.approx(1e-4)             # end: min_lr
    assert train.get_lr(500, cfg) == pytest.approx(1e-4)
    lrs = [train.get_lr(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))                  # decays monotonically
    constant = train.TrainConfig(learning_rate=1e-3, decay_lr=False)
    assert train.get_lr(0, constant) == train.get_lr(999, constant) == 1e-3


def test_gradient_accumulation_matches_one_big_batch():
    """k micro-batches whose losses are divided by k give the gradient of one k-times-larger batch."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    x, y = torch.randint(0, 64, (8, 16)), torch.randint(0, 64, (8, 16))
    model(x, y).backward()
    big_batch = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for xs, ys in zip(x.split(2), y.split(2)):                        # 4 micro-batches of 2
        (model(xs, ys) / 4).backward()
    for accumulated, reference in zip((p.grad for p in model.parameters()), big_batch):
        torch.testing.assert_close(accumulated, reference, rtol=0, atol=1e-6)


def test_read_batch_targets_are_inputs_shifted_by_one(tiny_data_dir):
    path = os.path.join(tiny_data_dir, "tiny", "train.bin")
    offsets = torch.tensor([0, 5, 100])
    x, y = train.read_batch(path, offsets, 16)
    data = torch.from_numpy(__import__("numpy").fromfile(path, dtype="uint16").astype("int64"))
    for row, start in enumerate(offsets.tolist()):
        assert torch.equal(x[row], data[start:start + 16]) and torch.equal(y[row], data[start + 1:start + 17])


def read_log(out_dir: str) -> dict[int, float]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def train_flags(data_dir: str, out_dir: str, *extra: str) -> list[str]:
    return [f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out_dir}", *TINY_MODEL_FLAGS,
            "--batch_size=4", "--gradient_accumulation_steps=2", "--eval_iters=2", "--log_interval=1",
            "--warmup_iters=2", "--lr_decay_iters=12", "--dropout=0.1", "--seed=7", *extra]


def test_resume_continues_exactly(tiny_data_dir, tmp_path):
    """12 steps straight and 6 steps + resume + 6 steps give identical losses and identical weights (CPU,
    fp32): the checkpoint holds the weights, AdamW's moments, the step, and every RNG (dropout, batches)."""
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    train.main(train_flags(tiny_data_dir, straight, "--max_iters=12", "--eval_interval=6"))
    train.main(train_flags(tiny_data_dir, interrupted, "--max_iters=6", "--eval_interval=6"))
    train.main(train_flags(tiny_data_dir, interrupted, "--max_iters=12", "--eval_interval=6",
                           "--init_from=resume"))
    assert read_log(straight) == read_log(interrupted)
    assert len(read_log(straight)) == 12
    a = load_checkpoint(os.path.join(straight, "ckpt.pt"))
    b = load_checkpoint(os.path.join(interrupted, "ckpt.pt"))
    assert a["step"] == b["step"] == 12
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_training_lowers_the_loss_and_checkpoint_reloads(tiny_data_dir, tmp_path):
    out_dir = str(tmp_path / "out")
    train.main(train_flags(tiny_data_dir, out_dir, "--max_iters=40", "--eval_interval=20",
                           "--learning_rate=1e-2", "--lr_decay_iters=40", "--dropout=0"))
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[0]["val_loss"] == pytest.approx(math.log(64), abs=0.3)   # untrained: near uniform
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    checkpoint = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])
    assert checkpoint["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in evals))
    assert checkpoint["model_config"]["n_embd"] == 32 and checkpoint["train_config"]["max_iters"] == 40


def test_eval_only_leaves_the_run_untouched(tiny_data_dir, tmp_path, capsys):
    out_dir = str(tmp_path / "out")
    train.main(train_flags(tiny_data_dir, out_dir, "--max_iters=2", "--eval_interval=2"))
    before = open(os.path.join(out_dir, "ckpt.pt"), "rb").read()
    capsys.readouterr()
    train.main(train_flags(tiny_data_dir, out_dir, "--max_iters=2", "--eval_only", "--init_from=resume"))
    assert "val loss" in capsys.readouterr().out
    assert open(os.path.join(out_dir, "ckpt.pt"), "rb").read() == before
