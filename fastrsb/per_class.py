"""`fastrsb eval --per-class CSV`: each class's images, top-1 and top-5, for finding the classes a
model gets wrong (a mislabelled or broken class folder in one's own data set shows as a class near
0%). The counts are evaluate's (fastrsb.train), summed on the device beside the totals; the rows are
checkpoint_eval.per_class_rows'."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from fastrsb.errors import UserError
from fastrsb.metrics_log import replace_text

COLUMNS = ("checkpoint", "ema", "img_size", "crop_pct", "index", "class", "words", "images", "top1", "top5")


def check_writable(path: Path) -> None:
    """Refuse a path the CSV cannot be written to, before any evaluation runs."""
    if path.is_dir():
        raise UserError(f"--per-class {path} is a folder: give a file name (per_class.csv)")
    if not path.parent.is_dir():
        raise UserError(f"--per-class {path}: its folder {path.parent} does not exist")


def lowest(rows: list[dict], count: int = 5) -> str:
    """The classes of the lowest top-1 (the first of equals by index), as words for a line."""
    worst = sorted(rows, key=lambda row: (row["top1"], row["index"]))[:count]
    return "; ".join(f"{row['class']}{' (' + row['words'].split(',')[0] + ')' if row['words'] else ''} "
                     f"{row['top1']:.2f} of {row['images']}" for row in worst)


def write_csv(path: Path, results: list[dict]) -> None:
    """Every result's classes, a row each, written whole (a kill leaves no half file)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, lineterminator="\n")
    writer.writeheader()
    for result in results:
        for row in result["per_class"]:
            writer.writerow({"checkpoint": result["checkpoint"], "ema": result["ema"], "img_size": result["img_size"],
                             "crop_pct": result["crop_pct"], **row})
    replace_text(path, text.getvalue())
