"""Tests for prepare.py: token files that decode back to the input, determinism, atomic and idempotent
writes, one-line errors for bad input, and the published Shakespeare token counts. CPU, offline."""
import functools
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tokenization     # noqa: E402
import prepare    # noqa: E402

EOT_TEXT = "<|endoftext|>"
TXT = "Ünïcödé — naïve café ☕ 你好\nDigits: 0123456789 3.14159\n\n  indented\ttab\nlast line\n"
RECORDS = ["First record: Hello world!", "Second 🙂 record\nwith two lines", "Third, 42 is the answer."]


@pytest.fixture(autouse=True)
def cached_tokenizer(monkeypatch):
    """Build the tokenizer once per session rather than once per prepare run (it takes ~0.5 s offline)."""
    monkeypatch.setattr(prepare, "get_tokenizer", _tokenizer)


@functools.cache
def _tokenizer():
    return tokenization.get_tokenizer()


def write(path, content) -> str:
    """Write text (UTF-8) or bytes to path and return it as a string."""
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode, **({} if mode == "wb" else {"encoding": "utf-8", "newline": ""})) as f:
        f.write(content)
    return str(path)


def write_jsonl(path, texts, column="text") -> str:
    return write(path, "".join(json.dumps({column: t, "id": i}) + "\n" for i, t in enumerate(texts)))


def run(*args: str) -> None:
    prepare.main(list(args))


def read_dataset(out_dir) -> tuple[np.ndarray, np.ndarray, dict]:
    train = np.fromfile(os.path.join(out_dir, "train.bin"), dtype=np.uint16)
    val = np.fromfile(os.path.join(out_dir, "val.bin"), dtype=np.uint16)
    with open(os.path.join(out_dir, "meta.json")) as f:
        return train, val, json.load(f)


def decode(out_dir) -> str:
    train, val, _ = read_dataset(out_dir)
    return _tokenizer().decode(np.concatenate([train, val]).tolist())


def snapshot(directory) -> dict:
    """Every file under directory, relative path -> bytes: to show that nothing was written."""
    files = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(parent, name), "rb") as f:
                files[os.path.relpath(os.path.join(parent, name), directory)] = f.read()
    return files


# --- the tokenizer and the split ---

def test_tokenizer_known_ids():
    enc = _tokenizer()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode(EOT_TEXT) == [tokenization.EOT_TOKEN] == [50256]
    assert enc.vocab_size == 50257


def test_split_point_gives_the_published_shakespeare_split():
    """OFFLINE.md: 1,796,990 tokens split 90/10 give 1,617,291 train / 179,699 val."""
    assert prepare.split_point(1_796_990, 0.1) == 1_617_291
    assert prepare.split_point(100, 0.25) == 75


# --- round trips ---

def test_txt_and_jsonl_decode_back_to_documents_joined_by_eot(tmp_path):
    txt = write(tmp_path / "a.txt", TXT)
    jsonl = write_jsonl(tmp_path / "b.jsonl", RECORDS)
    data_dir = tmp_path / "data"
    run(f"--input={jsonl},{txt}", f"--data_dir={data_dir}", "--val_fraction=0.3")   # sorted: a.txt first
    train, val, meta = read_dataset(data_dir / "a")
    assert len(train) > 0 and len(val) > 0
    assert decode(data_dir / "a") == EOT_TEXT.join([TXT, *RECORDS])
    assert np.concatenate([train, val]).tolist().count(50256) == 3   # between documents, none at the end
    assert meta["documents"] == 4 and meta["empty_documents_skipped"] == 0


def test_parquet_and_globs_with_empty_documents_skipped(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = ["Row one of the parquet file.", "", None, "Row four, after an empty and a null row.", " \n "]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"body": texts, "n": list(range(5))}), tmp_path / "in" / "rows.parquet")
    write(tmp_path / "in" / "z.md", "# A heading\n\nSome *markdown*.\n")
    data_dir = tmp_path / "data"
    run(f"--input={tmp_path}/in/*.parquet,{tmp_path}/in/*.md", "--text_column=body", "--name=mix",
        f"--data_dir={data_dir}", "--val_fraction=0.2")
    expected = [texts[0], texts[3], "# A heading\n\nSome *markdown*.\n"]
    assert decode(data_dir / "mix") == EOT_TEXT.join(expected)
    _, _, meta = read_dataset(data_dir / "mix")
    assert meta["documents"] == 3 and meta["empty_documents_skipped"] == 3


