"""GPT-2's weights from Hugging Face into our GPT, and the mapping between the two both ways (hf_gpt2.py's
export uses it): GPT2Config <-> GPTConfig, state dicts (four Conv1D weights transposed), the Hub's names or a
directory that transformers' save_pretrained wrote, and the tokenizer such a directory holds.

Our GPT and transformers' GPT2LMHeadModel have the same parameter names (both follow OpenAI's release). The
one difference: OpenAI wrote the four projections as Conv1D, which stores its weight as (C_in, C_out); we
use nn.Linear, which stores (C_out, C_in). Those four weights are transposed on the way in and out. Needs the
optional packages safetensors (both ways) and huggingface_hub (Hub names); see requirements-extra.txt.
"""
import contextlib
import dataclasses
import importlib
import json
import os
import socket
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable

import torch

from checkpoints import load_checkpoint, model_from_checkpoint, save_checkpoint
from model import GPT2_SIZES, SHAPE_FIELDS, GPT, GPTConfig
from tokenization import BPETokenizer, EOT_TOKEN, check_bpe_file, get_tokenizer, load_tokenizer, tokenizer_record

# The weights that OpenAI's Conv1D stores transposed: (C_in, C_out) there, (C_out, C_in) in nn.Linear.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# GPTConfig fields that do not change what the network computes at inference, so any value exports.
RUNTIME_FIELDS = ("dropout", "sdpa", "activation_checkpointing")

# transformers' GPT2Config entries whose values our GPT computes; any other value is refused on import.
HF_FIXED = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"),   # both are GELU's tanh approximation
            "layer_norm_epsilon": (1e-5,), "scale_attn_weights": (True,),
            "scale_attn_by_inverse_layer_idx": (False,), "reorder_and_upcast_attn": (False,),
            "add_cross_attention": (False,), "tie_word_embeddings": (True,)}


def import_optional(module: str, purpose: str):
    """Import an optional package, or stop with one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        sys.exit(f"error: {purpose} needs the package {module.split('.')[0]}; `pip install -r requirements-extra.txt`")


# --- the mapping, both ways: pure functions on configs and state dicts ---

def is_hf_source(init_from: str) -> bool:
    """True for a GPT-2 name on the Hugging Face Hub or a directory holding a transformers config.json."""
    return init_from in GPT2_SIZES or os.path.isfile(os.path.join(init_from, "config.json"))


def check_hf_source(init_from: str, other_choices: tuple[str, ...] = ()) -> None:
    """Stop with one line unless --init_from is one of other_choices, a GPT-2 name or a Hugging Face directory."""
    if init_from not in other_choices and not is_hf_source(init_from):
        sys.exit(f"error: --init_from={init_from} is not {', '.join([*other_choices, *GPT2_SIZES])} or a "
                 f"directory holding a Hugging Face config.json")


def gpt_config_from_hf(hf_config: dict, source: str, **overrides) -> GPTConfig:
    """Our GPTConfig for a transformers GPT-2 config.json, or a one-line exit naming the first entry our GPT
    cannot compute. overrides set fields that change no shape (dropout, sdpa, sparse_topk, ...)."""
    if hf_config.get("model_type") != "gpt2":
        sys.exit(f"error: {source} holds a {hf_config.get('model_type')!r} model; only GPT-2 (model_type "
                 f"'gpt2') loads into this GPT")
    for key, allowed in HF_FIXED.items():
        if (value := hf_config.get(key, allowed[0])) not in allowed:
            sys.exit(f"error: {source}: {key}={value!r} is not supported (this GPT computes {key}={allowed[0]!r})")
    if hf_config.get("n_inner") not in (None, 4 * hf_config["n_embd"]):
        sys.exit(f"error: {source}: n_inner={hf_config['n_inner']} is not supported (the MLP is 4 * n_embd wide)")
    return GPTConfig(n_layer=hf_config["n_layer"], n_head=hf_config["n_head"], n_embd=hf_config["n_embd"],
                     block_size=hf_config["n_positions"], vocab_size=hf_config["vocab_size"], bias=True,
                     tie_embeddings=True, **overrides)


def our_name(hf_key: str) -> str | None:
    """Our GPT's parameter name for a GPT2LMHeadModel's (or GPT2Model's, whose keys lack 'transformer.') state
    dict key; None for the causal-mask buffers of older transformers versions, which are not weights."""
    name = hf_key if hf_key.startswith(("transformer.", "lm_head.")) else "transformer." + hf_key
    return None if name.endswith((".attn.bias", ".attn.masked_bias")) else name


def hf_config_from_gpt(config: GPTConfig) -> dict:
    """transformers' GPT-2 config.json for our GPTConfig, or a one-line exit naming the first field GPT-2's
    class cannot express. A field this exporter does not know (a variant added to GPTConfig later: ALiBi,
    top-k attention, ReZero, ...) exports only at its default value, which is plain GPT-2."""
    if not config.bias:
        sys.exit("error: cannot export bias=False: GPT-2's class always has biases in its Linear and LayerNorm layers")
    if not config.tie_embeddings:
        sys.exit("error: cannot export tie_embeddings=False: GPT-2's class ties the LM head to the token embedding")
    known = {"n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "tie_embeddings", *RUNTIME_FIELDS}
    for f in dataclasses.fields(GPTConfig):
        if f.name not in known and getattr(config, f.name) != f.default:
            sys.exit(f"error: cannot export {f.name}={getattr(config, f.name)!r}: GPT-2's class has no "
                     f"counterpart (only {f.name}={f.default!r} exports)")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
            "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5, "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout, "initializer_range": 0.02, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True, "bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN, "torch_dtype": "float32"}


def hf_generation_config_from_gpt(config: GPTConfig, eot_token: int = EOT_TOKEN) -> dict:
    """transformers' generation_config.json for our GPTConfig: generation stops at the context window
    (max_length counts the prompt too), and on GPT-2's vocabulary <|endoftext|> ends and pads a sample.
    Without max_length, transformers 5's text-generation pipeline asks for 256 new tokens (its
    _default_generation_config), and positions past n_positions index outside the position embedding
    (IndexError); a model's own generation config takes precedence over the pipeline's defaults."""
    generation = {"max_length": config.block_size}
    if config.vocab_size > eot_token:     # a smaller vocabulary has no such token to end or pad with
        generation.update(bos_token_id=eot_token, eos_token_id=eot_token, pad_token_id=eot_token)
    return generation


def hf_state_dict_from_gpt(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict (as save_pretrained writes it) from ours: Conv1D weights transposed,
    contiguous and in fp32; the tied lm_head.weight left out, since transformers re-ties it on load."""
    return {name: (tensor.t() if name.endswith(CONV1D_SUFFIXES) else tensor).float().contiguous()
            for name, tensor in state.items() if name != "lm_head.weight"}


