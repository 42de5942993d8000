"""finetune_lora.py: LoRA layers, merging, masking, loss averaging, exact resume, data errors, generate --lora."""
import copy
import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import finetune_lora as ft
import generate
from conftest import ROOT, run_script
import lora
from checkpoints import load_checkpoint, save_checkpoint
from runtime import DataParallel, clip_and_step
from tokenization import get_tokenizer
from model import GPT, GPTConfig, configure_optimizers
from test_errors import assert_one_line_error

# Instruction text needs the real tokenizer, so the tiny models have GPT-2's vocabulary.
TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50257)
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
            "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo", "Greece": "Athens",
            "Cuba": "Havana", "Chile": "Santiago", "Poland": "Warsaw", "Ireland": "Dublin", "India": "New Delhi",
            "Canada": "Ottawa", "Austria": "Vienna", "Portugal": "Lisbon", "Sweden": "Stockholm",
            "Turkey": "Ankara", "Mali": "Bamako", "Nepal": "Kathmandu", "Fiji": "Suva", "Laos": "Vientiane"}
RECORDS = [{"instruction": f"What is the capital of {country}?", "input": "", "output": capital}
           for country, capital in CAPITALS.items()]
RECORDS += [{"instruction": "Name the country.", "input": capital, "output": country}
            for country, capital in list(CAPITALS.items())[:12]]


def tiny_model(seed: int) -> GPT:
    """A random tiny GPT standing in for a pre-trained base. Its token embedding is drawn wider than GPT-2's
    init (std 0.2, not 0.02) so that a 32-channel model can express confident predictions at all."""
    torch.manual_seed(seed)
    model = GPT(TINY)
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, 0.2)
    return model


def write_base(folder, seed: int) -> str:
    """A base checkpoint laid out as train.py writes it; returns its directory."""
    os.makedirs(folder, exist_ok=True)
    save_checkpoint({"model": tiny_model(seed).state_dict(), "model_config": dataclasses.asdict(TINY),
                     "step": 0, "train_config": {}}, os.path.join(folder, "ckpt.pt"))
    return str(folder)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> tuple[str, str]:
    """Two base checkpoints of the same shape and different weights."""
    root = tmp_path_factory.mktemp("bases")
    return write_base(root / "a", seed=0), write_base(root / "b", seed=1)


@pytest.fixture(scope="module")
def records_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("records") / "capitals.json"
    path.write_text(json.dumps(RECORDS))
    return str(path)


def finetune_flags(base: str, data: str, out_dir: str, *extra: str) -> list[str]:
    return [f"--init_from={base}", f"--data={data}", f"--out_dir={out_dir}", "--batch_size=4",
            "--gradient_accumulation_steps=2", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2",
            "--learning_rate=1e-2", "--min_lr=1e-3", "--val_fraction=0.2", *extra]


@pytest.fixture(scope="module")
def finetuned(bases, records_file, tmp_path_factory) -> str:
    """out_dir of a 40-step fine-tuning run on base a, with --merge (about 3 s)."""
    out_dir = str(tmp_path_factory.mktemp("finetuned"))
    ft.main(finetune_flags(bases[0], records_file, out_dir, "--max_iters=40", "--eval_interval=20",
                           "--lora_dropout=0", "--merge"))
    return out_dir


@pytest.fixture(scope="module")
def short_run(bases, records_file, tmp_path_factory) -> str:
    """out_dir of a 2-step fine-tuning run on base a: an adapter whose B is no longer zero."""
    out_dir = str(tmp_path_factory.mktemp("short_run"))
    ft.main(finetune_flags(bases[0], records_file, out_dir, "--max_iters=2", "--eval_interval=2",
                           "--lora_dropout=0"))
    return out_dir


