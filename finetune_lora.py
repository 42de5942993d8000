"""Fine-tune a pre-trained GPT on instruction data with low-rank adapters (LoRA), leaving its weights untouched.

    python finetune_lora.py --init_from=out-shakespeare --data=shakespeare --out_dir=out-lora   # offline example
    python finetune_lora.py --init_from=out --data=alpaca.json --out_dir=out-lora
    python finetune_lora.py --init_from=out --data=tatsu-lab/alpaca --out_dir=out-lora          # Hugging Face
    python finetune_lora.py --init_from=resume --out_dir=out-lora --max_iters=600 --merge       # go on, then merge
    python generate.py --lora=out-lora/adapter.pt --instruction="Who speaks this line in Hamlet?" \\
        --input="To be, or not to be: that is the question:"

LoRA (Hu et al. 2021) learns, for chosen linear layers of the frozen base, a low-rank update B A of each weight
W (the adapter layer and its file are lora.py; this script is the training run around them). The result is a
small adapter file that belongs to one base checkpoint; `--merge` folds B A into W and writes a full checkpoint.

Every field of FinetuneConfig is a flag (`--help` lists them with their defaults).
"""
import dataclasses
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from checkpoints import load_checkpoint, save_checkpoint, sha256_file
from flags import RUN_MINIMUMS, RunConfig, check_run_config, config_changes, flags_given, parse_args
from gpt2_weights import is_hf_source, load_model, save_hf_as_checkpoint
from lora import LORA_TARGETS, adapter_tensors, apply_lora, format_prompt, merge_lora, parse_targets, save_adapter
from model import GPT, GPTConfig, arg, configure_optimizers, flops_per_token
from processes import (StopSignals, peak_flops, print0, run_main, setup_distributed, should_compile,
                       teardown_distributed)
from runlog import RunLog, StepTimer, prepare_out_dir
from runtime import DataParallel, evaluate, loop_state, resolve_dtype, restore_loop_state, save_on_rank0, train_loop
from tokenization import decode_utf8, shakespeare_paths


# --- the run's flags ---

@dataclasses.dataclass
class FinetuneConfig(RunConfig):
    """finetune_lora.py's flags: flags.RunConfig's (the schedule, the batch, AdamW and the learning rate, the
    system) with the defaults of fine-tuning, and those of LoRA and its data."""
    # data and files
    init_from: str = arg("out", "directory holding the base checkpoint (ckpt.pt), GPT-2's weights (gpt2, "
                                "gpt2-medium, gpt2-large, gpt2-xl or a Hugging Face directory), or resume to "
                                "continue the fine-tuning run in --out_dir exactly")
    data: str = arg("", "instruction records: a .json (list) or .jsonl file, a Hugging Face dataset id, or "
                        "shakespeare ('Who speaks this line?' records built from the plays, offline)")
    out_dir: str = arg("out-lora", "directory for adapter.pt, the resumable state (state.pt), metrics.jsonl and, "
                                   "with --merge, a merged ckpt.pt")
    val_fraction: float = arg(0.1, "share of the records held out for validation (drawn with --seed)")
    overlong: str = arg("truncate", "records longer than block_size + 1 tokens: cut at that length, or skip "
                                    "them", choices=("truncate", "skip"))
    mask_input: bool = arg(True, "train on the response tokens only: the prompt's positions get no loss")
    # LoRA
    lora_rank: int = arg(8, "rank R of each adapter's update B A")
    lora_alpha: float = arg(16.0, "the update is scaled by lora_alpha / lora_rank")
    lora_dropout: float = arg(0.05, "dropout on the adapters' input (the base path has none)")
    lora_targets: str = arg(",".join(LORA_TARGETS), "comma-separated linear layers of each block that get an "
                                                    "adapter: " + ", ".join(LORA_TARGETS))
    merge: bool = arg(False, "at the end, also write out_dir/ckpt.pt: the base with the adapter merged in")
    # RunConfig's flags whose defaults (or meaning) differ in fine-tuning
    max_iters: int = arg(300, "optimizer steps in the whole run")
    eval_interval: int = arg(50, "evaluate train/val loss and save the adapter every this many steps")
    eval_iters: int = arg(20, "batches per split in each evaluation (at most the whole split)")
    batch_size: int = arg(16, "records per micro-batch, padded to the longest")
    warmup_iters: int = arg(20, "steps of linear warmup")
    weight_decay: float = arg(0.0, "AdamW weight decay on the adapter matrices (it pulls them towards the base)")
    loss_chunk: int | None = arg(None, "rows per chunk of the fused LM head + cross-entropy, as in train.py; 0: "
                                       "the plain path (default: 1024 on CPU/MPS, 0 on CUDA or with --compile)")
    seed: int = arg(1337, "seed for the adapters' initial A, dropout, the validation split and the data order")


