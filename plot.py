"""Loss curves of slowllama runs, drawn from their metrics.jsonl files.

python plot.py RUN [RUN ...] [--out FILE.png]
draws each run's training loss (raw, faint, and smoothed) and validation loss against the step, in one
picture, and says where it wrote it (default: loss_comparison.png in the current folder). RUN is a run
folder (finetune.py's out_path) or its metrics.jsonl. finetune.py draws out_path/loss.png the same way,
at each evaluation and at the end.
"""
import argparse
import json
from pathlib import Path

from utils import UserError, main_guard

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def metrics_file(run):
    run = Path(run)
    return run if run.suffix == ".jsonl" else run / "metrics.jsonl"


def read_metrics(path):
    """The records of a metrics.jsonl file, in order; a torn last line (a killed run) is left out."""
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def smooth(values, window):
    """Each value's moving mean over the window centred on it: no lag behind a falling curve. At the
    start the window narrows (the first point is the first value); at the end it is cut (the last point
    is the mean of the last window // 2 + 1 values)."""
    half = window // 2
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    out = []
    for i in range(len(values)):
        h = min(half, i)
        lo, hi = i - h, min(len(values), i + h + 1)
        out.append((sums[hi] - sums[lo]) / (hi - lo))
    return out


def smoothing_window(n):
    """About a twentieth of the steps, odd, at most 51."""
    return min(51, max(1, n // 20) | 1)


def describe(records):
    """A line of the run's settings from its latest "run" record: model, mode, optimizer, lr, tokens."""
    runs = [r for r in records if r.get("kind") == "run"]
    if not runs:
        return ""
    r = runs[-1]
    parts = [r.get("model", "?"), f"mode={r.get('mode')}"]
    if r.get("mode") == "lora":
        parts.append(f"rank {r.get('lora_rank')} on {r.get('lora_targets')}")
    parts += [f"{r.get('optimizer')} lr {r.get('lr'):g}" if isinstance(r.get("lr"), (int, float)) else "",
              f"{r.get('batch_size')}x{r.get('seq_len')}" + (f"x{r['grad_accum']}" if r.get("grad_accum", 1) > 1 else "")
              + " tokens/step", f"clip {r['grad_clip']:g}" if r.get("grad_clip") else "",
              str(r.get("compute_dtype", "")), f"{r.get('iters')} steps"]
    return " · ".join(p for p in parts if p)


def draw(runs, png, title=None):
    """runs: [(label, records)]. Training loss (raw and smoothed) and validation loss against step, one
    colour per run, written to png with matplotlib's headless Agg backend. Returns png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    any_data = False
    for i, (label, records) in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        prefix = f"{label}: " if len(runs) > 1 else ""
        train = [r for r in records if r.get("kind") == "train" and isinstance(r.get("loss"), (int, float))]
        evals = [r for r in records if r.get("kind") == "eval" and isinstance(r.get("val_loss"), (int, float))]
        if train:
            steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
            window = smoothing_window(len(losses))
            smoothed = smooth(losses, window)
            ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8,
                    label=f"{prefix}train loss" if window > 1 else None)
            ax.plot(steps, smoothed, color=color, linewidth=2,
                    label=f"{prefix}train loss{f', mean of {window} steps' if window > 1 else ''} "
                          f"(last {smoothed[-1]:.3f})")
            any_data = True
        for r in records:  # where a run was resumed: a faint line
            if r.get("kind") == "run" and r.get("resumed"):
                ax.axvline(r["step"], color=color, alpha=0.35, linestyle=":", linewidth=1)
                ax.annotate("resumed", (r["step"], 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                            textcoords="offset points", fontsize=8, color="gray")
        if evals:
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], linestyle="--",
                    color=color if len(runs) > 1 else COLORS[1],
                    marker="o", markersize=5, linewidth=1.2, label=f"{prefix}val loss (last {evals[-1]['val_loss']:.3f})")
            any_data = True
    if not any_data:
        ax.text(0.5, 0.5, "no steps yet", transform=ax.transAxes, ha="center", va="center", color="gray")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss (cross-entropy, nats per token)")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.01)
    if any_data:
        ax.legend(loc="best", fontsize=9, framealpha=0.85)
    if title is None:
        title = runs[0][0] if len(runs) == 1 else f"{len(runs)} runs"
        details = describe(runs[0][1]) if len(runs) == 1 else ""
        title = f"{title}\n{details}" if details else title
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    png = Path(png)
    tmp = png.with_name(f".{png.name}.tmp.png")  # a viewer never sees a half-written picture
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)
    return png


def draw_run(out_path, png=None, label=None):
    """out_path/loss.png (or png) of one run folder; the title names the run (label: its folder's
    name), the model, mode and settings."""
    out_path = Path(out_path)
    return draw([(label or out_path.name, read_metrics(metrics_file(out_path)))], png or out_path / "loss.png")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders (out_path) or metrics.jsonl files")
    p.add_argument("--out", default="loss_comparison.png", help="the PNG to write (default: %(default)s)")
    p.add_argument("--debug", default="0", help=argparse.SUPPRESS)
    a = p.parse_args()
    runs = []
    for run in a.runs:
        records = read_metrics(metrics_file(run))
        if not records:
            raise UserError(f"{metrics_file(run)}: no metrics (is {run} a finetune.py out_path?)")
        path = Path(run).resolve()
        runs.append((path.parent.name if path.suffix == ".jsonl" else path.name, records))
    names = [label for label, _ in runs]
    if len(set(names)) < len(names):  # same folder names: tell them apart by their paths
        runs = [(str(Path(run)), records) for run, (_, records) in zip(a.runs, runs)]
    title = None
    if len(runs) > 1:
        details = {describe(records) for _, records in runs}
        title = f"{len(runs)} runs" + (f"\n{details.pop()}" if len(details) == 1 and "" not in details else "")
    png = draw(runs, a.out, title)
    print(f"wrote {png.resolve()}")


if __name__ == "__main__":
    main_guard(main)
