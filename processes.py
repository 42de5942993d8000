"""The processes a run is made of and what they run on: the device and the dtype (with --dtype=auto's probe),
process groups under torchrun, printing once, and stopping cleanly on SIGTERM or Ctrl-C."""
import datetime
import functools
import os
import re
import shutil
import signal
import sys
import time
import timeit
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.distributed as dist


# --- devices and dtypes ---

def pick_device(requested: str = "auto") -> str:
    """'auto' picks cuda, then mps, then cpu; anything else is checked and returned."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = requested.partition(":")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if kind not in available or (index and not (kind == "cuda" and index.isdigit())):
        sys.exit(f"error: --device={requested} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if not available[kind] or (index and int(index) >= torch.cuda.device_count()):
        sys.exit(f"error: --device={requested} is not available on this machine; use --device=auto")
    return requested


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster this CPU multiplies bf16 matrices than fp32 ones (the best of 5 products of
    a (256, 512) and a (512, 2048) matrix in each). CPUs differ: with AMX or AVX512-BF16 bf16 is several
    times faster; without, PyTorch emulates it, and even some CPUs that list avx512_bf16 run it slower than
    fp32 (docs/performance.md)."""
    a, b = torch.randn(256, 512), torch.randn(512, 2048)

    def best_seconds(dtype: torch.dtype) -> float:
        x, y = a.to(dtype), b.to(dtype)
        x @ y                                           # the first call picks and builds the kernel
        return min(timeit.repeat(lambda: x @ y, number=1, repeat=5))
    return best_seconds(torch.float32) / best_seconds(torch.bfloat16)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def auto_dtype(capability: tuple[int, int]) -> torch.dtype:
    """--dtype=auto on a GPU of this compute capability: bf16 where its tensor cores compute it natively
    (Ampere, 8.0, and newer), else fp16 with loss scaling (a V100 is 7.0, a T4 7.5). torch.cuda.
    is_bf16_supported() is no guide here: by default it also answers True where bf16 is only emulated, slower
    than fp16."""
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


def choose_dtype(requested: str, device: str) -> tuple[torch.dtype, str]:
    """(dtype, the header's words for it) for --dtype=requested. 'auto': on a GPU, auto_dtype of its compute
    capability; on a CPU, bf16 where its bf16 matmuls run at least 1.5x as fast as fp32 ones
    (cpu_bf16_speedup), fp32 elsewhere; fp32 on other devices. The CPU probe runs once, on rank 0 under
    torchrun, and every process decides from that one figure: all compute alike, and the header states the
    figure the choice was made on."""
    if requested != "auto":
        return DTYPES[requested], requested
    if device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        dtype = auto_dtype((major, minor))
        return dtype, f"{dtype_name(dtype)} (auto: compute capability {major}.{minor})"
    if device != "cpu":
        return torch.float32, "float32"
    is_first = not dist.is_initialized() or dist.get_rank() == 0
    speedup = torch.tensor([cpu_bf16_speedup() if is_first else 0.0], dtype=torch.float64)
    if dist.is_initialized():
        dist.broadcast(speedup, src=0)
    speedup = speedup.item()
    dtype = torch.bfloat16 if speedup >= 1.5 else torch.float32
    return dtype, f"{dtype_name(dtype)} (auto: bf16 matmuls run {speedup:.2f}x fp32's speed here)"


def sampling_dtype(requested: str, device: str) -> torch.dtype:
    """choose_dtype's dtype for generation. 'auto' on a CPU is fp32 even where bf16 trains faster: a decoding step
    multiplies one row by each weight, which bf16 autocast would first cast, every step
    (docs/performance.md)."""
    return torch.float32 if requested == "auto" and device == "cpu" else choose_dtype(requested, device)[0]


def should_compile(requested: bool | None, device: str) -> bool:
    """--compile: what was asked, by default on CUDA only. Off CUDA torch.compile writes C++ kernels, so asking
    for it where no C++ compiler is found ($CXX, g++, clang++ or c++) stops with one line, not at the first step
    with a traceback from inside the compiler."""
    compile = requested if requested is not None else device.startswith("cuda")
    if compile and not device.startswith("cuda") and not any(
            shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++") if c):
        sys.exit(f"error: --compile on {device} needs a C++ compiler (torch.compile builds C++ kernels there) and "
                 f"none was found; install g++ (or set CXX), or drop --compile")
    return compile


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the --dtype value that names it."""
    return str(dtype).removeprefix("torch.")


def autocast(device: str, dtype: torch.dtype):
    """Mixed precision: matmuls in dtype, weights and reductions in fp32. A no-op for fp32."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device.split(":")[0], dtype=dtype)


# Peak dense bf16 tensor-core FLOP/s by GPU model (vendor data sheets, without sparsity); gpu_model() finds the
# model in torch.cuda.get_device_name(). A model's variants come before it: the first that matches wins.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,
    "A100": 312e12, "A10": 125e12, "L40S": 362e12, "L4": 121e12,
    "V100": 125e12,   # V100 has no bf16: its fp16 tensor-core peak
}
# Compute capability of the same GPUs (NVIDIA's CUDA GPU list): what --dtype=auto resolves by (auto_dtype).
GPU_COMPUTE_CAPABILITY = {"H100 PCIe": (9, 0), "H100 NVL": (9, 0), "H100": (9, 0), "H200": (9, 0), "A100": (8, 0),
                          "A10": (8, 6), "L40S": (8, 9), "L4": (8, 9), "V100": (7, 0)}


