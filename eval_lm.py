"""Evaluate a checkpoint: lm-evaluation-harness tasks, or perplexity on a token file or a text file.

    python eval_lm.py --out_dir=out --tasks=hellaswag,lambada_openai,arc_easy --limit=200
    python eval_lm.py --init_from=gpt2 --tasks=hellaswag                       # OpenAI's GPT-2 124M
    python eval_lm.py --tasks=my_task --include_path=my_tasks/                # a task of your own (YAML)
    python eval_lm.py --out_dir=out --perplexity=data/shakespeare/val.bin      # or any .txt file

Tasks run through the harness's Python API (EleutherAI's lm-evaluation-harness, `pip install lm-eval`) with
GPTAdapter, our model behind the harness's LM interface: it scores batches of (context, continuation)
pairs with our GPT directly. The results go to a JSON file named after the tasks or the file (default_output)
and a short table on stdout. (The file is not called evaluate.py: it would shadow Hugging Face's `evaluate`
package, which some harness tasks import.)
"""
import codecs
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from checkpoints import write_atomically
from flags import parse_args
from gpt2_weights import go_offline_if_hub_unreachable, load_model
from model import GPT, GPT2_SIZES, arg, generate
from processes import autocast, choose_dtype, pick_device


@dataclass
class EvalConfig:
    out_dir: str = arg("out", "directory holding the checkpoint (ckpt.pt) to evaluate")
    init_from: str = arg("", "evaluate GPT-2's weights instead: gpt2, gpt2-medium, gpt2-large, gpt2-xl or a "
                             "Hugging Face directory (one hf_gpt2.py exported, too)")
    tasks: str = arg("", "comma-separated lm-evaluation-harness tasks, e.g. hellaswag,lambada_openai,arc_easy")
    num_fewshot: int | None = arg(None, "solved examples put before each question (None: the task's default)")
    limit: int | None = arg(None, "evaluate only the first N examples of each task, or the first N windows "
                                  "(block_size predictions each) of the --perplexity file (None: all)")
    include_path: str = arg("", "directory of extra task YAML files for the harness (tasks of your own)")
    perplexity: str = arg("", "instead of tasks: the perplexity on a token file prepare.py wrote (.bin) or on "
                              "a text file")
    batch_size: int = arg(16, "sequences per forward pass")
    output: str = arg("", "JSON file for the results (default: named after the tasks or the perplexity "
                          "file, e.g. eval-hellaswag.json, in --out_dir, or with --init_from in the current directory)")
    device: str = arg("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: str = arg("auto", "auto: as in train.py (on a CPU bfloat16 where a probe at start finds its matmuls "
                             "at least 1.5x as fast as float32's)", choices=("auto", "float32", "bfloat16", "float16"))


# --- the math: log-likelihoods of continuations, and of long token streams ---

def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, the way the harness splits them (TemplateLM._encode_pair):
    spaces at the end of the context move to the continuation, and the whole text is encoded at once, so the
    continuation's first token is the one the model would write (' Paris', not ' ' then 'Paris'). An empty
    context becomes <|endoftext|>, the token every document starts after."""
    if not context:
        return [tokenizer.eot_token], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context.rstrip()))
    return whole[:n_context], whole[n_context:]


@torch.no_grad()
def score_continuations(model: GPT, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (log p(continuation | context), True if greedy decoding
    would write the continuation), all pairs in one right-padded batch. A sequence longer than the context
    window keeps its last block_size + 1 tokens (and a continuation longer than that, its last block_size
    tokens). Only the continuation's positions go through the LM head, so a batch never holds (B, T, V)
    logits. Reference: log_softmax(model(ids)) summed at those positions."""
    block_size = model.config.block_size
    rows = [(context + continuation)[-(block_size + 1):] for context, continuation in pairs]
    counts = [min(len(continuation), len(row) - 1) for row, (_, continuation) in zip(rows, pairs)]
    device = model.transformer.wte.weight.device
    # Built on the host and copied once each: a copy per row would wait for the device every time.
    idx = pad_sequence([torch.tensor(row[:-1], dtype=torch.long) for row in rows], batch_first=True)   # (B, T), padded
    targets = torch.tensor([t for (_, c), n in zip(pairs, counts) for t in c[-n:]]).to(device)   # (sum of n,)
    hidden = model.hidden_states(idx.to(device))                             # (B, T, C)
    log_p, greedy = [], []
    for i, (row, n, row_targets) in enumerate(zip(rows, counts, targets.split(counts))):
        logits = model.lm_head(hidden[i, len(row) - 1 - n:len(row) - 1]).float()   # (n, V): predict the continuation
        log_p.append(F.log_softmax(logits, dim=-1).gather(1, row_targets[:, None]).sum())
        greedy.append((logits.argmax(dim=-1) == row_targets).all())
    return list(zip(torch.stack(log_p).tolist(), torch.stack(greedy).tolist()))   # one wait for the device


def rolling_windows(n_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """(start, end) slices of a token stream that predict every token but the first exactly once: window
    tokens[start:end] feeds end - start - 1 <= block_size inputs and predicts tokens[start + 1:end].
    Windows overlap by one token, so each starts with the context of its first prediction."""
    return [(start, min(start + block_size + 1, n_tokens)) for start in range(0, n_tokens - 1, block_size)]


@torch.no_grad()
def stream_log_likelihood(model: GPT, tokens: np.ndarray, batch_size: int) -> float:
    """Sum of log p(token | the tokens before it in its window) over tokens[1:], window by window
    (rolling_windows). With tokens = [<|endoftext|>] + a document, this is the document's log-likelihood,
    the harness's loglikelihood_rolling."""
    windows = rolling_windows(len(tokens), model.config.block_size)
    total = 0.0
    for first in range(0, len(windows), batch_size):
        pairs = [(tokens[start:start + 1].tolist(), tokens[start + 1:end].tolist())
                 for start, end in windows[first:first + batch_size]]
        total += sum(log_p for log_p, _ in score_continuations(model, pairs))
    return total


def default_output(cfg: EvalConfig) -> str:
    """The results file of a run without --output, named after what the run evaluates, so that runs on other
    tasks, shot counts, limits or files do not overwrite each other: out_dir/eval-hellaswag+arc_easy-5shot.json,
    out_dir/eval-perplexity-val.bin.json; with --init_from, ./eval-gpt2-hellaswag.json (the model named too)."""
    if cfg.perplexity:
        name = "perplexity-" + os.path.basename(os.path.normpath(cfg.perplexity))
    else:
        tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
        name = "+".join(tasks)
        if len(name) > 80:   # a long list: the first task, the count, and a hash of the whole list
            digest = hashlib.sha256(",".join(tasks).encode()).hexdigest()[:8]
            name = f"{tasks[0]}+{len(tasks) - 1}_more-{digest}"
        name += f"-{cfg.num_fewshot}shot" if cfg.num_fewshot is not None else ""
    name += f"-limit{cfg.limit}" if cfg.limit is not None else ""
    if cfg.init_from:
        name = os.path.basename(os.path.normpath(cfg.init_from)) + "-" + name
    name = re.sub(r"[^\w.+-]", "_", name)     # a file name, whatever the task or model is called
    return os.path.join("." if cfg.init_from else cfg.out_dir, f"eval-{name}.json")


# --- the harness adapter ---

def make_adapter_class():
    """GPTAdapter, defined once lm_eval is importable (the package is optional)."""
    try:
        from lm_eval.api.model import LM
    except ModuleNotFoundError:
        sys.exit("error: --tasks needs lm-evaluation-harness; `pip install -r requirements-extra.txt`")

    class GPTAdapter(LM):
        """Our GPT behind the harness's LM interface: its three request types, answered with our model."""

        def __init__(self, model: GPT, tokenizer, batch_size: int, device: str, dtype: torch.dtype):
            super().__init__()
            self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
            self.device_name, self.dtype = device, dtype

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            """(log p(continuation | context), is greedy) per request. Pairs are scored longest first, so
            the sequences in a batch have similar lengths and little padding."""
            pairs = [encode_pair(self.tokenizer, *request.args) for request in requests]
            order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
            scores = []
            with autocast(self.device_name, self.dtype):
                for first in range(0, len(order), self.batch_size):
                    scores += score_continuations(self.model, [pairs[i] for i in order[first:first + self.batch_size]])
            return [score for _, score in sorted(zip(order, scores))]   # back in the requests' order

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            """Log-likelihood of whole documents (perplexity tasks such as wikitext), window by window."""
            documents = [np.array([self.tokenizer.eot_token] + self.tokenizer.encode(text)) for (text,) in
                         (request.args for request in requests)]
            with autocast(self.device_name, self.dtype):
                return [stream_log_likelihood(self.model, tokens, self.batch_size) for tokens in documents]

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            """Greedy continuation of each context (sampled if the task asks for do_sample), stopped at the
            first of the task's stop sequences or after max_gen_toks tokens."""
            outputs = []
            for context, gen_kwargs in (request.args for request in requests):
                stops = gen_kwargs.get("until", [])
                stops = [stops] if isinstance(stops, str) else list(stops)
                temperature = gen_kwargs.get("temperature", 0.0) if gen_kwargs.get("do_sample") else 0.0
                eot = self.tokenizer.eot_token
                prompt = torch.tensor([self.tokenizer.encode(context) or [eot]], device=self.device_name)
                utf8, text = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
                with autocast(self.device_name, self.dtype):
                    for token in generate(self.model, prompt, gen_kwargs.get("max_gen_toks", 256), temperature,
                                          stop_token=eot):
                        if token.item() == eot:
                            break
                        text += utf8.decode(self.tokenizer.decode_bytes([token.item()]))
                        if cuts := [text.index(stop) for stop in stops if stop and stop in text]:
                            text = text[:min(cuts)]   # cut before the first stop sequence
                            break
                outputs.append(text)
            return outputs

    return GPTAdapter


# --- side effects: the files, the harness ---

def read_tokens(path: str, tokenizer) -> np.ndarray:
    """A token stream: a prepare.py .bin file (uint16 ids) as it is, a text file encoded, both starting after
    an <|endoftext|> (so the first real token is predicted too, as in training's concatenated documents)."""
    if not os.path.isfile(path):
        sys.exit(f"error: --perplexity={path} not found; give a .bin file that prepare.py wrote or a text file")
    if path.endswith(".bin"):
        tokens = np.fromfile(path, dtype=np.uint16).astype(np.int64)
    else:
        try:
            with open(path, encoding="utf-8") as f:
                tokens = np.array(tokenizer.encode(f.read()), dtype=np.int64)
        except UnicodeDecodeError:
            sys.exit(f"error: {path} is not UTF-8 text (a token file must end in .bin)")
    return np.concatenate([[tokenizer.eot_token], tokens])


def run_tasks(cfg: EvalConfig, adapter, hub_unreachable: str | None) -> dict:
    """The harness's results dict for cfg.tasks, evaluated through adapter (a GPTAdapter). A task whose data
    cannot be fetched stops with one line; hub_unreachable is the Hub's address when a probe found it unreachable."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    if cfg.include_path and not os.path.isdir(cfg.include_path):
        sys.exit(f"error: --include_path={cfg.include_path} is not a directory of task YAML files")
    task_manager = TaskManager(include_path=cfg.include_path or None)
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    if unknown := [t for t in tasks if t not in task_manager.all_tasks]:
        sys.exit(f"error: lm-evaluation-harness has no task {unknown[0]!r}; `lm_eval ls tasks` lists them "
                 f"(or add a YAML file to --include_path)")
    try:
        return lm_eval.simple_evaluate(model=adapter, tasks=tasks, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                       task_manager=task_manager, log_samples=False)
    except ConnectionError as e:   # datasets' "Couldn't reach '<id>' on the Hub", offline mode's refusal
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        cause = f"the Hugging Face Hub ({hub_unreachable}) is unreachable and a task's data is not in the local " \
            f"cache ({reason}); run once with network access" if hub_unreachable else \
            f"a task's data could not be loaded ({reason}); check the network (and HF_HUB_OFFLINE)"
        sys.exit(f"error: --tasks={cfg.tasks}: {cause}, or evaluate a local task (--include_path)")


def main(argv: list[str] | None = None) -> None:
    (cfg,) = parse_args(EvalConfig, argv=argv)
    if bool(cfg.tasks) == bool(cfg.perplexity):
        sys.exit("error: give --tasks=... (lm-evaluation-harness) or --perplexity=FILE, one of the two")
    if cfg.batch_size < 1 or (cfg.limit is not None and cfg.limit < 1):
        sys.exit("error: --batch_size and --limit must be >= 1")
    # Without a network, fail (or read the cache) at once instead of after ~25 s of retries per request;
    # this has to come before huggingface_hub and datasets are imported.
    hub_unreachable = go_offline_if_hub_unreachable() if cfg.tasks or cfg.init_from in GPT2_SIZES else None
    device = pick_device(cfg.device)
    dtype = choose_dtype(cfg.dtype, device)[0]
    model, tokenizer = load_model(os.path.join(cfg.out_dir, "ckpt.pt"), cfg.init_from)
    model.to(device).eval()
    output = cfg.output or default_output(cfg)
    source = cfg.init_from or os.path.join(cfg.out_dir, "ckpt.pt")

    if cfg.perplexity:
        tokens = read_tokens(cfg.perplexity, tokenizer)
        if cfg.limit is not None:   # the first --limit windows: block_size predictions each
            tokens = tokens[:cfg.limit * model.config.block_size + 1]
        if tokens.max() >= model.config.vocab_size:
            sys.exit(f"error: {cfg.perplexity} holds token ids up to {tokens.max()}, beyond the model's "
                     f"vocabulary of {model.config.vocab_size}")
        with autocast(device, dtype):
            nll = -stream_log_likelihood(model, tokens, cfg.batch_size) / (len(tokens) - 1)   # nats per token
        results = {"model": source, "file": cfg.perplexity, "tokens": len(tokens) - 1, "loss": nll,
                   "perplexity": math.exp(nll)}
        print(f"{cfg.perplexity}: {len(tokens) - 1:,} tokens | loss {nll:.4f} nats/token | "
              f"perplexity {math.exp(nll):.2f}")
    else:
        adapter = make_adapter_class()(model, tokenizer, cfg.batch_size, device, dtype)   # one line if no lm_eval
        evaluated = run_tasks(cfg, adapter, hub_unreachable)
        from lm_eval.utils import handle_non_serializable, make_table
        results = json.loads(json.dumps({"model": source, **evaluated}, default=handle_non_serializable))
        print(make_table(evaluated))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_atomically(output, lambda f: f.write(json.dumps(results, indent=2).encode() + b"\n"))
    print(f"results: {output}")


if __name__ == "__main__":
    main()
