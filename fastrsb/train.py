"""The training loop and evaluation. `train` reads top to bottom: open the data, build the run
(fastrsb.parts), restore it if resuming (fastrsb.run_state), then per epoch: train, save, validate,
save. `train_one_epoch` runs the steps; the host syncs with the device at log steps only.

One process per GPU under torchrun (DDP), or a single process. A run stops cleanly on SIGTERM,
SIGINT or SIGUSR1 (fastrsb.stopping) with a checkpoint of everything it needs to continue exactly
(`--resume auto`)."""
from __future__ import annotations

import contextlib
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fastrsb import __version__, peak_memory, progressive, run_log, wandb_log
from fastrsb.accumulation import HEADROOM
from fastrsb.data_folder import (check_headers, describe_counts, loader_batches, open_dataset,
                                  refuse_a_run_inside_the_splits, val_shares_train)
from fastrsb.determinism import batch_hash, deterministic_mode
from fastrsb.device import autocast, gpu_memory_line, resolve_device, step_stream
from fastrsb.distributed import (Dist, FailureNotice, agree, all_reduce_sum, average_bn_stats, check_in_step,
                                 init_distributed, shutdown, stop_together)
from fastrsb.errors import UserError
from fastrsb.file_jobs import make_folder
from fastrsb.folder_lock import FolderLock
from fastrsb.metrics_log import refuse_a_second_run
from fastrsb.parts import Run, build_run, graphs_unfit, resize_train_loader
from fastrsb.pipelines import DatasetError
from fastrsb.progress import Progress, clock as _clock
from fastrsb.recipe import BUILTIN, load_recipe
from fastrsb.provenance import record_start, source_commit, start_record
from fastrsb.run_state import (Position, RunFolder, finish_saves, loader_start, loaders_start_anew, resharded_note,
                               restore_run, resume_state, save_run)
from fastrsb.shards import check_shards, listing_fingerprint
from fastrsb.stopping import StopRequest


def train(recipe: dict, data: str | Path, out: str | Path, device: str | None = None,
          num_threads: int | None = None, log_every: int = 50, resume: str | None = None,
          grad_accum_steps: str | int = "auto", stop: StopRequest | None = None,
          stop_after_steps: int | None = None, micro_batch: int | None = None, deterministic: bool = False,
          command: str | None = None, wandb_project: str | None = None, keep_every: int | None = None) -> dict:
    """Train as the recipe says; write RUN_DIR/{recipe.json, starts.jsonl, metrics.jsonl, last.pt,
    best.pt} (rank 0 only), and train.log where the command keeps one (fastrsb.run_log).
    resume: "auto" (RUN_DIR/last.pt if present) or a checkpoint path.
    grad_accum_steps ("auto" or a number) and micro_batch: how the recipe's global batch splits per
    process (fastrsb.accumulation); a resumed run keeps the split it was saved with (on another
    number of processes, it is split anew).
    deterministic: torch's deterministic algorithms and a hash of every logged batch (fastrsb.determinism).
    stop / stop_after_steps: end early at a step boundary with a resumable checkpoint.
    command: the command line that started this, for RUN_DIR/starts.jsonl (fastrsb.provenance).
    wandb_project: also log to a W&B run in this project (fastrsb.wandb_log; a run folder that has
    one continues it without).
    keep_every: also keep every that many epochs' checkpoint, and the last's (RUN_DIR/epoch-NNN.pt).
    Returns the last epoch's metrics, with "stopped": True when it ended early."""
    device, out = resolve_device(device), Path(out)
    d = init_distributed(device)
    new_folder, lock = not out.exists(), FolderLock(out)
    try:
        return _train(recipe, data, out, device, d, num_threads, log_every, resume, grad_accum_steps, stop,
                      stop_after_steps, micro_batch, deterministic, command, lock, wandb_project, keep_every)
    except BaseException as error:
        # Its traceback holds _train's frame, and so the run (its DDP wrapper): let go of them now,
        # while the process group still stands (distributed.shutdown says why). The lines stay.
        traceback.clear_frames(error.__traceback__)
        lock.release()
        if new_folder and d.main:  # refused before it wrote anything: no empty run folder left behind
            with contextlib.suppress(OSError):
                out.rmdir()  # (only if empty)
        raise
    finally:
        lock.release()  # after the last checkpoint and row
        shutdown(d)  # after _train's objects: see distributed.shutdown


