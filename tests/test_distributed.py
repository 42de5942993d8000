"""Data parallelism on CPU with gloo: 2 processes under torchrun against 1 process, and checkpoints that
move between layouts."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_MODEL_FLAGS
from checkpoints import load_checkpoint
from processes import run_main

pytestmark = pytest.mark.slow


def run_train(out_dir: str, data_dir: str, nproc: int, *flags: str, script: str = "train.py") -> None:
    """train.py (or a script that runs it: a path) on nproc processes, on the tiny dataset and model."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--standalone"] if nproc > 1 else [sys.executable]
    result = subprocess.run([*launcher, os.path.join(ROOT, script), f"--data_dir={data_dir}",
                             "--dataset=tiny", f"--out_dir={out_dir}", *TINY_MODEL_FLAGS, "--batch_size=4",
                             "--eval_iters=3", "--log_interval=1", "--warmup_iters=2", "--lr_decay_iters=6",
                             "--dropout=0", "--dtype=float32", *flags],   # layouts agree to 1e-5 in fp32
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def logged(out_dir: str, key: str = "loss") -> dict[int, float]:
    """{step: value} of one field of the progress lines in out_dir's metrics.jsonl (loss, grad_norm, ...)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r[key] for r in map(json.loads, f) if "loss" in r}


def assert_same_run(a: str, b: str, atol: float = 1e-5, grad_rtol: float = 1e-5,
                    weights_atol: float | None = None) -> None:
    """Runs a and b logged the same losses (within atol) and gradient norms (within grad_rtol, relative) at
    every step, and saved the same final weights (within weights_atol, default atol). The norms are what catch
    a gradient off by a constant factor (replicas summed instead of averaged, a shard counted twice): the
    weights do not, since clipping scales every update to the same norm and AdamW divides by the gradient's
    own scale. The norm is logged before clipping; fp32 layouts agree on it to ~2e-7 relative."""
    losses_a, losses_b = logged(a), logged(b)
    norms_a, norms_b = logged(a, "grad_norm"), logged(b, "grad_norm")
    assert losses_a.keys() == losses_b.keys()
    for step in losses_a:
        assert losses_a[step] == pytest.approx(losses_b[step], abs=atol), f"loss, step {step}"
        assert norms_a[step] == pytest.approx(norms_b[step], rel=grad_rtol), f"grad norm, step {step}"
    weights_a = load_checkpoint(os.path.join(a, "ckpt.pt"))["model"]
    weights_b = load_checkpoint(os.path.join(b, "ckpt.pt"))["model"]
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0,
                                   atol=atol if weights_atol is None else weights_atol, msg=name)


# AdamW's first update of a weight is lr g / (|g| + eps), eps = 1e-8, so it moves by up to lr / eps times the
# change in g: a gradient element within ~eps of zero, which fp32 rounding in another layout moves by ~1e-9
# (2.8e-9 against 3.8e-9 for one element of c_attn under --pp=2), moves its weight by up to lr / 10, 7e-5 at
# the first step's lr (these runs' warmup: 2e-3 / 3). The unclipped runs below (here and in
# test_tensor_parallel.py) compare their final weights within this (the pipeline's meets such an element); the
# older runs keep atol, having met none.
FIRST_ADAM_STEP_ATOL = 1e-4


def test_ddp_on_two_processes_matches_one_process_with_twice_the_accumulation(tiny_data_dir, tmp_path):
    """The global batch is one seeded stream of windows: 2 processes x 2 micro-batches see the same
    windows as 1 process x 4 micro-batches, and the averaged gradients give the same update."""
    run_train(str(tmp_path / "one"), tiny_data_dir, 1, "--gradient_accumulation_steps=4", "--max_iters=6",
              "--eval_interval=3")
    run_train(str(tmp_path / "two"), tiny_data_dir, 2, "--gradient_accumulation_steps=2", "--max_iters=6",
              "--eval_interval=3")
    assert_same_run(str(tmp_path / "one"), str(tmp_path / "two"))


def test_checkpoint_saved_under_ddp_resumes_on_one_process(tiny_data_dir, tmp_path):
    """Optimizer state is stored by parameter name and the batch order by the step's generator state, so a
    run saved by 2 processes continues on 1 (with the same global batch) as if nothing had changed."""
    straight, moved = str(tmp_path / "straight"), str(tmp_path / "moved")
    run_train(straight, tiny_data_dir, 2, "--gradient_accumulation_steps=2", "--max_iters=6",
              "--eval_interval=3")
    run_train(moved, tiny_data_dir, 2, "--gradient_accumulation_steps=2", "--max_iters=3", "--eval_interval=3")
    run_train(moved, tiny_data_dir, 1, "--gradient_accumulation_steps=4", "--max_iters=6", "--eval_interval=3",
              "--init_from=resume")
    assert_same_run(straight, moved)



@pytest.mark.parametrize("nproc,flags", [(1, ["--gradient_accumulation_steps=2"]),
                                         (2, ["--gradient_accumulation_steps=1"]),
                                         (2, ["--fsdp", "--gradient_accumulation_steps=1"]),
                                         (2, ["--pp=2", "--gradient_accumulation_steps=2"])])
def test_logged_mfu_divides_by_the_peak_of_every_process(nproc, flags, tiny_data_dir, tmp_path):
    """MFU was logged world-size times too high under DDP, FSDP and PP: the FLOPs of the global batch were divided
    by one device's peak. Each logged MFU must be a step's FLOPs, counted by hand (6N + 12LCT per token, N
    without the position embedding, a lookup), over the step's time and nproc devices' peak (--peak_flops)."""
    L, C, V, T, peak = 2, 32, 64, 16, 1e9                              # TINY_MODEL_FLAGS
    n_matmul = L * (12 * C * C + 13 * C) + V * C + 2 * C               # blocks, tied wte/head, ln_f
    flops_per_step = (6 * n_matmul + 12 * L * C * T) * 8 * T          # 8 sequences of T tokens per step
    run_train(str(tmp_path), tiny_data_dir, nproc, "--max_iters=3", "--eval_interval=3", f"--peak_flops={peak:g}",
              *flags)
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "mfu" in r]
    assert len(steps) == 3
    for r in steps:
        assert r["tokens_per_s"] * r["ms_per_step"] / 1000 == pytest.approx(8 * T)
        assert r["mfu"] == pytest.approx(flops_per_step / (r["ms_per_step"] / 1000) / (nproc * peak), rel=1e-9)


PIPELINE_LAYOUTS = {
    "pp2 gpipe": (2, ["--pp=2", "--pp_schedule=gpipe", "--gradient_accumulation_steps=2"]),
    "pp2 1f1b": (2, ["--pp=2", "--pp_schedule=1f1b", "--gradient_accumulation_steps=2"]),
    "pp2 interleaved 1f1b": (2, ["--pp=2", "--pp_schedule=interleaved_1f1b", "--gradient_accumulation_steps=2"]),
    "pp2 x dp2": (4, ["--pp=2", "--gradient_accumulation_steps=1"]),     # 2 micro-batches, as many as stages
    "pp2 x dp2 gpipe": (4, ["--pp=2", "--pp_schedule=gpipe", "--gradient_accumulation_steps=1"]),
    "pp2 untied head": (2, ["--pp=2", "--gradient_accumulation_steps=2", "--tie_embeddings=False"]),
    "fsdp2": (2, ["--fsdp", "--gradient_accumulation_steps=1"]),
    "fsdp2 with accumulation": (2, ["--fsdp", "--batch_size=2", "--gradient_accumulation_steps=2"]),
}


@pytest.fixture(scope="module")
def one_process_runs(tiny_data_dir, tmp_path_factory) -> dict[bool, str]:
    """The references: 1 process, 4 blocks, global batch 8, with tied and with untied embeddings."""
    runs = {}
    for tied in (True, False):
        out_dir = str(tmp_path_factory.mktemp("reference"))
        run_train(out_dir, tiny_data_dir, 1, "--n_layer=4", "--gradient_accumulation_steps=2", "--max_iters=6",
                  "--eval_interval=3", f"--tie_embeddings={tied}")
        runs[tied] = out_dir
    return runs


@pytest.mark.parametrize("layout", PIPELINE_LAYOUTS)
def test_pipeline_and_sharded_layouts_match_one_process(layout, one_process_runs, tiny_data_dir, tmp_path):
    """Chained stages under each schedule, pipelines replicated over data-parallel groups, and FSDP's shards
    compute the same losses and weights as one process; the checkpoint is the ordinary full-model file.
    Replicated pipelines stopped at their second step with an assert inside DDP under GPipe, interleaved 1F1B
    and 1F1B with as many micro-batches as stages (which --n_microbatches's default now is)."""
    nproc, flags = PIPELINE_LAYOUTS[layout]
    run_train(str(tmp_path), tiny_data_dir, nproc, "--n_layer=4", "--max_iters=6", "--eval_interval=3", *flags)
    tied = "--tie_embeddings=False" not in flags
    assert_same_run(one_process_runs[tied], str(tmp_path))
    weights = load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))["model"]
    if tied:   # the first stage's wte and the last stage's copy took identical steps
        assert torch.equal(weights["transformer.wte.weight"], weights["lm_head.weight"])


