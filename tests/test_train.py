"""train.py: the schedule, accumulation, exact resume, and the training loop end to end."""
import functools
import hashlib
import json
import math
import os
import shutil

import pytest
import torch

import checkpoints
import processes
import tokenfiles
import train
from conftest import TINY_MODEL_FLAGS, lr_at
from checkpoints import load_checkpoint
from test_distributed import assert_same_run


def lr_by_hand(step: int, peak: float, floor: float, warmup: int, decay_end: int) -> float:
    """GPT-3's schedule written out (Brown et al. 2020, appendix B): the warmup climbs in equal steps of
    peak / (warmup + 1), from the first one, to reach peak at step `warmup`; then a half cosine falls from peak
    to floor at step decay_end; floor after that."""
    if step < warmup:
        return peak / (warmup + 1) * (step + 1)
    if step > decay_end:
        return floor
    angle = math.pi * (step - warmup) / (decay_end - warmup)      # 0 -> pi
    return floor + (peak - floor) * (math.cos(angle) + 1) / 2


def test_lr_schedule_warmup_peak_and_end():
    cfg = train.TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    for step in range(130):
        assert lr_at(step, cfg) == pytest.approx(lr_by_hand(step, 1e-3, 1e-4, 10, 110), rel=1e-12), step
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 11)          # warmup starts above zero
    assert lr_at(10, cfg) == pytest.approx(1e-3)              # end of warmup: the peak
    assert lr_at(60, cfg) == pytest.approx((1e-3 + 1e-4) / 2)  # half-way through the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-4)             # end: min_lr
    assert lr_at(500, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))                  # decays monotonically
    constant = train.TrainConfig(learning_rate=1e-3, decay_lr=False)
    assert lr_at(0, constant) == lr_at(999, constant) == 1e-3


def test_gradient_accumulation_matches_one_big_batch(tiny_data_dir, tmp_path):
    """train.py with 2 accumulated micro-batches of 4 sequences against 1 batch of 8, on one process: each step
    draws the same 8 windows, and the micro-batches' losses, each divided by 2, add up to the big batch's
    mean loss, and so do their gradients. The same logged losses and gradient norms (before clipping, so a
    gradient off by a factor shows) at every step, and the same final weights."""
    runs = {accum: str(tmp_path / f"accum={accum}") for accum in (1, 2)}
    for accum, out_dir in runs.items():
        train.main([f"--data_dir={tiny_data_dir}", "--dataset=tiny", f"--out_dir={out_dir}", *TINY_MODEL_FLAGS,
                    f"--batch_size={8 // accum}", f"--gradient_accumulation_steps={accum}", "--max_iters=3",
                    "--eval_interval=3", "--eval_iters=1", "--log_interval=1", "--warmup_iters=1", "--dropout=0",
                    "--dtype=float32", "--device=cpu"])
    assert_same_run(runs[1], runs[2])


def test_read_batch_targets_are_inputs_shifted_by_one(tiny_data_dir):
    path = os.path.join(tiny_data_dir, "tiny", "train.bin")
    offsets = torch.tensor([0, 5, 100])
    x, y = tokenfiles.read_batch(path, offsets, 16)
    data = torch.from_numpy(__import__("numpy").fromfile(path, dtype="uint16").astype("int64"))
    for row, start in enumerate(offsets.tolist()):
        assert torch.equal(x[row], data[start:start + 16]) and torch.equal(y[row], data[start + 1:start + 17])


def read_log(out_dir: str) -> dict[int, float]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def train_flags(data_dir: str, out_dir: str, *extra: str) -> list[str]:
    return [f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out_dir}", *TINY_MODEL_FLAGS,
            "--batch_size=4", "--gradient_accumulation_steps=2", "--eval_iters=2", "--log_interval=1",
            "--warmup_iters=2", "--lr_decay_iters=12", "--dropout=0.1", "--seed=7", *extra]


