"""Pipelines on one (pp, dp, tp) device mesh on CPU with gloo: stages sharded with FSDP or split with tensor
parallelism compute what one process does, and their checkpoints move between layouts."""
import os

import pytest
import torch

from common import load_checkpoint
from test_distributed import assert_same_run, run_train

pytestmark = pytest.mark.slow

# 4 blocks, 2 stages, a global batch of 8 sequences in each optimizer step, 6 steps.
RUN = ["--n_layer=4", "--max_iters=6", "--eval_interval=3"]


@pytest.fixture(scope="module")
def one_process_run(tiny_data_dir, tmp_path_factory) -> str:
    """The reference: 1 process, 2 micro-batches of 4 sequences per step."""
    out_dir = str(tmp_path_factory.mktemp("one"))
    run_train(out_dir, tiny_data_dir, 1, *RUN, "--gradient_accumulation_steps=2")
    return out_dir


def test_pipeline_of_fsdp_stages_matches_one_process_and_resumes_on_one(one_process_run, tiny_data_dir, tmp_path):
    """PP(2) x FSDP(2) on 4 processes, with accumulation (2 schedule steps of 2 micro-batches of 1 sequence per
    update on each of the 2 shards, gradients reduced once): the same losses and weights as one process.
    Its checkpoint at step 3 (gathered from the shards by rank 0) then resumes on one process like the
    straight run, so weights and AdamW's moments were saved whole and by name."""
    layout = ["--pp=2", "--fsdp", "--batch_size=2", "--gradient_accumulation_steps=2"]
    run_train(str(tmp_path / "pp2 x fsdp2"), tiny_data_dir, 4, *RUN, *layout)
    assert_same_run(one_process_run, str(tmp_path / "pp2 x fsdp2"))
    weights = load_checkpoint(os.path.join(tmp_path / "pp2 x fsdp2", "ckpt.pt"))["model"]
    assert torch.equal(weights["transformer.wte.weight"], weights["lm_head.weight"])   # the tied copies agree
    moved = str(tmp_path / "moved")
    run_train(moved, tiny_data_dir, 4, *RUN, *layout, "--max_iters=3")
    run_train(moved, tiny_data_dir, 1, *RUN, "--gradient_accumulation_steps=2", "--init_from=resume")
    assert_same_run(one_process_run, moved)