# --- side effects: files in and out ---

def go_offline_if_hub_unreachable(timeout_s: float = 10.0) -> str | None:
    """Set HF_HUB_OFFLINE=1 when the Hugging Face Hub cannot be reached, and return its address (None when it
    can, or when this cannot be told). Offline, huggingface_hub and datasets read their cache at once, or fail
    at once, instead of retrying each request for ~25 s (huggingface_hub's backoff: 1 + 2 + 4 + 8 + 8 s).

    The probe is one TCP connection to the endpoint (HF_ENDPOINT, default huggingface.co), given timeout_s
    in all, DNS included, and half of it per address, so that a broken IPv6 route still leaves time for
    IPv4; online it costs one round trip, and a refused connection or a failed lookup returns at once.
    Nothing is probed when the user set HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE) either
    way, or when a proxy carries the traffic, which a direct connection cannot stand for. Call it before
    huggingface_hub or datasets is imported: both read the variable once, at import."""
    if any(name in os.environ for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = urllib.parse.urlsplit(endpoint)
    proxies = urllib.request.getproxies()
    if (url.scheme in proxies or "all" in proxies) and not urllib.request.proxy_bypass(url.hostname or ""):
        return None
    reached = threading.Event()

    def connect() -> None:
        with contextlib.suppress(OSError):     # no route, no name server, refused, timed out
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=timeout_s / 2).close()
            reached.set()

    # In a thread, because a name lookup has no timeout of its own (a silent DNS server takes ~10 s or more).
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout_s)
    if reached.is_set():
        return None
    os.environ["HF_HUB_OFFLINE"] = "1"
    return endpoint


