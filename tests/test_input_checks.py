"""The input checks of docs/troubleshooting.md's table that no other test file covers: each stops with one
line that says what is wrong (or, for an over-long prompt, prints a note), and nothing runs on bad input. The
scripts run in-process (their main() stops with SystemExit(message), which Python prints as one line on
stderr); test_errors.py shows the same from the command line."""
import ast
import json
import os
import re

import numpy as np
import pytest
import torch

import finetune_lora
import generate
import prepare
import train
from conftest import TINY_MODEL_FLAGS, lr_at, write_dataset
from test_errors import trained_run  # noqa: F401 (a fixture)

SCRIPTS = {"train.py": train.main, "prepare.py": prepare.main, "generate.py": generate.main,
           "finetune_lora.py": finetune_lora.main}


def one_line_error(script: str, *flags: str) -> str:
    """The message a script stops with on these flags, checked to be one line starting with 'error: '."""
    with pytest.raises(SystemExit) as stop:
        SCRIPTS[script](list(flags))
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def assert_one_line_error(script: str, flags: list[str], *fragments: str) -> None:
    message = one_line_error(script, *flags)
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("script,flags,fragment", [
    ("train.py", ["--keep_last=-1"], "--keep_last=-1 must be >= 0"),
    ("train.py", ["--max_bad_steps=0"], "--max_bad_steps=0 must be >= 1"),
    ("train.py", ["--dropout=1"], "--dropout=1.0 must be in [0, 1)"),
    ("train.py", ["--learning_rate=1e-3", "--min_lr=1e-2"], "need 0 <= --min_lr <= --learning_rate"),
    ("train.py", ["--resume_from=out/ckpt-000100.pt"], "--resume_from=out/ckpt-000100.pt needs --init_from=resume"),
    ("train.py", ["--pp=2", "--fsdp"], "--pp=2 needs one process per stage"),
    ("train.py", ["--max_iters=ten"], "--max_iters: invalid int value: 'ten'"),
    ("train.py", ["--peak_flops=0"], "--peak_flops=0.0 must be > 0"),
    ("finetune_lora.py", ["--peak_flops=-1"], "--peak_flops=-1.0 must be > 0"),
    ("prepare.py", ["--num_proc=-1"], "--num_proc=-1 must be >= 0"),
    ("prepare.py", ["--val_fraction=x"], "--val_fraction: invalid float value: 'x'"),
    ("prepare.py", ["--datset=x"], "did you mean --dataset?"),
    ("generate.py", ["--top_p=0"], "--top_p=0.0 must be in (0, 1]"),
    ("generate.py", ["--temperature=-1"], "--temperature=-1.0 must be >= 0"),
    ("generate.py", ["--prompt=Hi", "--instruction=Say hi"], "give either --instruction"),
    ("generate.py", ["--input=Paris"], "--input is the context of an instruction"),
    ("finetune_lora.py", ["--lora_dropout=1"], "--lora_dropout=1.0 must be in [0, 1)"),
    ("finetune_lora.py", ["--lora_alpha=0"], "--lora_alpha=0.0 must be > 0"),
    ("finetune_lora.py", [], "--data is required"),
    ("finetune_lora.py", ["--batch_size=1.5"], "--batch_size: invalid int value: '1.5'"),
])
def test_bad_flags_stop_with_one_line(script, flags, fragment):
    assert_one_line_error(script, flags, fragment)



def test_min_lr_does_not_matter_without_the_decay():
    """README's "start from GPT-2" command (learning rate 3e-5, --decay_lr=False) was refused because the default
    --min_lr=2e-4 is above its learning rate, though without the decay min_lr is never used. The same rule in
    finetune_lora.py. With the decay on, a min_lr above the learning rate is still refused."""
    readme_flags = ["--init_from=gpt2", "--block_size=256", "--batch_size=4", "--learning_rate=3e-5",
                    "--warmup_iters=0", "--decay_lr=False", "--max_iters=200", "--out_dir=out-gpt2-shakespeare"]
    cfg, model_cfg = train.parse_args(train.TrainConfig, train.GPTConfig, argv=readme_flags)
    train.check_config(cfg, model_cfg)                                  # no SystemExit
    assert lr_at(199, cfg) == 3e-5                                      # and min_lr plays no part
    (lora_cfg,) = finetune_lora.parse_args(finetune_lora.FinetuneConfig, argv=[
        "--init_from=gpt2", "--data=shakespeare", "--learning_rate=3e-5", "--decay_lr=False"])
    finetune_lora.check_finetune_config(lora_cfg)
    decayed = {"train.py": readme_flags[:-3], "finetune_lora.py": ["--data=x", "--learning_rate=3e-5"]}
    for script, flags in decayed.items():
        assert_one_line_error(script, [*flags, "--decay_lr=True"], "need 0 <= --min_lr <= --learning_rate",
                              "--min_lr=0.0002")


