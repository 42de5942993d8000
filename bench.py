"""Measure this machine: training speed and memory, sampling speed, and data-preparation throughput.

    python bench.py                                  # nanoGPT's comparison config on the current device
    python bench.py --preset=gpt2 --gradient_accumulation_steps=1 --batch_size=16 --vocab_size=50304  # on a GPU
    python bench.py --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --parts=train,sample
    python bench.py --parts=soak --soak_steps=2000 --n_layer=2 --n_embd=64 --block_size=64
    python bench.py --parts=stages,pipeline --pp=2 --n_layer=8       # pipeline stages against the cost model

Every measurement runs --repeats times and is reported as the median with its spread: one JSON line per
figure on stdout, then a readable table. Training runs train.py itself, in a fresh process per repeat, so
the figures are what a user gets (peak memory is that process's whole RSS, or torch's peak allocation on
a GPU). Every TrainConfig and GPTConfig flag of train.py passes through to those runs (--preset too);
without model flags the model is the one nanoGPT was measured with on a 2-core CPU (README, "Performance").
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

from model import (GPT, GPTConfig, apply_preset, arg, autocast, build_stage, flags_given, flops_per_token, generate,
                   parse_args, peak_flops, pick_device, pick_dtype, plan_stages, stage_costs)
from train import TrainConfig, draw_windows, microbatches, read_batch

ROOT = os.path.dirname(os.path.abspath(__file__))
PARTS = ("prepare", "train", "sample", "soak", "stages", "pipeline")

# nanoGPT's measured configuration (its train.py flags): the defaults here unless flags say otherwise.
COMPARISON_CONFIG = dict(n_layer=4, n_head=4, n_embd=256, block_size=256, batch_size=8,
                         gradient_accumulation_steps=1, dropout=0.0, bias=False)
# The flags bench.py sets itself on its training runs (the bench flags in brackets control them).
RUN_FLAGS = ("data_dir", "dataset", "out_dir", "init_from", "max_iters", "eval_interval", "eval_iters",
             "log_interval", "eval_only", "dry_run", "resume_from")


@dataclass
class BenchConfig:
    parts: str = arg("prepare,train,sample", f"comma-separated measurements out of {','.join(PARTS)}")
    repeats: int = arg(3, "runs of each measurement; figures are the median, with min and max")
    warmup_steps: int = arg(5, "training steps run before timing starts (warm caches, compile)")
    train_steps: int = arg(20, "timed training steps per run")
    sample_tokens: int = arg(200, "new tokens per sampling run")
    sample_batch_sizes: str = arg("1,8", "comma-separated batch sizes of the sampling runs")
    soak_steps: int = arg(2000, "steps of the soak run (--parts=soak): RSS, open files and slow steps")
    bench_dir: str = arg("", "where the prepared sample and the runs' outputs go (default: a temporary "
                             "directory, removed afterwards)")
    json_out: str = arg("", "also append the JSON lines to this file")


# --- the statistics of repeated measurements ---

def summarize(name: str, unit: str, runs: list[float]) -> dict:
    """Median and spread of one figure's runs: the machine is shared and noisy (~17% run to run)."""
    return {"figure": name, "unit": unit, "median": statistics.median(runs), "min": min(runs),
            "max": max(runs), "runs": runs}


def steady_step_ms(metrics_path: str, warmup_steps: int) -> list[float]:
    """ms of each timed step from a run's metrics.jsonl (train.py logs every step with --log_interval=1)."""
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f]
    return [r["ms_per_step"] for r in records if "ms_per_step" in r and r["step"] > warmup_steps]


# --- running the project's scripts as a user would ---

