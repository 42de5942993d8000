"""train.py --dry_run: plans on the meta device without data, files or torchrun, and its memory estimate
against a measured peak on this CPU."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, run_script
from model import GPTConfig
import planner
import train
from presets import PRESETS, apply_preset

GIB = 2 ** 30


def test_dry_run_plans_gpt2_xl_on_4_stages_without_torchrun_data_or_files(tmp_path):
    result = run_script("train.py", "--preset=gpt2-xl", "--pp=4", "--batch_size=8", "--dry_run",
                        f"--data_dir={tmp_path / 'no_data'}", f"--out_dir={tmp_path / 'out'}", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert os.listdir(tmp_path) == []                                   # nothing written, no out_dir
    out = result.stdout
    assert "parameters: 1,557,611,200" in out
    assert "tokens per optimizer step: 524,288" in out                  # 8 x 64 x 1024
    stages = [int(n.replace(",", "")) for n in re.findall(r"stage \d \(blocks [\d-]+\): ([\d,]+) params", out)]
    assert len(stages) == 4
    # Tied embeddings: the first and last stage each hold wte (50257 x 1600).
    assert sum(stages) == 1_557_611_200 + 50257 * 1600
    assert re.search(r"time per step: [\d.]+ s at 40% MFU on 4 x H100", out)


def report(*argv: str) -> str:
    cfg, model_cfg = train.parse_args(train.TrainConfig, GPTConfig, argv=list(argv))
    model_cfg, cfg = apply_preset(cfg.preset, model_cfg, cfg, train.flags_given(list(argv)))
    train.check_config(cfg, model_cfg)
    return "\n".join(planner.dry_run_report(cfg, model_cfg))


def gib(text: str, kind: str) -> float:
    return float(re.search(rf"{kind} ([\d.]+)", text).group(1))


def test_dry_run_memory_parts_by_hand():
    """fp32 weights, gradients and AdamW moments: 4 + 4 + 8 bytes per parameter; bf16 copies of the Linear
    weights (the tied head counted once: it is wte); FSDP on 8 GPUs divides the first three by 8."""
    n, linear = 124_439_808, 12 * 12 * 768 * 768 + 50257 * 768
    text = report("--preset=gpt2", "--dry_run")
    assert gib(text, "weights") == pytest.approx(4 * n / GIB, abs=0.006)
    assert gib(text, "AdamW") == pytest.approx(8 * n / GIB, abs=0.006)
    assert gib(text, "16-bit weight copies") == pytest.approx(2 * linear / GIB, abs=0.006)
    sharded = report("--preset=gpt2", "--dry_run", "--fsdp", "--dry_run_world_size=8")
    assert gib(sharded, "AdamW") == pytest.approx(8 * n / 8 / GIB, abs=0.006)
    assert "tokens per optimizer step: 4,194,304" in sharded              # 8 replicas


def test_dry_run_warns_when_the_plan_cannot_fit():
    assert "warning: does not fit a 80 GiB H100" in report("--preset=gpt3-175b", "--dry_run")
    assert "warning" not in report("--preset=gpt2", "--dry_run", "--batch_size=1")


def test_dry_run_builds_gptx_stages_as_the_seed_log_counts():
    text = report("--preset=gptx-1b", "--pp=2", "--pp_balance=params", "--dry_run", "--dry_run_gpu=V100",
                  "--dtype=float32")   # auto is float16 on a V100, which --pp refuses
    assert "stage 0 (blocks 0-9): 550,653,972 params" in text
    assert "stage 1 (blocks 10-19): 548,560,916 params" in text


def test_dry_run_with_fsdp_needs_a_world_size():
    with pytest.raises(SystemExit, match="dry_run_world_size"):
        report("--dry_run", "--fsdp")



@pytest.mark.parametrize("flags, expected", [
    (["--preset=gpt3-175b", "--pp=8"], 8),                                   # batch 8: one micro-batch of 1 per stage
    (["--pp=2", "--batch_size=6"], 2),
    (["--pp=3", "--pp_schedule=gpipe", "--batch_size=8", "--n_layer=3"], 4),  # 3 does not divide 8
    (["--pp=4", "--pp_schedule=interleaved_1f1b", "--batch_size=24", "--n_layer=8"], 4),
    (["--pp=2", "--pp_schedule=interleaved_1f1b", "--batch_size=6", "--n_layer=4"], 2),
])
def test_n_microbatches_defaults_to_the_fewest_that_work(flags, expected):
    """`--preset=gpt3-175b --pp=8 --dry_run` was refused: --n_microbatches defaulted to 4, fewer than 1F1B's one
    per stage. The default now follows --pp: the fewest micro-batches, at least --pp, that divide the batch
    (a multiple of --pp when interleaved); the expected counts are worked out by hand."""
    text = report(*flags, "--dry_run")
    assert re.search(rf"pp=\d+ \(\w+, {expected} micro-batches\)", text), text.splitlines()[0]


@pytest.mark.parametrize("flags", [
    ["--preset=gpt3-175b", "--pp=8", "--n_microbatches=4"],
    ["--pp=2", "--batch_size=4", "--n_microbatches=3"],
    ["--pp=4", "--pp_schedule=interleaved_1f1b", "--batch_size=12", "--n_microbatches=6", "--n_layer=8"],
    ["--pp=2", "--batch_size=1"],                                       # no count works: a batch size is named
    ["--pp=2", "--pp_schedule=interleaved_1f1b", "--batch_size=3", "--n_layer=4"],
])
def test_a_refused_micro_batch_count_names_one_that_works(flags):
    with pytest.raises(SystemExit) as stop:
        report(*flags, "--dry_run")
    message = str(stop.value.code)
    assert message.startswith("error: ") and message.endswith(" works"), message
    suggestion = message.split("; ")[-1].removesuffix(" works").split()
    assert suggestion and all(flag.startswith("--") for flag in suggestion), message
    assert "micro-batches" in report(*flags, *suggestion, "--dry_run")   # the flags it names, given last, win


MEASURE = """
import os, resource, sys, torch
sys.path.insert(0, {root!r})
from model import GPT, GPTConfig, configure_optimizers
torch.manual_seed(0)
config = GPTConfig(**{config!r})
x = torch.randint(0, config.vocab_size, ({batch}, config.block_size))
y = torch.randint(0, config.vocab_size, ({batch}, config.block_size))
base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
model = GPT(config)
optimizer = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
for step in range(3):
    model(x, y, {chunk}).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
