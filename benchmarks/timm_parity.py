"""fastrsb against timm's own parts, end to end: one recipe on one data set, trained by fastrsb
(its DALI loader, mixup/cutmix, BCE, LAMB and schedule) and by a plain loop of timm's parts
(`timm.data.create_loader` with the recipe's transforms, `timm.data.Mixup`,
`timm.loss.BinaryCrossEntropy`, `timm.optim` LAMB with its weight-decay groups, timm's cosine
scheduler stepped per update after a warmup prefix: the recipes' schedule; with aug_repeats,
timm's `RepeatAugSampler`), over several seeds, on one process or on N (`--nproc N`: fastrsb's
`--nproc`, and timm's loop under torch.distributed as timm's train.py runs it: DDP, a sampler
per rank, seeds by rank, BatchNorm statistics averaged after each epoch). Each side's
top-1/top-5 at the recipe's test size and crop, its optimizer steps and its wall time (timm's:
its train sampler too); the two random streams differ (loader, mixing, initial weights), so what
compares is the spread over seeds.

    python benchmarks/timm_parity.py --recipe demo --seeds 0 1 2 --json-out benchmarks/results/timm-parity-cpu-2core.jsonl
    python benchmarks/timm_parity.py --recipe demo --set aug_repeats=3 --nproc 4   (A1/A2's views on 4 processes)

One JSON line per run, then a table. Default data: data/demo (generated if missing, as `fastrsb
train demo` does). On the CPU both train in float32 uncompiled, as fastrsb's CPU path does; on a
GPU, fastrsb as its recipe says and timm's loop in the recipe's AMP, channels-last, uncompiled.
Several processes: gloo on the CPU (each with its share of the cores, as `fastrsb train --nproc`
gives its own), NCCL on GPUs (one each).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import random
import statistics
import subprocess
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


def run_fastrsb(recipe: dict, data: Path, device: str, nproc: int = 1, command: list[str] | None = None) -> dict:
    """One process: fastrsb's train() in this one. Several: `fastrsb train RECIPE --nproc N` in a
    child, `command` being the recipe and its --set words (the figures from its metrics.jsonl)."""
    if nproc > 1:
        return _fastrsb_processes(data, device, nproc, command)
    from fastrsb.train import train
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        metrics = train(recipe, data, Path(out) / "run", device=device, log_every=10**6)
    return {"top1": metrics["top1"], "top5": metrics["top5"], "val_images": metrics["val_images"],
            "steps": metrics["step"], "processes": 1}


def _fastrsb_processes(data: Path, device: str, nproc: int, command: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        run = Path(out) / "run"
        done = subprocess.run([sys.executable, "-m", "fastrsb", "train", *command, "--data", str(data), "--out",
                               str(run), "--device", device, "--nproc", str(nproc), "--log-every", str(10**6)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"timm_parity.py: fastrsb on {nproc} processes failed (exit {done.returncode}):\n"
                     + "\n".join((done.stdout + done.stderr).splitlines()[-15:]))
        last = [row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if row["kind"] == "epoch"][-1]
        started = json.loads((run / "starts.jsonl").read_text().splitlines()[0])  # what the run itself ran on
    return {"top1": last["top1"], "top5": last["top5"], "val_images": last["val_images"], "steps": last["step"],
            "processes": started["processes"]}


def run_timm(recipe: dict, data: Path, device: str, workers: int, steps_per_epoch: int | None = None,
             rank: int = 0, world: int = 1) -> dict:
    """The recipe as a plain loop of timm's parts (timm's train.py does the same with more options).
    steps_per_epoch: fewer than the loader's, to match another trainer's epoch (the schedule too).
    world > 1: this process is `rank` of torch.distributed's group (run_timm_processes)."""
    import timm
    from timm.data import Mixup, create_dataset, create_loader
    from timm.loss import BinaryCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import distribute_bn
    r = recipe
    seed = r["seed"] + rank  # as timm's train.py seeds each process (DDP then takes rank 0's weights)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    batch = r["batch_size"] // world  # the recipes' batch is global, as timm's train.py --batch-size x GPUs
    train_set = create_dataset("", root=str(data / "train"), split="train", is_training=True)
    val_set = create_dataset("", root=str(data / "val"), split="validation")
    classes = len(train_set.reader.class_to_idx)
    loader_options = dict(use_prefetcher=False, num_workers=workers, persistent_workers=True,
                          device=torch.device(device), pin_memory=device.startswith("cuda"))
    # color_jitter 0: timm adds its default 0.4 where there is no RandAugment; the recipes have none.
    # Several processes: timm's DistributedSampler, or RepeatAugSampler below.
    train_data = create_loader(train_set, input_size=(3, r["img_size"], r["img_size"]), batch_size=batch,
                               is_training=True, interpolation=r["train_interpolation"], color_jitter=0.0,
                               auto_augment=None if r["aa"] in (None, "none") else r["aa"],
                               distributed=world > 1 and r["aug_repeats"] <= 1, **loader_options)
    val_data = create_loader(val_set, input_size=(3, r["test_img_size"], r["test_img_size"]),
                             batch_size=batch, is_training=False, interpolation="bicubic",
                             crop_pct=r["crop_pct"], **loader_options)
    if world > 1:  # every val image once over the ranks (timm's OrderedDistributedSampler pads)
        val_data = torch.utils.data.DataLoader(torch.utils.data.Subset(val_set, range(rank, len(val_set), world)),
                                               batch_size=batch, num_workers=workers, persistent_workers=workers > 0)
    if r["aug_repeats"] > 1:
        train_data = repeated_views(train_set, r, workers, device, rank, world)
    steps_per_epoch = min(steps_per_epoch or len(train_data), len(train_data))
    model = timm.create_model(r["model"], num_classes=classes, drop_path_rate=r["drop_path"] or None)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, "lamb", lr=r["lr"], weight_decay=r["weight_decay"], eps=r["opt_eps"],
                                    betas=tuple(r["opt_betas"]))
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.cuda.current_device()] if device != "cpu" else None)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=r["epochs"] - r["warmup_epochs"],
                                       warmup_epochs=r["warmup_epochs"], warmup_lr=r["warmup_lr"], min_lr=r["min_lr"],
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch, warmup_prefix=True)
    mixup = Mixup(mixup_alpha=r["mixup"], cutmix_alpha=r["cutmix"], prob=r["mixup_prob"],
                  switch_prob=r["mixup_switch_prob"], mode=r["mixup_mode"], label_smoothing=r["smoothing"],
                  num_classes=classes) if r["mixup"] > 0 or r["cutmix"] > 0 else None
    loss_fn = BinaryCrossEntropy(target_threshold=r["bce_target_thresh"], smoothing=r["smoothing"])
    amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=device != "cpu" and r["amp"])
    updates = 0
    for epoch in range(r["epochs"]):
        if hasattr(train_data.sampler, "set_epoch"):  # as timm's train.py: the samplers' shuffle
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
        if world > 1:
            distribute_bn(model, world, reduce=True)  # timm's train.py default (--dist-bn reduce)
        # every epoch, as timm's train.py and fastrsb do; unwrapped: DDP's forward would sync buffers
        figures = evaluate(getattr(model, "module", model), val_data, device, amp)
    processes = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return {**figures, "steps": updates, "processes": processes, "sampler": type(train_data.sampler).__name__}


