"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): the adapter layer, attaching
and merging adapters, the adapter file, and the instruction prompt they are trained on.

Only the low-rank update B A of each chosen weight trains (LoRALinear), so the result is a small adapter file
that belongs to one base checkpoint. finetune_lora.py trains adapters; generate.py applies them, which needs
this file only, not the training code.
"""
import dataclasses
import math
import os
import sys

import torch
import torch.nn as nn

from checkpoints import load_verified, save_verifiable, sha256_file
from gpt2_weights import load_model
from model import GPT

# The linear layers of a transformer block that may carry an adapter (GPT-2's names; mlp_0 is the first
# half-step feed-forward of a Macaron block, --macaron). The default names them all: a layer the model does
# not have is skipped. The LM head is left out: it shares its weight with the token embedding, and the
# chunked loss reads that weight directly.
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp_0.c_fc", "mlp_0.c_proj", "mlp.c_fc", "mlp.c_proj")


# --- the adapter layer ---

class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (Hu et al. 2021, eq. 3):

        y = W x + b + (alpha / R) * B A dropout(x),    W: (C_out, C_in), A: (R, C_in), B: (C_out, R)

    B starts at zero, so the layer starts out computing exactly what the base layer does and training moves
    away from the base model smoothly. A starts random: with A = 0 too, neither would ever get a gradient.
    The paper says "random Gaussian" for A; its code (microsoft/LoRA, loralib) uses nn.Linear's Kaiming-uniform
    init, which we follow. Scaling by alpha / R means a change of R needs no new learning rate (section 4.1)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, base.in_features))     # base's dtype and device
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.dropout(x) @ self.lora_A.t()                 # (B, T, C_in) -> (B, T, R): R numbers per token
        return self.base(x) + self.scaling * (down @ self.lora_B.t())    # (B, T, C_out)

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / R) B A, (C_out, C_in): one matrix that computes what this layer computes without dropout."""
        return self.base.weight + self.scaling * (self.lora_B @ self.lora_A)


def parse_targets(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def apply_lora(model: GPT, targets: list[str], rank: int, alpha: float, dropout: float) -> GPT:
    """Freeze every weight of model and wrap each block's linear layer named in targets (e.g. 'attn.c_attn')
    in a LoRALinear, in place. Returns the model, whose only trainable parameters are now the adapters'.

    c_attn computes the query, key and value in one matmul, so its adapter is one rank-R update of the stacked
    (3C, C) matrix: q, k and v read the input through the same A and write through their own rows of B.
    (loralib's MergedLinear gives each its own A, three times the parameters of A.)"""
    assert all(t in LORA_TARGETS for t in targets), f"LoRA targets must be among {LORA_TARGETS}"
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(name.endswith("." + t) for t in targets):
            model.set_submodule(name, LoRALinear(module, rank, alpha, dropout))
    return model


@torch.no_grad()
def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its base weight, W <- W + (alpha / R) B A, and put the plain nn.Linear back,
    in place: the result is an ordinary GPT whose state_dict has the base checkpoint's keys, and which
    computes what the adapted model computes without dropout (up to float rounding)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.base.weight.copy_(module.merged_weight())
            model.set_submodule(name, module.base)
    return model


def adapter_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The adapters' A and B matrices by parameter name (e.g. 'transformer.h.0.attn.c_attn.lora_A'): all that
    an adapter file has to store, since everything else is the base checkpoint."""
    return {name: p.detach().cpu() for name, p in model.named_parameters() if name.endswith((".lora_A", ".lora_B"))}


# --- the prompt template ---

# The Alpaca prompt template (Taori et al. 2023, github.com/tatsu-lab/stanford_alpaca), with and without an input.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")


def format_prompt(instruction: str, input: str = "") -> str:
    """The text the model sees before its response: the same in fine-tuning and in generate.py."""
    return (PROMPT_WITH_INPUT if input else PROMPT_NO_INPUT).format(instruction=instruction, input=input)


# --- adapter files ---

ADAPTER_FORMAT = "gpt-lora-adapter"   # marks adapter files written by finetune_lora.py
ADAPTER_VERSION = 2                    # 2: the contents carry their sha256


def save_adapter(model: GPT, settings: dict, base: dict, step: int, val_loss: float, path: str) -> None:
    """Write the adapter-only file atomically: the A and B tensors, the LoRA settings that rebuild the layers
    (rank, alpha, dropout, targets), and the base checkpoint it belongs to (path and sha256 of its bytes)."""
    adapter = {"lora": settings, "base": base, "model_config": dataclasses.asdict(model.config), "step": step,
               "val_loss": val_loss, "prompt_template": {"with_input": PROMPT_WITH_INPUT, "no_input": PROMPT_NO_INPUT},
               "tensors": adapter_tensors(model)}
    save_verifiable(adapter, path, ADAPTER_FORMAT, ADAPTER_VERSION)


def load_adapter(path: str) -> dict:
    """Read an adapter file written by save_adapter (weights_only: the file cannot run code)."""
    return load_verified(path, "adapter file", ADAPTER_FORMAT, ADAPTER_VERSION, "finetune_lora.py",
                         "write one with `python finetune_lora.py --out_dir=...`")


def load_base_with_adapter(adapter_path: str, base_path: str | None = None) -> tuple[GPT, object]:
    """The base model (on the CPU, dropout off) with the adapter at adapter_path applied, not merged, and the
    base's tokenizer. The base is base_path, or the checkpoint the adapter records; either way its sha256 must
    match the adapter's."""
    adapter = load_adapter(adapter_path)
    base_path = base_path or adapter["base"]["path"]
    if not os.path.isfile(base_path):
        sys.exit(f"error: base checkpoint {base_path} of adapter {adapter_path} not found; name the base's "
                 f"directory with --out_dir")
    expected, base_sha256 = adapter["base"], sha256_file(base_path)
    if base_sha256 != expected["sha256"]:   # an adapter fits only the exact checkpoint it was trained on
        sys.exit(f"error: adapter {adapter_path} belongs to the base checkpoint {expected['path']} (sha256 "
                 f"{expected['sha256'][:12]}...), but {base_path} has sha256 {base_sha256[:12]}...; "
                 f"apply it to the checkpoint it was trained on")
    model, tokenizer = load_model(base_path)
    # The layers wrapped as the adapter says, then its A and B tensors loaded (the base's are in place).
    lora = adapter["lora"]
    apply_lora(model, lora["targets"], lora["rank"], lora["alpha"], lora["dropout"])
    needed = {name: p.shape for name, p in adapter_tensors(model).items()}
    found = {name: t.shape for name, t in adapter["tensors"].items()}
    if needed != found:
        sys.exit(f"error: the tensors in {adapter_path} do not fit the model ({len(found)} tensors, expected "
                 f"{len(needed)}); the file is damaged or was written by other code")
    model.load_state_dict(adapter["tensors"], strict=False)
    return model, tokenizer