"""


@pytest.mark.slow
@pytest.mark.parametrize("loss_chunk", [64, 0])
def test_memory_estimate_is_within_15_percent_of_the_measured_cpu_peak(loss_chunk):
    """Peak resident memory of 3 fp32 training steps above the process's size before the model existed.
    MALLOC_MMAP_THRESHOLD_ makes glibc give every large buffer back when it is freed, so the peak RSS follows
    the peak of live tensors. Measured here: 0.64 vs 0.59 GiB estimated with the chunked loss, 2.85 vs 2.82
    with the plain one; the estimate leaves out ~50 MB of runtime buffers."""
    config = dict(n_layer=4, n_head=4, n_embd=256, block_size=256)
    code = MEASURE.format(root=ROOT, config=config, batch=16, chunk=loss_chunk)
    measured = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                  env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}).stdout)
    flags = [f"--{k}={v}" for k, v in config.items()]
    text = report(*flags, "--batch_size=16", "--dry_run", "--dtype=float32", f"--loss_chunk={loss_chunk}")
    estimate = float(re.search(r"= ([\d.]+) GiB", text).group(1)) * GIB
    assert abs(estimate - measured) / measured < 0.15, (estimate / GIB, measured / GIB)


def test_presets_all_plan_in_a_dry_run():
    for name in PRESETS:
        assert "parameters:" in report(f"--preset={name}", "--dry_run")


# --- layouts of (pp, dp or fsdp, tp): issue 16 ---

def test_tensor_parallel_counts_match_a_model_split_by_hand():
    """The parameters one tensor-parallel rank holds, counted on a real model whose tensors are split by hand
    as Megatron splits them (Shoeybi et al. 2019, section 3): q, k and v by heads and c_fc by rows
    (column-parallel), both c_proj by columns (row-parallel, bias whole), wte (the tied head) by vocabulary;
    LayerNorms and wpe whole. The dry run's count, and its weights and AdamW, must agree."""
    import torch
    from planner import count_params, param_counts, rank_params
    from model import GPT
    config = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64)
    model = GPT(config)
    for tp in (1, 2, 4):
        shard = {}
        for name, p in model.named_parameters():
            if name.endswith("c_attn.weight") or name.endswith("c_attn.bias"):
                shard[name] = torch.cat([part.chunk(tp, dim=0)[0] for part in p.split(config.n_embd, dim=0)])
            elif name.endswith(("c_fc.weight", "c_fc.bias", "wte.weight")):
                shard[name] = p.chunk(tp, dim=0)[0]
            elif name.endswith("c_proj.weight"):
                shard[name] = p.chunk(tp, dim=1)[0]
            else:
                shard[name] = p
        by_hand = sum(t.numel() for t in shard.values())
        assert count_params(model, tp)[0] == by_hand
        assert rank_params(config, param_counts(config, tp), 2, True, True)[0] == by_hand
        flags = ["--n_layer=2", "--n_head=4", "--n_embd=32", "--block_size=16", "--vocab_size=64", "--dry_run"]
        text = report(*flags, f"--tp={tp}", f"--dry_run_world_size={tp}")
        assert f"each GPU: {by_hand:,} params" in text
        assert f"x tp={tp}" in text.splitlines()[0]
    assert count_params(model, 2)[0] < count_params(model, 1)[0]


