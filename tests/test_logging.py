"""Experiment logging: --tensorboard and --wandb_project stream what metrics.jsonl holds; plot.py draws it."""
import glob
import io
import json
import os

import pytest
import torch

import flags
import processes
import train
from conftest import TINY_MODEL_FLAGS, import_extra, run_script


def run_tiny(data_dir: str, out_dir: str, *flags: str, env: dict | None = None):
    return run_script("train.py", f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out_dir}",
                      *TINY_MODEL_FLAGS, "--batch_size=4", "--max_iters=20", "--eval_interval=10",
                      "--eval_iters=2", "--log_interval=5", *flags, env=env)


def read_metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tensorboard_event_file_holds_the_metrics_jsonl_numbers(tiny_data_dir, tmp_path):
    import_extra("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path / "out")
    result = run_tiny(tiny_data_dir, out, "--tensorboard")
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    records = read_metrics(out)
    for name in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "train_loss"):
        expected = [(r["step"], r[name]) for r in records if name in r]
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        assert [step for step, _ in logged] == [step for step, _ in expected], name
        for (_, value), (_, reference) in zip(logged, expected):
            assert value == pytest.approx(reference, rel=1e-6), name      # TensorBoard stores float32
    assert [step for step, _ in ((e.step, e.value) for e in events.Scalars("val_loss"))] == [0, 10, 20]


