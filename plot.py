"""Plot the loss against tokens seen for one or more runs, from their metrics.jsonl logs, into a PNG.

    python plot.py --runs=out --out=loss.png
    python plot.py --runs=out-small,out-large --out=compare.png      # runs side by side, one colour each

Each run gets one colour: a thin line for the training loss of the logged steps, dots joined by a line for
the validation loss of the evaluations. Needs matplotlib (requirements-extra.txt).
"""
import io
import json
import os
import sys
from dataclasses import dataclass

from checkpoints import write_atomically
from flags import parse_args
from model import arg


@dataclass
class PlotConfig:
    runs: str = arg("out", "comma-separated run directories (or metrics.jsonl files) to draw")
    out: str = arg("loss.png", "PNG file to write")
    x: str = arg("tokens", "horizontal axis: tokens seen or optimizer steps", choices=("tokens", "step"))
    title: str = arg("", "title above the plot (default: none)")


def read_metrics(run: str) -> list[dict]:
    """The records of a run's metrics.jsonl (run: its directory or the file itself)."""
    path = run if run.endswith(".jsonl") else os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        sys.exit(f"error: {path} not found; give run directories that train.py wrote (they hold metrics.jsonl)")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                sys.exit(f"error: {path} line {number} is not JSON; is it a metrics.jsonl?")
    return records


def loss_curves(records: list[dict], x: str) -> dict[str, tuple[list, list]]:
    """{'train': (xs, losses), 'val': (xs, losses)} sorted by x. Training losses come from the logged steps
    ('loss'), validation losses from the evaluations ('val_loss'). A resumed run logs its evaluation step
    twice; the later record wins."""
    curves = {}
    for split, key in (("train", "loss"), ("val", "val_loss")):
        points = dict(sorted({r[x]: r[key] for r in records if r.get(key) is not None and x in r}.items()))
        curves[split] = (list(points), list(points.values()))
    return curves


def main(argv: list[str] | None = None) -> None:
    (cfg,) = parse_args(PlotConfig, argv=argv)
    runs = [run.strip() for run in cfg.runs.split(",") if run.strip()]
    if not runs:
        sys.exit("error: --runs is empty; give one or more run directories")
    curves = {run: loss_curves(read_metrics(run), cfg.x) for run in runs}
    try:
        import matplotlib
        matplotlib.use("Agg")              # files only: no display needed
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        sys.exit("error: plot.py needs matplotlib; `pip install matplotlib` (or -r requirements-extra.txt)")

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    for i, (run, run_curves) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        label = os.path.basename(os.path.dirname(run) if run.endswith(".jsonl") else os.path.normpath(run))
        axes.plot(*run_curves["train"], color=colour, linewidth=0.8, alpha=0.6, label=f"{label} train")
        axes.plot(*run_curves["val"], color=colour, linewidth=1.8, marker="o", markersize=4, label=f"{label} val")
    axes.set_xlabel("tokens seen" if cfg.x == "tokens" else "optimizer step")
    axes.set_ylabel("cross-entropy loss (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend()
    if cfg.title:
        axes.set_title(cfg.title)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png")
    plt.close(figure)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    write_atomically(cfg.out, lambda f: f.write(image.getvalue()))
    print(f"wrote {cfg.out} ({len(image.getvalue()) / 1024:.0f} KiB): {', '.join(runs)}")


if __name__ == "__main__":
    main()
