"""The GPU paths: mixed precision with and without loss scaling, torch.compile, the fused attention kernels, fused
AdamW, compiled sampling, checkpoints between a GPU and the CPU, and the layouts over NCCL. Marked `gpu`: they
run wherever CUDA is present (`python -m pytest -m gpu` runs them alone) and are skipped, with the reason,
where it is not. GPT_TEST_GPU_DEVICE=cpu runs the same tests on the CPU (gloo instead of NCCL), which checks
the tests themselves; the fused attention kernels have no CPU form and stay skipped there."""
import json
import os
import subprocess
import sys

import pytest
import torch

from checkpoints import load_checkpoint
from conftest import ROOT, TINY_MODEL_FLAGS
from model import GPT, GPTConfig, configure_optimizers, explicit_attention, generate, sdpa_attention

DEVICE = os.environ.get("GPT_TEST_GPU_DEVICE", "cuda")
ON_GPU = DEVICE.startswith("cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]
needs_two = pytest.mark.skipif(ON_GPU and torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs")


def train(out_dir: str, data_dir: str, *flags: str, nproc: int = 1) -> list[dict]:
    """train.py on the tiny dataset and model on DEVICE (one process, or nproc under torchrun: NCCL between
    GPUs), 8 steps in fp32 unless flags say otherwise; returns metrics.jsonl's records."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    result = subprocess.run([*launcher, os.path.join(ROOT, "train.py"), f"--data_dir={data_dir}", "--dataset=tiny",
                             f"--out_dir={out_dir}", *TINY_MODEL_FLAGS, "--batch_size=8", "--max_iters=8",
                             "--eval_interval=4", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--lr_decay_iters=8",
                             "--dropout=0", "--dtype=float32", "--compile=False", f"--device={DEVICE}", *flags],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_records(out_dir)


def load_records(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def fp32_run(tiny_data_dir, tmp_path_factory) -> str:
    out_dir = str(tmp_path_factory.mktemp("fp32"))
    train(out_dir, tiny_data_dir)
    return out_dir


# Mixed precision rounds each matmul's inputs to 8 (bf16) or 11 (fp16) significant bits: a relative error of
# 2^-8 = 0.4% or 2^-11 = 0.05% per product, which over 8 steps of this model moves the loss (about 4 nats at
# the start) by well under 1%. 0.05 nats for bf16 and 0.02 for fp16 leave room for that and catch what
# matters: a wrong scale of the loss or the gradients (the scaler's unscaling) changes it by far more.
@pytest.mark.parametrize("dtype, atol", [("bfloat16", 0.05), ("float16", 0.02)])
def test_mixed_precision_tracks_fp32(dtype, atol, fp32_run, tiny_data_dir, tmp_path):
    records = train(str(tmp_path), tiny_data_dir, f"--dtype={dtype}")
    assert losses(records) == pytest.approx(losses(load_records(fp32_run)), abs=atol)
    scaler = load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))["scaler"]
    assert bool(scaler) == (dtype == "float16")     # fp16 trains with loss scaling, bf16 needs none
    if dtype == "float16":
        assert scaler["scale"] >= 1.0 and losses(records)[-1] < losses(records)[0] - 0.1   # steps were taken


# The compiled step fuses kernels and reorders fp32 sums (and on a GPU, train.py's TF32 matmuls round to 10
# bits either way): the two runs agree to ~1e-4 over 8 steps, not bit for bit.
def test_compiled_training_matches_eager(fp32_run, tiny_data_dir, tmp_path):
    compiled = train(str(tmp_path), tiny_data_dir, "--compile=True")
    assert losses(compiled) == pytest.approx(losses(load_records(fp32_run)), abs=2e-3)


@pytest.mark.skipif(not ON_GPU, reason="flash and memory-efficient attention are CUDA kernels")
@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
def test_fused_attention_kernels_match_the_explicit_attention(backend):
    """Forward and backward of sdpa_attention forced onto one CUDA kernel (it fails if that kernel cannot run
    these inputs) against the explicit softmax(QK^T/sqrt(D))V in fp32. In bf16 each output is a sum of values
    rounded to 8 bits: errors of a few 2^-8 = 0.004 of the values' scale (1 here)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 128, 64, device=DEVICE) for _ in range(3))
    grad_out = torch.randn(2, 4, 128, 64, device=DEVICE)
    reference = [t.clone().requires_grad_() for t in (q, k, v)]
    explicit_attention(*reference).backward(grad_out)
    fused = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(getattr(SDPBackend, backend)):
        out = sdpa_attention(*fused)
        out.backward(grad_out.to(torch.bfloat16))
    torch.testing.assert_close(out.float(), explicit_attention(q, k, v), rtol=0, atol=2e-2)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=0, atol=5e-2)


def test_fused_adamw_matches_the_plain_one():
    """configure_optimizers picks the fused AdamW kernel on CUDA: 5 steps on the same gradients give the
    single-tensor AdamW's weights to fp32 rounding (the fused kernel orders its arithmetic differently)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)).to(DEVICE)
    plain_model = GPT(model.config).to(DEVICE)
    plain_model.load_state_dict(model.state_dict())
    fused = configure_optimizers(model, 0.1, 1e-2, (0.9, 0.95), DEVICE.split(":")[0])
    plain = configure_optimizers(plain_model, 0.1, 1e-2, (0.9, 0.95), "cpu")   # the multi-tensor (foreach) one
    assert (fused.param_groups[0]["fused"], plain.param_groups[0]["fused"]) == (ON_GPU, False)
    for step in range(5):
        x = torch.randint(0, 64, (4, 16), device=DEVICE)
        for m, optimizer in ((model, fused), (plain_model, plain)):
            m(x, x).backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, a), b in zip(model.state_dict().items(), plain_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_compiled_greedy_sampling_equals_eager_and_never_samples_padding():
    """Greedy decoding (temperature 0) with the KV cache, each step compiled, gives the eager tokens; with a
    vocabulary padded past the tokenizer's (vocab_limit) no padded id is ever drawn, even where the padded rows'
    logits are the largest."""
    torch.backends.cuda.matmul.allow_tf32 = False   # the same rounding in both: ties in argmax would differ
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=80)).to(DEVICE).eval()
    prompt = torch.randint(0, 64, (2, 3), device=DEVICE)
    eager = torch.stack(list(generate(model, prompt, 40, temperature=0)))
    compiled = torch.stack(list(generate(model, prompt, 40, temperature=0, compile=True)))
    assert torch.equal(eager, compiled)
    with torch.no_grad():
        model.lm_head.weight[64:] = 0
        model.lm_head.weight[64:, 0] = 1e3                 # padded ids 64..79 would win every step
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    for compile in (False, True):
        tokens = torch.stack(list(generate(model, prompt, 40, temperature=1.0, generator=generator, vocab_limit=64,
                                           compile=compile)))
        assert int(tokens.max()) < 64


# A checkpoint is the same file on either device, and a run resumed on the other one goes on from it: its
# arithmetic is then that device's, so the losses follow the straight run's within the rounding of the other
# device's kernels (TF32 on a GPU), not bit for bit.
@pytest.mark.parametrize("first, second", [(DEVICE, "cpu"), ("cpu", DEVICE)])
def test_a_checkpoint_moves_between_the_gpu_and_the_cpu(first, second, tiny_data_dir, tmp_path):
    straight = train(str(tmp_path / "straight"), tiny_data_dir, f"--device={first}")
    out_dir = str(tmp_path / "moved")
    train(out_dir, tiny_data_dir, f"--device={first}", "--max_iters=4")
    resumed = train(out_dir, tiny_data_dir, f"--device={second}", "--init_from=resume")
    assert len(losses(resumed)) == 8 and losses(resumed) == pytest.approx(losses(straight), abs=2e-3)
    assert load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["step"] == 8


# The layouts over NCCL against one process, as tests/test_distributed.py and test_tensor_parallel.py check them
# over gloo. GPU matmuls in TF32 round to 10 bits, and each layout multiplies other shapes (its share of the
# batch, its slice of the weights), so they agree to ~1e-3 where fp32 on the CPU agrees to 1e-5.
@needs_two
@pytest.mark.parametrize("flags", [["--gradient_accumulation_steps=2"], ["--fsdp", "--gradient_accumulation_steps=2"],
                                   ["--tp=2", "--gradient_accumulation_steps=4"],
                                   ["--pp=2", "--gradient_accumulation_steps=4"]],
                         ids=["ddp", "fsdp", "tp", "pp"])
def test_layouts_over_nccl_match_one_process(flags, tiny_data_dir, tmp_path):
    one = train(str(tmp_path / "one"), tiny_data_dir, "--gradient_accumulation_steps=4")
    two = train(str(tmp_path / "two"), tiny_data_dir, *flags, nproc=2)
    assert losses(two) == pytest.approx(losses(one), abs=2e-3)
    norms = [[r["grad_norm"] for r in run if "grad_norm" in r] for run in (one, two)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-2)
    weights = [load_checkpoint(os.path.join(tmp_path, run, "ckpt.pt"))["model"] for run in ("one", "two")]
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name].float(), weights[0][name].float(), rtol=0, atol=2e-3,
                                   msg=name)
