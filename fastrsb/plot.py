"""`fastrsb plot RUN_DIR [RUN_DIR ...]`: loss, accuracy, learning rate and throughput curves (and for
one run each epoch's peak memory, where its rows hold it) from metrics.jsonl in one PNG; given
several runs, each run's curves in a colour of its own, panel by panel, to compare them; a run of
timm's train.py among them (its summary.csv), to compare the two tools on one recipe. Drawn with
matplotlib where it is installed (pip install "fastrsb[plot]": real axes, ticks and legends), else
with a small Pillow fallback (Pillow comes with torchvision), so plotting never needs an extra
package."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from fastrsb.errors import UserError
from fastrsb.metrics_log import read_rows
from fastrsb.timm_run import summary_rows, train_arguments, validates_ema

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]
PANEL_W, PANEL_H, MARGIN = 560, 300, 56
# A panel's y axis: logarithmic, linear over the values' range, or linear from 0 (a memory figure:
# its range alone would blow a change of a few MB up to the panel's height).
LOG, LINEAR, FROM_ZERO = "log", "linear", "linear from 0"


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(log rows, epoch rows) of a run folder, or of timm's train.py's output folder (fastrsb.timm_run)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        if (run_dir / "summary.csv").is_file():
            logs, epochs = summary_rows(run_dir / "summary.csv")
            if validates_ema(train_arguments(run_dir) or {}):  # its figures are its EMA's: drawn as such
                epochs = [{**r, "top1": None, "top5": None, "val_loss": None, "ema_top1": r["top1"],
                           "ema_top5": r["top5"], "ema_val_loss": r["val_loss"]} for r in epochs]
            return logs, epochs
        raise UserError(f"{run_dir} holds no metrics.jsonl (is it a fastrsb run folder?) nor summary.csv (timm's)")
    rows = read_rows(path)
    logs = [r for r in rows if r.get("kind") == "log"]
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    if not logs and not epochs:
        raise UserError(f"{path} has no rows yet: the run has not reached its first log step")
    return logs, epochs


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    return [low + (high - low) * i / count for i in range(count + 1)]


def _panel(draw: ImageDraw.ImageDraw, left: int, top: int, title: str,
           series: list[tuple[str, list[float], list[float]]], font, y_axis: str = LINEAR) -> None:
    log_y = y_axis == LOG
    x0, y0, x1, y1 = left + MARGIN, top + 28, left + PANEL_W - 12, top + PANEL_H - 30
    draw.text((left + MARGIN, top + 6), title, fill="black", font=font)
    draw.rectangle((x0, y0, x1, y1), outline="#888888")
    points = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if y is not None and math.isfinite(y)
              and (y > 0 or not log_y)]
    if not points:
        draw.text((x0 + 10, y0 + 10), "no data", fill="#888888", font=font)
        return
    scale = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xmin, xmax = min(p[0] for p in points), max(p[0] for p in points)
    ymin, ymax = min(scale(p[1]) for p in points), max(scale(p[1]) for p in points)
    ymin, ymax = (min(ymin, 0.0), 1.1 * ymax) if y_axis == FROM_ZERO else (ymin, ymax)
    xmax, ymax = (xmax if xmax > xmin else xmin + 1), (ymax if ymax > ymin else ymin + abs(ymin) * 0.1 + 1e-9)

    def to_pixel(x, y):
        return (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (scale(y) - ymin) / (ymax - ymin) * (y1 - y0))

    for value in _ticks(ymin, ymax):
        y = y1 - (value - ymin) / (ymax - ymin) * (y1 - y0)
        draw.line((x0, y, x1, y), fill="#eeeeee")
        shown = 10 ** value if log_y else value
        draw.text((left + 2, y - 6), f"{shown:.3g}", fill="black", font=font)
    for value in _ticks(xmin, xmax):
        x = x0 + (value - xmin) / (xmax - xmin) * (x1 - x0)
        draw.text((x - 8, y1 + 4), f"{value:.3g}", fill="black", font=font)
    draw.text((x1 - 34, y1 + 16), "epoch", fill="#555555", font=font)
    for index, (name, xs, ys) in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        line = [to_pixel(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line if len(line) < 40 else []:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((x0 + 8 + 110 * index, y0 + 4), name, fill=colour, font=font)


Series = list[tuple[str, list[float], list[float]]]


def panels(logs: list[dict], epochs: list[dict]) -> list[tuple[str, Series, str]]:
    """What is drawn, whatever draws it: (title, [(name, x, y)], its y axis: LOG, LINEAR, FROM_ZERO)."""
    lx = [r["epoch"] for r in logs]
    ex = [r["epoch"] for r in epochs]
    waits = [None if r["data_wait"] is None else 100 * r["data_wait"] for r in logs]  # timm's: not measured
    accuracy = [("top-1", ex, [r["top1"] for r in epochs]), ("top-5", ex, [r["top5"] for r in epochs])]
    losses = [("train (log steps)", lx, [r["loss"] for r in logs]),
              ("train (epoch mean)", ex, [r["train_loss"] for r in epochs]),
              ("val (cross-entropy)", ex, [r["val_loss"] for r in epochs])]
    if any("ema_top1" in r for r in epochs):
        accuracy.append(("EMA top-1", ex, [r.get("ema_top1") for r in epochs]))
        losses.append(("EMA val", ex, [r.get("ema_val_loss") for r in epochs]))
    drawn = [("loss", losses, LOG),
             ("validation accuracy (%)", accuracy, LINEAR),
             ("learning rate", [("lr", lx, [r["lr"] for r in logs])], LINEAR),
             (f"images/s per process{_crop_sizes(epochs)}", [("images/s", lx, [r["images_per_sec"] for r in logs])],
              LINEAR),
             ("share of step time waiting for data (%)", [("data wait", lx, waits)], LINEAR)]
    memory = [(name, ex, [r.get(key) for r in epochs]) for name, key in
              (("process", "peak_memory_gib"), ("torch's tensors", "peak_torch_gib"))  # fastrsb.peak_memory's
              if any(r.get(key) for r in epochs)]  # the CPU's rows: the process's alone
    if memory:
        drawn.append(("peak memory per epoch (GiB)", memory, FROM_ZERO))
    return drawn


def _crop_sizes(epochs: list[dict]) -> str:
    """A progressive-resizing run's crop sizes and the epochs they start at, for the images/s
    panel's title, whose figures move with them: ' (32/48/64 px from epochs 1/5/8)'; '' at one size."""
    changes = [(r["epoch"], r["img_size"]) for k, r in enumerate(epochs)
               if r.get("img_size") is not None and (k == 0 or epochs[k - 1].get("img_size") != r["img_size"])]
    if len(changes) < 2:
        return ""
    return (f" ({'/'.join(str(size) for _, size in changes)} px from epochs "
            f"{'/'.join(str(epoch) for epoch, _ in changes)})")


