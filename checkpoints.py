"""Files that are never half-written (written to .tmp, fsynced, renamed, verified on reading), and the
checkpoints written through them: the weights, AdamW's state by parameter name, and every random generator."""
import collections
import contextlib
import hashlib
import os
import pickle
import random
import re
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import BinaryIO

import numpy as np
import torch

from model import GPT, GPTConfig


# --- files that are never half-written ---

class ErrorRecordingFile:
    """A binary file that keeps the OSError of a failed write: torch.save turns a failed write into a vague
    RuntimeError ("unexpected pos"), while the OSError underneath names the cause (a full disk)."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


_fault_points_reached: collections.Counter = collections.Counter()   # for fault_point, in tests only


def fault_point(name: str) -> None:
    """Test hook: with GPT_TEST_KILL_AT=NAME (or NAME#N), SIGKILL this process the first (N-th) time it
    reaches the point NAME, as a node dying there would; without it, nothing. The points: 'written FILE' (its
    .tmp file complete, not yet renamed) and 'replaced FILE' (renamed into place) in write_atomically, which
    writes every checkpoint and the trimmed metrics.jsonl, and 'linking FILE' in link_atomically (a
    keep_last or keep_best hard link made under its .tmp name). FILE is the base name, e.g. ckpt.pt."""
    wanted = os.environ.get("GPT_TEST_KILL_AT")
    if not wanted:
        return
    target, _, count = wanted.partition("#")
    if not (count or "1").isdigit() or int(count or 1) < 1:
        sys.exit(f"error: GPT_TEST_KILL_AT={wanted}: the count after # must be a whole number >= 1; it is a test "
                 f"hook that kills the process at a named point: unset it, or give NAME or NAME#N")
    _fault_points_reached[name] += 1
    if name == target and _fault_points_reached[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def write_delay_s() -> float:
    """GPT_TEST_WRITE_DELAY_S in seconds, 0 when unset (a test hook of write_atomically); anything but a
    number of seconds >= 0 stops with one line."""
    value = os.environ.get("GPT_TEST_WRITE_DELAY_S", "0")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):           # nan and inf fail too
        sys.exit(f"error: GPT_TEST_WRITE_DELAY_S={value} is not a number of seconds >= 0; it is a test hook "
                 f"that delays every file write: unset it, or give seconds such as 0.3")
    return seconds


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace the file at path with what write(f) puts into f, atomically: the bytes go to
    path + '.tmp', are fsynced, and the temporary file is renamed over path (then the directory is fsynced,
    so the rename itself survives a power cut). A crash at any moment leaves the old file or the new one,
    never half of one. A full disk or an unwritable folder stops with one line, the old file untouched.

    GPT_TEST_WRITE_DELAY_S (tests only) sleeps between writing and renaming, so that a fault test can kill
    the process while the temporary file exists; GPT_TEST_KILL_AT kills it at a chosen point (fault_point)."""
    tmp, delay_s = path + ".tmp", write_delay_s()
    try:
        with open(tmp, "wb") as f:
            recorded = ErrorRecordingFile(f)
            try:
                write(recorded)
            except Exception:
                if recorded.error is None:
                    raise
                raise recorded.error
            f.flush()
            time.sleep(delay_s)
            os.fsync(f.fileno())
        fault_point(f"written {os.path.basename(path)}")
        os.replace(tmp, path)
        fault_point(f"replaced {os.path.basename(path)}")
        directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as e:
        previous = "the previous version is untouched" if os.path.exists(path) else "nothing was written"
        sys.exit(f"error: cannot write {path} ({e.strerror or e}); {previous}. Free disk space or make "
                 f"{os.path.dirname(os.path.abspath(path))} writable, then run again")
    finally:   # an unwritable folder may keep the .tmp file: its name never shadows a complete file
        with contextlib.suppress(OSError):
            os.remove(tmp)


def link_atomically(source: str, path: str) -> None:
    """Make path another name of the complete file source (a hard link, renamed into place, so path is
    never half there); a copy where the file system has no hard links. Nothing to do if path already is
    one (and rename() of one file's two names does nothing, which would leave the .tmp name behind)."""
    if os.path.exists(path) and os.path.samefile(source, path):
        return
    tmp = path + ".tmp"
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.link(source, tmp)
        fault_point(f"linking {os.path.basename(path)}")   # a test hook (GPT_TEST_KILL_AT); nothing otherwise
        os.replace(tmp, path)
    except OSError:
        if os.path.lexists(tmp):
            os.remove(tmp)
        with open(source, "rb") as f:
            write_atomically(path, lambda out: shutil.copyfileobj(f, out))


def sha256_file(path: str) -> str:
    """sha256 of a file's bytes, as hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def content_sha256(contents) -> str:
    """sha256 of a checkpoint's contents (tensors, dicts, lists, numbers, strings), walked in a fixed order:
    every tensor's dtype, shape and bytes and every plain value's type and repr. torch.load does not check
    its zip archive's CRCs, so a flipped bit in a tensor would otherwise load as a silently wrong number."""
    digest = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"tensor {t.dtype} {tuple(t.shape)}:".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(b"{")
            for key in sorted(value, key=repr):
                feed(key)
                feed(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())
    feed(contents)
    return digest.hexdigest()


def save_verifiable(contents: dict, path: str, file_format: str, version: int) -> None:
    """torch.save contents so that load_verified can tell it is whole and ours: atomically (write_atomically),
    with the file's format name, its version and the sha256 of what it holds (content_sha256)."""
    marked = {"format": file_format, "version": version, **contents}
    marked["sha256"] = content_sha256(marked)
    write_atomically(path, lambda f: torch.save(marked, f))


def load_verified(path: str, noun: str, file_format: str, version: int, writer: str, how_to_make: str,
                  hint: str = "", mmap: bool = False) -> dict:
    """Read a dict that save_verifiable wrote with {"format": file_format, "version": version, "sha256"}.
    torch.load(weights_only=True) only rebuilds tensors and plain containers, so a file cannot run code;
    a missing, unreadable, foreign, outdated or corrupted file stops with one line (plus hint). mmap: the
    tensors stay in the file, mapped (the page cache's, shared by the processes that read it), not copied."""
    if not os.path.isfile(path):
        sys.exit(f"error: {noun} {path} not found; {how_to_make}{hint}")
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):   # a pickled object of some class: it could run code
            sys.exit(f"error: {path} holds Python objects other than tensors and plain data, which could run "
                     f"code when loaded; refused (a {noun} written by {writer} never does){hint}")
        sys.exit(f"error: {path} is not a readable {noun} ({str(e).strip()[:200]}); it may be truncated or "
                 f"corrupted{hint}")
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        sys.exit(f"error: {path} is not a readable {noun} ({reason}); it may be truncated or corrupted{hint}")
    if not isinstance(contents, dict) or contents.get("format") != file_format:
        sys.exit(f"error: {path} is not a {noun} written by {writer}{hint}")
    if contents.get("version") != version:
        sys.exit(f"error: {path} has {noun} format version {contents.get('version')}, this code reads "
                 f"version {version}{hint}")
    stored = contents.pop("sha256", None)
    if stored != content_sha256(contents):
        sys.exit(f"error: {path} is corrupted: its contents do not match the sha256 recorded when it was "
                 f"written{hint}")
    return contents