def _train(recipe: dict, data: str | Path, out: Path, device: str, d: Dist, num_threads: int | None, log_every: int,
           resume: str | None, grad_accum_steps: str | int, stop: StopRequest | None, stop_after_steps: int | None,
           micro_batch: int | None, deterministic: bool, command: str | None, lock: FolderLock,
           wandb_project: str | None, keep_every: int | None) -> dict:
    """train()'s work in a frame of its own, whose objects are gone when it returns."""
    with (stop or StopRequest()) as stop, deterministic_mode(deterministic):
        train_images, val_images, wandb_project = _open_together(data, out, resume, d, lock, wandb_project)
        resume_path, state = resume_state(resume, out, recipe, train_images.classes, d)
        if resume == "auto" and state is None and d.main:
            print(f"--resume auto: no checkpoint in {out}, starting from scratch"
                  + (" (the rows a run logged there before it stopped without a checkpoint are dropped)"
                     if (out / "metrics.jsonl").is_file() else ""))
        _check_files(train_images, val_images, d)
        loader_state, loader_seed = loader_start(state, recipe, d, len(train_images))
        if loader_state and "micro_batch" in state and grad_accum_steps == "auto" and micro_batch is None:
            micro_batch = state["micro_batch"]  # the loader position is for this micro-batch
        run = build_run(recipe, train_images, val_images, device, d, num_threads, grad_accum_steps, micro_batch,
                        loader_state=loader_state, resumed=bool(state), loader_seed=loader_seed, data=Path(data),
                        first_epoch=(state["epoch"] if state else 0) + 1)
        # The train listing's fingerprint (~1 s for ImageNet) serves the shard check and starts.jsonl.
        train_listing = listing_fingerprint(train_images.files, train_images.labels)
        shards = check_shards(train_listing, len(train_images), run.train_data, run.micro, d)
        pos = restore_run(run, state, resume_path) if state else Position()
        # --resume auto without a checkpoint restarts from step 0: rows logged there by a run that
        # stopped before its first checkpoint (a crash) are dropped as rows after a checkpoint are.
        folder = RunFolder(out, recipe, d, resumed=pos if state or resume else None, wandb_project=wandb_project,
                           facts=_run_facts(run, data, len(train_images)) if wandb_project else None,
                           keep_every=keep_every)
        _start_log(out, d, command)
        if state:
            folder.saved = (resume_path, _where(run, pos))
        _announce(run, train_images, val_images, resume_path if state else None, pos, shards)
        if state and loaders_start_anew(state, d, len(train_images)):
            _say(run, resharded_note(run, state))
        if d.main:
            listings = {"train": train_listing, "val": listing_fingerprint(val_images.files, val_images.labels)}
            record_start(out, start_record(command, device, d.world, pos.step if state else None, data,
                                           train_images, val_images, listings))
        stops = Stops(stop, stop_after_steps, d)
        # From here a rank that fails stops the others at once, naming itself (FailureNotice).
        failed = True
        try:
            with step_stream(device, run.training.high_priority_stream), FailureNotice(d):
                metrics = _epochs(run, pos, folder, stops, log_every, deterministic)
                finish_saves(run, folder)  # the last checkpoint on disk before the run says it is done
            failed = False
            return metrics
        finally:
            folder.close(failed)


def _run_facts(run: Run, data: str | Path, train_images: int) -> dict:
    """What a run's W&B config holds beside its recipe, to tell runs apart there: how the batch
    was split, on what, on which data, by which fastrsb."""
    return {"processes": run.d.world, "device": run.device, "micro_batch": run.micro,
            "grad_accum_steps": run.schedule.grad_accum_steps, "classes": len(run.classes),
            "train_images": train_images, "data": str(Path(data).resolve()), "fastrsb": __version__,
            "commit": source_commit()}


def _start_log(out: Path, d: Dist, command: str | None) -> None:
    """RUN_DIR/train.log from here (the run folder is made): rank 0's lines since the command
    started, under a line naming this start."""
    if not d.main:
        run_log.detach()
        return
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    run_log.attach(out / run_log.LOG_NAME, f"{command or 'fastrsb.train.train()'} | {started} | {socket.gethostname()} "
                                           f"(process {os.getpid()})")


