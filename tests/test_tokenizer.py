"""Tokenizers (issue 17): r50k_base and a byte-level BPE trained by prepare.py --tokenizer=bpe:VOCAB encode and
decode any text back to itself; the same corpus gives the same tokenizer.json; checkpoints carry their
tokenizer, so generate.py samples from a checkpoint alone; hf_gpt2.py exports a tokenizer.json that
transformers runs with our ids; a resume on another tokenizer's tokens is refused in one line."""
import dataclasses
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

import generate
import gpt2_weights
import hf_gpt2
import prepare
import train
from checkpoints import load_checkpoint, model_from_checkpoint, save_checkpoint
from tokenization import BPETokenizer, get_tokenizer, shakespeare_paths, tokenizer_record
from conftest import run_script
from model import GPT, GPTConfig
from model import generate as model_generate

TEXT = "Café, naïve Zoë — 😀 日本語のテキスト; 12345 + 6.78 = 12351.78<|endoftext|>Next document:\n\n  indented\n"
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--warmup_iters=0", "--compile=False", "--dtype=float32"]


def corpus(path, plays: slice, extra: str = "") -> str:
    """A .txt corpus of some Shakespeare plays (plus extra text), written to path."""
    text = "".join(open(p, encoding="utf-8").read() for p in shakespeare_paths()[plays]) + extra
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory) -> str:
    """data_dir with dataset 'bpe': two plays (and TEXT) tokenized by a 1,000-id BPE trained on them."""
    root = tmp_path_factory.mktemp("tok")
    source = corpus(root / "plays.txt", slice(0, 2), TEXT * 3)
    prepare.main([f"--input={source}", "--name=bpe", f"--data_dir={root / 'data'}", "--tokenizer=bpe:1000"])
    return str(root / "data")


def bpe_of(data_dir: str, name: str = "bpe") -> BPETokenizer:
    with open(os.path.join(data_dir, name, "tokenizer.json"), encoding="utf-8") as f:
        return BPETokenizer("bpe:1000", f.read())


@pytest.mark.parametrize("kind", ["r50k_base", "bpe"])
def test_round_trip_of_accents_emoji_cjk_digits_and_endoftext(kind, bpe_data):
    tokenizer = get_tokenizer() if kind == "r50k_base" else bpe_of(bpe_data)
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    assert ids.count(tokenizer.eot_token) == 1                       # <|endoftext|> is one id
    ordinary = tokenizer.encode_ordinary(TEXT)                        # ... or plain text in user data
    assert tokenizer.eot_token not in ordinary and tokenizer.decode(ordinary) == TEXT
    assert b"".join(tokenizer.decode_bytes([i]) for i in ids) == TEXT.encode()   # streamed token by token
    assert max(ids) < tokenizer.vocab_size <= 2**16


@pytest.mark.parametrize("kind", ["r50k_base", "bpe"])
def test_long_text_encoded_in_pieces_gives_the_ids_of_the_whole(kind, bpe_data):
    """prepare.py encodes a long document in pieces (split_text); cut only at newlines between non-space
    characters, the pieces' ids are the whole text's, including around runs of spaces and blank lines."""
    tokenizer = get_tokenizer() if kind == "r50k_base" else bpe_of(bpe_data)
    text = ("Line one.\nLine two  \n  three\n\n\nfour\tfive\n" + TEXT) * 20
    pieces = list(prepare.split_text(text, size=50))
    assert "".join(pieces) == text and len(pieces) >= 20
    assert [i for piece in pieces for i in tokenizer.encode_ordinary(piece)] == tokenizer.encode_ordinary(text)


def test_the_same_corpus_gives_a_byte_identical_tokenizer(bpe_data, tmp_path):
    """Trained again in this process and in another one with one thread and another hash seed."""
    source = corpus(tmp_path / "plays.txt", slice(0, 2), TEXT * 3)
    first = open(os.path.join(bpe_data, "bpe", "tokenizer.json"), "rb").read()
    prepare.main([f"--input={source}", "--name=bpe", f"--data_dir={tmp_path / 'again'}", "--tokenizer=bpe:1000"])
    assert open(tmp_path / "again" / "bpe" / "tokenizer.json", "rb").read() == first
    result = run_script("prepare.py", f"--input={source}", "--name=bpe", f"--data_dir={tmp_path / 'other'}",
                        "--tokenizer=bpe:1000", env={"RAYON_NUM_THREADS": "1", "PYTHONHASHSEED": "7"})
    assert result.returncode == 0, result.stderr
    assert open(tmp_path / "other" / "bpe" / "tokenizer.json", "rb").read() == first
    meta = json.load(open(os.path.join(bpe_data, "bpe", "meta.json")))
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"], meta["tokenizer_file"]) == \
        ("bpe:1000", 1000, 0, "tokenizer.json")
    assert meta["tokenizer_sha256"] == hashlib.sha256(first).hexdigest()
    ids = np.concatenate([np.fromfile(os.path.join(bpe_data, "bpe", f"{split}.bin"), np.uint16)
                          for split in ("train", "val")])
    assert bpe_of(bpe_data).decode(ids.tolist()) == open(source, encoding="utf-8").read()   # one document


