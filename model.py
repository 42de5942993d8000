"""The GPT: GPT-2's architecture and its published variants, the loss, generation with a KV cache, FLOPs,
the learning-rate schedule, and the splitter that cuts the network into pipeline stages.

Read it top to bottom: configuration, attention, the transformer block, the loss, the GPT and its optimizer,
generation, FLOPs, pipeline stages. Everything here computes: no flags, files, processes or printing (those
live in the shared modules, runtime.py and parallel.py).

Shapes use one alphabet throughout the project:
    B batch, T sequence (time), C channels (n_embd), H heads, D head size (C // H), V vocabulary, L layers,
    R LoRA rank (lora.py).
"""
import functools
import hashlib
import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


# --- configuration ---

def arg(default, help: str, choices: tuple | None = None):
    """A dataclass field whose help text (and allowed values) become its command-line flag (flags.parse_args)."""
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
    vocab_size: int = arg(50257, "vocabulary size (V); 50257 is r50k_base, GPT-2's tokenizer; train.py takes the "
                                 "dataset's from meta.json unless given (a larger value pads)")
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


def alibi_bias(slopes: torch.Tensor, T_q: int, T_k: int) -> torch.Tensor:
    """ALiBi's bias (H, T_q, T_k) on the attention scores from the heads' slopes (H,): -m_h * (i - j) for query
    position i and key position j (the queries are the last T_q of T_k positions, as in causal_mask). It only
    ever penalises distance, so no position embedding is needed and the model runs on sequences longer than it
    saw."""
    q_pos = torch.arange(T_k - T_q, T_k, device=slopes.device)[:, None]
    k_pos = torch.arange(T_k, device=slopes.device)[None, :]
    distance = (q_pos - k_pos).float()                                   # (T_q, T_k); negative: masked anyway
    return -slopes[:, None, None] * distance                             # (H, T_q, T_k)


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
        self.head_size = config.n_embd // config.n_head                               # D
        # Tensor parallelism (parallel.tensor_parallel) gives each process a slice of the heads: this module
        # then computes heads first_head .. first_head + H' - 1 of n_head (ALiBi's slopes depend on the index).
        self.first_head = 0
        if self.position == "alibi":   # a buffer: on the model's device, so no forward builds it on the host
            self.register_buffer("alibi_slopes", alibi_slopes(config.n_head), persistent=False)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0,
                prev_scores: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, T, C) -> (B, T, C); with RealFormer, also this block's scores (B, H, T, T_cached + T)."""
        B, T, _ = x.shape
        # c_attn's output holds q, k and v of the heads this module computes: all H of them (C' = C), or under
        # tensor parallelism H' = H / tp heads, C' = C / tp channels each (parallel.tensor_parallel).
        qkv = self.c_attn(x)                                    # (B, T, 3C'), C' = H' D
        C, D = qkv.size(-1) // 3, self.head_size
        H = C // D
        # 3 x (B, T, C') -> 3 x (B, H, T, D): the heads act as a batch dimension
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(C, dim=2))
        start = kv_cache.length if kv_cache is not None else 0  # absolute position of the first query
        if self.position == "rope":                             # rotate before caching: keys keep their angle
            positions = torch.arange(start, start + T, device=x.device)
            q, k = rope_rotate(q, positions), rope_rotate(k, positions)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)                 # (B, H, T_cached + T, D)
        dropout_p = self.dropout if self.training else 0.0
        bias = alibi_bias(self.alibi_slopes[self.first_head:self.first_head + H], T, k.size(2)) \
            if self.position == "alibi" else None                # (H', T, T_k): these heads' slopes
        if self.sparse_topk or self.realformer or (bias is not None and not self.sdpa):   # these need the scores
            y, scores = scored_attention(q, k, v, dropout_p, bias, self.sparse_topk, prev_scores)
        else:
            y = sdpa_attention(q, k, v, dropout_p, bias) if self.sdpa else explicit_attention(q, k, v, dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)        # heads side by side again: (B, T, C')
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


def run_block(block: nn.Module, x: torch.Tensor, recompute: bool, *args) -> torch.Tensor:
    """block(x, *args), or with activation checkpointing (Chen et al. 2016): only x is kept for backward,
    and the block runs forward a second time there to rebuild what its gradient needs."""
    if recompute and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False)
    return block(x, *args)


# --- the loss ---

class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = x @ weight^T against targets, `chunk` rows at a time, so the full
    (N, V) logits never exist: 412 MB in fp32 for a batch of 2,048 tokens of GPT-2's vocabulary, while a
    chunk of 1,024 rows holds 206 MB (the CPU default: as fast as the plain path, docs/performance.md).

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


# --- the GPT, its optimizer and its learning rate ---

def embed(transformer: nn.ModuleDict, idx: torch.Tensor, start: int, config: GPTConfig) -> torch.Tensor:
    """Token embeddings (B, T, C) of idx (B, T) at positions start.., plus the learned position embedding
    when the model has one (ALiBi and RoPE add positions inside attention)."""
    x = transformer.wte(idx)
    if config.position == "learned":
        x = x + transformer.wpe(torch.arange(start, start + idx.size(1), device=idx.device))
    return transformer.drop(x)