# --- checkpoints ---

CHECKPOINT_FORMAT = "gpt-checkpoint"   # marks files written by this project
CHECKPOINT_VERSION = 2                 # 2: the contents carry their sha256


def save_checkpoint(checkpoint: dict, path: str) -> None:
    """Write a training checkpoint atomically, marked with this project's format, version and checksum."""
    save_verifiable(checkpoint, path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)


def other_checkpoints(path: str) -> list[str]:
    """The step-numbered checkpoints (ckpt-STEP.pt, newest first), then ckpt-best.pt, beside path and not path
    itself (nor a hard link to it)."""
    folder = os.path.dirname(path) or "."
    names = sorted((n for n in os.listdir(folder) if re.fullmatch(r"ckpt-\d+\.pt", n)), reverse=True)
    names += ["ckpt-best.pt"] if os.path.isfile(os.path.join(folder, "ckpt-best.pt")) else []
    return [os.path.join(folder, n) for n in names
            if not (os.path.exists(path) and os.path.samefile(path, os.path.join(folder, n)))]


def load_checkpoint(path: str, whole: bool = True) -> dict:
    """Read a checkpoint written by save_checkpoint, or by save_in_pieces: then its "model" and "optimizer" are
    put together from the pieces, one tensor at a time (assemble_pieces). whole=False leaves the tensors in
    the file for a TensorReader: a single file mapped (mmap), the pieces where they are. A damaged one is
    refused, naming the older ones."""
    others = other_checkpoints(path) if os.path.isdir(os.path.dirname(path) or ".") else []
    hint = (f"; older checkpoints: {', '.join(others)} (train.py resumes from one with "
            f"--init_from=resume --resume_from=FILE)") if others else ""
    checkpoint = load_verified(path, "checkpoint", CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "this project's train.py",
                               "train one with `python train.py --out_dir=...`", hint, mmap=not whole)
    if "pieces" in checkpoint:
        check_pieces(path, checkpoint["pieces"], hint)
        if whole:
            checkpoint.update(assemble_pieces(TensorReader(path, checkpoint)))
    return checkpoint