@pytest.mark.parametrize("spec", ["bpe:65537", "bpe:256", "bpe:lots"])
def test_a_vocabulary_that_does_not_fit_uint16_is_refused_in_one_line(spec, tmp_path):
    with pytest.raises(SystemExit) as stop:
        prepare.main([f"--input={corpus(tmp_path / 'a.txt', slice(0, 1))}", f"--data_dir={tmp_path}",
                      f"--tokenizer={spec}"])
    message = str(stop.value)
    assert message.startswith(f"error: --tokenizer={spec}: VOCAB must be") and "65,536" in message
    assert "\n" not in message and not os.path.exists(tmp_path / "a")


def damaged_tokenizer(spec: dict, damage: str) -> str:
    """The text of a tokenizer.json: spec (a good one, parsed) with the named defect."""
    spec = json.loads(json.dumps(spec))
    model = spec["model"]
    if damage == "not JSON":
        return "{'model': 1"
    if damage == "a list":
        return "[1, 2]"
    if damage == "no model":
        del spec["model"]
    elif damage == "no vocab":
        del model["vocab"]
    elif damage == "vocab a list":
        model["vocab"] = list(model["vocab"])
    elif damage == "added_tokens null":
        spec["added_tokens"] = None
    elif damage == "empty vocabulary":                        # the file
        model["vocab"], model["merges"], spec["added_tokens"] = {}, [], []
    elif damage == "empty vocabulary but <|endoftext|>":
        model["vocab"], model["merges"] = {}, []
    elif damage == "ids as strings":
        model["vocab"] = {token: str(i) for token, i in model["vocab"].items()}
    elif damage == "a merge of unknown tokens":
        model["merges"].append(["qqqqq", "zzzzz"])
    elif damage == "a byte without a token":                  # one no other token holds, so no merge needs it
        from tokenization import bytes_to_unicode
        lone = next(c for c in bytes_to_unicode().values() if sum(c in token for token in model["vocab"]) == 1)
        del model["vocab"][lone]
    elif damage == "no <|endoftext|>":
        spec["added_tokens"] = []
    elif damage == "an id beyond uint16":
        model["vocab"]["qqqqq"] = 70000
    elif damage == "WordPiece":
        model["type"] = "WordPiece"
    return json.dumps(spec)


@pytest.mark.parametrize("damage,fragment", [
    ("not JSON", "is not JSON (Expecting property name"),
    ("a list", "is not a Hugging Face tokenizer.json"),
    ("no model", "is not a Hugging Face tokenizer.json"),
    ("no vocab", "is not a Hugging Face tokenizer.json"),
    ("vocab a list", "is not a Hugging Face tokenizer.json"),
    ("added_tokens null", "is not a Hugging Face tokenizer.json"),
    ("empty vocabulary", "has an empty vocabulary (model.vocab is {})"),
    ("empty vocabulary but <|endoftext|>", "has an empty vocabulary (model.vocab is {})"),
    ("ids as strings", "does not load as a tokenizer (invalid type: string"),
    ("a merge of unknown tokens", "does not load as a tokenizer (Token `qqqqq` out of vocabulary"),
    ("a byte without a token", "has no token for 1 of the 256 bytes"),
    ("no <|endoftext|>", "has no <|endoftext|> special token"),
    ("an id beyond uint16", "has token ids up to 70,000"),
    ("WordPiece", "is not a byte-level BPE"),
])
def test_a_malformed_tokenizer_file_is_refused_in_one_line(damage, fragment, bpe_data, tmp_path):
    """Issue 23: prepare.py --tokenizer=PATH with an empty vocabulary ended in a traceback (max() of no ids), as
    did a tokenizer.json without model.vocab, with a vocab that is not an object, ids that are not numbers or
    merges the library refuses; one with an empty vocabulary but <|endoftext|> encoded every text to nothing
    and was refused as "0 tokens are too few". Each now stops with one line naming the file, and writes
    nothing."""
    good = json.load(open(os.path.join(bpe_data, "bpe", "tokenizer.json"), encoding="utf-8"))
    path = tmp_path / "t.json"
    path.write_text(damaged_tokenizer(good, damage), encoding="utf-8")
    with pytest.raises(SystemExit) as stop:
        prepare.main([f"--input={corpus(tmp_path / 'a.txt', slice(0, 1))}", f"--data_dir={tmp_path}",
                      f"--tokenizer={path}"])
    message = str(stop.value)
    assert message.startswith(f"error: {path} ") and fragment in message and "\n" not in message, message
    assert not os.path.exists(tmp_path / "a")