def _epochs(run: Run, pos: Position, folder: RunFolder, stops: "Stops", log_every: int, hashed: bool = False) -> dict:
    """The epoch loop, from wherever `pos` stands."""
    epochs = run.recipe["epochs"]
    if not pos.validated:  # stopped after training an epoch, before its validation finished
        peak_memory.reset(run.device)  # its training's peak is in its row (pos.metrics)
        _validate_and_save(run, pos, folder)
    elif pos.epoch >= epochs and pos.step and run.d.main:
        print(f"this run already finished all {epochs} epochs")
    if run.device == "cuda" and run.recipe["compile"] and pos.epoch < epochs:  # no word for a minute looks hung
        _say(run, "compiling: the first steps wait for torch.compile (the model's forward and backward and LAMB's "
                  "update; a minute or two for a ResNet-50), and their pace counts in the first progress line")
    first = True  # the first epoch this process trains: its first steps compile
    while pos.epoch < epochs:
        resized = _crop_size_for(run, pos.epoch + 1)  # a new size compiles anew too: its pace is after that
        figures, first = train_one_epoch(run, pos, folder, stops, log_every, hashed, settling=first or resized), False
        if figures is None:  # a stop mid-epoch: `pos` says where
            _save(run, pos, folder)
            _say(run, f"stopped at {_where(run, pos)}")
            return {**pos.metrics, "stopped": True, "step": pos.step}
        # Every rank evaluates and saves the same model: BN statistics averaged, weights compared.
        average_bn_stats(run.training.model, run.d)
        if run.training.ema:
            average_bn_stats(run.training.ema.module, run.d)
        check_in_step(run.training.model, run.d)
        pos.epoch, pos.micro_done, pos.loss_sum, pos.seconds, pos.peak = pos.epoch + 1, 0, 0.0, 0.0, None
        pos.validated, pos.metrics = False, figures
        _save(run, pos, folder)  # the trained epoch is safe before validation reads one image
        _validate_and_save(run, pos, folder)
        if (agree([stops.signal.requested], run.d)[0] or stops.due(pos.step)) and pos.epoch < epochs:
            _say(run, f"stopped after epoch {pos.epoch}")
            return {**pos.metrics, "stopped": True}
    return pos.metrics


def _crop_size_for(run: Run, epoch: int) -> bool:
    """Progressive resizing: the train loader's crops at the size of `epoch` (fastrsb.progressive),
    its pipelines built anew where it changes. Returns whether it changed."""
    size = progressive.size_at(run.recipe, epoch)
    if size == run.train_data.settings["img_size"]:
        return False
    resize_train_loader(run.train_data, size)
    compiling = "; the first steps compile for it" if run.device == "cuda" and run.recipe["compile"] else ""
    _say(run, f"epoch {epoch}: crops of {size} px from here (progressive resizing{compiling})")
    return True


def _validate_and_save(run: Run, pos: Position, folder: RunFolder) -> None:
    t, started = run.training, time.perf_counter()
    metrics = {**pos.metrics, **evaluate(t.model, run.val_data, run.device, t.dtype, run.d)}
    if t.ema:
        metrics.update({f"ema_{k}": v for k, v in evaluate(t.ema.module, run.val_data, run.device, t.dtype,
                                                           run.d).items()})
    metrics["val_seconds"] = time.perf_counter() - started
    # The training's peak is in the row (pos.metrics), from whichever process trained the epoch.
    metrics.update(peak_memory.merged(pos.metrics, peak_memory.epoch_peak(run.device, run.d)))
    folder.log(metrics)
    left = run.recipe["epochs"] - pos.epoch
    # At the epoch's steady pace: the first steps' compiling of a process's first epoch is not the next ones'.
    # With progressive resizing each epoch ahead at its size's pace (fastrsb.progressive).
    size = metrics.get("img_size", run.recipe["img_size"])
    run.epoch_paces[size] = metrics.get("train_seconds_steady") or metrics["train_seconds"]
    seconds = progressive.train_seconds_ahead(run.recipe, pos.epoch, run.epoch_paces) + left * metrics["val_seconds"]
    eta = f"; {left} epoch(s) left, ~{_clock(seconds)}" if left else ""
    _say(run, f"epoch {pos.epoch}: train_loss {metrics['train_loss']:.4f} top1 {metrics['top1']:.2f} "
              f"top5 {metrics['top5']:.2f}{' (ema %.2f)' % metrics['ema_top1'] if t.ema else ''} "
              f"({metrics['images_per_sec']:,.0f} img/s train, {metrics['data_wait']:.0%} waiting for data, "
              f"{metrics['train_seconds']:.1f}s + {metrics['val_seconds']:.1f}s validation"
              f"{peak_memory.describe(metrics, run.device)}{eta})")
    # What the epoch is judged by: the EMA's top-1 where the run keeps an EMA, as timm's train.py
    # validates it in the model's place (its summary.csv's figures, its best checkpoint).
    score = metrics["ema_top1"] if t.ema else metrics["top1"]
    improved = score > pos.best_top1
    pos.best_top1, pos.metrics, pos.validated = max(pos.best_top1, score), metrics, True
    _save(run, pos, folder, best=improved, keep=True)