def keep_checkpoints(ckpt_path: str, step: int, is_best: bool, keep_last: int, keep_best: bool) -> None:
    """After ckpt.pt was written at `step`: name it ckpt-STEP.pt (and ckpt-best.pt when its val loss is the
    lowest so far), then delete the numbered checkpoints beyond the newest keep_last, and any from steps
    after this one (left by a run that went back to an older checkpoint). A file system error stops with one
    line: ckpt.pt itself is complete by then."""
    folder = os.path.dirname(ckpt_path)
    try:
        if keep_last > 0:
            link_atomically(ckpt_path, os.path.join(folder, f"ckpt-{step:06d}.pt"))
        if is_best and keep_best:
            link_atomically(ckpt_path, os.path.join(folder, "ckpt-best.pt"))
        numbered = sorted((int(m.group(1)), m.group(0)) for m in
                          (re.fullmatch(r"ckpt-(\d+)\.pt", name) for name in os.listdir(folder)) if m)
        kept = [name for s, name in numbered if s <= step][-keep_last:] if keep_last > 0 else []
        for _, name in numbered:
            if name not in kept:
                os.remove(os.path.join(folder, name))
    except OSError as e:
        sys.exit(f"error: cannot update the checkpoints in {folder} ({e}); ckpt.pt is complete. Free disk space "
                 f"or fix the folder's permissions, then resume")


# --- checkpoints in pieces ---
#
# Under FSDP, tensor parallelism and pipeline stages no process holds the whole model, and none should have to
# for a checkpoint: each process writes its rows of every tensor it holds (parallel.state_pieces) to a file of
# its own, PIECES_DIR/STEP-TOKEN.bin (their bytes one after the other), and rank 0 then writes ckpt.pt as the
# index: the run's state as in a single-file checkpoint, with, in place of the tensors, where each tensor's
# rows are (file, byte offset) and every piece file's sha256. The index is written last, atomically, so a
# checkpoint is complete exactly when its index is; piece files are never overwritten (TOKEN is new each time),
# and those no index names any more are deleted after each save (remove_unnamed_pieces). Reading takes a tensor at a time from the pieces that hold its rows, so a
# process resuming in any layout holds its share plus one tensor; readers that want one whole state dict
# (generate.py, eval_lm.py, hf_gpt2.py, finetune_lora.py) get it put together, tensor by tensor.

PIECES_DIR = "pieces"


