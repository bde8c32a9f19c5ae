"""BatchNorm's running statistics measured anew for weights that no training step made: the mean
of several checkpoints (`fastrsb average --bn-data DIR`). Each entry of a mean is the mean of the
entries, and the running mean and variance averaged so describe no network that exists (the
variance of a mean of networks is not the mean of their variances); stochastic weight averaging
(torch.optim.swa_utils.update_bn) measures them again over the training images instead: every
BatchNorm layer's statistics reset, then a cumulative average (momentum None) over forward passes
in training mode, no gradient. timm's avg_checkpoints.py averages them as they are; this is the
other way, where asked."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from fastrsb.data_folder import loader_batches, open_split
from fastrsb.device import amp_dtype, autocast
from fastrsb.errors import UserError
from fastrsb.model import make_model
from fastrsb.pipelines import ImageList


def recompute_batch_norm(model: nn.Module, batches: Iterable, images: int | None, device: str,
                         dtype: torch.dtype | None) -> int:
    """MODEL's BatchNorm statistics measured anew over BATCHES ((images, labels) on the device),
    as torch's update_bn measures them (under the autocast training used), from at most IMAGES
    images (None: every batch). Returns the images seen. Momentum and training mode restored."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise UserError("the model has no BatchNorm layer: there are no statistics to measure")
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average of the batches' statistics
    was_training, seen = model.training, 0
    model.train()
    try:
        with torch.no_grad(), autocast(device, dtype):
            for batch, _ in batches:
                if images is not None and seen >= images:
                    break
                batch = batch if images is None else batch[:images - seen]
                model(batch)
                seen += batch.shape[0]
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return seen


def train_images(data: str | Path) -> ImageList:
    """DATA/train's images, listed (and refused where there are none) before minutes of averaging."""
    return open_split(Path(data), "train")


def recompute_for_checkpoint(state: dict, data: str | Path, train: ImageList, images: int | None, device: str,
                             batch_size: int, num_threads: int | None = None) -> dict:
    """STATE's weights (its model's, and its EMA's where it holds one) with BatchNorm's statistics
    measured anew over TRAIN (DATA/train) through the recipe's train loader (its crops at
    img_size, its RandAugment; no mixing; stochastic depth off, as the network is evaluated), at
    most IMAGES images. Returns {"state": {part: state dict}} and what was done."""
    from fastrsb.parts import open_train_loader  # (the trainer's parts: imported where used)
    recipe, classes = state["recipe"], state["classes"]
    if train.classes != classes:
        raise UserError(f"{data}/train holds other classes than the checkpoints classify ({len(train.classes)} "
                        f"against {len(classes)}, or other names): its statistics would be another data set's")
    batch = min(batch_size, len(train))
    dtype = amp_dtype(device, recipe["amp"])
    measured, seen = {}, 0
    for part in ("model", "ema"):
        if part not in state:
            continue
        model = make_model(recipe["model"], len(classes)).to(device)
        model.load_state_dict(state[part])
        # The same images for both parts: a loader anew, from the recipe's seed.
        loader = open_train_loader(recipe, train, batch, device, num_threads=num_threads, seed=recipe["seed"])
        seen = recompute_batch_norm(model, loader_batches(loader, train), images, device, dtype)
        measured[part] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        del loader, model
    return {"state": measured, "images": seen, "img_size": recipe["img_size"], "data": str(data)}
