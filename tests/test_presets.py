"""Presets: published shapes and parameter counts, the GPT-X 1B pipeline split, flags winning over presets,
and the preset table of docs/presets-and-variants.md. `python tests/test_presets.py` prints that table from the
code."""
import dataclasses
import os

import pytest
import torch

from flags import flags_given, parse_args
from conftest import ROOT, lr_at
from model import GPT, GPTConfig, plan_stages, stage_costs
import planner
import train
from presets import PRESETS, apply_preset


def preset_config(name: str) -> GPTConfig:
    return apply_preset(name, GPTConfig(), train.TrainConfig(), set())[0]


def count_on_meta(config: GPTConfig) -> int:
    with torch.device("meta"):
        return GPT(config).num_params()


def preset_row(name: str) -> str:
    """The docs table's row for a preset, every number computed here."""
    c, recipe = preset_config(name), PRESETS[name]["train"]
    sequences = recipe.get("batch_size", 0) * recipe.get("gradient_accumulation_steps", 0)
    batch = f"{sequences * c.block_size:,}" if sequences else "-"
    lr = f"{recipe['learning_rate']:.1e}" if "learning_rate" in recipe else "-"
    variants = ", ".join(v for v in ("rezero", "macaron", "realformer") if getattr(c, v))
    variants += f", top-{c.sparse_topk} attention" if c.sparse_topk else ""
    extras = ", ".join(x for x in (variants.strip(", "), "untied head" if not c.tie_embeddings else "") if x)
    return (f"| `{name}` | {c.n_layer} | {c.n_embd} | {c.n_head} | {c.block_size} | {c.vocab_size:,} | "
            f"{count_on_meta(c):,} | {batch} | {lr} | {extras or '-'} |")


def hand_count(L: int, C: int, V: int, T: int, tied: bool = True) -> int:
    """GPT-2-style parameters: per block 12C^2 weights + 9C linear biases + 4C LayerNorm gains and biases;
    token and position embeddings; the final LayerNorm; the head only when untied."""
    return L * (12 * C * C + 13 * C) + V * C + T * C + 2 * C + (0 if tied else V * C)


@pytest.mark.parametrize("name, L, C, H", [("gpt3-small", 12, 768, 12), ("gpt3-medium", 24, 1024, 16),
                                           ("gpt3-large", 24, 1536, 16), ("gpt3-xl", 24, 2048, 16),
                                           ("gpt3-2.7b", 32, 2560, 32), ("gpt3-6.7b", 32, 4096, 32),
                                           ("gpt3-13b", 40, 5120, 40), ("gpt3-175b", 96, 12288, 96)])
def test_gpt3_presets_match_table_2_1(name, L, C, H):
    c = preset_config(name)
    assert (c.n_layer, c.n_embd, c.n_head, c.block_size, c.n_embd // c.n_head) == (L, C, H, 2048, C // H)
    assert count_on_meta(c) == hand_count(L, C, 50257, 2048)


def test_gpt3_175b_has_175_billion_parameters_and_its_recipe():
    assert round(count_on_meta(preset_config("gpt3-175b")) / 1e9) == 175
    recipe = PRESETS["gpt3-175b"]["train"]
    assert recipe["batch_size"] * recipe["gradient_accumulation_steps"] == 1536      # 3.2M tokens / 2048
    assert recipe["learning_rate"] == 0.6e-4 and recipe["min_lr"] == pytest.approx(0.6e-5)
    small = PRESETS["gpt3-small"]["train"]
    assert small["batch_size"] * small["gradient_accumulation_steps"] * 2048 == 524_288
    assert small["warmup_iters"] == round(375e6 / 524_288)                            # 375M tokens of warmup


def test_gpt2_presets_have_the_published_parameter_counts():
    expected = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
                "gpt2-xl": 1_557_611_200}
    for name, count in expected.items():
        assert count_on_meta(preset_config(name)) == count


def test_gptx_1b_matches_the_seed_deepspeed_log():
    """GPT-X's log: 1,099,214,888 parameters; stage 0 = embeddings + 10 blocks = 550,653,972 and
    stage 1 = 10 blocks + final LayerNorm + LM head = 548,560,916, partitioned by parameter count."""
    c = preset_config("gptx-1b")
    assert count_on_meta(c) == 1_099_214_888
    plan = plan_stages(c, 2, "params")
    assert plan == [range(0, 10), range(10, 20)]
    block, first, last = stage_costs(c, "params")
    assert (first + 10 * block, 10 * block + last) == (550_653_972, 548_560_916)
    # By hand: a block is 12C^2 weights, 9C linear biases and two ReZero scalars (no LayerNorms).
    C, V, T = 2048, 22000, 1024
    hand_block = 12 * C * C + 9 * C + 2
    assert (V * C + T * C + 10 * hand_block, 10 * hand_block + 2 * C + V * C) == (550_653_972, 548_560_916)



def test_gptx_1b_carries_the_seed_recipe():
    """The preset had no recipe: the seed's table gives learning rate 2.0e-4, and its pipeline ran 4 micro-batches
    of 1 sequence per step. Planned on its two V100s, it is still the 1,099,214,888-parameter model."""
    recipe = PRESETS["gptx-1b"]["train"]
    assert recipe["learning_rate"] == 2.0e-4 and 0 <= recipe["min_lr"] <= recipe["learning_rate"]
    argv = ["--preset=gptx-1b", "--pp=2", "--pp_balance=params", "--dry_run", "--dry_run_gpu=V100",
            "--dtype=float32"]   # --dtype=auto is float16 on a V100, which --pp refuses
    cfg, model_cfg = parse_args(train.TrainConfig, GPTConfig, argv=argv)
    model_cfg, cfg = apply_preset(cfg.preset, model_cfg, cfg, flags_given(argv))
    train.check_config(cfg, model_cfg)
    text = "\n".join(planner.dry_run_report(cfg, model_cfg))
    assert "pp=2 (1f1b, 4 micro-batches)" in text and "micro-batches of 1 x 1024 tokens" in text
    assert "tokens per optimizer step: 4,096 (4 sequences x 1 micro-steps" in text
    assert "parameters: 1,099,214,888" in text
    assert lr_at(cfg.warmup_iters, cfg) == pytest.approx(2.0e-4)   # the peak, after warmup


def test_flags_given_win_over_the_preset():
    argv = ["--preset=gpt3-xl", "--n_layer=2", "--learning_rate=1e-3"]
    cfg, model_cfg = parse_args(train.TrainConfig, GPTConfig, argv=argv)
    model_cfg, cfg = apply_preset(cfg.preset, model_cfg, cfg, flags_given(argv))
    assert (model_cfg.n_layer, model_cfg.n_embd, model_cfg.block_size) == (2, 2048, 2048)
    assert cfg.learning_rate == 1e-3 and cfg.gradient_accumulation_steps == 64


def test_every_preset_is_in_the_docs_table_with_its_computed_count():
    docs = open(os.path.join(ROOT, "docs", "presets-and-variants.md"), encoding="utf-8").read()
    for name in PRESETS:
        assert preset_row(name) in docs, f"docs preset row for {name} is out of date:\n{preset_row(name)}"


def test_preset_fields_are_real_fields():
    model_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    train_fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    for name, preset in PRESETS.items():
        assert set(preset["model"]) <= model_fields, name
        assert set(preset["train"]) <= train_fields, name


if __name__ == "__main__":
    print("| preset | layers | d_model | heads | context | vocabulary | parameters | batch (tokens) | "
          "learning rate | variants |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for preset_name in PRESETS:
        print(preset_row(preset_name))