def test_bf16_pipeline_matches_bf16_one_process(tiny_data_dir, tmp_path):
    """Under --pp, autocast now wraps each stage's forward instead of schedule.step(), which also ran every
    backward under it. The pipeline must still compute in bf16, and compute what one process does.
    The two runs are set up to do the same bf16 operations: micro-batches of 1 sequence in both (the
    pipeline cuts batches of 4 into 4), the plain loss, an untied head and no clipping (the tied copies'
    gradient sum and the clipping norm add fp32 terms in another order, and bf16's rounding of the
    updated weights would magnify that last bit). So they agree to fp32 rounding, while the same run in
    fp32 lands 5e-3 away: a pipeline without autocast, or with a wrong gradient, fails."""
    common = ["--n_layer=4", "--max_iters=6", "--eval_interval=3", "--tie_embeddings=False", "--grad_clip=0"]
    one_process = ["--batch_size=1", "--gradient_accumulation_steps=8", "--loss_chunk=0"]
    runs = {name: str(tmp_path / name) for name in ("one bf16", "pp2 bf16", "one fp32")}
    run_train(runs["one bf16"], tiny_data_dir, 1, *common, *one_process, "--dtype=bfloat16")
    run_train(runs["pp2 bf16"], tiny_data_dir, 2, *common, "--pp=2", "--n_microbatches=4",
              "--gradient_accumulation_steps=2", "--dtype=bfloat16")
    run_train(runs["one fp32"], tiny_data_dir, 1, *common, *one_process, "--dtype=float32")
    assert_same_run(runs["one bf16"], runs["pp2 bf16"], atol=1e-5)
    bf16, fp32 = (load_checkpoint(os.path.join(runs[name], "ckpt.pt"))["model"]
                  for name in ("one bf16", "one fp32"))
    assert max((bf16[name] - fp32[name]).abs().max().item() for name in bf16) > 1e-3   # bf16 mattered