def read_log(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def accumulate(model: GPT, micro_batches: list, scaler: torch.amp.GradScaler) -> torch.Tensor:
    """One step's forward and backward passes as fine-tuning runs them: through the pre-training runtime
    (runtime.DataParallel, one process), each micro-batch weighed by finetune_lora.token_weights. Returns
    the step's loss."""
    parallel = DataParallel(model, "cpu", torch.float32, 0, 1, fsdp=False, compile=False,
                            accum=len(micro_batches), loss_chunk=0)
    counts = [int((y != -1).sum()) for _, y in micro_batches]
    loss = torch.zeros(())
    for micro_step, ((x, y), weight) in enumerate(zip(micro_batches, ft.token_weights(counts, sum(counts), 1))):
        loss += parallel.forward_backward(x, y, micro_step, scaler, weight)
    return loss


def encoded(records: list[dict]) -> list[tuple[list[int], int]]:
    tokenizer = get_tokenizer()
    return [ft.encode_record(tokenizer, r) for r in records]


def response_loss(model: GPT, record: dict) -> float:
    """Mean cross-entropy over the record's response tokens (and its <|endoftext|>), written out by hand."""
    ids, n_prompt = encoded([record])[0]
    with torch.no_grad():
        log_probs = F.log_softmax(model(torch.tensor([ids[:-1]])), dim=-1)[0]   # (T, V)
    return -sum(log_probs[t, ids[t + 1]].item() for t in range(n_prompt - 1, len(ids) - 1)) / (len(ids) - n_prompt)


# --- the LoRA layer and merging ---

def test_lora_with_zero_B_matches_the_base_exactly():
    base = tiny_model(0).eval()
    adapted = lora.apply_lora(copy.deepcopy(base), list(lora.LORA_TARGETS), rank=4, alpha=8, dropout=0.0).eval()
    n_adapted = sum(isinstance(m, lora.LoRALinear) for m in adapted.modules())
    assert n_adapted == 4 * TINY.n_layer                                  # c_attn, c_proj, c_fc, c_proj per block
    assert all(m.lora_A.abs().sum() > 0 for m in adapted.modules() if isinstance(m, lora.LoRALinear))
    idx = torch.randint(0, TINY.vocab_size, (2, 20))
    assert torch.equal(adapted(idx), base(idx))


VARIANTS = {"plain": {}, "rezero": dict(rezero=True), "macaron": dict(macaron=True),
            "realformer": dict(realformer=True), "sparse_topk": dict(sparse_topk=4),
            "alibi": dict(position="alibi"), "rope": dict(position="rope"),
            "all at once": dict(rezero=True, macaron=True, realformer=True, sparse_topk=4, position="rope")}


@pytest.mark.parametrize("variant", VARIANTS)
def test_default_targets_adapt_every_linear_layer_of_every_variant(variant):
    """The default targets once named attn.* and mlp.* only, so Macaron's first half-step feed-forward
    (mlp_0.c_fc, mlp_0.c_proj) got no adapter: 40% of a Macaron block's weights stayed as the base had
    them."""
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(TINY, **VARIANTS[variant]))
    linears = {name for name, m in model.transformer.h.named_modules() if isinstance(m, torch.nn.Linear)}
    lora.apply_lora(model, lora.parse_targets(ft.FinetuneConfig().lora_targets), rank=2, alpha=4.0, dropout=0.0)
    adapted = {name for name, m in model.transformer.h.named_modules() if isinstance(m, lora.LoRALinear)}
    assert adapted == linears