def test_wandb_offline_run_records_the_metrics(tiny_data_dir, tmp_path):
    """WANDB_MODE=offline writes the run to out_dir/wandb/offline-run-*/run-*.wandb (protobuf records whose
    values are JSON text; wandb ships no reader for it, so the test looks for the names and values)."""
    import_extra("wandb")
    out = str(tmp_path / "out")
    result = run_tiny(tiny_data_dir, out, "--wandb_project=tiny-test", "--wandb_run_name=tiny-run",
                      env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr
    files = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1
    with open(files[0], "rb") as f:
        stored = f.read()
    records = read_metrics(out)
    assert b"tiny-test" in stored and b"tiny-run" in stored
    for name in ("loss", "lr", "grad_norm", "tokens_per_s", "train_loss", "val_loss"):
        assert name.encode() in stored, name
    for record in records:
        if "val_loss" in record:
            assert repr(record["val_loss"]).encode() in stored
    assert repr([r for r in records if "loss" in r][-1]["loss"]).encode() in stored


@pytest.mark.parametrize("flag", ["--wandb_project=x", "--tensorboard"])
def test_a_missing_logging_package_is_one_line(monkeypatch, flag):
    monkeypatch.setattr(flags.importlib.util, "find_spec", lambda name: None)
    cfg, _ = flags.parse_args(train.TrainConfig, train.GPTConfig, argv=[flag])
    with pytest.raises(SystemExit, match=f"error: {flag.split('=')[0]} needs the package"):
        flags.check_run_config(cfg, flags.RUN_MINIMUMS)


def test_plot_renders_a_png_of_two_runs(tmp_path):
    import_extra("matplotlib")
    runs = []
    for name, scale in (("run-a", 1.0), ("run-b", 0.9)):
        folder = tmp_path / name
        folder.mkdir()
        lines = [{"step": s, "tokens": 100 * s, "loss": scale * 10 / (1 + s)} for s in range(1, 30)]
        lines += [{"step": s, "tokens": 100 * s, "train_loss": scale * 9 / (1 + s), "val_loss": scale * 11 / (1 + s)}
                  for s in (0, 10, 20)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        runs.append(str(folder))
    png = tmp_path / "loss.png"
    result = run_script("plot.py", f"--runs={runs[0]},{runs[1]}/metrics.jsonl", f"--out={png}")
    assert result.returncode == 0, result.stderr
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread
    pixels = imread(str(png))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels[..., :3].std() > 0.05          # something was drawn, not a blank canvas


def test_plot_draws_the_title_it_is_given(tmp_path, monkeypatch):
    """--title is drawn above the plot: the figure plot.py saves as PNG, also drawn as SVG with its text kept as
    text, holds the title's words; the same run without --title holds none of them."""
    matplotlib = import_extra("matplotlib")
    from matplotlib.figure import Figure
    import plot
    (tmp_path / "run").mkdir()
    lines = [{"step": s, "tokens": 100 * s, "loss": 10 / (1 + s)} for s in range(1, 30)]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    svgs, save = [], Figure.savefig

    def save_also_as_svg(figure, *args, **kwargs):
        svg = io.StringIO()
        with matplotlib.rc_context({"svg.fonttype": "none"}):    # text as <text>, not as glyph outlines
            save(figure, svg, format="svg")
        svgs.append(svg.getvalue())
        return save(figure, *args, **kwargs)
    monkeypatch.setattr(Figure, "savefig", save_also_as_svg)
    title = "Quick start: 600 steps on the Shakespeare sample"
    plot.main([f"--runs={tmp_path / 'run'}", f"--out={tmp_path / 'titled.png'}", f"--title={title}"])
    plot.main([f"--runs={tmp_path / 'run'}", f"--out={tmp_path / 'plain.png'}"])
    assert len(svgs) == 2
    assert f">{title}</text>" in svgs[0]
    assert "Shakespeare" not in svgs[1]
    assert (tmp_path / "titled.png").read_bytes() != (tmp_path / "plain.png").read_bytes()


def test_plot_refuses_a_missing_log(tmp_path):
    result = run_script("plot.py", f"--runs={tmp_path}", f"--out={tmp_path / 'x.png'}")
    assert result.returncode != 0 and "metrics.jsonl" in result.stderr and "Traceback" not in result.stderr


def test_plot_x_step_draws_the_losses_against_the_step(tmp_path, monkeypatch):
    """--x=step puts the optimizer step on the horizontal axis, --x=tokens (the default) the tokens seen, read
    off the figure's lines as plot.py saves it. The log is a resumed run's: 64 tokens per step up to step 10,
    then 128 (so the two axes are not proportional), and step 10's evaluation logged twice (the later wins)."""
    pytest.importorskip("matplotlib")
    import matplotlib.figure
    import plot
    tokens = {s: 64 * s if s <= 10 else 640 + 128 * (s - 10) for s in range(21)}
    lines = [{"step": s, "tokens": tokens[s], "loss": 5 - 0.1 * s} for s in range(1, 21)]
    lines += [{"step": s, "tokens": tokens[s], "val_loss": v}
              for s, v in ((0, 6.0), (10, 5.5), (10, 5.25), (20, 4.5))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    saved = []
    savefig = matplotlib.figure.Figure.savefig

    def keep_lines(figure, *args, **kwargs):
        (axes,) = figure.axes
        drawn = [(list(line.get_xdata()), list(line.get_ydata())) for line in axes.lines]
        saved.append((axes.get_xlabel(), drawn))
        return savefig(figure, *args, **kwargs)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep_lines)
    for x in ("step", "tokens"):
        plot.main([f"--runs={tmp_path}", f"--out={tmp_path / f'{x}.png'}", f"--x={x}"])
    steps = list(range(1, 21))
    train_losses = [5 - 0.1 * s for s in steps]
    assert saved[0] == ("optimizer step", [(steps, train_losses), ([0, 10, 20], [6.0, 5.25, 4.5])])
    assert saved[1] == ("tokens seen", [([tokens[s] for s in steps], train_losses),
                                        ([0, 640, 1920], [6.0, 5.25, 4.5])])


@pytest.mark.parametrize("device_name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA A10", 125e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12), ("Tesla V100-SXM2-16GB", 125e12),
    # Names that contain a listed one without being it: no MFU rather than a wrong one.
    ("NVIDIA L40", None), ("NVIDIA RTX A1000", None), ("NVIDIA A10G", None), ("NVIDIA GH200 480GB", None),
    ("Tesla T4", None)])
def test_peak_flops_matches_whole_gpu_names(monkeypatch, device_name, peak):
    """The MFU's denominator comes from the GPU's model, matched by whole words of the name CUDA reports
    (torch.cuda.get_device_name): 'NVIDIA L40' is not an L4 (which would overstate its MFU 1.5x)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    assert processes.peak_flops("cuda") == peak
    assert processes.peak_flops("cuda", world_size=8) == (8 * peak if peak else None)


def test_one_process_on_cuda_n_makes_gpu_n_current(monkeypatch):
    """--device=cuda:1 without torchrun: GPU 1 becomes the current device, so what torch.cuda reads without a
    device (bf16 support, pinned memory, memory statistics) is about GPU 1, not GPU 0."""
    monkeypatch.delenv("RANK", raising=False)
    current = []
    monkeypatch.setattr(processes, "pick_device", lambda requested: requested)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert processes.setup_distributed("cuda:1") == (0, 0, 1, "cuda:1") and current == ["cuda:1"]
    assert processes.setup_distributed("cpu") == (0, 0, 1, "cpu") and current == ["cuda:1"]