def gpu_model(device_name: str) -> str | None:
    """The key of PEAK_BF16_FLOPS that a CUDA device name is, by whole words: 'NVIDIA H100 80GB HBM3' is 'H100',
    'NVIDIA H100 PCIe' 'H100 PCIe', 'Tesla V100-SXM2-16GB' 'V100'; 'NVIDIA L40' is not 'L4' nor 'NVIDIA RTX A1000'
    'A100': None for a GPU the table does not list."""
    words = [w.lower() for w in re.split(r"[\s-]+", device_name) if w.lower() not in ("nvidia", "tesla")]
    return next((key for key in PEAK_BF16_FLOPS if words[:1] == key.lower().split()[:1]   # the model, then
                 and all(v in words for v in key.lower().split()[1:])), None)              # its variant's words


def peak_flops(device: str, given: float | None = None, world_size: int = 1) -> float | None:
    """Peak FLOP/s of world_size devices like this one, the denominator of MFU: a step's FLOPs are those of
    every process's share of the batch (DDP replicas, FSDP shards, pipeline stages), each on its own device.
    One device's peak is `given` (--peak_flops), else the data sheet's bf16 figure of the current GPU; None
    where we do not know it (CPU, MPS, unlisted GPU): then callers report achieved GFLOP/s rather than an
    invented MFU."""
    if given is None and device.startswith("cuda"):
        given = PEAK_BF16_FLOPS.get(gpu_model(torch.cuda.get_device_name(torch.device(device))))
    return world_size * given if given else None


# --- process groups ---

def setup_distributed(requested_device: str = "auto") -> tuple[int, int, int, str]:
    """(rank, local_rank, world_size, device) of this process. Under torchrun (which sets RANK, LOCAL_RANK
    and WORLD_SIZE) this joins the process group: NCCL between GPUs, gloo on CPUs. A plain `python` run
    is rank 0 of 1 and starts no process group, so both run the same code."""
    device = pick_device(requested_device)
    if "RANK" not in os.environ:
        if device.startswith("cuda:"):   # what torch.cuda's bf16 check, pinning and memory stats then read
            torch.cuda.set_device(device)
        return 0, 0, 1, device
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"             # one GPU per process
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, local_rank, world_size, device


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only: with N processes, one copy of each line."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs)


def run_main(main: Callable[[], None], grace_s: float = 10.0) -> None:
    """Run a script's main() so that, under torchrun, a one-line error prints once, not once per process.
    Every process runs the same checks on the same flags and files, so all of them usually stop with the same
    SystemExit message. Rank 0 prints it. Another rank does not exit at once: torchrun stops every process as
    soon as one fails, which could kill rank 0 before its line is out. It waits up to grace_s seconds
    instead, and torchrun ends it when rank 0 exits; if it is still running then, the error was its own
    (rank 0 went on), and it prints it. A plain `python` run is rank 0 and exits at once."""
    try:
        main()
    except SystemExit as stop:
        if int(os.environ.get("RANK", "0")) == 0 or stop.code in (0, None):
            raise
        try:
            time.sleep(grace_s)
        except KeyboardInterrupt:   # a Ctrl-C while waiting: leave quietly, rank 0 speaks for the run
            raise SystemExit(1) from None
        raise


def all_ranks_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over the processes of a tensor each one holds (itself with one process)."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)            # a sum: gloo has no average
        values /= dist.get_world_size()
    return values


def gather_to_rank0(obj):
    """[obj of rank 0, obj of rank 1, ...] on rank 0 (None elsewhere); [obj] without a process group."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


# --- stopping cleanly ---

RANK0_WORK_TIMEOUT = datetime.timedelta(hours=2)   # the longest the other processes wait for rank 0's work

class StopSignals:
    """SIGTERM (what slurm, torchrun and `kill` send) and SIGINT (Ctrl-C) become a request to stop: the loop
    finishes its step, saves a checkpoint and exits. A second Ctrl-C exits at once; the checkpoint on disk
    stays as it was (a write in progress goes to a .tmp file, which is removed). torchrun forwards the
    signal it gets to every process; a second SIGINT within a second of the first counts as the same one,
    in case a launcher and the terminal both deliver one Ctrl-C."""

    def __init__(self):
        self.received: signal.Signals | None = None
        self.received_at = 0.0
        # The flag travels over gloo on the CPU, so checking it costs no GPU synchronization. The group also
        # carries the waits for what rank 0 does alone (runtime.save_on_rank0: a whole model's checkpoint, GPT-2's
        # weights downloaded and converted), so its timeout leaves time for that (gloo's default: 30 minutes).
        self.group = dist.new_group(backend="gloo", timeout=RANK0_WORK_TIMEOUT) if dist.is_initialized() else None
        self.previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(self, signum: int, frame) -> None:
        if self.received is None:
            self.received, self.received_at = signal.Signals(signum), time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self.received_at > 1.0:
            raise SystemExit("error: interrupted twice: stopped at once without saving; the last checkpoint "
                             "written is intact")

    def max_over_ranks(self, value: int) -> int:
        """The largest of one number each process holds, on every process: an all-reduce over the CPU group.
        Every process must call it at the same point, like any collective."""
        if self.group is None:
            return value
        flag = torch.tensor([value])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())

    def agreed(self) -> signal.Signals | None:
        """The signal that stops the run, on every process as soon as any one received it (one number per step),
        so all processes stop after the same step; None to go on."""
        code = self.max_over_ranks(0 if self.received is None else int(self.received))
        return signal.Signals(code) if code else None

    def all_ranks_any(self, is_true: bool) -> bool:
        """True on every process if is_true on any: for a failure every process must act on (a non-finite
        step, a checkpoint that could not be written)."""
        return bool(self.max_over_ranks(int(is_true)))

    def uninstall(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
