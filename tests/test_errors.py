"""Bad input stops each script with one clear line on stderr, and never overwrites a file."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_MODEL_FLAGS, run_script, write_dataset


def assert_one_line_error(result, *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained_run(tiny_data_dir, tmp_path_factory) -> str:
    """out_dir of a finished 2-step run on the tiny dataset."""
    out_dir = str(tmp_path_factory.mktemp("run"))
    result = run_script("train.py", f"--data_dir={tiny_data_dir}", "--dataset=tiny", f"--out_dir={out_dir}",
                        *TINY_MODEL_FLAGS, "--max_iters=2", "--warmup_iters=0", "--eval_iters=1")
    assert result.returncode == 0, result.stderr
    return out_dir


def test_data_not_prepared_names_the_prepare_command(tmp_path):
    result = run_script("train.py", f"--data_dir={tmp_path}", "--dataset=shakespeare", f"--out_dir={tmp_path}/o")
    assert_one_line_error(result, "not prepared", "python prepare.py --dataset=shakespeare")


def test_unknown_flag_suggests_the_close_match():
    assert_one_line_error(run_script("train.py", "--batch_sise=4"), "--batch_sise", "did you mean --batch_size?")
    assert_one_line_error(run_script("generate.py", "--temprature=0.5"), "did you mean --temperature?")


@pytest.mark.parametrize("flag,fragment", [
    ("--batch_size=abc", "--batch_size: invalid int value: 'abc'"),
    ("--compile=maybe", "--compile"),
    ("--init_from=gpt5", "--init_from=gpt5 is not scratch, resume, gpt2"),
    ("--batch_size=0", "--batch_size=0 must be >= 1"),
    ("--n_head=3", "divisible by --n_head=3"),
    ("--device=tpu", "--device=tpu is not a device"),
    ("--device=cuda:99", "--device=cuda:99 is not available"),
])
def test_bad_values_name_the_flag(flag, fragment):
    assert_one_line_error(run_script("train.py", flag), fragment)


def test_block_size_longer_than_the_data(tmp_path):
    write_dataset(str(tmp_path / "small"), torch.arange(100).numpy())
    result = run_script("train.py", f"--data_dir={tmp_path}", "--dataset=small", f"--out_dir={tmp_path}/o",
                        "--block_size=64", "--vocab_size=128")
    assert_one_line_error(result, "--block_size=64", "val.bin holds 20")


def test_resume_with_a_different_model_shape_lists_the_fields(trained_run, tiny_data_dir):
    before = open(os.path.join(trained_run, "ckpt.pt"), "rb").read()
    result = run_script("train.py", f"--data_dir={tiny_data_dir}", "--dataset=tiny", f"--out_dir={trained_run}",
                        "--init_from=resume", "--n_layer=3", "--n_embd=64", "--max_iters=4")
    assert_one_line_error(result, "n_layer (checkpoint 2, flag 3)", "n_embd (checkpoint 32, flag 64)")
    assert open(os.path.join(trained_run, "ckpt.pt"), "rb").read() == before


def test_training_from_scratch_refuses_to_overwrite_a_run(trained_run, tiny_data_dir):
    before = open(os.path.join(trained_run, "ckpt.pt"), "rb").read()
    result = run_script("train.py", f"--data_dir={tiny_data_dir}", "--dataset=tiny", f"--out_dir={trained_run}",
                        *TINY_MODEL_FLAGS, "--max_iters=2")
    assert_one_line_error(result, "ckpt.pt exists; continue it with --init_from=resume, or pick another "
                                  "--out_dir")
    assert open(os.path.join(trained_run, "ckpt.pt"), "rb").read() == before


@pytest.mark.parametrize("damage", ["truncated", "not_ours", "random_bytes", "missing"])
def test_bad_checkpoints_are_refused(trained_run, tiny_data_dir, tmp_path, damage):
    out_dir = tmp_path / "bad"
    out_dir.mkdir()
    good = open(os.path.join(trained_run, "ckpt.pt"), "rb").read()
    if damage == "truncated":
        (out_dir / "ckpt.pt").write_bytes(good[: len(good) // 2])
    elif damage == "not_ours":
        torch.save({"model": {"w": torch.zeros(2)}}, out_dir / "ckpt.pt")
    elif damage == "random_bytes":
        (out_dir / "ckpt.pt").write_bytes(os.urandom(4096))
    for script, flags in [("train.py", [f"--data_dir={tiny_data_dir}", "--dataset=tiny", "--init_from=resume"]),
                          ("generate.py", [])]:
        result = run_script(script, f"--out_dir={out_dir}", *flags)
        expected = {"missing": f"checkpoint {out_dir / 'ckpt.pt'} not found; train one with `python train.py",
                    "truncated": f"{out_dir / 'ckpt.pt'} is not a readable checkpoint",
                    "not_ours": f"{out_dir / 'ckpt.pt'} is not a checkpoint written by this project's "
                                "train.py",
                    "random_bytes": str(out_dir / "ckpt.pt")}[damage]   # os.urandom: unreadable in any way
        assert_one_line_error(result, expected)


def test_generate_streams_seeded_text(trained_run):
    """The same seed gives the same text, another seed other text; the text is the prompt and 20 new tokens.
    The tiny model's 64 ids are GPT-2's first 64 tokens, the single characters '!' (33) to '`' (96)."""
    def sample(seed: int):
        return run_script("generate.py", f"--out_dir={trained_run}", "--prompt=A#B", "--max_new_tokens=20",
                          f"--seed={seed}", "--stop_at_eot=False")
    first, second, other = sample(5), sample(5), sample(6)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("A#B")
    new_text = first.stdout.removeprefix("A#B").removesuffix("\n")
    assert len(new_text) == 20 and all(33 <= ord(c) <= 96 for c in new_text), first.stdout
    assert other.returncode == 0 and other.stdout.startswith("A#B") and other.stdout != first.stdout
    assert "tokens/s" in first.stderr and "tokens/s" not in first.stdout
    out_of_vocabulary = run_script("generate.py", f"--out_dir={trained_run}", "--prompt=Hello")
    assert_one_line_error(out_of_vocabulary, "vocabulary has only 64")


@pytest.mark.parametrize("script", ["train.py", "generate.py"])
def test_compile_without_a_cpp_compiler_stops_with_one_line(script, trained_run, tiny_data_dir, tmp_path):
    """torch.compile on a CPU builds C++ kernels: asked for where no C++ compiler is on the PATH (and no CXX),
    the run stops before it starts, in one line that names the remedy, not at its first step with a traceback
    from inside the compiler."""
    empty = tmp_path / "bin"
    empty.mkdir()
    flags = [f"--out_dir={trained_run}"] if script == "generate.py" else \
        [f"--data_dir={tiny_data_dir}", "--dataset=tiny", f"--out_dir={tmp_path / 'run'}", *TINY_MODEL_FLAGS]
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags, "--device=cpu", "--compile=True"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env={**env, "PATH": str(empty)})
    assert_one_line_error(result, "--compile on cpu needs a C++ compiler", "install g++")
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt")
