"""The dry run's memory model held to real runs: each process's peak resident memory in 2 training steps of
train.py on this CPU, one process or two under torchrun, against planner.plan_memory for the Layout that
train.py's dry run builds from the same flags, within 15% either way.

Each process runs train.py's main under PROBE, which reads its resident set size (RSS) once everything the
layouts import is imported (the baseline), and its high-water mark (VmHWM) as each checkpoint begins; it
resets the mark after every checkpoint, so the last reading is the peak of the 2 training steps and the last
evaluation, not of a checkpoint (which copies the tensors it writes to the CPU: not what the dry run plans,
which is a GPU's memory). MALLOC_MMAP_THRESHOLD_ makes glibc give every
large buffer back when it is freed, so the high-water mark follows the peak of live tensors. What the
baseline leaves in the peak besides the model (the process group, thread pools, kernel caches: ~20 MiB) is
measured by the same runs of a tiny model (runtime_bytes) and taken off too.

Two models: WIDE (30M parameters, 128 tokens per micro-batch), where the weights, gradients and AdamW's
moments at 16-20 bytes per parameter dwarf the activations, for the layouts that divide the parameters (DDP,
FSDP, TP, PP); DEEP (5M parameters, 2048 tokens per micro-batch), whose activations dominate, for activation
checkpointing and bf16. Measured (this 2-core Xeon, torch 2.13), peak / estimate: DDP 1.00, FSDP 1.05, TP
1.10 (the embedding's gradient arrives whole on each rank before it is split, parallel.
lay_out_like_parameters; the estimate counts its 1/t share), PP 1.00 and 1.01 (stages 0 and 1),
checkpointing 0.95, bf16 0.96. The estimate counts the gradients and the activations as held together, where
backward frees the one as it fills the other: an upper bound, a little above the CPU's peak where the
activations dominate.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

import planner
import train
from conftest import ROOT, TINY_MODEL_FLAGS
from planner import plan_memory
from model import GPTConfig

pytestmark = pytest.mark.slow

MIB = 2 ** 20
MARGIN = 0.15   # measured peak within 15% of the estimate, either way

PROBE = """
import json, os, sys
sys.path.insert(0, {root!r})
# Everything the layouts import lazily, imported before the baseline is read.
import numpy, torch, torch.distributed.fsdp, torch.distributed.pipelining, torch.distributed.tensor.parallel
import parallel, planner, runtime, train

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                              # VmHWM back to the current RSS

record = {{"baseline": status("VmRSS"), "peaks": [], "saves": [], "startup": None}}
def at_checkpoint(original):
    def hooked(*args, **kwargs):
        record["peaks"].append(status("VmHWM"))   # the peak since the last checkpoint
        reset_peak()
        return original(*args, **kwargs)
    return hooked
runtime.DataParallel.full_state = at_checkpoint(runtime.DataParallel.full_state)   # one file: one process, DDP
for layout in (runtime.DataParallel, parallel.Pipeline):                         # pieces: FSDP, TP, PP
    layout.state_pieces = at_checkpoint(layout.state_pieces)

def after_save(original):
    def hooked(*args, **kwargs):
        original(*args, **kwargs)
        record["saves"].append(status("VmHWM"))  # the peak while writing the checkpoint
        reset_peak()
    return hooked
train.save_on_rank0, train.save_in_pieces = after_save(train.save_on_rank0), after_save(train.save_in_pieces)

def train_loop(*args, original=train.train_loop, **kwargs):
    record["startup"] = status("VmHWM")          # the model built, laid out, given its weights (and AdamW's state)
    return original(*args, **kwargs)
train.train_loop = train_loop
train.main(sys.argv[1:])
with open(os.path.join({out!r}, "rank%s.json" % os.environ.get("RANK", "0")), "w") as f:
    json.dump(record, f)
