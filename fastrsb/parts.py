"""The parts of a run, built in one place from a recipe: the model and its optimizer step, the
loaders, the schedule. `fastrsb train`, `benchmarks/throughput.py` and the tests all build them
here, so what is measured is what is trained."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastrsb import progressive
from fastrsb.accumulation import cpu_fits, gpu_fits, per_process_batch, plan
from fastrsb.data_folder import explain_loader_error
from fastrsb.device import amp_dtype, gib_outside_torch
from fastrsb.distributed import Dist, smallest, stop_together
from fastrsb.ema import ModelEma
from fastrsb.errors import UserError
from fastrsb.loss import make_loss
from fastrsb.mix import BatchMixer, check_pairable, mixing_enabled, soft_targets
from fastrsb.model import check_input_sizes, make_model
from fastrsb.optim import Lamb, lr_at, make_optimizer
from fastrsb.pipelines import DatasetError, ImageList, train_loader, val_loader
from fastrsb.step import TrainStep, wrap_model


def check_micro_batch(recipe: dict, world: int, steps: int, micro: int) -> None:
    """Mixup/cutmix pair images within a micro-batch: it must be even when they are on."""
    if mixing_enabled(recipe["mixup"], recipe["cutmix"]):
        try:
            check_pairable(micro)
        except ValueError as err:
            raise UserError(f"batch_size {recipe['batch_size']} = {world} process(es) x {steps} accumulation step(s) "
                            f"x {micro}: {err}") from None


def check_fills_a_step(batch_size: int, images: int, world: int) -> None:
    """An epoch holds one optimizer step at least. A train set smaller than the recipe's batch
    would otherwise train on what there is (accumulated: a step of fewer images than the batch the
    LR is for) or stop in the loader with a message about one process's micro-batch."""
    per_process = per_process_batch(batch_size, world)
    if images // world < per_process:
        raise UserError(f"the {images} train images ({images // world} a process over {world}) do not fill one "
                        f"optimizer step of batch_size {batch_size} ({per_process} images a process): "
                        "a data set this small needs a smaller --set batch_size (and an --set lr for it)")


class PlainTargets:
    """Labels -> one-hot (smoothed) targets for the loss when mixup and cutmix are off."""

    def __init__(self, num_classes: int, smoothing: float):
        self.num_classes, self.smoothing = num_classes, smoothing

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images, soft_targets(labels, self.num_classes, 1.0, self.smoothing)


@dataclass
class Training:
    """What an optimizer step needs. `model` is the plain module (its state_dict is what checkpoints
    hold); `step` runs it wrapped (DDP, compiled) with mixing, loss, backward and LAMB."""
    model: nn.Module
    step: TrainStep
    optimizer: Lamb
    scaler: torch.amp.GradScaler
    ema: ModelEma | None
    mixer: BatchMixer | None  # None when mixup and cutmix are off
    dtype: torch.dtype | None  # autocast dtype; None: float32
    high_priority_stream: bool = False  # run the steps under fastrsb.device.step_stream
    origin: str | None = None  # where the initial weights came from (initial_checkpoint), for the run card