def test_pipeline_runs_forward_under_autocast_and_backward_outside_it(tmp_path):
    """schedule.step() runs forward and backward; train.py wrapped it in autocast, so every backward op
    ran under autocast, which PyTorch's AMP docs advise against. Autocast now sits in each stage's forward
    (AutocastForward), and the schedule is called outside it. Checked here on a one-stage pipeline in this
    process: a block's forward sees autocast on, its backward sees it off."""
    import torch.distributed as dist
    from parallel import build_pipeline, device_mesh
    from model import GPT, GPTConfig
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, tie_embeddings=False)
        mesh = device_mesh("cpu", world_size=1, pp=1, tp=1)
        weights = GPT(config).state_dict()
        pipe = build_pipeline(config, lambda name, shape: weights[name], mesh, "cpu", torch.bfloat16,
                              schedule="gpipe", balance="flops", n_microbatches=2, virtual_stages=2, accum=1)
        autocast_on, block = {}, pipe.module[0].transformer.h["0"]
        is_on = lambda: torch.is_autocast_enabled("cpu")                            # noqa: E731
        block.register_forward_hook(lambda *_: autocast_on.update(forward=is_on()))
        block.register_full_backward_hook(lambda *_: autocast_on.update(backward=is_on()))
        x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
        pipe.forward_backward(x, y, micro_step=0, scaler=None, weight=1.0)   # as the loop calls it (accum 1)
        assert autocast_on == {"forward": True, "backward": False}
    finally:
        dist.destroy_process_group()


