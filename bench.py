"""Measure this machine: training speed and memory, sampling speed, and data-preparation throughput.

    python bench.py                                  # nanoGPT's comparison config on the current device
    python bench.py --preset=gpt2 --gradient_accumulation_steps=1 --batch_size=16 --vocab_size=50304  # on a GPU
    python bench.py --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --parts=train,sample
    python bench.py --parts=soak --soak_steps=2000 --n_layer=2 --n_embd=64 --block_size=64
    python bench.py --parts=stages,pipeline --pp=2 --n_layer=8       # pipeline stages against the cost model
    python bench.py --baseline=../nanoGPT                            # side by side with a nanoGPT checkout

Every measurement runs --repeats times and is reported as the median with its spread: one JSON line per
figure on stdout, then a readable table. Training runs train.py itself, in a fresh process per repeat, so the
figures are what a user gets. train.py's loop, layout and model flags (BenchRunConfig, GPTConfig) and --preset
pass through to those runs; without model flags the model is the one nanoGPT was measured with
(docs/performance.md). --baseline runs a nanoGPT checkout beside this project; --parts=limits gives the
training and sampling figures as shares of the machine's matmul peak and memory bandwidth.
"""
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flags import RunConfig, flags_given, parse_args
from measure import (cpu_description, matmul_flops, peak_cuda_mib, print_table, run_script, seconds_per_call,
                     steady_step_ms, summarize, synchronize)
from model import GPT, GPTConfig, arg, build_stage, flops_per_token, generate, plan_stages, stage_costs
from planner import LayoutConfig, microbatches
from presets import PRESETS, apply_preset
from processes import autocast, choose_dtype, dtype_name, peak_flops, pick_device, sampling_dtype, should_compile
from tokenfiles import draw_windows, read_batch, to_device
from tokenization import seed_tiktoken_cache

ROOT = os.path.dirname(os.path.abspath(__file__))
PARTS = ("gpu_tests", "prepare", "train", "sample", "soak", "stages", "pipeline", "vs_nanogpt", "limits")

# nanoGPT's measured configuration (its train.py flags): the defaults here unless flags say otherwise.
COMPARISON_CONFIG = dict(n_layer=4, n_head=4, n_embd=256, block_size=256, batch_size=8,
                         gradient_accumulation_steps=1, dropout=0.0, bias=False)
# The flags bench.py sets itself on its training runs (the bench flags in brackets control them).
RUN_FLAGS = ("data_dir", "dataset", "out_dir", "init_from", "max_iters", "eval_interval", "eval_iters",
             "log_interval", "eval_only", "dry_run", "resume_from")


@dataclass
class BenchRunConfig(LayoutConfig, RunConfig):
    """The flags of train.py that bench.py's runs take from its command line: the loop's, the layout's and the
    preset (the model's are GPTConfig's); bench.py sets the data, the files and the schedule itself."""
    preset: str | None = arg(None, "a named model and its published recipe (PRESETS in presets.py); flags given on "
                                   "the command line win", choices=tuple(PRESETS))


@dataclass
class BenchConfig:
    parts: str = arg("prepare,train,sample,limits", f"comma-separated measurements out of {','.join(PARTS)} "
                                                    f"(with --baseline and no --parts: vs_nanogpt,limits)")
    repeats: int = arg(3, "runs of each measurement; figures are the median, with min and max")
    warmup_steps: int = arg(5, "training steps run before timing starts (warm caches, compile)")
    train_steps: int = arg(20, "timed training steps per run")
    sample_tokens: int = arg(200, "new tokens per sampling run")
    sample_batch_sizes: str = arg("1,8", "comma-separated batch sizes of the sampling runs")
    soak_steps: int = arg(2000, "steps of the soak run (--parts=soak): RSS, open files and slow steps")
    baseline: str = arg("", "a nanoGPT source tree (its train.py, model.py, configurator.py, sample.py): adds "
                            "the vs_nanogpt part, nanoGPT and this project trained and sampled alternately here")
    bandwidth_mib: int = arg(256, "MiB of the buffer the memory-bandwidth measurement streams (--parts=limits): "
                                  "well above the last-level cache")
    bench_dir: str = arg("", "where the prepared sample and the runs' outputs go (default: a temporary "
                             "directory, removed afterwards)")
    json_out: str = arg("", "also append the JSON lines to this file")


# --- running the project's scripts as a user would ---

# train.py's main() in a fresh interpreter, reporting torch's peak GPU allocation when it is done.
TRAIN_RUNNER = ("import sys, torch, train; train.main(sys.argv[1:]); "
                "print('peak_cuda_bytes', torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)")


def train_argv(passthrough: list[str], data_dir: str | None, out_dir: str, max_iters: int,
               eval_interval: int | None = None, launcher: tuple[str, ...] = ("-c", TRAIN_RUNNER)) -> list[str]:
    """train.py's flags for a timed run: every step logged; evaluation (one batch) and checkpoint at the start
    and the end, or every eval_interval steps. data_dir None for nanoGPT's, which reads data/ in its folder."""
    return [*launcher, *passthrough, *([f"--data_dir={data_dir}"] if data_dir else []), "--dataset=shakespeare",
            f"--out_dir={out_dir}", f"--max_iters={max_iters}", f"--eval_interval={eval_interval or max_iters}",
            "--eval_iters=1", "--log_interval=1"]


