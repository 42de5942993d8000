"""bench.py as a smoke run on a tiny config: it must run every part and report consistent figures (the
figures themselves are machine-dependent and belong in docs/performance.md, never in a test's assertions)."""
import json
import os
import re

import pytest

from conftest import run_script
from model import GPT, GPTConfig

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2", "--repeats=1",
        "--warmup_steps=1", "--train_steps=3", "--sample_tokens=12", "--sample_batch_sizes=1,3"]


def median(runs: list[float]) -> float:
    middle = sorted(runs)[(len(runs) - 1) // 2:len(runs) // 2 + 1]
    return sum(middle) / len(middle)


@pytest.mark.slow
def test_bench_smoke_run_reports_every_figure(tmp_path):
    """Every part on a tiny model, twice each (--repeats=2, so a median, a min and a max are three numbers);
    each figure is checked against its own raw runs and the files the runs left in --bench_dir: tokens/s is
    the prepared tokens (counted from the .bin files) over each repeat's seconds, or the step's 2 x 32
    tokens over each repeat's ms per step; GFLOP/s is the FLOPs of a step, counted here, over its time; the
    soak's median and slowest step come from its metrics.jsonl."""
    bench_dir = tmp_path / "bench"
    result = run_script("bench.py", *TINY, "--repeats=2", "--parts=prepare,train,sample,soak,limits",
                        "--soak_steps=110", "--bandwidth_mib=4", f"--bench_dir={bench_dir}",
                        f"--json_out={tmp_path / 'bench.jsonl'}")
    assert result.returncode == 0, result.stderr + result.stdout
    figures = {f["figure"]: f for f in map(json.loads, (tmp_path / "bench.jsonl").read_text().splitlines())}
    for name in ("prepare_tokens_per_s", "train_ms_per_step", "train_tokens_per_s", "train_peak_rss",
                 "train_data_loader_share", "sample_tokens_per_s_batch1", "sample_tokens_per_s_batch3",
                 "sample_ms_at_token10_batch1", "soak_rss_growth_after_step100", "soak_slowest_step_over_median"):
        assert name in figures, name
    for name, f in figures.items():
        assert (f["median"], f["min"], f["max"]) == (median(f["runs"]), min(f["runs"]), max(f["runs"])), name
        repeated = name.startswith(("prepare_", "train_", "sample_", "limits_gemm_"))
        if repeated and name != "train_data_loader_share":        # that one times 50 batch reads
            assert len(f["runs"]) == 2, name
    runs = {name: f["runs"] for name, f in figures.items()}
    tokens = sum(os.path.getsize(bench_dir / "data-1" / "shakespeare" / f"{split}.bin") // 2
                 for split in ("train", "val"))                                        # uint16 ids
    assert runs["prepare_tokens_per_s"] == pytest.approx([tokens / s for s in runs["prepare_seconds"]])
    step_seconds = [ms / 1000 for ms in runs["train_ms_per_step"]]
    assert runs["train_tokens_per_s"] == pytest.approx([2 * 32 / s for s in step_seconds])
    model = figures["train_gflops"]["model"]
    assert (model["n_layer"], model["n_embd"], model["block_size"], model["vocab_size"], model["bias"],
            model["tie_embeddings"]) == (1, 32, 32, 50257, False, True)   # nanoGPT's bias=False, tied head
    L, C, T, V = 1, 32, 32, 50257
    n_matmul = L * (12 * C * C + 2 * C) + V * C + C          # blocks (2 LayerNorm gains), tied head, ln_f
    flops_per_step = (6 * n_matmul + 12 * L * C * T) * 2 * T
    assert runs["train_gflops"] == pytest.approx([flops_per_step / s / 1e9 for s in step_seconds])
    assert figures["train_peak_rss"]["median"] > 50            # a whole Python process with torch loaded
    soak_ms = [r["ms_per_step"] for r in map(json.loads, open(bench_dir / "soak" / "metrics.jsonl"))
               if "ms_per_step" in r]
    assert len(soak_ms) == 110
    assert runs["soak_median_step"] == pytest.approx([median(soak_ms)])
    assert runs["soak_slowest_step_over_median"] == pytest.approx([max(soak_ms) / median(soak_ms)])
    assert figures["sample_tokens_per_s_batch1"]["model"]["n_embd"] == 32   # the flags reached the model
    assert "train_tokens_per_s" in result.stdout                # and the table
    # the training GFLOP/s as a share of the fp32 GEMM peak measured in the same run, repeat by repeat
    peak = figures["limits_gemm_peak_float32"]["median"]
    assert runs["train_share_of_float32_gemm_peak"] == pytest.approx([100 * g / peak
                                                                      for g in runs["train_gflops"]])


@pytest.mark.parametrize("flags,message", [
    (["--parts=train,fly"], "--parts has 'fly'"),
    (["--max_iters=10"], "bench.py sets --max_iters"),
    (["--repeats=0"], "must be >= 1"),
    (["--parts=vs_nanogpt"], "needs --baseline=PATH"),
    (["--parts=limits", "--bandwidth_mib=0"], "--bandwidth_mib must be >= 1"),
])
def test_bench_refuses_bad_flags(flags, message):
    result = run_script("bench.py", *flags)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(re.search(r"^flags\s*:(.*)$", f.read(), flags=re.M).group(1).split())
    except (OSError, AttributeError):
        return set()


def test_bench_limits_measure_the_model_shapes_and_give_shares(tmp_path):
    """--parts=limits (issue 14): the GEMM FLOP/s at the model's own matmul shapes, in fp32 and in bf16 exactly
    where the CPU has it natively, each dtype's peak the best shape; the memory bandwidth; the sampling bound
    it implies (bandwidth / bytes read per token, counted here from the model's parameters); and the sampling
    figure as a share of that bound. Real measurements at a tiny size: no thresholds on the figures."""
    n_layer, n_embd, block_size, batch_size, vocab_size, new_tokens = 1, 32, 32, 2, 512, 12
    result = run_script("bench.py", "--parts=sample,limits", f"--n_layer={n_layer}", "--n_head=2",
                        f"--n_embd={n_embd}", f"--block_size={block_size}", f"--batch_size={batch_size}",
                        f"--vocab_size={vocab_size}", "--bias=False", "--repeats=1", "--device=cpu",
                        f"--sample_tokens={new_tokens}", "--sample_batch_sizes=1", "--bandwidth_mib=4",
                        f"--json_out={tmp_path / 'bench.jsonl'}")
    assert result.returncode == 0, result.stderr + result.stdout
    figures = {f["figure"]: f for f in map(json.loads, (tmp_path / "bench.jsonl").read_text().splitlines())}
    native_bf16 = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    assert ("limits_gemm_peak_bfloat16" in figures) == native_bf16
    rows = batch_size * block_size
    for dtype in ["float32"] + (["bfloat16"] if native_bf16 else []):
        shapes = {"lm_head": vocab_size, "mlp_c_fc": 4 * n_embd, "attn_c_attn": 3 * n_embd}
        for shape, n in shapes.items():
            assert f"({rows}, {n_embd}) x ({n_embd}, {n})" in figures[f"limits_gemm_{dtype}_{shape}"]["unit"]
        best = max(figures[f"limits_gemm_{dtype}_{shape}"]["median"] for shape in shapes)
        assert figures[f"limits_gemm_peak_{dtype}"]["median"] == best > 0
    bandwidth = figures["limits_bandwidth"]["median"]
    assert bandwidth == max(figures["limits_bandwidth_copy"]["median"], figures["limits_bandwidth_read"]["median"])
    model = GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size,
                          bias=False))
    weights = sum(p.numel() for name, p in model.named_parameters() if name != "transformer.wpe.weight")
    kv_cache = 2 * n_layer * n_embd * new_tokens / 2          # keys and values, half the new tokens on average
    bound = bandwidth * 1e9 / (4 * weights + 4 * kv_cache)
    assert figures["limits_sample_bound_batch1"]["median"] == pytest.approx(bound)
    assert figures["sample_batch1_share_of_bandwidth_bound"]["median"] == pytest.approx(
        100 * figures["sample_tokens_per_s_batch1"]["median"] / bound)
    header = result.stderr.splitlines()[0]
    assert re.search(r"\| CPU .+ \|", header), header       # the CPU's model and flags head the report
    assert all(flag in header for flag in cpu_flags() if flag.startswith(("avx512", "amx")))


@pytest.mark.parametrize("make_path", [lambda tmp: tmp / "missing", lambda tmp: tmp])
def test_bench_baseline_must_be_a_nanogpt_tree(tmp_path, make_path):
    """--baseline=PATH names a nanoGPT checkout (issue 14); a missing folder, or one without nanoGPT's scripts,
    stops at once with one error line that names it, before anything is prepared or trained."""
    path = make_path(tmp_path)
    result = run_script("bench.py", f"--baseline={path}", f"--bench_dir={tmp_path / 'bench'}")
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: --baseline={path} is not a nanoGPT source tree (no train.py, model.py")
    assert not (tmp_path / "bench").exists()
