"""The run's flags: every field of a run dataclass is a command-line flag (parse_args), the fields train.py and
finetune_lora.py share (RunConfig), and the checks of their values."""
import argparse
import dataclasses
import difflib
import importlib.util
import sys
import types
import typing
from dataclasses import dataclass

from model import arg


# --- flags ---

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


def config_changes(label: str, before: dict, after: dict, sources: dict[str, str]) -> list[str]:
    """'label: name before -> after (source)' for each field whose value differs between two configs given as
    dicts (a field missing from `before` is skipped); sources names where each new value came from (the command
    line, a --preset). A resumed or imported run prints these, so that no flag is taken or dropped silently."""
    return [f"{label}: {name} {before[name]} -> {value} ({sources.get(name, 'command line')})"
            for name, value in after.items() if name in before and before[name] != value]


@dataclass
class RunConfig:
    """The flags of a training loop, which train.py's TrainConfig and finetune_lora.py's FinetuneConfig both
    extend (each with its own defaults where they differ): the schedule, the batch, AdamW and the learning
    rate, and the system."""
    # schedule of the run
    max_iters: int = arg(600, "optimizer steps in the whole run")
    eval_interval: int = arg(100, "evaluate train/val loss and save a checkpoint every this many steps")
    eval_iters: int = arg(20, "batches per split in each evaluation")
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
    max_bad_steps: int = arg(5, "stop after this many steps in a row with a non-finite loss or gradient norm "
                                "(each such step is skipped, and logged)")
    # system
    device: str = arg("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: str = arg("auto", "auto: bfloat16 on GPUs that compute it natively (compute capability 8.0+), "
                             "float16 on older GPUs; on a CPU bfloat16 where a probe at start finds its matmuls "
                             "at least 1.5x as fast as float32's, else float32",
                     choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool | None = arg(None, "torch.compile the model for the training steps (default: on for CUDA; off "
                                     "elsewhere, where it starts slowly and has not run faster: "
                                     "docs/performance.md)")
    loss_chunk: int | None = arg(None, "rows per chunk of the fused LM head + cross-entropy, which never holds "
                                       "the whole (B*T, V) logits; 0: the plain path (default: 1024 on CPU/MPS, "
                                       "0 on CUDA, where torch.compile fuses the plain path)")
    peak_flops: float | None = arg(None, "peak FLOP/s of one device, for the MFU in the log (default: the data "
                                         "sheet's bf16 figure for the GPUs processes.PEAK_BF16_FLOPS lists; on others "
                                         "and on CPUs the log gives GFLOP/s instead)")
    seed: int = arg(1337, "seed for the weights, dropout and the order of the batches")

    @property
    def decay_iters(self) -> int:
        """The step where the cosine decay ends: --lr_decay_iters, or the end of the run."""
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.max_iters


# The smallest value each of RunConfig's counts may take.
RUN_MINIMUMS = {"max_iters": 0, "warmup_iters": 0, "eval_interval": 1, "eval_iters": 1, "log_interval": 1,
                "batch_size": 1, "gradient_accumulation_steps": 1, "loss_chunk": 0, "max_bad_steps": 1}


def check_run_config(cfg: RunConfig, minimums: dict[str, int]) -> None:
    """Stop with one line, naming the flag, on a count below its minimum (RUN_MINIMUMS plus a script's own),
    a learning rate or a --peak_flops that cannot be, or a metrics stream whose package is missing."""
    for name, minimum in minimums.items():
        if getattr(cfg, name) is not None and getattr(cfg, name) < minimum:
            sys.exit(f"error: --{name}={getattr(cfg, name)} must be >= {minimum}")
    if cfg.peak_flops is not None and not cfg.peak_flops > 0:
        sys.exit(f"error: --peak_flops={cfg.peak_flops} must be > 0 (FLOP/s of one device, e.g. 989e12 for an H100)")
    # min_lr is where the cosine decay ends: with --decay_lr=False it is never used (get_lr), so its default
    # must not refuse a learning rate below it.
    if cfg.learning_rate <= 0 or cfg.min_lr < 0 or (cfg.decay_lr and cfg.min_lr > cfg.learning_rate):
        sys.exit(f"error: need 0 <= --min_lr <= --learning_rate and --learning_rate > 0 (--min_lr={cfg.min_lr}, "
                 f"--learning_rate={cfg.learning_rate})")
    for flag, package in (("wandb_project", "wandb"), ("tensorboard", "tensorboard")):
        if getattr(cfg, flag) and importlib.util.find_spec(package) is None:
            sys.exit(f"error: --{flag} needs the package {package}; `pip install {package}` "
                     f"(or `pip install -r requirements-extra.txt`)")