FIXED_ON_RESUME = ("data", "val_fraction", "overlong", "mask_input", "lora_rank", "lora_alpha", "lora_dropout",
                   "lora_targets", "batch_size", "gradient_accumulation_steps", "seed")


def lora_settings(cfg: FinetuneConfig) -> dict:
    """The LoRA settings an adapter file records, to rebuild its layers (lora.load_base_with_adapter)."""
    return {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
            "targets": parse_targets(cfg.lora_targets)}


# --- instruction data: examples and batches ---

def encode_record(tokenizer, record: dict) -> tuple[list[int], int]:
    """Token ids of prompt + response + <|endoftext|>, and how many of them are the prompt.

    Prompt and response are encoded separately, as generation sees them: generate.py feeds the prompt's tokens
    and the model continues from there. encode_ordinary treats a literal '<|endoftext|>' in a record as text;
    the only end-of-text token is the one that closes the response, which teaches the model to stop."""
    prompt = tokenizer.encode_ordinary(format_prompt(record["instruction"], record.get("input") or ""))
    response = tokenizer.encode_ordinary(record["output"]) + [tokenizer.eot_token]
    return prompt + response, len(prompt)


def fit_to_context(examples: list[tuple[list[int], int]], block_size: int, overlong: str
                   ) -> tuple[list[tuple[list[int], int]], int, int]:
    """Examples that fit the context, and the counts of those truncated and skipped.

    An example of n tokens trains on n - 1 next-token predictions, so it fits when n <= block_size + 1. An
    overlong one is cut at that length ('truncate': the end of its response is lost) or dropped ('skip'); one
    whose prompt alone fills the context has no response left to learn and is always dropped."""
    kept, truncated, skipped = [], 0, 0
    for ids, n_prompt in examples:
        if len(ids) <= block_size + 1 or (overlong == "truncate" and n_prompt < block_size + 1):
            kept.append((ids[:block_size + 1], n_prompt))   # the cut is a no-op where it fits
            truncated += len(ids) > block_size + 1
        else:
            skipped += 1
    return kept, truncated, skipped


