"""The training loop and evaluation. Reads top to bottom: data, model, optimizer, then per step
LR, mix, forward under autocast, loss, backward, step. Host syncs only at log steps."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastrsb import __version__
from fastrsb.checkpoint import load_checkpoint, load_weights, save_checkpoint
from fastrsb.data import explain_pipeline_error, open_dataset, open_split
from fastrsb.device import amp_dtype, autocast, resolve_device
from fastrsb.errors import UserError
from fastrsb.loss import make_loss
from fastrsb.mix import BatchMixer
from fastrsb.model import make_model
from fastrsb.optim import lr_at, make_optimizer
from fastrsb.pipelines import DatasetError, ImageList, train_loader, val_loader
from fastrsb.progress import Progress

UNSUPPORTED_YET = {  # recipe parts the pipelines do not implement yet: refuse rather than ignore
    "aa": "RandAugment in the DALI pipelines (issue #3): run with --set aa=none",
    "aug_repeats": "repeated augmentation (issue #4): run with --set aug_repeats=0",
}


def _check_supported(recipe: dict) -> None:
    if recipe["aa"] is not None:
        raise UserError(f"aa={recipe['aa']} needs {UNSUPPORTED_YET['aa']}")
    if recipe["aug_repeats"] > 1:
        raise UserError(f"aug_repeats={recipe['aug_repeats']} needs {UNSUPPORTED_YET['aug_repeats']}")


def _open_loader(make, images: ImageList, *args, **kwargs):
    try:
        return make(images, *args, **kwargs)
    except DatasetError as err:
        raise UserError(str(err)) from None
    except RuntimeError as err:  # DALI reads the first batches while building the iterator
        raise explain_pipeline_error(err, images) from None


def _loaders(recipe: dict, train: ImageList, val: ImageList, device: str, num_threads: int | None):
    # DALI emits float16 for the GPU (autocast takes it from there); the CPU trains in float32,
    # so the CPU pipeline writes float32 directly instead of converting every batch in torch.
    dtype = "float16" if device == "cuda" else "float32"
    train_data = _open_loader(train_loader, train, recipe["batch_size"], recipe["img_size"], device=device,
                              seed=recipe["seed"], num_threads=num_threads, dtype=dtype)
    val_data = _open_loader(val_loader, val, recipe["batch_size"], recipe["test_img_size"], recipe["crop_pct"],
                            device=device, num_threads=num_threads, dtype=dtype)
    return train_data, val_data


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: str, dtype: torch.dtype | None) -> dict:
    """Top-1/top-5 and cross-entropy over every image of the loader exactly once. Runs the
    eager model: the test size and the short last batch would otherwise recompile the graph."""
    model.eval()
    correct1 = torch.zeros((), dtype=torch.long, device=device)
    correct5 = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        for images, labels in loader:
            with autocast(device, dtype):
                logits = model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top.eq(labels.view(-1, 1))
            correct1 += hits[:, 0].sum()
            correct5 += hits.any(dim=1).sum()
            count += labels.shape[0]
    except RuntimeError as err:
        raise explain_pipeline_error(err, loader.images) from None
    # One host sync for the whole evaluation.
    top1, top5, loss = torch.stack([correct1.double(), correct5.double(), loss_sum]).tolist()
    return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "val_loss": loss / count, "val_images": count}


def train(recipe: dict, data: str | Path, out: str | Path, device: str | None = None,
          num_threads: int | None = None, log_every: int = 50) -> dict:
    """Train as the recipe says; write RUN_DIR/{recipe.json, metrics.jsonl, last.pt, best.pt}.
    Returns the last epoch's metrics."""
    _check_supported(recipe)
    device = resolve_device(device)
    out = Path(out)
    train_images, val_images = open_dataset(data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")

    torch.manual_seed(recipe["seed"])
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    train_data, val_data = _loaders(recipe, train_images, val_images, device, num_threads)
    num_classes = len(train_images.classes)
    model = make_model(recipe["model"], num_classes, recipe["drop_path"]).to(device)
    optimizer = make_optimizer(model, recipe)
    loss_fn = make_loss(recipe)
    mixer = BatchMixer(num_classes, recipe["mixup"], recipe["cutmix"], recipe["mixup_prob"],
                       recipe["mixup_switch_prob"], recipe["smoothing"], np.random.RandomState(recipe["seed"]))
    dtype = amp_dtype(device, recipe["amp"])
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    # Mixing stays outside the compiled region: its random box sizes would otherwise recompile.
    step_model = torch.compile(model) if device == "cuda" and recipe["compile"] else model

    steps_per_epoch = len(train_data)
    schedule = dict(steps_per_epoch=steps_per_epoch, epochs=recipe["epochs"], lr=recipe["lr"],
                    warmup_epochs=recipe["warmup_epochs"], warmup_lr=recipe["warmup_lr"], min_lr=recipe["min_lr"])
    batch = recipe["batch_size"]
    print(f"fastrsb {__version__}: {recipe['name']} | {recipe['model']} | {len(train_images):,} train / "
          f"{len(val_images):,} val images, {num_classes} classes | {device}"
          f"{' ' + str(dtype).removeprefix('torch.') if dtype else ' float32'}"
          f"{' compiled' if step_model is not model else ''} | {steps_per_epoch} steps x {recipe['epochs']} epochs")
    best_top1, metrics, step = -1.0, {}, 0
    for epoch in range(recipe["epochs"]):
        model.train()
        progress = Progress(f"epoch {epoch + 1}/{recipe['epochs']}", steps_per_epoch)
        loss_sum = torch.zeros((), device=device)
        start = time.perf_counter()
        try:
            for i, (images, labels) in enumerate(train_data):
                lr = lr_at(step, **schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images, targets = mixer(images, labels)
                with autocast(device, dtype):
                    logits = step_model(images)
                loss = loss_fn(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                loss_sum += loss.detach()
                step += 1
                if (i + 1) % log_every == 0 or i + 1 == steps_per_epoch:
                    current = loss.item()  # host sync: log steps only
                    if not math.isfinite(current):
                        raise UserError(f"loss is {current} at step {step} (epoch {epoch + 1}): stopping; "
                                        f"{out / 'last.pt'} holds the last good epoch")
                    rate = (i + 1) * batch / (time.perf_counter() - start)
                    progress.update(i + 1, rate, loss=current, lr=lr)
        except RuntimeError as err:
            if "pipeline" not in str(err).lower():
                raise
            raise explain_pipeline_error(err, train_images) from None
        progress.close()
        train_seconds = time.perf_counter() - start
        train_loss = loss_sum.item() / steps_per_epoch
        metrics = {"epoch": epoch + 1, "step": step, "train_loss": train_loss, "lr": lr,
                   "images_per_sec": steps_per_epoch * batch / train_seconds,
                   **evaluate(model, val_data, device, dtype),
                   "epoch_seconds": time.perf_counter() - start}
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        print(f"epoch {epoch + 1}: train_loss {train_loss:.4f} top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} "
              f"({metrics['images_per_sec']:,.0f} img/s train, {metrics['epoch_seconds']:.1f}s)")
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "mixer": mixer.state_dict(), "epoch": epoch + 1, "step": step, "recipe": recipe,
                 "classes": train_images.classes, "metrics": metrics, "version": __version__}
        save_checkpoint(state, out / "last.pt")
        if metrics["top1"] > best_top1:
            best_top1 = metrics["top1"]
            save_checkpoint(state, out / "best.pt")
    return metrics


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, img_size: int | None = None,
                        crop_pct: float | None = None, device: str | None = None,
                        batch_size: int = 128, num_threads: int | None = None) -> dict:
    """Top-1/top-5 of a checkpoint on DATA/val (or DATA itself if it is a class folder tree)."""
    device = resolve_device(device)
    state = load_checkpoint(checkpoint)
    recipe, classes = state["recipe"], state["classes"]
    data = Path(data)
    if not data.is_dir():
        raise UserError(f"data folder {data} does not exist")
    images = open_split(data, "val") if (data / "val").is_dir() else open_split(data.parent, data.name)
    if images.classes != classes:
        raise UserError(f"{data}: its {len(images.classes)} classes differ from the checkpoint's {len(classes)} "
                        f"(first difference: {next((a, b) for a, b in zip(images.classes + [None] * len(classes), classes + [None] * len(images.classes)) if a != b)})")
    model = make_model(recipe["model"], len(classes)).to(device)
    load_weights(model, state["model"], str(checkpoint))
    img_size = img_size or recipe["test_img_size"]
    crop_pct = crop_pct or recipe["crop_pct"]
    loader = _open_loader(val_loader, images, batch_size, img_size, crop_pct, device=device,
                          num_threads=num_threads, dtype="float16" if device == "cuda" else "float32")
    result = evaluate(model, loader, device, amp_dtype(device, recipe["amp"]))
    return {"checkpoint": str(checkpoint), "epoch": state.get("epoch"), "img_size": img_size,
            "crop_pct": crop_pct, **result}
