"""Tensor parallelism (--tp) on CPU with gloo: runs split across 2 and 4 processes under torchrun against one
process, checkpoints that move between those layouts, and the layouts refused with one line."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train
from checkpoints import load_checkpoint, rng_states
from runtime import restore_loop_state
from conftest import ROOT
from parallel import permute_qkv
from model import GPTConfig
from test_distributed import FIRST_ADAM_STEP_ATOL, assert_same_run, logged, run_train

# The model every run below trains: 4 heads, so 2 tensor-parallel processes hold 2 heads each, with the
# variants that act per head (ALiBi: each process's heads take their own slopes; RealFormer's scores, handed from
# block to block; sparse top-k) and Macaron's extra MLPs. 6 steps of 4 micro-batches of 4 sequences on one
# process; the same global batch on every layout (micro-batches x data-parallel replicas = 4).
MODEL = ["--n_head=4", "--position=alibi", "--realformer", "--sparse_topk=4", "--macaron", "--eval_interval=3"]


def test_permute_qkv_gives_each_rank_its_heads_and_inverts():
    """After permute_qkv, the r-th of tp equal blocks of c_attn's rows holds q, k and v of heads r H/tp ..
    (r+1) H/tp - 1, in that order; inverse=True restores the original order."""
    C, tp = 8, 2
    weight = torch.arange(3 * C, dtype=torch.float32)[:, None].expand(3 * C, 5)   # row i holds the value i
    q, k, v = torch.arange(C), torch.arange(C, 2 * C), torch.arange(2 * C, 3 * C)
    blocks = permute_qkv(weight, tp).chunk(tp)
    for r, block in enumerate(blocks):
        mine = slice(r * C // tp, (r + 1) * C // tp)
        assert torch.equal(block[:, 0].long(), torch.cat([q[mine], k[mine], v[mine]]))
    assert torch.equal(permute_qkv(permute_qkv(weight, tp), tp, inverse=True), weight)
    bias = weight[:, 0]                                           # (3C,): its rows move as the weight's do
    assert torch.equal(permute_qkv(bias, tp), permute_qkv(weight, tp)[:, 0])
    assert torch.equal(permute_qkv(weight, 1), weight)


@pytest.fixture(scope="module")
def one_process_run(tiny_data_dir, tmp_path_factory) -> str:
    """The reference: 6 steps on one process, checkpoints at steps 3 and 6."""
    out_dir = str(tmp_path_factory.mktemp("one"))
    run_train(out_dir, tiny_data_dir, 1, *MODEL, "--max_iters=6", "--gradient_accumulation_steps=4")
    return out_dir


@pytest.mark.slow
def test_tp2_with_sequence_parallelism_matches_one_process_and_resumes_there(one_process_run, tiny_data_dir,
                                                                              tmp_path):
    """3 steps under --tp=2 --sequence_parallel, accumulating 4 micro-batches, then 3 more on one process from
    its checkpoint: the losses and final weights of one process's straight run, within 1e-5 (the split
    weights, the vocabulary-parallel loss, global-norm clipping, and c_attn's rows put back in order)."""
    run_train(str(tmp_path), tiny_data_dir, 2, *MODEL, "--max_iters=3", "--gradient_accumulation_steps=4",
              "--tp=2", "--sequence_parallel")
    run_train(str(tmp_path), tiny_data_dir, 1, *MODEL, "--max_iters=6", "--gradient_accumulation_steps=4",
              "--init_from=resume")
    assert_same_run(one_process_run, str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("data_parallel", ["--fsdp", "--fsdp=False"])
def test_one_process_checkpoint_resumes_under_dp2_x_tp2(data_parallel, one_process_run, tiny_data_dir, tmp_path):
    """One process's step-3 checkpoint, resumed on 4 processes: 2 data-parallel replicas (FSDP-sharded, or full
    copies averaging their gradients), each split over 2 tensor-parallel processes, 2 micro-batches each: the
    same 3 last steps as one process."""
    resumed = str(tmp_path / "resumed")
    shutil.copytree(one_process_run, resumed)   # its ckpt-000003.pt (kept by --keep_last), the log up to there
    run_train(resumed, tiny_data_dir, 4, *MODEL, "--max_iters=6", "--gradient_accumulation_steps=2", "--tp=2",
              data_parallel, "--init_from=resume", f"--resume_from={os.path.join(resumed, 'ckpt-000003.pt')}")
    assert_same_run(one_process_run, resumed)


# train.py, and once its loop is done each process saves the parameters it holds whole (not split across the
# tensor-parallel ranks: the LayerNorms, the position embedding), which a checkpoint cannot show: it holds one copy.
SAVE_REPLICATED = """
import os, sys
import torch
sys.path.insert(0, {root!r})
import train
from processes import run_main
from torch.distributed.tensor import DTensor
plain_loop = train.train_loop

def loop_then_save_replicated(cfg, parallel, *args, **kwargs):
    result = plain_loop(cfg, parallel, *args, **kwargs)
    whole = {{name: p.detach() for name, p in parallel.module.named_parameters() if not isinstance(p, DTensor)}}
    torch.save(whole, os.path.join(cfg.out_dir, "replicated-rank" + os.environ["RANK"] + ".pt"))
    return result

train.train_loop = loop_then_save_replicated
run_main(train.main)
"""


@pytest.mark.slow
def test_a_ddp_checkpoint_resumed_under_tp_keeps_the_replicated_weights_equal(tiny_data_dir, tmp_path):
    """Issue 23: 3 steps of DDP on 2 processes with dropout, resumed under --tp=2 (2 processes again) to step 6.
    Each process took back its own saved RNG state, those of two DDP replicas, so the two tensor-parallel ranks
    of the one replica drew different dropout masks on the activations they replicate, and their LayerNorm
    and position weights drifted 1e-3 apart in 3 steps. They must stay equal, as in a run from scratch."""
    script = tmp_path / "train_saving_replicated.py"
    script.write_text(SAVE_REPLICATED.format(root=ROOT))
    out_dir = str(tmp_path / "run")
    run_train(out_dir, tiny_data_dir, 2, "--dropout=0.1", "--max_iters=3", "--eval_interval=3")
    run_train(out_dir, tiny_data_dir, 2, "--dropout=0.1", "--max_iters=6", "--eval_interval=3", "--tp=2",
              "--init_from=resume", script=str(script))
    assert sorted(logged(out_dir)) == [1, 2, 3, 4, 5, 6]
    ranks = [torch.load(os.path.join(out_dir, f"replicated-rank{rank}.pt"), weights_only=True) for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() >= {"transformer.wpe.weight", "transformer.ln_f.weight"}
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), name
    at_step_3 = load_checkpoint(os.path.join(out_dir, "ckpt-000003.pt"))["model"]["transformer.wpe.weight"]
    assert not torch.equal(ranks[0]["transformer.wpe.weight"], at_step_3)   # the resumed steps moved them


def test_random_streams_come_back_on_the_layout_that_saved_them_only():
    """restore_loop_state gave each process its own saved RNG state whenever the number of processes matched
    (issue 23). On the same layout it still must (the run goes on exactly); on another, every process takes
    rank 0's batch order, and its dropout stream is seeded as a run from scratch of the new layout seeds it
    (the tensor-parallel ranks of a replica share a seed, so they draw alike), with the step mixed in, so it
    does not replay the masks of step 0. A checkpoint older than the layout's record: the caller's guess."""
    import numpy as np
    import random
    ddp2, tp2 = {"pp": 1, "dp": 2, "tp": 1, "fsdp": False}, {"pp": 1, "dp": 1, "tp": 2, "fsdp": False}
    saved = []
    with torch.random.fork_rng():
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            for rank in (0, 1):                 # the two DDP processes' generators, each in its own state
                torch.manual_seed(100 + rank)
                saved.append(rng_states(torch.Generator().manual_seed(200 + rank)))
            state = {"scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(), "step": 3,
                     "best_val_loss": 1.0, "rng": saved, "layout": ddp2}
            older = {k: v for k, v in state.items() if k != "layout"}

            def resume(state: dict, rank: int, layout: dict, older_layout=None) -> tuple:
                """(the next dropout draws, the data generator's state) of process `rank` after the resume."""
                data = torch.Generator()
                assert restore_loop_state(state, torch.amp.GradScaler("cpu", enabled=False), data, rank, "cpu",
                                          layout, 7, older_layout) == (3, 1.0)   # 7: seed + rank // tp
                return torch.rand(8), data.get_state()

            for rank in (0, 1):                 # the same layout: each its own streams, as saved
                for resumed in (resume(state, rank, ddp2), resume(older, rank, ddp2, older_layout=ddp2)):
                    torch.set_rng_state(saved[rank]["torch"])
                    assert torch.equal(resumed[0], torch.rand(8))
                    assert torch.equal(resumed[1], saved[rank]["data"])
            torch.manual_seed(7)
            from_step_0 = torch.rand(8)
            tp_ranks = [resume(state, rank, tp2) for rank in (0, 1)] + [resume(older, 1, tp2, older_layout=None)]
            for draws, data in tp_ranks:
                assert torch.equal(draws, tp_ranks[0][0]) and not torch.equal(draws, from_step_0)
                assert torch.equal(data, saved[0]["data"])
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def test_older_checkpoints_give_their_layout_from_their_run_config():
    rng = [{}, {}, {}, {}]                  # 4 processes
    checkpoint = {"rng": rng, "train_config": {"pp": 2, "tp": 1, "fsdp": True}}
    assert train.saved_layout(checkpoint) == {"pp": 2, "dp": 2, "tp": 1, "fsdp": True}
    assert train.saved_layout({"rng": rng, "train_config": {"pp": 1, "fsdp": False}}) is None   # before --tp


def one_line_error(check, *args) -> str:
    with pytest.raises(SystemExit) as stop:
        check(*args)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message



@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_each_tensor_parallel_rank_drops_its_own_heads_from_the_shared_stream(sequence_parallel):
    """Before, every rank of a tensor-parallel group drew attention dropout from the one shared stream, so
    head h and head h + H/tp lost the same weights. With rank_streams_for_dropout the same block on two ranks
    drops differently from the same shared state, both leave the shared stream in the same state (so masks on
    replicated activations stay equal), a rank repeats itself, and activation checkpointing's recomputation
    replays the same masks (its output and gradients equal those of the stored forward)."""
    from parallel import rank_streams_for_dropout
    from model import Block, run_block
    config = GPTConfig(n_head=4, n_embd=32, block_size=16, dropout=0.5, sdpa=False)
    torch.manual_seed(0)
    plain, x = Block(config), torch.randn(2, 16, 32)
    ranks = {}
    for rank in (0, 1):
        ranks[rank] = Block(config)
        ranks[rank].load_state_dict(plain.state_dict())
        rank_streams_for_dropout(ranks[rank], rank, "cpu", sequence_parallel)

    def run(rank: int, recompute: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block's output, the shared stream's state after its forward, and c_attn's gradient."""
        torch.manual_seed(1)
        block, xr = ranks[rank], x.clone().requires_grad_()
        out = run_block(block, xr, recompute)
        state = torch.get_rng_state()
        out.square().sum().backward()
        grad = block.attn.c_attn.weight.grad.clone()
        block.zero_grad(set_to_none=True)
        return out.detach(), state, grad

    out0, state0, _ = run(0, recompute=False)
    out1, state1, grad1 = run(1, recompute=False)
    assert not torch.allclose(out0, out1)              # each rank its own masks
    assert torch.equal(state0, state1)                 # the shared stream in step
    again, _, _ = run(1, recompute=False)
    torch.testing.assert_close(again, out1, rtol=0, atol=0)
    recomputed, _, recomputed_grad = run(1, recompute=True)
    torch.testing.assert_close(recomputed, out1, rtol=0, atol=0)
    torch.testing.assert_close(recomputed_grad, grad1, rtol=0, atol=0)


@pytest.mark.parametrize("flags,model,fragment", [
    (dict(tp=3), dict(n_head=4, n_embd=48), "--tp=3 must divide --n_head (4): attention splits by whole heads"),
    (dict(tp=0), {}, "--tp=0 must be >= 1"),
    (dict(sequence_parallel=True), {}, "--sequence_parallel splits the sequence across tensor-parallel "
                                       "processes: add --tp=N"),
    (dict(tp=2, loss_chunk=512), {}, "--loss_chunk=512 does not apply under --tp"),
    (dict(tp=2, compile=True), {}, "--compile is not supported with --tp yet"),
    (dict(tp=2, sequence_parallel=True), dict(rezero=True), "--sequence_parallel with --rezero is not supported"),
    (dict(tp=2, sequence_parallel=True), dict(block_size=15), "needs --tp=2 to divide --block_size=15"),
])
def test_bad_tensor_parallel_flags_are_refused_with_one_line(flags, model, fragment):
    message = one_line_error(train.check_config, train.TrainConfig(**flags), GPTConfig(**model))
    assert fragment in message, message


@pytest.mark.parametrize("flags", [dict(tp=2), dict(pp=2), dict(fsdp=True)])
def test_float16_is_refused_by_the_layouts_that_cannot_scale_its_loss(flags):
    """Checked on the dtype the run resolved to, with the number of processes known (check_layout)."""
    flag = "--" + next(iter(flags))
    message = one_line_error(train.check_layout, train.TrainConfig(dtype="float16", **flags), 2)
    assert message == f"error: --dtype=float16 needs a gradient scaler, which {flag} does not support here; use " \
                      f"--dtype=bfloat16 or float32", message
    train.check_layout(train.TrainConfig(dtype="bfloat16", **flags), 2)   # accepted


def test_a_world_size_that_tp_does_not_divide_is_refused_with_a_command_that_works():
    message = one_line_error(train.check_layout, train.TrainConfig(tp=2), 3)
    assert message == "error: --tp=2 needs a multiple of 2 processes, not 3: torchrun --nproc-per-node=2 " \
                      "train.py ... works"
    train.check_layout(train.TrainConfig(tp=2), 4)   # dp2 x tp2: accepted


# --- TP runs against one process without clipping, in bf16, on 4 processes; dropout and recomputation ---

# A plain model of 4 heads (1 per process under --tp=4), 4 steps of 2 micro-batches, no clipping.
UNCLIPPED_TP = ["--n_head=4", "--gradient_accumulation_steps=2", "--max_iters=4", "--eval_interval=4",
                "--grad_clip=0"]


@pytest.fixture(scope="module")
def unclipped_one_process_runs(tiny_data_dir, tmp_path_factory) -> dict[str, str]:
    """The references, in fp32 and in bf16: one process, the UNCLIPPED_TP run."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        runs[dtype] = str(tmp_path_factory.mktemp(dtype))
        run_train(runs[dtype], tiny_data_dir, 1, *UNCLIPPED_TP, f"--dtype={dtype}")
    return runs


@pytest.mark.slow
def test_tp4_without_clipping_matches_one_process(unclipped_one_process_runs, tiny_data_dir, tmp_path):
    """--tp=4 on 4 processes, one head each, with --grad_clip=0: one process's losses, gradient norms (the
    norm clip_by_global_norm computes from 4 slices and the replicated pieces counted once) and weights."""
    run_train(str(tmp_path), tiny_data_dir, 4, *UNCLIPPED_TP, "--tp=4")
    assert_same_run(unclipped_one_process_runs["float32"], str(tmp_path), weights_atol=FIRST_ADAM_STEP_ATOL)


def update_difference(a: str, b: str) -> float:
    """|| Wa - Wb || / || Wa - W0 || over all the weights: how far apart runs a and b ended, for the distance
    run a travelled from its step-0 checkpoint W0 (ckpt-000000.pt, kept by --keep_last)."""
    start, final_a, final_b = (load_checkpoint(path)["model"] for path in (
        os.path.join(a, "ckpt-000000.pt"), os.path.join(a, "ckpt.pt"), os.path.join(b, "ckpt.pt")))
    apart = sum((final_a[name] - final_b[name]).float().square().sum() for name in final_a)
    travelled = sum((final_a[name] - start[name]).float().square().sum() for name in final_a)
    return (apart / travelled).sqrt().item()


@pytest.mark.slow
def test_tp2_in_bf16_matches_one_process_in_bf16(unclipped_one_process_runs, tiny_data_dir, tmp_path):
    """--tp=2 --dtype=bfloat16 against one process in bf16. The two cannot round alike: each process's half of a
    row-parallel matmul is rounded to bf16 (8 significant bits: off by up to 2^-8 relative) before the
    all-reduce adds the halves. So, bf16-honest tolerances, each well above what the runs differ by and well
    below a wrong gradient: losses within 1e-3 (they differ by <= 1e-4), gradient norms within 1% (<= 3e-4;
    a factor of 2 is far outside), and the distance between the final weights within 15% of the distance they
    travelled from step 0 (4%: AdamW's steps are lr-sized whatever a gradient element's size, so rounding
    that moves small elements moves their weights by a fraction of lr; elementwise the weights differ by up
    to 7e-3, of the order of bf16 against fp32 on one process, 4e-3). And the run did compute in bf16: at
    some step its gradient norm is more than 1e-4 (relative) from fp32's, where fp32 layouts agree to 2e-7."""
    run_train(str(tmp_path), tiny_data_dir, 2, *UNCLIPPED_TP, "--tp=2", "--dtype=bfloat16")
    one_bf16, one_fp32, tp2 = unclipped_one_process_runs["bfloat16"], unclipped_one_process_runs["float32"], \
        str(tmp_path)
    losses, norms = (logged(one_bf16, key) for key in ("loss", "grad_norm"))
    assert logged(tp2) == pytest.approx(losses, abs=1e-3)
    assert logged(tp2, "grad_norm") == pytest.approx(norms, rel=1e-2)
    assert update_difference(one_bf16, tp2) < 0.15
    fp32_norms = logged(one_fp32, "grad_norm")
    assert max(abs(n / fp32_norms[step] - 1) for step, n in logged(tp2, "grad_norm").items()) > 1e-4


# Run under torchrun in place of train.py: train.py, with DataParallel.state_pieces (which every process calls
# at each checkpoint) first saving this process's own parameters, whole or its slice, to out_dir/rank-<r>.pt.
SAVE_EVERY_RANK = f"""
import os, runpy, sys
sys.path.insert(0, {ROOT!r})
import torch
import torch.distributed as dist
import parallel
import runtime

state_pieces = runtime.DataParallel.state_pieces

def save_every_rank(self, optimizer):
    out_dir = next(arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("--out_dir="))
    mine = {{name: parallel.local_value(t).detach().clone() for name, t in self.module.state_dict().items()}}
    torch.save(mine, os.path.join(out_dir, f"rank-{{dist.get_rank()}}.pt"))
    return state_pieces(self, optimizer)

runtime.DataParallel.state_pieces = save_every_rank
sys.argv[0] = {os.path.join(ROOT, "train.py")!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_tp2_with_dropout_keeps_replicas_equal_and_recomputation_changes_nothing(tiny_data_dir, tmp_path):
    """--tp=2 with dropout 0.2 (each process draws its heads' attention dropout from its own stream, the
    dropouts of what both hold from the shared one), with and without --activation_checkpointing, the same
    seed: the same losses, gradient norms and weights (the recomputed forward draws the masks it drew the
    first time), and in both runs the parameters both processes hold whole (the LayerNorms, c_proj's bias:
    those whose slice is the whole tensor) are equal on both, bit for bit: a mask drawn differently on a
    replicated activation would give them different gradients, which nothing averages."""
    script = tmp_path / "save_every_rank.py"
    script.write_text(SAVE_EVERY_RANK)
    runs = {recompute: str(tmp_path / f"recompute={recompute}") for recompute in (False, True)}
    for recompute, out_dir in runs.items():
        run_train(out_dir, tiny_data_dir, 2, *MODEL, "--max_iters=3", "--gradient_accumulation_steps=2", "--tp=2",
                  "--dropout=0.2", f"--activation_checkpointing={recompute}", script=str(script))
    assert_same_run(runs[False], runs[True])
    for out_dir in runs.values():
        checkpoint = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
        assert checkpoint["model_config"]["dropout"] == 0.2
        rank0, rank1 = (torch.load(os.path.join(out_dir, f"rank-{r}.pt"), weights_only=True) for r in (0, 1))
        whole = [name for name, t in rank0.items() if t.shape == checkpoint["model"][name].shape]
        assert {"transformer.h.0.ln_1.weight", "transformer.h.1.attn.c_proj.bias",
                "transformer.h.1.mlp_0.c_proj.bias", "transformer.ln_f.bias"} <= set(whole)
        assert "transformer.h.0.attn.c_attn.weight" not in whole
        for name in whole:
            assert torch.equal(rank0[name], rank1[name]), name


FUSED_ADAMW_ON_DTENSORS = """\
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from parallel import use_single_tensor_adamw
dist.init_process_group("gloo", rank=0, world_size=1, init_method={store!r})
mesh = init_device_mesh("cpu", (1,))
params = [torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)])),   # a split matrix
          torch.nn.Parameter(torch.randn(4))]                                            # a plain bias
optimizer = torch.optim.AdamW(params, fused=True, foreach=None)   # what configure_optimizers gives on CUDA
use_single_tensor_adamw(optimizer)
for p in params:
    p.grad = torch.ones_like(p)
optimizer.step()
print("stepped", [p.grad is not None for p in params], optimizer.state[params[0]]["step"].item())
dist.destroy_process_group()
"""


def test_tensor_parallel_adamw_steps_a_mix_of_dtensors_and_plain_tensors_where_fused(tmp_path):
    """On CUDA configure_optimizers asks for the fused AdamW kernel, which PyTorch takes before foreach and
    which refuses DTensor weights mixed with plain ones (tensor parallelism without FSDP leaves both):
    use_single_tensor_adamw turns off both multi-tensor kernels, so the first step runs (issue 27.1). Fused
    AdamW runs on the CPU too, so this checks it here with one process's DTensors."""
    script = tmp_path / "fused.py"
    script.write_text(FUSED_ADAMW_ON_DTENSORS.format(root=ROOT, store=f"file://{tmp_path / 'store'}"))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "stepped [True, True] 1.0" in result.stdout, result.stderr[-2000:]
