"""The training runtime: the one loop that pre-training (train.py) and fine-tuning (finetune_lora.py) both run,
its steps besides the math, and the layout a model trains in on one process or as data-parallel replicas.

Every layout offers the loop the same calls (forward_backward, optimizer_step, step_loss, eval_loss, and
load_optimizer_state and state_pieces for checkpoints; full_state too where a process holds the whole model),
so the loop reads the same under each:

    DataParallel   (here) one process, or every process running the whole model on its share of each batch:
                   DDP (a full copy on each) or FSDP (each holding 1/N of every tensor); with --tp each
                   replica split across its tensor-parallel processes (parallel.tensor_parallel);
    Pipeline       (parallel.py) each process running a contiguous slice of the blocks (--pp), micro-batches
                   streaming through the slices; each slice replicated or sharded (FSDP) over dp, split over tp.
"""
import dataclasses
import hashlib
import sys
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoints import (index_of_pieces, optimizer_state_by_name, remove_unnamed_pieces, restore_cpu_threads,
                         restore_rng_states, rng_states, save_checkpoint, save_piece_file)
from flags import RunConfig
from model import GPT, get_lr
from parallel import (load_moments, local_value, materialise, reduce_clip_and_step, state_pieces, tensor_parallel,
                      tp_loss_context, use_single_tensor_adamw)
from processes import StopSignals, all_ranks_mean, autocast, choose_dtype, dtype_name, gather_to_rank0, print0
from runlog import RunLog, StepTimer


