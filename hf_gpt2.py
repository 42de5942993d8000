"""Our checkpoints out to Hugging Face transformers, with their tokenizer's files.

    python hf_gpt2.py --checkpoint=out/ckpt.pt --out=hf-out     # our checkpoint -> a Hugging Face directory
    python train.py --init_from=gpt2                            # OpenAI's GPT-2 124M -> our GPT (any script)

Out (this script): config.json, generation_config.json, model.safetensors and the tokenizer's files (GPT-2's
vocab.json and merges.txt for r50k_base, the checkpoint's tokenizer.json for a BPE of prepare.py's), so that
GPT2LMHeadModel.from_pretrained(dir), AutoTokenizer.from_pretrained(dir) and pipeline("text-generation", dir)
load the model. In (every script's --init_from): gpt2_weights.py, whose mapping of configs and state dicts
this export uses too.
"""
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import torch

from checkpoints import checkpoint_weights, load_checkpoint
from flags import parse_args
from gpt2_weights import hf_config_from_gpt, hf_generation_config_from_gpt, hf_state_dict_from_gpt, import_optional
from model import GPTConfig, arg
from tokenization import EOT_TEXT, EOT_TOKEN, bytes_to_unicode, get_tokenizer, load_tokenizer


@dataclass
class ExportConfig:
    checkpoint: str = arg("out/ckpt.pt", "checkpoint of ours to export (train.py's, or finetune_lora.py's merged one)")
    out: str = arg("hf-out", "new directory for the Hugging Face files (an existing one is not overwritten)")


# --- the tokenizer files: GPT-2's BPE written the way OpenAI and transformers store it ---

def bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """token's bytes merged by byte-pair encoding using only merges ranked below max_rank: repeatedly join
    the adjacent pair with the lowest rank (Sennrich et al. 2016). For a token of rank r and max_rank=r this
    stops one merge short, at the two parts whose merge created the token."""
    parts = [bytes([b]) for b in token]
    while True:   # (rank, position) of the best pair; a pair that no allowed merge joins ranks max_rank
        rank, i = min(((ranks.get(parts[i] + parts[i + 1], max_rank), i) for i in range(len(parts) - 1)),
                      default=(max_rank, 0))
        if rank >= max_rank:
            return parts
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def gpt2_tokenizer_files(tokenizer) -> tuple[dict[str, int], list[str]]:
    """(vocab.json's token -> id map, merges.txt's lines in rank order) for a tiktoken BPE encoding."""
    to_char = bytes_to_unicode()
    as_text = lambda b: "".join(to_char[x] for x in b)   # noqa: E731
    n_ranked = tokenizer.n_vocab - len(tokenizer.special_tokens_set)
    token_bytes = [tokenizer.decode_single_token_bytes(i) for i in range(n_ranked)]
    ranks = {b: i for i, b in enumerate(token_bytes)}
    vocab = {as_text(b): i for i, b in enumerate(token_bytes)}
    vocab.update({name: tokenizer.encode_single_token(name) for name in tokenizer.special_tokens_set})
    merges = [" ".join(map(as_text, bpe_parts(ranks, token, rank)))   # the two halves this rank's merge joined
              for rank, token in enumerate(token_bytes) if len(token) >= 2]
    return vocab, merges


def write_text(folder: str, name: str, text: str | dict) -> None:
    """Write text to the file name in folder; a dict is written as indented JSON."""
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        f.write(json.dumps(text, indent=2) + "\n" if isinstance(text, dict) else text)


def export_hf(state: dict[str, torch.Tensor], config: GPTConfig, out: str, tokenizer=None) -> None:
    """Write a Hugging Face GPT-2 directory at out, with the tokenizer's files (tokenizer: a BPE of ours, as
    tokenizer.json; None: r50k_base, as GPT-2's vocab.json and merges.txt when the vocabulary is GPT-2's),
    atomically: the files go into a temporary directory beside it, which is renamed to out once complete, so
    out is either absent or whole. The directory and its files get the modes that os.mkdir and open would give
    them (0777 and 0666 less the umask), not the temporary directory's private 0700 (tempfile.mkdtemp) or
    safetensors' 0600 for model.safetensors."""
    hf_config = hf_config_from_gpt(config)     # refuses unexpressible configs before anything is written
    eot_token = tokenizer.eot_token if tokenizer is not None else EOT_TOKEN
    hf_config.update(bos_token_id=eot_token, eos_token_id=eot_token)
    save_file = import_optional("safetensors.torch", "export").save_file
    if os.path.exists(out):
        sys.exit(f"error: {out} exists; pick another --out (nothing is overwritten)")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".", suffix=".tmp", dir=parent)
    try:
        write_text(tmp, "config.json", hf_config)
        write_text(tmp, "generation_config.json", hf_generation_config_from_gpt(config, eot_token))
        save_file(hf_state_dict_from_gpt(state), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        special = {"model_max_length": config.block_size, "bos_token": EOT_TEXT, "eos_token": EOT_TEXT,
                   "unk_token": EOT_TEXT}
        if tokenizer is not None:   # our BPE: transformers' generic fast tokenizer runs its tokenizer.json as is
            write_text(tmp, "tokenizer.json", tokenizer.file)
            write_text(tmp, "tokenizer_config.json",
                       {"tokenizer_class": "PreTrainedTokenizerFast", **special, "pad_token": EOT_TEXT})
        elif config.vocab_size >= EOT_TOKEN + 1:   # a model on GPT-2 tokens gets GPT-2's tokenizer
            vocab, merges = gpt2_tokenizer_files(get_tokenizer().encoding)
            write_text(tmp, "vocab.json", json.dumps(vocab, ensure_ascii=False))
            write_text(tmp, "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
            write_text(tmp, "tokenizer_config.json",
                       {"tokenizer_class": "GPT2Tokenizer", **special, "add_prefix_space": False})
        mask = os.umask(0o022)   # the umask: os.umask can only read it by setting another, so set it back at once
        os.umask(mask)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # gone once renamed; a failed export's partial files


def main(argv: list[str] | None = None) -> None:
    (cfg,) = parse_args(ExportConfig, argv=argv)
    checkpoint = load_checkpoint(cfg.checkpoint, whole=False)   # the weights only, not AdamW's state
    config = GPTConfig(**checkpoint["model_config"])
    tokenizer = load_tokenizer(checkpoint["tokenizer"]) if checkpoint.get("tokenizer", {}).get("file") else None
    export_hf(checkpoint_weights(cfg.checkpoint, checkpoint), config, cfg.out, tokenizer)
    files = sorted(os.listdir(cfg.out))
    print(f"wrote {cfg.out}: {', '.join(files)}" + ("" if "tokenizer_config.json" in files else
          f" (no tokenizer files: the vocabulary of {config.vocab_size} is not GPT-2's)"))
    print(f"load it with transformers.GPT2LMHeadModel.from_pretrained({cfg.out!r})")


if __name__ == "__main__":
    main()
