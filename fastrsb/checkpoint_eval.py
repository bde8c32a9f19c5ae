"""`fastrsb eval`: a checkpoint's top-1/top-5 on a validation folder, at the recipe's test size and
crop or at several (the model loaded once). A ResNet trained at low resolution tests best above
it (A3: trained at 160, tested at 224; "FixRes", Touvron et al. 2019), and where the best test size
lies depends on the run, so a sweep is the way to find it."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from fastrsb.checkpoint import load_checkpoint, load_weights
from fastrsb.data_folder import open_split
from fastrsb.device import amp_dtype, resolve_device
from fastrsb.errors import UserError
from fastrsb.model import make_model
from fastrsb.parts import open_val_loader
from fastrsb.train import evaluate


def evaluate_checkpoint_at(checkpoint: str | Path, data: str | Path, img_sizes: Sequence[int | None],
                           crop_pcts: Sequence[float | None], device: str | None = None, batch_size: int = 128,
                           num_threads: int | None = None, ema: bool = False) -> Iterator[dict]:
    """Top-1/top-5 of a checkpoint on DATA/val (or DATA itself if it is a class folder tree) at
    every test size and crop fraction (each pair, sizes outermost; None: the recipe's test_img_size
    or crop_pct; a pair given twice is evaluated once), the checkpoint read and the model built once.
    ema: the checkpoint's EMA weights instead of the model's. Yields each pair's result as soon as
    it is measured, in that order; the checks (the checkpoint, the data, the classes) run at the
    first."""
    device = resolve_device(device)
    state = load_checkpoint(checkpoint)
    recipe = state["recipe"]
    if ema and "ema" not in state:
        raise UserError(f"{checkpoint} holds no EMA weights (the run had model_ema = false)")
    images = _validation_images(Path(data), state["classes"])
    model = make_model(recipe["model"], len(state["classes"])).to(device)
    load_weights(model, state["ema" if ema else "model"], str(checkpoint))
    pairs = dict.fromkeys((size or recipe["test_img_size"], crop or recipe["crop_pct"])
                          for size in img_sizes for crop in crop_pcts)
    for size, crop in pairs:
        loader = open_val_loader(recipe, images, batch_size, device, num_threads=num_threads, img_size=size,
                                 crop_pct=crop)
        figures = evaluate(model, loader, device, amp_dtype(device, recipe["amp"]))
        del loader  # its pipeline's memory goes before the next size's is taken
        yield {"checkpoint": str(checkpoint), "epoch": state.get("epoch"), "img_size": size, "crop_pct": crop,
               "ema": ema, **figures}


def _validation_images(data: Path, classes: list[str]):
    """DATA/val, or DATA itself where it is a class folder tree; its classes must be the checkpoint's."""
    if not data.is_dir():
        raise UserError(f"data folder {data} does not exist")
    images = open_split(data, "val") if (data / "val").is_dir() else open_split(data.parent, data.name)
    if images.classes != classes:
        first = next((a, b) for a, b in zip(images.classes + [None] * len(classes),
                                            classes + [None] * len(images.classes)) if a != b)
        raise UserError(f"{data}: its {len(images.classes)} classes differ from the checkpoint's {len(classes)} "
                        f"(first difference: {first})")
    return images
