"""The training loop and evaluation. Reads top to bottom: data, model, optimizer, then per step
LR, mix, forward under autocast, loss, backward, step. Host syncs only at log steps and epoch ends.

One process per GPU under torchrun (DDP), or a single process. A run stops cleanly on SIGTERM or
SIGINT with a checkpoint of everything it needs to continue exactly (`--resume auto`)."""
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
from fastrsb.distributed import (Dist, agree, all_reduce_sum, average_bn_stats, check_in_step, gather_to_main,
                                 init_distributed, shutdown)
from fastrsb.ema import ModelEma
from fastrsb.errors import UserError
from fastrsb.loss import make_loss
from fastrsb.step import TrainStep, wrap_model
from fastrsb.mix import BatchMixer
from fastrsb.model import make_model
from fastrsb.optim import lr_at, make_optimizer
from fastrsb.pipelines import DatasetError, ImageList, train_loader, val_loader
from fastrsb.progress import Progress
from fastrsb.stopping import StopRequest


def _open_loader(make, images: ImageList, *args, **kwargs):
    try:
        return make(images, *args, **kwargs)
    except DatasetError as err:
        raise UserError(str(err)) from None
    except RuntimeError as err:  # DALI reads the first batches while building the iterator
        raise explain_pipeline_error(err, images) from None


