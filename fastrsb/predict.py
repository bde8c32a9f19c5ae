"""`fastrsb predict`: what a trained model makes of images of one's own (image files, or every
image under folders): each image's top classes with their probabilities, by the transform the
model was tested with (its recipe's test size and crop, or a timm folder's), through the same DALI
validation pipeline as `fastrsb eval`. timm's inference.py's job.

Probabilities are the softmax of the outputs, as timm's inference.py gives them, also for models
trained with BCE (the RSB recipes): they rank the classes as the outputs do."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from fastrsb.checkpoint_eval import WithMirror, weights_to_evaluate
from fastrsb.class_order import imagenet_classes, imagenet_descriptions, read_class_map, timm_order, with_words
from fastrsb.data_folder import loader_batches
from fastrsb.device import amp_dtype, autocast, resolve_device
from fastrsb.errors import UserError
from fastrsb.memory_floor import refuse_a_batch_that_cannot_fit
from fastrsb.metrics_log import write_table
from fastrsb.model import check_input_sizes
from fastrsb.parts import open_val_loader
from fastrsb.pipelines import DatasetError, ImageList, default_pixel_dtype
from fastrsb.pipelines.image_list import IMAGE_EXTENSIONS, refuse_names_dali_cannot_take, walk_files
from fastrsb.progress import Progress

CSV_COLUMNS = ("file", "rank", "index", "class", "words", "probability")


@dataclass
class Predictions:
    img_size: int
    crop_pct: float
    notes: list[str]
    rows: list[dict]  # an image each, in the order listed: {"file", "top": [{index, class, words, probability}]}


def image_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The images PATHS name, in their order: a file as it is given, a folder's every image below
    it (as the loaders walk a class folder: symbolic links followed, dot-names skipped; sorted), an
    image named twice once. A path that is neither, a file that is no image the decoders read, a
    folder without images: one line saying so."""
    found = []
    for given in map(Path, paths):
        if given.is_dir():
            below = sorted(os.path.join(folder, name) for folder, names in _walk(given) for name in names
                           if name.lower().endswith(IMAGE_EXTENSIONS))
            if not below:
                raise UserError(f"{given} holds no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) in it or below it")
            found += below
        elif given.is_file():
            if not given.name.lower().endswith(IMAGE_EXTENSIONS):
                raise UserError(f"{given} is not an image the decoders read (by its name: "
                                f"{', '.join(IMAGE_EXTENSIONS)})")
            found.append(str(given))
        else:
            raise UserError(f"no file or folder {given}")
    found = list(dict.fromkeys(found))
    try:
        refuse_names_dali_cannot_take(found)
    except DatasetError as err:
        raise UserError(str(err)) from None
    return found


def _walk(folder: Path):
    try:
        yield from walk_files(folder)
    except DatasetError as err:  # a loop of symbolic links
        raise UserError(str(err)) from None


def predict(checkpoint: str | Path, paths: Sequence[str | os.PathLike], top: int = 5, img_size: int | None = None,
            crop_pct: float | None = None, device: str | None = None, batch_size: int = 64,
            num_threads: int | None = None, ema: bool = False, flip: bool = False) -> Predictions:
    """Each image's TOP classes (fewer where the model has fewer) by CHECKPOINT (fastrsb's, timm
    train.py's, or a model folder, as `fastrsb eval` reads them; ema: its EMA weights) at IMG_SIZE
    and CROP_PCT (None: the weights' test size and crop); flip: the outputs averaged with the
    mirrored image's (as eval --flip). The outputs stay on the device until the last batch: one copy
    back in all."""
    device = resolve_device(device)
    files = image_files(paths)
    weights = weights_to_evaluate(Path(checkpoint), ema)
    classes = _output_names(weights)
    size, crop = img_size or weights.img_size, crop_pct or weights.crop_pct
    model = weights.model.to(device).eval()
    check_input_sizes(model, {"--img-size": [size]})
    dtype = amp_dtype(device, weights.amp)
    batch_size = min(batch_size, len(files))
    refuse_a_batch_that_cannot_fit(model, [size], batch_size, device, activation_bytes=2 if dtype else 4,
                                   pixel_bytes=getattr(torch, default_pixel_dtype(device)).itemsize)
    # DALI reads absolute paths whatever the working folder; the rows name each file as it was given.
    images = ImageList([os.path.abspath(file) for file in files], [0] * len(files), ["-"])
    loader = open_val_loader({"test_img_size": size, "crop_pct": crop}, images, batch_size, device,
                             num_threads=num_threads)
    try:
        probabilities, indices = _top_outputs(WithMirror(model) if flip else model, loader, images, device, dtype,
                                              min(top, len(classes)))
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"a batch of {batch_size} images at {size} px takes more memory than the GPU has: "
                        f"--batch-size {max(1, batch_size // 2)} or fewer") from None
    words = weights.descriptions or imagenet_descriptions(classes) or {}
    rows = [{"file": file, "top": [{"index": k, "class": classes[k], "words": words.get(classes[k], ""),
                                    "probability": p} for k, p in zip(ks, ps)]}
            for file, ks, ps in zip(files, indices.tolist(), probabilities.tolist())]
    return Predictions(size, crop, weights.notes, rows)


@torch.no_grad()
def _top_outputs(model: torch.nn.Module, loader, images: ImageList, device: str, dtype: torch.dtype | None,
                 top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, output indices), (images, TOP) each, on the CPU; the eager model, as
    evaluate runs it (the short last batch would recompile a compiled one)."""
    found, count = [], 0
    progress, start = Progress("predict", len(loader)), time.perf_counter()
    for done, (batch, _) in enumerate(loader_batches(loader, images), 1):
        with autocast(device, dtype):
            logits = model(batch).float()
        found.append(logits.softmax(dim=1).topk(top, dim=1))
        count += batch.shape[0]  # counted on the host: no sync per batch
        progress.update(done, count / max(time.perf_counter() - start, 1e-9))
    progress.close()
    return torch.cat([p for p, _ in found]).cpu(), torch.cat([k for _, k in found]).cpu()


def _output_names(weights) -> list[str]:
    """The class each output is: the weights' names; for weights naming none (timm train.py's),
    timm's --class-map where it had one, ImageNet-1k's wnids (timm's order) for 1,000 outputs,
    else the output's index; said in the weights' notes."""
    count = weights.model.num_classes
    if weights.classes is not None:
        return weights.classes
    if weights.class_map:
        return timm_order([], read_class_map(weights.class_map, weights.class_map_places or []))
    if count == 1000:
        weights.notes.append("the weights name no classes: their 1,000 outputs are read as ImageNet-1k's, in "
                             "timm's order")
        return imagenet_classes()
    weights.notes.append(f"the weights name no classes: each of their {count} outputs is named by its index (timm's "
                         "order of its training folder's classes: natural order, 'c2' before 'c10')")
    return [str(k) for k in range(count)]


def line(row: dict) -> str:
    """An image's classes for a terminal: `FILE: CLASS (its first words) 87.3%; ...`."""
    return f"{row['file']}: " + "; ".join(f"{with_words(t['class'], t['words'])} {100 * t['probability']:.1f}%"
                                          for t in row["top"])


def write_csv(path: Path, predictions: Predictions) -> None:
    """A row per image and rank (rank 1: its top class), written whole."""
    write_table(path, CSV_COLUMNS, ({"file": row["file"], "rank": rank, **entry}
                                    for row in predictions.rows for rank, entry in enumerate(row["top"], 1)))