def build_training(recipe: dict, num_classes: int, device: str, d: Dist = Dist(),
                   classes: list[str] | None = None, data: Path | None = None) -> Training:
    """classes: the run's by name; with them, the recipe's initial_checkpoint is read (a new run's:
    a resumed one passes none, its checkpoint has the weights). data: the run's data folder."""
    # Per-process random streams, as timm seeds them (seed + rank): the model's initial weights
    # (rank 0's reach every rank, below), stochastic depth, mixup/cutmix.
    torch.manual_seed(recipe["seed"] + d.rank)
    model = make_model(recipe["model"], num_classes, recipe["drop_path"])
    check_input_sizes(model, {"img_size": [recipe["img_size"]], "test_img_size": [recipe["test_img_size"]]})
    origin = _initial_weights(model, recipe, classes, d, data) if classes is not None else None
    model = model.to(device)
    # The recipe's `compile` applies on the GPU: on a few CPU cores inductor takes minutes over a
    # ResNet-50 (and the CPU path serves tests and machines without a GPU).
    compiled = recipe["compile"] and device == "cuda"
    dtype = amp_dtype(device, recipe["amp"])
    graphs = _cuda_graphs(recipe, device, d, dtype)
    if recipe["high_priority_stream"] and device != "cuda":
        raise UserError("high_priority_stream = true needs a GPU (this run is on the CPU): "
                        "--set high_priority_stream=false")
    optimizer = make_optimizer(model, recipe, compiled=compiled, captured=graphs)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    mixer = None
    if mixing_enabled(recipe["mixup"], recipe["cutmix"]):
        mixer = BatchMixer(num_classes, recipe["mixup"], recipe["cutmix"], recipe["mixup_prob"],
                           recipe["mixup_switch_prob"], recipe["smoothing"], np.random.RandomState(recipe["seed"] + d.rank))
    if device == "cuda" and not torch.are_deterministic_algorithms_enabled():
        torch.backends.cudnn.benchmark = True  # fixed shapes (train loaders drop the last batch; a size an epoch)
    # DDP's constructor broadcasts rank 0's weights and buffers to every rank ...
    step_model = wrap_model(model, d, device, compiled, shapes=len(progressive.sizes(recipe)))
    # ... so the EMA, a copy of the model, is taken after it: every rank's EMA starts from rank 0's weights.
    ema = ModelEma(model, recipe["model_ema_decay"]) if recipe["model_ema"] else None
    prepare = mixer or PlainTargets(num_classes, recipe["smoothing"])
    step = TrainStep(step_model, optimizer, scaler, make_loss(recipe), prepare, device, dtype, cuda_graphs=graphs)
    return Training(model, step, optimizer, scaler, ema, mixer, dtype, recipe["high_priority_stream"], origin)


def _initial_weights(model: nn.Module, recipe: dict, classes: list[str], d: Dist, data: Path | None) -> str | None:
    """The recipe's initial_checkpoint into the model, read on every rank (a rank that cannot read
    it stops them all, rather than leaving them in DDP's first broadcast)."""
    if not recipe["initial_checkpoint"]:
        return None
    from fastrsb.initial_weights import load_initial_weights
    origin = error = None
    try:
        origin = load_initial_weights(model, recipe["initial_checkpoint"], recipe["model"], classes, data)
    except UserError as err:
        error = err
    stop_together(error, d, "reading initial_checkpoint")
    return origin


def graphs_unfit(device: str, d: Dist, dtype: torch.dtype | None, micro_batches: int = 1) -> str | None:
    """Why a run's step cannot be one CUDA graph (fastrsb.step.GraphedStep), or None where it can."""
    if device != "cuda":
        return "this run is on the CPU"
    if d.on:
        return f"{d.world} processes: DDP's gradient all-reduce is not captured in the graphs"
    if dtype == torch.float16:
        return "this GPU trains in fp16, whose GradScaler reads its inf/NaN check back to the host every step"
    if micro_batches > 1:
        return f"each step is {micro_batches} micro-batches (gradient accumulation)"
    return None


def _cuda_graphs(recipe: dict, device: str, d: Dist, dtype: torch.dtype | None) -> bool:
    """The recipe's cuda_graphs as far as the run's device, processes and precision tell: "auto"
    where it can apply; true refused where it cannot (rather than silently ignored). Gradient
    accumulation, known once the batch is split, is checked in build_run."""
    if not recipe["cuda_graphs"]:
        return False
    unfit = graphs_unfit(device, d, dtype)
    if unfit is None or recipe["cuda_graphs"] == "auto":
        return unfit is None
    if device != "cuda":
        raise UserError("cuda_graphs = true needs a GPU (this run is on the CPU): --set cuda_graphs=false "
                        "(or auto: on where it applies)")
    if d.on:
        raise UserError("cuda_graphs = true runs in one process only for now (DDP's gradient all-reduce is not "
                        "captured in the graphs): --set cuda_graphs=false (or auto) under torchrun")
    raise UserError("cuda_graphs = true needs bf16 or float32: this GPU trains in fp16, whose GradScaler "
                    "reads its inf/NaN check back to the host every step (--set cuda_graphs=false, or auto)")


