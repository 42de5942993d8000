"""Pre-train a GPT on the token files written by prepare.py.

    python prepare.py --dataset=shakespeare && python train.py     # the quick start: a small GPT on a CPU
    python train.py --batch_size=8 --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024
    python train.py --init_from=resume                             # continue the run in --out_dir exactly

Every field of TrainConfig and of model.GPTConfig is a flag (`--help` lists them with their defaults).
"""
import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

from model import (GPT, GPU_MEMORY_GIB, PEAK_BF16_FLOPS, PRESETS, SHAPE_FIELDS, Block, GPTConfig, GPTStage,
                   all_ranks_mean, apply_preset, arg, autocast, build_stage, check_rates, config_changes,
                   configure_optimizers, describe_plan, dtype_choice, dtype_name, fault_point, flags_given,
                   flops_per_token, gather_to_rank0, load_checkpoint,
                   load_optimizer_state_by_name, optimizer_state_by_name, parse_args, peak_flops, pick_dtype,
                   plan_stages, print0, run_main, save_checkpoint, setup_distributed, teardown_distributed, trim_log,
                   write_atomically, StopSignals, BadSteps, append_log)
from prepare import sha256_file


@dataclass
class TrainConfig:
    preset: str | None = arg(None, "a named model and its published recipe (model.PRESETS); flags given on the "
                                   "command line win", choices=tuple(PRESETS))
    # data and files
    dataset: str = arg("shakespeare", "name of a dataset prepared by prepare.py under --data_dir")
    data_dir: str = arg("data", "directory holding the prepared datasets")
    out_dir: str = arg("out", "directory for the checkpoint (ckpt.pt) and the training log (metrics.jsonl)")
    init_from: str = arg("scratch", "scratch (random weights), resume (the run in --out_dir, exactly), or GPT-2's "
                                    "weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl or a Hugging Face directory")
    # schedule of the run
    max_iters: int = arg(600, "optimizer steps in the whole run")
    eval_interval: int = arg(100, "evaluate train/val loss and save a checkpoint every this many steps")
    eval_iters: int = arg(20, "batches per split in each evaluation")
    eval_only: bool = arg(False, "evaluate the checkpoint (or the initial weights) once and exit")
    log_interval: int = arg(10, "print a progress line every this many steps")
    wandb_project: str = arg("", "also stream the metrics to this Weights & Biases project (needs wandb)")
    wandb_run_name: str = arg("", "name of the Weights & Biases run (default: wandb picks one)")
    tensorboard: bool = arg(False, "also stream the metrics to TensorBoard event files in out_dir/tensorboard")
    # batch
    batch_size: int = arg(16, "sequences per micro-batch")
    gradient_accumulation_steps: int = arg(1, "micro-batches whose gradients are summed per optimizer step")
    # AdamW and the learning-rate schedule
    learning_rate: float = arg(2e-3, "peak learning rate, reached after warmup")
    min_lr: float = arg(2e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = arg(30, "steps of linear warmup")
    lr_decay_iters: int | None = arg(None, "step where the cosine decay reaches min_lr (default: max_iters)")
    decay_lr: bool = arg(True, "warmup + cosine decay; False keeps learning_rate constant")
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices (not on biases and LayerNorm gains)")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.95, "AdamW beta2")
    grad_clip: float = arg(1.0, "clip the gradient's global norm to this (0 disables clipping)")
    # system
    device: str = arg("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: str = arg("auto", "auto: bfloat16 on GPUs that have it, float16 on older GPUs; on a CPU bfloat16 where "
                             "a probe at start finds its matmuls at least 1.5x as fast as float32's, else float32",
                     choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool | None = arg(None, "torch.compile the model (default: on for CUDA; off elsewhere: on a 2-core "
                                     "CPU it compiled for ~55 s, then ran no faster)")
    loss_chunk: int | None = arg(None, "rows per chunk of the fused LM head + cross-entropy, which never holds "
                                       "the whole (B*T, V) logits; 0: the plain path (default: 1024 on CPU/MPS, "
                                       "0 on CUDA, where torch.compile fuses the plain path)")
    peak_flops: float | None = arg(None, "peak FLOP/s of one device, for the MFU in the log (default: the data "
                                         "sheet's bf16 figure for the GPUs model.PEAK_BF16_FLOPS lists; on others "
                                         "and on CPUs the log gives GFLOP/s instead)")
    seed: int = arg(1337, "seed for the weights, dropout and the order of the batches")
    fsdp: bool = arg(False, "under torchrun, shard weights, gradients and AdamW state across the processes "
                            "(FSDP2) instead of giving each a full copy (DDP)")
    # pipeline parallelism (under torchrun; world size = pp x data-parallel replicas)
    pp: int = arg(1, "pipeline stages: each process runs a contiguous slice of the blocks")
    pp_schedule: str = arg("1f1b", "order of the micro-batches' forward and backward passes",
                           choices=("gpipe", "1f1b", "interleaved_1f1b"))
    pp_balance: str = arg("flops", "cost model the splitter balances the stages by",
                          choices=("flops", "params", "uniform"))
    n_microbatches: int | None = arg(None, "micro-batches each batch_size batch is cut into under --pp (default: "
                                           "the fewest that give every stage work: >= --pp and dividing "
                                           "--batch_size; more shrink the bubble and, under 1F1B, the activations "
                                           "in flight)")
    pp_virtual_stages: int = arg(2, "stages per process with --pp_schedule=interleaved_1f1b")
    # checkpoints kept, and where a resumed run starts
    keep_last: int = arg(2, "also keep the checkpoints of the last N evaluations as ckpt-STEP.pt (hard links: "
                            "the newest shares ckpt.pt's disk space); 0 keeps ckpt.pt only")
    keep_best: bool = arg(True, "also keep the checkpoint with the lowest val loss as ckpt-best.pt")
    max_bad_steps: int = arg(5, "stop after this many steps in a row with a non-finite loss or gradient norm "
                                "(each such step is skipped, and logged)")
    resume_from: str = arg("", "checkpoint file that --init_from=resume starts from (default: out_dir/ckpt.pt, "
                               "the newest); name an older ckpt-STEP.pt when the newest is damaged")
    allow_data_change: bool = arg(False, "let --init_from=resume continue on token files other than those the "
                                         "checkpoint was trained on (same tokenizer only)")
    verify_data: bool = arg(True, "check train.bin and val.bin against the sha256 in meta.json before training "
                                  "(reads them once: about 1 s per GB)")
    # the dry run: plan a run without running it
    dry_run: bool = arg(False, "build the model on the meta device, print parameters, FLOPs per token, tokens "
                               "per step, memory per GPU and time per step, then exit (no data, no files, no "
                               "torchrun)")
    dry_run_gpu: str = arg("H100", "GPU the dry run plans for (peak FLOP/s and memory from model.py)",
                           choices=tuple(PEAK_BF16_FLOPS))
    dry_run_mfu: float = arg(0.4, "model FLOPs utilisation the dry run's time per step assumes")
    dry_run_world_size: int | None = arg(None, "GPUs (processes) the dry run plans for (default: --pp, one "
                                               "data-parallel replica)")


# TrainConfig fields that --init_from=resume takes from the command that resumes, never from the checkpoint:
# where to start from and write to, this start's checks and permissions (an --allow_data_change given once must
# not carry over to later starts), the layout across processes (the checkpoint is the same full-model file
# under any layout, and each launch picks its own: a run saved under --pp=2 resumes on one process), and the
# dry run, which reads no checkpoint. Every other field continues the run as saved unless its flag is given.
NOT_RESUMED = ("init_from", "resume_from", "out_dir", "eval_only", "allow_data_change", "verify_data", "fsdp", "pp",
               "pp_schedule", "pp_balance", "n_microbatches", "pp_virtual_stages", "dry_run", "dry_run_gpu",
               "dry_run_mfu", "dry_run_world_size")


# --- the math: learning rate and batches ---

def get_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate at `step`: linear warmup to cfg.learning_rate, then cosine decay to cfg.min_lr at
    lr_decay_iters, constant after. Warmup starts at lr/(warmup+1), not 0, so no step is wasted."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    decay_iters = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / (decay_iters - cfg.warmup_iters)     # 0 -> 1
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def draw_windows(n_tokens: int, block_size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """Start offsets (count,) of random training windows: each window is block_size + 1 tokens (inputs plus
    the next token as target), so the last valid start is n_tokens - block_size - 1."""
    return torch.randint(n_tokens - block_size, (count,), generator=generator)


def read_batch(bin_path: str, offsets: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and targets y (B, T) for windows starting at offsets: y is x shifted by one token.
    The memmap is opened per batch: a long-lived one lets the page cache count as our memory (RSS grows)."""
    data = np.memmap(bin_path, dtype=np.uint16, mode="r")
    windows = np.stack([data[i:i + block_size + 1] for i in offsets.tolist()]).astype(np.int64)
    windows = torch.from_numpy(windows)                        # (B, T + 1)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def microbatch_choices(batch_size: int, pp: int, schedule: str) -> list[int]:
    """Micro-batch counts, smallest first, that cut a batch of batch_size sequences evenly and give each of pp
    pipeline stages work when the pipe is full: at least pp (1F1B needs one micro-batch per stage to fill the
    pipe; with fewer, GPipe keeps some stage idle at every moment), and multiples of pp under interleaved 1F1B,
    whose schedule runs the micro-batches in groups of pp (Narayanan et al. 2021, section 2.2.2)."""
    return [n for n in range(pp, batch_size + 1)
            if batch_size % n == 0 and (schedule != "interleaved_1f1b" or n % pp == 0)]


def microbatches(cfg: TrainConfig) -> int:
    """Micro-batches per batch under --pp: --n_microbatches, or by default the fewest that work
    (microbatch_choices), which follows --pp. No choice at all (batch_size < pp): pp, which check_config
    refuses with a batch size that works."""
    if cfg.n_microbatches is not None:
        return cfg.n_microbatches
    choices = microbatch_choices(cfg.batch_size, cfg.pp, cfg.pp_schedule)
    return choices[0] if choices else cfg.pp


# --- the dry run: plan a run before it starts ---
#
# Memory on a GPU while training = weights, gradients and AdamW's two moments (all fp32: 4 + 4 + 8 bytes per
# parameter), the 16-bit copies of the matmul weights that autocast makes and the matmuls keep for backward
# (2 bytes per parameter), and the activations autograd saves for backward. The activations are counted from
# what our code saves, tensor by tensor, as Korthikanti et al. 2022 (section 4.1) do for Megatron's block.
# Not counted: the CUDA context and kernels' workspaces (~0.5-1 GiB), allocator fragmentation, dropout masks.

GIB = 2 ** 30


def block_activation_bytes(config: GPTConfig, b: int, T: int, act_bytes: int) -> int:
    """Bytes one block saves for backward on a micro-batch of b sequences of T tokens. act_bytes: 2 under
    16-bit autocast (matmul inputs and outputs), 4 in fp32; the residual stream and the LayerNorm inputs
    are fp32 either way. Counted per (b, T, C) tensor in Block's forward."""
    C, H, a = config.n_embd, config.n_head, act_bytes
    btc = b * T * C
    mlp = 9 * a * btc                                   # c_fc input (C), GELU input (4C), c_proj input (4C)
    norms = 0 if config.rezero else 4 * btc             # each LayerNorm saves its fp32 input
    rezero = a * btc if config.rezero else 0            # alpha * branch saves the branch
    total = 2 * norms + 2 * rezero + 2 * a * btc + 3 * a * btc + mlp   # c_attn, c_proj inputs; q, k, v
    if config.sparse_topk or config.realformer or not config.sdpa:   # the explicit path keeps the T x T weights
        total += b * H * T * T * (4 + (a if a < 4 else 0) + (1 if config.sparse_topk else 0))   # fp32 softmax,
    else:                                                            # its 16-bit copy, the top-k mask
        total += a * btc + (a * H * T * T if config.position == "alibi" else 0)   # SDPA's output; ALiBi's mask
    if config.position == "rope":
        total += 2 * a * btc                            # the rotated q and k
    if config.macaron:
        total += norms + rezero + mlp                   # the second feed-forward
    return total


def head_activation_bytes(config: GPTConfig, b: int, T: int, act_bytes: int, loss_chunk: int) -> int:
    """Bytes the final LayerNorm, the LM head and the loss hold at their peak, early in backward. The plain path
    keeps the fp32 log-probabilities (B, T, V), and log_softmax's backward holds them, their gradient and the
    logits' gradient at once (12 bytes per logit); the chunked one keeps d loss / d x and a (V, C) fp32 weight
    gradient, and two (chunk, V) fp32 buffers at a time."""
    C, V, a = config.n_embd, config.vocab_size, act_bytes
    btc, btv = b * T * C, b * T * V
    if loss_chunk > 0:
        return 4 * btc + 4 * btc + 4 * V * C + 2 * 4 * loss_chunk * V
    return 4 * btc + a * btc + 12 * btv


def microbatches_in_flight(cfg: TrainConfig, pp_rank: int) -> int:
    """Micro-batches whose activations pipeline rank pp_rank holds at once (in virtual-stage chunks when
    interleaved): GPipe runs every forward first; 1F1B (Narayanan et al. 2019) starts backward after P - p
    forwards; interleaved 1F1B warms up with 2(P - p - 1) + (V - 1)P chunks (Narayanan et al. 2021)."""
    P, n = cfg.pp, microbatches(cfg)
    if cfg.pp_schedule == "gpipe":
        return n
    if cfg.pp_schedule == "1f1b":
        return min(n, P - pp_rank)
    V = cfg.pp_virtual_stages
    return min(n * V, 2 * (P - pp_rank - 1) + (V - 1) * P + 1)


def count_params(module: torch.nn.Module) -> tuple[int, int]:
    """(parameters, parameters of nn.Linear weights: the ones autocast copies to 16 bits)."""
    linear = sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
    return sum(p.numel() for p in module.parameters()), linear


def memory_estimate(cfg: TrainConfig, config: GPTConfig, module: torch.nn.Module, n_blocks: int, holds_last: bool,
                    micro_batch: int, in_flight: int, act_bytes: int, loss_chunk: int, shards: int,
                    data_parallel: bool) -> dict[str, float]:
    """Estimated peak bytes on one GPU, by kind, for a module (the GPT, or one rank's pipeline stages) built on
    the meta device. shards > 1: FSDP splits weights, gradients and AdamW states, and gathers two blocks at a
    time (the current and the prefetched next). data_parallel: DDP keeps its gradient buckets beside .grad
    (under --pp, the flat copy the replicas average)."""
    T = config.block_size
    params, linear = count_params(module)
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    block_params = count_params(blocks[0])[0] if blocks else 0
    estimate = {"weights": 4 * params / shards + (2 * 4 * block_params if shards > 1 else 0),
                "gradients": 4 * params / shards * (2 if data_parallel and shards == 1 else 1),
                "AdamW": 8 * params / shards}
    per_block = block_activation_bytes(config, micro_batch, T, act_bytes)
    if config.activation_checkpointing:   # each block keeps its fp32 input; one is rebuilt at a time
        activations = n_blocks * 4 * micro_batch * T * config.n_embd + per_block
        copies = linear - (n_blocks - 1) * count_params(blocks[0])[1] if blocks else linear
    else:
        activations, copies = n_blocks * per_block, linear
    activations *= in_flight
    if holds_last:
        activations += head_activation_bytes(config, micro_batch, T, act_bytes, loss_chunk) * \
            (in_flight if cfg.pp_schedule == "gpipe" and cfg.pp > 1 else 1)
    estimate["16-bit weight copies"] = 2 * copies if act_bytes == 2 else 0
    estimate["activations"] = activations
    return estimate


def dry_run_report(cfg: TrainConfig, model_cfg: GPTConfig) -> list[str]:
    """The plan of a run, as lines to print: parameters (total and per pipeline stage), FLOPs per token, tokens
    per optimizer step, estimated memory per GPU and time per step on cfg.dry_run_gpu at cfg.dry_run_mfu.
    Everything is built on the meta device: shapes without memory, seconds even for 175B parameters."""
    world_size = cfg.dry_run_world_size or cfg.pp
    dp_size, T = world_size // cfg.pp, model_cfg.block_size
    act_bytes = 4 if cfg.dtype == "float32" else 2      # 'auto' on a GPU is bf16 (fp16 on a V100)
    loss_chunk = cfg.loss_chunk if cfg.loss_chunk is not None else 0   # the CUDA default
    with torch.device("meta"):
        model = GPT(model_cfg)
    n_params = model.num_params()
    tokens_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * dp_size * T
    flops_token = flops_per_token(model_cfg, n_params, T)
    gpu = cfg.dry_run_gpu
    peak, memory = PEAK_BF16_FLOPS[gpu], GPU_MEMORY_GIB[gpu]
    layout = (f"pp={cfg.pp} ({cfg.pp_schedule}, {microbatches(cfg)} micro-batches) x " if cfg.pp > 1 else "") + \
        f"{dp_size} {'FSDP shard' if cfg.fsdp else 'data-parallel replica'}{'s' if dp_size > 1 else ''}"
    lines = [f"dry run: {cfg.preset or 'custom model'} on {world_size} x {gpu} ({memory} GiB, {peak / 1e12:.0f} "
             f"TFLOP/s at 16 bits) | {layout} | {'fp32' if act_bytes == 4 else '16-bit autocast'}",
             f"parameters: {n_params:,} ({n_params / 1e9:.3f}B) | {model_cfg.n_layer} layers, {model_cfg.n_head} "
             f"heads, {model_cfg.n_embd} channels, context {T}, vocabulary {model_cfg.vocab_size:,}",
             f"FLOPs per token: {flops_token / 1e9:.2f} GFLOP (forward + backward: 6N + 12LHDT)",
             f"tokens per optimizer step: {tokens_per_step:,} ({cfg.batch_size} sequences x "
             f"{cfg.gradient_accumulation_steps} micro-steps x {dp_size} data-parallel x {T} tokens)"]
    rows, micro_batch = [], cfg.batch_size // microbatches(cfg) if cfg.pp > 1 else cfg.batch_size
    if cfg.pp > 1:
        n_virtual = cfg.pp_virtual_stages if cfg.pp_schedule == "interleaved_1f1b" else 1
        plan = plan_stages(model_cfg, cfg.pp * n_virtual, cfg.pp_balance)
        for rank in range(cfg.pp):
            ids = [rank + v * cfg.pp for v in range(n_virtual)]
            with torch.device("meta"):
                stages = torch.nn.ModuleList(GPTStage(model_cfg, plan[i], i == 0, i == len(plan) - 1)
                                             for i in ids)
            n_blocks = sum(len(plan[i]) for i in ids)
            estimate = memory_estimate(cfg, model_cfg, stages, n_blocks // n_virtual, len(plan) - 1 in ids,
                                       micro_batch, microbatches_in_flight(cfg, rank), act_bytes, loss_chunk, 1,
                                       dp_size > 1)
            blocks = ", ".join(f"{plan[i].start}-{plan[i].stop - 1}" if plan[i] else "none" for i in ids)
            rows.append((f"stage {rank} (blocks {blocks})", count_params(stages)[0], estimate))
    else:
        shards = dp_size if cfg.fsdp else 1
        estimate = memory_estimate(cfg, model_cfg, model, model_cfg.n_layer, True, cfg.batch_size, 1, act_bytes,
                                   loss_chunk, shards, dp_size > 1 and not cfg.fsdp)
        rows.append(("each GPU" + (f" (1/{shards} of the weights)" if shards > 1 else ""), n_params, estimate))
    lines.append(f"memory per GPU in GiB (micro-batches of {micro_batch} x {T} tokens):")
    too_big = []
    for name, params, estimate in rows:
        total = sum(estimate.values()) / GIB
        parts = " + ".join(f"{kind} {value / GIB:.2f}" for kind, value in estimate.items() if value)
        lines.append(f"  {name}: {params:,} params | {parts} = {total:.2f} GiB")
        if total > memory:
            too_big.append(f"{name} ({total:.1f} GiB)")
    seconds = flops_token * tokens_per_step / (world_size * peak * cfg.dry_run_mfu)
    lines.append(f"time per step: {seconds:.2f} s at {cfg.dry_run_mfu:.0%} MFU on {world_size} x {gpu} "
                 f"({tokens_per_step / seconds:,.0f} tokens/s)")
    if too_big:
        lines.append(f"warning: does not fit a {memory} GiB {gpu}: {', '.join(too_big)}; try a smaller "
                     f"--batch_size, --activation_checkpointing, more --pp stages or --fsdp")
    return lines


# --- side effects: data files, checkpoints, logs ---

def load_data_meta(cfg: TrainConfig, block_size: int) -> tuple[dict, dict[str, str]]:
    """meta.json of the prepared dataset and the paths of its .bin files, after checking they are complete."""
    folder = os.path.join(cfg.data_dir, cfg.dataset)
    meta_path = os.path.join(folder, "meta.json")
    prepare = f"`python prepare.py --dataset={cfg.dataset}`" if cfg.dataset == "shakespeare" else \
        f"`python prepare.py --name={cfg.dataset} ...`"
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
        if cfg.verify_data and expected and sha256_file(path) != expected:
            sys.exit(f"error: {path} does not match the sha256 in meta.json (changed or corrupted since it was "
                     f"prepared); run {prepare} --force")
        if counts[split] <= block_size:
            sys.exit(f"error: --block_size={block_size} needs more than {block_size} tokens, but {path} holds "
                     f"{counts[split]}; use a smaller --block_size or a larger dataset")
    return meta, paths


def rng_states(data_generator: torch.Generator) -> dict:
    """Every random number generator the run touches, so a resumed run draws exactly the same numbers."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data": data_generator.get_state(),
    }


def restore_rng_states(states: dict, data_generator: torch.Generator) -> None:
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    data_generator.set_state(states["data"])


def flag_sources(given: set[str], preset: str | None) -> dict[str, str]:
    """Where each value set on this command line comes from: its own flag, or the --preset that names it (a
    preset's values count as given: on resume they win over the checkpoint's, as its flags would)."""
    from_preset = {name: f"--preset={preset}" for part in ("model", "train") for name in PRESETS[preset][part]} \
        if preset is not None else {}
    return {**from_preset, **{name: "command line" for name in given}}


def resumed_configs(cfg: TrainConfig, model_cfg: GPTConfig, saved_run: dict, saved_model: dict,
                    sources: dict[str, str]) -> tuple[TrainConfig, GPTConfig, list[str]]:
    """(run config, model config, report) of a resumed run: the configs saved in the checkpoint, with the values
    set on this command line on top (sources: field -> where it was set) and NOT_RESUMED fields from this
    command; the report has one line per value that differs from the checkpoint's. A field newer than the
    checkpoint takes its default (for the model, the behaviour of the code that trained it). Shape fields
    must already agree (check_resume_shape): the non-shape ones (dropout, sdpa, sparse_topk, realformer, ...)
    are honoured, and reported."""
    run_now, model_now = dataclasses.asdict(cfg), dataclasses.asdict(model_cfg)
    run_saved = {**dataclasses.asdict(TrainConfig()), **{k: v for k, v in saved_run.items() if k in run_now}}
    model_saved = {**dataclasses.asdict(GPTConfig()), **{k: v for k, v in saved_model.items() if k in model_now}}
    run = {**run_saved, **{k: v for k, v in run_now.items() if k in sources or k in NOT_RESUMED}}
    model = {**model_saved, **{k: v for k, v in model_now.items() if k in sources}}
    continued = {k: v for k, v in run_saved.items() if k not in NOT_RESUMED}
    report = config_changes("resume", {**continued, **model_saved}, {**run, **model}, sources)
    return TrainConfig(**run), GPTConfig(**model), report


def restore_cpu_threads(saved: int | None) -> str | None:
    """Compute with the number of CPU threads the checkpoint's run used: a CPU kernel that sums (a matmul,
    the gradients of the biases and LayerNorm gains) splits the sum among its threads and adds up their
    parts, so fp32 rounding depends on how many there are. PyTorch's default is the number of cores the
    process may use, which changes with a requeued job, a resized container or taskset (issue 13: a run
    resumed at step 25 with 1 thread instead of 2 ended 5e-6 away in the weights). OMP_NUM_THREADS or
    MKL_NUM_THREADS, when set, win. Returns the line to print when the count differs, else None."""
    now = torch.get_num_threads()
    if not saved or saved == now:
        return None
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return (f"resume: CPU threads {saved} -> {now} (OMP_NUM_THREADS): the run goes on within float "
                f"rounding, not bit for bit")
    torch.set_num_threads(saved)
    return (f"resume: CPU threads {saved}, as the checkpoint's run (this machine's default: {now}), so that "
            f"sums round as before; OMP_NUM_THREADS=N chooses")


def check_resume_shape(saved: dict, model_cfg: GPTConfig, given: set[str], path: str) -> None:
    """Flags on the command line that change the shape of a checkpoint's weights are refused, all at once."""
    saved = {**dataclasses.asdict(GPTConfig()), **saved}   # a field newer than the checkpoint: its default
    differ = [f"{name} (checkpoint {saved[name]}, flag {getattr(model_cfg, name)})" for name in SHAPE_FIELDS
              if name in given and saved[name] != getattr(model_cfg, name)]
    if differ:
        sys.exit(f"error: cannot resume {path}: the model shape differs in " + ", ".join(differ)
                 + "; drop these flags or start a new --out_dir")


def load_resumed_run(cfg: TrainConfig, model_cfg: GPTConfig, sources: dict[str, str]
                     ) -> tuple[dict, TrainConfig, GPTConfig, list[str]]:
    """The checkpoint --init_from=resume continues (--resume_from, or out_dir/ckpt.pt) and resumed_configs'
    (run config, model config, report) for it. Shape flags that disagree with its weights are refused, and
    so is a checkpoint holding non-finite weights."""
    path = cfg.resume_from or os.path.join(cfg.out_dir, "ckpt.pt")
    checkpoint = load_checkpoint(path)
    check_resume_shape(checkpoint["model_config"], model_cfg, set(sources), path)
    non_finite = [name for name, t in checkpoint["model"].items() if not torch.isfinite(t).all()]
    if non_finite:   # training never writes these (it skips non-finite steps): a run diverged elsewhere
        sys.exit(f"error: {path} holds non-finite weights (in {', '.join(non_finite[:3])}); resume from "
                 f"an older checkpoint with --resume_from=FILE")
    return checkpoint, *resumed_configs(cfg, model_cfg, checkpoint.get("train_config", {}),
                                        checkpoint["model_config"], sources)


def check_resume_data(saved: dict, meta: dict, allow_change: bool, path: str, folder: str) -> None:
    """A resumed run goes on with the tokens it was trained on: another tokenizer is refused, other token
    files (their sha256 or counts in meta.json) need --allow_data_change."""
    saved_tokenizer = (saved.get("tokenizer"), saved.get("vocab_size"))
    tokenizer = (meta.get("tokenizer"), meta.get("vocab_size"))
    if saved_tokenizer != tokenizer:
        sys.exit(f"error: cannot resume {path}: it was trained on tokens of {saved_tokenizer[0]} (vocabulary "
                 f"{saved_tokenizer[1]}), but {folder} holds tokens of {tokenizer[0]} (vocabulary {tokenizer[1]}); "
                 f"its embeddings only fit the tokenizer it learned")
    changed = [name for name in ("sha256", "train_tokens", "val_tokens") if saved.get(name) != meta.get(name)]
    if changed and not allow_change:
        sys.exit(f"error: cannot resume {path}: the dataset {folder} is not the one it was trained on "
                 f"({', '.join(changed)} differ in meta.json); pass --allow_data_change to go on with it anyway")


@torch.no_grad()
def estimate_loss(loss_of, modules: torch.nn.Module, paths: dict, eval_offsets: dict, cfg: TrainConfig,
                  block_size: int, device: str, dtype: torch.dtype, dp_rank: int = 0, dp_size: int = 1,
                  dp_group=None) -> dict[str, float]:
    """Mean loss per split over the same fixed windows at every evaluation, so the numbers are comparable.
    loss_of(x, y) is the batch's mean loss; each data-parallel replica evaluates its share of the windows
    and the sums are added up across replicas."""
    modules.eval()
    losses = {}
    for split, offsets in eval_offsets.items():
        total = torch.zeros(2, dtype=torch.float64, device=device)      # (sum of losses, windows)
        batches = offsets.split(cfg.batch_size)
        mine = list(batches[dp_rank::dp_size])
        # Sharded weights are gathered by all processes together, so every process runs the same number of
        # forward passes: a process one batch short repeats a batch with weight 0.
        n_rounds = -(-len(batches) // dp_size)
        weights = [1] * len(mine) + [0] * (n_rounds - len(mine))
        for batch, weight in zip(mine + [batches[0]] * (n_rounds - len(mine)), weights):
            x, y = (t.to(device) for t in read_batch(paths[split], batch, block_size))
            with autocast(device, dtype):
                loss = loss_of(x, y)
            total += weight * torch.stack([loss.double() * len(batch),
                                           torch.tensor(len(batch), dtype=torch.float64, device=device)])
        if dp_size > 1:
            dist.all_reduce(total, group=dp_group)
        losses[split] = (total[0] / total[1]).item()
    modules.train()
    return losses


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def format_step_line(step: int, max_iters: int, loss: float, lr: float, grad_norm: float, step_time: float,
                     tokens_per_step: int, flops_per_step: float, peak: float | None) -> str:
    """The progress line logged after optimizer step `step` (1-based); step_time in seconds."""
    flops = flops_per_step / step_time
    speed = f"MFU {100 * flops / peak:.1f}%" if peak else f"{flops / 1e9:.1f} GFLOP/s"
    return (f"step {step}/{max_iters} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
            f"{1000 * step_time:.0f} ms/step | {tokens_per_step / step_time:,.0f} tokens/s | {speed} | "
            f"ETA {format_duration(step_time * (max_iters - step))}")


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   grad_clip: float, is_good: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor:
    """Clip the gradient's global norm, update the weights and clear the gradients. Returns the norm
    before clipping (worth logging: spikes announce instabilities). is_good(norm) False skips the update."""
    scaler.unscale_(optimizer)              # clip the true gradient, not the fp16-scaled one
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    if is_good is None or is_good(grad_norm):
        scaler.step(optimizer)              # skips the update if fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def check_metric_streams(cfg) -> None:
    """Stop with one line when --wandb_project or --tensorboard is given but its package is missing."""
    for flag, package in (("wandb_project", "wandb"), ("tensorboard", "tensorboard")):
        if getattr(cfg, flag) and importlib.util.find_spec(package) is None:
            sys.exit(f"error: --{flag} needs the package {package}; `pip install {package}` "
                     f"(or `pip install -r requirements-extra.txt`)")


def open_metric_streams(cfg, run_config: dict) -> dict:
    """The live copies of metrics.jsonl the flags ask for: a Weights & Biases run (WANDB_MODE=offline keeps
    it on disk, under out_dir/wandb) and/or a TensorBoard writer (`tensorboard --logdir out_dir/tensorboard`)."""
    streams = {}
    if cfg.wandb_project:
        import wandb
        streams["wandb"] = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None,
                                      config=run_config, dir=cfg.out_dir)
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        streams["tensorboard"] = SummaryWriter(log_dir=os.path.join(cfg.out_dir, "tensorboard"))
    return streams


def log_metrics(log_file, streams: dict, record: dict) -> None:
    """Append one record to metrics.jsonl and send its numbers to the live streams, against its step."""
    append_log(log_file, record)
    numbers = {name: value for name, value in record.items()
               if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
    if "wandb" in streams:
        streams["wandb"].log(numbers, step=record["step"])
    if "tensorboard" in streams:
        for name, value in numbers.items():
            streams["tensorboard"].add_scalar(name, value, record["step"])


def close_metric_streams(streams: dict) -> None:
    if "wandb" in streams:
        streams["wandb"].finish()
    if "tensorboard" in streams:
        streams["tensorboard"].close()


def check_config(cfg: TrainConfig, model_cfg: GPTConfig) -> None:
    """Refuse values that cannot work, with the flag's name."""
    minimums = {"max_iters": 0, "warmup_iters": 0, "eval_interval": 1, "eval_iters": 1, "log_interval": 1,
                "batch_size": 1, "gradient_accumulation_steps": 1, "loss_chunk": 0, "keep_last": 0,
                "max_bad_steps": 1}
    for name, minimum in minimums.items():
        if getattr(cfg, name) is not None and getattr(cfg, name) < minimum:
            sys.exit(f"error: --{name}={getattr(cfg, name)} must be >= {minimum}")
    check_rates(cfg)
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        if getattr(model_cfg, name) < 1:
            sys.exit(f"error: --{name}={getattr(model_cfg, name)} must be >= 1")
    if model_cfg.n_embd % model_cfg.n_head:
        sys.exit(f"error: --n_embd={model_cfg.n_embd} must be divisible by --n_head={model_cfg.n_head}")
    if not 0 <= model_cfg.dropout < 1:
        sys.exit(f"error: --dropout={model_cfg.dropout} must be in [0, 1)")
    if cfg.resume_from and cfg.init_from != "resume":
        sys.exit(f"error: --resume_from={cfg.resume_from} needs --init_from=resume")
    if model_cfg.sparse_topk < 0:
        sys.exit(f"error: --sparse_topk={model_cfg.sparse_topk} must be >= 0 (0 keeps every score)")
    if model_cfg.realformer and cfg.pp > 1:
        sys.exit("error: --realformer passes attention scores from block to block, which pipeline stages do not "
                 "carry; drop --pp or --realformer")
    if cfg.init_from not in ("scratch", "resume"):
        from hf_gpt2 import check_hf_source
        check_hf_source(cfg.init_from, ("scratch", "resume"))
    check_metric_streams(cfg)
    if cfg.fsdp and cfg.pp > 1:
        sys.exit("error: --fsdp together with --pp is not supported; use one of them")
    if cfg.dry_run:
        world_size = cfg.dry_run_world_size or cfg.pp
        if not 0 < cfg.dry_run_mfu <= 1:
            sys.exit(f"error: --dry_run_mfu={cfg.dry_run_mfu} must be in (0, 1]")
        if world_size < 1 or world_size % cfg.pp:
            sys.exit(f"error: --dry_run_world_size={world_size} must be a positive multiple of --pp={cfg.pp}")
        if cfg.fsdp and world_size == 1:
            sys.exit("error: --dry_run with --fsdp needs --dry_run_world_size=N, the GPUs to shard across")
    if cfg.fsdp and cfg.dtype == "float16":
        sys.exit("error: --dtype=float16 needs a gradient scaler, which --fsdp does not support here; "
                 "use --dtype=bfloat16 or float32")
    if cfg.pp > 1:
        n_stages = cfg.pp * (cfg.pp_virtual_stages if cfg.pp_schedule == "interleaved_1f1b" else 1)
        if n_stages > model_cfg.n_layer:
            sys.exit(f"error: {n_stages} pipeline stages need at least as many blocks, but --n_layer="
                     f"{model_cfg.n_layer}; lower --pp (or --pp_virtual_stages)")
        # Each refusal names a value that works: the default's choice, or the smallest batch that has one.
        choices = microbatch_choices(cfg.batch_size, cfg.pp, cfg.pp_schedule)
        works = f"--n_microbatches={choices[0]} works" if choices else \
            f"--batch_size={-(-cfg.batch_size // cfg.pp) * cfg.pp} --n_microbatches={cfg.pp} works"
        n = cfg.n_microbatches
        if n is None and not choices:
            multiple = " and a multiple of it" if cfg.pp_schedule == "interleaved_1f1b" else ""
            sys.exit(f"error: --pp={cfg.pp} with {cfg.pp_schedule} needs a number of micro-batches that is at "
                     f"least {cfg.pp}{multiple} and divides --batch_size={cfg.batch_size}; {works}")
        if n is not None and (n < 1 or cfg.batch_size % n):
            sys.exit(f"error: --n_microbatches={n} must divide --batch_size={cfg.batch_size}; {works}")
        if n is not None and cfg.pp_schedule != "gpipe" and n < cfg.pp:
            sys.exit(f"error: --pp_schedule={cfg.pp_schedule} needs --n_microbatches >= --pp={cfg.pp}; {works}")
        if n is not None and cfg.pp_schedule == "interleaved_1f1b" and n % cfg.pp:
            sys.exit(f"error: interleaved_1f1b needs --n_microbatches a multiple of --pp={cfg.pp}; {works}")
        if cfg.dtype == "float16":
            sys.exit("error: --dtype=float16 needs a gradient scaler, which --pp does not support; "
                     "use --dtype=bfloat16 or float32")
        if cfg.compile:
            sys.exit("error: --compile is not supported with --pp yet; drop one of them")


# --- pipeline parallelism ---
#
# With --pp=P, the blocks are cut into P contiguous stages (model.plan_stages) and process p runs stage p.
# A batch is cut into micro-batches that flow through the stages: stage p works on micro-batch m while
# stage p+1 works on m-1. GPipe runs every forward, then every backward; 1F1B (Narayanan et al. 2019)
# alternates them once the pipe is full, so at most P micro-batches' activations are alive at once;
# interleaved 1F1B gives each process several smaller stages to shrink the idle "bubble" at both ends.
# torch.distributed.pipelining runs the schedules; we build the stage modules ourselves (no tracer).
# With tied embeddings, the first and last stages each hold a copy of wte; their gradients are summed
# over a two-process group every step, so the copies take identical steps and stay equal. (Colossal-AI
# keeps one shared module; torchtitan refuses tied embeddings under pipelining.)
# With P x D processes, the D replicas of a stage average their gradients once per optimizer step, in
# pipeline_optimizer_step, as DDP would. Not through DDP itself: on the first step the schedule infers the
# stages' shapes by running the module's forward outside no_sync, which leaves DDP expecting one more backward;
# unless a forward falls between a stage's first and last backward (1F1B with more micro-batches than
# stages), DDP records each parameter twice and stops at its next forward with an internal assert
# ("rebuilt parameter indices size is not same as original model parameters size", torch 2.13): GPipe,
# interleaved 1F1B, and 1F1B with as many micro-batches as stages.

@dataclass
class PipelineRank:
    """What one process holds of the pipeline."""
    modules: torch.nn.ModuleList          # its GPTStage modules (one, or several when interleaved)
    schedule: object                      # the torch.distributed.pipelining schedule
    holds_first: bool                     # runs stage 0: feeds the token ids
    holds_last: bool                      # runs the last stage: computes the loss
    pp_group: object                      # the processes of this pipeline
    tie_group: object | None              # {first stage, last stage} of this pipeline, when wte is tied
    dp_group: object | None = None        # the data-parallel replicas of these stages, when there are several


def scaled_cross_entropy(scale: float):
    """The pipeline's loss function: each micro-batch's mean loss times scale = 1 / (micro-batches per
    optimizer step), so the summed gradients are those of the whole batch's mean loss."""
    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:   # (b, T, V), (b, T)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1) * scale
    return loss_fn


class AutocastForward(torch.nn.Module):
    """A pipeline stage's module with its forward run under autocast to dtype (a no-op for fp32). The schedule
    runs every micro-batch's forward and backward inside one schedule.step() call, and PyTorch's AMP docs
    (torch.autocast) say autocast should wrap only the forward passes and the loss: "Backward passes under
    autocast are not recommended" (backward ops already run in the dtype autocast chose for their forward
    ops). So autocast goes inside each stage's forward, and step() runs outside it. Only the schedule sees
    this wrapper: PipelineRank.modules keeps the stages themselves, so parameter names stay the GPT's."""

    def __init__(self, module: torch.nn.Module, device: str, dtype: torch.dtype):
        super().__init__()
        self.module, self.device, self.dtype = module, device, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            return self.module(x)


def build_pipeline(cfg: TrainConfig, model_cfg: GPTConfig, full_state: dict, mesh, device: str,
                   dtype: torch.dtype) -> PipelineRank:
    """This process's stages, with weights from a full GPT state dict, each stage's forward under autocast to
    dtype, and the schedule that drives them (data-parallel replicas average their gradients in
    pipeline_optimizer_step). Call its schedule outside autocast."""
    # Imported here, like FSDP's modules below: at the top they would add ~1 s to every `import train`.
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
    pp_rank, dp_size = mesh.get_local_rank("pp"), mesh.size(1)
    n_virtual = cfg.pp_virtual_stages if cfg.pp_schedule == "interleaved_1f1b" else 1
    plan = plan_stages(model_cfg, cfg.pp * n_virtual, cfg.pp_balance)
    if dist.get_rank() == 0:
        print("\n".join(describe_plan(model_cfg, plan, cfg.pp_balance)))
    stage_ids = [pp_rank + v * cfg.pp for v in range(n_virtual)]      # interleaved: stages p, p+P, p+2P, ...
    modules = [build_stage(model_cfg, plan, i, full_state).to(device) for i in stage_ids]
    stages = [PipelineStage(AutocastForward(m, device, dtype), i, len(plan), torch.device(device),
                            group=mesh.get_group("pp")) for m, i in zip(modules, stage_ids)]
    n_microbatches = microbatches(cfg)
    loss_fn = scaled_cross_entropy(1 / (n_microbatches * cfg.gradient_accumulation_steps))
    # scale_grads=False: the loss is already scaled, and gradients accumulate over several step() calls.
    if cfg.pp_schedule == "interleaved_1f1b":
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn, scale_grads=False)
    else:
        schedule_class = ScheduleGPipe if cfg.pp_schedule == "gpipe" else Schedule1F1B
        schedule = schedule_class(stages[0], n_microbatches, loss_fn, scale_grads=False)
    # Every process creates every group, in the same order (a rule of torch.distributed.new_group).
    tie_group = None
    if model_cfg.tie_embeddings:
        for d in range(dp_size):
            group = dist.new_group([d, (cfg.pp - 1) * dp_size + d])   # global rank = pp_rank * dp + dp_rank
            if mesh.get_local_rank("dp") == d and pp_rank in (0, cfg.pp - 1):
                tie_group = group
    return PipelineRank(torch.nn.ModuleList(modules), schedule, holds_first=pp_rank == 0,
                        holds_last=pp_rank == cfg.pp - 1, pp_group=mesh.get_group("pp"), tie_group=tie_group,
                        dp_group=mesh.get_group("dp") if dp_size > 1 else None)


def tied_copy(pipe: PipelineRank) -> torch.nn.Parameter:
    """This process's copy of the tied embedding matrix: wte on the first stage, lm_head on the last."""
    return pipe.modules[0].transformer.wte.weight if pipe.holds_first else pipe.modules[-1].lm_head.weight


def pipeline_optimizer_step(pipe: PipelineRank, named_params: list, optimizer, grad_clip: float,
                            is_good: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor:
    """Average the gradients over the data-parallel replicas, sum the tied copies' gradients, clip by the norm
    of the whole model's gradient (all stages, the tied matrix counted once), step, clear. Returns the norm
    before clipping, the same on every process."""
    if pipe.dp_group is not None:   # every replica's stages hold the same parameters, in the same order
        grads = [p.grad for _, p in named_params if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])    # one all-reduce, not one per tensor
        dist.all_reduce(flat, group=pipe.dp_group)        # a sum: gloo has no average
        flat /= dist.get_world_size(pipe.dp_group)
        for g, averaged in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(averaged.view_as(g))
    if pipe.tie_group is not None:
        dist.all_reduce(tied_copy(pipe).grad, group=pipe.tie_group)   # grad(embedding) + grad(head)
    counted = [p.grad for name, p in named_params if p.grad is not None
               and not (pipe.tie_group is not None and name == "lm_head.weight")]
    norm_squared = torch.nn.utils.get_total_norm(counted) ** 2 if counted else torch.zeros(())
    dist.all_reduce(norm_squared, group=pipe.pp_group)
    grad_norm = norm_squared.sqrt()
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_([p for _, p in named_params], grad_clip, grad_norm)
    if is_good is None or is_good(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def pipeline_loss(pipe: PipelineRank, x: torch.Tensor, y: torch.Tensor, train: bool) -> torch.Tensor:
    """Run one batch through the pipeline (forward and backward when train) and return the sum of the
    micro-batch losses the schedule computed: non-zero on the last stage only. Call it outside autocast:
    the stages apply it to their forward passes (AutocastForward)."""
    losses = []
    run = pipe.schedule.step if train else pipe.schedule.eval
    run(*([x] if pipe.holds_first else []), target=y if pipe.holds_last else None, losses=losses)
    return torch.stack(losses).sum().detach() if pipe.holds_last else torch.zeros((), device=x.device)


def pipeline_eval_loss(pipe: PipelineRank, accum: int):
    """loss_of(x, y) for estimate_loss: the batch's mean loss, shared from the last stage with the others."""
    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = pipeline_loss(pipe, x, y, train=False) * accum       # undo the 1 / accum of the loss scale
        dist.all_reduce(loss, group=pipe.pp_group)
        return loss
    return loss_of


def full_training_state(trained: torch.nn.Module, named_params: list, optimizer, pipe: PipelineRank | None,
                        dp_rank: int, is_sharded: bool) -> tuple[dict | None, dict | None]:
    """The whole model's state dict and by-name optimizer state, on rank 0 (None elsewhere): under --pp
    the stages of the first data-parallel replica are gathered and merged, under --fsdp the shards, so
    the checkpoint is the same file whatever the layout that wrote it."""
    if is_sharded:   # FSDP's full state dicts name the optimizer state by parameter, as ours does
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(trained, options=options)
        # Before the first step AdamW has no state, and get_optimizer_state_dict would create it by taking
        # a step with lr=0, which advances AdamW's step count and so changes every later update.
        optimizer_state = get_optimizer_state_dict(trained, optimizer, options=options) if optimizer.state \
            else optimizer_state_by_name(named_params, optimizer)
        return (weights, optimizer_state) if dist.get_rank() == 0 else (None, None)
    weights = trained.state_dict() if pipe is None else \
        {name: t for module in trained for name, t in module.state_dict().items()}
    optimizer_state = optimizer_state_by_name(named_params, optimizer)
    if pipe is None:
        return weights, optimizer_state
    if pipe.tie_group is not None and pipe.holds_last:   # the copy's state equals wte's on the first stage
        optimizer_state["state"].pop("lm_head.weight", None)
        for group in optimizer_state["param_groups"]:
            group["params"] = [name for name in group["params"] if name != "lm_head.weight"]
    shards = gather_to_rank0((weights, optimizer_state) if dp_rank == 0 else None)
    if dist.get_rank() != 0:
        return None, None
    shards = [shard for shard in shards if shard is not None]
    weights = {name: t.cpu() for shard_weights, _ in shards for name, t in shard_weights.items()}
    merged = {"state": {}, "param_groups": [dict(g, params=[]) for g in shards[0][1]["param_groups"]]}
    for _, shard_state in shards:
        merged["state"].update(shard_state["state"])
        for group, shard_group in zip(merged["param_groups"], shard_state["param_groups"]):
            group["params"] += shard_group["params"]
    return weights, merged


def link_atomically(source: str, path: str) -> None:
    """Make path another name of the complete file source (a hard link, renamed into place, so path is
    never half there); a copy where the file system has no hard links. Nothing to do if path already is
    one (and rename() of one file's two names does nothing, which would leave the .tmp name behind)."""
    if os.path.exists(path) and os.path.samefile(source, path):
        return
    tmp = path + ".tmp"
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.link(source, tmp)
        fault_point(f"linking {os.path.basename(path)}")   # a test hook (GPT_TEST_KILL_AT); nothing otherwise
        os.replace(tmp, path)
    except OSError:
        if os.path.lexists(tmp):
            os.remove(tmp)
        with open(source, "rb") as f:
            write_atomically(path, lambda out: shutil.copyfileobj(f, out))


def keep_checkpoints(ckpt_path: str, step: int, is_best: bool, cfg: TrainConfig) -> None:
    """After ckpt.pt was written at `step`: name it ckpt-STEP.pt (and ckpt-best.pt when its val loss is the
    lowest so far), then delete the numbered checkpoints beyond the newest cfg.keep_last, and any from steps
    after this one (left by a run that went back to an older checkpoint)."""
    folder = os.path.dirname(ckpt_path)
    if cfg.keep_last > 0:
        link_atomically(ckpt_path, os.path.join(folder, f"ckpt-{step:06d}.pt"))
    if is_best and cfg.keep_best:
        link_atomically(ckpt_path, os.path.join(folder, "ckpt-best.pt"))
    numbered = sorted((int(m.group(1)), m.group(0)) for m in
                      (re.fullmatch(r"ckpt-(\d+)\.pt", name) for name in os.listdir(folder)) if m)
    kept = [name for s, name in numbered if s <= step][-cfg.keep_last:] if cfg.keep_last > 0 else []
    for _, name in numbered:
        if name not in kept:
            os.remove(os.path.join(folder, name))


def check_layout(cfg: TrainConfig, world_size: int) -> None:
    """Refuse process layouts that cannot work, before any work starts."""
    if cfg.pp > 1 and world_size == 1:
        sys.exit(f"error: --pp={cfg.pp} needs one process per stage: "
                 f"torchrun --nproc-per-node={cfg.pp} train.py ...")
    if world_size % cfg.pp:
        sys.exit(f"error: --pp={cfg.pp} must divide the number of processes ({world_size})")
    if cfg.fsdp and world_size == 1:
        sys.exit("error: --fsdp shards across processes: torchrun --nproc-per-node=N train.py --fsdp")


def main(argv: list[str] | None = None) -> None:
    cfg, model_cfg = parse_args(TrainConfig, GPTConfig, argv=argv)
    model_cfg, cfg = apply_preset(cfg.preset, model_cfg, cfg, flags_given(argv))
    sources = flag_sources(flags_given(argv), cfg.preset)
    checkpoint, resume_report = None, []
    if cfg.init_from == "resume" and not cfg.dry_run:   # the run's own configs, before they are checked
        checkpoint, cfg, model_cfg, resume_report = load_resumed_run(cfg, model_cfg, sources)
    check_config(cfg, model_cfg)
    if cfg.dry_run:                        # before any process group, data file or out_dir
        print("\n".join(dry_run_report(cfg, model_cfg)))
        return
    rank, local_rank, world_size, device = setup_distributed(cfg.device)
    stop = StopSignals()
    try:
        for line in resume_report:
            print0(line)
        check_layout(cfg, world_size)
        train(cfg, model_cfg, sources, rank, local_rank, world_size, device, stop, checkpoint)
    finally:
        stop.uninstall()
        teardown_distributed()


def train(cfg: TrainConfig, model_cfg: GPTConfig, sources: dict[str, str], rank: int, local_rank: int,
          world_size: int, device: str, stop: StopSignals, checkpoint: dict | None = None) -> None:
    is_master = rank == 0                  # the one process that prints and writes files
    dtype = pick_dtype(cfg.dtype, device)
    # The checkpoint records the dtype chosen, so a resumed run computes in it whatever a new probe would say.
    precision, cfg = dtype_choice(cfg.dtype, dtype, device), dataclasses.replace(cfg, dtype=dtype_name(dtype))
    device_type = device.split(":")[0]
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # TF32 tensor cores for the fp32 matmuls that remain
        torch.backends.cudnn.allow_tf32 = True
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")

    # The model: random weights, or the weights, optimizer and position of the run being resumed (its
    # checkpoint, read by load_resumed_run, and model_cfg, the one it holds).
    if cfg.init_from == "resume":
        resume_path = cfg.resume_from or ckpt_path
    elif os.path.exists(ckpt_path) and not cfg.eval_only:
        sys.exit(f"error: {ckpt_path} exists; continue it with --init_from=resume, or pick another --out_dir "
                 f"(nothing is overwritten)")
    initial_weights = None
    if cfg.init_from not in ("scratch", "resume"):   # GPT-2's weights, through hf_gpt2.py
        from hf_gpt2 import RUNTIME_FIELDS, init_from_hf
        pretrained = init_from_hf(cfg.init_from, model_cfg, set(sources))
        model_cfg, initial_weights = pretrained.config, pretrained.state_dict()
        # Variants GPT-2 was not trained with (sparse_topk, realformer) are honoured, and said so.
        plain = {name: value for name, value in dataclasses.asdict(GPTConfig()).items()
                 if name not in SHAPE_FIELDS and name not in RUNTIME_FIELDS}
        for line in config_changes(f"init_from {cfg.init_from}", plain, dataclasses.asdict(model_cfg), sources):
            print0(line)
    meta, paths = load_data_meta(cfg, model_cfg.block_size)
    if checkpoint is not None:
        check_resume_data(checkpoint["data"], meta, cfg.allow_data_change, resume_path,
                          os.path.join(cfg.data_dir, cfg.dataset))
    if meta.get("vocab_size", model_cfg.vocab_size) > model_cfg.vocab_size:
        sys.exit(f"error: the dataset's vocabulary ({meta['vocab_size']}) is larger than --vocab_size="
                 f"{model_cfg.vocab_size}")

    dp_size = world_size // cfg.pp         # data-parallel replicas of the (possibly pipelined) model
    torch.manual_seed(cfg.seed)            # the same initial weights on every process
    model = GPT(model_cfg)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    elif initial_weights is not None:
        model.load_state_dict(initial_weights)
    n_params = model.num_params()
    pipe, aliases = None, {}
    if cfg.pp > 1:
        mesh = init_device_mesh(device_type, (cfg.pp, dp_size), mesh_dim_names=("pp", "dp"))
        dp_rank, dp_group = mesh.get_local_rank("dp"), mesh.get_group("dp")
        pipe = build_pipeline(cfg, model_cfg, model.state_dict(), mesh, device, dtype)
        trained = pipe.modules
        if model_cfg.tie_embeddings:
            aliases = {"lm_head.weight": "transformer.wte.weight"}   # the last stage's copy of wte
        del model                          # each process keeps only its stages
    else:
        dp_rank, dp_group = rank, None
        trained = model.to(device)
        if cfg.fsdp:
            from torch.distributed.fsdp import fully_shard
            # FSDP (Zhao et al. 2023), in its second PyTorch version: each process stores 1/N of every
            # tensor; a block's full weights are all-gathered just before it runs and freed after, and
            # gradients are reduce-scattered, so each process updates only its shard.
            for block in model.transformer.h:
                fully_shard(block)
            fully_shard(model)             # the rest: embeddings, ln_f and the (tied) head
    named_params = [(name, p) for module in (trained if pipe else [trained])
                    for name, p in module.named_parameters()]
    optimizer = configure_optimizers(trained, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                     device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)   # fp16 needs loss scaling
    torch.manual_seed(cfg.seed + rank)     # but a different dropout stream on each
    data_generator = torch.Generator().manual_seed(cfg.seed)   # the same batch order on every process
    start_step, best_val_loss, resumed_is_best = 0, float("inf"), False
    if checkpoint is not None:
        if cfg.fsdp and checkpoint["optimizer"]["state"]:   # each process keeps its shards of the full state
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(model, optimizer, checkpoint["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        elif not cfg.fsdp:
            load_optimizer_state_by_name(named_params, optimizer, checkpoint["optimizer"], aliases)
        scaler.load_state_dict(checkpoint["scaler"])
        saved_rng = checkpoint["rng"]      # one entry per process of the run that saved it
        restore_rng_states(saved_rng[rank] if len(saved_rng) == world_size else saved_rng[0], data_generator)
        start_step, best_val_loss = checkpoint["step"], checkpoint["best_val_loss"]
        resumed_is_best = checkpoint.get("is_best", False)   # its evaluation's val loss was the lowest yet
        # With another number of processes the sums differ anyway: the threads stay at their default there.
        threads_line = restore_cpu_threads(checkpoint.get("cpu_threads")) \
            if device_type == "cpu" and len(saved_rng) == world_size else None
        if threads_line:
            print0(threads_line)
        print0(f"resuming {resume_path} at step {start_step}")
        del checkpoint   # free the CPU copy of the weights and optimizer state
    compile_model = cfg.compile if cfg.compile is not None else device_type == "cuda"
    loss_chunk = cfg.loss_chunk if cfg.loss_chunk is not None else (0 if device_type == "cuda" else 1024)
    if pipe is None:
        # DDP (Li et al. 2020): every process holds the whole model and trains on its share of each batch;
        # backward averages the gradients across processes, so every copy takes the same step.
        train_model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None) \
            if world_size > 1 and not cfg.fsdp else model
        train_model = torch.compile(train_model) if compile_model else train_model   # `model` is what we save
        loss_of = lambda x, y: model(x, y, loss_chunk)                            # noqa: E731
    else:
        loss_of = pipeline_eval_loss(pipe, cfg.gradient_accumulation_steps)

    # Fixed evaluation windows, drawn once from their own generator so they never change during the run.
    eval_generator = torch.Generator().manual_seed(cfg.seed + 1)
    T, B, accum = model_cfg.block_size, cfg.batch_size, cfg.gradient_accumulation_steps
    eval_offsets = {split: draw_windows(meta[f"{split}_tokens"], T, cfg.eval_iters * B, eval_generator)
                    for split in ("train", "val")}
    evaluate = lambda: estimate_loss(loss_of, trained, paths, eval_offsets, cfg, T, device, dtype,   # noqa: E731
                                     dp_rank, dp_size, dp_group)
    if cfg.eval_only:
        losses = evaluate()
        print0(f"train loss {losses['train']:.4f} | val loss {losses['val']:.4f}")
        return

    tokens_per_step = B * accum * dp_size * T
    flops_per_step = flops_per_token(model_cfg, n_params, T) * tokens_per_step
    peak = peak_flops(device, cfg.peak_flops, world_size)   # MFU: the global batch over every device's peak
    print0(f"model: {n_params:,} parameters | {model_cfg.n_layer} layers, {model_cfg.n_head} heads, "
           f"{model_cfg.n_embd} channels, context {T}")
    print0(f"data: {cfg.dataset} ({meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens) | "
           f"{tokens_per_step:,} tokens per step | {world_size} x {device}, {precision}"
           f"{', compiled' if compile_model else ''}")
    if is_master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        # Lines logged after the checkpoint (all of them, starting from scratch) are from steps lost with the
        # process that logged them; they are about to be redone, and each step is logged once.
        trim_log(os.path.join(cfg.out_dir, "metrics.jsonl"), start_step if start_step > 0 else -1)
        for name in os.listdir(cfg.out_dir):   # left by a process killed while writing (never complete files)
            if re.fullmatch(r"(ckpt.*\.pt|metrics\.jsonl)\.tmp", name):
                os.remove(os.path.join(cfg.out_dir, name))
        # A process killed after renaming ckpt.pt into place but before linking it as ckpt-STEP.pt and
        # ckpt-best.pt left those undone, and this run skips that step's evaluation and save: link it now.
        if start_step > 0 and os.path.exists(ckpt_path) and os.path.samefile(resume_path, ckpt_path):
            keep_checkpoints(ckpt_path, start_step, resumed_is_best, cfg)
        log_file = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a")
        streams = open_metric_streams(cfg, {**dataclasses.asdict(cfg), **dataclasses.asdict(model_cfg)})

    def save(step: int, is_best: bool) -> None:
        """Checkpoint the whole training state before step `step` (every process takes part)."""
        rngs = gather_to_rank0(rng_states(data_generator))
        weights, optimizer_state = full_training_state(trained, named_params, optimizer, pipe, dp_rank, cfg.fsdp)
        failure = None
        if is_master:
            try:
                save_checkpoint({
                    "model": weights, "optimizer": optimizer_state,
                    "scaler": scaler.state_dict(), "step": step, "best_val_loss": best_val_loss,
                    "is_best": is_best, "model_config": dataclasses.asdict(model_cfg),
                    "train_config": dataclasses.asdict(cfg), "rng": rngs, "data": meta,
                    "cpu_threads": torch.get_num_threads(),
                }, ckpt_path)
                keep_checkpoints(ckpt_path, step, is_best, cfg)
            except OSError as e:
                failure = SystemExit(f"error: cannot update the checkpoints in {cfg.out_dir} ({e}); ckpt.pt is "
                                     f"complete. Free disk space or fix the folder's permissions, then resume")
            except SystemExit as e:   # a full disk or an unwritable out_dir, in one line from write_atomically
                failure = e
        if stop.any_rank(failure is not None):   # the other processes must not wait for the next step
            raise failure or SystemExit(1)

    step_time, timer_start, steps_timed, stop_signal = None, time.perf_counter(), 0, None
    bad_steps = BadSteps(cfg.max_bad_steps, stop, scaler.is_enabled())
    nan_steps = {int(s) for s in os.environ.get("GPT_TEST_NAN_STEPS", "").split(",") if s}   # tests only
    for step in range(start_step, cfg.max_iters + 1):
        # Evaluate and checkpoint before taking the step, so a checkpoint at step s resumes with step s.
        # A resumed run skips its first evaluation: it was done just before the checkpoint was written.
        # A SIGTERM or Ctrl-C on any process since the last step: all save here and stop, without evaluating.
        is_resumed_start = step == start_step and start_step > 0
        stop_signal = stop.agreed()
        if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and not is_resumed_start:
            losses = evaluate()
            is_best = losses["val"] < best_val_loss
            best_val_loss = min(best_val_loss, losses["val"])
            if is_master:
                print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                log_metrics(log_file, streams, {"step": step, "tokens": step * tokens_per_step,
                                                "train_loss": losses["train"], "val_loss": losses["val"]})
            save(step, is_best)
            timer_start = time.perf_counter()   # evaluation and saving are not part of the step time
        elif stop_signal and not (is_resumed_start and not cfg.resume_from):   # else ckpt.pt holds this step
            save(step, is_best=False)
        if step == cfg.max_iters or stop_signal:
            break

        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # One seeded stream of windows for the whole run, whatever the number of processes: each step draws
        # the global batch, and process `rank` takes its contiguous share of micro-batches.
        offsets = draw_windows(meta["train_tokens"], T, B * accum * dp_size, data_generator)
        my_offsets = offsets[dp_rank * B * accum:(dp_rank + 1) * B * accum]
        loss_sum = torch.zeros((), device=device)
        for micro_step, batch in enumerate(my_offsets.split(B)):
            x, y = read_batch(paths["train"], batch, T)
            if device_type == "cuda":
                x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
            else:
                x, y = x.to(device), y.to(device)
            # DDP averages gradients during backward; on all but the last micro-step there is nothing to
            # average yet (DDP decides at forward time, so no_sync wraps the forward too).
            if pipe is not None:           # forward and backward of every micro-batch; the stages autocast
                loss_sum += pipeline_loss(pipe, x, y, train=True)       # their forwards (AutocastForward)
                continue
            is_last_micro_step = micro_step == accum - 1
            if cfg.fsdp:                   # FSDP's counterpart of no_sync: reduce only on the last micro-step
                model.set_requires_gradient_sync(is_last_micro_step)
            with train_model.no_sync() if isinstance(train_model, DDP) and not is_last_micro_step \
                    else nullcontext():
                with autocast(device, dtype):
                    # k micro-batches of mean losses, each divided by k: the mean over the big batch
                    loss = train_model(x, y, loss_chunk) / accum
                    if step in nan_steps:   # test hook: a loss gone non-finite (see GPT_TEST_NAN_STEPS)
                        loss = loss * float("nan")
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        # A non-finite loss or gradient norm on any process: every process skips this update (the weights and
        # AdamW's moments stay as they were).
        is_good = lambda norm: bad_steps.check(loss_sum, norm)   # noqa: E731
        if pipe is None:
            grad_norm = optimizer_step(model, optimizer, scaler, cfg.grad_clip, is_good)
        else:
            grad_norm = pipeline_optimizer_step(pipe, named_params, optimizer, cfg.grad_clip, is_good)
        bad_steps.count(step + 1, log_file if is_master else None, ckpt_path)

        steps_timed += 1
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_iters:
            # Reading the loss syncs with the device (as the finite check does). Under --pp only the last
            # stages hold a loss, so the sum over all processes counts each replica once.
            loss_value = (all_ranks_mean(loss_sum) * cfg.pp).item()
            now = time.perf_counter()
            step_time = (now - timer_start) / steps_timed
            timer_start, steps_timed = now, 0
            if is_master:
                print(format_step_line(step + 1, cfg.max_iters, loss_value, lr, grad_norm.item(), step_time,
                                       tokens_per_step, flops_per_step, peak), flush=True)
                log_metrics(log_file, streams, {"step": step + 1, "tokens": (step + 1) * tokens_per_step,
                                                "loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(),
                                                "ms_per_step": 1000 * step_time,
                                                "tokens_per_s": tokens_per_step / step_time,
                                                "mfu": flops_per_step / step_time / peak if peak else None})
    if is_master:
        log_file.close()
        close_metric_streams(streams)
    if dist.is_initialized():
        dist.barrier()   # leave together: a process that tears down while others still work can abort them
    if stop_signal and step < cfg.max_iters:
        print0(f"stopped by {stop_signal.name} after {step} steps: saved {ckpt_path}; continue with the same "
               f"command plus --init_from=resume", flush=True)
        sys.exit(128 + stop_signal)   # the shell's code for a process ended by that signal
    print0(f"done: best val loss {best_val_loss:.4f}; checkpoint {ckpt_path}"
           + (f"; {tokens_per_step / step_time:,.0f} tokens/s" if step_time else ""))


if __name__ == "__main__":
    run_main(main)