def damage_dataset(folder: str, damage: str) -> None:
    """Turn a good dataset folder (from write_dataset) into one with the named defect."""
    meta_path = os.path.join(folder, "meta.json")
    meta = json.load(open(meta_path))
    if damage == "missing train.bin":
        os.remove(os.path.join(folder, "train.bin"))
    elif damage == "empty files":
        for split in ("train", "val"):
            open(os.path.join(folder, f"{split}.bin"), "wb").close()
        json.dump({**meta, "train_tokens": 0, "val_tokens": 0}, open(meta_path, "w"))
    elif damage == "uint32 tokens":
        json.dump({**meta, "dtype": "uint32"}, open(meta_path, "w"))
    elif damage == "larger vocabulary":
        json.dump({**meta, "vocab_size": 50257}, open(meta_path, "w"))
    elif damage == "meta.json not JSON":
        open(meta_path, "w").write("{'train_tokens': 1")
    elif damage == "size disagrees":
        with open(os.path.join(folder, "val.bin"), "ab") as f:
            f.write(b"\0\0")


@pytest.mark.parametrize("damage,fragments", [
    ("missing train.bin", ["train.bin is missing or its size disagrees with meta.json", "--force"]),
    ("empty files", ["--block_size=16 needs more than 16 tokens", "holds 0"]),
    ("uint32 tokens", ["says the tokens are uint32", "reads uint16"]),
    ("larger vocabulary", ["the dataset's vocabulary (50257) is larger than --vocab_size=64"]),
    ("meta.json not JSON", ["meta.json is damaged", "--force"]),
    ("size disagrees", ["val.bin is missing or its size disagrees with meta.json"]),
])
def test_bad_data_files_stop_with_one_line(damage, fragments, tmp_path):
    write_dataset(str(tmp_path / "d"), np.arange(1000) % 64)
    damage_dataset(str(tmp_path / "d"), damage)
    assert_one_line_error("train.py", [f"--data_dir={tmp_path}", "--dataset=d", f"--out_dir={tmp_path}/o",
                                       *TINY_MODEL_FLAGS, "--max_iters=2"], *fragments)
    assert not os.path.exists(tmp_path / "o" / "ckpt.pt")


@pytest.mark.parametrize("contents,fragment", [
    ({"model": {"transformer.wte.weight": torch.zeros(2, 2)}, "model_args": {"n_layer": 2}, "iter_num": 5},
     "is not a checkpoint written by this project's train.py"),                       # nanoGPT's layout
    ({"transformer.wte.weight": torch.zeros(2, 2), "transformer.h.0.ln_1.weight": torch.ones(2)},
     "is not a checkpoint written by this project's train.py"),                       # a bare state dict
    ([torch.zeros(3)], "is not a checkpoint written by this project's train.py"),     # not even a dict
    ({"format": "gpt-checkpoint", "version": 1, "model": {}}, "has checkpoint format version 1, this code reads"),
])
def test_checkpoints_from_elsewhere_are_refused_by_every_reader(contents, fragment, tiny_data_dir, tmp_path):
    torch.save(contents, tmp_path / "ckpt.pt")
    for script, flags in [("train.py", [f"--data_dir={tiny_data_dir}", "--dataset=tiny", "--init_from=resume"]),
                          ("generate.py", []),
                          ("finetune_lora.py", [f"--init_from={tmp_path}", "--data=shakespeare",
                                                f"--out_dir={tmp_path}/lora"])]:
        flags = flags if script == "finetune_lora.py" else [f"--out_dir={tmp_path}", *flags]
        assert_one_line_error(script, flags, str(tmp_path / "ckpt.pt"), fragment)


def test_a_prompt_longer_than_the_context_is_cut_with_a_note(trained_run, capsys):  # noqa: F811
    """The tiny model's context is 16 tokens: a 40-token prompt (A#A#..., 40 ids below 64) is cut to its last 16,
    with a note."""
    generate.main([f"--out_dir={trained_run}", "--prompt=" + "A#" * 20, "--max_new_tokens=3", "--stop_at_eot=False"])
    assert "note: the prompt has 40 tokens, more than the context of 16; the model sees its last 16" in \
        capsys.readouterr().err


@pytest.mark.parametrize("name,content,fragment", [
    ("absent.json", None, "file not found"),
    ("records.csv", "instruction,output\na,b\n", "use a .json file (a list of records) or a .jsonl file"),
    ("one.json", '[{"instruction": "a", "output": "b"}]', "holds 1 record(s); fine-tuning needs at least 2"),
    ("folder.json", "folder", "is not a file"),
])
def test_bad_finetune_sources_stop_with_one_line(name, content, fragment, tmp_path):
    import finetune_lora as ft
    path = tmp_path / name
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as stop:
        ft.read_records(str(path))
    message = str(stop.value)
    assert message.startswith("error: ") and "\n" not in message and fragment in message, message


def test_an_unreadable_prompt_file_stops_with_one_line(trained_run, tmp_path):  # noqa: F811
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    for path in (tmp_path / "absent.txt", tmp_path / "latin1.txt"):
        assert_one_line_error("generate.py", [f"--out_dir={trained_run}", f"--prompt_file={path}"],
                              f"cannot read --prompt_file={path}")


