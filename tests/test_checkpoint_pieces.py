"""Models larger than one device (issue 28): every layout builds the model on the meta device and makes only
its own pieces, with the weights one process would start from; FSDP, TP and PP checkpoint in pieces (each
process writes its share), and those checkpoints are refused when damaged, pruned with the checkpoints that
name them, and read by every script that reads a checkpoint."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_MODEL_FLAGS
from checkpoints import PIECES_DIR, load_checkpoint
from model import GPT, GPTConfig
from test_distributed import run_train

pytestmark = pytest.mark.slow

LAYOUTS = {"one process": (1, []), "fsdp2": (2, ["--fsdp"]), "tp2": (2, ["--tp=2"]), "pp2": (2, ["--pp=2"])}


def tiny_config() -> GPTConfig:
    """The GPTConfig of TINY_MODEL_FLAGS, as train.py parses them."""
    from flags import parse_args
    from train import TrainConfig
    return parse_args(TrainConfig, GPTConfig, argv=TINY_MODEL_FLAGS)[1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_starts_from_the_weights_one_process_builds_from_the_seed(layout, tiny_data_dir, tmp_path):
    """The checkpoint of step 0 (before any update) under each layout holds, bit for bit, the weights of
    torch.manual_seed(seed) then GPT(config) built whole in the ordinary way on one process: the pieces each
    process made alone (model.initial_value, one generator per tensor) are the whole model's."""
    nproc, flags = LAYOUTS[layout]
    run_train(str(tmp_path), tiny_data_dir, nproc, "--max_iters=0", "--seed=7", *flags)
    saved = load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))
    torch.manual_seed(7)
    reference = GPT(tiny_config()).state_dict()
    assert saved["model"].keys() == reference.keys()
    for name, t in reference.items():
        assert torch.equal(saved["model"][name], t), name
    index = torch.load(os.path.join(tmp_path, "ckpt.pt"), weights_only=True)
    assert ("pieces" in index) == (nproc > 1) and ("model" in index) == (nproc == 1)


@pytest.fixture(scope="module")
def fsdp_run(tiny_data_dir, tmp_path_factory) -> str:
    """4 steps under FSDP(2), evaluated and saved every 2, keeping the last checkpoint and the best."""
    out_dir = str(tmp_path_factory.mktemp("fsdp"))
    run_train(out_dir, tiny_data_dir, 2, "--fsdp", "--max_iters=4", "--eval_interval=2", "--keep_last=1")
    return out_dir


def test_each_process_writes_its_share_and_unnamed_pieces_are_pruned(fsdp_run):
    """ckpt.pt is an index without tensors; its two piece files (one per process) hold the weights' and AdamW
    moments' bytes between them, each about half; the pieces of the checkpoints let go (step 0 and 2's, unless kept as
    the best) are deleted, and every piece file left is named by a checkpoint."""
    index = torch.load(os.path.join(fsdp_run, "ckpt.pt"), weights_only=True)
    assert "model" not in index and set(index["optimizer"]) == {"param_groups"}
    sizes = [os.path.getsize(os.path.join(fsdp_run, PIECES_DIR, f)) for f in index["pieces"]["files"]]
    whole = load_checkpoint(os.path.join(fsdp_run, "ckpt.pt"))
    tensor_bytes = sum(t.nbytes for name, t in whole["model"].items() if name != "lm_head.weight") + \
        sum(t.nbytes for state in whole["optimizer"]["state"].values() for t in state.values())
    assert len(sizes) == 2 and sum(sizes) == tensor_bytes and all(0.4 < size / tensor_bytes < 0.6 for size in sizes)
    named = set()
    for name in os.listdir(fsdp_run):
        if name.startswith("ckpt"):
            named |= set(torch.load(os.path.join(fsdp_run, name), weights_only=True)["pieces"]["files"])
    assert set(os.listdir(os.path.join(fsdp_run, PIECES_DIR))) == named


def test_scripts_read_a_checkpoint_in_pieces(fsdp_run, tmp_path):
    """generate.py samples from it and hf_gpt2.py exports it, each put together a tensor at a time; the export
    holds the checkpoint's weights."""
    sample = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), f"--out_dir={fsdp_run}",
                             "--max_new_tokens=4", "--prompt=A#B"], capture_output=True, text=True, timeout=120)
    assert sample.returncode == 0, sample.stderr[-2000:]
    export = subprocess.run([sys.executable, os.path.join(ROOT, "hf_gpt2.py"),
                             f"--checkpoint={os.path.join(fsdp_run, 'ckpt.pt')}", f"--out={tmp_path / 'hf'}"],
                            capture_output=True, text=True, timeout=120)
    assert export.returncode == 0, export.stderr[-2000:]
    from gpt2_weights import load_hf_gpt2
    exported = load_hf_gpt2(str(tmp_path / "hf")).state_dict()
    for name, t in load_checkpoint(os.path.join(fsdp_run, "ckpt.pt"))["model"].items():
        assert torch.equal(exported[name], t), name


@pytest.mark.parametrize("damage", ["flipped byte", "missing file"])
def test_a_damaged_piece_is_refused_in_one_line(damage, fsdp_run, tmp_path):
    """A piece file with one byte changed, or gone, makes its checkpoint refused (its sha256, recorded in the
    index when it was written, no longer matches), by load_checkpoint and by a resumed train.py, in one line."""
    import shutil
    run = str(tmp_path / "run")
    shutil.copytree(fsdp_run, run)
    index = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)
    piece = os.path.join(run, PIECES_DIR, sorted(index["pieces"]["files"])[0])
    if damage == "missing file":
        os.remove(piece)
    else:
        with open(piece, "r+b") as f:
            f.seek(os.path.getsize(piece) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(SystemExit, match="is damaged: its piece"):
        load_checkpoint(os.path.join(run, "ckpt.pt"))
    resumed = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={run}",
                              "--init_from=resume", "--max_iters=6"], capture_output=True, text=True, timeout=120)
    lines = resumed.stderr.strip().splitlines()
    assert resumed.returncode == 1 and len(lines) == 1 and "is damaged" in lines[0], resumed.stderr[-2000:]


def test_a_piece_that_cannot_be_written_stops_every_process_with_one_line(tiny_data_dir, tmp_path):
    """Under FSDP(2), out_dir/pieces is a file, so neither process can write its piece: both stop, and the
    reason is printed once (by rank 0), not once per process; no ckpt.pt is written."""
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / PIECES_DIR).write_text("not a folder")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    result = subprocess.run([*launcher, os.path.join(ROOT, "train.py"), f"--data_dir={tiny_data_dir}",
                             "--dataset=tiny", f"--out_dir={out_dir}", *TINY_MODEL_FLAGS, "--fsdp", "--max_iters=2",
                             "--dtype=float32"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in result.stderr.splitlines() if "error: cannot make" in line]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: cannot make") and not (out_dir / "ckpt.pt").exists()