def test_train_refuses_a_dataset_whose_tokenizer_file_is_malformed(bpe_data, tmp_path):
    """A dataset's tokenizer.json with an empty vocabulary (and meta.json's sha256 of it) goes into every
    checkpoint, where the samplers could not load it: train.py stops at once with one line."""
    folder = shutil.copytree(os.path.join(bpe_data, "bpe"), tmp_path / "bpe")
    good = json.load(open(folder / "tokenizer.json", encoding="utf-8"))
    (folder / "tokenizer.json").write_text(damaged_tokenizer(good, "empty vocabulary"), encoding="utf-8")
    meta = json.load(open(folder / "meta.json"))
    meta["tokenizer_sha256"] = hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as stop:
        train.main([f"--data_dir={tmp_path}", "--dataset=bpe", f"--out_dir={tmp_path / 'run'}", *TINY,
                    "--max_iters=1"])
    message = str(stop.value)
    assert message.startswith(f"error: {folder / 'tokenizer.json'} has an empty vocabulary") and "\n" not in message
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt")


@pytest.fixture(scope="module")
def bpe_run(bpe_data, tmp_path_factory) -> str:
    """A tiny GPT trained 4 steps on the BPE dataset; --vocab_size not given, so it comes from meta.json."""
    out_dir = str(tmp_path_factory.mktemp("run"))
    train.main([f"--data_dir={bpe_data}", "--dataset=bpe", f"--out_dir={out_dir}", *TINY, "--max_iters=4",
                "--eval_interval=4"])
    return out_dir


def test_train_takes_the_vocabulary_and_the_tokenizer_from_the_dataset(bpe_data, bpe_run):
    checkpoint = load_checkpoint(os.path.join(bpe_run, "ckpt.pt"))
    tokenizer_json = open(os.path.join(bpe_data, "bpe", "tokenizer.json"), encoding="utf-8").read()
    assert checkpoint["model_config"]["vocab_size"] == 1000
    assert checkpoint["tokenizer"] == {"name": "bpe:1000", "file": tokenizer_json,
                                       "sha256": checkpoint["data"]["tokenizer_sha256"]}


def test_a_checkpoint_alone_samples_with_its_tokenizer(bpe_data, bpe_run, tmp_path, capsys):
    """generate.py with the data folder gone: the greedy sample equals the model's greedy tokens decoded with
    the dataset's tokenizer (read before the folder was deleted)."""
    tokenizer = bpe_of(bpe_data)
    prompt = "ROMEO: Café 日本"
    model = model_from_checkpoint(load_checkpoint(os.path.join(bpe_run, "ckpt.pt")), dropout=0.0).eval()
    ids = torch.tensor([tokenizer.encode(prompt)])
    tokens = [t.item() for t in model_generate(model, ids, 12, 0.0, None, 1.0, None, torch.Generator())]
    expected = tokens[:tokens.index(tokenizer.eot_token)] if tokenizer.eot_token in tokens else tokens
    capsys.readouterr()
    os.rename(bpe_data, tmp_path / "away")            # no data folder, no tokenizer.json but the checkpoint's
    try:
        generate.main([f"--out_dir={bpe_run}", f"--prompt={prompt}", "--max_new_tokens=12", "--temperature=0",
                       "--device=cpu"])
    finally:
        os.rename(tmp_path / "away", bpe_data)
    assert capsys.readouterr().out == prompt + tokenizer.decode(expected) + "\n"


def test_resume_on_data_of_another_tokenizer_is_refused_in_one_line(bpe_data, bpe_run, tmp_path):
    """Another BPE of the same size (so the same name and vocabulary) trained on other plays: its sha256
    differs, and the resume stops even with --allow_data_change."""
    source = corpus(tmp_path / "others.txt", slice(2, 4))
    prepare.main([f"--input={source}", "--name=other", f"--data_dir={bpe_data}", "--tokenizer=bpe:1000"])
    out_dir = shutil.copytree(bpe_run, tmp_path / "run")
    with pytest.raises(SystemExit) as stop:
        train.main([f"--data_dir={bpe_data}", "--dataset=other", f"--out_dir={out_dir}", *TINY, "--max_iters=6",
                    "--init_from=resume", "--allow_data_change"])
    message = str(stop.value)
    assert message.startswith("error: cannot resume") and "\n" not in message
    assert "trained on tokens of bpe:1000 (vocabulary 1000, tokenizer.json sha256" in message
    assert "its embeddings only fit the tokenizer it learned" in message