def _open_loader(make, images: ImageList, *args, **kwargs):
    try:
        return make(images, *args, **kwargs)
    except DatasetError as err:
        raise UserError(str(err)) from None
    except RuntimeError as err:  # DALI reads the first batches while building the iterator
        raise explain_loader_error(err, images) from None


def open_train_loader(recipe: dict, images: ImageList, micro: int, device: str, d: Dist = Dist(),
                      num_threads: int | None = None, state: dict | None = None, seed: int | None = None,
                      img_size: int | None = None, **speed):
    """The recipe's train loader for this rank's shard: its RandAugment and repeated augmentation,
    the shuffle seeded alike on every rank (disjoint shards), pixels in the loader's default dtype.
    speed: train_loader's options that change its speed only (hw_decoder_load, prefetch_queue_depth,
    stream_policy, concurrency, augment_stream, stream_handover), and aa_impl / cuda_graphs /
    compile_augment to override the recipe's. seed: the loaders' (default: the recipe's).
    The recipe's `compile` compiles the torch RandAugment form too, on the GPU only (as the model:
    on a few CPU cores a compile costs more than it saves in a short run).
    img_size: the crops' (default: the recipe's img_size; a run's with progressive resizing: its
    first epoch's, fastrsb.progressive)."""
    # (the loader's torch form is captured in each process, DDP or not: "auto" is on wherever there is a GPU)
    speed.setdefault("cuda_graphs", bool(recipe["cuda_graphs"]) and device == "cuda")
    speed.setdefault("compile_augment", recipe["compile"] and device == "cuda")
    return _open_loader(train_loader, images, micro, img_size or recipe["img_size"], device=device, shard_id=d.rank,
                        num_shards=d.world, seed=recipe["seed"] if seed is None else seed, num_threads=num_threads,
                        spread_views=recipe["aug_repeats_across_ranks"], state=state,
                        **{**train_augmentation(recipe), **speed})


def resize_train_loader(loader, img_size: int) -> None:
    """loader.resize(img_size) (progressive resizing), a failure said as opening a loader's is."""
    try:
        loader.resize(img_size)
    except RuntimeError as err:  # DALI reads the first batches at the new size as it builds the pipelines
        raise explain_loader_error(err, loader.images) from None


def train_augmentation(recipe: dict) -> dict:
    """The recipe's augmentation as train_loader's options (the run's loader, and the doctor's
    probe of the same graph): RandAugment and its form, the crops' resampling, repeated views."""
    return dict(aa=recipe["aa"], aa_impl=recipe["aa_impl"], interpolation=recipe["train_interpolation"],
                repeats=max(1, recipe["aug_repeats"]))


def open_val_loader(recipe: dict, images: ImageList, batch: int, device: str, d: Dist = Dist(),
                    num_threads: int | None = None, img_size: int | None = None, crop_pct: float | None = None):
    return _open_loader(val_loader, images, batch, img_size or recipe["test_img_size"], crop_pct or recipe["crop_pct"],
                        device=device, shard_id=d.rank, num_shards=d.world, num_threads=num_threads)


@dataclass(frozen=True)
class Schedule:
    """Steps per epoch and the LR at each step."""
    micro_per_epoch: int  # micro-batches per epoch (len of the train loader)
    grad_accum_steps: int
    recipe: dict

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_per_epoch / self.grad_accum_steps)  # as timm: a short last group

    def steps_done(self, micro_done: int) -> int:
        return math.ceil(micro_done / self.grad_accum_steps)

    def lr(self, epoch: int, micro_done: int) -> float:
        """The LR of the step after `micro_done` micro-batches of epoch `epoch` (from 0). Placed by
        the epoch and this run's steps into it, not by the steps taken so far: a run resumed from a
        checkpoint of an earlier fastrsb, or of another micro-batch, may have taken another number
        of steps an epoch before, and its schedule still ends at its last step. Otherwise the two
        are the same."""
        r = self.recipe
        step = epoch * self.steps_per_epoch + self.steps_done(micro_done)
        return lr_at(step, self.steps_per_epoch, r["epochs"], r["lr"], r["warmup_epochs"], r["warmup_lr"], r["min_lr"])


