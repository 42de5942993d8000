"""Pre-train a GPT on the token files written by prepare.py.

    python prepare.py --dataset=shakespeare && python train.py     # the quick start: a small GPT on a CPU
    python train.py --batch_size=8 --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024
    python train.py --init_from=resume                             # continue the run in --out_dir exactly

Every field of TrainConfig and of model.GPTConfig is a flag (`--help` lists them with their defaults).
"""
import dataclasses
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import (GPT, SHAPE_FIELDS, GPTConfig, arg, autocast, configure_optimizers, flags_given,
                   flops_per_token, load_checkpoint, load_optimizer_state_by_name, optimizer_state_by_name,
                   parse_args, peak_flops, pick_dtype, save_checkpoint, setup_distributed, teardown_distributed)


@dataclass
class TrainConfig:
    # data and files
    dataset: str = arg("shakespeare", "name of a dataset prepared by prepare.py under --data_dir")
    data_dir: str = arg("data", "directory holding the prepared datasets")
    out_dir: str = arg("out", "directory for the checkpoint (ckpt.pt) and the training log (log.jsonl)")
    init_from: str = arg("scratch", "start from random weights, or resume the run in --out_dir exactly",
                         choices=("scratch", "resume"))
    # schedule of the run
    max_iters: int = arg(600, "optimizer steps in the whole run")
    eval_interval: int = arg(100, "evaluate train/val loss and save a checkpoint every this many steps")
    eval_iters: int = arg(20, "batches per split in each evaluation")
    eval_only: bool = arg(False, "evaluate the checkpoint (or the initial weights) once and exit")
    log_interval: int = arg(10, "print a progress line every this many steps")
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
    dtype: str = arg("auto", "auto: bfloat16 on GPUs that have it, float16 on older GPUs, float32 on CPU",
                     choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool | None = arg(None, "torch.compile the model (default: on for CUDA; off elsewhere: on a 2-core "
                                     "CPU it compiled for ~55 s, then ran no faster)")
    loss_chunk: int | None = arg(None, "rows per chunk of the fused LM head + cross-entropy, which never holds "
                                       "the whole (B*T, V) logits; 0: the plain path (default: 64 on CPU/MPS, "
                                       "0 on CUDA, where torch.compile fuses the plain path)")
    seed: int = arg(1337, "seed for the weights, dropout and the order of the batches")


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
    paths = {split: os.path.join(folder, f"{split}.bin") for split in ("train", "val")}
    for split, path in paths.items():
        if not os.path.isfile(path) or os.path.getsize(path) != 2 * counts[split]:
            sys.exit(f"error: {path} is missing or its size disagrees with meta.json; run {prepare} --force")
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


def check_resume_shape(saved: dict, model_cfg: GPTConfig, given: set[str], path: str) -> None:
    """Flags on the command line that change the shape of a checkpoint's weights are refused, all at once."""
    differ = [f"{name} (checkpoint {saved[name]}, flag {getattr(model_cfg, name)})" for name in SHAPE_FIELDS
              if name in given and saved[name] != getattr(model_cfg, name)]
    if differ:
        sys.exit(f"error: cannot resume {path}: the model shape differs in " + ", ".join(differ)
                 + "; drop these flags or start a new --out_dir")


@torch.no_grad()
def estimate_loss(model, paths: dict, eval_offsets: dict, cfg: TrainConfig, block_size: int,
                  device: str, dtype: torch.dtype, loss_chunk: int) -> dict[str, float]:
    """Mean loss per split over the same fixed windows at every evaluation, so the numbers are comparable.
    Each process evaluates its share of the windows and the sums are added up across processes."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model.eval()
    losses = {}
    for split, offsets in eval_offsets.items():
        total = torch.zeros(2, dtype=torch.float64, device=device)      # (sum of losses, windows)
        for batch in offsets.split(cfg.batch_size)[rank::world_size]:   # every process takes its share
            x, y = (t.to(device) for t in read_batch(paths[split], batch, block_size))
            with autocast(device, dtype):
                total += torch.stack([model(x, y, loss_chunk).double() * len(batch),
                                      torch.tensor(len(batch), dtype=torch.float64, device=device)])
        if dist.is_initialized():
            dist.all_reduce(total)
        losses[split] = (total[0] / total[1]).item()
    model.train()
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
                   grad_clip: float) -> torch.Tensor:
    """Clip the gradient's global norm, update the weights and clear the gradients. Returns the norm
    before clipping (worth logging: spikes announce instabilities)."""
    scaler.unscale_(optimizer)              # clip the true gradient, not the fp16-scaled one
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    scaler.step(optimizer)                  # skips the update if fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def check_config(cfg: TrainConfig, model_cfg: GPTConfig) -> None:
    """Refuse values that cannot work, with the flag's name."""
    minimums = {"max_iters": 0, "warmup_iters": 0, "eval_interval": 1, "eval_iters": 1, "log_interval": 1,
                "batch_size": 1, "gradient_accumulation_steps": 1, "loss_chunk": 0}
    for name, minimum in minimums.items():
        if getattr(cfg, name) is not None and getattr(cfg, name) < minimum:
            sys.exit(f"error: --{name}={getattr(cfg, name)} must be >= {minimum}")
    if cfg.learning_rate <= 0 or cfg.min_lr < 0 or cfg.min_lr > cfg.learning_rate:
        sys.exit("error: need 0 <= --min_lr <= --learning_rate and --learning_rate > 0")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        if getattr(model_cfg, name) < 1:
            sys.exit(f"error: --{name}={getattr(model_cfg, name)} must be >= 1")
    if model_cfg.n_embd % model_cfg.n_head:
        sys.exit(f"error: --n_embd={model_cfg.n_embd} must be divisible by --n_head={model_cfg.n_head}")
    if not 0 <= model_cfg.dropout < 1:
        sys.exit(f"error: --dropout={model_cfg.dropout} must be in [0, 1)")


def print0(*args, **kwargs) -> None:
    """print on rank 0 only: with N processes, one copy of each line."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs)


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


def main(argv: list[str] | None = None) -> None:
    cfg, model_cfg = parse_args(TrainConfig, GPTConfig, argv=argv)
    check_config(cfg, model_cfg)
    rank, local_rank, world_size, device = setup_distributed(cfg.device)
    try:
        train(cfg, model_cfg, flags_given(argv), rank, local_rank, world_size, device)
    finally:
        teardown_distributed()


def train(cfg: TrainConfig, model_cfg: GPTConfig, given: set[str], rank: int, local_rank: int,
          world_size: int, device: str) -> None:
    is_master = rank == 0                  # the one process that prints and writes files
    dtype = pick_dtype(cfg.dtype, device)
    device_type = device.split(":")[0]
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # TF32 tensor cores for the fp32 matmuls that remain
        torch.backends.cudnn.allow_tf32 = True
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")

    # The model: random weights, or the weights, optimizer and position of the run being resumed.
    checkpoint = None
    if cfg.init_from == "resume":
        checkpoint = load_checkpoint(ckpt_path)
        check_resume_shape(checkpoint["model_config"], model_cfg, given, ckpt_path)
        runtime = {name: getattr(model_cfg, name) for name in ("dropout", "sdpa", "activation_checkpointing")
                   if name in given}
        model_cfg = GPTConfig(**{**checkpoint["model_config"], **runtime})
    elif os.path.exists(ckpt_path) and not cfg.eval_only:
        sys.exit(f"error: {ckpt_path} exists; continue it with --init_from=resume, or pick another --out_dir "
                 f"(nothing is overwritten)")
    meta, paths = load_data_meta(cfg, model_cfg.block_size)
    if meta.get("vocab_size", model_cfg.vocab_size) > model_cfg.vocab_size:
        sys.exit(f"error: the dataset's vocabulary ({meta['vocab_size']}) is larger than --vocab_size="
                 f"{model_cfg.vocab_size}")

    torch.manual_seed(cfg.seed)            # the same initial weights on every process
    model = GPT(model_cfg)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    model.to(device)
    optimizer = configure_optimizers(model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                     device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)   # fp16 needs loss scaling
    torch.manual_seed(cfg.seed + rank)     # but a different dropout stream on each
    data_generator = torch.Generator().manual_seed(cfg.seed)   # the same batch order on every process
    start_step, best_val_loss = 0, float("inf")
    if checkpoint is not None:
        load_optimizer_state_by_name(model, optimizer, checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        saved_rng = checkpoint["rng"]      # one entry per process of the run that saved it
        restore_rng_states(saved_rng[rank] if len(saved_rng) == world_size else saved_rng[0], data_generator)
        start_step, best_val_loss = checkpoint["step"], checkpoint["best_val_loss"]
        print0(f"resuming {ckpt_path} at step {start_step}")
        del checkpoint   # free the CPU copy of the weights and optimizer state
    compile_model = cfg.compile if cfg.compile is not None else device_type == "cuda"
    loss_chunk = cfg.loss_chunk if cfg.loss_chunk is not None else (0 if device_type == "cuda" else 64)
    # DDP (Li et al. 2020): every process holds the whole model and trains on its share of each batch;
    # backward averages the gradients across processes, so every copy takes the same step.
    train_model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None) \
        if world_size > 1 else model
    train_model = torch.compile(train_model) if compile_model else train_model   # `model` is what we save

    # Fixed evaluation windows, drawn once from their own generator so they never change during the run.
    eval_generator = torch.Generator().manual_seed(cfg.seed + 1)
    T, B, accum = model_cfg.block_size, cfg.batch_size, cfg.gradient_accumulation_steps
    eval_offsets = {split: draw_windows(meta[f"{split}_tokens"], T, cfg.eval_iters * B, eval_generator)
                    for split in ("train", "val")}
    if cfg.eval_only:
        losses = estimate_loss(model, paths, eval_offsets, cfg, T, device, dtype, loss_chunk)
        print0(f"train loss {losses['train']:.4f} | val loss {losses['val']:.4f}")
        return

    n_params = model.num_params()
    tokens_per_step = B * accum * world_size * T
    flops_per_step = flops_per_token(model_cfg, n_params, T) * tokens_per_step
    peak = peak_flops(device)
    print0(f"model: {n_params:,} parameters | {model_cfg.n_layer} layers, {model_cfg.n_head} heads, "
           f"{model_cfg.n_embd} channels, context {T}")
    print0(f"data: {cfg.dataset} ({meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens) | "
           f"{tokens_per_step:,} tokens per step | {world_size} x {device}, {str(dtype).removeprefix('torch.')}"
           f"{', compiled' if compile_model else ''}")
    if is_master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        log_file = open(os.path.join(cfg.out_dir, "log.jsonl"), "a")

    step_time, timer_start, steps_timed = None, time.perf_counter(), 0
    for step in range(start_step, cfg.max_iters + 1):
        # Evaluate and checkpoint before taking the step, so a checkpoint at step s resumes with step s.
        # A resumed run skips its first evaluation: it was done just before the checkpoint was written.
        is_resumed_start = step == start_step and start_step > 0
        if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and not is_resumed_start:
            losses = estimate_loss(model, paths, eval_offsets, cfg, T, device, dtype, loss_chunk)
            best_val_loss = min(best_val_loss, losses["val"])
            rngs = gather_to_rank0(rng_states(data_generator))
            if is_master:
                print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                log_file.write(json.dumps({"step": step, "train_loss": losses["train"],
                                           "val_loss": losses["val"]}) + "\n")
                log_file.flush()
                save_checkpoint({
                    "model": model.state_dict(), "optimizer": optimizer_state_by_name(model, optimizer),
                    "scaler": scaler.state_dict(), "step": step, "best_val_loss": best_val_loss,
                    "model_config": dataclasses.asdict(model_cfg), "train_config": dataclasses.asdict(cfg),
                    "rng": rngs, "data": meta,
                }, ckpt_path)
            timer_start = time.perf_counter()   # evaluation and saving are not part of the step time
        if step == cfg.max_iters:
            break

        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # One seeded stream of windows for the whole run, whatever the number of processes: each step draws
        # the global batch, and process `rank` takes its contiguous share of micro-batches.
        offsets = draw_windows(meta["train_tokens"], T, B * accum * world_size, data_generator)
        my_offsets = offsets[rank * B * accum:(rank + 1) * B * accum]
        loss_sum = torch.zeros((), device=device)
        for micro_step, batch in enumerate(my_offsets.split(B)):
            x, y = read_batch(paths["train"], batch, T)
            if device_type == "cuda":
                x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
            else:
                x, y = x.to(device), y.to(device)
            # DDP averages gradients during backward; on all but the last micro-step there is nothing to
            # average yet (DDP decides at forward time, so no_sync wraps the forward too).
            is_last_micro_step = micro_step == accum - 1
            with train_model.no_sync() if world_size > 1 and not is_last_micro_step else nullcontext():
                with autocast(device, dtype):
                    # k micro-batches of mean losses, each divided by k: the mean over the big batch
                    loss = train_model(x, y, loss_chunk) / accum
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        grad_norm = optimizer_step(model, optimizer, scaler, cfg.grad_clip)

        steps_timed += 1
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_iters:
            loss_value = all_ranks_mean(loss_sum).item()   # the only host-device sync of the step
            now = time.perf_counter()
            step_time = (now - timer_start) / steps_timed
            timer_start, steps_timed = now, 0
            if is_master:
                print(format_step_line(step + 1, cfg.max_iters, loss_value, lr, grad_norm.item(), step_time,
                                       tokens_per_step, flops_per_step, peak), flush=True)
                log_file.write(json.dumps({"step": step + 1, "loss": loss_value, "lr": lr,
                                           "grad_norm": grad_norm.item(), "ms_per_step": 1000 * step_time,
                                           "tokens_per_s": tokens_per_step / step_time}) + "\n")
                log_file.flush()
    if is_master:
        log_file.close()
    print0(f"done: best val loss {best_val_loss:.4f}; checkpoint {ckpt_path}"
           + (f"; {tokens_per_step / step_time:,.0f} tokens/s" if step_time else ""))


if __name__ == "__main__":
    main()