def split_records(n_records: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the training and validation records, in a seeded random order: its first val_fraction
    (at least one record) is held out for validation, the rest trains."""
    order = np.random.default_rng(seed).permutation(n_records).tolist()
    n_val = max(1, round(n_records * val_fraction))
    return order[n_val:], order[:n_val]


def step_examples(step: int, examples_per_step: int, n_examples: int, seed: int) -> list[int]:
    """Indices of the training examples that optimizer step `step` uses.

    The run walks through the training set epoch after epoch, each in a fresh random order (every example once
    per epoch). An epoch's order is a pure function of (seed, epoch), so a resumed run finds its place from
    the step alone."""
    positions = range(step * examples_per_step, (step + 1) * examples_per_step)   # counted over all epochs
    orders = {epoch: np.random.default_rng([seed, epoch]).permutation(n_examples)
              for epoch in {p // n_examples for p in positions}}
    return [int(orders[p // n_examples][p % n_examples]) for p in positions]


def collate(examples: list[tuple[list[int], int]], mask_input: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and targets y (B, T) for a batch of examples, T = the longest example's length - 1.

    y is x shifted by one token. Positions that must not count get the target -1, the ignore index of the
    model's loss: the padding after a shorter example, and with mask_input the positions whose next token is
    still part of the prompt (the first n_prompt - 1), so only the response and its <|endoftext|> are learned.
    Padded inputs may hold any token (causal attention never lets an earlier position see them): each row is
    padded with its last token, the <|endoftext|> that closes the response."""
    T = max(len(ids) for ids, _ in examples) - 1
    padded = torch.tensor([ids + ids[-1:] * (T + 1 - len(ids)) for ids, _ in examples])   # (B, T + 1)
    x, y = padded[:, :-1].contiguous(), padded[:, 1:].clone()
    for row, (ids, n_prompt) in enumerate(examples):
        y[row, len(ids) - 1:] = -1                 # the padding
        if mask_input:
            y[row, :n_prompt - 1] = -1             # the prompt
    return x, y


def step_micro_batches(examples: list[tuple[list[int], int]], step: int, cfg: FinetuneConfig, rank: int,
                       world_size: int, device: str) -> tuple[list[tuple[torch.Tensor, torch.Tensor, float]], int]:
    """This process's micro-batches (x, y, weight) for optimizer step `step`, on device, each weighed by its
    share of the target tokens the step counts on all processes (token_weights), and the step's real tokens,
    padding left out (for the tokens/s). Every process computes the step's records (step_examples); process
    `rank` takes its contiguous share."""
    share = cfg.batch_size * cfg.gradient_accumulation_steps   # records per process
    indices = step_examples(step, share * world_size, len(examples), cfg.seed)
    micro_batches = [collate([examples[i] for i in indices[start:start + cfg.batch_size]], cfg.mask_input)
                     for start in range(rank * share, (rank + 1) * share, cfg.batch_size)]
    counts = [int((y != -1).sum()) for _, y in micro_batches]   # counted on the CPU: no device sync
    step_tokens = torch.tensor([sum(counts)], device=device)
    if world_size > 1:
        dist.all_reduce(step_tokens)
    weights = token_weights(counts, int(step_tokens.item()), world_size)
    return ([(x.to(device), y.to(device), weight) for (x, y), weight in zip(micro_batches, weights)],
            sum(len(examples[i][0]) - 1 for i in indices))


def eval_example_batches(examples: list[tuple[list[int], int]], cfg: FinetuneConfig, rank: int, world_size: int,
                         device: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, int]]:
    """(x, y, counted tokens, weight 1) for runtime.evaluate: process rank's share of the batches of examples,
    so the mean is per token that training counts (with mask_input, the responses only)."""
    for start in range(rank * cfg.batch_size, len(examples), world_size * cfg.batch_size):
        x, y = collate(examples[start:start + cfg.batch_size], cfg.mask_input)
        yield x.to(device), y.to(device), int((y != -1).sum()), 1


# --- the loss over response tokens, and its cost ---

def token_weights(counts: list[int], step_tokens: int, world_size: int) -> list[float]:
    """The weight of each micro-batch's mean loss (runtime.DataParallel.forward_backward) when the micro-
    batches hold different numbers of counted target tokens: counts, this process's, of step_tokens counted
    on all world_size processes. The step's loss is the mean over every counted token of the step.

    The model's loss is a mean over its micro-batch's counted tokens. Dividing each by the number of
    micro-batches (as pre-training does) would weigh a token in a micro-batch of short responses more than one
    in a micro-batch of long ones; weighting each mean by its micro-batch's share of the step's tokens gives
    exactly the gradient of one big batch: sum_i (n_i / N) * mean_i = (1 / N) * sum over all N tokens. DDP
    averages the processes' gradients (and the loop their losses), so each weight carries a factor world_size
    to turn that average back into the sum."""
    assert all(counts), "every example has at least one response token (fit_to_context guarantees it)"
    return [world_size * count / step_tokens for count in counts]


