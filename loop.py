"""The steps a training loop takes besides the math, shared by train.py and finetune_lora.py: the dtype it
computes in, resuming its state, evaluating, saving, the learning rate, the optimizer step, and skipping bad
steps."""
import dataclasses
import hashlib
import sys
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from checkpoints import restore_cpu_threads, restore_rng_states, rng_states
from flags import RunConfig
from model import get_lr
from processes import StopSignals, autocast, choose_dtype, dtype_name, gather_to_rank0, print0
from runlog import RunLog, StepTimer


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

    def record(self, step: int, log: RunLog, checkpoint: str) -> None:
        """Record how step `step` (counted from 1, as logged) went: a good step ends a run of skips; a step
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


# --- the steps of a training loop ---

def resolve_dtype(cfg: RunConfig, device: str) -> tuple[torch.dtype, str, RunConfig]:
    """(dtype, the header's words for it, cfg with --dtype set to it). The checkpoint records the dtype chosen,
    so a resumed run computes in it whatever a new probe of --dtype=auto would say."""
    dtype, words = choose_dtype(cfg.dtype, device)
    return dtype, words, dataclasses.replace(cfg, dtype=dtype_name(dtype))


def should_compile(cfg: RunConfig, device: str) -> bool:
    """--compile, or by default on CUDA only."""
    return cfg.compile if cfg.compile is not None else device.startswith("cuda")


def resumed_seed(seed: int, step: int) -> int:
    """The seed of a dropout stream that starts afresh at optimizer step `step` of a resumed run, given the seed a
    run from scratch gives that stream: the two mixed through SHA-256, so the resumed run does not replay the
    masks its first steps drew (as `seed` alone would), nor those of a neighbouring seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:8], "little") >> 1   # < 2**63


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
    the whole run), then seeds its dropout stream as a run from scratch would, mixed with the step
    (resumed_seed); the CPU threads stay at their default (the sums differ anyway)."""
    scaler.load_state_dict(state["scaler"])
    saved_rng = state["rng"]           # one entry per process of the run that saved it
    if state.get("layout", older_layout) == layout:
        restore_rng_states(saved_rng[rank], data_generator)
        threads_line = restore_cpu_threads(state.get("cpu_threads")) if device.startswith("cpu") else None
        if threads_line:
            print0(threads_line)
    else:
        restore_rng_states(saved_rng[0], data_generator)
        torch.manual_seed(resumed_seed(seed, state["step"]))   # CPU and CUDA generators
    return state["step"], state["best_val_loss"]


def is_evaluation_step(step: int, start_step: int, cfg: RunConfig) -> bool:
    """Whether the loop evaluates and saves before step `step`: every eval_interval steps and at the end,
    except where a resumed run starts (that evaluation was made just before its checkpoint was written)."""
    is_resumed_start = step == start_step and start_step > 0
    return (step % cfg.eval_interval == 0 or step == cfg.max_iters) and not is_resumed_start


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


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: RunConfig) -> float:
    """Give every parameter group the learning rate of `step` on cfg's schedule (model.get_lr); return it."""
    lr = get_lr(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.decay_iters, cfg.decay_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


# --- the training loop ---

def train_loop(cfg: RunConfig, parallel, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               batches_of: Callable[[int], tuple[Iterable, int]], evaluate_now: Callable[[], dict],
               save: Callable[[int, float, float | None, bool], None], log: RunLog, stop: StopSignals,
               start_step: int, best_val_loss: float, saved_at_start: bool, flops_of: Callable[[float], float],
               peak: float | None, tokens_before: Callable[[int], int] | None, state_path: str) -> tuple:
    """The training loop of pre-training and fine-tuning alike, from start_step to cfg.max_iters, on parallel
    (a distributed.DataParallel or Pipeline: the layout's forward_backward, optimizer_step, step_loss).

    batches_of(step) gives the step's micro-batches (x, y, weight), this process's share (weight: its share
    of the process's step loss), and the tokens the step trains on; evaluate_now() the train and val loss;
    save(step, best_val_loss, val_loss, is_best) writes the state before step `step` (val_loss None when it
    saves on a stop without evaluating). saved_at_start: the state at start_step is on disk already (the
    run resumed from its newest save). flops_of(tokens per step) and peak (FLOP/s) give the MFU;
    tokens_before(step), where given, the tokens trained on before `step`, logged with each record. Returns
    the step it stopped at, the signal that stopped it (None at the end), the best val loss and the timer."""
    bad_steps, timer = BadSteps(cfg.max_bad_steps, stop, scaler.is_enabled()), StepTimer()
    tokens = (lambda step: {"tokens": tokens_before(step)}) if tokens_before else (lambda step: {})  # noqa: E731
    step, stop_signal = start_step, None
    for step in range(start_step, cfg.max_iters + 1):
        # Evaluate and save before taking the step, so a state saved at step s resumes with step s. A resumed
        # run skips its first evaluation: it was done just before the state was saved. A SIGTERM or Ctrl-C on
        # any process since the last step: all save here and stop, without evaluating.
        stop_signal = stop.agreed()
        if is_evaluation_step(step, start_step, cfg):
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

        lr = set_lr(optimizer, step, cfg)
        micro_batches, step_tokens = batches_of(step)
        loss = torch.zeros((), device=parallel.device)
        for micro_step, (x, y, weight) in enumerate(micro_batches):
            loss += parallel.forward_backward(x, y, micro_step, scaler, weight)
        # A non-finite loss or gradient norm on any process: every process skips this update (the weights and
        # AdamW's moments stay as they were).
        is_good = lambda norm: bad_steps.check(loss, norm)   # noqa: E731
        grad_norm = parallel.optimizer_step(optimizer, scaler, cfg.grad_clip, is_good)
        bad_steps.record(step + 1, log, state_path)

        timer.tick(step_tokens)
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_iters:
            loss_value = parallel.step_loss(loss)   # syncs with the device, as the finite check does
            step_time = timer.lap()
            log.progress(step + 1, cfg.max_iters, loss_value, lr, grad_norm.item(), step_time,
                         timer.tokens_per_step, flops_of(timer.tokens_per_step), peak, **tokens(step + 1))
    return step, stop_signal, best_val_loss, timer
