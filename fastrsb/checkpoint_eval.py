"""`fastrsb eval`: a checkpoint's top-1/top-5 on a validation folder, at the recipe's test size and
crop or at several (the model loaded once). A ResNet trained at low resolution tests best above
it (A3: trained at 160, tested at 224; "FixRes", Touvron et al. 2019), and where the best test size
lies depends on the run, so a sweep is the way to find it.

Beside ImageNet's val set, the test sets papers report beside it: ImageNet-V2
(class folders named by index), ImageNet-ReaL (--real-labels: fastrsb.real_labels) and folders of
some of the classes, ImageNet-A's and -R's 200 (--partial-classes)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from fastrsb.checkpoint import as_fastrsb_checkpoint, is_timm_checkpoint, load_weights, read_saved
from fastrsb.class_order import (by_index, imagenet_classes, named_by_index, read_class_map, relabelled,
                                 timm_order)
from fastrsb.data_folder import (SPLIT_NAMES, no_folder, open_class_tree, open_split, refuse_data_being_written,
                                 split_folder)
from fastrsb.device import amp_dtype, resolve_device
from fastrsb.errors import UserError
from fastrsb.memory_floor import refuse_a_batch_that_cannot_fit
from fastrsb.model import check_input_sizes, make_model
from fastrsb.model_folder import is_model_folder, load_model_folder
from fastrsb.parts import open_val_loader
from fastrsb.per_class import class_rows
from fastrsb.pipelines import ImageList, class_folders, default_pixel_dtype
from fastrsb.real_labels import read_real_labels, real_targets
from fastrsb.timm_checkpoint import model_to_evaluate, read_timm_checkpoint, timm_data_folders
from fastrsb.train import evaluate


def evaluate_checkpoint_at(checkpoint: str | Path, data: str | Path, img_sizes: Sequence[int | None],
                           crop_pcts: Sequence[float | None], device: str | None = None, batch_size: int = 128,
                           num_threads: int | None = None, ema: bool = False,
                           real_labels: bool | str = False, partial_classes: str | None = None,
                           per_class: bool = False, flip: bool = False) -> Iterator[dict]:
    """Top-1/top-5 of a checkpoint (fastrsb's, or timm's train.py's: timm_checkpoint.py), or of a
    timm model folder (fastrsb export's, or a timm model's from the hub: model_folder.py), on
    DATA/val (or DATA itself if it is a class folder tree) at every test size and crop fraction
    (each pair, sizes outermost; None: the recipe's test_img_size or crop_pct, a folder's timm test
    size and crop; a pair given twice is evaluated once), the weights read and the model built once.
    ema: the checkpoint's EMA weights instead of the model's. real_labels: ImageNet-ReaL's top-1/
    top-5 beside (fastrsb.real_labels), by timm's copy of its labels (True) or a real.json's (its
    path). partial_classes: "only" or "all", where DATA holds some of the weights' classes
    (_partial_classes). per_class: each result's "per_class" lists every class of DATA with its
    images, top-1 and top-5 (fastrsb.per_class.class_rows). flip: each image's outputs averaged
    with its mirror's (WithMirror). Yields each pair's result as soon as it is measured, in that
    order; the checks (the weights, the data, the classes) run at the first."""
    device = resolve_device(device)
    real = read_real_labels(real_labels if isinstance(real_labels, str) else None) if real_labels else None
    weights = weights_to_evaluate(Path(checkpoint), ema)
    images = _validation_images(Path(data), weights, weights.notes)
    images, kept = _partial_classes(images, weights.model.num_classes, partial_classes, Path(data), weights.notes)
    targets = None
    if real and kept is not None:
        raise UserError("--real-labels ranks each image among ImageNet's 1,000 classes (its labels may name any): "
                        "not with --partial-classes only")
    if real:
        images, targets = real_targets(images, *real)
        targets = targets.to(device)
    model = weights.model.to(device)
    pairs = dict.fromkeys((size or weights.img_size, crop or weights.crop_pct) for size in img_sizes for crop in crop_pcts)
    check_input_sizes(model, {"--img-size": sorted({size for size, _ in pairs})})
    dtype = amp_dtype(device, weights.amp)
    refuse_a_batch_that_cannot_fit(model, sorted({size for size, _ in pairs}), batch_size, device,
                                   activation_bytes=2 if dtype else 4,
                                   pixel_bytes=getattr(torch, default_pixel_dtype(device)).itemsize)
    if flip:
        model = WithMirror(model)
    if kept is not None:
        model = OutputsOf(model, kept).to(device)
    for size, crop in pairs:
        loader = open_val_loader({"test_img_size": size, "crop_pct": crop}, images, batch_size, device,
                                 num_threads=num_threads)
        try:
            figures = evaluate(model, loader, device, dtype, real=targets, per_class=per_class)
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"a batch of {batch_size} images at {size} px takes more memory than the GPU has: "
                            f"--batch-size {max(1, batch_size // 2)} or fewer") from None
        del loader  # its pipeline's memory goes before the next size's is taken
        if per_class:
            figures["per_class"] = class_rows(figures["per_class"], images.classes, weights.descriptions)
            # Balanced accuracy: on a val set whose classes differ in size (one's own), top-1 weighs
            # the large classes; this weighs every class alike (on ImageNet's val, the same figure).
            figures["mean_class_top1"] = sum(row["top1"] for row in figures["per_class"]) / len(figures["per_class"])
        yield {"checkpoint": str(checkpoint), "epoch": weights.epoch, "img_size": size, "crop_pct": crop,
               "ema": ema, "flip": flip, **figures, **({"notes": weights.notes} if weights.notes else {})}


@dataclass
class Weights:
    """A checkpoint's or a model folder's network and what testing it takes (eval, predict)."""
    model: torch.nn.Module
    classes: list[str] | None  # by index; None: the data folder's, in timm's order (timm's weights naming none)
    img_size: int
    crop_pct: float
    amp: bool
    epoch: int | None
    notes: list[str]
    class_map: str | None = None  # with classes None: timm's --class-map, which sets the order
    class_map_places: list[Path] | None = None  # where train.py would have found it
    classes_note: str | None = None  # with classes None: how eval reads them from the data folder
    descriptions: dict | None = None  # words for the classes, a model folder's own (label_descriptions)


def weights_to_evaluate(source: Path, ema: bool) -> Weights:
    if is_model_folder(source):
        if ema:
            raise UserError(f"{source} is a model folder: it holds one set of weights (export --ema writes the EMA's)")
        folder = load_model_folder(source)
        return Weights(folder.model, folder.classes, folder.img_size, folder.crop_pct, True, folder.epoch,
                       folder.notes, classes_note=folder.classes_note, descriptions=folder.descriptions)
    state = read_saved(source)
    if is_timm_checkpoint(state):
        checkpoint = read_timm_checkpoint(state, source)
        timm_eval = model_to_evaluate(checkpoint, ema)
        return Weights(timm_eval.model, None, timm_eval.img_size, timm_eval.crop_pct, True,
                       checkpoint.epochs_done, timm_eval.notes, timm_eval.class_map, timm_data_folders(checkpoint),
                       timm_eval.classes_note)
    state = as_fastrsb_checkpoint(state, source)
    recipe = state["recipe"]
    if ema and "ema" not in state:
        raise UserError(f"{source} holds no EMA weights (the run had model_ema = false)")
    model = make_model(recipe["model"], len(state["classes"]))
    load_weights(model, state["ema" if ema else "model"], str(source))
    return Weights(model, state["classes"], recipe["test_img_size"], recipe["crop_pct"], recipe["amp"],
                   state.get("epoch"), [])


def _validation_images(data: Path, weights: Weights, notes: list[str]):
    """DATA/val, or DATA itself where it is a class folder tree, each image labelled by the index
    the weights give its class: its classes must be the weights' by name, in whatever order (an
    export's is timm's), or where the weights name none (timm's), as many, indexed in timm's order
    (fastrsb.class_order), or by their class map (timm's --class-map) where train.py had one.
    Folders named by class index, 0 to N - 1 (ImageNet-V2's layout), are the classes of those
    indices in timm's order (ImageNet's wnids sorted). How the classes were read is said in NOTES."""
    classes, num_classes, class_map = weights.classes, weights.model.num_classes, weights.class_map
    if not data.is_dir():
        raise UserError(no_folder(data))
    refuse_data_being_written(data)
    folders = class_folders(data)
    if len(folders) == 1 and folders[0] in SPLIT_NAMES["train"]:  # a data folder without its val/, not one class
        raise UserError(f"{data} holds {folders[0]}/ but no val/: give a folder with val/<class>/, or "
                        f"{data / folders[0]} to evaluate on the training images")
    # A folder of classes by any name (val_subset/) is read as it is; a data folder, its val split.
    images = open_split(data, "val") if split_folder(data, "val").is_dir() else open_class_tree(data, data)
    if (not class_map and named_by_index(images.classes, num_classes)
            and not set(images.classes) & set(classes or [])):  # weights whose classes are "0", "1": by name
        first = f" ({', '.join(f'{i}: {name}' for i, name in enumerate(timm_order(classes)[:2]))}, ...)" \
            if classes else ""
        notes.append(f"{data}'s class folders are named by index, as ImageNet-V2's: folder k is read as the "
                     f"weights' class k in timm's order{first}")
        return by_index(images, classes, num_classes)
    if classes is None and _imagenet_subset(images.classes, num_classes, class_map):
        classes = imagenet_classes()  # timm's order of them: output k is the k-th wnid sorted
        notes.append(f"the weights name no classes: their {num_classes} outputs are read as ImageNet-1k's "
                     f"classes, {data}'s {len(images.classes)} being among them")
    if classes is None:
        if weights.classes_note:
            notes.append(weights.classes_note)
        places = [split_folder(data, "val"), data, *(weights.class_map_places or [])]
        indices = class_map and read_class_map(class_map, places)
        order = timm_order(images.classes, indices or None)
        if len(order) != num_classes:  # its labels would index other classes: figures without meaning
            raise UserError(f"{data}: its {len(images.classes)} class folders are not the {num_classes} classes the "
                            "weights classify, and the weights do not name theirs: evaluate them on a folder of "
                            f"all {num_classes} (for an ImageNet model, ImageNet's wnid folders)")
        kept = relabelled(images, order)
        if not kept.files:
            raise UserError(f"{data}: none of its classes is in the class map {class_map}")
        return kept
    if not set(images.classes) <= set(classes):  # some of them (ImageNet-A's 200): --partial-classes says how
        other = next(name for name in images.classes if name not in set(classes))
        raise UserError(f"{data}: its {len(images.classes)} classes differ from the weights' {len(classes)} "
                        f"({other!r} is not one of theirs: {', '.join(classes[:3])}, ...)")
    return relabelled(images, classes)


def _imagenet_subset(folders: list[str], num_classes: int, class_map: str | None) -> bool:
    """Whether FOLDERS are some of ImageNet-1k's classes (ImageNet-A's and -R's 200 wnids) and the
    weights, naming none, have 1,000 outputs: theirs then."""
    return (num_classes == 1000 and not class_map and len(folders) < 1000
            and set(folders) <= set(imagenet_classes()))


class WithMirror(torch.nn.Module):
    """Test-time augmentation by mirroring (--flip): a model's outputs for each image averaged with
    those for the image mirrored left to right, as FFCV's ResNet evaluation does (it sums them: the
    same ranking). Two forward passes of the batch; the mirror is a copy on the device."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.model(images) + self.model(images.flip(3))) / 2


class OutputsOf(torch.nn.Module):
    """A model's outputs for some of its classes alone, in the order given (--partial-classes only)."""

    def __init__(self, model: torch.nn.Module, indices: list[int]):
        super().__init__()
        self.model = model
        self.register_buffer("indices", torch.tensor(indices), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).index_select(1, self.indices)


def _partial_classes(images: ImageList, num_classes: int, partial: str | None, data: Path,
                     notes: list[str]) -> tuple[ImageList, list[int] | None]:
    """IMAGES (labelled by the weights' outputs) where they hold some of the weights' classes
    alone: as they are (PARTIAL "all": ranked among every class), or labelled by their place among
    the outputs kept (the returned indices: "only", ImageNet-A's and -R's protocol, timm's
    validate.py --valid-labels); refused where PARTIAL is None, the two giving other figures."""
    present = sorted(set(images.labels))
    if len(present) == num_classes:
        return images, None
    if partial is None:
        raise UserError(f"{data} holds {len(present)} of the weights' {num_classes} classes: --partial-classes only "
                        f"ranks each image among those {len(present)} alone (ImageNet-A's and -R's protocol; timm's "
                        f"validate.py --valid-labels), --partial-classes all among all {num_classes}")
    notes.append(f"{data} holds {len(present)} of the weights' {num_classes} classes: each image ranked among "
                 + (f"those {len(present)} alone" if partial == "only" else f"all {num_classes}"))
    if partial == "all":
        return images, None
    place = {output: i for i, output in enumerate(present)}
    return ImageList(images.files, [place[label] for label in images.labels],
                     [images.classes[output] for output in present]), present
