"""The data folder a run reads (DIR/train, DIR/val), checked before any work starts, and the
search for the file DALI could not decode when a run fails on one."""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from fastrsb.errors import UserError
from fastrsb.progress import Progress
from fastrsb.pipelines import DatasetError, ImageList, list_images


def open_split(root: Path, split: str) -> ImageList:
    folder = root / split
    if not folder.is_dir():
        raise UserError(f"{root} has no '{split}' folder (expected {root}/{split}/<class>/<image>.JPEG)")
    try:
        return list_images(folder)
    except DatasetError as err:
        raise UserError(str(err)) from None


def open_dataset(root: str | Path) -> tuple[ImageList, ImageList]:
    """(train, val) image lists of an ImageNet-style folder, with the same classes in both."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist (make a demo one with: fastrsb data demo {root})")
    train, val = open_split(root, "train"), open_split(root, "val")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise UserError(f"{root}: train and val classes differ (only in train: {only_train[:5]}, only in val: {only_val[:5]})")
    return train, val


def _decode_error(path: str) -> str | None:
    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))  # DCT-scaled JPEG decode: reads every byte, 8x faster
            image.load()
        return None
    except Exception as err:  # noqa: BLE001 - any failure means "cannot decode"
        return f"{type(err).__name__}: {err}"


def find_undecodable(files: list[str], workers: int | None = None, limit: int | None = 10,
                     progress: Progress | None = None) -> list[tuple[str, str]]:
    """(path, reason) for the files that do not decode (the first `limit`, or all), in file order."""
    workers = workers or max(1, min(16, len(os.sched_getaffinity(0))))
    bad = []
    with ProcessPoolExecutor(workers) as pool:
        for done, (path, reason) in enumerate(zip(files, pool.map(_decode_error, files, chunksize=64)), 1):
            if reason:
                bad.append((path, reason))
                if limit is not None and len(bad) >= limit:
                    break
            if progress is not None and (done % 1000 == 0 or done == len(files)):
                progress.update(done, done / (time.perf_counter() - progress.start))
    return bad


def explain_pipeline_error(err: RuntimeError, images: ImageList) -> UserError:
    """Turn DALI's 'Critical error in pipeline ... nvImageCodec failure' into a message that
    names the file, by decoding the listed files once more on the CPU."""
    text = str(err)
    if "decoders" not in text and "nvImageCodec" not in text and "decode" not in text.lower():
        lines = [line for line in text.splitlines() if line.strip()]
        return UserError(f"data pipeline failed: {lines[-1] if lines else type(err).__name__}")
    bad = find_undecodable(images.files)
    if not bad:
        return UserError("the data pipeline could not decode an image, and a CPU re-check of every file found none "
                         f"broken; DALI said: {' '.join(text.split())[:300]}")
    listed = "; ".join(f"{path} ({reason})" for path, reason in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return UserError(f"cannot decode {listed}{more}: remove or replace the file(s) (fastrsb data check lists them all)")