"""

WIDE = ["--n_layer=5", "--n_head=10", "--n_embd=640", "--block_size=64", "--vocab_size=8192", "--batch_size=2"]
DEEP = ["--n_layer=6", "--n_head=4", "--n_embd=256", "--block_size=256", "--vocab_size=512", "--batch_size=8"]
CHUNK = ["--loss_chunk=1024"]   # train.py's CPU default, given so that the dry run plans it too
LAYOUTS = {                     # name: (processes, sequences per micro-batch, flags)
    "ddp": (2, 2, WIDE + CHUNK + ["--dtype=float32"]),
    "fsdp": (2, 2, WIDE + CHUNK + ["--dtype=float32", "--fsdp"]),
    "tp": (2, 2, WIDE + ["--dtype=float32", "--tp=2"]),              # loss_parallel: no chunks
    "pp": (2, 1, WIDE + CHUNK + ["--dtype=float32", "--pp=2"]),       # the batch of 2 in 2 micro-batches
    "checkpointing": (1, 8, DEEP + CHUNK + ["--dtype=float32", "--activation_checkpointing"]),
    "bf16": (1, 8, DEEP + CHUNK + ["--dtype=bfloat16"]),
}


def measure(flags: list[str], nproc: int, data_dir: str, folder, timeout: int = 300) -> list[dict]:
    """Run 2 training steps of train.py under PROBE in folder; each process's record, by rank."""
    probe = folder / "probe.py"
    probe.write_text(PROBE.format(root=ROOT, out=str(folder)))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone"] \
        if nproc > 1 else [sys.executable]
    result = subprocess.run([*launcher, str(probe), f"--data_dir={data_dir}", "--dataset=tiny",
                             f"--out_dir={folder / 'out'}", "--max_iters=2", "--eval_interval=1000",
                             "--eval_iters=1", "--log_interval=1", "--dropout=0", *flags],
                            capture_output=True, text=True, timeout=timeout, cwd=str(folder),
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(nproc)]


def training_peak(record: dict) -> int:
    """Bytes above the baseline at the peak of the training steps (the last checkpoint comes after them)."""
    return record["peaks"][-1] - record["baseline"]


@pytest.fixture(scope="module")
def runtime_bytes(tiny_data_dir, tmp_path_factory) -> dict[int, int]:
    """By process count (1, 2), what the baseline leaves in the peak besides the model: the process group,
    thread pools, kernel caches; the peak of the same runs with TINY_MODEL_FLAGS (an estimate of under 1 MiB),
    the largest of the processes'."""
    return {nproc: max(map(training_peak, measure(
                [*TINY_MODEL_FLAGS, "--batch_size=2", "--dtype=float32"], nproc, tiny_data_dir,
                tmp_path_factory.mktemp(f"tiny{nproc}"))))
            for nproc in (1, 2)}