def test_resume_continues_exactly(tiny_data_dir, tmp_path):
    """12 steps straight and 6 steps + resume + 6 steps give identical losses and identical weights (CPU,
    fp32): the checkpoint holds the weights, AdamW's moments, the step, and every RNG (dropout, batches)."""
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    train.main(train_flags(tiny_data_dir, straight, "--max_iters=12", "--eval_interval=6"))
    train.main(train_flags(tiny_data_dir, interrupted, "--max_iters=6", "--eval_interval=6"))
    train.main(train_flags(tiny_data_dir, interrupted, "--max_iters=12", "--eval_interval=6",
                           "--init_from=resume"))
    assert read_log(straight) == read_log(interrupted)
    assert len(read_log(straight)) == 12
    a = load_checkpoint(os.path.join(straight, "ckpt.pt"))
    b = load_checkpoint(os.path.join(interrupted, "ckpt.pt"))
    assert a["step"] == b["step"] == 12
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def logged_records(out_dir: str, after: int = 0) -> list[dict]:
    """metrics.jsonl's lines after step `after`, without the timing fields (they differ between any two runs)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in r.items() if k not in ("ms_per_step", "tokens_per_s", "mfu")}
                for r in map(json.loads, f) if r["step"] > after]


@pytest.fixture
def issue_run(tiny_data_dir, tmp_path, monkeypatch) -> str:
    """The issue's run, in a fresh working directory whose data/shakespeare holds the tiny dataset (so the
    default --data_dir and --dataset find it): 10 steps of lr 1e-3, warmup 2, decay over 10 steps, batch 4
    (64 tokens per step), in out_dir 'straight', keeping its step-5 checkpoint as ckpt-000005.pt."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("data")
    os.symlink(os.path.join(tiny_data_dir, "tiny"), os.path.join("data", "shakespeare"))
    train.main(["--out_dir=straight", *TINY_MODEL_FLAGS, "--batch_size=4", "--learning_rate=1e-3",
                "--warmup_iters=2", "--lr_decay_iters=10", "--max_iters=10", "--eval_interval=5", "--eval_iters=2",
                "--log_interval=1", "--keep_last=3", "--dropout=0.1"])
    return "straight"


def test_bare_resume_continues_the_run_with_its_own_flags(issue_run, capsys):
    """Issue 13: --init_from=resume restored the model only; every run flag fell back to its default, so a run
    of lr 1e-3, warmup 2, decay over 10 steps and batch 4, resumed bare at step 5, went back into warmup at
    2e-3 with 256 tokens per step instead of 64. Its step-5 checkpoint, moved to ./out (the default out_dir)
    and resumed with no other flag, logs the uninterrupted run's losses, learning rates and token counts."""
    os.makedirs("out")
    shutil.copy(os.path.join(issue_run, "ckpt-000005.pt"), os.path.join("out", "ckpt.pt"))
    capsys.readouterr()
    train.main(["--init_from=resume"])
    assert "resume:" not in capsys.readouterr().out          # nothing given, so nothing changed
    resumed = logged_records("out")
    assert resumed == logged_records(issue_run, after=5)
    assert [r["tokens"] for r in resumed if "loss" in r] == [64 * step for step in range(6, 11)]
    assert load_checkpoint(os.path.join("out", "ckpt.pt"))["step"] == 10   # ./out, not the saved out_dir


def test_resume_flags_given_win_and_are_reported_once(issue_run, capsys):
    """A flag given with --init_from=resume wins over the checkpoint's value and is printed once, as
    'resume: name old -> new (command line)' (a flag given with the saved value is not); the rest of the saved
    run goes on: the learning rates after step 5 follow the saved warmup and decay with the new peak, at the
    saved batch's 64 tokens per step. A model field that changes no shape (sparse_topk, realformer) is
    honoured and reported the same way."""
    capsys.readouterr()
    train.main([f"--out_dir={issue_run}", "--init_from=resume", f"--resume_from={issue_run}/ckpt-000005.pt",
                "--learning_rate=5e-4", "--sparse_topk=4", "--realformer", "--max_iters=8", "--dropout=0.1"])
    reported = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resume:")]
    assert reported == ["resume: max_iters 10 -> 8 (command line)",
                        "resume: learning_rate 0.001 -> 0.0005 (command line)",
                        "resume: sparse_topk 0 -> 4 (command line)",
                        "resume: realformer False -> True (command line)"]
    records = [r for r in logged_records(issue_run, after=5) if "loss" in r]
    # the learning rate of step s - 1 (0-based) is logged after it, as step s: warmup 2, decay over 10 steps
    assert [r["lr"] for r in records] == pytest.approx([lr_by_hand(r["step"] - 1, 5e-4, 2e-4, 2, 10)
                                                        for r in records], rel=1e-12)
    assert [r["tokens"] for r in records] == [64 * step for step in range(6, 9)]
    checkpoint = load_checkpoint(os.path.join(issue_run, "ckpt.pt"))
    assert checkpoint["step"] == 8 and checkpoint["train_config"]["eval_iters"] == 2
    assert checkpoint["model_config"]["sparse_topk"] == 4 and checkpoint["model_config"]["realformer"]