def save_piece_file(pieces, ckpt_path: str, step: int) -> tuple[str, str, dict]:
    """Write this process's rows of its tensors beside ckpt_path, a tensor at a time as pieces (an iterator
    of parallel.state_pieces's (key, whole shape, first row, rows)) yields them: their bytes one after the
    other, atomically (write_atomically). Returns (file name, its sha256, {key: (whole shape, dtype, first row,
    end row, byte offset)})."""
    folder = os.path.join(os.path.dirname(ckpt_path), PIECES_DIR)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: cannot make {folder} for the checkpoint's pieces ({e.strerror or e}); make "
                 f"{os.path.dirname(os.path.abspath(folder))} writable, or move what is there, then run again")
    name, digest, rows = f"{step:06d}-{secrets.token_hex(6)}.bin", hashlib.sha256(), {}

    def write(f) -> None:
        offset = 0
        for key, shape, start, t in pieces:
            data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(data)
            digest.update(data)
            rows[key] = (shape, str(t.dtype).removeprefix("torch."), start, start + (len(t) if t.dim() else 1),
                         offset)
            offset += data.nbytes
    write_atomically(os.path.join(folder, name), write)
    return name, digest.hexdigest(), rows


def index_of_pieces(gathered: list[tuple[str, str, dict]]) -> dict:
    """The index's "pieces" entry from every process's (file, sha256, rows) (save_piece_file's): every file's
    sha256, and for each tensor its whole shape, its dtype and where its rows are, in order."""
    files, tensors = {}, {}
    for file, sha256, rows in gathered:
        files[file] = sha256
        for key, (shape, dtype, start, stop, offset) in rows.items():
            entry = tensors.setdefault(key, {"shape": shape, "dtype": dtype, "rows": []})
            entry["rows"].append([start, stop, file, offset])
    for entry in tensors.values():
        entry["rows"].sort()
    return {"files": files, "tensors": tensors}


def check_pieces(path: str, pieces: dict, hint: str) -> None:
    """Refuse an index whose piece files are missing or differ from the sha256 recorded when they were written
    (every process checks all of them, streaming: none is loaded), or whose tensors' rows leave gaps."""
    folder = os.path.join(os.path.dirname(path), PIECES_DIR)
    for file, sha256 in pieces["files"].items():
        where = os.path.join(folder, file)
        if not os.path.isfile(where) or sha256_file(where) != sha256:
            sys.exit(f"error: {path} is damaged: its piece {where} is "
                     f"{'missing' if not os.path.isfile(where) else 'not the one written with it'}{hint}")
    for key, entry in pieces["tensors"].items():
        rows = entry["shape"][0] if entry["shape"] else 1
        if [row[0] for row in entry["rows"]] != [0] + [row[1] for row in entry["rows"][:-1]] \
                or entry["rows"][-1][1] != rows:
            sys.exit(f"error: {path} is damaged: the rows of {key} are not all there{hint}")


