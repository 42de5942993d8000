"""The token files prepare.py writes and the training scripts read: meta.json and its checks, and windows of
tokens read from train.bin / val.bin (uint16 memmaps) as batches of inputs and targets.
"""
import json
import os
import sys

import numpy as np
import torch

from checkpoints import sha256_file
from tokenization import tokenizer_identity


# --- meta.json: what the files hold, checked before a run reads them ---

def load_data_meta(data_dir: str, dataset: str, block_size: int, verify: bool = True) -> tuple[dict, dict[str, str]]:
    """meta.json of the prepared dataset and the paths of its .bin files, after checking they are complete."""
    folder = os.path.join(data_dir, dataset)
    meta_path = os.path.join(folder, "meta.json")
    prepare = f"`python prepare.py --dataset={dataset}`" if dataset == "shakespeare" else \
        f"`python prepare.py --name={dataset} ...`"
    if not os.path.isfile(meta_path):
        sys.exit(f"error: dataset {folder} is not prepared (no meta.json); run {prepare} first")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        counts = {"train": int(meta["train_tokens"]), "val": int(meta["val_tokens"])}
    except (ValueError, KeyError, TypeError) as e:
        sys.exit(f"error: {meta_path} is damaged ({e!r}); run {prepare} --force")
    if meta.get("dtype", "uint16") != "uint16":
        sys.exit(f"error: {meta_path} says the tokens are {meta['dtype']}, but train.py reads uint16 token files "
                 f"(vocabularies up to 65,536 ids); prepare the data with prepare.py")
    paths = {split: os.path.join(folder, f"{split}.bin") for split in ("train", "val")}
    for split, path in paths.items():
        if not os.path.isfile(path) or os.path.getsize(path) != 2 * counts[split]:
            sys.exit(f"error: {path} is missing or its size disagrees with meta.json; run {prepare} --force")
        expected = meta["sha256"].get(f"{split}.bin") if isinstance(meta.get("sha256"), dict) else None
        if verify and expected and sha256_file(path) != expected:
            sys.exit(f"error: {path} does not match the sha256 in meta.json (changed or corrupted since it was "
                     f"prepared); run {prepare} --force")
        if counts[split] <= block_size:
            sys.exit(f"error: --block_size={block_size} needs more than {block_size} tokens, but {path} holds "
                     f"{counts[split]}; use a smaller --block_size or a larger dataset")
    return meta, paths


def describe_tokenizer(meta: dict) -> str:
    """A dataset's tokenizer as meta.json records it, e.g. 'bpe:22000 (vocabulary 22000, tokenizer.json sha256
    5b4f2425...)'."""
    sha256 = meta.get("tokenizer_sha256")
    return (f"{meta.get('tokenizer')} (vocabulary {meta.get('vocab_size')}"
            + (f", {meta.get('tokenizer_file')} sha256 {sha256[:12]}...)" if sha256 else ")"))


def meta_tokenizer(meta: dict) -> tuple[str, int | None]:
    """(tokenization.tokenizer_identity, vocabulary size) of the tokenizer a dataset's meta.json records."""
    return tokenizer_identity(meta.get("tokenizer"), meta.get("tokenizer_sha256")), meta.get("vocab_size")


def check_resume_data(saved: dict, meta: dict, allow_change: bool, path: str, folder: str) -> None:
    """A resumed run goes on with the tokens it was trained on: another tokenizer (for a BPE, another file
    content, whatever its name or path: two BPEs of one size trained on different text differ; for r50k_base,
    another name) or vocabulary size is refused, other token files (their sha256 or counts in meta.json) need
    --allow_data_change."""
    if meta_tokenizer(saved) != meta_tokenizer(meta):
        sys.exit(f"error: cannot resume {path}: it was trained on tokens of {describe_tokenizer(saved)}, but "
                 f"{folder} holds tokens of {describe_tokenizer(meta)}; its embeddings only fit the tokenizer it "
                 f"learned")
    changed = [name for name in ("sha256", "train_tokens", "val_tokens") if saved.get(name) != meta.get(name)]
    if changed and not allow_change:
        sys.exit(f"error: cannot resume {path}: the dataset {folder} is not the one it was trained on "
                 f"({', '.join(changed)} differ in meta.json); pass --allow_data_change to go on with it anyway")


# --- windows of tokens as batches ---

def draw_windows(n_tokens: int, block_size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """Start offsets (count,) of random training windows: each window is block_size + 1 tokens (inputs plus
    the next token as target), so the last valid start is n_tokens - block_size - 1."""
    return torch.randint(n_tokens - block_size, (count,), generator=generator)


def read_batch(bin_path: str, offsets: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and targets y (B, T) for windows starting at offsets: y is x shifted by one token.
    The memmap is opened per batch: a long-lived one lets the page cache count as our memory (RSS grows)."""
    data = np.memmap(bin_path, dtype=np.uint16, mode="r")
    windows = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in offsets.tolist()]).astype(np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def to_device(x: torch.Tensor, y: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y on the device; on CUDA through pinned memory, so the copy overlaps the work already queued."""
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