def test_meta_matches_the_files(tmp_path):
    run(f"--input={write(tmp_path / 'doc.txt', TXT * 20)}", f"--data_dir={tmp_path}")
    train, val, meta = read_dataset(tmp_path / "doc")
    for split, ids in (("train", train), ("val", val)):
        path = tmp_path / "doc" / f"{split}.bin"
        assert meta["sha256"][f"{split}.bin"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert meta[f"{split}_tokens"] == os.path.getsize(path) // 2 == len(ids)
    n_total = len(train) + len(val)
    assert len(train) == int(n_total * 0.9)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"], meta["dtype"]) == \
        ("r50k_base", 50257, 50256, "uint16")
    assert meta["source"]["kind"] == "files" and meta["val_fraction"] == 0.1 and "format" in meta


# --- determinism, idempotence, atomic replacement ---

def test_same_input_gives_identical_files_and_a_second_run_does_nothing(tmp_path, capsys):
    src = write(tmp_path / "doc.txt", TXT * 30)
    run(f"--input={src}", f"--data_dir={tmp_path / 'one'}")
    run(f"--input={src}", f"--data_dir={tmp_path / 'two'}")
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two")
    assert set(snapshot(tmp_path / "one")) == {"doc/train.bin", "doc/val.bin", "doc/meta.json"}

    outputs = [tmp_path / "one" / "doc" / name for name in ("train.bin", "val.bin", "meta.json")]
    past_ns = 1_000_000_000 * 10**9          # back-date the outputs: any rewrite shows as a newer mtime
    for path in outputs:
        os.utime(path, ns=(past_ns, past_ns))
    capsys.readouterr()
    run(f"--input={src}", f"--data_dir={tmp_path / 'one'}")
    assert "is up to date" in capsys.readouterr().out
    assert [os.stat(path).st_mtime_ns for path in outputs] == [past_ns] * 3, "a second run rewrote files"

    run(f"--input={src}", f"--data_dir={tmp_path / 'one'}", "--force")
    assert all(os.stat(path).st_mtime_ns > past_ns for path in outputs), "--force did not rebuild"
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two")


def test_other_inputs_are_refused_without_force(tmp_path):
    run(f"--input={write(tmp_path / 'a.txt', TXT * 10)}", "--name=x", f"--data_dir={tmp_path / 'data'}")
    before = snapshot(tmp_path / "data")
    other = write(tmp_path / "b.txt", "Something else entirely. " * 10)
    for args, what in (([f"--input={other}"], "other inputs"),
                       ([f"--input={tmp_path / 'a.txt'}", "--val_fraction=0.2"], "val_fraction=0.1")):
        with pytest.raises(SystemExit) as e:
            run(*args, "--name=x", f"--data_dir={tmp_path / 'data'}")
        assert str(e.value.code) == (f"error: {tmp_path / 'data' / 'x'} holds a dataset prepared from {what}; "
                                     f"pass --force to rebuild it or choose another --name")
    assert snapshot(tmp_path / "data") == before
    run(f"--input={other}", "--name=x", f"--data_dir={tmp_path / 'data'}", "--force")
    assert decode(tmp_path / "data" / "x") == "Something else entirely. " * 10


@pytest.mark.parametrize("damage", ["delete meta.json", "truncate val.bin"])
def test_an_unfinished_dataset_is_rebuilt(tmp_path, damage):
    """A run killed between the renames leaves no meta.json; a bad copy leaves a .bin of the wrong size.
    Either way the next run must rebuild it rather than call it up to date."""
    src = write(tmp_path / "doc.txt", TXT * 10)
    run(f"--input={src}", f"--data_dir={tmp_path}")
    good = snapshot(tmp_path / "doc")
    if damage == "delete meta.json":
        os.remove(tmp_path / "doc" / "meta.json")
    else:
        with open(tmp_path / "doc" / "val.bin", "r+b") as f:
            f.truncate(2)
    run(f"--input={src}", f"--data_dir={tmp_path}")
    assert snapshot(tmp_path / "doc") == good


# --- bad input: one line, nothing written ---

BAD_INPUTS = {   # case -> (files to create, flags, what the message says); {d} is the test's folder
    "missing file": ({}, ["--input={d}/nope.txt"], "error: --input {d}/nope.txt matches no file"),
    "glob matches nothing": ({}, ["--input={d}/*.nothing.jsonl"],
                             "error: --input {d}/*.nothing.jsonl matches no file"),
    "unsupported extension": ({"t.csv": "a,b\n1,2\n"}, ["--input={d}/t.csv"],
                              "error: {d}/t.csv: unsupported file type; use .txt, .md"),
    "only empty documents": ({"e.jsonl": '{"text": ""}\n{"text": "  \\n"}\n'}, ["--input={d}/e.jsonl"],
                             "error: the input holds no text (2 empty documents); nothing to prepare"),
    "empty file set": ({"e.jsonl": ""}, ["--input={d}/e.jsonl"], "error: the input holds no text"),
    "jsonl line not json": ({"j.jsonl": '{"text": "fine"}\n{"text": oops}\n'}, ["--input={d}/j.jsonl"],
                            "error: {d}/j.jsonl line 2 is not JSON ("),
    "jsonl without column": ({"j.jsonl": '{"text": "fine"}\n{"body": "no text"}\n'}, ["--input={d}/j.jsonl"],
                             "error: {d}/j.jsonl line 2 has no 'text' field; pick one with --text_column"),
    "bad utf-8": ({"u.txt": b"caf\xe9 au lait\n"}, ["--input={d}/u.txt"],
                  "error: {d}/u.txt is not valid UTF-8 (bad byte at offset 3); re-encode it as UTF-8"),
    "val_fraction zero": ({"ok.txt": TXT}, ["--input={d}/ok.txt", "--val_fraction=0"],
                          "error: --val_fraction=0.0 must lie strictly between 0 and 1"),
    "val_fraction one": ({"ok.txt": TXT}, ["--input={d}/ok.txt", "--val_fraction=1"],
                         "error: --val_fraction=1.0 must lie strictly between 0 and 1"),
    "val_fraction above one": ({"ok.txt": TXT}, ["--input={d}/ok.txt", "--val_fraction=1.5"],
                               "error: --val_fraction=1.5 must lie strictly between 0 and 1"),
    "too few tokens": ({"tiny.txt": "Hello world and more"}, ["--input={d}/tiny.txt"],
                       "tokens are too few: train and val need at least 2 tokens each"),
    "parquet without column": ({}, ["--input={d}/p.parquet"],
                               "error: {d}/p.parquet has no column 'text' (columns: content); pick one with "
                               "--text_column"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_with_one_line_and_writes_nothing(tmp_path, capsys, case):
    files, flags, expected = BAD_INPUTS[case]
    d = tmp_path / "in"
    d.mkdir()
    for name, content in files.items():
        write(d / name, content)
    if case == "parquet without column":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"content": ["some text"]}), d / "p.parquet")
    data_dir = tmp_path / "data"
    run(f"--input={write(tmp_path / 'good.txt', TXT * 10)}", "--name=x", f"--data_dir={data_dir}")
    before = snapshot(data_dir)
    capsys.readouterr()
    # Into an existing dataset with --force (its files must survive), and into a fresh name.
    for target in (["--name=x", "--force"], ["--name=fresh"]):
        with pytest.raises(SystemExit) as e:
            run(*[f.format(d=d) for f in flags], *target, f"--data_dir={data_dir}")
        message = str(e.value.code)
        assert message.startswith("error:") and "\n" not in message, message
        assert expected.format(d=d) in message, message
        assert capsys.readouterr().err == ""        # the exit message is the only line on stderr
        assert snapshot(data_dir) == before         # nothing written, no .tmp left, no new folder
    if case == "parquet without column":
        assert "content" in message


