"""fastrsb against timm's own parts, end to end: one recipe on one data set, trained by fastrsb
(its DALI loader, mixup/cutmix, BCE, LAMB and schedule) and by a plain loop of timm's parts
(`timm.data.create_loader` with the recipe's transforms, `timm.data.Mixup`,
`timm.loss.BinaryCrossEntropy`, `timm.optim` LAMB with its weight-decay groups, timm's cosine
scheduler stepped per update after a warmup prefix: the recipes' schedule; with aug_repeats,
timm's `RepeatAugSampler`), over several seeds, on one process. Each side's top-1/top-5 at the
recipe's test size and crop, its optimizer steps and its wall time (timm's: its train sampler
too); the two random streams differ (loader, mixing, initial weights), so what compares is the
spread over seeds.

    python benchmarks/timm_parity.py --recipe demo --seeds 0 1 2 --json-out benchmarks/results/timm-parity-cpu-2core.jsonl

One JSON line per run, then a table. Default data: data/demo (generated if missing, as `fastrsb
train demo` does). On the CPU both train in float32 uncompiled, as fastrsb's CPU path does; on a
GPU, fastrsb as its recipe says and timm's loop in the recipe's AMP, channels-last, uncompiled.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fastrsb.cli import count_option  # noqa: E402
from fastrsb.errors import UserError  # noqa: E402
from fastrsb.recipe import load_recipe  # noqa: E402
from throughput import _emit, context  # noqa: E402  (benchmarks/ is this script's folder)

TRAINERS = ("fastrsb", "timm")


def run_fastrsb(recipe: dict, data: Path, device: str) -> dict:
    from fastrsb.train import train
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        metrics = train(recipe, data, Path(out) / "run", device=device, log_every=10**6)
    return {"top1": metrics["top1"], "top5": metrics["top5"], "steps": metrics["step"]}


def run_timm(recipe: dict, data: Path, device: str, workers: int, steps_per_epoch: int | None = None) -> dict:
    """The recipe as a plain loop of timm's parts (timm's train.py does the same with more options).
    steps_per_epoch: fewer than the loader's, to match another trainer's epoch (the schedule too)."""
    import timm
    from timm.data import Mixup, create_dataset, create_loader
    from timm.loss import BinaryCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    r = recipe
    random.seed(r["seed"])
    np.random.seed(r["seed"])
    torch.manual_seed(r["seed"])
    train_set = create_dataset("", root=str(data / "train"), split="train", is_training=True)
    val_set = create_dataset("", root=str(data / "val"), split="validation")
    classes = len(train_set.reader.class_to_idx)
    loader_options = dict(use_prefetcher=False, num_workers=workers, persistent_workers=True,
                          device=torch.device(device), pin_memory=device == "cuda")
    # color_jitter 0: timm adds its default 0.4 where there is no RandAugment; the recipes have none.
    train_data = create_loader(train_set, input_size=(3, r["img_size"], r["img_size"]), batch_size=r["batch_size"],
                               is_training=True, interpolation=r["train_interpolation"], color_jitter=0.0,
                               auto_augment=None if r["aa"] in (None, "none") else r["aa"], **loader_options)
    val_data = create_loader(val_set, input_size=(3, r["test_img_size"], r["test_img_size"]),
                             batch_size=r["batch_size"], is_training=False, interpolation="bicubic",
                             crop_pct=r["crop_pct"], **loader_options)
    if r["aug_repeats"] > 1:
        train_data = repeated_views(train_set, r, workers, device)
    steps_per_epoch = min(steps_per_epoch or len(train_data), len(train_data))
    model = timm.create_model(r["model"], num_classes=classes, drop_path_rate=r["drop_path"] or None)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, "lamb", lr=r["lr"], weight_decay=r["weight_decay"], eps=r["opt_eps"],
                                    betas=tuple(r["opt_betas"]))
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=r["epochs"] - r["warmup_epochs"],
                                       warmup_epochs=r["warmup_epochs"], warmup_lr=r["warmup_lr"], min_lr=r["min_lr"],
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch, warmup_prefix=True)
    mixup = Mixup(mixup_alpha=r["mixup"], cutmix_alpha=r["cutmix"], prob=r["mixup_prob"],
                  switch_prob=r["mixup_switch_prob"], mode=r["mixup_mode"], label_smoothing=r["smoothing"],
                  num_classes=classes) if r["mixup"] > 0 or r["cutmix"] > 0 else None
    loss_fn = BinaryCrossEntropy(target_threshold=r["bce_target_thresh"], smoothing=r["smoothing"])
    amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda" and r["amp"])
    updates = 0
    for epoch in range(r["epochs"]):
        if hasattr(train_data.sampler, "set_epoch"):  # as timm's train.py: RepeatAugSampler's shuffle
            train_data.sampler.set_epoch(epoch)
        model.train()
        for images, labels in itertools.islice(train_data, steps_per_epoch):
            images, labels = images.to(device, memory_format=torch.channels_last), labels.to(device)
            images, targets = mixup(images, labels) if mixup else (images, labels)
            with torch.autocast(**amp):
                loss = loss_fn(model(images).float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(updates)
        figures = evaluate(model, val_data, device, amp)  # every epoch, as timm's train.py and fastrsb do
    return {**figures, "steps": updates, "sampler": type(train_data.sampler).__name__}


def repeated_views(train_set, r: dict, workers: int, device: str):
    """The train loader of repeated augmentation on one process: timm's RepeatAugSampler (each image
    `aug_repeats` times in a row, views side by side in a batch, as fastrsb places them on one
    process) over the data set create_loader gave its transforms; timm's create_loader takes it
    only under torch.distributed. selected_round=0: an epoch of len(data set) samples, as fastrsb's
    (timm's default rounds down to a multiple of 256: a fifth of the demo's 960, 0.02% of ImageNet)."""
    from timm.data.distributed_sampler import RepeatAugSampler
    sampler = RepeatAugSampler(train_set, num_replicas=1, rank=0, num_repeats=r["aug_repeats"], selected_round=0)
    return torch.utils.data.DataLoader(train_set, batch_size=r["batch_size"], sampler=sampler, num_workers=workers,
                                       persistent_workers=workers > 0, pin_memory=device == "cuda", drop_last=True)


def evaluate(model: torch.nn.Module, val_data, device: str, amp: dict) -> dict:
    model.eval()
    hits, count = torch.zeros(2), 0
    with torch.no_grad(), torch.autocast(**amp):
        for images, labels in val_data:
            logits = model(images.to(device, memory_format=torch.channels_last))
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
            right = top.eq(labels.view(-1, 1))
            hits += torch.stack([right[:, 0].sum(), right.any(dim=1).sum()]).float()
            count += labels.shape[0]
    return {"top1": 100.0 * hits[0].item() / count, "top5": 100.0 * hits[1].item() / count}


def check_recipe(recipe: dict) -> None:
    """What the timm loop covers: the RSB recipes' parts (repeated augmentation on one process:
    repeated_views), without EMA."""
    refused = [f"{key} = {recipe[key]!r}" for key, ok in (("bce_loss", True), ("model_ema", False),
                                                       ("mixup_mode", "batch"), ("sched", "cosine"), ("opt", "lamb"))
               if recipe[key] != ok]
    if refused:
        sys.exit(f"timm_parity.py: the timm loop does not cover {', '.join(refused)}")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """The options and the recipe they name (overrides applied); a mistake stops here, before any
    training (benchmarks/gpu_checks.sh's dry run checks its command with this)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set epochs=4")
    p.add_argument("--data", type=Path, default=None, help="train/ and val/ class folders (default: data/demo)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--trainers", default=",".join(TRAINERS), help="comma list of fastrsb, timm")
    p.add_argument("--workers", type=count_option, default=2, help="timm's loader processes (default 2)")
    p.add_argument("--timm-steps-per-epoch", type=count_option, metavar="N",
                   help="end timm's epochs after N steps (its schedule too): to match fastrsb's where they differ")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    if not set(args.trainers.split(",")) <= set(TRAINERS):
        p.error(f"--trainers: choose from {', '.join(TRAINERS)}")
    try:
        base = load_recipe(args.recipe, args.overrides)
    except UserError as err:
        p.error(str(err))
    check_recipe(base)
    return args, base


def main(argv: list[str] | None = None) -> list[dict]:
    args, base = parse_args(argv)
    trainers = args.trainers.split(",")
    data = args.data
    if data is None:
        from fastrsb.cli import DEMO_DATA
        from fastrsb.demo_data import write_demo
        data = DEMO_DATA
        if not data.exists():
            write_demo(data, keep_existing=True)
    results = []
    for seed in args.seeds:
        for trainer in trainers:  # alternated, so a drift in the machine's speed falls on both
            recipe = {**base, "seed": seed}
            started = time.perf_counter()
            figures = (run_fastrsb(recipe, data, args.device) if trainer == "fastrsb"
                       else run_timm(recipe, data, args.device, args.workers, args.timm_steps_per_epoch))
            result = {**context(), "mode": "timm_parity", "trainer": trainer, "recipe": base["name"],
                      "overrides": args.overrides, "data": str(data), "seed": seed, "device": args.device,
                      **figures, "seconds": time.perf_counter() - started,
                      **({"timm_steps_per_epoch": args.timm_steps_per_epoch}
                         if trainer == "timm" and args.timm_steps_per_epoch else {})}
            _emit(result, args.json_out)
            results.append(result)
    print(f"\n{base['name']} on {data}, seeds {' '.join(map(str, args.seeds))}:")
    print("| trainer | top-1 (mean +- sd) | top-1 per seed | top-5 | seconds a run |")
    print("|---|---:|---|---:|---:|")
    for trainer in trainers:
        rows = [r for r in results if r["trainer"] == trainer]
        top1 = [r["top1"] for r in rows]
        spread = statistics.stdev(top1) if len(top1) > 1 else 0.0
        print(f"| {trainer} | {statistics.mean(top1):.2f} +- {spread:.2f} | {' / '.join(f'{v:.2f}' for v in top1)} | "
              f"{statistics.mean(r['top5'] for r in rows):.2f} | {statistics.mean(r['seconds'] for r in rows):.0f} |")
    return results


if __name__ == "__main__":
    main()