def planned(flags: list[str], world_size: int, micro_batch: int) -> list[tuple[int, dict[str, float]]]:
    """(parameters this process updates, plan_memory's estimate by kind), one per pipeline rank, for train.py's
    dry run with these flags, whose activations must be those of the micro-batch the run computes."""
    cfg, model_cfg = train.parse_args(train.TrainConfig, GPTConfig, argv=flags)
    layout = planner.dry_run_layout(cfg, world_size)
    assert layout.micro_batch == micro_batch
    shards = layout.dp if layout.fsdp else 1
    return [(params // shards, estimate) for _, params, estimate in plan_memory(model_cfg, layout)]


def cpu_peak(updated: int, estimate: dict[str, float], foreach: bool) -> float:
    """The estimate's peak for a CPU run of a process that updates `updated` parameters: its sum, or the
    optimizer step's when larger. On a CPU, AdamW takes its multi-tensor (foreach) path (CUDA's is the fused
    kernel: model.configure_optimizers), whose square root of the second moment is a temporary of 4 bytes per
    parameter, live at the step beside the weights (4 bytes each), the gradients and AdamW's moments, once the
    activations and the 16-bit copies are gone. Tensor parallelism updates one tensor at a time
    (parallel.use_single_tensor_adamw): no such temporary."""
    step = 4 * updated + estimate["gradients"] + estimate["AdamW"] + (4 * updated if foreach else 0)
    return max(sum(estimate.values()), step)


@pytest.mark.parametrize("name", LAYOUTS)
def test_memory_estimate_is_within_15_percent_of_a_real_run(name, runtime_bytes, tiny_data_dir, tmp_path):
    """Each process's training peak above its baseline and the runtime's bytes, against the dry run's estimate
    for its rank (its stage's under --pp), as cpu_peak applies it to the CPU."""
    nproc, micro_batch, flags = LAYOUTS[name]
    records = measure(flags, nproc, tiny_data_dir, tmp_path)
    plans = planned(flags, nproc, micro_batch)
    rows, ratios = [], []
    for rank, record in enumerate(records):
        updated, estimate = plans[rank if len(plans) > 1 else 0]
        expected = cpu_peak(updated, estimate, foreach=name != "tp")
        measured = training_peak(record) - runtime_bytes[nproc]
        ratios.append(measured / expected)
        rows.append(f"{name} rank {rank}: peak {record['peaks'][-1] / MIB:.0f} MiB - baseline "
                    f"{record['baseline'] / MIB:.0f} - runtime {runtime_bytes[nproc] / MIB:.0f} = "
                    f"{measured / MIB:.0f} MiB; estimate {expected / MIB:.0f} MiB ("
                    + ", ".join(f"{kind} {value / MIB:.0f}" for kind, value in estimate.items())
                    + f"); ratio {ratios[-1]:.3f}; checkpoint peak "
                    f"{(record['saves'][-1] - record['baseline']) / MIB:.0f} MiB")
    print("\n".join(rows))
    assert all(abs(ratio - 1) < MARGIN for ratio in ratios), "\n".join(rows)


# --- a model of several GB in each layout: start-up, steps and checkpoints within each process's share ---

# 246M parameters: 0.98 GB of fp32 weights, 3.9 GB with their gradients and AdamW's two moments.
BIG = ["--n_layer=12", "--n_head=10", "--n_embd=1280", "--block_size=64", "--vocab_size=8192", "--batch_size=2",
       "--dtype=float32", "--loss_chunk=1024", "--keep_last=0", "--keep_best=False"]   # 3 GB a checkpoint: one kept
BIG_LAYOUTS = {"fsdp": ["--fsdp"], "tp": ["--tp=2", "--loss_chunk=0"], "pp": ["--pp=2"]}
RESUMED_IN = {"fsdp": "pp", "tp": "fsdp", "pp": "tp"}   # each layout's checkpoint resumed in another
SHARE = 0.6       # of one process's peak, at most, in each phase, for each of the two processes
BIG_MARGIN = 0.1  # the steps' peak within 10% of the dry run's estimate


def phases(record: dict) -> dict[str, float]:
    """MiB above the baseline: at start-up (built, laid out, given its weights: as the loop begins), in the
    steps (the peak between the two checkpoints), and while writing the last checkpoint."""
    return {phase: (value - record["baseline"]) / MIB for phase, value in
            (("start-up", record["startup"]), ("steps", record["peaks"][-1]), ("checkpoint", record["saves"][-1]))}


@pytest.fixture(scope="module")
def one_process_big(tiny_data_dir, tmp_path_factory) -> dict[str, float]:
    folder = tmp_path_factory.mktemp("big1")
    measured = phases(measure(BIG, 1, tiny_data_dir, folder, timeout=900)[0])
    shutil.rmtree(folder / "out")   # its checkpoint: 3 GB of disk
    return measured


@pytest.mark.parametrize("name", BIG_LAYOUTS)
def test_a_model_of_several_gb_starts_steps_and_checkpoints_within_each_ranks_share(name, one_process_big,
                                                                                    tiny_data_dir, tmp_path):
    """The model is built on the meta device and each process makes only its pieces, and each writes its own
    share of every checkpoint (checkpoints in pieces): under FSDP(2), TP(2) and PP(2) each of the two processes
    peaks at start-up, in the steps and while checkpointing at under SHARE of one process's peak in the same
    phase (a layout that built or gathered the whole model would reach it), and its steps' peak is within
    BIG_MARGIN of the dry run's estimate for it (its stage's under --pp). Resumed in another layout, a process
    reads its share of the weights and AdamW's state from the pieces: its start-up peak is under SHARE of the
    whole state one process holds (its peak while checkpointing: weights and both moments)."""
    flags = BIG + BIG_LAYOUTS[name]
    records = measure(flags, 2, tiny_data_dir, tmp_path, timeout=900)
    resumed = measure(BIG + BIG_LAYOUTS[RESUMED_IN[name]] + ["--init_from=resume", "--max_iters=3"], 2,
                      tiny_data_dir, tmp_path, timeout=900)
    shutil.rmtree(tmp_path / "out")
    plans = planned(flags, 2, 1 if name == "pp" else 2)
    rows = ["one process: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in one_process_big.items())]
    within_share, near_estimate = True, True
    for rank, (record, resumed_record) in enumerate(zip(records, resumed)):
        measured = phases(record)
        updated, estimate = plans[rank if len(plans) > 1 else 0]
        expected = cpu_peak(updated, estimate, foreach=name != "tp") / MIB
        resumed_startup = (resumed_record["startup"] - resumed_record["baseline"]) / MIB
        rows.append(f"{name} rank {rank}: " + ", ".join(f"{k} {v:.0f} MiB ({v / one_process_big[k]:.2f}x)"
                                                        for k, v in measured.items())
                    + f"; dry run's estimate of the steps {expected:.0f} MiB; resumed under {RESUMED_IN[name]}: "
                    f"start-up {resumed_startup:.0f} MiB ({resumed_startup / one_process_big['checkpoint']:.2f}x)")
        within_share &= all(measured[k] < SHARE * one_process_big[k] for k in measured)
        within_share &= resumed_startup < SHARE * one_process_big["checkpoint"]
        near_estimate &= abs(measured["steps"] / expected - 1) < BIG_MARGIN
    print("\n".join(rows))
    assert within_share and near_estimate, "\n".join(rows)
