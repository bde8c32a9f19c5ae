"""ImageNet-ReaL: top-1/top-5 against the reassessed labels of ImageNet's validation images ("Are
we done with ImageNet?", Beyer et al. 2020), computed as timm's validate.py computes it
(`--real-labels`, timm.data.RealLabelsImagenet): an image's prediction is right where any of its
top k classes is among its labels; an image with no labels is left out. The labels are a JSON
list of 50,000 lists of ImageNet class indices, the list at i for ILSVRC2012_val_{i + 1:08d}.JPEG;
timm ships a copy, which is the default.

The images go to the loader labelled by their position in the list, so that each batch finds its
images' labels by a gather on the device, whatever order or shard the loader reads them in."""
from __future__ import annotations

import json
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fastrsb.class_order import imagenet_classes
from fastrsb.errors import UserError
from fastrsb.pipelines import ImageList

# .JPEG as downloaded; a copy's .jpg or .png too; the Hugging Face hub's archives add _<wnid>.
VAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})(?:_n\d{8})?\.[A-Za-z]+")
TIMM_COPY = "timm's copy (timm/data/_info/imagenet_real_labels.json)"


@dataclass
class RealTargets:
    """Per image, by its position in the list the loader reads: its folder's class and its ReaL
    labels (both as the weights' output indices; a row of -1s: no ReaL label)."""
    labels: torch.Tensor  # (N,) int64
    sets: torch.Tensor  # (N, most labels an image has) int64, -1 where it has fewer
    source: str  # which labels file, for the result

    def to(self, device: str) -> RealTargets:
        return RealTargets(self.labels.to(device), self.sets.to(device), self.source)


def read_real_labels(path: str | None) -> tuple[list[list[int]], str]:
    """(the ReaL labels, where they came from): PATH's (a real.json), or timm's copy where None."""
    try:
        if path is None:
            text, source = pkgutil.get_data("timm.data", "_info/imagenet_real_labels.json"), TIMM_COPY
        else:
            text, source = Path(path).read_bytes(), path
        labels = json.loads(text)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the ReaL labels {path or TIMM_COPY}: {err}") from None
    if not (isinstance(labels, list) and len(labels) == 50_000 and all(
            isinstance(row, list) and all(isinstance(k, int) and 0 <= k < 1000 for k in row) for row in labels)):
        raise UserError(f"{source} is not ImageNet-ReaL's labels: a JSON list of 50,000 lists of class indices "
                        "0-999, one for each validation image (real.json of google-research/reassessed-imagenet)")
    return labels, source


def real_targets(images: ImageList, real: list[list[int]], source: str) -> tuple[ImageList, RealTargets]:
    """IMAGES (ImageNet's validation files, labelled by the weights' output index of their class;
    their `classes`, the weights' by output) relabelled by position, and their targets."""
    classes, imagenet = images.classes, imagenet_classes()
    if sorted(classes) != imagenet:
        raise UserError(f"ReaL labels are ImageNet-1k's: these weights classify {len(classes)} classes "
                        f"({', '.join(classes[:3])}, ...), not its 1,000 wnids")
    output = {name: i for i, name in enumerate(classes)}
    by_imagenet_index = [output[name] for name in imagenet]  # ReaL's index k: ImageNet's k-th wnid sorted
    rows = []
    for path in images.files:
        found = VAL_FILE.fullmatch(Path(path).name)
        if found is None or not 1 <= int(found[1]) <= len(real):
            raise UserError(f"ReaL labels are per file of ImageNet's validation set (ILSVRC2012_val_00000001.JPEG "
                            f"to ILSVRC2012_val_00050000.JPEG): {path} is not one")
        rows.append([by_imagenet_index[k] for k in real[int(found[1]) - 1]])
    width = max(map(len, rows), default=0) or 1
    sets = torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.int64).view(-1, width)
    positions = ImageList(images.files, list(range(len(images.files))), classes)
    return positions, RealTargets(torch.tensor(images.labels, dtype=torch.int64), sets, source)