def test_resume_on_data_encoded_with_the_same_tokenizer_file_goes_on(bpe_data, bpe_run, tmp_path, capsys):
    """Issue 23: other plays encoded with the run's own tokenizer.json (prepare.py --tokenizer=PATH, which names
    it by its path, where the run's dataset says bpe:1000) were refused on resume as another tokenizer, though
    both sides printed the same sha256. A tokenizer is its file's content: the resume goes on to step 6 on the
    new tokens, and preparing the folder again from a copy of the file elsewhere finds it up to date."""
    tokenizer_path = os.path.join(bpe_data, "bpe", "tokenizer.json")
    source = corpus(tmp_path / "others.txt", slice(2, 3))
    prepare.main([f"--input={source}", "--name=same", f"--data_dir={tmp_path}", f"--tokenizer={tokenizer_path}"])
    out_dir = shutil.copytree(bpe_run, tmp_path / "run")
    train.main([f"--data_dir={tmp_path}", "--dataset=same", f"--out_dir={out_dir}", *TINY, "--max_iters=6",
                "--eval_interval=6", "--init_from=resume", "--allow_data_change"])
    checkpoint = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    new_meta = json.load(open(tmp_path / "same" / "meta.json"))
    assert checkpoint["step"] == 6 and checkpoint["data"]["sha256"] == new_meta["sha256"]
    assert checkpoint["tokenizer"]["sha256"] == hashlib.sha256(open(tokenizer_path, "rb").read()).hexdigest()
    copy = shutil.copy(tokenizer_path, tmp_path / "copy.json")
    capsys.readouterr()
    prepare.main([f"--input={source}", "--name=same", f"--data_dir={tmp_path}", f"--tokenizer={copy}"])
    assert "is up to date" in capsys.readouterr().out


def test_gpt2_weights_exported_with_our_bpe_train_on_that_bpe_data(bpe_data, tmp_path):
    """--init_from=DIR of a model hf_gpt2.py exported with our BPE was refused on data of that very BPE: the
    weights' tokenizer goes by the path of DIR/tokenizer.json, the data's by bpe:1000. Compared by content,
    it trains."""
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    tokenizer = bpe_of(bpe_data)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=tokenizer.vocab_size))
    save_checkpoint({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                     "tokenizer": tokenizer_record(tokenizer)}, str(tmp_path / "ckpt.pt"))
    hf_gpt2.main([f"--checkpoint={tmp_path / 'ckpt.pt'}", f"--out={tmp_path / 'hf'}"])
    out_dir = str(tmp_path / "run")
    train.main([f"--data_dir={bpe_data}", "--dataset=bpe", f"--out_dir={out_dir}", f"--init_from={tmp_path / 'hf'}",
                *TINY, "--max_iters=1", "--eval_interval=1"])
    assert load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["step"] == 1


def test_exported_bpe_gives_our_ids_in_transformers(bpe_data, tmp_path):
    """hf_gpt2.py writes the checkpoint's tokenizer.json; AutoTokenizer loads it and encodes, decodes and ends
    text with our ids; importing the directory back gives the same weights and tokenizer."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    tokenizer = bpe_of(bpe_data)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=tokenizer.vocab_size))
    save_checkpoint({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                     "tokenizer": tokenizer_record(tokenizer)}, str(tmp_path / "ckpt.pt"))
    out = str(tmp_path / "hf")
    hf_gpt2.main([f"--checkpoint={tmp_path / 'ckpt.pt'}", f"--out={out}"])
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs(TEXT)["input_ids"] == tokenizer.encode(TEXT)
    assert theirs.decode(tokenizer.encode(TEXT)) == TEXT
    assert theirs.eos_token_id == tokenizer.eot_token == json.load(open(os.path.join(out, "config.json")))[
        "eos_token_id"]
    assert gpt2_weights.hf_tokenizer(out).file == tokenizer.file
    imported = gpt2_weights.load_hf_gpt2(out).state_dict()
    assert all(torch.equal(imported[name], tensor) for name, tensor in model.state_dict().items())


@pytest.mark.slow
def test_gptx_1b_preset_trains_on_a_bpe_of_its_vocabulary(tmp_path):
    """--preset=gptx-1b (22,000 ids) on the Shakespeare sample with a 22,000-id BPE, shrunk by flags."""
    prepare.main(["--tokenizer=bpe:22000", "--name=sp", f"--data_dir={tmp_path}"])
    train.main(["--preset=gptx-1b", f"--data_dir={tmp_path}", "--dataset=sp", f"--out_dir={tmp_path / 'out'}",
                "--n_layer=2", "--n_embd=64", "--n_head=2", "--block_size=64", "--batch_size=4", "--max_iters=4",
                "--eval_interval=4", "--eval_iters=2", "--compile=False"])
    checkpoint = load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))
    assert checkpoint["model_config"]["vocab_size"] == 22000 == checkpoint["data"]["vocab_size"]
    assert checkpoint["model_config"]["rezero"] and checkpoint["tokenizer"]["name"] == "bpe:22000"