def test_a_tokenizer_json_that_is_not_a_byte_level_bpe_is_refused(tmp_path):
    """prepare.py --tokenizer=FILE reads ids through a byte-level BPE only (every byte string has ids, and ids
    decode to bytes): a WordPiece tokenizer.json, and a BPE that splits on whitespace instead of bytes, stop
    with one line before anything is written."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "to": 1, "be": 2}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    whitespace_bpe = Tokenizer(models.BPE({"t": 0, "o": 1, "to": 2}, [("t", "o")]))
    whitespace_bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    text = tmp_path / "doc.txt"
    text.write_text("To be, or not to be: that is the question.\n" * 50)
    for name, tokenizer in (("wp.json", wordpiece), ("ws-bpe.json", whitespace_bpe)):
        path = tmp_path / name
        path.write_text(tokenizer.to_str())
        flags = [f"--input={text}", f"--tokenizer={path}", f"--data_dir={tmp_path}/d"]
        assert_one_line_error("prepare.py", flags, f"error: {path} is not a byte-level BPE (GPT-2 style: model BPE, "
                              f"ByteLevel pre-tokenizer and decoder); train one with prepare.py --tokenizer=bpe:VOCAB")
        assert not os.path.exists(tmp_path / "d")


def strings_of_test(file_name: str, test_name: str) -> list[str]:
    """The string constants a test uses (f-strings' literal parts too, docstrings left out): in its decorators
    and body, and in the module-level constants (its parametrized cases) and functions (its helpers) it
    names."""
    from conftest import ROOT
    tree = ast.parse(open(os.path.join(ROOT, "tests", file_name), encoding="utf-8").read())
    def code(node: ast.AST) -> list[ast.AST]:   # a function without its docstring
        if not isinstance(node, ast.FunctionDef):
            return [node]
        return [*node.decorator_list, *(node.body[1:] if ast.get_docstring(node) is not None else node.body)]
    defined = {target.id: node.value for node in tree.body if isinstance(node, ast.Assign)
               for target in node.targets if isinstance(target, ast.Name)}
    defined |= {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert isinstance(defined.get(test_name), ast.FunctionDef), f"tests/{file_name} has no {test_name}"
    parts = code(defined[test_name])
    parts += [part for name in {n.id for part in parts for n in ast.walk(part) if isinstance(n, ast.Name)}
              if name in defined and name != test_name for part in code(defined[name])]
    return [n.value for part in parts for n in ast.walk(part) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)]


def shared_wording(message: str, strings: list[str], least: tuple[int, int] = (2, 9)) -> str | None:
    """The longest run of whole words of message (the last one without its trailing punctuation, too) that one
    of strings holds, if its plain words (flags, paths and numbers do not count) are at least least[0] words
    of least[1] letters in all (or as many as the whole message has)."""
    def plain(run: list[str]) -> tuple[int, int]:
        words = [w for w in (w.strip("();:,?'\"") for w in run) if w.isalpha()]
        return len(words), sum(map(len, words))
    words = message.split()
    in_all = plain(words)
    for size in range(len(words), 0, -1):
        for start in range(len(words) - size + 1):
            run = words[start:start + size]
            n_words, n_letters = plain(run)
            if n_words < min(least[0], in_all[0]) or n_letters < min(least[1], in_all[1]):
                continue
            for piece in dict.fromkeys((" ".join(run), " ".join(run).rstrip(";:,."))):
                if any(piece in s for s in strings):
                    return piece
    return None


def test_every_test_named_in_the_docs_table_checks_its_message():
    """docs/troubleshooting.md's table of input checks names, for each row, the tests that trigger it. Each
    message the row shows (in backticks, from its `error:` or `note:` on; "..." stands for what varies) must
    share its wording with the strings those tests use, so a row whose named tests do not check its text (or
    a row that no longer says what they check) fails here. Before, this only asked that the tests exist."""
    from conftest import ROOT
    docs = open(os.path.join(ROOT, "docs", "troubleshooting.md"), encoding="utf-8").read()
    table = docs.split("## Input checks")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| input ",
                                                                                                 "| ---"))]
    named, checked, unchecked = [], 0, []
    for row in rows:
        _, _, message_cell, test_cell = [cell.strip() for cell in row.strip("|").split(" | ")]
        named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", test_cell) or \
            (named if test_cell == "same" else [])
        assert named, f"no test named for: {row}"
        fragments = re.findall(r"`([^`]+)`", message_cell)
        if not any(f.startswith(("error: ", "note: ")) for f in fragments):
            continue                                # a row whose outcome is not a message (cut or skipped)
        strings = [s for file_name, test_name in named for s in strings_of_test(file_name, test_name)]
        for fragment in fragments:
            checked += 1
            if shared_wording(re.sub(r"^(error|note): ", "", fragment), strings) is None:
                unchecked.append(f"`{fragment}`: {', '.join(t for _, t in named)}")
    assert checked > 50
    assert not unchecked, "docs/troubleshooting.md messages no named test checks:\n" + "\n".join(unchecked)