def initial_value(config: GPTConfig, name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """The initial value (fp32, on the CPU) of parameter `name`, of the given shape, GPT-2's way (Radford et al.
    2019): N(0, 0.02) for the matrices and embeddings; N(0, 0.02 / sqrt(2L)) for the projections that write
    into the residual stream (each block adds two such branches, so the stream's variance stays O(1) however
    deep the model); zeros for the biases and ReZero's gains; ones for LayerNorm's gains. Each tensor draws
    from a generator of its own, seeded by (seed, name), so any process makes any tensor alone, in any order:
    a pipeline stage or a shard built on its own starts with the same numbers as the whole model on one
    process. A tied lm_head (a pipeline's last stage holds a copy) takes wte's."""
    if name == "lm_head.weight" and config.tie_embeddings:
        name = "transformer.wte.weight"
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias" or leaf.startswith("alpha"):
        return torch.zeros(shape)
    if ".ln_" in f".{name}":                     # ln_0, ln_1, ln_2, ln_f: LayerNorm's gains
        return torch.ones(shape)
    std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
    generator = torch.Generator().manual_seed(int.from_bytes(
        hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1)
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def init_buffers(model: nn.Module) -> None:
    """Compute the buffers that checkpoints do not hold (ALiBi's slopes), after a model built on the meta
    device was given memory (nn.Module.to_empty)."""
    for module in model.modules():
        if isinstance(module, CausalSelfAttention) and module.position == "alibi":
            module.alibi_slopes.copy_(alibi_slopes(module.n_head))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        # One number from the global generator seeds every tensor's own (initial_value), so torch.manual_seed(s)
        # then GPT(config) gives the weights that every layout of a run with seed s makes in pieces. Built under
        # torch.device("meta"), the model holds no memory and no values; a layout fills its pieces in later
        # (parallel.materialise).
        self.init_seed = int(torch.randint(2 ** 62, (), device="cpu"))
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
        if not self.lm_head.weight.is_meta:
            with torch.no_grad():
                for name, p in self.named_parameters():
                    p.copy_(initial_value(config, name, p.shape, self.init_seed))

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


def get_lr(step: int, learning_rate: float, min_lr: float, warmup_iters: int, lr_decay_iters: int,
           decay_lr: bool = True) -> float:
    """Learning rate at `step`: linear warmup to learning_rate over warmup_iters steps, then cosine decay to
    min_lr at lr_decay_iters, constant after (GPT-3's schedule, Brown et al. 2020, appendix B, which decays to
    10% of the peak). Warmup starts at lr/(warmup+1), not 0, so no step is wasted. decay_lr False keeps
    learning_rate throughout."""
    if not decay_lr:
        return learning_rate
    if step < warmup_iters:
        return learning_rate * (step + 1) / (warmup_iters + 1)
    if step >= lr_decay_iters:
        return min_lr
    progress = (step - warmup_iters) / (lr_decay_iters - warmup_iters)     # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


# --- generation ---

def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of probs (B, K) (rows summing to 1; zeros allowed), by inverting the cumulative
    distribution at a uniform draw: exactly the distribution torch.multinomial draws from, at a fraction of
    its cost on a CPU, where multinomial draws one exponential variate per entry (docs/performance.md)."""
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
    is_cpu_fp32 = device.type == "cpu" and dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    return max(2, torch.get_num_threads()) if is_cpu_fp32 else 1


def decode_logits(model: GPT, x: torch.Tensor) -> torch.Tensor:
    """The LM head for the few rows of a decoding step: x (B, C) -> logits (B, V). It reads the whole (V, C)
    head for a handful of rows, so it runs at the memory's speed, if the kernel lets it. On a CPU, PyTorch
    sends a 1-row fp32 F.linear to a matrix-vector routine that reads the head at a fraction of the
    bandwidth, while one batched matmul over equal blocks of the vocabulary reads it faster
    (docs/performance.md); each logit is the same dot product either way."""
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
    fusing its elementwise work pays; on a CPU it does not (docs/performance.md). Built on first use,
    because creating it imports the compiler."""
    return torch.compile(next_token_logits, dynamic=True)


@torch.inference_mode()   # like no_grad, and it also skips autograd's version counting (docs/performance.md)
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


# --- FLOPs ---

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
    models = [stage_costs(config, kind) for kind in ("params", "flops", balance)]   # each (block, first, last)
    lines, costs = [], []
    for s, blocks in enumerate(plan):
        is_first, is_last = s == 0, s == len(plan) - 1
        # each model's (block, first, last) dotted with (blocks held, holds the first end, holds the last)
        params, flops, cost = (sum(c * n for c, n in zip(model, (len(blocks), is_first, is_last))) for model in models)
        costs.append(cost)
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