def resolve_hf_dir(source: str) -> str:
    """A local directory with the model's files: source itself, or the Hub download of a GPT-2 name."""
    if os.path.isdir(source):
        return source
    hub = import_optional("huggingface_hub", f"--init_from={source}")
    try:
        return hub.snapshot_download(repo_id=f"openai-community/{source}",
                                     allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:
        sys.exit(f"error: cannot download {source} from the Hugging Face Hub ({type(e).__name__}); check the "
                 f"network, or give --init_from a local directory that save_pretrained wrote")


def open_hf_gpt2(source: str, **overrides) -> tuple[GPTConfig, Callable[[str], torch.Tensor]]:
    """The GPTConfig of a transformers GPT-2 (a Hub name: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a local
    directory with config.json and model.safetensors or pytorch_model.bin) and a function that reads one of
    its weights by our name, in our layout (Conv1D weights transposed), from the file as it is asked for:
    nothing is loaded whole. Missing weights and wrong shapes are refused first, from the file's index.
    overrides set fields that change no shape (dropout, sdpa, sparse_topk, ...)."""
    directory = resolve_hf_dir(source)
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        config = gpt_config_from_hf(json.load(f), source, **overrides)
    safetensors_path = os.path.join(directory, "model.safetensors")
    if os.path.isfile(safetensors_path):
        hf_file = import_optional("safetensors", "reading model.safetensors").safe_open(safetensors_path, "pt")
        keys, read = list(hf_file.keys()), hf_file.get_tensor
        shape_of = lambda key: tuple(hf_file.get_slice(key).get_shape())   # noqa: E731
    elif os.path.isfile(os.path.join(directory, "pytorch_model.bin")):
        hf_state = torch.load(os.path.join(directory, "pytorch_model.bin"), map_location="cpu", weights_only=True,
                              mmap=True)
        keys, read, shape_of = list(hf_state), hf_state.__getitem__, lambda key: tuple(hf_state[key].shape)
    else:
        sys.exit(f"error: {source} has no model.safetensors (or pytorch_model.bin)")
    hf_keys = {our_name(key): key for key in keys if our_name(key) is not None}
    hf_keys.setdefault("lm_head.weight", hf_keys.get("transformer.wte.weight"))   # tied, as in GPT-2
    with torch.device("meta"):
        expected = GPT(config).state_dict()
    if missing := sorted(name for name in expected if hf_keys.get(name) is None):
        sys.exit(f"error: {source} lacks {len(missing)} GPT-2 weights, e.g. {missing[0]}")
    shapes = {name: shape_of(hf_keys[name])[::-1 if name.endswith(CONV1D_SUFFIXES) else 1] for name in expected}
    if wrong := [name for name in expected if shapes[name] != tuple(expected[name].shape)]:
        sys.exit(f"error: {source}: {wrong[0]} has shape {shapes[wrong[0]]}, config.json implies "
                 f"{tuple(expected[wrong[0]].shape)}")

    def weight(name: str) -> torch.Tensor:
        t = read(hf_keys[name])
        return t.t() if name.endswith(CONV1D_SUFFIXES) else t
    return config, weight


def load_hf_gpt2(source: str, **overrides) -> GPT:
    """Our GPT (on the CPU) with the weights of a transformers GPT-2 (open_hf_gpt2)."""
    config, weight = open_hf_gpt2(source, **overrides)
    model = GPT(config)
    model.load_state_dict({name: weight(name) for name in model.state_dict()})
    return model


def init_from_hf(source: str, flags: GPTConfig, given: set[str]) -> tuple[GPTConfig, Callable[[str], torch.Tensor]]:
    """open_hf_gpt2 for the training scripts' --init_from: every field that changes no shape comes from the
    flags (dropout, sdpa, activation_checkpointing, and the variants sparse_topk and realformer, which run
    on GPT-2's weights unchanged); a smaller --block_size crops the position embedding (as nanoGPT's
    crop_block_size does); any other shape flag that disagrees with the weights is refused, all at once."""
    pretrained, weight = open_hf_gpt2(source, **{f.name: getattr(flags, f.name) for f in dataclasses.fields(GPTConfig)
                                                 if f.name not in SHAPE_FIELDS})
    if differ := [f"{name} (weights {getattr(pretrained, name)}, flag {getattr(flags, name)})"
                  for name in SHAPE_FIELDS if name in given and getattr(flags, name) != getattr(pretrained, name)
                  and not (name == "block_size" and flags.block_size < pretrained.block_size)]:
        sys.exit(f"error: --init_from={source}: the model shape differs in " + ", ".join(differ) + "; drop these flags")
    if "block_size" in given and flags.block_size < pretrained.block_size:
        cropped = dataclasses.replace(pretrained, block_size=flags.block_size)
        return cropped, lambda name: weight(name)[:flags.block_size] if name == "transformer.wpe.weight" \
            else weight(name)
    return pretrained, weight


def hf_tokenizer(source: str):
    """The tokenizer of a Hugging Face GPT-2 source: the tokenizer.json of a directory that this script exported
    from a BPE model (one with tokenizer.json and no vocab.json), else r50k_base, GPT-2's own."""
    path = os.path.join(source, "tokenizer.json")
    if not os.path.isfile(path) or os.path.isfile(os.path.join(source, "vocab.json")):
        return get_tokenizer()
    with open(path, encoding="utf-8") as f:
        file = f.read()
    check_bpe_file(file, path)
    return BPETokenizer(os.path.abspath(path), file)


def load_model(checkpoint_path: str, init_from: str = "") -> tuple[GPT, object]:
    """The model to sample, evaluate or fine-tune (on the CPU, dropout off) and the tokenizer it reads: GPT-2's
    weights when init_from names them (hf_tokenizer), else the checkpoint at checkpoint_path and the tokenizer
    it carries (r50k_base for older checkpoints)."""
    if init_from:
        check_hf_source(init_from)
        return load_hf_gpt2(init_from), hf_tokenizer(init_from)
    checkpoint = load_checkpoint(checkpoint_path, whole=False)   # its tensors read one at a time
    return model_from_checkpoint(checkpoint, checkpoint_path, dropout=0.0), load_tokenizer(checkpoint.get("tokenizer"))


def save_hf_as_checkpoint(source: str, path: str) -> None:
    """GPT-2 weights saved as a checkpoint of ours (model, model_config and tokenizer), for scripts that tie
    their output to a checkpoint file: finetune_lora.py's adapters record their base's path and sha256. The
    folder is created only once the weights have loaded, so a failed download leaves nothing behind."""
    model = load_hf_gpt2(source)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_checkpoint({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                     "hf_source": source, "tokenizer": tokenizer_record(hf_tokenizer(source))}, path)