LAYOUTS = {
    "one process": (1, ["--gradient_accumulation_steps=2"]),
    "dp2": (2, ["--gradient_accumulation_steps=1"]),
    "pp2": (2, ["--pp=2", "--gradient_accumulation_steps=2"]),
    "fsdp2": (2, ["--fsdp", "--gradient_accumulation_steps=1"]),
}


UNCLIPPED = ["--max_iters=4", "--eval_interval=4", "--grad_clip=0"]   # 0: no clipping (flags.RunConfig)


@pytest.fixture(scope="module")
def unclipped_one_process_run(tiny_data_dir, tmp_path_factory) -> str:
    """The reference for runs without clipping: 4 steps on one process, 2 micro-batches of 4 sequences each."""
    out_dir = str(tmp_path_factory.mktemp("unclipped"))
    run_train(out_dir, tiny_data_dir, 1, *LAYOUTS["one process"][1], *UNCLIPPED)
    return out_dir


@pytest.mark.parametrize("layout", ["dp2", "fsdp2", "pp2"])
def test_unclipped_layouts_match_one_process(layout, unclipped_one_process_run, tiny_data_dir, tmp_path):
    """--grad_clip=0 (no clipping: each layout's optimizer_step still computes and logs the norm, and must leave
    the gradients as they are) gives one process's losses, gradient norms and weights under DDP, FSDP and a
    pipeline, whose norms are computed three different ways (clip_grad_norm_ on plain tensors, on FSDP's
    DTensor shards, and clip_by_global_norm over the stages)."""
    nproc, flags = LAYOUTS[layout]
    run_train(str(tmp_path), tiny_data_dir, nproc, *flags, *UNCLIPPED)
    assert_same_run(unclipped_one_process_run, str(tmp_path), weights_atol=FIRST_ADAM_STEP_ATOL)


@pytest.mark.parametrize("first,second", [("pp2", "dp2"), ("one process", "pp2"), ("fsdp2", "one process"),
                                          ("dp2", "fsdp2")])
def test_checkpoint_moves_between_layouts(first, second, one_process_runs, tiny_data_dir, tmp_path):
    """3 steps under one layout, resume under another for 3 more: the same as 6 steps on one process."""
    for layout, max_iters, resume in ((first, 3, []), (second, 6, ["--init_from=resume"])):
        nproc, flags = LAYOUTS[layout]
        run_train(str(tmp_path), tiny_data_dir, nproc, "--n_layer=4", f"--max_iters={max_iters}",
                  "--eval_interval=3", *flags, *resume)
    assert_same_run(one_process_runs[True], str(tmp_path))


