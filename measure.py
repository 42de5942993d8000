"""How bench.py measures: medians and spreads of repeated runs, a command run to completion with its peak
memory and wall time, calls timed on a device, the CPU's model and flags, and the matmul FLOP/s of one shape."""
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch


# --- the statistics of repeated measurements ---

def summarize(name: str, unit: str, runs: list[float]) -> dict:
    """Median and spread of one figure's runs: a shared machine is noisy from run to run."""
    return {"figure": name, "unit": unit, "median": statistics.median(runs), "min": min(runs),
            "max": max(runs), "runs": runs}


def steady_step_ms(out_dir: str, warmup_steps: int) -> list[float]:
    """ms of each timed step from a run's metrics.jsonl (train.py logs every step with --log_interval=1)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r["ms_per_step"] for r in records if "ms_per_step" in r and r["step"] > warmup_steps]


def print_table(figures: list[dict]) -> None:
    width = max([40] + [len(f["figure"]) for f in figures])
    print(f"\n{'figure':<{width}} {'median':>12} {'min':>12} {'max':>12}  unit")
    for f in figures:
        print(f"{f['figure']:<{width}} {f['median']:>12,.2f} {f['min']:>12,.2f} {f['max']:>12,.2f}  {f['unit']}")


# --- processes run to completion ---

def run_script(argv: list[str], cwd: str, watch=None, env: dict | None = None) -> tuple[str, float, float]:
    """Run a Python command line to completion; return its output, its peak RSS in MiB (Linux reports
    ru_maxrss in KiB) and its wall seconds. watch(line, pid) sees each output line as it comes."""
    start = time.perf_counter()
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
    return output, usage.ru_maxrss / 1024, time.perf_counter() - start


def peak_cuda_mib(output: str) -> float:
    """The 'peak_cuda_bytes N' line a runner printed (torch.cuda.max_memory_allocated), in MiB; 0 without."""
    match = re.search(r"^peak_cuda_bytes (\d+)", output, flags=re.M)
    return int(match.group(1)) / 2**20 if match else 0.0


# --- calls timed on a device, and the machine they run on ---

def synchronize(device: str) -> None:
    if device != "cpu":
        torch.accelerator.synchronize()   # CUDA's or MPS's queue, whichever device is current


def cpu_description() -> tuple[str, list[str]]:
    """The CPU's model name and the flags that decide its matmul speed, AVX-512 (avx512*) and AMX (amx*), from
    /proc/cpuinfo (Linux); elsewhere platform.processor() and no flags."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        info = ""
    name = re.search(r"^model name\s*:\s*(.+)$", info, flags=re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, flags=re.M)
    relevant = sorted({f for f in flags.group(1).split() if f.startswith(("avx512", "amx"))}) if flags else []
    return (name.group(1).strip() if name else platform.processor() or platform.machine()), relevant


def seconds_per_call(call, device: str, repeats: int, min_seconds: float = 0.05) -> list[float]:
    """Seconds one call takes, `repeats` times, after a warm-up call. Each timing loops calls until min_seconds
    have passed, so the clock's resolution and the launch of a short call do not count. The clock is read
    after every call on a CPU, where a busy neighbour can make calls 100x slower at any moment (a loop
    sized from earlier calls could then run for minutes); a GPU's queue is drained only every 2^k calls."""
    def timed_loop() -> float:
        calls, start = 0, time.perf_counter()
        while True:
            call()
            calls += 1
            if device == "cpu" or calls & (calls - 1) == 0:
                synchronize(device)
                if (elapsed := time.perf_counter() - start) >= min_seconds:
                    return elapsed / calls

    call()
    synchronize(device)
    return [timed_loop() for _ in range(repeats)]


def matmul_flops(M: int, K: int, N: int, dtype: torch.dtype, device: str, repeats: int) -> list[float]:
    """FLOP/s (2MKN per product) of x @ W^T into a preallocated output, W stored (N, K) as nn.Linear keeps it,
    so BLAS sees the layout the model's F.linear gives it."""
    x = torch.randn(M, K, dtype=dtype, device=device)
    weight = torch.randn(N, K, dtype=dtype, device=device)
    out = torch.empty(M, N, dtype=dtype, device=device)
    return [2 * M * K * N / s for s in seconds_per_call(lambda: torch.matmul(x, weight.t(), out=out), device,
                                                          repeats)]
