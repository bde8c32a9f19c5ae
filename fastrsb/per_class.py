"""`fastrsb eval --per-class CSV`: each class's images, top-1 and top-5, and the class its images
are most often taken for, for finding the classes a model gets wrong (a mislabelled or broken class
folder in one's own data set shows as a class near 0%; two classes that are one, or that overlap,
as each other's most frequent mistake). The counts are evaluate's (fastrsb.train), summed on the
device beside the totals."""
from __future__ import annotations

from pathlib import Path

from fastrsb.class_order import imagenet_descriptions, with_words
from fastrsb.metrics_log import write_table

COLUMNS = ("checkpoint", "ema", "img_size", "crop_pct", "index", "class", "words", "images", "top1", "top5",
           "taken_for", "taken_for_words", "taken_for_share")


def class_rows(counts: list[list[int]], classes: list[str], descriptions: dict | None = None) -> list[dict]:
    """evaluate's per-class counts (by output index: images, top-1 hits, top-5 hits, the index its
    images are most often taken for and how many are) as a row for each class that has images: its
    index among the outputs evaluated (with --partial-classes only, among the folder's classes), its
    name (the class folder's), its words (DESCRIPTIONS, a model folder's; else ImageNet's where the
    classes are its wnids), its images, top-1 and top-5 (%), and the class (and its words) its images
    are most often taken for with the share of its images that are (None and 0 where none is
    wrong)."""
    words = descriptions or imagenet_descriptions(classes) or {}
    rows = []
    for index, (images, top1, top5, taken_for, taken) in enumerate(counts):
        if images:
            other = classes[taken_for] if taken_for >= 0 else None
            rows.append({"index": index, "class": classes[index], "words": words.get(classes[index], ""),
                         "images": images, "top1": 100.0 * top1 / images, "top5": 100.0 * top5 / images,
                         "taken_for": other, "taken_for_words": words.get(other, "") if other else "",
                         "taken_for_share": 100.0 * taken / images if other else 0.0})
    return rows


def lowest(rows: list[dict], count: int = 5) -> str:
    """The classes of the lowest top-1 (the first of equals by index), as words for a line."""
    worst = sorted(rows, key=lambda row: (row["top1"], row["index"]))[:count]
    return "; ".join(f"{with_words(row['class'], row['words'])} {row['top1']:.2f} of {row['images']}{_taken_for(row)}"
                     for row in worst)


def _taken_for(row: dict) -> str:
    if not row["taken_for"]:
        return ""
    return f" (taken for {with_words(row['taken_for'], row['taken_for_words'])} {row['taken_for_share']:.0f}%)"


def write_csv(path: Path, results: list[dict]) -> None:
    """Every result's classes, a row each, written whole (a kill leaves no half file)."""
    write_table(path, COLUMNS, ({"checkpoint": result["checkpoint"], "ema": result["ema"],
                                 "img_size": result["img_size"], "crop_pct": result["crop_pct"], **row}
                                for result in results for row in result["per_class"]))