def test_lora_layer_computes_the_low_rank_update():
    """y = W x + b + (alpha / R) B A x, checked against the formula with random A and B."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = lora.LoRALinear(base, rank=3, alpha=6.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 4, 6)
    expected = x @ base.weight.t() + base.bias + 2.0 * (x @ layer.lora_A.t() @ layer.lora_B.t())
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_merged_model_matches_unmerged_after_training(finetuned, bases):
    adapter_path = os.path.join(finetuned, "adapter.pt")
    unmerged = lora.load_base_with_adapter(adapter_path)[0].eval()
    assert any(m.lora_B.abs().sum() > 0 for m in unmerged.modules() if isinstance(m, lora.LoRALinear))
    idx = torch.randint(0, TINY.vocab_size, (2, 30))
    reference = unmerged(idx)
    merged = lora.merge_lora(copy.deepcopy(unmerged))
    assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(idx), reference, rtol=0, atol=1e-5)
    # --merge wrote the same model as an ordinary checkpoint, with the base's keys.
    checkpoint = load_checkpoint(os.path.join(finetuned, "ckpt.pt"))
    assert set(checkpoint["model"]) == set(load_checkpoint(os.path.join(bases[0], "ckpt.pt"))["model"])
    from_file = GPT(GPTConfig(**checkpoint["model_config"]))
    from_file.load_state_dict(checkpoint["model"])
    torch.testing.assert_close(from_file.eval()(idx), reference, rtol=0, atol=1e-5)
    assert (from_file(idx) - tiny_model(0).eval()(idx)).abs().max() > 1e-2   # and it is not the base


def test_base_weights_unchanged_and_only_adapters_in_the_optimizer(records_file):
    model = tiny_model(0)
    before = {name: p.clone() for name, p in model.named_parameters()}
    lora.apply_lora(model, ["attn.c_attn", "mlp.c_fc"], rank=4, alpha=8, dropout=0.1)
    optimizer = configure_optimizers(model, weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.95),
                                     device_type="cpu")
    lora_params = {id(p) for name, p in model.named_parameters() if "lora_" in name}
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == lora_params and len(lora_params) == 2 * 2 * TINY.n_layer
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    examples = encoded(RECORDS[:8])
    for _ in range(3):
        accumulate(model, [ft.collate(examples, True)], scaler)
        clip_and_step(model, optimizer, scaler, 1.0)
    after = {name.replace(".base.", "."): p for name, p in model.named_parameters() if "lora_" not in name}
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert all(p.abs().sum() > 0 for name, p in model.named_parameters() if name.endswith("lora_B"))


# --- data: template, batches, masking, the loss ---

def test_collate_masks_the_prompt_and_the_padding():
    examples = [([10, 11, 12, 13, 14, 15], 3), ([20, 21, 22], 2)]
    x, y = ft.collate(examples, mask_input=True)
    assert torch.equal(x[0], torch.tensor([10, 11, 12, 13, 14]))
    assert torch.equal(y[0], torch.tensor([-1, -1, 13, 14, 15]))         # predicting 11, 12 is the prompt's job
    assert torch.equal(x[1, :2], torch.tensor([20, 21]))
    assert torch.equal(y[1], torch.tensor([-1, 22, -1, -1, -1]))         # then padding
    _, y_all = ft.collate(examples, mask_input=False)
    assert torch.equal(y_all[0], torch.tensor([11, 12, 13, 14, 15]))


def test_encode_record_is_template_then_response_then_endoftext():
    tokenizer = get_tokenizer()
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5 <|endoftext|> ok"}
    ids, n_prompt = ft.encode_record(tokenizer, record)
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers."
              "\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert tokenizer.decode(ids[:n_prompt]) == prompt
    assert tokenizer.decode(ids[n_prompt:-1]) == "5 <|endoftext|> ok" and ids.count(50256) == 1
    assert ids[-1] == 50256
    assert "### Input" not in lora.format_prompt("Say hi.")


@pytest.mark.parametrize("loss_chunk", [0, 7])
def test_masked_loss_is_the_mean_over_response_tokens(loss_chunk):
    model = tiny_model(0)
    examples = encoded(RECORDS[:2] + RECORDS[-1:])
    x, y = ft.collate(examples, mask_input=True)
    loss = model(x, y, loss_chunk)
    # By hand, from the token ids alone: -log p(next token) at every position whose next token is the response.
    with torch.no_grad():
        log_probs = F.log_softmax(model(x), dim=-1)                         # (B, T, V)
    terms = [-log_probs[row, t, ids[t + 1]] for row, (ids, n_prompt) in enumerate(examples)
             for t in range(n_prompt - 1, len(ids) - 1)]
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=0, atol=1e-5)
    # The prompt's positions get no gradient through the loss: d loss / d (final hidden state) is zero there.
    hidden = {}

    def keep_output(module, inputs, output):
        output.retain_grad()
        hidden["h"] = output

    handle = model.transformer.ln_f.register_forward_hook(keep_output)
    model(x, y, loss_chunk).backward()
    handle.remove()
    grad = hidden["h"].grad.abs().sum(-1)                                   # (B, T)
    assert torch.all(grad[y == -1] == 0) and torch.all(grad[y != -1] > 0)


def test_accumulated_micro_batches_of_unequal_lengths_match_one_batch():
    """Three micro-batches with different numbers of response tokens: each mean weighted by its share of the
    tokens gives the big batch's gradient; dividing each by the number of micro-batches (as pre-training
    does) would not. In float64, so that 1e-6 is far above the rounding of the two orders of summation (in
    float32 the loss, about 11.5, has a rounding step of 1e-6)."""
    model = lora.apply_lora(tiny_model(0).double(), list(lora.LORA_TARGETS), rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.1)
    records = [dict(RECORDS[0], output="Paris"), dict(RECORDS[1], output="Rome, then Florence and Milan"),
               dict(RECORDS[2], output="Madrid, Spain")]
    examples = encoded(records)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    adapters = [p for p in model.parameters() if p.requires_grad]

    def gradients(micro_batches):
        model.zero_grad()
        loss = accumulate(model, micro_batches, scaler)
        return loss, [p.grad.clone() for p in adapters]

    one_loss, one_batch = gradients([ft.collate(examples, True)])
    micro = [ft.collate([e], True) for e in examples]
    assert len({int((y != -1).sum()) for _, y in micro}) == 3
    accumulated_loss, accumulated = gradients(micro)
    torch.testing.assert_close(accumulated_loss, one_loss, rtol=0, atol=1e-6)
    for a, b in zip(accumulated, one_batch):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    model.zero_grad()
    for x, y in micro:
        (model(x, y) / len(micro)).backward()
    assert max((p.grad - g).abs().max().item() for p, g in zip(adapters, one_batch)) > 1e-4


def test_fit_to_context_truncates_or_skips():
    examples = [(list(range(10)), 3), (list(range(20)), 5), (list(range(30)), 25)]
    kept, truncated, skipped = ft.fit_to_context(examples, block_size=15, overlong="truncate")
    assert [len(ids) for ids, _ in kept] == [10, 16]
    assert (truncated, skipped) == (1, 1)                                  # a 25-token prompt leaves no room
    kept, truncated, skipped = ft.fit_to_context(examples, block_size=15, overlong="skip")
    assert [len(ids) for ids, _ in kept] == [10] and (truncated, skipped) == (0, 2)


def test_step_examples_visit_every_example_once_per_epoch():
    n, per_step = 10, 4
    seen = [i for step in range(5) for i in ft.step_examples(step, per_step, n, seed=3)]   # 20 = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]                                            # a fresh order each epoch
    assert ft.step_examples(3, per_step, n, seed=3) == seen[12:16]           # a pure function of the step
    train, val = ft.split_records(50, 0.1, seed=0)
    assert len(val) == 5 and sorted(train + val) == list(range(50))


# --- the run: learning, resume, the adapter file ---

def test_finetuning_lowers_the_loss_and_beats_the_base(finetuned, bases):
    evals = [r for r in read_log(finetuned) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 1.5
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    adapted = lora.load_base_with_adapter(os.path.join(finetuned, "adapter.pt"))[0].eval()
    base = tiny_model(0).eval()
    train_ids, _ = ft.split_records(len(RECORDS), 0.2, seed=1337)      # the run's split (default --seed)
    for record in (RECORDS[train_ids[0]], RECORDS[train_ids[-1]]):
        assert response_loss(adapted, record) < response_loss(base, record) - 1.0


def test_adapter_file_is_small_and_names_its_base(short_run, bases):
    adapter_path, base_path = os.path.join(short_run, "adapter.pt"), os.path.join(bases[0], "ckpt.pt")
    adapter = lora.load_adapter(adapter_path)
    assert adapter["base"]["sha256"] == hashlib.sha256(open(base_path, "rb").read()).hexdigest()
    assert adapter["base"]["path"] == base_path
    assert adapter["lora"] == {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": list(lora.LORA_TARGETS)}
    # Per block: c_attn R*(C + 3C), c_proj R*(C + C), c_fc R*(C + 4C), mlp.c_proj R*(4C + C).
    R, C, L = 8, TINY.n_embd, TINY.n_layer
    assert sum(t.numel() for t in adapter["tensors"].values()) == L * R * (4 * C + 2 * C + 5 * C + 5 * C)
    assert os.path.getsize(adapter_path) < os.path.getsize(base_path) / 20


def test_resume_continues_exactly(bases, records_file, tmp_path, capsys):
    """8 steps straight and 4 + resume + 4 give identical losses and identical adapters (CPU, fp32), with
    LoRA dropout on and two micro-batches per step: the state holds AdamW's moments, the step and the RNGs.
    The one value the resume changes is printed, once (issue 13: nothing said so)."""
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    flags = ["--lr_decay_iters=8", "--eval_interval=4", "--lora_dropout=0.1"]
    ft.main(finetune_flags(bases[0], records_file, straight, "--max_iters=8", *flags))
    ft.main(finetune_flags(bases[0], records_file, interrupted, "--max_iters=4", *flags))
    capsys.readouterr()
    ft.main([f"--out_dir={interrupted}", "--init_from=resume", "--max_iters=8"])
    reported = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resume:")]
    assert reported == ["resume: max_iters 4 -> 8 (command line)"]
    losses = [{r["step"]: r["loss"] for r in read_log(d) if "loss" in r} for d in (straight, interrupted)]
    assert losses[0] == losses[1] and len(losses[0]) == 8
    a, b = (lora.load_adapter(os.path.join(d, "adapter.pt")) for d in (straight, interrupted))
    assert a["step"] == b["step"] == 8
    for name, tensor in a["tensors"].items():
        assert torch.equal(tensor, b["tensors"][name]), name


@pytest.mark.slow
def test_float16_finetuning_scales_the_loss_and_resumes_exactly(bases, records_file, tmp_path):
    """--dtype=float16 end to end on the CPU, with the gradient scaler (torch.amp.GradScaler): the loss falls,
    the logged gradient norm is the true one (unscaled before clipping: an fp32 run's at step 1, not 2^16 times
    it), state.pt holds the scaler's state (PyTorch's initial scale 2^16, kept, no step having overflowed;
    8 good steps counted), and 4 steps + resume + 4 give the straight run's losses, adapter and scaler state."""
    def run(out_dir: str, *extra: str) -> None:
        ft.main(finetune_flags(bases[0], records_file, str(tmp_path / out_dir), "--lr_decay_iters=8",
                               "--eval_interval=4", "--lora_dropout=0.1", *extra))
    run("straight", "--max_iters=8", "--dtype=float16")
    run("interrupted", "--max_iters=4", "--dtype=float16")
    ft.main([f"--out_dir={tmp_path / 'interrupted'}", "--init_from=resume", "--max_iters=8"])
    run("fp32", "--max_iters=1", "--dtype=float32")
    logs = {name: read_log(str(tmp_path / name)) for name in ("straight", "interrupted", "fp32")}
    evals = [r["train_loss"] for r in logs["straight"] if "train_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.5
    first_norm = {name: next(r["grad_norm"] for r in log if "grad_norm" in r) for name, log in logs.items()}
    assert first_norm["straight"] == pytest.approx(first_norm["fp32"], rel=1e-3)
    losses = [{r["step"]: r["loss"] for r in logs[name] if "loss" in r} for name in ("straight", "interrupted")]
    assert losses[0] == losses[1] and len(losses[0]) == 8
    states = [load_checkpoint(str(tmp_path / name / "state.pt")) for name in ("straight", "interrupted")]
    assert states[0]["finetune_config"]["dtype"] == states[1]["finetune_config"]["dtype"] == "float16"
    assert states[0]["scaler"] == states[1]["scaler"] == {"scale": 2.0 ** 16, "growth_factor": 2.0,
                                                          "backoff_factor": 0.5, "growth_interval": 2000,
                                                          "_growth_tracker": 8}
    for name, tensor in states[0]["tensors"].items():
        assert torch.equal(tensor, states[1]["tensors"][name]), name

@pytest.mark.slow
def test_compiled_finetuning_matches_eager(bases, tmp_path, capsys):
    """finetune_lora.py had no --compile (train.py has one). Compiled on the CPU, two steps give the losses and
    adapters of the eager run. The records all have one length, so the test compiles one graph (about a
    minute on a 2-core CPU); with records of many lengths the plain loss compiles once more, for any length."""
    words = ["cat", "dog", "sun", "red", "map", "pen", "cup", "box", "hat", "car", "bus", "egg"]
    records = [{"instruction": "Repeat the word.", "input": w, "output": w} for w in words]
    assert len({len(ft.encode_record(get_tokenizer(), r)[0]) for r in records}) == 1
    data = tmp_path / "words.json"
    data.write_text(json.dumps(records))
    runs = {}
    for compile in (False, True):
        out_dir = str(tmp_path / f"compile_{compile}")
        ft.main(finetune_flags(bases[0], str(data), out_dir, "--max_iters=2", "--eval_interval=2",
                               "--lora_dropout=0", "--val_fraction=0.25", "--dtype=float32",
                               f"--compile={compile}"))
        assert (", compiled" in capsys.readouterr().out) == compile
        runs[compile] = out_dir
    logs = [read_log(runs[c]) for c in (False, True)]
    assert [r.keys() for r in logs[0]] == [r.keys() for r in logs[1]] and len(logs[0]) == 2 + 2
    for eager, compiled in zip(*logs):
        for key in ("loss", "train_loss", "val_loss"):
            if key in eager:
                assert compiled[key] == pytest.approx(eager[key], abs=1e-5), (eager, compiled)
    adapters = [lora.load_adapter(os.path.join(runs[c], "adapter.pt"))["tensors"] for c in (False, True)]
    for name in adapters[0]:
        torch.testing.assert_close(adapters[1][name], adapters[0][name], rtol=0, atol=1e-5, msg=name)


# --- generate.py with an adapter ---

def test_generate_with_the_adapter_matches_the_merged_checkpoint(finetuned, capsys):
    flags = ["--instruction=What is the capital of Peru?", "--temperature=0", "--max_new_tokens=8",
             "--stop_at_eot=False"]
    generate.main([f"--lora={os.path.join(finetuned, 'adapter.pt')}", *flags])
    with_adapter = capsys.readouterr().out
    generate.main([f"--out_dir={finetuned}", *flags])
    merged = capsys.readouterr().out
    assert with_adapter == merged
    assert with_adapter.startswith(lora.format_prompt("What is the capital of Peru?"))


# --- errors: bad data, the wrong base, bad flags ---

@pytest.mark.parametrize("name,content,fragments", [
    ("bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
     ["bad.json line 2", "not valid JSON"]),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": }\n',
     ["bad.jsonl line 3", "not valid JSON"]),
    ("missing.json", '[{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d"}]',
     ["missing.json record 2", "missing field 'output'"]),
    ("types.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": 7, "output": "d"}\n',
     ["types.jsonl line 2", "field 'input' must be a string, not int"]),
    ("no_instruction.jsonl", '{"output": "b"}\n', ["no_instruction.jsonl line 1", "missing field 'instruction'"]),
    ("object.json", '{"instruction": "a", "output": "b"}', ["object.json", "must hold a list of records"]),
    ("strings.json", '["a", "b"]', ["strings.json record 1", "must be a JSON object"]),
    ("output.json", '[{"instruction": "a", "output": ["b"]}, {"instruction": "a", "output": "b"}]',
     ["output.json record 1", "field 'output' must be a string, not list"]),
])
def test_bad_data_files_stop_with_one_line(tmp_path, name, content, fragments):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SystemExit) as stop:
        ft.read_records(str(path))
    message = str(stop.value)
    assert message.startswith("error: ") and "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_bad_data_file_from_the_command_line(bases, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    result = run_script("finetune_lora.py", f"--init_from={bases[0]}", f"--data={bad}", f"--out_dir={tmp_path}/o")
    assert_one_line_error(result, "bad.jsonl line 2", "missing field 'output'")
    assert not os.path.exists(tmp_path / "o")