def _save(run: Run, pos: Position, folder: RunFolder, best: bool = False, keep: bool = False) -> None:
    save_run(run, pos, folder, best, keep)
    folder.saved = (folder.out / "last.pt", _where(run, pos))


def _where(run: Run, pos: Position) -> str:
    if pos.micro_done:
        return (f"step {pos.step} (epoch {pos.epoch + 1}, {run.schedule.steps_done(pos.micro_done)}/"
                f"{run.schedule.steps_per_epoch})")
    return f"step {pos.step} (epoch {pos.epoch} done)"


def _before_non_finite(saved: tuple[Path, str] | None) -> str:
    """What a run whose loss went to inf or NaN leaves, from what it saved (or resumed from), not
    from what a file system shows: the same on every machine of a run."""
    if saved is None:
        return "no checkpoint was written before it (a lower --set lr, or a look at the data)"
    path, where = saved
    return (f"the last checkpoint before it is {path}, at {where}; a resume from it repeats the same recipe "
            "(exactly, on the same setup): a lower --set lr in a new --out, or a look at the data")


@dataclass
class Stops:
    """When a run stops early. A signal is honoured at the next step in a single process; across
    processes at the next log step, where the ranks agree on it without an extra sync."""
    signal: StopRequest
    after_steps: int | None
    d: Dist

    def due(self, step: int) -> bool:
        """--stop-after-steps: the same on every rank, no agreement needed."""
        return self.after_steps is not None and step >= self.after_steps

    def check_now(self, step: int) -> bool:
        """Whether this step must be a log step, where stops are decided."""
        return self.due(step) or (self.signal.requested and not self.d.on)


class Interval:
    """Wall time, images and time spent waiting for the loader since the last log step. Both ends
    of an interval follow a host sync (the loss read back at each log step), so the share of the
    time waiting for data is a share of the device-paced time, not of the host's launch time."""

    def __init__(self):
        self.start, self.images, self.waited = time.perf_counter(), 0, 0.0

    def close(self) -> tuple[float, float]:
        """(images/s, share of the time waiting for data) of the interval; opens the next one."""
        now = time.perf_counter()
        seconds = max(now - self.start, 1e-9)
        result = self.images / seconds, self.waited / seconds
        self.start, self.images, self.waited = now, 0, 0.0
        return result


