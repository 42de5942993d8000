"""Damaged files never load as wrong numbers: truncated and bit-flipped checkpoints, adapters, meta.json and
.bin files end in one clean line or in a load equal to the undamaged file; pickled code is refused; a resume
on other data or another tokenizer is refused."""
import hashlib
import json
import os
import random
import shutil
import signal

import numpy as np
import pytest
import torch

import finetune_lora as ft
import lora
import tokenfiles
import train
from conftest import TINY_MODEL_FLAGS, write_dataset
from checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint
from model import GPT, GPTConfig

N_CASES = 80   # per file type: half truncations, half flips of 1 to 4 random bits, at random offsets


def damaged_copies(data: bytes, n_cases: int, seed: int):
    """(description, damaged bytes): truncations to a random length and flips of random bits."""
    rng = random.Random(seed)
    for case in range(n_cases):
        if case % 2 == 0:
            length = rng.randrange(len(data))
            yield f"truncated to {length} of {len(data)} bytes", data[:length]
        else:
            damaged = bytearray(data)
            offsets = [rng.randrange(len(data)) for _ in range(rng.randint(1, 4))]
            for offset in offsets:
                damaged[offset] ^= 1 << rng.randrange(8)
            if bytes(damaged) != data:
                yield f"bits flipped at offsets {offsets}", bytes(damaged)