@pytest.mark.parametrize("nproc,flags,message", [
    (1, ["--pp=2"], "needs one process per stage"),
    (2, ["--pp=3", "--n_layer=4"], "--pp=3 must divide the number of processes (2)"),
    (2, ["--pp=2", "--n_layer=1"], "2 pipeline stages need at least as many blocks"),
    (2, ["--pp=2", "--n_microbatches=3"], "--n_microbatches=3 must divide --batch_size=4"),
    (2, ["--pp=2", "--n_microbatches=1"], "needs --n_microbatches >= --pp=2"),
    (1, ["--fsdp"], "--fsdp shards across processes"),
    (2, ["--fsdp", "--pp=2"], "processes for --pp=2 leave one per stage"),
])
def test_bad_pipeline_layouts_are_refused_with_one_line(nproc, flags, message, tiny_data_dir, tmp_path):
    """Under torchrun every process refused the layout and printed the same line, once per process; now the
    line appears exactly once in everything the run prints, whether the check runs before the process group
    starts (check_config) or after (check_layout)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone"] \
        if nproc > 1 else [sys.executable]
    result = subprocess.run([*launcher, os.path.join(ROOT, "train.py"), f"--data_dir={tiny_data_dir}",
                             "--dataset=tiny", f"--out_dir={tmp_path}", *TINY_MODEL_FLAGS, "--batch_size=4",
                             *flags], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and message in errors[0], result.stderr[-2000:]
    assert (result.stdout + result.stderr).count("error: ") == 1, result.stderr[-2000:]


def test_a_fine_tuning_error_prints_once_under_torchrun(tmp_path):
    """finetune_lora.py runs under torchrun too: its one-line errors print once, like train.py's."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                             os.path.join(ROOT, "finetune_lora.py"), f"--out_dir={tmp_path}"], capture_output=True,
                            text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count("error: ") == 1, result.stderr[-2000:]
    assert "error: --data is required" in result.stderr


def test_an_error_that_another_rank_alone_hits_still_prints(monkeypatch):
    """Ranks other than 0 keep quiet only while rank 0 can speak for them: after the grace period (here 0 s)
    a rank that is still running stops with its own message."""
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit, match="^error: only rank 1 sees this$"):
        run_main(lambda: sys.exit("error: only rank 1 sees this"), grace_s=0)
    run_main(lambda: None)                                 # a run that ends well is untouched


COUNT_ALLREDUCES = """\
import atexit, os, sys
sys.path.insert(0, {root!r})
import runtime
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
calls = [0]
class CountingDDP(runtime.DDP):   # DDP whose gradient all-reduces (one per bucket) are counted by a comm hook
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        def hook(state, bucket):
            calls[0] += 1
            return allreduce_hook(state, bucket)
        self.register_comm_hook(self.process_group, hook)
runtime.DDP = CountingDDP
out_dir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--out_dir="))
atexit.register(lambda: open(os.path.join(out_dir, "allreduces-" + os.environ["RANK"]), "w").write(str(calls[0])))
import train
train.main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, True])
def test_ddp_all_reduces_once_per_step_whatever_the_accumulation(compile, tiny_data_dir, tmp_path):
    """Under DDP the micro-steps before the last run in no_sync: 3 optimizer steps of 4 micro-batches
    all-reduce the gradients as often as 3 steps of 1 (once per bucket per step), compiled or not (issue 27.2:
    compiled, the accumulation code saw torch.compile's wrapper, not DDP, and all-reduced on every micro-step)."""
    script = tmp_path / "count_allreduces.py"
    script.write_text(COUNT_ALLREDUCES.format(root=ROOT))
    counts = {}
    for accum in (1, 4):
        out_dir = str(tmp_path / f"accum{accum}")
        run_train(out_dir, tiny_data_dir, 2, "--max_iters=3", "--eval_interval=3", f"--compile={compile}",
                  f"--gradient_accumulation_steps={accum}", script=str(script))
        counts[accum] = [int(open(os.path.join(out_dir, f"allreduces-{rank}")).read()) for rank in (0, 1)]
    assert counts[1][0] >= 3 and counts[4] == counts[1]