def micro_batch_size(recipe: dict, world: int, grad_accum_steps: int) -> int:
    """The recipe's batch is global: split across processes and accumulation steps."""
    batch, parts = recipe["batch_size"], world * grad_accum_steps
    if grad_accum_steps < 1 or batch % parts:
        raise UserError(f"batch_size {batch} does not split into {world} process(es) x {grad_accum_steps} "
                        f"accumulation step(s): choose --grad-accum-steps so that the product divides it")
    micro = batch // parts
    if (recipe["mixup"] > 0 or recipe["cutmix"] > 0) and micro % 2:
        raise UserError(f"a batch of {micro} per process and step is odd: mixup/cutmix pair images within it")
    return micro


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: str, dtype: torch.dtype | None, d: Dist = Dist()) -> dict:
    """Top-1/top-5 and cross-entropy over every image of the loader exactly once, summed over all
    ranks. Runs the eager model: the test size and the short last batch would otherwise recompile."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, summed loss
    count = 0  # counted on the host: the batch sizes are known there, no copy to the device per batch
    try:
        for images, labels in loader:
            with autocast(device, dtype):
                logits = model(images).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top.eq(labels.view(-1, 1))
            sums += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                                 F.cross_entropy(logits, labels, reduction="sum")]).double()
            count += labels.shape[0]
    except RuntimeError as err:
        raise explain_pipeline_error(err, loader.images) from None
    totals = torch.cat([sums, sums.new_tensor([count])])  # one copy, one all-reduce, one host sync
    top1, top5, loss, count = all_reduce_sum(totals, d).tolist()
    return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "val_loss": loss / count,
            "val_images": int(count)}


def _find_resume(resume: str | None, out: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        return out / "last.pt" if (out / "last.pt").is_file() else None
    return Path(resume)


def _check_resumable(state: dict, recipe: dict, classes: list[str], d: Dist, path: Path) -> None:
    differ = [f"{k} {state['recipe'].get(k)!r} -> {recipe[k]!r}" for k in recipe
              if k != "name" and state["recipe"].get(k) != recipe[k]]
    if differ:
        raise UserError(f"{path} was trained with another recipe ({'; '.join(differ[:4])}): resume with the "
                        "same recipe and --set values, or start a new --out")
    if state["classes"] != classes:
        raise UserError(f"{path} was trained on {len(state['classes'])} classes, the data has {len(classes)}")
    if "ranks" not in state:
        raise UserError(f"{path} holds weights only (no optimizer and loader state): it cannot be resumed")
    if len(state["ranks"]) != d.world:
        raise UserError(f"{path} was written by {len(state['ranks'])} process(es), this run has {d.world}: exact "
                        "resume needs each process's loader position; resume with the same number of processes")


def _rank_state(train_data, mixer: BatchMixer, device: str, epoch_loss_sum: float) -> dict:
    """What differs per process: loader position, random streams, and the sum of this epoch's
    losses so far (each rank's own shard: an epoch stopped half-way reports the same mean)."""
    return {"loader": train_data.state_dict(), "mixer": mixer.state_dict(), "torch_rng": torch.get_rng_state(),
            "epoch_loss_sum": epoch_loss_sum, **({"cuda_rng": torch.cuda.get_rng_state()} if device == "cuda" else {})}


def _restore_rank_state(rank_state: dict, mixer: BatchMixer, device: str) -> None:
    mixer.load_state_dict(rank_state["mixer"])
    torch.set_rng_state(rank_state["torch_rng"])
    if device == "cuda" and "cuda_rng" in rank_state:
        torch.cuda.set_rng_state(rank_state["cuda_rng"])


def _keep_metrics_up_to(path: Path, step: int) -> None:
    """On resume, drop rows written after the checkpoint (they will be written again)."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(row + "\n" for row in rows))


def train(recipe: dict, data: str | Path, out: str | Path, device: str | None = None,
          num_threads: int | None = None, log_every: int = 50, resume: str | None = None,
          grad_accum_steps: int = 1, stop: StopRequest | None = None,
          stop_after_steps: int | None = None) -> dict:
    """Train as the recipe says; write RUN_DIR/{recipe.json, metrics.jsonl, last.pt, best.pt}
    (rank 0 only). resume: "auto" (RUN_DIR/last.pt if present) or a checkpoint path.
    stop / stop_after_steps: end early at a step boundary with a resumable checkpoint.
    Returns the last epoch's metrics, with "stopped": True when it ended early."""
    device = resolve_device(device)
    d = init_distributed(device)
    try:
        with (stop or StopRequest()) as stop:
            return _train(recipe, Path(data), Path(out), device, d, num_threads, log_every, resume,
                          grad_accum_steps, stop, stop_after_steps)
    finally:
        shutdown(d)


def _train(recipe, data, out, device, d, num_threads, log_every, resume, grad_accum_steps, stop, stop_after_steps):
    micro = micro_batch_size(recipe, d.world, grad_accum_steps)
    train_images, val_images = open_dataset(data)
    num_classes = len(train_images.classes)
    resume_path = _find_resume(resume, out)
    state = load_checkpoint(resume_path) if resume_path else None
    if state is not None:
        _check_resumable(state, recipe, train_images.classes, d, resume_path)
    elif resume == "auto" and d.main:
        print(f"--resume auto: no checkpoint in {out}, starting from scratch")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
        if state is not None:
            _keep_metrics_up_to(out / "metrics.jsonl", state["step"])

    # Per-process random streams (timm seeds seed + rank); the shuffle seed is shared so shards stay disjoint.
    torch.manual_seed(recipe["seed"] + d.rank)
    mixer = BatchMixer(num_classes, recipe["mixup"], recipe["cutmix"], recipe["mixup_prob"],
                       recipe["mixup_switch_prob"], recipe["smoothing"], np.random.RandomState(recipe["seed"] + d.rank))
    rank_state = state["ranks"][d.rank] if state else None
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    # DALI emits float16 for the GPU (autocast takes it from there); the CPU trains in float32,
    # so the CPU pipeline writes float32 directly instead of converting every batch in torch.
    pixels = "float16" if device == "cuda" else "float32"
    train_data = _open_loader(train_loader, train_images, micro, recipe["img_size"], device=device,
                              shard_id=d.rank, num_shards=d.world, seed=recipe["seed"], num_threads=num_threads,
                              dtype=pixels, repeats=max(1, recipe["aug_repeats"]), aa=recipe["aa"],
                              state=rank_state["loader"] if rank_state else None)
    val_data = _open_loader(val_loader, val_images, micro, recipe["test_img_size"], recipe["crop_pct"],
                            device=device, shard_id=d.rank, num_shards=d.world, num_threads=num_threads, dtype=pixels)

    model = make_model(recipe["model"], num_classes, recipe["drop_path"]).to(device)
    optimizer = make_optimizer(model, recipe)
    dtype = amp_dtype(device, recipe["amp"])
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    ema = ModelEma(model, recipe["model_ema_decay"]) if recipe["model_ema"] else None
    if state:
        load_weights(model, state["model"], str(resume_path))
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema:
            ema.load_state_dict(state["ema"])
    if rank_state:  # after the model's random init, which draws from the torch RNG
        _restore_rank_state(rank_state, mixer, device)
    stepper = TrainStep(wrap_model(model, d, device, recipe["compile"]), optimizer, scaler, make_loss(recipe),
                        mixer, device, dtype)

    micro_per_epoch = len(train_data)
    steps_per_epoch = math.ceil(micro_per_epoch / grad_accum_steps)  # as timm: a short last group
    schedule = dict(steps_per_epoch=steps_per_epoch, epochs=recipe["epochs"], lr=recipe["lr"],
                    warmup_epochs=recipe["warmup_epochs"], warmup_lr=recipe["warmup_lr"], min_lr=recipe["min_lr"])
    if d.main:
        print(f"fastrsb {__version__}: {recipe['name']} | {recipe['model']} | {len(train_images):,} train / "
              f"{len(val_images):,} val images, {num_classes} classes | {d.world} x {device}"
              f"{' ' + str(dtype).removeprefix('torch.') if dtype else ' float32'}"
              f"{' compiled' if device == 'cuda' and recipe['compile'] else ''} | batch {recipe['batch_size']} = "
              f"{d.world} x {grad_accum_steps} x {micro} | {steps_per_epoch} steps x {recipe['epochs']} epochs")

    start_epoch = state["epoch"] if state else 0
    step = state["step"] if state else 0
    best_top1 = state.get("best_top1", -1.0) if state else -1.0
    metrics = state["metrics"] if state else {}
    partial = state.get("partial") if state else None  # an epoch stopped half-way
    if state and d.main:
        print(f"resumed from {resume_path}: epoch {start_epoch + 1}, step {step}")

    def checkpoint(epoch: int, partial: dict | None, best: bool = False, epoch_loss_sum: float = 0.0) -> None:
        # Collective (every rank calls it); at checkpoints only, so the host syncs here do not matter.
        ranks = gather_to_main(_rank_state(train_data, mixer, device, epoch_loss_sum), d)
        if not d.main:
            return
        snapshot = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "epoch": epoch, "step": step, "partial": partial, "ranks": ranks, "best_top1": best_top1,
                    "recipe": recipe, "classes": train_images.classes, "metrics": metrics, "version": __version__,
                    **({"ema": ema.state_dict()} if ema else {})}
        save_checkpoint(snapshot, out / "last.pt")
        if best:
            save_checkpoint(snapshot, out / "best.pt")

    def log_row(row: dict) -> None:
        if d.main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    for epoch in range(start_epoch, recipe["epochs"]):
        model.train()
        micro_done = partial["micro_done"] if partial else 0
        progress = Progress(f"epoch {epoch + 1}/{recipe['epochs']}", steps_per_epoch, enabled=d.main)
        loss_sum = torch.zeros((), device=device)
        if partial:
            loss_sum += rank_state["epoch_loss_sum"]
        seconds_before = partial["seconds"] if partial else 0.0
        partial = None
        start = interval_start = time.perf_counter()
        micro_start, data_wait, interval_wait = micro_done, 0.0, 0.0
        lr = lr_at(step, **schedule)
        batches = iter(train_data)
        while micro_done < micro_per_epoch:
            # One optimizer step over a group of micro-batches (grad_accum_steps, or fewer at the end).
            group = min(grad_accum_steps, micro_per_epoch - micro_done)
            lr = lr_at(step, **schedule)
            for k in range(group):
                waited = time.perf_counter()
                try:
                    images, labels = next(batches)
                except RuntimeError as err:
                    raise explain_pipeline_error(err, train_images) from None
                interval_wait += time.perf_counter() - waited
                loss = stepper.accumulate(images, labels, group, last=k == group - 1)
                loss_sum += loss
            stepper.apply(lr)
            step += 1
            micro_done += group
            if ema:
                ema.update(model, step)
            done = math.ceil(micro_done / grad_accum_steps)
            # A signal is honoured at the next step in a single process; across processes at the
            # next log step, where the ranks agree on it without an extra sync.
            scheduled_stop = stop_after_steps is not None and step >= stop_after_steps  # the same on every rank
            if (done % log_every == 0 or micro_done == micro_per_epoch or scheduled_stop
                    or (stop.requested and not d.on)):
                current = loss.item()  # host sync: log steps only
                stopping, non_finite = agree([stop.requested, not math.isfinite(current)], d)
                stopping = stopping or scheduled_stop
                if non_finite:
                    raise UserError(f"loss is not finite at step {step} (epoch {epoch + 1}): stopping; "
                                    f"{out / 'last.pt'} holds the last good epoch")
                now = time.perf_counter()
                rate = (micro_done - micro_start) * micro / max(now - start, 1e-9)  # per process (GPU)
                wait_share = interval_wait / max(now - interval_start, 1e-9)
                data_wait += interval_wait
                progress.update(done, rate, loss=current, lr=lr, data=wait_share)
                log_row({"kind": "log", "epoch": epoch + micro_done / micro_per_epoch, "step": step,
                         "loss": current, "lr": lr, "images_per_sec": rate, "data_wait": wait_share})
                interval_start, interval_wait = now, 0.0
                if stopping and micro_done < micro_per_epoch:
                    progress.close()
                    checkpoint(epoch, {"micro_done": micro_done, "seconds": seconds_before + now - start},
                               epoch_loss_sum=loss_sum.item())
                    if d.main:
                        print(f"stopped at step {step} (epoch {epoch + 1}, {done}/{steps_per_epoch}); "
                              f"continue with: --resume auto --out {out}")
                    return {**metrics, "stopped": True, "step": step}
        progress.close()
        trained = time.perf_counter() - start
        train_seconds = seconds_before + trained
        train_loss = (all_reduce_sum(loss_sum, d) / (micro_per_epoch * d.world)).item()
        average_bn_stats(model, d)
        check_in_step(model, d)
        metrics = {"kind": "epoch", "epoch": epoch + 1, "step": step, "train_loss": train_loss, "lr": lr,
                   "images_per_sec": (micro_per_epoch - micro_start) * micro * d.world / trained,
                   "data_wait": data_wait / trained, **evaluate(model, val_data, device, dtype, d)}
        if ema:
            average_bn_stats(ema.module, d)
            metrics.update({f"ema_{k}": v for k, v in evaluate(ema.module, val_data, device, dtype, d).items()})
        metrics["epoch_seconds"] = seconds_before + time.perf_counter() - start
        log_row(metrics)
        if d.main:
            print(f"epoch {epoch + 1}: train_loss {train_loss:.4f} top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f}"
                  f"{' (ema %.2f)' % metrics['ema_top1'] if ema else ''} "
                  f"({metrics['images_per_sec']:,.0f} img/s train, {metrics['data_wait']:.0%} waiting for data, "
                  f"{metrics['epoch_seconds']:.1f}s)")
        improved = metrics["top1"] > best_top1
        best_top1 = max(best_top1, metrics["top1"])
        checkpoint(epoch + 1, None, best=improved)
        scheduled_stop = stop_after_steps is not None and step >= stop_after_steps
        if (agree([stop.requested], d)[0] or scheduled_stop) and epoch + 1 < recipe["epochs"]:
            if d.main:
                print(f"stopped after epoch {epoch + 1}; continue with: --resume auto --out {out}")
            return {**metrics, "stopped": True}
    if state and start_epoch >= recipe["epochs"] and d.main:
        print(f"{resume_path} already finished all {recipe['epochs']} epochs")
    return metrics


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, img_size: int | None = None,
                        crop_pct: float | None = None, device: str | None = None,
                        batch_size: int = 128, num_threads: int | None = None, ema: bool = False) -> dict:
    """Top-1/top-5 of a checkpoint on DATA/val (or DATA itself if it is a class folder tree).
    ema: evaluate the checkpoint's EMA weights instead of the model's."""
    device = resolve_device(device)
    state = load_checkpoint(checkpoint)
    recipe, classes = state["recipe"], state["classes"]
    if ema and "ema" not in state:
        raise UserError(f"{checkpoint} holds no EMA weights (the run had model_ema = false)")
    data = Path(data)
    if not data.is_dir():
        raise UserError(f"data folder {data} does not exist")
    images = open_split(data, "val") if (data / "val").is_dir() else open_split(data.parent, data.name)
    if images.classes != classes:
        raise UserError(f"{data}: its {len(images.classes)} classes differ from the checkpoint's {len(classes)} "
                        f"(first difference: {next((a, b) for a, b in zip(images.classes + [None] * len(classes), classes + [None] * len(images.classes)) if a != b)})")
    model = make_model(recipe["model"], len(classes)).to(device)
    load_weights(model, state["ema" if ema else "model"], str(checkpoint))
    img_size = img_size or recipe["test_img_size"]
    crop_pct = crop_pct or recipe["crop_pct"]
    loader = _open_loader(val_loader, images, batch_size, img_size, crop_pct, device=device,
                          num_threads=num_threads, dtype="float16" if device == "cuda" else "float32")
    result = evaluate(model, loader, device, amp_dtype(device, recipe["amp"]))
    return {"checkpoint": str(checkpoint), "epoch": state.get("epoch"), "img_size": img_size,
            "crop_pct": crop_pct, "ema": ema, **result}