def finetune_flops(config: GPTConfig, n_params: int, tokens_per_step: float, examples_per_step: int) -> float:
    """FLOPs of a fine-tuning step on tokens_per_step tokens in examples_per_step records. Frozen weights need
    no weight gradient, so a step costs about 4N FLOPs per token instead of 6N (model.flops_per_token, with
    its sequence length the records' mean length)."""
    n_matmul = n_params - config.block_size * config.n_embd
    mean_T = max(1, round(tokens_per_step / examples_per_step))
    return (flops_per_token(config, n_params, mean_T) - 2 * n_matmul) * tokens_per_step


# --- side effects: reading records ---

def check_record(record, where: str) -> dict:
    """The record as {'instruction', 'input', 'output'} strings; anything else stops with one line naming it."""
    if not isinstance(record, dict):
        sys.exit(f"error: {where}: a record must be a JSON object with instruction, input and output fields, "
                 f"not {type(record).__name__}")
    if missing := [field_name for field_name in ("instruction", "output") if field_name not in record]:
        sys.exit(f"error: {where}: missing field '{missing[0]}'")
    for field_name in ("instruction", "input", "output"):
        value = record.get(field_name)
        if not (isinstance(value, str) or (field_name == "input" and value is None)):
            sys.exit(f"error: {where}: field '{field_name}' must be a string, not {type(value).__name__}")
    return {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}


def parse_json(text: str, path: str, first_line: int = 1):
    """The JSON value of text, which starts at line first_line of path; invalid JSON stops with one line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        sys.exit(f"error: {path} line {first_line + e.lineno - 1}: not valid JSON ({e.msg} at column {e.colno})")


def read_json_records(path: str) -> list[dict]:
    """Records from a .json file (one list of objects) or a .jsonl file (one object per line)."""
    with open(path, "rb") as f:
        text = decode_utf8(f.read(), path)
    if path.endswith(".jsonl"):
        return [check_record(parse_json(line, path, line_number), f"{path} line {line_number}")
                for line_number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    records = parse_json(text, path)
    if not isinstance(records, list):
        sys.exit(f"error: {path}: a .json file must hold a list of records, not a {type(records).__name__}; "
                 f"or write one record per line to a .jsonl file")
    return [check_record(record, f"{path} record {i}") for i, record in enumerate(records, start=1)]


def shakespeare_speaker_records(min_speeches: int = 50, min_words: int = 4) -> list[dict]:
    """'Who speaks this line?' records built from the 38 plays of the Shakespeare sample, offline.

    In the plays' Markdown a speech opens with the speaker in bold (**HAMLET**) followed by its lines. Each
    record asks who, in the named play, speaks the first line of a speech; the answer is the speaker as the
    plays write it. Only speakers with at least min_speeches speeches in their play (the main characters) and
    lines of at least min_words words are kept, so the answer can be learned."""
    records = []
    for path in shakespeare_paths():
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
        stem = os.path.splitext(os.path.basename(path))[0]
        title = lines[0][2:] if lines[0].startswith("# ") else stem.replace("-", " ").title()
        speeches, speaker = [], None   # speaker: of the speech whose first line is still to come
        for line in lines:
            if bold := re.fullmatch(r"\*\*(.+)\*\*", line):
                speaker = bold.group(1)
            elif speaker and line and not line.startswith(("#", "_")):
                speeches.append((speaker, line))
                speaker = None
        counts = Counter(speaker for speaker, _ in speeches)
        records += [{"instruction": f"Who speaks this line in {title}?", "input": line, "output": speaker}
                    for speaker, line in speeches
                    if counts[speaker] >= min_speeches and len(line.split()) >= min_words]
    return records


def read_records(source: str) -> list[dict]:
    """The instruction records named by --data: a local file, the built-in Shakespeare set, or a Hub dataset."""
    if os.path.isfile(source):
        if not source.endswith((".json", ".jsonl")):
            sys.exit(f"error: --data={source}: use a .json file (a list of records) or a .jsonl file "
                     f"(one record per line)")
        records = read_json_records(source)
    elif source == "shakespeare":
        records = shakespeare_speaker_records()
    elif os.path.exists(source):
        sys.exit(f"error: --data={source} is not a file; name a .json or .jsonl file")
    elif source.endswith((".json", ".jsonl")):
        sys.exit(f"error: --data={source}: file not found")
    else:   # the train split of a Hugging Face dataset with instruction/input/output columns
        import datasets
        try:
            dataset = datasets.load_dataset(source, split="train")
        except Exception as e:   # no network, unknown id: one line, not a traceback
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            sys.exit(f"error: could not load dataset '{source}' from the Hugging Face Hub ({reason}); check the "
                     f"id and your network, or pass a local .json/.jsonl file with --data")
        records = [check_record(record, f"{source} record {i}") for i, record in enumerate(dataset, start=1)]
    if len(records) < 2:
        sys.exit(f"error: --data={source} holds {len(records)} record(s); fine-tuning needs at least 2 "
                 f"(one for training, one for validation)")
    return records


# --- checking the flags, and resuming ---

def check_finetune_config(cfg: FinetuneConfig) -> None:
    """Refuse values that cannot work, with the flag's name."""
    check_run_config(cfg, {**RUN_MINIMUMS, "lora_rank": 1})
    if cfg.lora_alpha <= 0:
        sys.exit(f"error: --lora_alpha={cfg.lora_alpha} must be > 0")
    if not 0 <= cfg.lora_dropout < 1:
        sys.exit(f"error: --lora_dropout={cfg.lora_dropout} must be in [0, 1)")
    if not 0 < cfg.val_fraction < 1:
        sys.exit(f"error: --val_fraction={cfg.val_fraction} must be in (0, 1)")
    if not (targets := parse_targets(cfg.lora_targets)) or any(t not in LORA_TARGETS for t in targets):
        sys.exit(f"error: --lora_targets={cfg.lora_targets}: name one or more of {', '.join(LORA_TARGETS)}")
    if cfg.init_from != "resume" and not cfg.data:
        sys.exit("error: --data is required: a .json/.jsonl file of instruction records, a Hugging Face dataset "
                 "id, or shakespeare")


