"""Pre-train a GPT on the token files written by prepare.py.

    python prepare.py --dataset=shakespeare && python train.py     # the quick start: a small GPT on a CPU
    python train.py --batch_size=8 --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024
    python train.py --init_from=resume                             # continue the run in --out_dir exactly

Every field of TrainConfig and of model.GPTConfig is a flag (`--help` lists them with their defaults).
"""
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from checkpoints import TensorReader, keep_checkpoints, load_checkpoint, save_checkpoint
from flags import RUN_MINIMUMS, RunConfig, check_run_config, config_changes, flags_given, parse_args
from model import GPT, SHAPE_FIELDS, GPTConfig, arg, configure_optimizers, flops_per_token, initial_value
from parallel import Pipeline, build_pipeline, device_mesh, use_single_tensor_adamw
from planner import LayoutConfig, config_refusals, dry_run_refusals, dry_run_report, layout_refusals, microbatches
from presets import PRESETS, apply_preset
from processes import (StopSignals, peak_flops, print0, run_main, setup_distributed, should_compile,
                       teardown_distributed)
from runlog import RunLog, prepare_out_dir
from runtime import (DataParallel, evaluate, loop_state, resolve_dtype, restore_loop_state, save_in_pieces,
                     save_on_rank0, train_loop)
from tokenfiles import check_resume_data, describe_tokenizer, draw_windows, load_data_meta, read_batch, to_device
from tokenization import dataset_tokenizer_record, tokenizer_identity, tokenizer_record


# --- the run's flags ---

@dataclass
class TrainConfig(LayoutConfig, RunConfig):
    """train.py's flags: flags.RunConfig's (the schedule, the batch, AdamW and the learning rate, the system),
    planner.LayoutConfig's (the layout across processes, the dry run) and those of pre-training."""
    preset: str | None = arg(None, "a named model and its published recipe (PRESETS in presets.py); flags given on "
                                   "the command line win", choices=tuple(PRESETS))
    # data and files
    dataset: str = arg("shakespeare", "name of a dataset prepared by prepare.py under --data_dir")
    data_dir: str = arg("data", "directory holding the prepared datasets")
    out_dir: str = arg("out", "directory for the checkpoint (ckpt.pt) and the training log (metrics.jsonl)")
    init_from: str = arg("scratch", "scratch (random weights), resume (the run in --out_dir, exactly), or GPT-2's "
                                    "weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl or a Hugging Face directory")
    eval_only: bool = arg(False, "evaluate the checkpoint (or the initial weights) once and exit")
    # checkpoints kept, and where a resumed run starts
    keep_last: int = arg(2, "also keep the checkpoints of the last N evaluations as ckpt-STEP.pt (hard links: "
                            "the newest shares ckpt.pt's disk space); 0 keeps ckpt.pt only")
    keep_best: bool = arg(True, "also keep the checkpoint with the lowest val loss as ckpt-best.pt")
    resume_from: str = arg("", "checkpoint file that --init_from=resume starts from (default: out_dir/ckpt.pt, "
                               "the newest); name an older ckpt-STEP.pt when the newest is damaged")
    allow_data_change: bool = arg(False, "let --init_from=resume continue on token files other than those the "
                                         "checkpoint was trained on (same tokenizer only)")
    verify_data: bool = arg(True, "check train.bin and val.bin against the sha256 in meta.json before training "
                                  "(reads them once)")


# TrainConfig fields that --init_from=resume takes from the command that resumes, never from the checkpoint:
# where to start from and write to, this start's checks and permissions (an --allow_data_change given once must
# not carry over to later starts), the layout across processes (the checkpoint is the same full-model file
# under any layout, and each launch picks its own: a run saved under --pp=2 resumes on one process), and the
# dry run, which reads no checkpoint. Every other field continues the run as saved unless its flag is given.
NOT_RESUMED = ("init_from", "resume_from", "out_dir", "eval_only", "allow_data_change", "verify_data",
               *(f.name for f in dataclasses.fields(LayoutConfig)))


# --- batches ---