class TensorReader:
    """A checkpoint's tensors one at a time, by key: "model/NAME" (a weight) or "optimizer/NAME/KEY" (AdamW's
    state of parameter NAME). From a single file, the mapped tensor; from pieces, the tensor put together
    from the files that hold its rows, each read straight into its place, so what a process holds is the
    tensor it asked for."""

    def __init__(self, path: str, checkpoint: dict):
        self.path, self.checkpoint, self.pieces = path, checkpoint, checkpoint.get("pieces")

    def keys(self) -> list[str]:
        if self.pieces is not None:
            return list(self.pieces["tensors"])
        optimizer = self.checkpoint["optimizer"]["state"]
        return [f"model/{name}" for name in self.checkpoint["model"]] + \
            [f"optimizer/{name}/{key}" for name, state in optimizer.items() for key in state]

    def get(self, key: str) -> torch.Tensor | None:
        """The tensor under key (None if the checkpoint has none: AdamW's state before the first step)."""
        if self.pieces is None:
            part, name = key.split("/", 1)
            if part == "model":
                return self.checkpoint["model"].get(name)
            name, _, entry = name.rpartition("/")
            return self.checkpoint["optimizer"]["state"].get(name, {}).get(entry)
        entry = self.pieces["tensors"].get(key)
        if entry is None and key == "model/lm_head.weight" and self.checkpoint["model_config"]["tie_embeddings"]:
            entry = self.pieces["tensors"]["model/transformer.wte.weight"]   # one matrix, saved once
            key = "model/transformer.wte.weight"
        if entry is None:
            return None
        dtype = getattr(torch, entry["dtype"])
        whole = torch.empty(entry["shape"], dtype=dtype)
        rows = whole.view(1, *whole.shape) if not whole.dim() else whole
        for start, stop, file, offset in entry["rows"]:   # each piece read straight into its rows
            target = rows[start:stop].reshape(-1).view(torch.uint8).numpy()
            with open(os.path.join(os.path.dirname(self.path), PIECES_DIR, file), "rb") as f:
                f.seek(offset)
                if f.readinto(target) != target.nbytes:
                    sys.exit(f"error: {self.path} is damaged: its piece {file} is shorter than recorded")
        return whole

    def weight(self, name: str) -> torch.Tensor:
        """The weight of parameter name, refused when not finite (training never writes such a checkpoint: it
        skips non-finite steps, so a run diverged elsewhere)."""
        t = self.get(f"model/{name}")
        if t is None:
            sys.exit(f"error: {self.path} has no weight {name}; it is not a checkpoint of this model")
        if not torch.isfinite(t).all():
            sys.exit(f"error: {self.path} holds non-finite weights (in {name}); resume from an older checkpoint "
                     f"with --resume_from=FILE")
        return t

    def moments(self, name: str) -> dict[str, torch.Tensor] | None:
        """AdamW's state of parameter name (step, exp_avg, exp_avg_sq), None where it has none."""
        if self.pieces is None:
            return self.checkpoint["optimizer"]["state"].get(name)
        prefix = f"optimizer/{name}/"
        state = {key[len(prefix):]: self.get(key) for key in self.pieces["tensors"] if key.startswith(prefix)}
        return state or None

    def param_groups(self) -> list[dict]:
        return self.checkpoint["optimizer"]["param_groups"]


def assemble_pieces(reader: TensorReader, optimizer: bool = True) -> dict:
    """A checkpoint in pieces as one process's state: {"model": state dict, "optimizer": by-name state}, in
    the key order of the pieces (the model's order), built one tensor at a time; optimizer=False: the model
    only."""
    model, state = {}, {}
    for key in (key for key in reader.keys() if optimizer or key.startswith("model/")):
        part, name = key.split("/", 1)
        if part == "model":
            model[name] = reader.get(key)
        else:
            name, _, entry = name.rpartition("/")
            state.setdefault(name, {})[entry] = reader.get(key)
    if reader.checkpoint["model_config"]["tie_embeddings"]:   # GPT.state_dict() names the tied matrix twice
        model["lm_head.weight"] = model["transformer.wte.weight"]
    return {"model": model, "optimizer": {"state": state, "param_groups": reader.param_groups()}}