# --- the run ---

def main(argv: list[str] | None = None) -> None:
    (cfg,) = parse_args(FinetuneConfig, argv=argv)
    check_finetune_config(cfg)
    rank, local_rank, world_size, device = setup_distributed(cfg.device)
    stop = StopSignals()
    try:
        finetune(cfg, flags_given(argv), rank, local_rank, world_size, device, stop)
    finally:
        stop.uninstall()
        teardown_distributed()


def start_or_resume(cfg: FinetuneConfig, given: set[str]) -> tuple[FinetuneConfig, dict | None, str]:
    """(config, saved state, base checkpoint path) of the run: a new one on a base checkpoint (no state), which
    never overwrites another run's files, or the one in out_dir, resumed with its base. A resumed run's config is
    the saved one (a field newer than it takes its default) with the flags given now on top, and one line for
    each value that changes (as train.py prints them); flags that would change what it learns are refused, all
    at once."""
    state_path = os.path.join(cfg.out_dir, "state.pt")
    if cfg.init_from != "resume":
        if os.path.realpath(cfg.init_from) == os.path.realpath(cfg.out_dir):
            sys.exit(f"error: --out_dir={cfg.out_dir} is the base's directory; pick another --out_dir")
        for name in ("adapter.pt", "state.pt", "ckpt.pt"):
            if os.path.exists(path := os.path.join(cfg.out_dir, name)):
                sys.exit(f"error: {path} exists; continue that run with --init_from=resume, or pick another "
                         f"--out_dir (nothing is overwritten)")
        return cfg, None, os.path.join(cfg.init_from, "ckpt.pt")
    if not os.path.isfile(state_path):
        sys.exit(f"error: {state_path} not found: there is no fine-tuning run in --out_dir={cfg.out_dir} to resume")
    state = load_checkpoint(state_path)
    fields = dataclasses.asdict(FinetuneConfig())
    saved = {**fields, **{name: value for name, value in state["finetune_config"].items() if name in fields}}
    if differ := [f"{name} (run {saved[name]}, flag {getattr(cfg, name)})" for name in FIXED_ON_RESUME
                  if name in given and getattr(cfg, name) != saved[name]]:
        sys.exit(f"error: cannot resume {state_path} with a different " + ", ".join(differ)
                 + "; drop these flags or start a new --out_dir")
    now = {name: getattr(cfg, name) for name in given if name not in ("init_from", "out_dir")}
    for line in config_changes("resume", saved, now, {name: "command line" for name in now}):
        print0(line)
    cfg = FinetuneConfig(**{**saved, **now, "init_from": "resume", "out_dir": cfg.out_dir})
    return cfg, state, state["base"]["path"]