def _cli(args: list[str], cwd, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def test_cli_error_is_one_stderr_line_and_nonzero_exit(tmp_path):
    write(tmp_path / "j.jsonl", '{"text": "fine"}\nnot json\n')
    result = _cli(["--input=j.jsonl", f"--data_dir={tmp_path / 'data'}"], cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.startswith("error:") and len(result.stderr.splitlines()) == 1, result.stderr
    assert not (tmp_path / "data" / "j").exists()


# --- Hugging Face path, kept offline ---

def test_unknown_hub_dataset_fails_fast_with_one_line(tmp_path):
    result = _cli(["--dataset=nobody-here/no-such-dataset-xyz", f"--data_dir={tmp_path / 'data'}"], tmp_path,
                  HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "cache"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: could not load dataset 'nobody-here/no-such-dataset-xyz' from the Hugging Face Hub ("), lines
    assert not (tmp_path / "data").exists()


def test_hf_path_reads_a_local_dataset_folder(tmp_path):
    """load_dataset also accepts a local folder of data files, which runs the Hugging Face code path
    (column check, batched iteration) without the Hub."""
    corpus = tmp_path / "mycorpus"
    corpus.mkdir()
    write_jsonl(corpus / "train.jsonl", RECORDS * 3)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    result = _cli([f"--dataset={corpus}", f"--data_dir={tmp_path / 'data'}", "--streaming"], tmp_path, **env)
    assert result.returncode == 0, result.stderr
    assert decode(tmp_path / "data" / "mycorpus") == EOT_TEXT.join(RECORDS * 3)
    assert read_dataset(tmp_path / "data" / "mycorpus")[2]["source"]["kind"] == "hf"

    result = _cli([f"--dataset={corpus}", "--text_column=body", "--name=other"], tmp_path, **env)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: dataset '{corpus}' has no column 'body' (columns: text"), message
    assert message.endswith("); pick one with --text_column"), message


# --- the sample corpus ---

@pytest.mark.slow
def test_shakespeare_sample_gives_the_published_token_counts(tmp_path):
    """Figures from OFFLINE.md, computed independently of this code."""
    run(f"--data_dir={tmp_path}")
    train, val, meta = read_dataset(tmp_path / "shakespeare")
    assert len(train) + len(val) == 1_796_990
    assert (len(train), len(val)) == (1_617_291, 179_699)
    assert (meta["train_tokens"], meta["val_tokens"], meta["documents"]) == (1_617_291, 179_699, 38)
    assert meta["source"]["kind"] == "shakespeare"


def test_a_given_tokenizer_json_encodes_as_the_dataset_it_came_from(tmp_path):
    """--tokenizer=PATH re-uses a tokenizer.json: the same text prepared with the BPE another preparation
    trained gives that preparation's token files byte for byte, with the file itself beside them (its sha256
    and vocabulary in meta.json); another text is encoded with that BPE (its ids are what Hugging Face's
    tokenizers gives with the file), not with a BPE trained anew or with r50k_base."""
    src = write(tmp_path / "doc.txt", TXT * 40)
    run(f"--input={src}", "--name=trained", f"--data_dir={tmp_path}", "--tokenizer=bpe:300")
    given = tmp_path / "trained" / "tokenizer.json"
    run(f"--input={src}", "--name=reused", f"--data_dir={tmp_path}", f"--tokenizer={given}")
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "reused" / name).read_bytes() == (tmp_path / "trained" / name).read_bytes(), name
    meta = read_dataset(tmp_path / "reused")[2]
    assert (meta["tokenizer"], meta["vocab_size"], meta["tokenizer_sha256"]) == \
        (str(given), 300, hashlib.sha256(given.read_bytes()).hexdigest())
    other_text = "A text the BPE never saw: zebras quietly juggle 9876 oranges. " * 20
    other = write(tmp_path / "other.txt", other_text)
    run(f"--input={other}", f"--data_dir={tmp_path}", f"--tokenizer={given}")
    train, val, meta = read_dataset(tmp_path / "other")
    reference = tokenization.import_tokenizers().Tokenizer.from_str(given.read_text(encoding="utf-8"))
    assert np.concatenate([train, val]).tolist() == reference.encode(other_text).ids
    assert (tmp_path / "other" / "tokenizer.json").read_bytes() == given.read_bytes()
    assert meta["vocab_size"] == 300
