"""Tensor parallelism (--tp) on CPU with gloo: runs split across 2 and 4 processes under torchrun against one
process, checkpoints that move between those layouts, and the layouts refused with one line."""
import os
import shutil

import pytest
import torch

import train
from distributed import permute_qkv
from model import GPTConfig
from test_distributed import assert_same_run, run_train

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
    from distributed import rank_streams_for_dropout
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