def run_script(argv: list[str], cwd: str, watch=None, env: dict | None = None) -> tuple[str, dict]:
    """Run a Python command line to completion; return its output and its peak RSS in MiB (Linux reports
    ru_maxrss in KiB). watch(line, pid) sees each output line as it comes."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if watch:
            watch(line, proc.pid)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = "".join(lines)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(argv[:2])} failed (exit {proc.returncode}):\n{output[-2000:]}")
    return output, {"peak_rss_mib": usage.ru_maxrss / 1024}


# train.py's main() in a fresh interpreter, reporting torch's peak GPU allocation when it is done.
TRAIN_RUNNER = ("import sys, torch, train; train.main(sys.argv[1:]); "
                "print('peak_cuda_bytes', torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)")


def train_argv(passthrough: list[str], data_dir: str, out_dir: str, max_iters: int,
               eval_interval: int | None = None) -> list[str]:
    """train.py's flags for a timed run: every step logged; evaluation (one batch) and checkpoint at the start
    and the end, or every eval_interval steps."""
    return ["-c", TRAIN_RUNNER, *passthrough, f"--data_dir={data_dir}", "--dataset=shakespeare",
            f"--out_dir={out_dir}", f"--max_iters={max_iters}", f"--eval_interval={eval_interval or max_iters}",
            "--eval_iters=1", "--log_interval=1"]


def bench_prepare(cfg: BenchConfig, work_dir: str) -> tuple[list[dict], str]:
    """Tokenize the built-in Shakespeare sample end to end with prepare.py; returns the last data_dir."""
    seconds, tokens = [], 0
    for repeat in range(cfg.repeats):
        data_dir = os.path.join(work_dir, f"data-{repeat}")
        start = time.perf_counter()
        run_script([os.path.join(ROOT, "prepare.py"), f"--data_dir={data_dir}"], cwd=work_dir)
        seconds.append(time.perf_counter() - start)
        with open(os.path.join(data_dir, "shakespeare", "meta.json")) as f:
            meta = json.load(f)
        tokens = meta["train_tokens"] + meta["val_tokens"]
    rates = [tokens / s for s in seconds]
    owt_hours = [9e9 / r / 3600 for r in rates]     # OpenWebText: ~9B tokens
    return [summarize("prepare_seconds", "s", seconds), summarize("prepare_tokens_per_s", "tokens/s", rates),
            summarize("prepare_openwebtext_projection", "hours", owt_hours)], data_dir


def bench_train(cfg: BenchConfig, train_cfg: TrainConfig, model_cfg: GPTConfig, passthrough: list[str],
                data_dir: str, work_dir: str, device: str) -> list[dict]:
    tokens_per_step = train_cfg.batch_size * train_cfg.gradient_accumulation_steps * model_cfg.block_size
    max_iters = cfg.warmup_steps + cfg.train_steps
    step_ms, rss, cuda_peak = [], [], []
    for repeat in range(cfg.repeats):
        out_dir = os.path.join(work_dir, f"train-{repeat}")
        output, usage = run_script(train_argv(passthrough, data_dir, out_dir, max_iters), cwd=ROOT)
        step_ms.append(statistics.median(steady_step_ms(os.path.join(out_dir, "metrics.jsonl"),
                                                        cfg.warmup_steps)))
        rss.append(usage["peak_rss_mib"])
        cuda_peak.append(int(re.search(r"peak_cuda_bytes (\d+)", output).group(1)) / 2**20)
        shutil.rmtree(out_dir)
    with torch.device("meta"):
        n_params = GPT(model_cfg).num_params()
    flops_per_step = flops_per_token(model_cfg, n_params, model_cfg.block_size) * tokens_per_step
    figures = [summarize("train_ms_per_step", "ms", step_ms),
               summarize("train_tokens_per_s", "tokens/s", [tokens_per_step / (ms / 1000) for ms in step_ms])]
    peak = peak_flops(device)
    if peak:
        figures.append(summarize("train_mfu", "%", [100 * flops_per_step / (ms / 1000) / peak for ms in step_ms]))
        figures.append(summarize("train_peak_memory", "MiB (max_memory_allocated)", cuda_peak))
    else:
        figures.append(summarize("train_gflops", "GFLOP/s", [flops_per_step / (ms / 1000) / 1e9 for ms in step_ms]))
    figures.append(summarize("train_peak_rss", "MiB", rss))
    figures.append(summarize("train_data_loader_share", "% of step",
                             data_loader_share(data_dir, train_cfg, model_cfg, device, statistics.median(step_ms))))
    return figures


def data_loader_share(data_dir: str, train_cfg: TrainConfig, model_cfg: GPTConfig, device: str,
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
            x, y = read_batch(path, offsets, model_cfg.block_size)
            if device.startswith("cuda"):
                x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
                torch.cuda.synchronize()
        shares.append(100 * (time.perf_counter() - start) * 1000 / step_ms)
    return shares


def bench_sample(cfg: BenchConfig, train_cfg: TrainConfig, model_cfg: GPTConfig, device: str) -> list[dict]:
    """Tokens/s of generate() with the KV cache, as generate.py samples (temperature 0.8, top-k 200), and
    the time of single steps early (token 10) and late (the last token) to show no slowdown as it grows."""
    torch.manual_seed(train_cfg.seed)
    model = GPT(dataclasses.replace(model_cfg, dropout=0.0)).to(device).eval()
    dtype = pick_dtype(train_cfg.dtype, device)
    compile_steps = train_cfg.compile if train_cfg.compile is not None else device.startswith("cuda")
    figures = []
    for batch_size in [int(b) for b in cfg.sample_batch_sizes.split(",")]:
        rates, early_ms, late_ms = [], [], []
        for repeat in range(cfg.repeats + 1):            # the first run warms up and is not counted
            prompt = torch.zeros((batch_size, 1), dtype=torch.long, device=device)
            generator = torch.Generator(device=device).manual_seed(repeat)
            stamps = [time.perf_counter()]
            with autocast(device, dtype):
                for token in generate(model, prompt, cfg.sample_tokens, 0.8, 200, 1.0, None, generator,
                                      compile=compile_steps):
                    token.cpu()                           # wait for the step, as a streaming caller does
                    stamps.append(time.perf_counter())
            if repeat == 0:
                continue
            rates.append(batch_size * cfg.sample_tokens / (stamps[-1] - stamps[0]))
            early_ms.append(1000 * (stamps[min(10, cfg.sample_tokens)] - stamps[min(9, cfg.sample_tokens - 1)]))
            late_ms.append(1000 * (stamps[-1] - stamps[-2]))
        figures += [summarize(f"sample_tokens_per_s_batch{batch_size}", "tokens/s", rates),
                    summarize(f"sample_ms_at_token10_batch{batch_size}", "ms", early_ms),
                    summarize(f"sample_ms_at_last_token_batch{batch_size}", "ms", late_ms)]
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
        match = re.match(r"step (\d+)/", line)
        if match:
            with open(f"/proc/{pid}/status") as f:
                rss_kib = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
            by_step[int(match.group(1))] = (rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd")))

    run_script(train_argv(passthrough, data_dir, out_dir, cfg.soak_steps, eval_interval=100), cwd=ROOT,
               watch=watch)
    step_ms = steady_step_ms(os.path.join(out_dir, "metrics.jsonl"), 0)
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


def bench_stages(cfg: BenchConfig, train_cfg: TrainConfig, model_cfg: GPTConfig, device: str) -> list[dict]:
    """Forward + backward time of each pipeline stage of the splitter's plan (--pp, --pp_balance) on one
    micro-batch, as a share of the total, next to the share the 'flops' cost model predicts."""
    plan = plan_stages(model_cfg, train_cfg.pp, train_cfg.pp_balance)
    block, first, last = stage_costs(model_cfg, "flops")
    predicted = [len(r) * block + (first if s == 0 else 0) + (last if s == len(plan) - 1 else 0)
                 for s, r in enumerate(plan)]
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
            if s == len(plan) - 1:
                loss = F.cross_entropy(out.flatten(0, 1).float(), ids[:, 1:].flatten())
            else:
                loss = (out * torch.ones_like(out)).sum()   # a gradient of ones arriving from the next stage
            loss.backward()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            runs.append(1000 * (time.perf_counter() - start))
        measured.append(statistics.median(runs[1:]))
    figures = []
    for s, (ms, cost) in enumerate(zip(measured, predicted)):
        figures += [summarize(f"stage{s}_forward_backward_ms", "ms", [ms]),
                    summarize(f"stage{s}_measured_share", "%", [100 * ms / sum(measured)]),
                    summarize(f"stage{s}_cost_model_share", "%", [100 * cost / sum(predicted)])]
    figures.append(summarize("stages_slowest_over_mean", "x", [max(measured) / statistics.mean(measured)]))
    return figures


def bench_pipeline(cfg: BenchConfig, train_cfg: TrainConfig, passthrough: list[str], data_dir: str,
                   work_dir: str) -> list[dict]:
    """Step time of --pp stages under torchrun (one thread per process) against the ideal: the
    single-process, single-thread step time split over pp processes, stretched by the pipeline bubble
    (p-1)/(m+p-1) of m micro-batches: ideal = T1 / p * (m + p - 1) / m."""
    p, m = train_cfg.pp, microbatches(train_cfg)
    if p < 2:
        sys.exit("error: --parts=pipeline compares --pp stages with one process; give --pp=2 or more")
    max_iters, one_thread = cfg.warmup_steps + cfg.train_steps, {"OMP_NUM_THREADS": "1"}
    single, piped = [], []
    for repeat in range(cfg.repeats):
        out_dir = os.path.join(work_dir, f"single-{repeat}")
        argv = [a for a in passthrough if not a.startswith("--pp=")]
        run_script(train_argv(argv, data_dir, out_dir, max_iters), cwd=ROOT, env=one_thread)
        single.append(statistics.median(steady_step_ms(os.path.join(out_dir, "metrics.jsonl"), cfg.warmup_steps)))
        out_dir = os.path.join(work_dir, f"pipeline-{repeat}")
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={p}",
                    os.path.join(ROOT, "train.py")]
        run_script(torchrun + train_argv(passthrough, data_dir, out_dir, max_iters)[2:], cwd=ROOT, env=one_thread)
        piped.append(statistics.median(steady_step_ms(os.path.join(out_dir, "metrics.jsonl"), cfg.warmup_steps)))
    ideal = [t / p * (m + p - 1) / m for t in single]
    return [summarize("pipeline_single_process_ms_per_step", "ms", single),
            summarize(f"pipeline_pp{p}_{train_cfg.pp_schedule}_ms_per_step", "ms", piped),
            summarize(f"pipeline_pp{p}_ideal_ms_per_step", "ms", ideal),
            summarize(f"pipeline_pp{p}_over_ideal", "x", [a / b for a, b in zip(piped, ideal)])]


# --- the report ---

def print_table(figures: list[dict]) -> None:
    print(f"\n{'figure':<40} {'median':>12} {'min':>12} {'max':>12}  unit")
    for f in figures:
        print(f"{f['figure']:<40} {f['median']:>12,.2f} {f['min']:>12,.2f} {f['max']:>12,.2f}  {f['unit']}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg, train_cfg, model_cfg = parse_args(BenchConfig, TrainConfig, GPTConfig, argv=argv)
    given = flags_given(argv)
    parts = cfg.parts.split(",")
    if unknown := [p for p in parts if p not in PARTS]:
        sys.exit(f"error: --parts has {unknown[0]!r}; choose from {','.join(PARTS)}")
    if fixed := sorted(given & set(RUN_FLAGS)):
        sys.exit(f"error: bench.py sets --{fixed[0]} on its runs itself; use --train_steps, --warmup_steps "
                 f"or --soak_steps")
    if cfg.repeats < 1 or cfg.train_steps < 1 or cfg.sample_tokens < 2 or cfg.soak_steps < 1:
        sys.exit("error: --repeats, --train_steps and --soak_steps must be >= 1, --sample_tokens >= 2")
    # A preset names the model (flags still win); without one, nanoGPT's comparison config is the default.
    model_cfg, train_cfg = apply_preset(train_cfg.preset, model_cfg, train_cfg, given)
    defaults = {} if train_cfg.preset else {k: v for k, v in COMPARISON_CONFIG.items() if k not in given}
    train_cfg = dataclasses.replace(train_cfg, **{k: v for k, v in defaults.items() if hasattr(train_cfg, k)})
    model_cfg = dataclasses.replace(model_cfg, **{k: v for k, v in defaults.items() if hasattr(model_cfg, k)})
    run_fields = {f.name for c in (TrainConfig, GPTConfig) for f in dataclasses.fields(c)} & (given | set(defaults))
    passthrough = [f"--{name}={getattr(train_cfg if hasattr(train_cfg, name) else model_cfg, name)}"
                   for name in sorted(run_fields)]
    device = pick_device(train_cfg.device)

    work_dir = cfg.bench_dir or tempfile.mkdtemp(prefix="bench-")
    os.makedirs(work_dir, exist_ok=True)
    print(f"bench: {device} ({os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads) | "
          f"{model_cfg.n_layer} layers, {model_cfg.n_head} heads, {model_cfg.n_embd} channels, context "
          f"{model_cfg.block_size}, batch {train_cfg.batch_size} | {cfg.repeats} repeats", file=sys.stderr)
    figures = []
    try:
        data_dir = os.path.join(work_dir, "data-sample")
        if "prepare" in parts:
            prepare_figures, data_dir = bench_prepare(cfg, work_dir)
            figures += prepare_figures
        elif {"train", "soak", "pipeline"} & set(parts) and not os.path.exists(os.path.join(data_dir, "shakespeare")):
            run_script([os.path.join(ROOT, "prepare.py"), f"--data_dir={data_dir}"], cwd=work_dir)
        if "train" in parts:
            figures += bench_train(cfg, train_cfg, model_cfg, passthrough, data_dir, work_dir, device)
        if "sample" in parts:
            figures += bench_sample(cfg, train_cfg, model_cfg, device)
        if "soak" in parts:
            figures += bench_soak(cfg, passthrough, data_dir, work_dir)
        if "stages" in parts:
            figures += bench_stages(cfg, train_cfg, model_cfg, device)
        if "pipeline" in parts:
            figures += bench_pipeline(cfg, train_cfg, passthrough, data_dir, work_dir)
    finally:
        if not cfg.bench_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    context = {"device": device, "cpus": os.cpu_count(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "model": dataclasses.asdict(model_cfg),
               "batch_size": train_cfg.batch_size}
    lines = [json.dumps({**f, **context}) for f in figures]
    print("\n".join(lines))
    if cfg.json_out:
        with open(cfg.json_out, "a") as f:
            f.write("\n".join(lines) + "\n")
    print_table(figures)


if __name__ == "__main__":
    main()
