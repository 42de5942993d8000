"""bench.py as a smoke run on a tiny config: it must run every part and report consistent figures (the
figures themselves are machine-dependent and belong in the README, never in a test's assertions)."""
import json

import pytest

from conftest import run_script

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2", "--repeats=1",
        "--warmup_steps=1", "--train_steps=3", "--sample_tokens=12", "--sample_batch_sizes=1,3"]


@pytest.mark.slow
def test_bench_smoke_run_reports_every_figure(tmp_path):
    result = run_script("bench.py", *TINY, "--parts=prepare,train,sample,soak", "--soak_steps=110",
                        f"--json_out={tmp_path / 'bench.jsonl'}")
    assert result.returncode == 0, result.stderr + result.stdout
    figures = {f["figure"]: f for f in map(json.loads, (tmp_path / "bench.jsonl").read_text().splitlines())}
    for name in ("prepare_tokens_per_s", "train_ms_per_step", "train_tokens_per_s", "train_peak_rss",
                 "train_data_loader_share", "sample_tokens_per_s_batch1", "sample_tokens_per_s_batch3",
                 "sample_ms_at_token10_batch1", "soak_rss_growth_after_step100", "soak_slowest_step_over_median"):
        assert name in figures, name
        assert figures[name]["min"] <= figures[name]["median"] <= figures[name]["max"]
    tokens_per_step = 2 * 32
    step_seconds = figures["train_ms_per_step"]["median"] / 1000
    assert figures["train_tokens_per_s"]["median"] == pytest.approx(tokens_per_step / step_seconds)
    assert figures["train_peak_rss"]["median"] > 50            # a whole Python process with torch loaded
    assert figures["soak_slowest_step_over_median"]["median"] >= 1
    assert figures["sample_tokens_per_s_batch1"]["model"]["n_embd"] == 32   # the flags reached the model
    assert "train_tokens_per_s" in result.stdout                # and the table


@pytest.mark.parametrize("flags,message", [
    (["--parts=train,fly"], "--parts has 'fly'"),
    (["--max_iters=10"], "bench.py sets --max_iters"),
    (["--repeats=0"], "must be >= 1"),
])
def test_bench_refuses_bad_flags(flags, message):
    result = run_script("bench.py", *flags)
    assert result.returncode != 0 and message in result.stderr, result.stderr