def load_base(cfg: FinetuneConfig, base_path: str, state: dict | None, stop: StopSignals) -> tuple[GPT, dict, object]:
    """The base model (dropout off: only the adapters' dropout regularizes fine-tuning), its record for the
    adapter (path and sha256) and the tokenizer its checkpoint carries. GPT-2's weights first become a
    checkpoint of ours in out_dir/base.pt, written by rank 0 while the others wait on the CPU group (a barrier
    of NCCL's group would give up after its 10 minutes). A resumed run refuses a base that changed since."""
    if state is None and is_hf_source(cfg.init_from):
        base_path = os.path.join(cfg.out_dir, "base.pt")   # out_dir appears only once the weights have loaded
        save_on_rank0(lambda: save_hf_as_checkpoint(cfg.init_from, base_path), stop)
    model, tokenizer = load_model(base_path)
    base = {"path": base_path, "sha256": sha256_file(base_path)}
    if state is not None and base["sha256"] != state["base"]["sha256"]:
        sys.exit(f"error: the base checkpoint {base_path} changed since this run started (sha256 differs); "
                 f"the adapter only fits the base it was trained on")
    return model, base, tokenizer


def encode_splits(cfg: FinetuneConfig, records: list[dict], tokenizer, block_size: int) -> dict[str, list]:
    """The training and validation examples: records split (split_records), encoded, and fit to the context."""
    train_ids, val_ids = split_records(len(records), cfg.val_fraction, cfg.seed)
    if not train_ids:
        sys.exit(f"error: --val_fraction={cfg.val_fraction} leaves no training record of {len(records)}")
    splits, n_truncated, n_skipped = {}, 0, 0
    for split, ids in (("train", train_ids), ("val", val_ids)):
        examples = [encode_record(tokenizer, records[i]) for i in ids]
        splits[split], truncated, skipped = fit_to_context(examples, block_size, cfg.overlong)
        n_truncated, n_skipped = n_truncated + truncated, n_skipped + skipped
        if not splits[split]:
            sys.exit(f"error: no {split} record fits the context of {block_size} tokens; use --overlong=truncate "
                     f"or shorter records")
    print0(f"data: {cfg.data}: {len(records):,} records, {len(splits['train']):,} train / {len(splits['val']):,} "
           f"val examples | over {block_size + 1} tokens: {n_truncated:,} truncated, {n_skipped:,} skipped")
    return splits