def test_adapter_on_the_wrong_base_is_refused(short_run, bases):
    adapter_path = os.path.join(short_run, "adapter.pt")
    with pytest.raises(SystemExit) as stop:
        lora.load_base_with_adapter(adapter_path, os.path.join(bases[1], "ckpt.pt"))
    assert str(stop.value).startswith("error: adapter") and "belongs to the base checkpoint" in str(stop.value)
    result = run_script("generate.py", f"--lora={adapter_path}", f"--out_dir={bases[1]}", "--prompt=Hi")
    assert_one_line_error(result, "belongs to the base checkpoint", os.path.join(bases[0], "ckpt.pt"))


@pytest.mark.parametrize("flags,fragment", [
    (["--lora_targets=attn.c_attn,lm_head"], "--lora_targets=attn.c_attn,lm_head: name one or more of"),
    (["--lora_targets=attn.c_attn,mlp_0.c_fc"], "the base model has no mlp_0.c_fc layer (mlp_0 is in"),
    (["--lora_rank=0"], "--lora_rank=0 must be >= 1"),
    (["--overlong=cut"], "--overlong: invalid choice"),
    (["--val_fraction=1"], "--val_fraction=1.0 must be in (0, 1)"),
])
def test_bad_flags_name_the_flag(flags, fragment, records_file, bases, tmp_path):
    with pytest.raises(SystemExit) as stop:
        ft.main(finetune_flags(bases[0], records_file, str(tmp_path / "o"), *flags))
    assert fragment in str(stop.value), str(stop.value)