def train_one_epoch(run: Run, pos: Position, folder: RunFolder, stops: Stops, log_every: int,
                    hashed: bool = False, settling: bool = False) -> dict | None:
    """Train from `pos` to the end of its epoch, advancing `pos` step by step. Returns the epoch's
    training figures, or None when a stop was asked for (`pos` then says where it stopped).
    hashed: each log row gets the hash of the step's last micro-batch (--deterministic).
    settling: the first epoch this process trains, or the first at a new crop size (its first steps
    compile: train_seconds_steady)."""
    t, schedule, micro = run.training, run.schedule, run.micro
    t.model.train()
    peak_memory.reset(run.device)  # the epoch's peak: its training and validation
    progress = Progress(f"epoch {pos.epoch + 1}/{run.recipe['epochs']}", schedule.steps_per_epoch, enabled=run.d.main)
    loss_sum = torch.tensor(pos.loss_sum, device=run.device)  # summed on the device: no sync per step
    start, first_micro, waited = time.perf_counter(), pos.micro_done, 0.0
    # (time, micro-batches done) at the epoch's first progress line: in the first epoch a process
    # trains, torch.compile's compiling, a CUDA graph's capture and cuDNN's choices are behind it.
    settled = None
    interval, lr = Interval(), schedule.lr(pos.epoch, pos.micro_done)
    batches = loader_batches(run.train_data, run.train_data.images)
    while pos.micro_done < schedule.micro_per_epoch:
        # One optimizer step over a group of micro-batches (grad_accum_steps, or fewer at the end).
        group = min(schedule.grad_accum_steps, schedule.micro_per_epoch - pos.micro_done)
        lr = schedule.lr(pos.epoch, pos.micro_done)
        for k in range(group):
            before = time.perf_counter()
            images, labels = next(batches)
            interval.waited += time.perf_counter() - before
            if group == 1:  # the whole step at once (a CUDA graph's replay with cuda_graphs)
                loss = t.step.single(images, labels, lr)
            else:
                loss = t.step.accumulate(images, labels, group, last=k == group - 1)
            loss_sum += loss
        if group > 1:
            t.step.apply(lr)
        pos.step, pos.micro_done = pos.step + 1, pos.micro_done + group
        interval.images += group * micro
        if t.ema:
            t.ema.update(t.model, pos.step)
        done, last = schedule.steps_done(pos.micro_done), pos.micro_done == schedule.micro_per_epoch
        if done % log_every == 0 or last or stops.check_now(pos.step):
            current = loss.item()  # host sync: log steps only
            settled = settled or (time.perf_counter(), pos.micro_done)
            stopping, non_finite = agree([stops.signal.requested, not math.isfinite(current)], run.d)
            if non_finite:
                raise UserError(f"loss is not finite at step {pos.step} (epoch {pos.epoch + 1}): stopping; "
                                + _before_non_finite(folder.saved))
            waited += interval.waited
            rate, wait_share = interval.close()
            progress.update(done, rate, loss=current, lr=lr, data=wait_share)
            folder.log({"kind": "log", "epoch": pos.epoch + pos.micro_done / schedule.micro_per_epoch,
                        "step": pos.step, "loss": current, "lr": lr, "images_per_sec": rate, "data_wait": wait_share,
                        **({"batch_hash": batch_hash(images, labels)} if hashed else {})})
            if (stopping or stops.due(pos.step)) and not last:
                progress.close()
                pos.loss_sum, pos.seconds = loss_sum.item(), pos.seconds + time.perf_counter() - start
                pos.peak = peak_memory.merged(pos.peak, peak_memory.epoch_peak(run.device, run.d))  # saved with it
                return None
    progress.close()
    end = time.perf_counter()
    trained = end - start
    # The first epoch a process trains, at its pace after its first progress line (what the time
    # left is estimated from): it compiled, and takes minutes more than the next ones (ResNet-50's
    # first steps on a GPU: one to two minutes, where 8 GPUs train an A3 epoch in under one). Later
    # epochs' own times are their pace (their first steps' share of a new epoch's start included).
    steady = ((end - settled[0]) / (pos.micro_done - settled[1]) * schedule.micro_per_epoch
              if settling and settled and pos.micro_done > settled[1] else None)
    train_loss = (all_reduce_sum(loss_sum, run.d) / (schedule.micro_per_epoch * run.d.world)).item()
    return {"kind": "epoch", "epoch": pos.epoch + 1, "step": pos.step, "train_loss": train_loss, "lr": lr,
            "img_size": run.train_data.settings["img_size"],
            "images_per_sec": (schedule.micro_per_epoch - first_micro) * micro * run.d.world / trained,
            "data_wait": waited / trained, "train_seconds": pos.seconds + trained, "train_seconds_steady": steady,
            **peak_memory.merged(pos.peak, peak_memory.epoch_peak(run.device, run.d))}  # the training's, so far


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: str, dtype: torch.dtype | None, d: Dist = Dist(),
             real=None, per_class: bool = False) -> dict:
    """Top-1/top-5 and cross-entropy over every image of the loader exactly once, summed over all
    ranks. Runs the eager model: the test size and the short last batch would otherwise recompile.
    real (fastrsb.real_labels.RealTargets, on the device): the loader's labels are the images'
    positions, and ImageNet-ReaL's top-1/top-5 are counted beside. per_class: also "per_class",
    for each output index (class) its [images, top-1 hits, top-5 hits, the class its images are
    most often taken for (by top-1; the first of equals; -1 where none is wrong, or with more than
    CONFUSION_LIMIT outputs), how many], counted on the device."""
    model.eval()
    # top-1 hits, top-5 hits, summed loss; with real, ReaL's top-1 and top-5 hits and images rated
    sums = torch.zeros(6 if real is not None else 3, dtype=torch.float64, device=device)
    count = 0  # counted on the host: the batch sizes are known there, no copy to the device per batch
    by_class = confusion = None  # with per_class: (classes, 3) images, top-1 hits, top-5 hits; (classes^2,)
    progress, start = Progress("validation", len(loader), enabled=d.main), time.perf_counter()
    for done, (images, labels) in enumerate(loader_batches(loader, loader.images), 1):
        with autocast(device, dtype):
            logits = model(images).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        positions, labels = (labels, real.labels[labels]) if real is not None else (None, labels)
        hits = top.eq(labels.view(-1, 1))
        parts = [hits[:, 0].sum(), hits.any(dim=1).sum(), F.cross_entropy(logits, labels, reduction="sum")]
        if real is not None:  # (-1, a set's padding, matches no class)
            sets = real.sets[positions]
            found, rated = top.unsqueeze(2).eq(sets.unsqueeze(1)).any(dim=2), sets[:, 0] >= 0  # (B, 5), (B,)
            parts += [(found[:, 0] & rated).sum(), (found.any(dim=1) & rated).sum(), rated.sum()]
        sums += torch.stack(parts).double()
        if per_class:
            if by_class is None:
                by_class, confusion = _class_counters(logits.shape[1], device)
            by_class.index_add_(0, labels, torch.stack([torch.ones_like(hits[:, 0]), hits[:, 0], hits.any(dim=1)],
                                                       dim=1).double())
            if confusion.numel():  # (label, top-1) pairs counted: integers, exact in float32 to 2**24 a cell
                confusion.index_add_(0, labels * logits.shape[1] + top[:, 0], hits.new_ones(len(labels), dtype=torch.float))
        count += labels.shape[0]
        progress.update(done, count / max(time.perf_counter() - start, 1e-9))  # host counts only, no sync
    progress.close()
    totals = torch.cat([sums, sums.new_tensor([count])])  # one copy, one all-reduce, one host sync
    top1, top5, loss, *rest, count = all_reduce_sum(totals, d).tolist()
    figures = {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "val_loss": loss / count,
               "val_images": int(count)}
    if per_class:
        figures["per_class"] = _per_class_counts(by_class, confusion, d)
    if real is not None:
        real_top1, real_top5, rated = rest
        figures.update(real_top1=100.0 * real_top1 / max(rated, 1), real_top5=100.0 * real_top5 / max(rated, 1),
                       real_images=int(rated), real_labels=real.source)
    return figures