def test_tensor_parallel_activations_follow_korthikanti_table_2():
    """Korthikanti et al. 2022, Table 2: per block, tensor parallelism keeps sbh(10 + 24/t) (flash attention:
    no s x s term) and adds sequence parallelism for sbh(34/t). Our block in 16-bit, with no dropout masks:
    outside the split, two fp32 LayerNorm inputs (8 bytes per element, their 4 in 16-bit) and the two
    LayerNorm outputs feeding c_attn and c_fc (4); inside, q, k, v, SDPA's output, c_proj's input, GELU's
    and the MLP c_proj's inputs (2 x (3 + 1 + 1 + 4 + 4) = 26, their 24 without the separate SDPA output).
    Under sequence parallelism the LayerNorm inputs divide by t, the gathered matmul inputs (4) do not."""
    from planner import block_activation_bytes, head_activation_bytes
    config = GPTConfig(n_layer=2, n_head=8, n_embd=64, block_size=32)
    b, T = 2, 32
    btc = b * T * config.n_embd
    for t in (1, 2, 4, 8):
        assert block_activation_bytes(config, b, T, 2, t) == (8 + 4 + 26 / t) * btc
        assert block_activation_bytes(config, b, T, 2, t, sequence_parallel=True) == (8 / t + 4 + 26 / t) * btc
        # the head is vocabulary-parallel: the logits' 12 bytes each divide by t
        V = -(-config.vocab_size // t)
        assert head_activation_bytes(config, b, T, 2, 0, t) == 4 * btc + 2 * btc + 12 * b * T * V
    assert block_activation_bytes(config, b, T, 2, 4, True) < block_activation_bytes(config, b, T, 2, 4)
    # Full recomputation keeps each block's fp32 input (Korthikanti et al.'s 2sbh per layer in 16 bits), split
    # by sequence under sequence parallelism, and rebuilds one block at a time.
    from planner import Layout, memory_estimate, param_counts
    checkpointed = GPTConfig(n_layer=6, n_head=8, n_embd=64, block_size=32, activation_checkpointing=True)
    for t, sequence in ((1, False), (4, False), (4, True)):
        layout = Layout(tp=t, sequence_parallel=sequence, micro_batch=b, act_bytes=2)
        estimate = memory_estimate(checkpointed, param_counts(checkpointed, t), layout, 6, False, False, 1)
        kept = 6 * 4 * btc // (t if sequence else 1)
        assert estimate["activations"] == kept + block_activation_bytes(checkpointed, b, T, 2, t, sequence)


def test_sequence_parallel_lowers_activations_and_nothing_else():
    flags = ["--preset=gpt2-medium", "--tp=4", "--dry_run"]
    plain, sequence = report(*flags), report(*flags, "--sequence_parallel")
    assert "(sequence parallel)" in sequence.splitlines()[0]
    assert gib(sequence, "activations") < gib(plain, "activations")
    for kind in ("weights", "gradients", "AdamW", "16-bit weight copies"):
        assert gib(sequence, kind) == gib(plain, kind)
    # tp divides the weights by 4 but the replicated ones: per block two LayerNorms (4C) and the row-parallel
    # c_proj biases (2C); wpe (T x C) and ln_f (2C)
    n = int(re.search(r"parameters: ([\d,]+)", plain).group(1).replace(",", ""))
    replicated = 24 * 6 * 1024 + 1024 * 1024 + 2 * 1024
    assert gib(plain, "AdamW") == pytest.approx(8 * ((n - replicated) / 4 + replicated) / GIB, abs=0.006)


def stage_rows(text: str) -> list[tuple[int, str]]:
    return re.findall(r"stage \d+ \(blocks [\d-]+\): ([\d,]+) params \| (.*)", text)


def test_fsdp_with_pipeline_shards_each_stage_over_its_data_parallel_ranks():
    """--fsdp --pp=2 on 8 GPUs: 4 data-parallel ranks per stage, so each stage's AdamW state (8 bytes per
    parameter) divides by 4; its weights and gradients are held as 1/4 shards plus, through the step, the
    whole stage gathered (the pipelining stage keeps FSDP from resharding until the step's end)."""
    text = report("--preset=gpt2", "--pp=2", "--fsdp", "--dry_run_world_size=8", "--dry_run")
    assert "pp=2 (1f1b, 2 micro-batches) x fsdp=4 x tp=1" in text
    rows = stage_rows(text)
    assert len(rows) == 2
    for params, parts in rows:
        params = int(params.replace(",", ""))
        assert gib(parts, "AdamW") == pytest.approx(8 * params / 4 / GIB, abs=0.006)
        assert gib(parts, "weights") == pytest.approx((4 * params / 4 + 4 * params) / GIB, abs=0.006)
        assert gib(parts, "gradients") == pytest.approx((4 * params / 4 + 4 * params) / GIB, abs=0.006)


def test_step_time_adds_the_pipeline_bubble():
    """Narayanan et al. 2021, section 2.2: the bubble is (p - 1)/m of the ideal time for GPipe and 1F1B, and
    (p - 1)/(v m) with v interleaved stages per rank."""
    from planner import Layout, step_seconds
    config = GPTConfig(n_layer=8)
    for schedule, v, expected in (("1f1b", 1, 3 / 8), ("gpipe", 1, 3 / 8), ("interleaved_1f1b", 2, 3 / 16)):
        parts = step_seconds(config, 1e15, Layout(pp=4, schedule=schedule, n_microbatches=8, virtual_stages=v),
                             1e12, 0.5)
        assert parts["compute"] == pytest.approx(1e15 / (4 * 1e12 * 0.5))
        assert parts["bubble"] == pytest.approx(parts["compute"] * expected)
    assert step_seconds(config, 1e15, Layout(dp=4), 1e12, 0.5)["bubble"] == 0
    text = report("--preset=gpt2-xl", "--pp=4", "--batch_size=8", "--dry_run")
    parts = re.search(r"compute ([\d.]+) s \+ pipeline bubble ([\d.]+) s", text)
    compute, bubble = float(parts.group(1)), float(parts.group(2))
    assert bubble == pytest.approx(compute * 3 / 4, abs=0.01)        # 4 stages, 4 micro-batches per flush


def fits(text: str, memory: float) -> bool:
    totals = [float(x) for x in re.findall(r"= ([\d.]+) GiB", text)]
    return bool(totals) and max(totals) <= memory and "warning" not in text


def suggestion(text: str) -> list[str]:
    return re.search(r"GiB[^;]*; (--\S+(?: --\S+)*) fits", text).group(1).split()


def test_layout_search_names_a_layout_whose_own_plan_fits():
    flags = ["--preset=gpt2-xl", "--dry_run_gpu=L4", "--dry_run_world_size=8", "--batch_size=8",
             "--gradient_accumulation_steps=2", "--dry_run"]
    text = report(*flags)
    assert "warning: does not fit a 24 GiB L4" in text
    tokens = re.search(r"tokens per optimizer step: ([\d,]+)", text).group(1)
    planned = report(*flags, *suggestion(text))   # the flags it names, given last, win
    assert fits(planned, 0.9 * 24), planned
    assert f"tokens per optimizer step: {tokens} " in planned      # the same global batch
    # a grid with nothing that fits says so
    assert "no layout of 1 GPUs fits" in report("--preset=gpt3-175b", "--dry_run")


# The layouts docs/multi-gpu.md shows, and the batches of GPT-3's recipe (Brown et al. 2020, Table 2.1):
# 13B: 1024 sequences per step; 175B: 1536.
GPT3_LAYOUTS = {
    "13b on 16": (["--preset=gpt3-13b", "--dry_run_world_size=16", "--gradient_accumulation_steps=8"],
                  ["--tp=4", "--sequence_parallel", "--batch_size=1",
                   "--gradient_accumulation_steps=256"]),
    "175b on 64": (["--preset=gpt3-175b", "--dry_run_world_size=64", "--gradient_accumulation_steps=3"],
                   ["--pp=8", "--tp=8", "--sequence_parallel", "--batch_size=1536",
                    "--gradient_accumulation_steps=1", "--n_microbatches=1536"]),
    "175b on 128": (["--preset=gpt3-175b", "--dry_run_world_size=128", "--batch_size=4",
                     "--gradient_accumulation_steps=3"],
                    ["--pp=16", "--tp=8", "--sequence_parallel", "--batch_size=1536",
                     "--gradient_accumulation_steps=1", "--n_microbatches=768"]),
}


@pytest.mark.parametrize("name", GPT3_LAYOUTS)
def test_gpt3_layouts_fit_80_gib_h100s_and_the_default_layouts_do_not(name):
    default, layout = GPT3_LAYOUTS[name]
    text = report(*default, "--dry_run")
    assert "warning: does not fit a 80 GiB H100" in text
    assert fits(report(*default, *suggestion(text), "--dry_run"), 0.9 * 80)
    planned = report(*default, *layout, "--dry_run")
    assert fits(planned, 80), planned
    assert re.search(r"tokens per optimizer step: 2,097,152 |tokens per optimizer step: 3,145,728 ", planned)


@pytest.mark.parametrize("world_size", [64, 128])
def test_megatron_published_175b_layouts_fit_in_the_plan(world_size):
    """Megatron-LM's 175B layout, examples/gpt3/train_gpt3_175b_distributed.sh: tensor-parallel size 8,
    pipeline-parallel size 16 (128 GPUs), micro-batches of 1 sequence, 1536 per step; and on 64 GPUs the same
    t = 8 with 8 stages. Our plan must fit both on 80 GiB."""
    pp = world_size // 8
    text = report("--preset=gpt3-175b", f"--dry_run_world_size={world_size}", f"--pp={pp}", "--tp=8",
                  "--sequence_parallel", "--batch_size=1536", "--n_microbatches=1536",
                  "--gradient_accumulation_steps=1", "--dry_run")
    assert fits(text, 80), text


@pytest.mark.parametrize("flags, works", [
    (["--pp=2", "--tp=2", "--dry_run_world_size=6"], "--dry_run_world_size=8"),
    (["--tp=2", "--dry_run_world_size=3"], "--dry_run_world_size=4"),
    (["--tp=8", "--n_head=4", "--n_embd=64"], None),
    (["--pp=2", "--fsdp"], "--dry_run_world_size=4"),        # nothing to shard over
])
def test_bad_layouts_are_refused_in_one_line(flags, works):
    with pytest.raises(SystemExit) as stop:
        report(*flags, "--dry_run")
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    if works:
        assert message.endswith(f"; {works} works"), message
        assert "parameters:" in report(*flags, works, "--dry_run")


def refusal_of_a_run(argv: list[str], world_size: int) -> str | None:
    """The refusal (or None) of the checks train.py makes before a real run of these flags on world_size
    GPUs of the dry run's kind: the flags' (check_config) and the layout's (check_layout, with --dtype
    resolved as on that GPU)."""
    cfg, model_cfg = train.parse_args(train.TrainConfig, GPTConfig, argv=argv)
    model_cfg, cfg = apply_preset(cfg.preset, model_cfg, cfg, train.flags_given(argv))
    run = train.dataclasses.replace(cfg, dry_run=False)
    try:
        train.check_config(run, model_cfg)
        train.check_layout(run, world_size, planner.planned_dtype(cfg))
    except SystemExit as stop:
        return str(stop.code)
    return None


# Issue 23: each of these once led the layout search to flags that train.py then refused (sequence
# parallelism with ReZero, or with a block_size tp does not divide). Now each names flags that a run accepts.
ACCEPTED_SEARCHES = {
    "ReZero on 2 V100s": ["--preset=gptx-1b", "--dry_run_gpu=V100", "--dry_run_world_size=2", "--dtype=float32"],
    "block_size 1001": ["--preset=gpt2-large", "--block_size=1001", "--dry_run_gpu=V100", "--dry_run_world_size=4",
                        "--dtype=float32"],
    "gpt2-xl on 8 L4s": ["--preset=gpt2-xl", "--dry_run_gpu=L4", "--dry_run_world_size=8", "--batch_size=8",
                         "--gradient_accumulation_steps=2"],
    "13b on 16": GPT3_LAYOUTS["13b on 16"][0],
}


@pytest.mark.parametrize("name", ACCEPTED_SEARCHES)
def test_layout_search_only_names_flags_that_a_run_accepts(name):
    flags = ACCEPTED_SEARCHES[name]
    world_size = int(next(f for f in flags if f.startswith("--dry_run_world_size=")).split("=")[1])
    text = report(*flags, "--dry_run")
    assert "does not fit" in text, text
    named = suggestion(text)
    assert refusal_of_a_run([*flags, *named], world_size) is None, named
    gpu = next((f.split("=")[1] for f in flags if f.startswith("--dry_run_gpu=")), "H100")
    assert fits(report(*flags, *named, "--dry_run"), 0.9 * planner.GPU_MEMORY_GIB[gpu])


@pytest.mark.parametrize("flags, refusal", [
    # --dtype=auto is float16 on a V100, which --tp, --pp and --fsdp refuse: nothing that fits is accepted.
    (["--preset=gptx-1b", "--dry_run_gpu=V100", "--dry_run_world_size=2"], "--dtype=auto chose float16"),
    (["--preset=gpt2-large", "--dtype=float16", "--dry_run_gpu=V100", "--dry_run_world_size=4"],
     "--dtype=float16 needs a gradient scaler"),
    (["--preset=gpt2-xl", "--dry_run_gpu=V100", "--dry_run_world_size=4"], "--dtype=auto chose float16"),
])
def test_layout_search_says_so_when_what_fits_is_refused(flags, refusal):
    text = report(*flags, "--dry_run")
    world_size = int(flags[-1].split("=")[1])
    line = text.splitlines()[-1]
    assert f"no layout of {world_size} GPUs that train.py accepts fits: " in line and refusal in line, line
    named = re.search(r"accepts fits: (--\S+(?: --\S+)*) would, but", line).group(1).split()
    assert refusal in refusal_of_a_run([*flags, *named], world_size)       # the run refuses it, for that reason


def test_every_variant_plans_and_realformer_under_pp_is_refused_in_one_line():
    """The parameter count builds pipeline stages on the meta device, which cannot carry RealFormer's scores:
    a RealFormer plan once ended in an AssertionError even without --pp."""
    for variant in ("--realformer", "--rezero", "--macaron", "--sparse_topk=8", "--position=alibi",
                    "--position=rope", "--activation_checkpointing"):
        text = report(variant, "--dry_run")
        assert "parameters: " in text, variant
    assert re.search(r"parameters: ([\d,]+)", report("--realformer", "--dry_run")).group(1) == \
        re.search(r"parameters: ([\d,]+)", report("--dry_run")).group(1)      # RealFormer adds no parameters
    result = run_script("train.py", "--dry_run", "--realformer", "--pp=2")
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("error: --realformer passes attention scores from block to block"), \
        result.stderr


def test_dry_run_resolves_auto_dtype_as_the_planned_gpu_would():
    """--dtype=auto is bf16 on GPUs that compute it natively (compute capability 8.0+) and float16 on a V100
    (7.0): the plan counts 16-bit activations either way, and the float16 refusals of --tp apply to it."""
    assert "bfloat16 autocast" in report("--dry_run", "--dry_run_gpu=A100")
    assert "float16 autocast" in report("--dry_run", "--dry_run_gpu=V100")
    with pytest.raises(SystemExit) as stop:
        report("--dry_run", "--dry_run_gpu=V100", "--tp=2")
    assert str(stop.value.code).startswith("error: --dtype=auto chose float16 (this GPU has no native bf16)")
    assert "tp=2" in report("--dry_run", "--dry_run_gpu=V100", "--tp=2", "--dtype=float32")


def test_chunked_head_counts_the_chunks_a_micro_batch_makes():
    """The chunked loss's bytes, counted by hand from ChunkedCrossEntropy.forward: ln_f's fp32 input and
    d loss / d x (4 bytes per element of (b T, C) each), the fp32 (V, C) weight gradient, and per chunk of rows
    its fp32 logits, plus under bf16 the 16-bit matmul output they come from and the 16-bit gradient cast for
    the two matmuls (4 + 2 bytes per logit). With several chunks the next one's buffers are made while the
    last one's are held: two chunks. A micro-batch of no more rows than a chunk is one chunk of its b T rows;
    the estimate once counted two chunks of loss_chunk rows there (train.py's WIDE run in test_memory.py:
    128 rows, chunk 1024: 60 MiB too many)."""
    from planner import head_activation_bytes
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=1000)
    b, T, C, V = 2, 32, 64, 1000
    kept = 4 * b * T * C + 4 * b * T * C + 4 * V * C
    assert head_activation_bytes(config, b, T, 4, 16) == kept + 2 * 4 * 16 * V      # 4 chunks of 16 rows
    assert head_activation_bytes(config, b, T, 2, 16) == kept + 2 * (4 + 2) * 16 * V
    for chunk in (64, 1024):                                                           # one chunk of 64 rows
        assert head_activation_bytes(config, b, T, 4, chunk) == kept + 4 * 64 * V
        assert head_activation_bytes(config, b, T, 2, chunk) == kept + (4 + 2) * 64 * V