def test_existing_run_is_not_overwritten_and_resume_keeps_the_lora_shape(short_run, bases, records_file):
    before = open(os.path.join(short_run, "adapter.pt"), "rb").read()
    with pytest.raises(SystemExit) as stop:
        ft.main(finetune_flags(bases[0], records_file, short_run, "--max_iters=2"))
    assert "exists" in str(stop.value) and "--init_from=resume" in str(stop.value)
    with pytest.raises(SystemExit) as stop:
        ft.main([f"--out_dir={short_run}", "--init_from=resume", "--lora_rank=4", "--max_iters=50"])
    assert "lora_rank (run 8, flag 4)" in str(stop.value)
    assert open(os.path.join(short_run, "adapter.pt"), "rb").read() == before


def test_shakespeare_records_ask_who_speaks_a_line():
    records = ft.shakespeare_speaker_records()
    assert len(records) > 1000
    hamlet = [r for r in records if r["instruction"] == "Who speaks this line in Hamlet?"]
    assert {"HAMLET", "HORATIO"} <= {r["output"] for r in hamlet}
    assert any(r["input"].startswith("To be, or not to be") and r["output"] == "HAMLET" for r in hamlet)
    assert all(len(r["input"].split()) >= 4 for r in records)


@pytest.fixture(scope="module")
def one_and_two_process_runs(bases, records_file, tmp_path_factory) -> dict[int, str]:
    """out_dirs of 4 fine-tuning steps on 1 process x 2 micro-batches and on 2 processes x 1, by process count."""
    runs = {}
    for nproc, accum in ((1, 2), (2, 1)):
        out_dir = str(tmp_path_factory.mktemp(f"nproc{nproc}"))
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                    "--standalone"] if nproc > 1 else [sys.executable]
        flags = finetune_flags(bases[0], records_file, out_dir, "--max_iters=4", "--eval_interval=2",
                               "--lora_dropout=0", f"--gradient_accumulation_steps={accum}", "--peak_flops=1e9")
        result = subprocess.run([*launcher, os.path.join(ROOT, "finetune_lora.py"), *flags], capture_output=True,
                                text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        runs[nproc] = out_dir
    return runs


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one_process(one_and_two_process_runs):
    """2 processes x 1 micro-batch and 1 process x 2 micro-batches train on the same records each step. The
    step's response tokens are counted across the processes, so the averaged gradients, and thus the losses
    and adapters, are the same although the micro-batches hold different numbers of response tokens."""
    runs = one_and_two_process_runs
    logs = [read_log(runs[n]) for n in (1, 2)]
    assert [r.keys() for r in logs[0]] == [r.keys() for r in logs[1]] and len(logs[0]) == 4 + 3
    for one, two in zip(*logs):
        for key in ("loss", "train_loss", "val_loss"):
            if key in one:
                assert one[key] == pytest.approx(two[key], abs=1e-5), (one, two)
    adapters = [lora.load_adapter(os.path.join(runs[n], "adapter.pt"))["tensors"] for n in (1, 2)]
    for name in adapters[0]:
        torch.testing.assert_close(adapters[0][name], adapters[1][name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_logged_mfu_divides_by_the_peak_of_every_process(one_and_two_process_runs):
    """MFU was logged twice too high on 2 processes: the FLOPs of every process's records were divided by one
    device's peak. Both runs do the same FLOPs per step (the same records), so MFU x step time x processes, a
    step's FLOPs over one device's peak, must agree, step by step."""
    flops_over_peak = {n: [r["mfu"] * r["ms_per_step"] / 1000 * n for r in read_log(run) if "mfu" in r]
                       for n, run in one_and_two_process_runs.items()}
    assert len(flops_over_peak[1]) == 4 and all(x > 0 for x in flops_over_peak[1])
    assert flops_over_peak[2] == pytest.approx(flops_over_peak[1], rel=1e-9)


@pytest.mark.slow
def test_logged_mfu_is_the_hand_counted_flops_over_the_peak(one_and_two_process_runs):
    """Each logged MFU is a step's FLOPs, counted here, over its time and nproc devices' peak (--peak_flops=1e9).
    finetune_flops' cost model: per token, 4 FLOPs per matmul weight (forward, and the input gradient of
    backward: frozen weights need no weight gradient), the adapters' A and B counted among the weights, plus
    attention's 12LCT with T the step's mean record length (8 records per step)."""
    L, C, V, R, peak = TINY.n_layer, TINY.n_embd, TINY.vocab_size, 8, 1e9
    blocks = L * (12 * C * C + 13 * C)                         # c_attn, c_proj, c_fc, mlp.c_proj, 2 LayerNorms
    adapters = L * R * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))   # R (C_in + C_out) per target
    n_matmul = blocks + adapters + V * C + 2 * C              # tied wte/head, ln_f; no wpe (a lookup)
    lengths = [len(ids) - 1 for ids, _ in encoded(RECORDS)]   # predictions per record
    for nproc, run in one_and_two_process_runs.items():
        steps = [r for r in read_log(run) if "mfu" in r]
        assert len(steps) == 4
        for r in steps:
            tokens = round(r["tokens_per_s"] * r["ms_per_step"] / 1000)   # the step's real tokens
            assert 8 * min(lengths) <= tokens <= 8 * max(lengths)
            flops = (4 * n_matmul + 12 * L * C * round(tokens / 8)) * tokens
            assert r["mfu"] == pytest.approx(flops / (r["ms_per_step"] / 1000) / (nproc * peak), rel=1e-9)
