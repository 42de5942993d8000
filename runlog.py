"""The run log: metrics.jsonl (one JSON record per progress line and evaluation, trimmed on resume), the
progress line on the terminal, TensorBoard and Weights & Biases, and the step timer."""
import contextlib
import json
import os
import re
import sys
import time
import typing

from checkpoints import write_atomically
from flags import RunConfig


# --- the run log ---

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
        with contextlib.suppress(OSError):
            log_file.close()   # flushes again, fails again, but closes: nothing is retried at exit
        sys.exit(f"error: cannot write {log_file.name} ({e.strerror or e}); the last checkpoint is untouched. "
                 f"Free disk space or make {os.path.dirname(os.path.abspath(log_file.name))} writable, then "
                 f"resume with --init_from=resume")


def prepare_out_dir(out_dir: str, start_step: int) -> None:
    """Create out_dir, cut the run log back to the checkpoint's step and remove the .tmp files a process
    killed while writing left behind (never complete files). Rank 0 only."""
    os.makedirs(out_dir, exist_ok=True)
    # Lines logged after the checkpoint (all of them, starting from scratch) are from steps lost with the
    # process that logged them; they are about to be redone, and each step is logged once.
    trim_log(os.path.join(out_dir, "metrics.jsonl"), start_step if start_step > 0 else -1)
    for name in os.listdir(out_dir):
        if re.fullmatch(r"(ckpt.*|state|adapter)\.pt\.tmp|metrics\.jsonl\.tmp", name):
            os.remove(os.path.join(out_dir, name))


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class RunLog:
    """What a run reports: a line on stdout per evaluation, per logged step and per skipped step, the same as
    JSON lines in out_dir/metrics.jsonl, and their numbers streamed to Weights & Biases and TensorBoard
    when the flags ask (`tensorboard --logdir out_dir/tensorboard`; WANDB_MODE=offline keeps W&B on disk,
    under out_dir/wandb). Only rank 0 writes: on the other processes every method does nothing."""

    def __init__(self, cfg: RunConfig, out_dir: str, run_config: dict, is_master: bool):
        self.file, self.streams = None, {}
        if not is_master:
            return
        self.file = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        if cfg.wandb_project:
            import wandb
            self.streams["wandb"] = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None,
                                               config=run_config, dir=out_dir)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.streams["tensorboard"] = SummaryWriter(log_dir=os.path.join(out_dir, "tensorboard"))

    def record(self, line: str, record: dict) -> None:
        """Print line, append record to metrics.jsonl and send its numbers to the live streams, against its step."""
        if self.file is None:
            return
        print(line, flush=True)
        append_log(self.file, record)
        numbers = {name: value for name, value in record.items()
                   if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if "wandb" in self.streams:
            self.streams["wandb"].log(numbers, step=record["step"])
        if "tensorboard" in self.streams:
            for name, value in numbers.items():
                self.streams["tensorboard"].add_scalar(name, value, record["step"])

    def evaluation(self, step: int, losses: dict[str, float], **extra) -> None:
        """The train and val loss of the evaluation before step `step`."""
        self.record(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}",
                    {"step": step, **extra, "train_loss": losses["train"], "val_loss": losses["val"]})

    def progress(self, step: int, max_iters: int, loss: float, lr: float, grad_norm: float, step_time: float,
                 tokens_per_step: float, flops_per_step: float, peak: float | None, **extra) -> None:
        """The progress line after optimizer step `step` (1-based): step_time in seconds, peak in FLOP/s."""
        flops = flops_per_step / step_time
        speed = f"MFU {100 * flops / peak:.1f}%" if peak else f"{flops / 1e9:.1f} GFLOP/s"
        self.record(f"step {step}/{max_iters} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                    f"{1000 * step_time:.0f} ms/step | {round(tokens_per_step) / step_time:,.0f} tokens/s | {speed} | "
                    f"ETA {format_duration(step_time * (max_iters - step))}",
                    {"step": step, **extra, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                     "ms_per_step": 1000 * step_time, "tokens_per_s": tokens_per_step / step_time,
                     "mfu": flops / peak if peak else None})

    def skipped(self, step: int, in_a_row: int) -> None:
        """A step whose update was skipped (BadSteps)."""
        self.record(f"step {step}: skipped: non-finite loss or gradient norm ({in_a_row} in a row)",
                    {"step": step, "skipped": "non-finite loss or gradient norm"})

    def close(self) -> None:
        if self.file is None:
            return
        self.file.close()
        if "wandb" in self.streams:
            self.streams["wandb"].finish()
        if "tensorboard" in self.streams:
            self.streams["tensorboard"].close()


class StepTimer:
    """Mean time (and tokens) per optimizer step between two progress lines, without evaluation and saving."""

    def __init__(self):
        self.start, self.steps, self.tokens = time.perf_counter(), 0, 0
        self.step_time, self.tokens_per_step = None, None    # of the last lap

    def restart(self) -> None:
        """Start the clock again: what ran since (an evaluation, a checkpoint) is not part of a step."""
        self.start = time.perf_counter()

    def tick(self, tokens: int = 0) -> None:
        """One more optimizer step, which trained on `tokens` tokens."""
        self.steps += 1
        self.tokens += tokens

    def lap(self) -> float:
        """Seconds per step since the last lap (also kept as step_time, with tokens_per_step)."""
        now = time.perf_counter()
        self.step_time, self.tokens_per_step = (now - self.start) / self.steps, self.tokens / self.steps
        self.start, self.steps, self.tokens = now, 0, 0
        return self.step_time
