"""Shared fixtures: a tiny model config, a small prepared dataset, a way to run the scripts, and the optional
packages the tests need."""
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A model small enough that a training step takes milliseconds on a CPU.
TINY_MODEL_FLAGS = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--vocab_size=64"]


def lr_at(step: int, cfg) -> float:
    """model.get_lr with the schedule of a run config (TrainConfig or FinetuneConfig)."""
    from model import get_lr
    return get_lr(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.decay_iters, cfg.decay_lr)


def import_extra(name: str):
    """The optional package `name` (requirements-extra.txt). The README's test command installs them all, so a
    missing one fails the tests that need it, saying what to install, rather than skipping them unseen;
    GPT_TEST_SKIP_MISSING_EXTRAS=1 skips them instead, for a run without the extras on purpose."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        if os.environ.get("GPT_TEST_SKIP_MISSING_EXTRAS") == "1":
            pytest.skip(f"{name} is not installed (GPT_TEST_SKIP_MISSING_EXTRAS=1)", allow_module_level=True)
        pytest.fail(f"{name} is not installed: pip install -r requirements-extra.txt (the README's test command "
                    f"does), or set GPT_TEST_SKIP_MISSING_EXTRAS=1 to skip the tests that need it", pytrace=False)


def run_script(script: str, *args: str, cwd: str = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's scripts in a fresh Python, as a user would, and capture what it prints."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def write_dataset(folder: str, tokens: np.ndarray, val_fraction: float = 0.2, vocab_size: int = 64) -> None:
    """A dataset in prepare.py's layout (train.bin, val.bin, meta.json) from a token array."""
    os.makedirs(folder, exist_ok=True)
    n_train = int(len(tokens) * (1 - val_fraction))
    tokens = tokens.astype(np.uint16)
    tokens[:n_train].tofile(os.path.join(folder, "train.bin"))
    tokens[n_train:].tofile(os.path.join(folder, "val.bin"))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"train_tokens": n_train, "val_tokens": len(tokens) - n_train, "vocab_size": vocab_size}, f)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> str:
    """data_dir holding dataset 'tiny': a noisy counting sequence (token t+1 usually follows t), which a
    small model learns quickly, so a falling loss is a real signal."""
    data_dir = str(tmp_path_factory.mktemp("data"))
    rng = np.random.default_rng(0)
    steps = np.where(rng.random(20_000) < 0.9, 1, rng.integers(0, 64, 20_000))
    write_dataset(os.path.join(data_dir, "tiny"), np.cumsum(steps) % 64)
    return data_dir