def checkpoint_weights(path: str, checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model's whole state dict of a checkpoint that load_checkpoint read with whole=False: mapped from its
    file, or put together from its pieces (without AdamW's state)."""
    if "pieces" not in checkpoint:
        return checkpoint["model"]
    return assemble_pieces(TensorReader(path, checkpoint), optimizer=False)["model"]


def remove_unnamed_pieces(ckpt_path: str) -> None:
    """Delete the piece files beside ckpt_path that no checkpoint there names (those of checkpoints that
    keep_checkpoints let go, and of a save that was killed before its index was written)."""
    folder = os.path.join(os.path.dirname(ckpt_path), PIECES_DIR)
    if not os.path.isdir(folder):
        return
    named = set()
    parent = os.path.dirname(ckpt_path) or "."
    for name in os.listdir(parent):
        if re.fullmatch(r"ckpt(-\d+|-best)?\.pt", name):
            try:
                contents = torch.load(os.path.join(parent, name), map_location="cpu", weights_only=True, mmap=True)
            except Exception:   # an index that cannot be read: which pieces it names is unknown, keep them all
                return
            named |= set(contents.get("pieces", {}).get("files", {}))
    for name in os.listdir(folder):   # a .tmp file is a killed write's: every process has finished writing
        if name not in named:
            os.remove(os.path.join(folder, name))


def model_from_checkpoint(checkpoint: dict, path: str = "", **overrides) -> GPT:
    """The GPT stored in a checkpoint (on the CPU; path: its file, for one read with whole=False), its weights
    copied in a tensor at a time, so the only whole copy in memory is the model's own. overrides replace
    non-shape fields (dropout, sdpa)."""
    model = GPT(GPTConfig(**{**checkpoint["model_config"], **overrides}))
    reader = TensorReader(path, checkpoint)
    with torch.no_grad():
        for name, p in model.named_parameters():
            saved = reader.get(f"model/{name}")
            if saved is None or saved.shape != p.shape:
                sys.exit(f"error: {path or 'the checkpoint'} has no weight {name} of shape {tuple(p.shape)}; it "
                         f"is not a checkpoint of the model its config describes")
            p.copy_(saved)
    return model


def optimizer_state_by_name(named_parameters: list, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with parameter names where PyTorch puts positions, so the state loads into
    any layout (one process, DDP, pipeline stages) whose parameters carry the same names.
    named_parameters: (name, parameter) pairs covering the optimizer's parameters."""
    names = {id(p): name for name, p in named_parameters}
    saved = optimizer.state_dict()
    index_to_name = {i: names[id(p)] for saved_group, group in zip(saved["param_groups"], optimizer.param_groups)
                     for i, p in zip(saved_group["params"], group["params"])}
    return {"state": {index_to_name[i]: state for i, state in saved["state"].items()},
            "param_groups": [{**g, "params": [index_to_name[i] for i in g["params"]]}
                             for g in saved["param_groups"]]}


def rng_states(data_generator: torch.Generator) -> dict:
    """Every random number generator the run touches, so a resumed run draws exactly the same numbers. On a GPU
    the state of this process's own device only (the current one): each process draws on its own GPU, and a
    run resumed with fewer visible GPUs still finds the state it needs."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
        "data": data_generator.get_state(),
    }


def restore_rng_states(states: dict, data_generator: torch.Generator) -> None:
    """Set the generators to states (rng_states). A checkpoint written before rng_states kept one device's state
    holds a list of every visible GPU's: this process's device takes its own entry, where there is one."""
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    cuda = states["cuda"]
    if isinstance(cuda, list):
        cuda = cuda[torch.cuda.current_device()] if torch.cuda.is_available() and \
            torch.cuda.current_device() < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
    data_generator.set_state(states["data"])


def restore_cpu_threads(saved: int | None) -> str | None:
    """Compute with the number of CPU threads the checkpoint's run used: a CPU kernel that sums (a matmul,
    the gradients of the biases and LayerNorm gains) splits the sum among its threads and adds up their
    parts, so fp32 rounding depends on how many there are. PyTorch's default is the number of cores the
    process may use, which changes with a requeued job, a resized container or taskset (issue 13), and a run
    resumed on another count drifts away from the straight run in the last bits. OMP_NUM_THREADS or
    MKL_NUM_THREADS, when set, win. Returns the line to print when the count differs, else None."""
    now = torch.get_num_threads()
    if not saved or saved == now:
        return None
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return (f"resume: CPU threads {saved} -> {now} (OMP_NUM_THREADS): the run goes on within float "
                f"rounding, not bit for bit")
    torch.set_num_threads(saved)
    return (f"resume: CPU threads {saved}, as the checkpoint's run (this machine's default: {now}), so that "
            f"sums round as before; OMP_NUM_THREADS=N chooses")