# --- the steps of a training loop ---

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
        self.is_good = not self.stop.all_ranks_any(not is_finite)
        return self.is_good

    def tally(self, step: int, log: RunLog, checkpoint: str) -> None:
        """Tally how step `step` (counted from 1, as logged) went: a good step ends a run of skips; a step
        check() refused is printed and logged, and the max_in_a_row-th in a row stops the run with one line
        naming the checkpoint that holds the last good weights."""
        self.in_a_row = 0 if self.is_good else self.in_a_row + 1
        if not self.in_a_row:
            return
        log.skipped(step, self.in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            is_rank0 = not dist.is_initialized() or dist.get_rank() == 0
            sys.exit(f"error: {self.in_a_row} steps in a row had a non-finite loss or gradient norm (the last: step "
                     f"{step}); stopped. Skipped steps change no weights, so {checkpoint} holds the last good "
                     f"ones: resume with a lower --learning_rate, or look for bad data" if is_rank0 else 1)


def resolve_dtype(cfg: RunConfig, device: str) -> tuple[torch.dtype, str, RunConfig]:
    """(dtype, the header's words for it, cfg with --dtype set to it). The checkpoint records the dtype chosen,
    so a resumed run computes in it whatever a new probe of --dtype=auto would say."""
    dtype, words = choose_dtype(cfg.dtype, device)
    return dtype, words, dataclasses.replace(cfg, dtype=dtype_name(dtype))


def restore_loop_state(state: dict, scaler: torch.amp.GradScaler, data_generator: torch.Generator, rank: int,
                       device: str, layout: dict, seed: int, older_layout: dict | None = None) -> tuple[int, float]:
    """Put back what loop_state saved, and return (step, best val loss) to go on from. layout is how this run
    lays out its processes (loop_state's record); seed, the seed a run from scratch of this layout gives this
    process's dropout stream. On the layout that saved the state (its record; for a state older than the
    record, older_layout, what the caller infers, None when it cannot tell), each process takes its own
    generators back, and the CPU thread count: the run goes on exactly. On another layout, a process's saved
    stream belongs to another place in the grid (two DDP replicas' streams given to the two tensor-parallel
    ranks of one replica would draw two masks on the activations they must keep equal, and their replicated
    weights would drift apart), so every process takes rank 0's generators (the batch order is one stream for
    the whole run), then seeds its dropout stream as a run from scratch would, mixed with the step; the CPU
    threads stay at their default (the sums differ anyway)."""
    scaler.load_state_dict(state["scaler"])
    saved_rng = state["rng"]           # one entry per process of the run that saved it
    if state.get("layout", older_layout) == layout:
        restore_rng_states(saved_rng[rank], data_generator)
        threads_line = restore_cpu_threads(state.get("cpu_threads")) if device.startswith("cpu") else None
        if threads_line:
            print0(threads_line)
    else:
        restore_rng_states(saved_rng[0], data_generator)
        # The two mixed through SHA-256, so the resumed run does not replay the masks its first steps drew (as
        # `seed` alone would), nor those of a neighbouring seed. Seeds the CPU and CUDA generators, < 2**63.
        mixed = hashlib.sha256(f"{seed}:{state['step']}".encode()).digest()[:8]
        torch.manual_seed(int.from_bytes(mixed, "little") >> 1)
    return state["step"], state["best_val_loss"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, loss_of: Callable, batches_of: Callable[[str], Iterable], device: str,
             dtype: torch.dtype, group=None) -> dict[str, float]:
    """Mean loss per split ('train', 'val') over the batches batches_of(split) yields: (x, y, count, weight),
    where loss_of(x, y) is the mean loss over count items (windows, or counted tokens) and weight is 1, or 0
    for a batch run only to keep the processes in step. Each process of `group` evaluates its share and the
    sums are added up across them. The model is put in eval mode meanwhile (no dropout)."""
    model.eval()
    losses = {}
    for split in ("train", "val"):
        total = torch.zeros(2, dtype=torch.float64, device=device)      # (sum of losses, items)
        for x, y, count, weight in batches_of(split):
            with autocast(device, dtype):
                loss = loss_of(x, y)
            total += weight * torch.stack([loss.double() * count,
                                           torch.tensor(count, dtype=torch.float64, device=device)])
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(total, group=group)
        losses[split] = (total[0] / total[1]).item()
    model.train()
    return losses


def loop_state(step: int, best_val_loss: float, scaler: torch.amp.GradScaler, data_generator: torch.Generator,
               layout: dict) -> dict:
    """The checkpoint entries that let a training loop go on exactly where it stopped: the step, the best val
    loss, the gradient scaler, every process's random number generators (gathered on rank 0: every process
    must call this), the CPU thread count, and the layout of the processes those generators belong to
    ({"pp": P, "dp": D, "tp": T, "fsdp": bool}: restore_loop_state gives them back on the same one only)."""
    return {"scaler": scaler.state_dict(), "step": step, "best_val_loss": best_val_loss,
            "rng": gather_to_rank0(rng_states(data_generator)), "cpu_threads": torch.get_num_threads(),
            "layout": layout}


def save_on_rank0(write: Callable[[], None], stop: StopSignals) -> None:
    """Run write() on rank 0, the one process that writes files, and stop every process if it fails: a full
    disk or an unwritable out_dir stops rank 0 with one line (write_atomically), and the other processes must
    not wait for it at the next step. Every process calls this."""
    failure = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            write()
        except SystemExit as e:
            failure = e
    if stop.all_ranks_any(failure is not None):
        raise failure or SystemExit(1)


def save_in_pieces(parallel, optimizer: torch.optim.Optimizer, contents: dict, ckpt_path: str, step: int,
                   stop: StopSignals, after: Callable[[], None]) -> None:
    """Write a checkpoint in pieces (checkpoints.py): every process writes its share of the weights and AdamW's
    state (the layout's state_pieces) to a file of its own; then rank 0 writes the index at ckpt_path with
    contents (the loop state, the configs), atomically and last, and runs after() (keep_checkpoints). No
    process ever holds more than its share and one whole tensor. A process that cannot write stops them all.
    Every process calls this."""
    pieces, groups = parallel.state_pieces(optimizer)
    written, failure = None, None
    try:
        written = save_piece_file(pieces, ckpt_path, step)
    except SystemExit as e:
        failure = e
        for _ in pieces:   # the rest of the tensors: gathering them takes every process of their mesh
            pass
    if stop.all_ranks_any(failure is not None):   # rank 0 says why, once: its own reason, or the first one's
        reasons = [reason for reason in gather_to_rank0(failure and failure.code) or [] if reason]
        raise SystemExit(reasons[0] if reasons and dist.get_rank() == 0 else 1)
    gathered = gather_to_rank0((*written, groups))
    def write_index() -> None:
        param_groups = [dict(group, params=[]) for group in gathered[0][-1]]   # each stage's names, in order
        for *_, rank_groups in gathered:
            for merged, group in zip(param_groups, rank_groups):
                merged["params"] += [name for name in group["params"] if name not in merged["params"]]
        save_checkpoint({**contents, "pieces": index_of_pieces([g[:3] for g in gathered]),
                         "optimizer": {"param_groups": param_groups}}, ckpt_path)
        after()
        remove_unnamed_pieces(ckpt_path)
    save_on_rank0(write_index, stop)


# --- the training loop ---

def train_loop(cfg: RunConfig, parallel, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               batches_of: Callable[[int], tuple[Iterable, int]], evaluate_now: Callable[[], dict],
               save: Callable[[int, float, float | None, bool], None], log: RunLog, stop: StopSignals,
               start_step: int, best_val_loss: float, saved_at_start: bool, flops_of: Callable[[float], float],
               peak: float | None, tokens_before: Callable[[int], int] | None, state_path: str,
               resume_with: str) -> tuple[float, StepTimer]:
    """The training loop of pre-training and fine-tuning alike, from start_step to cfg.max_iters, on parallel
    (a DataParallel, below, or a parallel.Pipeline: the layout's forward_backward, optimizer_step, step_loss).

    batches_of(step) gives the step's micro-batches (x, y, weight), this process's share (weight: its share
    of the process's step loss), and the tokens the step trains on; evaluate_now() the train and val loss;
    save(step, best_val_loss, val_loss, is_best) writes the state before step `step` (val_loss None when it
    saves on a stop without evaluating). saved_at_start: the state at start_step is on disk already (the
    run resumed from its newest save). flops_of(tokens per step) and peak (FLOP/s) give the MFU;
    tokens_before(step), where given, the tokens trained on before `step`, logged with each record. Returns
    the best val loss and the timer; a run stopped by a signal exits instead, saying to continue with
    resume_with (a command), with the shell's status for that signal."""
    bad_steps, timer = BadSteps(cfg.max_bad_steps, stop, scaler.is_enabled()), StepTimer()
    tokens = (lambda step: {"tokens": tokens_before(step)}) if tokens_before else (lambda step: {})  # noqa: E731
    step, stop_signal = start_step, None
    for step in range(start_step, cfg.max_iters + 1):
        # Evaluate and save before taking the step, so a state saved at step s resumes with step s. A resumed
        # run skips its first evaluation: it was done just before the state was saved. A SIGTERM or Ctrl-C on
        # any process since the last step: all save here and stop, without evaluating.
        stop_signal = stop.agreed()
        is_resumed_start = step == start_step and start_step > 0
        if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and not is_resumed_start:
            losses = evaluate_now()
            is_best = losses["val"] < best_val_loss
            best_val_loss = min(best_val_loss, losses["val"])
            log.evaluation(step, losses, **tokens(step))
            save(step, best_val_loss, losses["val"], is_best)
            timer.restart()   # evaluation and saving are not part of the step time
        elif stop_signal and not (step == start_step and saved_at_start):
            save(step, best_val_loss, None, False)
        if step == cfg.max_iters or stop_signal:
            break

        lr = get_lr(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.decay_iters, cfg.decay_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches, step_tokens = batches_of(step)
        loss = torch.zeros((), device=parallel.device)
        for micro_step, (x, y, weight) in enumerate(micro_batches):
            loss += parallel.forward_backward(x, y, micro_step, scaler, weight)
        # A non-finite loss or gradient norm on any process: every process skips this update (the weights and
        # AdamW's moments stay as they were).
        is_good = lambda norm: bad_steps.check(loss, norm)   # noqa: E731
        grad_norm = parallel.optimizer_step(optimizer, scaler, cfg.grad_clip, is_good)
        bad_steps.tally(step + 1, log, state_path)

        timer.tick(step_tokens)
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_iters:
            loss_value = parallel.step_loss(loss)   # syncs with the device, as the finite check does
            step_time = timer.lap()
            log.progress(step + 1, cfg.max_iters, loss_value, lr, grad_norm.item(), step_time,
                         timer.tokens_per_step, flops_of(timer.tokens_per_step), peak, **tokens(step + 1))
    log.close()
    # Leave together: a process that tears down while others still work can abort them. On the CPU group,
    # whose timeout fits rank 0's work (processes.py).
    if dist.is_initialized():
        dist.barrier(group=stop.group)
    if stop_signal and step < cfg.max_iters:
        print0(f"stopped by {stop_signal.name} after {step} steps: saved {state_path}; continue with {resume_with}",
               flush=True)
        sys.exit(128 + stop_signal)   # the shell's code for a process ended by that signal
    return best_val_loss, timer


# --- one process, DDP and FSDP: the layout of whole-model replicas ---

def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
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


class DataParallel:
    """The whole model on every process, each training on its share of every batch. `module` is the plain GPT:
    what the optimizer updates, evaluation runs and checkpoints save (its keys never carry `module.` or
    `_orig_mod.`); the training steps run through `wrapped`, which adds DDP and torch.compile when asked.

    DDP (Li et al. 2020): each process holds a full copy; backward averages the gradients across processes,
    so every copy takes the same step. FSDP (Zhao et al. 2023), in its second PyTorch version: each process
    stores 1/N of every tensor; a block's full weights are all-gathered just before it runs and freed after,
    and gradients are reduce-scattered, so each process updates only its shard.

    With a (pp = 1, dp, tp) device mesh and tp > 1, the model is first split across each group of tp processes
    (tensor_parallel below); these groups are the data-parallel replicas: sharded over dp by FSDP, or each a
    full copy whose gradients (plain and DTensor alike, by their local parts) are averaged over dp in one
    all-reduce per optimizer step, as Pipeline does, instead of by DDP."""

    def __init__(self, model: GPT, device: str, dtype: torch.dtype, local_rank: int, world_size: int,
                 fsdp: bool, compile: bool, accum: int, loss_chunk: int, mesh=None,
                 sequence_parallel: bool = False, value_of: Callable | None = None):
        """model: a GPT with its weights, or one built on the meta device, whose pieces are then made here with
        values from value_of(name, shape) (parallel.materialise) once it is laid out: every process allocates
        only what it holds."""
        self.device, self.dtype, self.fsdp = device, dtype, fsdp
        self.module = model if value_of is not None else model.to(device)
        self.accum, self.loss_chunk = accum, loss_chunk
        self.tp = mesh["tp"].size() if mesh is not None else 1
        self.dp_group = None               # tp > 1 without FSDP: the replicas whose gradients we average
        if self.tp > 1:
            assert loss_chunk == 0, "tensor parallelism computes the loss with loss_parallel, not in chunks"
            tensor_parallel(model, mesh["tp"], sequence_parallel)
            if mesh["dp"].size() > 1 and not fsdp:
                self.dp_group = mesh.get_group("dp")
        if fsdp:
            # Imported here, when asked for: importing FSDP takes time that the other layouts need not spend.
            from torch.distributed.fsdp import fully_shard
            shard_over = {"mesh": mesh["dp"]} if self.tp > 1 else {}   # default: all processes
            for block in model.transformer.h:
                fully_shard(block, **shard_over)
            fully_shard(model, **shard_over)   # the rest: embeddings, ln_f and the (tied) head
        if value_of is not None:
            materialise(model, device, self.tp, value_of)
        self.ddp = DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None) \
            if world_size > 1 and not fsdp and self.tp == 1 else None
        wrapped = model if self.ddp is None else self.ddp
        # Compiled, the DDP wrapper hides inside torch.compile's: forward_backward asks self.ddp for no_sync.
        self.wrapped = torch.compile(wrapped) if compile else wrapped

    def named_parameters(self) -> list:
        return list(self.module.named_parameters())

    def loss_context(self):
        return tp_loss_context(self.tp)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, micro_step: int, scaler: torch.amp.GradScaler,
                         weight: float) -> torch.Tensor:
        """Forward and backward of one micro-batch (B, T) of the accum in an optimizer step, its mean loss
        times weight, its share of this process's step loss; returns that product (detached). Pre-training
        weighs each of k micro-batches 1/k: k mean losses, each divided by k, add up to the mean over the big
        batch, and so do their gradients. Fine-tuning weighs each by the response tokens it holds
        (finetune_lora.token_weights). The replicas' gradients are averaged, so the step's loss is the mean
        over the processes of their step losses (step_loss)."""
        # DDP averages gradients during backward; on all but the last micro-step there is nothing to
        # average yet (DDP decides at forward time, so no_sync wraps the forward too).
        is_last_micro_step = micro_step == self.accum - 1
        if self.fsdp:                      # FSDP's counterpart of no_sync: reduce only on the last micro-step
            self.module.set_requires_gradient_sync(is_last_micro_step)
        with self.ddp.no_sync() if self.ddp is not None and not is_last_micro_step else nullcontext(), \
                self.loss_context():
            with autocast(self.device, self.dtype):
                loss = self.wrapped(x, y, self.loss_chunk) * weight
            scaler.scale(loss).backward()
        return local_value(loss.detach()) if self.tp > 1 else loss.detach()

    def step_loss(self, loss: torch.Tensor) -> float:
        """The step's mean loss from this process's step loss (the sum of forward_backward's): the mean over
        the processes (the tensor-parallel ranks of a replica hold the same loss). Reading it syncs with the
        device."""
        return all_ranks_mean(loss).item()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float,
                       is_good: Callable[[torch.Tensor], bool]) -> torch.Tensor:
        """clip_and_step on the model: clip, step unless is_good(norm) says no, clear; the norm. Under tensor
        parallelism, reduce_clip_and_step: every process (dp x tp of them) runs the whole model."""
        if self.tp == 1:
            return clip_and_step(self.module, optimizer, scaler, grad_clip, is_good)
        return reduce_clip_and_step(list(self.module.parameters()), optimizer, grad_clip, is_good,
                                    dist.get_world_size(), self.device, self.dp_group)

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss, through the plain model (evaluation runs under no_grad: no DDP needed)."""
        with self.loss_context():
            loss = self.module(x, y, self.loss_chunk)
        return local_value(loss) if self.tp > 1 else loss

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, reader) -> None:
        """Load AdamW's state from a checkpoint (checkpoints.TensorReader), this process's pieces of it, a tensor
        at a time (parallel.load_moments)."""
        load_moments(self.named_parameters(), optimizer, reader, self.tp)
        if self.tp > 1 and not self.fsdp:
            use_single_tensor_adamw(optimizer)

    def state_pieces(self, optimizer: torch.optim.Optimizer) -> tuple[Iterable, list]:
        """This process's share of a checkpoint (parallel.state_pieces over all processes) and the optimizer's
        by-name parameter groups."""
        part, parts = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if self.fsdp:   # FSDP leaves the root's weights gathered after a forward: register the shards again
            self.module.reshard()
        pieces = state_pieces(self.named_parameters(), optimizer, self.tp, part, parts)
        return pieces, optimizer_state_by_name(self.named_parameters(), optimizer)["param_groups"]

    def full_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """The whole model's state dict and by-name optimizer state of one process, or of DDP's replicas."""
        return self.module.state_dict(), optimizer_state_by_name(self.named_parameters(), optimizer)
