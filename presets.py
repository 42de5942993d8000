"""Named models for --preset: GPT-2's sizes, GPT-3's Table 2.1 and GPT-X 1B, each with the training recipe its
source publishes, and how a preset fills in a run's configs (apply_preset). Flags given on the command line
win over a preset's values."""
import dataclasses
import sys

from model import GPT2_SIZES, GPTConfig


def gpt3_preset(n_layer: int, n_embd: int, n_head: int, batch_tokens: int, learning_rate: float) -> dict:
    """A row of GPT-3's Table 2.1 (Brown et al. 2020) with the recipe of its appendix B: AdamW with
    betas (0.9, 0.95), weight decay 0.1, gradients clipped at 1.0, linear warmup over 375M tokens, cosine
    decay to 10% of the peak over 260B tokens, 300B tokens in all. The batch is batch_tokens // 2048
    sequences: micro-batches of 8 accumulated on one process (more processes multiply it). Not here: the
    paper ramps the batch size up over the first 4-12B tokens and alternates dense attention with locally
    banded sparse attention (Child et al. 2019); our blocks are all dense."""
    micro_batch, sequences = 8, batch_tokens // 2048
    return {"model": dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=2048, vocab_size=50257),
            "train": dict(batch_size=micro_batch, gradient_accumulation_steps=sequences // micro_batch,
                          learning_rate=learning_rate, min_lr=learning_rate / 10,
                          warmup_iters=round(375e6 / batch_tokens), lr_decay_iters=round(260e9 / batch_tokens),
                          max_iters=round(300e9 / batch_tokens), beta1=0.9, beta2=0.95, weight_decay=0.1,
                          grad_clip=1.0)}


# Named models for --preset: the GPTConfig fields they set ("model") and the recipe's TrainConfig fields
# where the source gives them ("train"). Flags given on the command line win (apply_preset).
PRESETS = {
    # GPT-2 (Radford et al. 2019, section 2.3): batches of 512 sequences of 1024 tokens. The learning rate
    # was tuned per size and not published, so the run's own stays.
    **{name: {"model": {f: getattr(config, f) for f in ("n_layer", "n_head", "n_embd", "block_size")},
              "train": dict(batch_size=8, gradient_accumulation_steps=64)}
       for name, config in GPT2_SIZES.items()},
    # GPT-3 (Brown et al. 2020, Table 2.1): n_layer, d_model, heads, batch size in tokens, learning rate.
    "gpt3-small": gpt3_preset(12, 768, 12, 2**19, 6.0e-4),        # 125M, batch 0.5M tokens
    "gpt3-medium": gpt3_preset(24, 1024, 16, 2**19, 3.0e-4),      # 350M
    "gpt3-large": gpt3_preset(24, 1536, 16, 2**19, 2.5e-4),       # 760M
    # The table gives XL 24 heads of 128 channels, which do not fit d_model 2048: 16 heads of 128 do.
    "gpt3-xl": gpt3_preset(24, 2048, 16, 2**20, 2.0e-4),          # 1.3B, batch 1M tokens
    "gpt3-2.7b": gpt3_preset(32, 2560, 32, 2**20, 1.6e-4),
    "gpt3-6.7b": gpt3_preset(32, 4096, 32, 2**21, 1.2e-4),        # batch 2M tokens
    # The table's d_model 5140 is a typo for 40 heads x 128 = 5120.
    "gpt3-13b": gpt3_preset(40, 5120, 40, 2**21, 1.0e-4),
    # "3.2M" tokens: 1536 sequences of 2048 (3,145,728 tokens).
    "gpt3-175b": gpt3_preset(96, 12288, 96, 1536 * 2048, 0.6e-4),
    # GPT-X 1B, the seed project: ReZero with sparse top-8 attention, split in two pipeline stages on two
    # 16 GB V100s. Its DeepSpeed log counts 1,099,214,888 parameters; exactly these choices reproduce it:
    # biases on, an untied LM head (no bias), a learned position embedding, ReZero removing both block
    # LayerNorms (one scalar per residual branch) and keeping the final one. tests/test_presets.py checks it.
    # Its recipe: the learning rate of the seed's table, and the batch its pipeline ran, 4 micro-batches of 1
    # sequence per optimizer step (with --pp the batch of batch_size is cut into n_microbatches). The table
    # gives no final learning rate: the decay goes to 10% of the peak, as GPT-3's does.
    "gptx-1b": {"model": dict(n_layer=20, n_embd=2048, n_head=16, vocab_size=22000, block_size=1024, bias=True,
                              tie_embeddings=False, rezero=True, sparse_topk=8, position="learned"),
                "train": dict(batch_size=4, n_microbatches=4, gradient_accumulation_steps=1, learning_rate=2.0e-4,
                              min_lr=2.0e-5)},
}


def apply_preset(name: str | None, model_cfg: GPTConfig, run_cfg, given: set[str]) -> tuple:
    """(model_cfg, run_cfg) with the fields of PRESETS[name] filled in, except those whose flags were given
    on the command line. run_cfg is any run dataclass: the preset's recipe fields it lacks are skipped.
    name None returns both unchanged."""
    if name is None:
        return model_cfg, run_cfg
    if name not in PRESETS:
        sys.exit(f"error: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    run_fields = {f.name for f in dataclasses.fields(run_cfg)}
    model_values = {k: v for k, v in PRESETS[name]["model"].items() if k not in given}
    run_values = {k: v for k, v in PRESETS[name]["train"].items() if k not in given and k in run_fields}
    return dataclasses.replace(model_cfg, **model_values), dataclasses.replace(run_cfg, **run_values)