def test_training_lowers_the_loss_and_checkpoint_reloads(tiny_data_dir, tmp_path):
    out_dir = str(tmp_path / "out")
    train.main(train_flags(tiny_data_dir, out_dir, "--max_iters=40", "--eval_interval=20",
                           "--learning_rate=1e-2", "--lr_decay_iters=40", "--dropout=0"))
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[0]["val_loss"] == pytest.approx(math.log(64), abs=0.3)   # untrained: near uniform
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    checkpoint = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])
    assert checkpoint["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in evals))
    assert checkpoint["model_config"]["n_embd"] == 32 and checkpoint["train_config"]["max_iters"] == 40


def test_eval_only_leaves_the_run_untouched(tiny_data_dir, tmp_path, capsys):
    out_dir = str(tmp_path / "out")
    train.main(train_flags(tiny_data_dir, out_dir, "--max_iters=2", "--eval_interval=2"))
    before = open(os.path.join(out_dir, "ckpt.pt"), "rb").read()
    capsys.readouterr()
    train.main(train_flags(tiny_data_dir, out_dir, "--max_iters=2", "--eval_only", "--init_from=resume"))
    assert "val loss" in capsys.readouterr().out
    assert open(os.path.join(out_dir, "ckpt.pt"), "rb").read() == before


def probe_answers(monkeypatch, *answers: float) -> list[float]:
    """Stand in for the bf16 speed probe: each call answers the next of answers (a real probe's figure
    differs from call to call); returns the list of answers given so far."""
    given, queue = [], list(answers)
    monkeypatch.setattr(processes, "cpu_bf16_speedup", lambda: given.append(queue.pop(0)) or given[-1])
    return given


@pytest.mark.parametrize("speedup", [1.5, 1.46])   # either side of the threshold, 1.46 printed as 1.5 once
def test_auto_dtype_on_cpu_follows_the_probe_and_the_resume_keeps_it(tiny_data_dir, tmp_path, monkeypatch, capsys,
                                                                     speedup):
    """--dtype=auto on a CPU trains in bf16 where bf16 matmuls run >= 1.5x fp32's speed, says why in the header,
    and records the choice: a resume computes in it even where the probe would now answer otherwise. The probe
    runs once: the header's figure is the one the choice was made on, even near the threshold, where a second
    probe (here answering on the other side of 1.5x) would contradict it."""
    given = probe_answers(monkeypatch, speedup, 5.5 - speedup, 5.5 - speedup)
    expected = "bfloat16" if speedup >= 1.5 else "float32"
    out_dir = str(tmp_path / "run")
    train.main(train_flags(tiny_data_dir, out_dir, "--max_iters=2", "--eval_interval=2", "--device=cpu"))
    header = capsys.readouterr().out
    assert given == [speedup]                                                   # one probe
    assert f"1 x cpu, {expected} (auto: bf16 matmuls run {speedup:.2f}x fp32's speed here)" in header
    assert load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["train_config"]["dtype"] == expected
    train.main(train_flags(tiny_data_dir, out_dir, "--init_from=resume", "--max_iters=4", "--eval_interval=2",
                           "--device=cpu"))
    assert f"1 x cpu, {expected}\n" in capsys.readouterr().out                 # the recorded dtype, no probe
    assert given == [speedup]
    assert load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["train_config"]["dtype"] == expected


def test_the_real_bf16_probe_runs_once_and_decides():
    """The real probe (no stand-in): a positive figure, measured once per process however often it is asked,
    and the choice follows it."""
    processes.cpu_bf16_speedup.cache_clear()
    speedup = processes.cpu_bf16_speedup()
    assert 0 < speedup < 1000 and processes.cpu_bf16_speedup.cache_info().misses == 1
    dtype, words = processes.choose_dtype("auto", "cpu")
    assert processes.cpu_bf16_speedup.cache_info().misses == 1
    assert dtype == (torch.bfloat16 if speedup >= 1.5 else torch.float32)
    assert words == f"{processes.dtype_name(dtype)} (auto: bf16 matmuls run {speedup:.2f}x fp32's speed here)"


@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_dtype_on_a_gpu_is_bf16_only_where_it_is_native(monkeypatch, capability, expected):
    """A V100 (7.0) or T4 (7.5) computes bf16 only by emulation, though torch.cuda.is_bf16_supported() says
    True there by default: auto must pick fp16 (with loss scaling) on them, bf16 from Ampere (8.0) on."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    dtype, words = processes.choose_dtype("auto", "cuda")
    assert dtype == expected
    assert words == f"{processes.dtype_name(expected)} (auto: compute capability {capability[0]}.{capability[1]})"


@pytest.mark.parametrize("layout", [["--tp=2"], ["--pp=2"], ["--fsdp"]])
def test_auto_dtype_resolved_to_float16_is_refused_by_the_layouts_without_loss_scaling(
        tiny_data_dir, tmp_path, monkeypatch, layout):
    """On a V100 --dtype=auto resolves to float16, which --tp, --pp and --fsdp cannot scale: the refusal must
    look at the resolved dtype (it once looked at the flag's string, 'auto', and let float16 through). Two
    processes on a V100 are stood in for: the process setup and the GPU's compute capability."""
    monkeypatch.setattr(train, "setup_distributed", lambda device: (0, 0, 2, "cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    with pytest.raises(SystemExit) as stop:
        train.main(train_flags(tiny_data_dir, str(tmp_path / "run"), *layout, "--n_layer=2"))
    flag = layout[0].split("=")[0]
    assert str(stop.value.code) == (
        f"error: --dtype=auto chose float16 (this GPU has no native bf16), which needs a gradient scaler that "
        f"{flag} does not support here; use --dtype=float32 (bfloat16 is emulated, slower, here)")
    assert not os.path.exists(tmp_path / "run")                                  # refused before any file


@pytest.mark.slow
def test_all_processes_take_rank_0s_dtype_choice(tmp_path):
    """Under torchrun the probe runs on rank 0 and every process decides from its figure: two processes whose
    own probes would disagree (1.2x and 4.0x) both compute in fp32 and describe the 1.20x they chose on."""
    import subprocess
    import sys
    from conftest import ROOT
    script = tmp_path / "choose.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {ROOT!r})
import torch.distributed as dist
import checkpoints
import processes
rank = int(os.environ["RANK"])
processes.cpu_bf16_speedup = lambda: (1.2, 4.0)[rank]
dist.init_process_group("gloo")
dtype, words = processes.choose_dtype("auto", "cpu")
print(f"rank {{rank}}: {{dtype}} | {{words}}")
dist.destroy_process_group()
""")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                             str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for rank in (0, 1):
        assert f"rank {rank}: torch.float32 | float32 (auto: bf16 matmuls run 1.20x fp32's speed here)" in \
            result.stdout, result.stdout


@pytest.mark.slow
def test_float16_trains_with_the_gradient_scaler_and_resumes_exactly(tiny_data_dir, tmp_path, monkeypatch):
    """--dtype=float16 end to end on the CPU: fp16 autocast with loss scaling (torch.amp.GradScaler,
    Micikevicius et al. 2018). The loss falls; the logged gradient norm is the true one (unscaled before
    clipping: an fp32 run's at step 1, not 2^16 times it); the checkpoint holds the scaler's state: PyTorch's
    initial scale 2^16, kept (no step overflowed, and it grows only after 2000 good ones), and 20 good steps
    counted; 10 steps + resume + 10 give the straight run's losses, weights and scaler state. Started at a
    scale of 2^30 instead, the scaled fp16 gradients overflow: the scaler skips those steps (their logged norm
    is not finite; the weights stay: an update with them would make every weight NaN), halving its scale after
    each, until the gradients fit, and the run trains on from there."""
    def run(out_dir: str, *extra: str) -> None:
        train.main(train_flags(tiny_data_dir, str(tmp_path / out_dir), "--learning_rate=1e-2",
                               "--lr_decay_iters=20", "--eval_interval=10", *extra))
    run("straight", "--max_iters=20", "--dtype=float16")
    run("interrupted", "--max_iters=10", "--dtype=float16")
    run("interrupted", "--max_iters=20", "--init_from=resume")
    run("fp32", "--max_iters=1", "--dtype=float32")
    records = logged_records(str(tmp_path / "straight"), after=-1)
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0] - 1.0
    grad_norm = {name: next(r["grad_norm"] for r in logged_records(str(tmp_path / name)) if "grad_norm" in r)
                 for name in ("straight", "fp32")}
    assert grad_norm["straight"] == pytest.approx(grad_norm["fp32"], rel=1e-3)
    assert records == logged_records(str(tmp_path / "interrupted"), after=-1)
    a, b = (load_checkpoint(str(tmp_path / name / "ckpt.pt")) for name in ("straight", "interrupted"))
    assert a["train_config"]["dtype"] == b["train_config"]["dtype"] == "float16"
    assert a["scaler"] == b["scaler"] == {"scale": 2.0 ** 16, "growth_factor": 2.0, "backoff_factor": 0.5,
                                          "growth_interval": 2000, "_growth_tracker": 20}
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 30))
    run("overflowing", "--max_iters=20", "--dtype=float16", "--eval_interval=5")
    records = logged_records(str(tmp_path / "overflowing"), after=-1)
    norms = [r["grad_norm"] for r in records if "grad_norm" in r]
    skipped = sum(not math.isfinite(norm) for norm in norms)
    first_update = next(step for step, norm in enumerate(norms, 1) if math.isfinite(norm))
    assert first_update > 5 and skipped < 15
    assert load_checkpoint(str(tmp_path / "overflowing" / "ckpt.pt"))["scaler"]["scale"] == 2.0 ** (30 - skipped)
    evals = {r["step"]: (r["train_loss"], r["val_loss"]) for r in records if "val_loss" in r}
    assert evals[5] == evals[0]                                          # 5 skipped steps: the same weights
    assert evals[20][1] < evals[0][1] - 0.3


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_data_dir, tmp_path, capsys, monkeypatch):
    """--compile=True on the CPU (torch.compile's inductor, C++ kernels; about 30 s to compile on a 2-core
    CPU): the model is compiled, and 3 steps give the eager run's losses and weights to float rounding (fp32,
    no dropout: compiled dropout draws other masks); the checkpoint's keys carry no _orig_mod. prefix."""
    compiled_modules, compile_module = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: (compiled_modules.append(type(module).__name__),
                                                                compile_module(module, **kw))[1])
    runs = {}
    for compile in (False, True):
        runs[compile] = str(tmp_path / f"compile_{compile}")
        train.main(train_flags(tiny_data_dir, runs[compile], "--max_iters=3", "--eval_interval=3",
                               "--dropout=0", "--dtype=float32", f"--compile={compile}"))
        assert (", compiled" in capsys.readouterr().out) == compile
        assert compiled_modules == (["GPT"] if compile else [])
    eager, compiled = (logged_records(runs[c], after=-1) for c in (False, True))
    assert [r.keys() for r in eager] == [r.keys() for r in compiled] and len(eager) == 3 + 2
    for a, b in zip(eager, compiled):
        for key in ("loss", "grad_norm", "train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a, b)
    weights = [load_checkpoint(os.path.join(runs[c], "ckpt.pt"))["model"] for c in (False, True)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=0, atol=1e-5, msg=name)


def test_keep_best_false_never_links_ckpt_best(tiny_data_dir, tmp_path, monkeypatch):
    """Every evaluation of these runs lowers the val loss, so each would be the best: by default ckpt-best.pt is
    linked to it; with --keep_best=False no ckpt-best.pt is ever made (none of the run's hard links is one, and
    none is left), while ckpt.pt and the --keep_last links are kept as usual."""
    linked = []
    link = checkpoints.link_atomically
    monkeypatch.setattr(checkpoints, "link_atomically",
                        lambda source, path: (linked.append(path), link(source, path)))
    runs = {}
    for keep_best in (True, False):
        runs[keep_best] = str(tmp_path / f"keep_best_{keep_best}")
        linked.clear()
        train.main(train_flags(tiny_data_dir, runs[keep_best], "--max_iters=6", "--eval_interval=2",
                               "--learning_rate=1e-2", "--keep_last=2", f"--keep_best={keep_best}",
                               "--dtype=float32"))
        evals = [r["val_loss"] for r in logged_records(runs[keep_best], after=-1) if "val_loss" in r]
        assert len(evals) == 4 and all(b < a for a, b in zip(evals, evals[1:]))       # each one the best yet
        made = sorted({os.path.basename(path) for path in linked})
        assert made == sorted(["ckpt-000000.pt", "ckpt-000002.pt", "ckpt-000004.pt", "ckpt-000006.pt"]
                              + (["ckpt-best.pt"] if keep_best else []))
    assert sorted(os.listdir(runs[True])) == ["ckpt-000004.pt", "ckpt-000006.pt", "ckpt-best.pt", "ckpt.pt",
                                              "metrics.jsonl"]
    assert sorted(os.listdir(runs[False])) == ["ckpt-000004.pt", "ckpt-000006.pt", "ckpt.pt", "metrics.jsonl"]


def test_verify_data_false_reads_a_changed_train_bin_without_hashing_it(tiny_data_dir, tmp_path, monkeypatch):
    """meta.json records the sha256 of train.bin and val.bin (as prepare.py writes it). A train.bin changed
    afterwards (one token, same size) is refused by default, in one line; --verify_data=False trains on it
    and hashes neither file."""
    data_dir = tmp_path / "data"
    shutil.copytree(os.path.join(tiny_data_dir, "tiny"), data_dir / "tiny")
    meta_path = data_dir / "tiny" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = {name: hashlib.sha256((data_dir / "tiny" / name).read_bytes()).hexdigest()
                      for name in ("train.bin", "val.bin")}
    meta_path.write_text(json.dumps(meta))
    tokens = (data_dir / "tiny" / "train.bin").read_bytes()
    (data_dir / "tiny" / "train.bin").write_bytes(bytes([(tokens[0] + 1) % 64]) + tokens[1:])
    hashed = []
    monkeypatch.setattr(tokenfiles, "sha256_file", lambda path: (hashed.append(os.path.basename(path)),
                                                            checkpoints.sha256_file(path))[1])
    with pytest.raises(SystemExit) as stop:
        train.main(train_flags(str(data_dir), str(tmp_path / "verified"), "--max_iters=2", "--eval_interval=2",
                               "--dtype=float32"))
    message = str(stop.value.code)
    assert message.startswith("error: ") and "train.bin does not match the sha256" in message
    assert "\n" not in message and hashed == ["train.bin"]
    hashed.clear()
    train.main(train_flags(str(data_dir), str(tmp_path / "unverified"), "--max_iters=2", "--eval_interval=2",
                           "--dtype=float32", "--verify_data=False"))
    assert hashed == [] and load_checkpoint(str(tmp_path / "unverified" / "ckpt.pt"))["step"] == 2


def test_the_header_says_compiled_only_where_the_steps_are():
    """On CUDA the steps compile by default, but never under --tp or --pp: the run's header must not say
    'compiled' there (issue 27.7)."""
    assert train.is_compiled(train.TrainConfig(), "cuda") and not train.is_compiled(train.TrainConfig(), "cpu")
    assert not train.is_compiled(train.TrainConfig(pp=2), "cuda")
    assert not train.is_compiled(train.TrainConfig(tp=2), "cuda")
    assert train.is_compiled(train.TrainConfig(compile=True), "cpu")