def outcome(load, description: str):
    """('error', its message) for a one-line SystemExit, else the loaded value; anything else fails the test.
    An alarm turns a hang into a failure."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"loading hung: {description}")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(20)
    try:
        return load()
    except SystemExit as e:
        message = str(e.code)
        assert message.startswith("error: ") and "\n" not in message, (description, message)
        return "error", message
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_equal_contents(a, b, where: str = "") -> None:
    """Deep equality of loaded files: the same keys, values and tensors (bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_equal_contents(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_contents(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where   # NaN == NaN here


def fuzz_file(path: str, load, check_loaded, seed: int) -> tuple[dict[str, int], list[str]]:
    """Damage the file at path N_CASES times (restoring it after each); returns the outcome counts and, for
    each damaged copy refused, (how it was damaged, the error message)."""
    original = open(path, "rb").read()
    counts, messages = {"error": 0, "correct load": 0}, []
    try:
        for description, damaged in damaged_copies(original, N_CASES, seed):
            with open(path, "wb") as f:
                f.write(damaged)
            result = outcome(load, description)
            if isinstance(result, tuple) and result[0] == "error":
                counts["error"] += 1
                messages.append((description, result[1]))
            else:
                check_loaded(result, description)
                counts["correct load"] += 1
    finally:
        with open(path, "wb") as f:
            f.write(original)
    print(f"{os.path.basename(path)}: {counts}")
    return counts, messages


def assert_refusals_name_the_damage(messages: list[tuple[str, str]], path: str, noun: str) -> None:
    """A truncated file is unreadable (its zip archive ends early); flipped bits that still unpickle are caught
    by the recorded sha256: both say so, naming the file."""
    for description, message in messages:
        assert message.startswith(f"error: {path} "), message
        if description.startswith("truncated"):
            assert message.startswith(f"error: {path} is not a readable {noun} ("), (description, message)
    corrupted = f"error: {path} is corrupted: its contents do not match the sha256 recorded when it was " \
                "written"
    assert any(message.startswith(corrupted) for _, message in messages), messages


@pytest.fixture(scope="module")
def run_dir(tiny_data_dir, tmp_path_factory) -> str:
    """out_dir of a finished 3-step run (its checkpoint has AdamW moments) on the tiny dataset."""
    out_dir = str(tmp_path_factory.mktemp("run"))
    train.main([f"--data_dir={tiny_data_dir}", "--dataset=tiny", f"--out_dir={out_dir}", *TINY_MODEL_FLAGS,
                "--max_iters=3", "--eval_interval=3", "--eval_iters=1", "--batch_size=2", "--warmup_iters=0"])
    return out_dir


def test_fuzzed_checkpoints_error_or_load_exactly(run_dir, tmp_path):
    path = str(tmp_path / "ckpt.pt")
    shutil.copy(os.path.join(run_dir, "ckpt.pt"), path)
    reference = load_checkpoint(path)
    counts, messages = fuzz_file(path, lambda: load_checkpoint(path),
                                 lambda loaded, where: assert_equal_contents(loaded, reference, where), seed=1)
    assert counts["error"] > N_CASES // 2
    assert_refusals_name_the_damage(messages, path, "checkpoint")


def test_fuzzed_adapters_error_or_load_exactly(run_dir, tmp_path):
    checkpoint = load_checkpoint(os.path.join(run_dir, "ckpt.pt"))
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    lora.apply_lora(model, list(lora.LORA_TARGETS), rank=2, alpha=4.0, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.normal_()
    path = str(tmp_path / "adapter.pt")
    lora.save_adapter(model, ft.lora_settings(ft.FinetuneConfig(lora_rank=2, lora_alpha=4.0)),
                      {"path": "base", "sha256": "0" * 64}, step=3, val_loss=1.5, path=path)
    reference = lora.load_adapter(path)
    counts, messages = fuzz_file(path, lambda: lora.load_adapter(path),
                                 lambda loaded, where: assert_equal_contents(loaded, reference, where), seed=2)
    assert counts["error"] > N_CASES // 2
    assert_refusals_name_the_damage(messages, path, "adapter file")


@pytest.fixture()
def verified_dataset(tmp_path) -> tuple[str, dict]:
    """data_dir with dataset 'd' whose meta.json carries the tokenizer and the .bin files' sha256, as
    prepare.py writes it; returns the data_dir and the tokens of each split."""
    folder = str(tmp_path / "d")
    write_dataset(folder, np.arange(2000) % 64)
    tokens = {split: np.fromfile(os.path.join(folder, f"{split}.bin"), dtype=np.uint16) for split in ("train", "val")}
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    meta.update(tokenizer="r50k_base", dtype="uint16", sha256={
        f"{split}.bin": hashlib.sha256(open(os.path.join(folder, f"{split}.bin"), "rb").read()).hexdigest()
        for split in ("train", "val")})
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return str(tmp_path), tokens


@pytest.mark.parametrize("file_name", ["meta.json", "train.bin", "val.bin"])
def test_fuzzed_datasets_error_or_read_the_right_tokens(file_name, verified_dataset):
    """A damaged meta.json or .bin file stops training before any step, or (a harmless change in meta.json,
    such as an extra space) reads exactly the tokens prepared."""
    data_dir, tokens = verified_dataset
    cfg = train.TrainConfig(data_dir=data_dir, dataset="d")

    def check_loaded(loaded, where):
        meta, paths = loaded
        for split in ("train", "val"):
            assert meta[f"{split}_tokens"] == len(tokens[split]), where
            assert np.array_equal(np.fromfile(paths[split], dtype=np.uint16), tokens[split]), where
    path = os.path.join(data_dir, "d", file_name)
    counts, messages = fuzz_file(path, lambda: tokenfiles.load_data_meta(cfg.data_dir, cfg.dataset, 16, cfg.verify_data), check_loaded,
                                 seed=3 + len(file_name))
    assert counts["error"] > N_CASES // 4
    said = {message for _, message in messages}
    if file_name == "meta.json":
        assert any(m.startswith(f"error: {path} is damaged (") for m in said), said
    else:   # a shorter file disagrees with meta.json's token count; flipped bits with its sha256
        for description, message in messages:
            is_shorter = description.startswith("truncated")
            expected = "is missing or its size disagrees with meta.json" if is_shorter else \
                "does not match the sha256 in meta.json"
            assert message.startswith(f"error: {path} {expected}"), (description, message)


def test_checkpoint_with_a_pickled_payload_is_refused_without_running_it(tmp_path):
    """torch.load(weights_only=True) rebuilds tensors and plain containers only: a checkpoint whose pickle
    calls os.system is refused with one line, and the command never runs."""
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    path = str(tmp_path / "ckpt.pt")
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": Payload()}, path)
    with pytest.raises(SystemExit) as refused:
        load_checkpoint(path)
    assert str(refused.value.code).startswith(f"error: {path} holds Python objects other than tensors")
    assert not marker.exists()
    with pytest.raises(SystemExit, match="holds Python objects"):
        lora.load_adapter(path)
    assert not marker.exists()


def test_resume_refuses_other_data_unless_allowed_and_another_tokenizer_always(verified_dataset, tmp_path):
    data_dir, _ = verified_dataset
    other = os.path.join(data_dir, "other")                    # the same sizes, other tokens
    write_dataset(other, (np.arange(2000) * 7) % 64)
    meta = json.load(open(os.path.join(other, "meta.json")))
    json.dump({**meta, "tokenizer": "r50k_base"}, open(os.path.join(other, "meta.json"), "w"))
    retokenized = os.path.join(data_dir, "retokenized")        # the same tokens, another tokenizer
    shutil.copytree(os.path.join(data_dir, "d"), retokenized)
    meta = json.load(open(os.path.join(retokenized, "meta.json")))
    json.dump({**meta, "tokenizer": "cl100k_base"}, open(os.path.join(retokenized, "meta.json"), "w"))
    out_dir = str(tmp_path / "out")
    run_flags = [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY_MODEL_FLAGS, "--eval_iters=1",
                 "--batch_size=2", "--warmup_iters=0"]
    train.main([*run_flags, "--dataset=d", "--max_iters=2"])
    with pytest.raises(SystemExit, match="is not the one it was trained on .*--allow_data_change"):
        train.main([*run_flags, "--dataset=other", "--max_iters=4", "--init_from=resume"])
    with pytest.raises(SystemExit, match="trained on tokens of r50k_base .* holds tokens of cl100k_base"):
        train.main([*run_flags, "--dataset=retokenized", "--max_iters=4", "--init_from=resume",
                    "--allow_data_change"])
    assert load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["step"] == 2
    train.main([*run_flags, "--dataset=other", "--max_iters=4", "--init_from=resume", "--allow_data_change"])
    assert load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["step"] == 4