def run_timm_processes(recipe: dict, data: Path, device: str, workers: int, steps_per_epoch: int | None,
                       nproc: int) -> dict:
    """run_timm in `nproc` processes of one torch.distributed group (gloo on the CPU, NCCL on GPUs);
    rank 0's figures (the metrics are reduced over the ranks)."""
    import torch.multiprocessing
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        # The processes meet through a file of the folder: no port to pick, none another program can take.
        torch.multiprocessing.spawn(_timm_process, nprocs=nproc, join=True,
                                    args=(nproc, f"file://{folder}/rendezvous", recipe, data, device, workers,
                                          steps_per_epoch, result))
        return json.loads(result.read_text())


def _timm_process(rank: int, world: int, rendezvous: str, recipe: dict, data: Path, device: str, workers: int,
                  steps_per_epoch: int | None, result: Path) -> None:
    import multiprocessing
    import torch.distributed as dist
    # The loader workers start from a fork server, a process of one thread that has imported torch
    # and timm once: forked from this process, whose threads (gloo's, the train loader's queue
    # feeders) may hold an interpreter lock at that instant, a worker can hang in its first
    # moment, and its loader waits for it for ever (seen on 2 cores: the first validation's worker
    # stuck in PyOS_AfterFork_Child). Spawned, each would import torch and timm anew.
    multiprocessing.set_start_method("forkserver", force=True)
    multiprocessing.set_forkserver_preload(["torch", "timm", "torchvision"])
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    else:  # the cores shared out, as `fastrsb train --nproc` shares them (OMP_NUM_THREADS)
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    dist.init_process_group("nccl" if device != "cpu" else "gloo", init_method=rendezvous, rank=rank,
                            world_size=world)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            figures = run_timm(recipe, data, device, workers, steps_per_epoch, rank, world)
        if rank == 0:
            result.write_text(json.dumps(figures))
    finally:
        dist.destroy_process_group()