def compared_panels(runs: list[tuple[str, list[dict], list[dict]]]) -> list[tuple[str, Series, str]]:
    """Several runs' panels: one quantity a panel, one series (one colour) a run, in run order."""
    def each(kind: str, key: str, scale: float = 1.0) -> Series:
        series = []
        for name, logs, epochs in runs:
            rows = logs if kind == "log" else epochs
            # A run that keeps an EMA is judged by it (its best.pt, timm's summary.csv): its validation is the EMA's.
            ema = kind == "epoch" and any("ema_top1" in r for r in rows)
            field = f"ema_{key}" if ema else key
            series.append((f"{name} (EMA)" if ema else name, [r["epoch"] for r in rows],
                           [None if r.get(field) is None else scale * r[field] for r in rows]))
        return series
    return [("train loss (log steps)", each("log", "loss"), LOG),
            ("validation loss (cross-entropy)", each("epoch", "val_loss"), LOG),
            ("validation top-1 (%)", each("epoch", "top1"), LINEAR),
            ("learning rate", each("log", "lr"), LINEAR),
            ("images/s per process", each("log", "images_per_sec"), LINEAR),
            ("share of step time waiting for data (%)", each("log", "data_wait", 100.0), LINEAR)]


def _draw_pillow(specs, out: Path) -> None:
    image = Image.new("RGB", (3 * PANEL_W, 2 * PANEL_H), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for index, (title, series, y_axis) in enumerate(specs):
        _panel(draw, PANEL_W * (index % 3), PANEL_H * (index // 3), title, series, font, y_axis=y_axis)
    image.save(out)


def _draw_matplotlib(specs, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(2, 3, figsize=(16.8, 6.0), dpi=100)
    for axis, (title, series, y_axis) in zip(axes.flat, specs):
        drawn, log_y = False, y_axis == LOG
        for index, (name, xs, ys) in enumerate(series):
            points = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
            if points:
                axis.plot(*zip(*points), label=name, color=COLOURS[index % len(COLOURS)],
                          marker="o" if len(points) < 40 else None, markersize=3)
                drawn = True
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("epoch")
        axis.set_yscale("log" if log_y else "linear")
        if y_axis == FROM_ZERO and drawn:
            axis.set_ylim(0, 1.1 * max(y for _, _, ys in series for y in ys if y is not None))
        axis.grid(alpha=0.3)
        if drawn:  # a panel of what a run did not measure (timm's images/s) stays empty
            axis.legend(fontsize=8)
    for axis in axes.flat[len(specs):]:  # a run without memory figures (timm's, older ones): five panels
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)


def plot_run(run_dir: str | Path, out: str | Path | None = None, backend: str = "auto") -> Path:
    """Write RUN_DIR/curves.png (or `out`); returns its path. backend: matplotlib, pillow, or auto
    (matplotlib where it is installed)."""
    run_dir = Path(run_dir)
    logs, epochs = read_metrics(run_dir)
    out = _output(out, run_dir / "curves.png")
    _draw(panels(logs, epochs), out, backend)
    return out


def plot_runs(run_dirs: list[str | Path], out: str | Path | None = None, backend: str = "auto") -> Path:
    """Several runs compared in one PNG, `out` or curves-A-B.png here (A, B: the folders' names);
    each run is named by its folder (by its path where two folders share a name)."""
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    names = [run_dir.name for run_dir in run_dirs]
    if len(set(names)) < len(names):
        names = [str(run_dir) for run_dir in run_dirs]
    runs = [(name, *read_metrics(run_dir)) for name, run_dir in zip(names, run_dirs)]
    out = _output(out, Path(f"curves-{'-'.join(run_dir.name for run_dir in run_dirs)}.png"))
    _draw(compared_panels(runs), out, backend)
    return out


def _output(out: str | Path | None, default: Path) -> Path:
    """Where the PNG goes: `out` (a folder: the default name inside it; its folders made), or the
    default. Any other name than a .png's is refused before anything is written: -o last.pt would
    have met the drawing library's error, and a name without a suffix would have held a PNG."""
    if out is None:
        return default
    out = Path(out)
    if out.is_dir():
        return out / default.name
    if out.suffix.lower() != ".png":
        raise UserError(f"-o {out}: the curves are written as a PNG: name a .png file (or a folder)")
    return out


def _draw(specs, out: Path, backend: str) -> None:
    if backend == "auto":
        backend = "matplotlib" if importlib.util.find_spec("matplotlib") else "pillow"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        (_draw_matplotlib if backend == "matplotlib" else _draw_pillow)(specs, out)
    except OSError as err:  # a folder we may not write, a full disk: said in one line
        raise UserError(f"could not write {out}: {err.strerror or err}") from None