def bench_gpu_tests() -> list[dict]:
    """The GPU tests (tests/test_gpu.py, marker gpu) in a fresh process: how many passed, failed and were skipped
    (all, with the reason, without CUDA). A failure's lines go to stderr; the other parts still run."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfs", "-p", "no:cacheprovider",
                             os.path.join(ROOT, "tests")], capture_output=True, text=True, cwd=ROOT)
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", result.stdout)}
    if result.returncode != 0:
        print(result.stdout[-4000:], result.stderr[-2000:], file=sys.stderr)
    return [summarize(f"gpu_tests_{kind}", "tests", [counts.get(kind, 0)]) for kind in ("passed", "failed", "skipped")]


def bench_prepare(cfg: BenchConfig, work_dir: str) -> tuple[list[dict], str]:
    """Tokenize the built-in Shakespeare sample end to end with prepare.py; returns the last data_dir."""
    seconds = []
    for repeat in range(cfg.repeats):
        data_dir = os.path.join(work_dir, f"data-{repeat}")
        seconds.append(run_script([os.path.join(ROOT, "prepare.py"), f"--data_dir={data_dir}"], cwd=work_dir)[2])
    with open(os.path.join(data_dir, "shakespeare", "meta.json")) as f:
        meta = json.load(f)
    rates = [(meta["train_tokens"] + meta["val_tokens"]) / s for s in seconds]
    owt_hours = [9e9 / r / 3600 for r in rates]     # OpenWebText: ~9B tokens
    return [summarize("prepare_seconds", "s", seconds), summarize("prepare_tokens_per_s", "tokens/s", rates),
            summarize("prepare_openwebtext_projection", "hours", owt_hours)], data_dir


def model_flops_per_token(model_cfg: GPTConfig, seq_len: int) -> float:
    """flops_per_token of the model, its parameters counted on the meta device (no weights are allocated)."""
    with torch.device("meta"):
        return flops_per_token(model_cfg, GPT(model_cfg).num_params(), seq_len)


def bench_train(cfg: BenchConfig, train_cfg: BenchRunConfig, model_cfg: GPTConfig, passthrough: list[str],
                data_dir: str, work_dir: str, device: str) -> list[dict]:
    """ms per step and tokens/s of train.py runs, their MFU (on a GPU) or GFLOP/s, peak memory (the process's whole
    RSS, and torch's peak allocation on a GPU) and the data loader's share of a step."""
    tokens_per_step = train_cfg.batch_size * train_cfg.gradient_accumulation_steps * model_cfg.block_size
    step_ms, rss, cuda_peak = [], [], []
    for repeat in range(cfg.repeats):
        out_dir = os.path.join(work_dir, f"train-{repeat}")
        output, peak_rss, _ = run_script(train_argv(passthrough, data_dir, out_dir,
                                                    cfg.warmup_steps + cfg.train_steps), cwd=ROOT)
        step_ms.append(statistics.median(steady_step_ms(out_dir, cfg.warmup_steps)))
        rss.append(peak_rss)
        cuda_peak.append(peak_cuda_mib(output))
        shutil.rmtree(out_dir)
    flops_per_step = model_flops_per_token(model_cfg, model_cfg.block_size) * tokens_per_step
    peak = peak_flops(device)
    return [summarize("train_ms_per_step", "ms", step_ms),
            summarize("train_tokens_per_s", "tokens/s", [tokens_per_step / (ms / 1000) for ms in step_ms]),
            summarize("train_mfu", "%", [100 * flops_per_step / (ms / 1000) / peak for ms in step_ms]) if peak else
            summarize("train_gflops", "GFLOP/s", [flops_per_step / (ms / 1000) / 1e9 for ms in step_ms]),
            *([summarize("train_peak_memory", "MiB (max_memory_allocated)", cuda_peak)] if device.startswith("cuda")
              else []),   # on every GPU, listed in processes.PEAK_BF16_FLOPS or not
            summarize("train_peak_rss", "MiB", rss),
            summarize("train_data_loader_share", "% of step",
                      data_loader_share(data_dir, train_cfg, model_cfg, device, statistics.median(step_ms)))]


def data_loader_share(data_dir: str, train_cfg: BenchRunConfig, model_cfg: GPTConfig, device: str,
                      step_ms: float, repeats: int = 50) -> list[float]:
    """Time train.py's batch reading (memmap windows -> tensors on the device) for one step's micro-batches,
    as a share of the median step time."""
    path = os.path.join(data_dir, "shakespeare", "train.bin")
    n_tokens = os.path.getsize(path) // 2
    generator = torch.Generator().manual_seed(0)
    shares = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(train_cfg.gradient_accumulation_steps):
            offsets = draw_windows(n_tokens, model_cfg.block_size, train_cfg.batch_size, generator)
            to_device(*read_batch(path, offsets, model_cfg.block_size), device)
            synchronize(device)
        shares.append(100 * (time.perf_counter() - start) * 1000 / step_ms)
    return shares


def sample_stamps(model: GPT, batch_size: int, n_tokens: int, device: str, dtype: torch.dtype, compile: bool,
                  seed: int) -> list[float]:
    """perf_counter() before generate() starts and after each new token reaches the host, sampling as
    generate.py does (temperature 0.8, top-k 200) after a one-token prompt."""
    prompt = torch.zeros((batch_size, 1), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    stamps = [time.perf_counter()]
    with autocast(device, dtype):
        for token in generate(model, prompt, n_tokens, 0.8, 200, 1.0, None, generator, compile=compile):
            token.cpu()                                   # wait for the step, as a streaming caller does
            stamps.append(time.perf_counter())
    return stamps


def sampling_setup(train_cfg: BenchRunConfig, model_cfg: GPTConfig, device: str) -> tuple[GPT, torch.dtype, bool]:
    """The model sampled from (fresh weights: the speed does not depend on them), its dtype, and whether
    its steps are compiled (generate.py's defaults)."""
    torch.manual_seed(train_cfg.seed)
    model = GPT(dataclasses.replace(model_cfg, dropout=0.0)).to(device).eval()
    return model, sampling_dtype(train_cfg.dtype, device), should_compile(train_cfg.compile, device)


def bench_sample(cfg: BenchConfig, train_cfg: BenchRunConfig, model_cfg: GPTConfig, device: str) -> list[dict]:
    """Tokens/s of generate() with the KV cache, as generate.py samples (temperature 0.8, top-k 200), and
    the time of single steps early (token 10) and late (the last token) to show no slowdown as it grows."""
    model, dtype, compile_steps = sampling_setup(train_cfg, model_cfg, device)
    figures, token10 = [], min(10, cfg.sample_tokens)        # stamps[i] follows token i
    for batch_size in [int(b) for b in cfg.sample_batch_sizes.split(",")]:
        runs = [sample_stamps(model, batch_size, cfg.sample_tokens, device, dtype, compile_steps, seed)
                for seed in range(cfg.repeats + 1)][1:]          # the first run (seed 0) warms up and is not counted
        figures += [summarize(f"sample_tokens_per_s_batch{batch_size}", "tokens/s",
                              [batch_size * cfg.sample_tokens / (t[-1] - t[0]) for t in runs]),
                    summarize(f"sample_ms_at_token10_batch{batch_size}", "ms",
                              [1000 * (t[token10] - t[token10 - 1]) for t in runs]),
                    summarize(f"sample_ms_at_last_token_batch{batch_size}", "ms",
                              [1000 * (t[-1] - t[-2]) for t in runs])]
    return figures


def bench_soak(cfg: BenchConfig, passthrough: list[str], data_dir: str, work_dir: str) -> list[dict]:
    """One long run that evaluates and checkpoints every 100 steps: its RSS and open file handles at step 100
    against their peak afterwards, and the slowest step against the median (train.py keeps evaluation and
    checkpoint time out of the steps' times)."""
    if not os.path.isdir("/proc/self/fd"):
        sys.exit("error: --parts=soak reads /proc for the run's RSS and open files; it needs Linux")
    out_dir = os.path.join(work_dir, "soak")
    by_step = {}

    def watch(line: str, pid: int) -> None:
        if match := re.match(r"step (\d+)/", line):
            with open(f"/proc/{pid}/status") as f:
                rss_kib = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
            by_step[int(match.group(1))] = (rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd")))

    run_script(train_argv(passthrough, data_dir, out_dir, cfg.soak_steps, eval_interval=100), cwd=ROOT,
               watch=watch)
    step_ms = steady_step_ms(out_dir, 0)
    reference = min(100, cfg.soak_steps)
    rss_at, files_at = by_step[reference]
    later = [v for step, v in sorted(by_step.items()) if step > reference] or [by_step[reference]]
    first_half, second_half = later[:len(later) // 2] or later, later[len(later) // 2:]
    median = statistics.median(step_ms)
    # A leak climbs; the allocator's reuse of freed buffers swings RSS up and down around a level. The trend
    # (peak of the second half against the first) tells the two apart.
    return [summarize("soak_rss_at_step100", "MiB", [rss_at]),
            summarize("soak_rss_growth_after_step100", "%", [100 * (max(r for r, _ in later) / rss_at - 1)]),
            summarize("soak_rss_trend_second_half_vs_first", "%",
                      [100 * (max(r for r, _ in second_half) / max(r for r, _ in first_half) - 1)]),
            summarize("soak_open_files_growth_after_step100", "files", [max(f for _, f in later) - files_at]),
            summarize("soak_slowest_step_over_median", "x", [max(step_ms) / median]),
            summarize("soak_median_step", "ms", [median])]


def bench_stages(cfg: BenchConfig, train_cfg: BenchRunConfig, model_cfg: GPTConfig, device: str) -> list[dict]:
    """Forward + backward time of each pipeline stage of the splitter's plan (--pp, --pp_balance) on one
    micro-batch, as a share of the total, next to the share the 'flops' cost model predicts."""
    plan = plan_stages(model_cfg, train_cfg.pp, train_cfg.pp_balance)
    block, first, last = stage_costs(model_cfg, "flops")
    predicted = [len(r) * block + first * (s == 0) + last * (s == len(plan) - 1) for s, r in enumerate(plan)]
    torch.manual_seed(train_cfg.seed)
    state = GPT(model_cfg).state_dict()
    micro_batch, T = max(1, train_cfg.batch_size // microbatches(train_cfg)), model_cfg.block_size
    ids = torch.randint(model_cfg.vocab_size, (micro_batch, T + 1), device=device)
    measured = []
    for s in range(len(plan)):
        stage = build_stage(model_cfg, plan, s, state).to(device).train()
        runs = []
        for repeat in range(cfg.repeats + 1):           # the first run warms up and is not counted
            x = ids[:, :-1] if s == 0 else torch.randn(micro_batch, T, model_cfg.n_embd, device=device,
                                                       requires_grad=True)
            start = time.perf_counter()
            out = stage(x)
            loss = (F.cross_entropy(out.flatten(0, 1).float(), ids[:, 1:].flatten()) if s == len(plan) - 1
                    else (out * torch.ones_like(out)).sum())   # a gradient of ones arriving from the next stage
            loss.backward()
            synchronize(device)
            runs.append(1000 * (time.perf_counter() - start))
        measured.append(statistics.median(runs[1:]))
    figures = []
    for s, (ms, cost) in enumerate(zip(measured, predicted)):
        figures += [summarize(f"stage{s}_forward_backward_ms", "ms", [ms]),
                    summarize(f"stage{s}_measured_share", "%", [100 * ms / sum(measured)]),
                    summarize(f"stage{s}_cost_model_share", "%", [100 * cost / sum(predicted)])]
    return figures + [summarize("stages_slowest_over_mean", "x", [max(measured) / statistics.mean(measured)])]


def bench_pipeline(cfg: BenchConfig, train_cfg: BenchRunConfig, passthrough: list[str], data_dir: str,
                   work_dir: str) -> list[dict]:
    """Step time of --pp stages under torchrun (one thread per process) against the ideal: the
    single-process, single-thread step time split over pp processes, stretched by the pipeline bubble
    (p-1)/(m+p-1) of m micro-batches: ideal = T1 / p * (m + p - 1) / m."""
    p, m = train_cfg.pp, microbatches(train_cfg)
    if p < 2:
        sys.exit("error: --parts=pipeline compares --pp stages with one process; give --pp=2 or more")
    torchrun = ("-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={p}", os.path.join(ROOT, "train.py"))
    single, piped = [], []
    runs = ((single, "single", [a for a in passthrough if not a.startswith("--pp=")], ("-c", TRAIN_RUNNER)),
            (piped, "pipeline", passthrough, torchrun))
    for repeat in range(cfg.repeats):
        for step_ms, name, flags, launcher in runs:
            out_dir = os.path.join(work_dir, f"{name}-{repeat}")
            run_script(train_argv(flags, data_dir, out_dir, cfg.warmup_steps + cfg.train_steps, launcher=launcher),
                       cwd=ROOT, env={"OMP_NUM_THREADS": "1"})
            step_ms.append(statistics.median(steady_step_ms(out_dir, cfg.warmup_steps)))
    ideal = [t / p * (m + p - 1) / m for t in single]
    return [summarize("pipeline_single_process_ms_per_step", "ms", single),
            summarize(f"pipeline_pp{p}_{train_cfg.pp_schedule}_ms_per_step", "ms", piped),
            summarize(f"pipeline_pp{p}_ideal_ms_per_step", "ms", ideal),
            summarize(f"pipeline_pp{p}_over_ideal", "x", [a / b for a, b in zip(piped, ideal)])]


# --- side by side with nanoGPT ---
#
# A speed ratio counts only when both sides ran on the same machine, in the same run: machines of one kind
# differ (AMX or not, clock, neighbours), and so does one machine from day to day. So nanoGPT and this project
# run alternately (A B A B ...), on the same model, batch and tokens, with the same Python, and each ratio is
# taken within a round.

NANOGPT_FILES = ("train.py", "model.py", "configurator.py", "sample.py")

# nanoGPT's unmodified train.py or sample.py (the first argument) through runpy, then torch's peak GPU allocation
# as TRAIN_RUNNER prints ours. GPT.generate (sample.py's) is wrapped in a timer: it calls the original with the
# same arguments and only prints how long each call took and how many tokens it added.
NANOGPT_RUNNER = """\
import runpy, sys, time
import torch
import model
generate = model.GPT.generate
def timed_generate(self, idx, max_new_tokens, *args, **kwargs):
    start = time.perf_counter()
    out = generate(self, idx, max_new_tokens, *args, **kwargs)
    print("nanogpt_generate", time.perf_counter() - start, out.size(1) - idx.size(1), flush=True)
    return out
model.GPT.generate = timed_generate
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
print("peak_cuda_bytes", torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)
"""


def check_baseline(path: str) -> str:
    """The absolute path of a nanoGPT source tree, or one error line."""
    if missing := [name for name in NANOGPT_FILES if not os.path.isfile(os.path.join(path, name))]:
        sys.exit(f"error: --baseline={path} is not a nanoGPT source tree (no {', '.join(missing)}); give the "
                 f"folder of a karpathy/nanoGPT checkout")
    return os.path.abspath(path)


def nanogpt_folder(baseline: str, data_dir: str, work_dir: str) -> str:
    """A folder nanoGPT runs in without a change to its tree: links to its four scripts, and data/shakespeare/
    linking our prepared tokens (nanoGPT reads data/<dataset>/{train,val}.bin, uint16 like ours, and
    configurator.py from the current folder; with no meta.pkl there it pads the vocabulary to 50,304)."""
    folder = os.path.join(work_dir, "nanogpt")
    shutil.rmtree(folder, ignore_errors=True)        # links left by an earlier run in the same --bench_dir
    os.makedirs(os.path.join(folder, "data", "shakespeare"))
    for name in NANOGPT_FILES:
        os.symlink(os.path.join(baseline, name), os.path.join(folder, name))
    for name in ("train.bin", "val.bin"):
        os.symlink(os.path.join(data_dir, "shakespeare", name), os.path.join(folder, "data", "shakespeare", name))
    return folder


def nanogpt_flags(train_cfg: BenchRunConfig, model_cfg: GPTConfig, device: str, compile_model: bool) -> list[str]:
    """nanoGPT's flags for our device, dtype and compile setting and our model and batch (COMPARISON_CONFIG's
    flags). nanoGPT's configurator literal_evals each value and wants the type of its default, hence 0.0 for a
    float. Off CUDA nanoGPT trains and samples in fp32 whatever --dtype says, so its flag says float32 there."""
    dtype = dtype_name(choose_dtype(train_cfg.dtype, device)[0]) if device.startswith("cuda") else "float32"
    ours = {**dataclasses.asdict(train_cfg), **dataclasses.asdict(model_cfg), "dropout": float(model_cfg.dropout)}
    return [f"--device={device}", f"--dtype={dtype}", f"--compile={compile_model}",
            *(f"--{name}={ours[name]}" for name in COMPARISON_CONFIG)]


def bench_vs_nanogpt(cfg: BenchConfig, train_cfg: BenchRunConfig, model_cfg: GPTConfig, passthrough: list[str],
                     baseline: str, data_dir: str, work_dir: str, device: str) -> list[dict]:
    """nanoGPT's train.py and sample.py against ours, alternately, --repeats rounds. A step's time is
    (wall(n2 steps) - wall(n1 steps)) / (n2 - n1), with n1 = --warmup_steps and n2 = n1 + --train_steps:
    the same outside clock for both, and start-up, evaluation and checkpoint cost the same in both runs, so
    they cancel (nanoGPT runs steps 0..max_iters, one more than ours: that cancels too). Peak RSS is the
    longer run's whole process. Sampling: batch 1, --sample_tokens new tokens after a one-token prompt,
    temperature 0.8, top-k 200; nanoGPT's sample.py (no KV cache) against our generate(); each side's first
    call warms up and is not counted."""
    folder = nanogpt_folder(baseline, data_dir, work_dir)
    # Python writes the bytecode of nanoGPT's model.py elsewhere than the user's tree.
    env = {"PYTHONPYCACHEPREFIX": os.path.join(work_dir, "pycache"),
           **seed_tiktoken_cache(os.path.join(work_dir, "tiktoken-cache"))}
    model, dtype, compile_steps = sampling_setup(train_cfg, model_cfg, device)
    flags = nanogpt_flags(train_cfg, model_cfg, device, compile_steps)
    n1, n2 = cfg.warmup_steps, cfg.warmup_steps + cfg.train_steps
    method = f"(wall({n2}) - wall({n1})) / {n2 - n1}"
    print(f"vs_nanogpt: nanoGPT's train.py {' '.join(flags)} --dataset=shakespeare | ours: train.py "
          f"{' '.join(passthrough)} | step time {method}", file=sys.stderr)
    tokens_per_step = train_cfg.batch_size * train_cfg.gradient_accumulation_steps * model_cfg.block_size
    on_gpu = device.startswith("cuda")   # then also torch's peak GPU allocation of each side's training and sampling
    units = {"train_ms_per_step": f"ms, {method}", "train_tokens_per_s": "tokens/s", "peak_rss": "MiB",
             "sample_tokens_per_s": f"tokens/s, batch 1, {cfg.sample_tokens} new tokens",
             "train_peak_gpu_memory": "MiB (max_memory_allocated)", "sample_peak_gpu_memory": "MiB (the same)"}
    runs = {side: {name: [] for name in units if on_gpu or "gpu" not in name} for side in ("nanogpt", "ours")}
    system_flags = [f for f in flags if f.startswith(("--device=", "--dtype=", "--compile="))]
    ng_out, our_out = os.path.join(work_dir, "nanogpt-out"), os.path.join(work_dir, "ours-out")
    for repeat in range(cfg.repeats):
        trained = {"nanogpt": [], "ours": []}    # each side's run_script (output, peak RSS, wall) for n1, then n2
        for n in (n1, n2):
            for out_dir in (ng_out, our_out):
                shutil.rmtree(out_dir, ignore_errors=True)
            trained["nanogpt"].append(run_script(
                train_argv(flags, None, ng_out, n, launcher=("-c", NANOGPT_RUNNER, "train.py")), cwd=folder, env=env))
            trained["ours"].append(run_script(train_argv(passthrough, data_dir, our_out, n), cwd=ROOT))
        for side, ((_, _, wall1), (output, rss, wall2)) in trained.items():   # the peak memory kept: the longer run's
            seconds = (wall2 - wall1) / (n2 - n1)
            if seconds <= 0:
                sys.exit(f"error: the {n2 - n1} timed steps took no measurable time; raise --train_steps")
            runs[side]["train_ms_per_step"].append(1000 * seconds)
            runs[side]["train_tokens_per_s"].append(tokens_per_step / seconds)
            runs[side]["peak_rss"].append(rss)
            if on_gpu:
                runs[side]["train_peak_gpu_memory"].append(peak_cuda_mib(output))
        # nanoGPT saved a checkpoint at its last evaluation (step n2): sample.py samples from it, twice.
        output, _, _ = run_script(["-c", NANOGPT_RUNNER, "sample.py", f"--out_dir={ng_out}", *system_flags,
                                   "--num_samples=2", f"--max_new_tokens={cfg.sample_tokens}", "--temperature=0.8",
                                   "--top_k=200"], cwd=folder, env=env)
        calls = [line.split()[1:] for line in output.splitlines() if line.startswith("nanogpt_generate ")]
        if len(calls) != 2:
            sys.exit(f"error: nanoGPT's sample.py made {len(calls)} timed generate() calls, not 2; is "
                     f"--baseline={baseline} nanoGPT?")
        runs["nanogpt"]["sample_tokens_per_s"].append(int(calls[1][1]) / float(calls[1][0]))   # new tokens / seconds
        sample_stamps(model, 1, cfg.sample_tokens, device, dtype, compile_steps, seed=0)     # the warm-up
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        stamps = sample_stamps(model, 1, cfg.sample_tokens, device, dtype, compile_steps, seed=1)
        runs["ours"]["sample_tokens_per_s"].append(cfg.sample_tokens / (stamps[-1] - stamps[0]))
        if on_gpu:
            runs["nanogpt"]["sample_peak_gpu_memory"].append(peak_cuda_mib(output))
            runs["ours"]["sample_peak_gpu_memory"].append(torch.cuda.max_memory_allocated(device) / 2**20)
    for out_dir in (ng_out, our_out):
        shutil.rmtree(out_dir, ignore_errors=True)
    figures = [summarize(f"vs_nanogpt_{side}_{name}", units[name], values) for side in runs
               for name, values in runs[side].items()]
    return figures + [summarize(f"vs_nanogpt_{name}_ratio", "x, ours / nanoGPT within each round",
                                [a / b for a, b in zip(runs["ours"][name], runs["nanogpt"][name])])
                      for name in ("train_tokens_per_s", "peak_rss", "sample_tokens_per_s")]


# --- the machine's limits: its matmul peak and its memory bandwidth ---
#
# A speed says little alone: 134 GFLOP/s is most of one CPU's matmul peak and a sliver of another's. Training
# is matmuls, so its ceiling is the GEMM peak at the model's own shapes; sampling one sequence reads every
# weight once per token, so its ceiling is the memory bandwidth over the bytes read per token.

def bytes_read_per_token(model_cfg: GPTConfig, n_tokens: int) -> float:
    """Bytes one sampling step at batch 1 reads from memory: every fp32 weight a token meets in a matmul
    (the weights of flops_per_token's 6N; the position embedding is a one-row lookup) and the KV cache,
    2 x L x C fp32 values per cached position, n_tokens / 2 positions on average."""
    matmul_weights = model_flops_per_token(model_cfg, 0) / 6     # seq_len 0 leaves just the 6N term
    cached = min(n_tokens / 2, model_cfg.block_size)
    return 4 * matmul_weights + 4 * 2 * model_cfg.n_layer * model_cfg.n_embd * cached


def bench_limits(cfg: BenchConfig, train_cfg: BenchRunConfig, model_cfg: GPTConfig, device: str,
                 cpu_flags: list[str]) -> tuple[list[dict], dict]:
    """The GEMM FLOP/s at each of the model's matmul shapes in fp32, in bf16 where the hardware has it, and in
    the run's dtype; each dtype's peak is its best shape. The memory bandwidth: a copy (read + write) and a
    sum (read) of --bandwidth_mib, the better of the two. Returns the figures and {'gemm_peak': {dtype: FLOP/s},
    'run_dtype': its name, 'sample_bound': tokens/s at batch 1}."""
    # (M, K, N) of the forward matmuls on B*T token positions, (B*T, C) x (C, N): the LM head (N = V), the MLP's
    # up-projection (4C) and attention's qkv projection (3C).
    rows, C = train_cfg.batch_size * model_cfg.block_size, model_cfg.n_embd
    shapes = {"lm_head": (rows, C, model_cfg.vocab_size), "mlp_c_fc": (rows, C, 4 * C), "attn_c_attn": (rows, C, 3 * C)}
    # bf16 matmuls in hardware: every CUDA GPU we run on; an x86 CPU with AVX-512 BF16 or AMX. Elsewhere torch
    # emulates bf16 through fp32, so its 'peak' would say nothing about the machine.
    bf16 = [torch.bfloat16] if device.startswith("cuda") or {"avx512_bf16", "amx_bf16"} & set(cpu_flags) else []
    run_dtype = choose_dtype(train_cfg.dtype, device)[0]
    figures, peaks = [], {}
    for dtype in dict.fromkeys([torch.float32, *bf16, run_dtype]):
        name = dtype_name(dtype)
        by_shape = {shape: summarize(f"limits_gemm_{name}_{shape}", f"GFLOP/s, ({M}, {K}) x ({K}, {N})",
                                     [f / 1e9 for f in matmul_flops(M, K, N, dtype, device, cfg.repeats)])
                    for shape, (M, K, N) in shapes.items()}
        best = max(by_shape, key=lambda shape: by_shape[shape]["median"])
        peaks[name] = by_shape[best]["median"] * 1e9
        figures += [*by_shape.values(), {**by_shape[best], "figure": f"limits_gemm_peak_{name}",
                                         "unit": f"GFLOP/s, the best shape ({best})"}]
    source = torch.ones(cfg.bandwidth_mib * 2**20 // 4, device=device)     # fp32, 4 bytes each
    target = torch.empty_like(source)
    gb = source.nbytes / 1e9
    copy = summarize("limits_bandwidth_copy", f"GB/s, copy of {cfg.bandwidth_mib} MiB (read + write)",
                     [2 * gb / s for s in seconds_per_call(lambda: target.copy_(source), device, cfg.repeats)])
    read = summarize("limits_bandwidth_read", f"GB/s, sum of {cfg.bandwidth_mib} MiB",
                     [gb / s for s in seconds_per_call(lambda: source.sum(), device, cfg.repeats)])
    best = max((copy, read), key=lambda f: f["median"])
    bandwidth = best["median"] * 1e9
    per_token = bytes_read_per_token(model_cfg, cfg.sample_tokens)
    figures += [copy, read, {**best, "figure": "limits_bandwidth", "unit": "GB/s, the better of copy and sum"},
                summarize("limits_sample_bound_batch1", f"tokens/s, bandwidth / {per_token / 1e6:.1f} MB read per "
                                                        f"token", [bandwidth / per_token])]
    return figures, {"gemm_peak": peaks, "run_dtype": dtype_name(run_dtype), "sample_bound": bandwidth / per_token}


def shares_of_limits(figures: list[dict], limits: dict, model_cfg: GPTConfig) -> list[dict]:
    """Training GFLOP/s (flops_per_token x tokens/s) as a share of the fp32 GEMM peak and of the peak of the
    run's dtype, and sampling tokens/s at batch 1 as a share of the bandwidth bound, for each training and
    sampling figure this run measured."""
    runs = {f["figure"]: f["runs"] for f in figures}
    per_token, bound = model_flops_per_token(model_cfg, model_cfg.block_size), limits["sample_bound"]
    shares = []
    for name in [name for name in ("train", "vs_nanogpt_ours_train") if f"{name}_tokens_per_s" in runs]:
        for dtype in dict.fromkeys(("float32", limits["run_dtype"])):
            peak = limits["gemm_peak"][dtype]
            shares.append(summarize(f"{name}_share_of_{dtype}_gemm_peak",
                                    f"% of the {dtype} GEMM peak ({peak / 1e9:,.0f} GFLOP/s)",
                                    [100 * per_token * r / peak for r in runs[f"{name}_tokens_per_s"]]))
    return shares + [summarize(f"{name}_share_of_bandwidth_bound", f"% of {bound:,.0f} tokens/s",
                               [100 * r / bound for r in runs[source]])
                     for source, name in (("sample_tokens_per_s_batch1", "sample_batch1"),
                                          ("vs_nanogpt_ours_sample_tokens_per_s", "vs_nanogpt_ours_sample"))
                     if source in runs]


def main(argv: list[str] | None = None) -> None:
    cfg, train_cfg, model_cfg = parse_args(BenchConfig, BenchRunConfig, GPTConfig, argv=argv)
    given = flags_given(argv)
    parts = cfg.parts.split(",") if cfg.baseline == "" or "parts" in given else ["vs_nanogpt", "limits"]
    if unknown := [p for p in parts if p not in PARTS]:
        sys.exit(f"error: --parts has {unknown[0]!r}; choose from {','.join(PARTS)}")
    if "vs_nanogpt" in parts and not cfg.baseline:
        sys.exit("error: --parts=vs_nanogpt needs --baseline=PATH, the folder of a nanoGPT checkout")
    baseline = check_baseline(cfg.baseline) if cfg.baseline else ""
    parts += ["vs_nanogpt"] if baseline and "vs_nanogpt" not in parts else []
    if fixed := sorted(given & set(RUN_FLAGS)):
        sys.exit(f"error: bench.py sets --{fixed[0]} on its runs itself; use --train_steps, --warmup_steps "
                 f"or --soak_steps")
    if min(cfg.repeats, cfg.train_steps, cfg.soak_steps, cfg.bandwidth_mib) < 1 or cfg.sample_tokens < 2:
        sys.exit("error: --repeats, --train_steps, --soak_steps and --bandwidth_mib must be >= 1, --sample_tokens >= 2")
    # A preset names the model (flags still win); without one, nanoGPT's comparison config is the default.
    model_cfg, train_cfg = apply_preset(train_cfg.preset, model_cfg, train_cfg, given)
    defaults = {} if train_cfg.preset else {k: v for k, v in COMPARISON_CONFIG.items() if k not in given}
    train_cfg = dataclasses.replace(train_cfg, **{k: v for k, v in defaults.items() if hasattr(train_cfg, k)})
    model_cfg = dataclasses.replace(model_cfg, **{k: v for k, v in defaults.items() if hasattr(model_cfg, k)})
    run_fields = {f.name for c in (BenchRunConfig, GPTConfig) for f in dataclasses.fields(c)} & (given | set(defaults))
    passthrough = [f"--{name}={getattr(train_cfg if hasattr(train_cfg, name) else model_cfg, name)}"
                   for name in sorted(run_fields)]
    device = pick_device(train_cfg.device)

    work_dir = cfg.bench_dir or tempfile.mkdtemp(prefix="bench-")
    os.makedirs(work_dir, exist_ok=True)
    cpu, cpu_flags = cpu_description()
    gpu = f" ({torch.cuda.get_device_name(torch.device(device))})" if device.startswith("cuda") else ""
    print(f"bench: {device}{gpu} ({os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads) | CPU {cpu}: {' '.join(cpu_flags) or 'no AVX-512 or AMX'} | "
          f"{model_cfg.n_layer} layers, {model_cfg.n_head} heads, {model_cfg.n_embd} channels, context "
          f"{model_cfg.block_size}, batch {train_cfg.batch_size} | {cfg.repeats} repeats", file=sys.stderr)
    figures = []
    try:
        data_dir = os.path.join(work_dir, "data-sample")
        if "prepare" in parts:
            figures, data_dir = bench_prepare(cfg, work_dir)
        elif {"train", "soak", "pipeline", "vs_nanogpt"} & set(parts) and \
                not os.path.exists(os.path.join(data_dir, "shakespeare")):
            run_script([os.path.join(ROOT, "prepare.py"), f"--data_dir={data_dir}"], cwd=work_dir)
        measure = {"gpu_tests": bench_gpu_tests,
                   "train": lambda: bench_train(cfg, train_cfg, model_cfg, passthrough, data_dir, work_dir, device),
                   "sample": lambda: bench_sample(cfg, train_cfg, model_cfg, device),
                   "soak": lambda: bench_soak(cfg, passthrough, data_dir, work_dir),
                   "stages": lambda: bench_stages(cfg, train_cfg, model_cfg, device),
                   "pipeline": lambda: bench_pipeline(cfg, train_cfg, passthrough, data_dir, work_dir),
                   "vs_nanogpt": lambda: bench_vs_nanogpt(cfg, train_cfg, model_cfg, passthrough, baseline, data_dir,
                                                          work_dir, device)}
        for part in [part for part in measure if part in parts]:
            figures += measure[part]()
        if "limits" in parts:        # last: the shares need the other parts' figures
            limit_figures, limits = bench_limits(cfg, train_cfg, model_cfg, device, cpu_flags)
            figures += limit_figures + shares_of_limits(figures, limits, model_cfg)
    finally:
        if not cfg.bench_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    context = {"device": device, "cpus": os.cpu_count(), "cpu": cpu, "cpu_flags": cpu_flags,
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "model": dataclasses.asdict(model_cfg),
               "batch_size": train_cfg.batch_size}
    lines = [json.dumps({**f, **context}) for f in figures]
    print("\n".join(lines))
    if cfg.json_out:
        with open(cfg.json_out, "a") as f:
            f.write("\n".join(lines) + "\n")
    print_table(figures)


if __name__ == "__main__":
    main()