@dataclass
class Run:
    """Everything `fastrsb train` builds before its first step."""
    recipe: dict
    device: str
    d: Dist
    training: Training
    train_data: object  # fastrsb.pipelines.DaliLoader
    val_data: object
    schedule: Schedule
    classes: list[str]
    micro: int  # images per process and micro-batch
    gib_outside_torch_before_loaders: float | None = None  # GPU: the CUDA context's and libraries' (device.py)
    loader_seed: int | None = None  # the train loaders' seed (run_state.loader_start), saved with checkpoints
    split_for_memory: str | None = None  # where the batch did not fit whole: what the micro-batch fits ("on this GPU")
    # an epoch's training seconds at each crop size trained so far in this process: the time left
    epoch_paces: dict[int, float] = field(default_factory=dict)


def build_run(recipe: dict, train_images: ImageList, val_images: ImageList, device: str, d: Dist,
              num_threads: int | None = None, grad_accum: str | int = "auto", micro_batch: int | None = None,
              loader_state: dict | None = None, resumed: bool = False, loader_seed: int | None = None,
              data: Path | None = None, first_epoch: int = 1) -> Run:
    """The parts of a run. grad_accum / micro_batch: how the global batch splits (fastrsb.accumulation;
    "auto" probes the GPU for the largest micro-batch that fits); loader_state: this rank's saved
    loader position when resuming; resumed: the weights come from a checkpoint, not initial_checkpoint;
    loader_seed: the train loaders' seed (default: the recipe's); data: the data folder;
    first_epoch: the epoch (from 1) the run trains first: its crop size is the loader's."""
    loader_seed = recipe["seed"] if loader_seed is None else loader_seed
    training = build_training(recipe, len(train_images.classes), device, d,
                              classes=None if resumed else train_images.classes, data=data)
    fits = None
    if device == "cuda" and grad_accum == "auto" and micro_batch is None:
        fits = gpu_fits(training.model, recipe["img_size"], training.dtype, len(train_images.classes))
    elif grad_accum == "auto" and micro_batch is None:  # the CPU: a step too large is killed without a word
        fits = cpu_fits(training.model, recipe["img_size"], int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    steps, micro = plan(recipe, d.world, grad_accum, micro_batch, fits)
    if fits is not None:  # each rank probed its own memory: all take the smallest, or their collectives part ways
        micro = smallest(micro, d)  # a divisor of the per-process batch too (every candidate is)
        steps = recipe["batch_size"] // d.world // micro
    check_micro_batch(recipe, d.world, steps, micro)
    if recipe["cuda_graphs"] is True and steps > 1:
        raise UserError(f"cuda_graphs = true captures a step of one micro-batch; this run splits each step into "
                        f"{steps} micro-batches of {micro} (gradient accumulation): --set cuda_graphs=false (or "
                        f"auto), or --grad-accum-steps 1 where the whole batch fits the GPU")
    if steps > 1:  # cuda_graphs = auto: a step of several micro-batches runs uncaptured
        training.step.run_uncaptured()
    before_loaders = gib_outside_torch(device)  # so that the start-up line tells the loaders' memory apart
    # The loaders decode their first batches as they open: a file that fails there (a truncated
    # JPEG passes the header scan) stops every rank, not only the one that read it.
    error = train_data = val_data = None
    try:
        check_fills_a_step(recipe["batch_size"], len(train_images), d.world)
        train_data = open_train_loader(recipe, train_images, micro, device, d, num_threads, loader_state,
                                       seed=loader_seed, img_size=progressive.size_at(recipe, first_epoch))
        val_data = open_val_loader(recipe, val_images, micro, device, d, num_threads)
    except UserError as err:
        error = err
    stop_together(error, d, "opening the data loaders")
    split = fits.where[0] if fits is not None and steps > 1 else None  # gpu_fits' and cpu_fits' own words
    return Run(recipe, device, d, training, train_data, val_data, Schedule(len(train_data), steps, recipe),
               train_images.classes, micro, before_loaders, loader_seed, split)