def add_adapters(model: GPT, cfg: FinetuneConfig, given: set[str], state: dict | None) -> list[str]:
    """Freeze the base and give it adapters on the --lora_targets it has (with a resumed run's tensors);
    returns those targets. Targets named on the command line that the model lacks are refused."""
    targets = parse_targets(cfg.lora_targets)
    present = [t for t in targets if any(name.endswith("." + t) for name, _ in model.named_modules())]
    if "lora_targets" in given and present != targets:
        sys.exit(f"error: --lora_targets={cfg.lora_targets}: the base model has no "
                 f"{', '.join(t for t in targets if t not in present)} layer (mlp_0 is in Macaron models only)")
    torch.manual_seed(cfg.seed)            # the same initial A on every process
    apply_lora(model, targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    if state is not None:
        model.load_state_dict(state["tensors"], strict=False)   # the adapters' tensors: the base's are in place
    return present


def finetune(cfg: FinetuneConfig, given: set[str], rank: int, local_rank: int, world_size: int,
             device: str, stop: StopSignals) -> None:
    """Build the run (the base with adapters, AdamW, the examples, the log), then train the adapters
    (runtime.train_loop, pre-training's), and write the merged checkpoint when asked."""
    is_master = rank == 0                  # the one process that prints and writes files
    adapter_path, state_path = os.path.join(cfg.out_dir, "adapter.pt"), os.path.join(cfg.out_dir, "state.pt")
    cfg, state, base_path = start_or_resume(cfg, given)
    dtype, precision, cfg = resolve_dtype(cfg, device)
    records = read_records(cfg.data)   # before the slow steps, so a bad file stops the run at once
    model, base, tokenizer = load_base(cfg, base_path, state, stop)
    if model.config.vocab_size < tokenizer.vocab_size:
        sys.exit(f"error: the base's vocabulary ({model.config.vocab_size}) is smaller than its tokenizer's "
                 f"({tokenizer.name}: {tokenizer.vocab_size}); instruction text needs a model trained on its "
                 f"tokenizer's tokens")
    splits = encode_splits(cfg, records, tokenizer, model.config.block_size)

    # The model: the frozen base with adapters; only the adapters reach the optimizer.
    present = add_adapters(model, cfg, given, state)
    model.to(device)
    optimizer = configure_optimizers(model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                     device.split(":")[0])
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)   # fp16: loss scaling
    torch.manual_seed(cfg.seed + rank)     # but a different dropout stream on each
    layout = {"pp": 1, "dp": world_size, "tp": 1, "fsdp": False}   # DDP only (loop_state records it)
    # The batches come from step_examples(), a pure function of the step: this generator only fills the
    # data slot of the shared RNG record.
    data_generator = torch.Generator().manual_seed(cfg.seed)
    start_step, best_val_loss = 0, float("inf")
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        # A state older than the layout's record was written by DDP too, on one process per RNG state.
        start_step, best_val_loss = restore_loop_state(state, scaler, data_generator, rank, device, layout,
                                                       cfg.seed + rank, {**layout, "dp": len(state["rng"])})
        print0(f"resuming {state_path} at step {start_step}")
    # Laid out for training as pre-training lays out a model (runtime.DataParallel): DDP over the adapters (Li et
    # al. 2020), every process holding the whole model and training on its share of each step's records; backward
    # averages the adapters' gradients (the frozen weights have none). Records pad to a different length in every
    # micro-batch. torch.compile follows that with one graph of symbolic length for the plain loss, but the chunked
    # loss's Python loop over the rows fixes the length into the graph, so it would compile again for every new
    # length: compiled, the plain path is the default.
    compile_model = should_compile(cfg.compile, device)
    loss_chunk = cfg.loss_chunk if cfg.loss_chunk is not None else \
        (0 if device.startswith("cuda") or compile_model else 1024)
    parallel = DataParallel(model, device, dtype, local_rank, world_size, fsdp=False, compile=compile_model,
                            accum=cfg.gradient_accumulation_steps, loss_chunk=loss_chunk)
    n_params, n_adapter = model.num_params(), sum(p.numel() for p in adapter_tensors(model).values())
    examples_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    print0(f"model: {base['path']} ({n_params - n_adapter:,} parameters, frozen) + LoRA rank {cfg.lora_rank} on "
           f"{','.join(present)}: {n_adapter:,} trainable parameters ({100 * n_adapter / n_params:.2f}%)")
    print0(f"{world_size} x {device}, {precision}{', compiled' if compile_model else ''} | {examples_per_step} "
           f"records per step | loss on {'response tokens only' if cfg.mask_input else 'every token'}")

    def evaluate_now() -> dict[str, float]:   # fixed examples: each split's first eval_iters batches (all if fewer)
        return evaluate(model, parallel.eval_loss, lambda split: eval_example_batches(
            splits[split][:cfg.eval_iters * cfg.batch_size], cfg, rank, world_size, device), device, dtype)
    if is_master:
        prepare_out_dir(cfg.out_dir, start_step)
        # A process killed between saving the state of an evaluation and writing its adapter.pt left the
        # adapter one evaluation behind, and this run skips that evaluation: write it now.
        if start_step > 0 and state.get("val_loss") is not None:
            save_adapter(model, lora_settings(cfg), base, start_step, state["val_loss"], adapter_path)
    log = RunLog(cfg, cfg.out_dir, dataclasses.asdict(cfg), is_master)

    def save_state(step: int, best_val_loss: float, val_loss: float | None, is_best: bool) -> None:
        """Save the resumable state before step `step` (every process takes part), with the val loss of the
        evaluation just made at it, if any; then, after an evaluation, the adapter file (is_best plays no part)."""
        state = loop_state(step, best_val_loss, scaler, data_generator, layout)

        def write_state() -> None:   # state.pt alone is what a resumed run reads, adapter tensors included
            save_checkpoint({"tensors": adapter_tensors(model), "optimizer": optimizer.state_dict(), **state,
                             "val_loss": val_loss, "finetune_config": dataclasses.asdict(cfg), "base": base},
                            state_path)
            if val_loss is not None:
                save_adapter(model, lora_settings(cfg), base, step, val_loss, adapter_path)
        save_on_rank0(write_state, stop)

    best_val_loss, timer = train_loop(
        cfg, parallel, optimizer, scaler,
        lambda step: step_micro_batches(splits["train"], step, cfg, rank, world_size, device),
        evaluate_now, save_state, log, stop, start_step, best_val_loss, saved_at_start=start_step > 0,
        flops_of=lambda tokens: finetune_flops(model.config, n_params, tokens, examples_per_step),
        peak=peak_flops(device, cfg.peak_flops, world_size), tokens_before=None, state_path=state_path,
        resume_with=f"`python finetune_lora.py --init_from=resume --out_dir={cfg.out_dir}`")
    if is_master:
        report_and_merge(cfg, model, base, best_val_loss, timer)


