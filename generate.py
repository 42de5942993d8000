"""Sample text from a checkpoint written by train.py, streaming each token as it is produced.

    python generate.py --out_dir=out --prompt="ROMEO:" --max_new_tokens=200
    python generate.py --out_dir=out --prompt_file=prompt.txt --num_samples=3 --top_p=0.95
    python generate.py --lora=out-lora/adapter.pt --instruction="Who speaks this line in Hamlet?" \
        --input="To be, or not to be: that is the question:"          # a LoRA adapter on its base

The text goes to stdout; notes and the speed (tokens/s) go to stderr, so `> sample.txt` keeps only text.
"""
import codecs
import os
import sys
import time
from dataclasses import dataclass

import torch

from flags import flags_given, parse_args
from gpt2_weights import check_hf_source, load_model
from lora import format_prompt, load_base_with_adapter, merge_lora
from model import arg, generate
from processes import autocast, pick_device, sampling_dtype, should_compile


@dataclass
class GenerateConfig:
    out_dir: str = arg("out", "directory holding the checkpoint (ckpt.pt) to sample from")
    prompt: str = arg("", "text the samples continue; empty starts a fresh document (<|endoftext|>)")
    prompt_file: str = arg("", "read the prompt from this file instead of --prompt")
    instruction: str = arg("", "an instruction instead of a prompt: the prompt becomes finetune_lora.py's "
                               "template around it, and the sample is the response")
    input: str = arg("", "context for --instruction (the template's Input section)")
    init_from: str = arg("", "sample GPT-2's weights instead of --out_dir's checkpoint: gpt2, gpt2-medium, "
                             "gpt2-large, gpt2-xl or a Hugging Face directory")
    lora: str = arg("", "adapter file written by finetune_lora.py, applied to its base: the checkpoint it "
                        "records, or --out_dir's if that flag is given")
    num_samples: int = arg(1, "number of samples, one after the other")
    max_new_tokens: int = arg(200, "tokens generated per sample (fewer if it ends with <|endoftext|>)")
    temperature: float = arg(0.8, "divide the logits by this; below 1 is more conservative, 0 is greedy")
    top_k: int | None = arg(200, "sample only among the k most likely tokens (None: all)")
    top_p: float = arg(1.0, "sample only among the most likely tokens whose probability adds up to p (nucleus)")
    stop_at_eot: bool = arg(True, "end a sample when the model writes <|endoftext|>")
    seed: int = arg(1337, "seed of the sampling generator: the same seed gives the same text")
    device: str = arg("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: str = arg("auto", "auto: bfloat16 on GPUs that compute it natively (compute capability 8.0+), "
                             "float16 on older GPUs, float32 on CPU (one token at a time, bfloat16 is no faster there)",
                     choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool | None = arg(None, "torch.compile each sampling step (default: on for CUDA, where it fuses "
                                     "the step's many small kernels; off elsewhere, where it does not pay)")


def check_generate_config(cfg: GenerateConfig) -> None:
    if cfg.num_samples < 1 or cfg.max_new_tokens < 1:
        sys.exit("error: --num_samples and --max_new_tokens must be >= 1")
    if cfg.temperature < 0:
        sys.exit(f"error: --temperature={cfg.temperature} must be >= 0")
    if cfg.top_k is not None and cfg.top_k < 1:
        sys.exit(f"error: --top_k={cfg.top_k} must be >= 1 (or None for no limit)")
    if not 0 < cfg.top_p <= 1:
        sys.exit(f"error: --top_p={cfg.top_p} must be in (0, 1]; --temperature=0 decodes greedily")
    if cfg.instruction and (cfg.prompt or cfg.prompt_file):
        sys.exit("error: give either --instruction (with --input) or --prompt/--prompt_file, not both")
    if cfg.init_from and cfg.lora:
        sys.exit("error: an adapter carries its own base; give --lora or --init_from, not both")
    if cfg.init_from:
        check_hf_source(cfg.init_from)
    if cfg.input and not cfg.instruction:
        sys.exit("error: --input is the context of an instruction; give --instruction too")


def read_prompt(cfg: GenerateConfig) -> str:
    if cfg.instruction:
        return format_prompt(cfg.instruction, cfg.input)
    if not cfg.prompt_file:
        return cfg.prompt
    try:
        with open(cfg.prompt_file, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"error: cannot read --prompt_file={cfg.prompt_file} ({e.__class__.__name__}: {e})")


def main(argv: list[str] | None = None) -> None:
    (cfg,) = parse_args(GenerateConfig, argv=argv)
    check_generate_config(cfg)
    device = pick_device(cfg.device)
    dtype, compile_steps = sampling_dtype(cfg.dtype, device), should_compile(cfg.compile, device)
    prompt_text = read_prompt(cfg)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.lora:   # the adapter on its base, then folded in: sampling then costs what the base model costs
        model, tokenizer = load_base_with_adapter(cfg.lora, ckpt_path if "out_dir" in flags_given(argv) else None)
        merge_lora(model)
    else:
        model, tokenizer = load_model(ckpt_path, cfg.init_from)
    model.to(device).eval()

    prompt_ids = tokenizer.encode(prompt_text) or [tokenizer.eot_token]
    if max(prompt_ids) >= model.config.vocab_size:
        sys.exit(f"error: the prompt holds token ids up to {max(prompt_ids)}, but the model's vocabulary has "
                 f"only {model.config.vocab_size}; use a prompt in the model's vocabulary")
    block_size = model.config.block_size
    if len(prompt_ids) > block_size:
        print(f"note: the prompt has {len(prompt_ids)} tokens, more than the context of {block_size}; "
              f"the model sees its last {block_size}", file=sys.stderr)
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)   # (1, T0)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    stop_token = tokenizer.eot_token if cfg.stop_at_eot else None

    new_tokens, seconds = 0, 0.0
    for sample in range(cfg.num_samples):
        if sample > 0:
            print("\n" + "-" * 40)
        print(prompt_text, end="", flush=True)
        # Tokens are byte sequences: a character may span two tokens, so decode the bytes incrementally.
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        start = time.perf_counter()
        with autocast(device, dtype):
            for token in generate(model, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                  stop_token, generator, vocab_limit=tokenizer.vocab_size, compile=compile_steps):
                token_id = token.item()
                new_tokens += 1
                if token_id == tokenizer.eot_token:
                    break
                print(utf8.decode(tokenizer.decode_bytes([token_id])), end="", flush=True)
        print(utf8.decode(b"", final=True))
        seconds += time.perf_counter() - start
    print(f"{new_tokens} tokens in {seconds:.2f} s: {new_tokens / seconds:.1f} tokens/s "
          f"({model.num_params():,} parameters, {device})", file=sys.stderr)


if __name__ == "__main__":
    main()
