"""`fastrsb eval --per-class CSV`: each class's images, top-1 and top-5, for finding the classes a
model gets wrong (a mislabelled or broken class folder in one's own data set shows as a class near
0%). The counts are evaluate's (fastrsb.train), summed on the device beside the totals."""
from __future__ import annotations

from pathlib import Path

from fastrsb.class_order import imagenet_descriptions, with_words
from fastrsb.metrics_log import write_table

COLUMNS = ("checkpoint", "ema", "img_size", "crop_pct", "index", "class", "words", "images", "top1", "top5")


def class_rows(counts: list[list[int]], classes: list[str], descriptions: dict | None = None) -> list[dict]:
    """evaluate's per-class counts (by output index: images, top-1 hits, top-5 hits) as a row for
    each class that has images: its index among the outputs evaluated (with --partial-classes only,
    among the folder's classes), its name (the class folder's), its words (DESCRIPTIONS, a model
    folder's; else ImageNet's where the classes are its wnids), its images, top-1 and top-5 (%)."""
    words = descriptions or imagenet_descriptions(classes) or {}
    return [{"index": index, "class": classes[index], "words": words.get(classes[index], ""), "images": images,
             "top1": 100.0 * top1 / images, "top5": 100.0 * top5 / images}
            for index, (images, top1, top5) in enumerate(counts) if images]


def lowest(rows: list[dict], count: int = 5) -> str:
    """The classes of the lowest top-1 (the first of equals by index), as words for a line."""
    worst = sorted(rows, key=lambda row: (row["top1"], row["index"]))[:count]
    return "; ".join(f"{with_words(row['class'], row['words'])} {row['top1']:.2f} of {row['images']}" for row in worst)


def write_csv(path: Path, results: list[dict]) -> None:
    """Every result's classes, a row each, written whole (a kill leaves no half file)."""
    write_table(path, COLUMNS, ({"checkpoint": result["checkpoint"], "ema": result["ema"],
                                 "img_size": result["img_size"], "crop_pct": result["crop_pct"], **row}
                                for result in results for row in result["per_class"]))