# The most outputs whose confusions evaluate counts (classes x classes float32 on the device: 64 MiB
# here; ImageNet-1k's 1,000 take 4 MB, ImageNet-21k's would take 1.7 TB).
CONFUSION_LIMIT = 4096


def _class_counters(classes: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.zeros(classes, 3, dtype=torch.float64, device=device)
    confusion = torch.zeros(classes * classes if classes <= CONFUSION_LIMIT else 0, dtype=torch.float, device=device)
    return counts, confusion


def _per_class_counts(by_class: torch.Tensor | None, confusion: torch.Tensor | None, d: Dist) -> list[list[int]]:
    """Every rank's per-class counts summed, with each class's most frequent wrong top-1 and its
    count (argmax: the first of equals), read back once."""
    if by_class is None:
        return []
    classes = by_class.shape[0]
    counts = all_reduce_sum(by_class, d)
    if confusion.numel():
        confusion = all_reduce_sum(confusion, d).view(classes, classes).fill_diagonal_(0)
        taken_count, taken_for = confusion.max(dim=1).values, confusion.argmax(dim=1)
        taken_for = torch.where(taken_count > 0, taken_for, -1)
    else:
        taken_for = taken_count = counts.new_full((classes,), -1)
    return torch.cat([counts, taken_for.view(-1, 1).double(), taken_count.view(-1, 1).double()], dim=1).long().tolist()


def _open_together(data: Path, out: Path, resume: str | None, d: Dist, lock: FolderLock,
                   wandb_project: str | None):
    """(train, val) image lists and the W&B project the run logs to (rank 0's; fastrsb.wandb_log),
    the start-up checks made on every rank's own view (its copy of the data) and on rank 0's (the
    run folder, which it alone writes, and holds locked from here), all stopping together."""
    error, found, project = None, (None, None), None
    try:
        if d.main:
            refuse_a_run_inside_the_splits(out, data)
            if out.is_dir():  # a run going on there is the first thing to say
                lock.take()
            refuse_a_second_run(out, resume)
        found = open_dataset(data)
        if d.main:  # now, not after the model and loaders are built (minutes on a GPU)
            make_folder(out, "the run folder")
            lock.take()
            project = wandb_log.project_of(out, wandb_project)
    except (UserError, DatasetError) as err:
        error = err
    stop_together(error, d, "the start-up checks (data folder, run folder)")
    return (*found, project)


def _check_files(train_images, val_images, d: Dist) -> None:
    """Empty, unreadable and non-image files stop the run before its first step, not hours into
    it. Rank 0 looks; every rank learns the verdict, so none waits on a rank that has stopped."""
    error = None
    if d.main:
        try:
            seconds = check_headers(train_images, val_images)
            print(f"checked the headers of {len(train_images) + len(val_images):,} files in {seconds:.1f}s")
        except UserError as err:
            error = err
    if agree([error is not None], d)[0]:
        raise error or UserError("rank 0 found broken files in the data folder (named in its output)")


def _say(run: Run, text: str) -> None:
    if run.d.main:
        print(text, flush=True)


def _graphs_said(run: Run) -> str:
    """The start-up line's word on CUDA graphs: on, or (cuda_graphs = auto on a GPU) why not."""
    if run.training.step.graphed is not None:
        return " + CUDA graphs"
    if run.recipe["cuda_graphs"] == "auto" and run.device == "cuda":
        why = graphs_unfit(run.device, run.d, run.training.dtype, run.schedule.grad_accum_steps)
        return f" (no CUDA graphs: {why})" if why else ""
    return ""


def _announce(run: Run, train_images, val_images, resumed_from: Path | None, pos: Position,
              shards: str | None) -> None:
    r, t = run.recipe, run.training
    amp = str(t.dtype).removeprefix("torch.") if t.dtype else "float32"
    _say(run, f"fastrsb {__version__}: {r['name']} | {r['model']} | {len(train_images):,} train / "
              f"{len(val_images):,} val images, {len(run.classes)} classes | {run.d.world} x {run.device} {amp}"
              f"{' compiled' if run.device == 'cuda' and r['compile'] else ''}{_graphs_said(run)} | "
              f"batch {r['batch_size']} = "
              f"{run.d.world} x {run.schedule.grad_accum_steps} x {run.micro} | {run.schedule.steps_per_epoch} steps x "
              f"{r['epochs']} epochs")
    _say(run, f"data: {describe_counts(train_images, val_images)}")
    if run.d.main and (shared := val_shares_train(train_images.files, val_images.files)):  # said by rank 0 alone
        _say(run, f"note: {shared}")
    for line in run_card(run, pos):
        _say(run, line)
    if t.origin:
        _say(run, t.origin)
    if shards:
        _say(run, shards)
    memory = gpu_memory_line(t.model, run.device, run.gib_outside_torch_before_loaders)
    if memory:
        _say(run, memory)
    if resumed_from:
        _say(run, f"resumed from {resumed_from} at {_where(run, pos)}")


def run_card(run: Run, pos: Position) -> list[str]:
    """The run next to the recipe as its file states it: the global batch and how it splits, the
    LR and whether it was rescaled (it never is: a changed batch is named), epochs, sizes, AMP."""
    r, t = run.recipe, run.training
    try:
        paper = load_recipe(r["name"]) if r["name"] in BUILTIN else None
    except UserError:
        paper = None
    steps = run.schedule.grad_accum_steps
    card = [f"run card: global batch {r['batch_size']} = {run.d.world} process(es) x {steps} micro-batch(es) x "
            f"{run.micro} images, {run.schedule.steps_per_epoch} optimizer steps an epoch"]
    if run.split_for_memory:
        card.append(f"          micro-batches of {run.micro}: the largest that fits {run.split_for_memory} with "
                    f"{1 - HEADROOM:.0%} headroom (--micro-batch to choose)")
    lr = f"LR {r['lr']:g} peak after {r['warmup_epochs']} warmup epoch(s) from {r['warmup_lr']:g}, cosine to {r['min_lr']:g}"
    if paper and paper["batch_size"] != r["batch_size"]:
        ratio = r["batch_size"] / paper["batch_size"]  # timm's train.py scales LAMB's (and Ada*'s) by its root
        lr += (f": not rescaled for batch {r['batch_size']} (recipe {r['name']}: batch {paper['batch_size']}, "
               f"LR {paper['lr']:g}; timm's rule for LAMB, the square root of the batch ratio, would give "
               f"{paper['lr'] * ratio ** 0.5:.3g}, a linear one {paper['lr'] * ratio:.3g}: --set lr= to choose)")
    elif paper:
        lr += f" (recipe {r['name']}'s, for its batch {paper['batch_size']})"
    card.append(f"          {lr}")
    amp = str(t.dtype).removeprefix("torch.") if t.dtype else "float32"
    card.append(f"          {progressive.describe(r)}, tested at {r['test_img_size']} px "
                f"(crop {r['crop_pct']}), {amp}; the time left is estimated after each epoch")
    card.append(f"          {_augmentation(r, run.train_data.settings)}")
    return card


def _augmentation(recipe: dict, loader: dict) -> str:
    """What the loader and the step do to each image: RandAugment and its form, repeats, mixing."""
    chosen = ", from aa_impl auto" if recipe["aa_impl"] == "auto" else ""
    compiled = ", compiled" if loader.get("compile_augment") else ""
    def resampled(interpolation: str) -> str:
        return "bilinear or bicubic at random" if interpolation == "random" else interpolation
    crops = recipe["train_interpolation"]
    if not recipe["aa"]:
        parts = [f"crops resampled {resampled(crops)}", "no RandAugment"]
    else:  # as timm: RandAugment's geometric ops follow the train interpolation
        parts = [f"crops and RandAugment's geometric ops resampled {resampled(crops)}",
                 f"RandAugment {recipe['aa']} ({loader['aa_impl']} form{compiled}{chosen})"]
    if loader["repeats"] > 1:
        parts.append(f"{loader['repeats']} views of each image, " + ("each on another process (timm's layout)"
                     if loader.get("spread_views") else "side by side in one process's batch"))
    mixing = [f"{name} {recipe[name]:g}" for name in ("mixup", "cutmix") if recipe[name] > 0]
    parts.append(f"{' / '.join(mixing)} with probability {recipe['mixup_prob']:g}" if mixing else "no mixup or cutmix")
    return "augmentation: " + ", ".join(parts)


def time_spent(rows: list[dict]) -> str:
    """How long a run's epochs took, from its epoch rows (every epoch, across resumes; start-up
    outside epochs not counted): 'N epoch(s) in h:mm:ss (training h:mm:ss at X img/s, validation
    h:mm:ss)', or '' without a validated epoch. An epoch resumed mid-way counts its images at the
    pace after the resume (its row's images/s covers that part only)."""
    epochs = [row for row in rows if row.get("kind") == "epoch" and "val_seconds" in row]
    if not epochs:
        return ""
    train = sum(row["train_seconds"] for row in epochs)
    val = sum(row["val_seconds"] for row in epochs)
    images = sum(row["images_per_sec"] * row["train_seconds"] for row in epochs)
    return (f"{len(epochs)} epoch(s) in {_clock(train + val)} (training {_clock(train)} at "
            f"{images / max(train, 1e-9):,.0f} img/s, validation {_clock(val)})")