def repeated_views(train_set, r: dict, workers: int, device: str, rank: int = 0, world: int = 1):
    """The train loader of repeated augmentation: timm's RepeatAugSampler over the data set
    create_loader gave its transforms (timm's create_loader takes it only under
    torch.distributed, and rounds the epoch as below). On one process each image comes
    `aug_repeats` times in a row, the views side by side in a batch, as fastrsb places them there;
    on several, an image's views go to as many ranks, as fastrsb's view exchange places them.
    selected_round=0: an epoch of len(data set) samples, as fastrsb's (timm's default rounds down
    to a multiple of 256: a fifth of the demo's 960, 0.02% of ImageNet)."""
    from timm.data.distributed_sampler import RepeatAugSampler
    sampler = RepeatAugSampler(train_set, num_replicas=world, rank=rank, num_repeats=r["aug_repeats"],
                               selected_round=0)
    return torch.utils.data.DataLoader(train_set, batch_size=r["batch_size"] // world, sampler=sampler,
                                       num_workers=workers, persistent_workers=workers > 0,
                                       pin_memory=device.startswith("cuda"), drop_last=True)


def evaluate(model: torch.nn.Module, val_data, device: str, amp: dict) -> dict:
    """top-1/top-5 and the images counted, over val_data; under torch.distributed, over every rank's
    part of the images."""
    model.eval()
    hits = torch.zeros(3, dtype=torch.float64)  # top-1 hits, top-5 hits, images
    with torch.no_grad(), torch.autocast(**amp):
        for images, labels in val_data:
            logits = model(images.to(device, memory_format=torch.channels_last))
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
            right = top.eq(labels.view(-1, 1))
            hits += torch.tensor([right[:, 0].sum().item(), right.any(dim=1).sum().item(), labels.shape[0]],
                                 dtype=torch.float64)
    if torch.distributed.is_initialized():
        hits = hits.to(device)
        torch.distributed.all_reduce(hits)
        hits = hits.cpu()
    top1, top5, count = hits.tolist()
    return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "val_images": int(count)}


def check_recipe(recipe: dict) -> None:
    """What the timm loop covers: the RSB recipes' parts (repeated augmentation: repeated_views),
    without EMA."""
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
    p.add_argument("--nproc", type=count_option, default=1,
                   help="processes a run (default 1): on the CPU over gloo, on GPUs one each over NCCL")
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
    if base["batch_size"] % args.nproc:
        p.error(f"--nproc {args.nproc}: the recipe's batch of {base['batch_size']} does not split evenly over "
                "the processes (--set batch_size=...)")
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
            if trainer == "fastrsb":
                sets = args.overrides + [f"seed={seed}"]
                command = [args.recipe, *(word for item in sets for word in ("--set", item))]
                figures = run_fastrsb(recipe, data, args.device, args.nproc, command)
            elif args.nproc > 1:
                figures = run_timm_processes(recipe, data, args.device, args.workers, args.timm_steps_per_epoch,
                                             args.nproc)
            else:
                figures = run_timm(recipe, data, args.device, args.workers, args.timm_steps_per_epoch)
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
