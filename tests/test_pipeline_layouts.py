"""Pipelines on one (pp, dp, tp) device mesh on CPU with gloo: stages sharded with FSDP or split with tensor
parallelism compute what one process does, and their checkpoints move between layouts."""
import os
import shutil

import pytest
import torch

from checkpoints import load_checkpoint
from test_distributed import assert_same_run, run_train

pytestmark = pytest.mark.slow

# 4 blocks, 2 stages, a global batch of 8 sequences in each optimizer step, 6 steps, checkpoints at 3 and 6.
RUN = ["--n_layer=4", "--max_iters=6", "--eval_interval=3"]
ONE_PROCESS = ["--gradient_accumulation_steps=2"]


@pytest.fixture(scope="module")
def one_process_run(tiny_data_dir, tmp_path_factory) -> str:
    """The reference: 1 process, 2 micro-batches of 4 sequences per step."""
    out_dir = str(tmp_path_factory.mktemp("one"))
    run_train(out_dir, tiny_data_dir, 1, *RUN, *ONE_PROCESS)
    return out_dir


def resume_at_step_3(run: str, moved: str, data_dir: str, nproc: int, *flags: str) -> None:
    """Continue a copy of `run` from its step-3 checkpoint (ckpt-000003.pt, written by its own layout) under
    another layout, to step 6. The copy's later checkpoints are removed: the final weights compared are the
    resumed run's, and the log is cut back to step 3 by the resumed run, which logs steps 4-6 again."""
    shutil.copytree(run, moved)
    for name in ("ckpt.pt", "ckpt-000006.pt"):
        os.remove(os.path.join(moved, name))
    run_train(moved, data_dir, nproc, *RUN, *flags, "--init_from=resume",
              f"--resume_from={os.path.join(moved, 'ckpt-000003.pt')}")


def test_pipeline_of_fsdp_stages_matches_one_process_and_resumes_on_one(one_process_run, tiny_data_dir, tmp_path):
    """PP(2) x FSDP(2) on 4 processes, with accumulation (2 schedule steps of 2 micro-batches of 1 sequence per
    update on each of the 2 shards, gradients reduced once): the same losses and weights as one process.
    Its checkpoint at step 3 (gathered from the shards by rank 0) then resumes on one process like the
    straight run, so weights and AdamW's moments were saved whole and by name."""
    run, moved = str(tmp_path / "pp2 x fsdp2"), str(tmp_path / "moved")
    run_train(run, tiny_data_dir, 4, *RUN, "--pp=2", "--fsdp", "--batch_size=2", "--gradient_accumulation_steps=2")
    assert_same_run(one_process_run, run)
    weights = load_checkpoint(os.path.join(run, "ckpt.pt"))["model"]
    assert torch.equal(weights["transformer.wte.weight"], weights["lm_head.weight"])   # the tied copies agree
    resume_at_step_3(run, moved, tiny_data_dir, 1, *ONE_PROCESS)
    assert_same_run(one_process_run, moved)


def test_pipeline_of_tensor_parallel_stages_matches_one_process_and_resumes_from_one(one_process_run,
                                                                                      tiny_data_dir, tmp_path):
    """PP(2) x TP(2) on 4 processes: each stage's blocks split by heads and hidden units, the tied embedding and
    head by vocabulary, the loss from the split logits, gradients summed between the tied copies' matching
    pieces. The same losses and weights as one process; and the one-process run's step-3 checkpoint resumes
    under PP(2) x TP(2) like the straight run (each process takes its slice of the saved weights and AdamW
    moments, c_attn's rows reordered per rank)."""
    run, moved = str(tmp_path / "pp2 x tp2"), str(tmp_path / "moved")
    layout = ["--pp=2", "--tp=2", "--gradient_accumulation_steps=2"]
    run_train(run, tiny_data_dir, 4, *RUN, *layout)
    assert_same_run(one_process_run, run)
    resume_at_step_3(one_process_run, moved, tiny_data_dir, 4, *layout)
    assert_same_run(one_process_run, moved)


def test_pipeline_of_sequence_parallel_stages_matches_one_process(one_process_run, tiny_data_dir, tmp_path):
    """PP(2) x TP(2) with --sequence_parallel on 4 processes: each stage's LayerNorms and residual stream split
    along the sequence, the stages sending each other their (B, T/2, C) slices, the first stage cutting the
    embedding's output and the last one's ln_f taking its slice. The same losses, gradient norms and weights
    as one process."""
    run_train(str(tmp_path), tiny_data_dir, 4, *RUN, "--pp=2", "--tp=2", "--sequence_parallel",
              "--gradient_accumulation_steps=2")
    assert_same_run(one_process_run, str(tmp_path))


def test_fsdp_pipeline_accumulation_is_refused_where_torch_cannot_defer_the_reduction(monkeypatch):
    """Pipeline.forward_backward defers FSDP's reduce-scatter to the last accumulated batch by overriding the
    pipelining stage's perform_reduce_grad; on a torch whose stage lacks that hook the gradients would be
    reduced after every batch, so train.py refuses the layout in one line instead of training on them."""
    import train
    from torch.distributed.pipelining import PipelineStage
    from model import GPTConfig
    from test_tensor_parallel import one_line_error
    cfg = train.TrainConfig(pp=2, fsdp=True, batch_size=4, gradient_accumulation_steps=2)
    train.check_config(cfg, GPTConfig())                     # this torch has the hook: accepted
    owner = next(c for c in PipelineStage.__mro__ if "perform_reduce_grad" in vars(c))   # a base class
    monkeypatch.delattr(owner, "perform_reduce_grad")
    message = one_line_error(train.check_config, cfg, GPTConfig())
    assert "--fsdp with --pp and --gradient_accumulation_steps > 1 needs a newer torch" in message, message
    train.check_config(train.TrainConfig(pp=2, fsdp=True, batch_size=4), GPTConfig())   # no accumulation: fine