def report_and_merge(cfg: FinetuneConfig, model: GPT, base: dict, best_val_loss: float, timer: StepTimer) -> None:
    """The closing line (the adapter's size against its base's), and with --merge the merged checkpoint."""
    adapter_path, merged_path = os.path.join(cfg.out_dir, "adapter.pt"), os.path.join(cfg.out_dir, "ckpt.pt")
    base_size, adapter_size = os.path.getsize(base["path"]), os.path.getsize(adapter_path)
    print(f"done: best val loss {best_val_loss:.4f}; adapter {adapter_path}: {adapter_size / 2**20:.2f} MiB, "
          f"{100 * adapter_size / base_size:.2f}% of the base checkpoint's {base_size / 2**20:.1f} MiB"
          + (f"; {timer.tokens_per_step / timer.step_time:,.0f} tokens/s" if timer.step_time else ""))
    if cfg.merge:
        # The base checkpoint with the merged weights in place of its own (its other entries kept), so every
        # reader of a ckpt.pt reads it.
        merge_lora(model)
        whole = {k: v for k, v in load_checkpoint(base["path"]).items() if k != "pieces"}   # one file, not pieces
        save_checkpoint({**whole, "lora_merged": {"adapter": adapter_path, "base": base},
                         "model": {k: v.cpu() for k, v in model.state_dict().items()}}, merged_path)
        print(f"merged: {merged_path} (the base with the adapter folded in; sample it with "
              f"`python generate.py --out_dir={cfg.out_dir}`)")


if __name__ == "__main__":
    run_main(main)