def step_batches(bin_path: str, n_tokens: int, generator: torch.Generator, T: int, B: int, accum: int,
                 dp_rank: int, dp_size: int, device: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's micro-batches (x, y), each (B, T), for one optimizer step. One seeded stream of windows
    for the whole run, whatever the number of processes: each step draws the global batch, and replica
    dp_rank takes its contiguous share of micro-batches."""
    offsets = draw_windows(n_tokens, T, B * accum * dp_size, generator)
    for batch in offsets[dp_rank * B * accum:(dp_rank + 1) * B * accum].split(B):
        yield to_device(*read_batch(bin_path, batch, T), device)


def eval_batches(bin_path: str, offsets: torch.Tensor, B: int, T: int, device: str, dp_rank: int,
                 dp_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, int]]:
    """(x, y, windows, weight) for runtime.evaluate: replica dp_rank's share of the fixed evaluation windows.
    Sharded weights are gathered by all processes together, so every process runs the same number of
    forward passes: a process one batch short repeats a batch with weight 0."""
    batches = offsets.split(B)
    for i in range(dp_rank, -(-len(batches) // dp_size) * dp_size, dp_size):   # as many rounds on every process
        batch, weight = (batches[i], 1) if i < len(batches) else (batches[0], 0)
        x, y = (t.to(device) for t in read_batch(bin_path, batch, T))
        yield x, y, len(batch), weight


# --- checking the flags, the data and the checkpoint ---

# The checks themselves are the planner's (planner.config_refusals, layout_refusals, ...), which its layout
# search asks too: here the run stops on the first refusal.

def refuse(refusals: Iterator[str]) -> None:
    """Stop with the first refusal, if there is one."""
    problem = next(refusals, None)
    if problem is not None:
        sys.exit(f"error: {problem}")


def check_config(cfg: TrainConfig, model_cfg: GPTConfig) -> None:
    """Refuse values that cannot work on any number of processes, with the flag's name, before anything starts."""
    check_run_config(cfg, {**RUN_MINIMUMS, "keep_last": 0})
    if cfg.init_from not in ("scratch", "resume"):
        from gpt2_weights import check_hf_source
        check_hf_source(cfg.init_from, ("scratch", "resume"))
    refuse(config_refusals(cfg, model_cfg))
    if cfg.dry_run:
        refuse(dry_run_refusals(cfg))


def check_layout(cfg: TrainConfig, world_size: int, dtype: str | None = None) -> None:
    """Refuse process layouts that cannot work, before any work starts. dtype: what --dtype resolved to."""
    refuse(layout_refusals(cfg, world_size, dtype or cfg.dtype))


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
    """The checkpoint --init_from=resume continues (--resume_from, or out_dir/ckpt.pt), its tensors left in its
    files, and resumed_configs' (run config, model config, report) for it. Shape flags that disagree with its
    weights are refused (and a non-finite weight as it is read: checkpoints.TensorReader.weight)."""
    path = cfg.resume_from or os.path.join(cfg.out_dir, "ckpt.pt")
    checkpoint = load_checkpoint(path, whole=False)   # the tensors are read later, one at a time (TensorReader)
    check_resume_shape(checkpoint["model_config"], model_cfg, set(sources), path)
    return checkpoint, *resumed_configs(cfg, model_cfg, checkpoint.get("train_config", {}),
                                        checkpoint["model_config"], sources)


def run_layout(cfg: TrainConfig, world_size: int) -> dict:
    """How the run lays out its processes, as a checkpoint's loop state records it (runtime.loop_state)."""
    return {"pp": cfg.pp, "dp": world_size // (cfg.pp * cfg.tp), "tp": cfg.tp, "fsdp": cfg.fsdp}


def saved_layout(checkpoint: dict) -> dict | None:
    """The layout of a checkpoint older than the loop state's record of it, from the run config it saved and
    its number of RNG states (one per process); None where the config does not say (no tp: older still), and
    the resume then takes it for another layout (runtime.restore_loop_state)."""
    saved = checkpoint.get("train_config", {})
    if not all(name in saved for name in ("pp", "tp", "fsdp")):
        return None
    return {"pp": saved["pp"], "dp": len(checkpoint["rng"]) // (saved["pp"] * saved["tp"]), "tp": saved["tp"],
            "fsdp": saved["fsdp"]}


# --- the run ---

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
        # --dtype=auto is resolved first (it can be float16 on a GPU), so the layout's checks see the dtype
        # the run computes in; cfg records it, and a resumed run computes in it whatever a new probe says.
        dtype, precision, resolved = resolve_dtype(cfg, device)
        check_layout(cfg, world_size, resolved.dtype)
        train(resolved, model_cfg, sources, rank, local_rank, world_size, device, stop, (dtype, precision),
              checkpoint)
    finally:
        stop.uninstall()
        teardown_distributed()


def initial_weights(cfg: TrainConfig, model_cfg: GPTConfig, sources: dict[str, str]
                    ) -> tuple[GPTConfig, Callable[[str], torch.Tensor] | None]:
    """The model config and the weights a run starts from other than random ones or its checkpoint's: GPT-2's,
    through gpt2_weights.py, with --init_from=gpt2 (or a size, or a Hugging Face directory), read by name one
    tensor at a time from the file; else (model_cfg, None). A new run never overwrites a checkpoint."""
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.init_from != "resume" and os.path.exists(ckpt_path) and not cfg.eval_only:
        sys.exit(f"error: {ckpt_path} exists; continue it with --init_from=resume, or pick another --out_dir "
                 f"(nothing is overwritten)")
    if cfg.init_from in ("scratch", "resume"):
        return model_cfg, None
    from gpt2_weights import RUNTIME_FIELDS, init_from_hf
    pretrained, weight = init_from_hf(cfg.init_from, model_cfg, set(sources))
    # Variants GPT-2 was not trained with (sparse_topk, realformer) are honoured, and said so.
    plain = {name: value for name, value in dataclasses.asdict(GPTConfig()).items()
             if name not in SHAPE_FIELDS and name not in RUNTIME_FIELDS}
    for line in config_changes(f"init_from {cfg.init_from}", plain, dataclasses.asdict(pretrained), sources):
        print0(line)
    return pretrained, weight


def is_compiled(cfg: TrainConfig, device: str) -> bool:
    """Whether the training steps run through torch.compile: --compile (by default on CUDA), except under --tp and
    --pp, where it is refused when asked for and off by default (not yet tested with DTensor and the pipeline's
    schedules here)."""
    return should_compile(cfg.compile, device) and cfg.tp == 1 and cfg.pp == 1


def build_model(cfg: TrainConfig, model_cfg: GPTConfig, weights: Callable | None, rank: int, local_rank: int,
                world_size: int, device: str, dtype: torch.dtype
                ) -> tuple[DataParallel | Pipeline, int, object, int]:
    """The GPT laid out across the processes (runtime.py, parallel.py), with this process's data-parallel rank,
    the group of data-parallel replicas (None: all processes) and the GPT's parameter count. It is built on the
    meta device and laid out first, so each process allocates only what it holds (with --pp its own stages,
    with --tp its slice of every block, the embedding and the head, with --fsdp its shard), filled with
    weights(name, shape), whole tensors read one at a time, or model.initial_value's: the same weights in every
    layout."""
    torch.manual_seed(cfg.seed)            # the same initial weights on every process
    with torch.device("meta"):
        model = GPT(model_cfg)
    weights = weights or (lambda name, shape: initial_value(model_cfg, name, shape, model.init_seed))
    n_params = model.num_params()
    loss_chunk = cfg.loss_chunk if cfg.loss_chunk is not None else (0 if device.startswith("cuda") else 1024)
    if cfg.tp > 1:                         # the loss comes from the vocabulary-split logits (loss_parallel)
        loss_chunk = 0
    mesh = device_mesh(device.split(":")[0], world_size, cfg.pp, cfg.tp) if cfg.pp > 1 or cfg.tp > 1 else None
    if cfg.pp > 1:
        pipe = build_pipeline(model_cfg, weights, mesh, device, dtype, cfg.pp_schedule, cfg.pp_balance,
                              microbatches(cfg), cfg.pp_virtual_stages, cfg.gradient_accumulation_steps, cfg.fsdp,
                              cfg.sequence_parallel)
        return pipe, pipe.dp_rank, mesh.get_group("dp"), n_params
    parallel = DataParallel(model, device, dtype, local_rank, world_size, cfg.fsdp, is_compiled(cfg, device),
                            cfg.gradient_accumulation_steps, loss_chunk, mesh, cfg.sequence_parallel, weights)
    return (parallel, rank, None, n_params) if mesh is None else \
        (parallel, mesh.get_local_rank("dp"), mesh.get_group("dp"), n_params)


def load_data(cfg: TrainConfig, model_cfg: GPTConfig, checkpoint: dict | None, resume_path: str, given: set[str]
              ) -> tuple[dict, dict[str, str], GPTConfig, dict]:
    """load_data_meta, the dataset's tokenizer (the record checkpoints carry, tokenization.dataset_tokenizer_record),
    and the model config fitted to the data: a new run from scratch takes the dataset's vocabulary size unless
    --vocab_size (or --preset) sets it; a resumed run's data must be its own (check_resume_data); GPT-2's
    weights need GPT-2's tokens; and the vocabulary must fit the model's (a larger one only pads)."""
    folder = os.path.join(cfg.data_dir, cfg.dataset)
    meta, paths = load_data_meta(cfg.data_dir, cfg.dataset, model_cfg.block_size, cfg.verify_data)
    tokenizer = dataset_tokenizer_record(folder, meta)
    if checkpoint is not None:
        check_resume_data(checkpoint["data"], meta, cfg.allow_data_change, resume_path, folder)
    elif cfg.init_from == "scratch" and "vocab_size" not in given and "vocab_size" in meta:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=int(meta["vocab_size"]))
    elif cfg.init_from != "scratch":
        from gpt2_weights import hf_tokenizer
        weights_tokenizer = hf_tokenizer(cfg.init_from)
        weights_record = tokenizer_record(weights_tokenizer)
        if tokenizer_identity(weights_record["name"], weights_record["sha256"]) != \
                tokenizer_identity(tokenizer["name"], tokenizer["sha256"]):
            sys.exit(f"error: --init_from={cfg.init_from} has learnt the tokens of {weights_tokenizer.name}, but "
                     f"{folder} holds tokens of {describe_tokenizer(meta)}; prepare the data with that tokenizer")
    if meta.get("vocab_size", model_cfg.vocab_size) > model_cfg.vocab_size:
        sys.exit(f"error: the dataset's vocabulary ({meta['vocab_size']}) is larger than --vocab_size="
                 f"{model_cfg.vocab_size}")
    return meta, paths, model_cfg, tokenizer


def evaluator(cfg: TrainConfig, meta: dict, paths: dict[str, str], parallel: DataParallel | Pipeline, T: int,
              device: str, dtype: torch.dtype, dp_rank: int, dp_size: int, dp_group) -> Callable[[], dict]:
    """A function that returns the train and val loss (runtime.evaluate) over fixed evaluation windows, drawn
    once from their own generator, so every evaluation of the run sees the same ones."""
    eval_generator = torch.Generator().manual_seed(cfg.seed + 1)
    eval_offsets = {split: draw_windows(meta[f"{split}_tokens"], T, cfg.eval_iters * cfg.batch_size,
                                        eval_generator) for split in ("train", "val")}
    return lambda: evaluate(parallel.module, parallel.eval_loss, lambda split: eval_batches(
        paths[split], eval_offsets[split], cfg.batch_size, T, device, dp_rank, dp_size), device, dtype, dp_group)


def train(cfg: TrainConfig, model_cfg: GPTConfig, sources: dict[str, str], rank: int, local_rank: int,
          world_size: int, device: str, stop: StopSignals, precision: tuple[torch.dtype, str],
          checkpoint: dict | None = None) -> None:
    """Build the run (the model laid out across the processes, AdamW, the data, the log), then train it
    (train_loop) and say how it ended. precision: the dtype the run computes in and the header's words for it."""
    is_master = rank == 0                  # the one process that prints and writes files
    dtype, precision = precision
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True   # TF32 tensor cores for the fp32 matmuls that remain
        torch.backends.cudnn.allow_tf32 = True
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    resume_path = cfg.resume_from or ckpt_path
    model_cfg, weights = initial_weights(cfg, model_cfg, sources)
    meta, paths, model_cfg, tokenizer = load_data(cfg, model_cfg, checkpoint, resume_path, set(sources))
    reader = TensorReader(resume_path, checkpoint) if checkpoint is not None else None
    weights_of = (lambda name, shape: reader.weight(name)) if reader is not None else \
        (lambda name, shape: weights(name)) if weights is not None else None
    parallel, dp_rank, dp_group, n_params = build_model(cfg, model_cfg, weights_of, rank, local_rank, world_size,
                                                        device, dtype)
    optimizer = configure_optimizers(parallel.module, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                     device.split(":")[0])
    if cfg.tp > 1 and not cfg.fsdp:
        use_single_tensor_adamw(optimizer)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)   # fp16: loss scaling
    # A different dropout stream on each data-parallel replica (global rank = replica * tp + tp_rank); the
    # tensor-parallel processes of a replica draw the same masks, so the activations they replicate stay equal.
    dropout_seed = cfg.seed + rank // cfg.tp
    torch.manual_seed(dropout_seed)
    data_generator = torch.Generator().manual_seed(cfg.seed)   # the same batch order on every process
    start_step, best_val_loss, resumed_is_best = 0, float("inf"), False
    layout = run_layout(cfg, world_size)
    if checkpoint is not None:
        parallel.load_optimizer_state(optimizer, reader)
        start_step, best_val_loss = restore_loop_state(checkpoint, scaler, data_generator, rank, device, layout,
                                                       dropout_seed, older_layout=saved_layout(checkpoint))
        resumed_is_best = checkpoint.get("is_best", False)   # its evaluation's val loss was the lowest yet
        print0(f"resuming {resume_path} at step {start_step}")
        del checkpoint, reader   # unmap the checkpoint's file

    T, B, accum = model_cfg.block_size, cfg.batch_size, cfg.gradient_accumulation_steps
    dp_size = world_size // (cfg.pp * cfg.tp)   # data-parallel replicas of the (pipelined, split) model
    evaluate_now = evaluator(cfg, meta, paths, parallel, T, device, dtype, dp_rank, dp_size, dp_group)
    if cfg.eval_only:
        losses = evaluate_now()
        print0(f"train loss {losses['train']:.4f} | val loss {losses['val']:.4f}")
        return

    tokens_per_step = B * accum * dp_size * T
    token_flops = flops_per_token(model_cfg, n_params, T)            # FLOPs of one token, forward + backward
    peak = peak_flops(device, cfg.peak_flops, world_size)   # MFU: the global batch over every device's peak
    print0(f"model: {n_params:,} parameters | {model_cfg.n_layer} layers, {model_cfg.n_head} heads, "
           f"{model_cfg.n_embd} channels, context {T}")
    print0(f"data: {cfg.dataset} ({meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens) | "
           f"{tokens_per_step:,} tokens per step | {world_size} x {device}, {precision}"
           f"{', compiled' if is_compiled(cfg, device) else ''}")
    if is_master:
        prepare_out_dir(cfg.out_dir, start_step)
        # A process killed after renaming ckpt.pt into place but before linking it as ckpt-STEP.pt and
        # ckpt-best.pt left those undone, and this run skips that step's evaluation and save: link it now.
        if start_step > 0 and os.path.exists(ckpt_path) and os.path.samefile(resume_path, ckpt_path):
            keep_checkpoints(ckpt_path, start_step, resumed_is_best, cfg.keep_last, cfg.keep_best)
    log = RunLog(cfg, cfg.out_dir, {**dataclasses.asdict(cfg), **dataclasses.asdict(model_cfg)}, is_master)
    in_pieces = cfg.fsdp or cfg.tp > 1 or cfg.pp > 1   # one process and DDP: each process holds it all

    def save_run(step: int, best_val_loss: float, val_loss: float | None, is_best: bool) -> None:
        """Checkpoint the whole training state before step `step` (every process takes part); val_loss, of
        the evaluation just made, is in metrics.jsonl already."""
        contents = {**loop_state(step, best_val_loss, scaler, data_generator, layout), "is_best": is_best,
                    "model_config": dataclasses.asdict(model_cfg), "train_config": dataclasses.asdict(cfg),
                    "data": meta, "tokenizer": tokenizer}
        keep = lambda: keep_checkpoints(ckpt_path, step, is_best, cfg.keep_last, cfg.keep_best)   # noqa: E731
        if in_pieces:   # no process holds the whole model: each writes its share
            save_in_pieces(parallel, optimizer, contents, ckpt_path, step, stop, keep)
            return
        weights, optimizer_state = parallel.full_state(optimizer)
        save_on_rank0(lambda: (save_checkpoint({"model": weights, "optimizer": optimizer_state, **contents},
                                               ckpt_path), keep()), stop)

    def batches_of(step: int) -> tuple[Iterator, int]:
        """The step's micro-batches, each weighed 1/accum, drawn lazily from the run's one stream of windows."""
        micro_batches = step_batches(paths["train"], meta["train_tokens"], data_generator, T, B, accum, dp_rank,
                                     dp_size, device)
        return ((x, y, 1 / accum) for x, y in micro_batches), tokens_per_step
    best_val_loss, timer = train_loop(
        cfg, parallel, optimizer, scaler, batches_of, evaluate_now, save_run, log, stop, start_step, best_val_loss,
        saved_at_start=start_step > 0 and not cfg.resume_from, flops_of=lambda tokens: token_flops * tokens,
        peak=peak, tokens_before=lambda step: step * tokens_per_step, state_path=ckpt_path,
        resume_with="the same command plus --init_from=resume")
    print0(f"done: best val loss {best_val_loss:.4f}; checkpoint {ckpt_path}"
           + (f"; {tokens_per_step / timer.step_time:,.0f} tokens/s" if timer.step_time else ""))


if __name__ == "__main__":
    run_main(main)
