"""One optimizer step, exactly as the trainer and `benchmarks/throughput.py` run it: mixup/cutmix
(outside the compiled region), forward under autocast, loss, backward (DDP all-reduce on the last
micro-batch of a group only), then LAMB through the GradScaler. Nothing here reads the device."""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastrsb.device import autocast
from fastrsb.distributed import Dist
from fastrsb.mix import BatchMixer


def wrap_model(model: nn.Module, d: Dist, device: str, compile_model: bool) -> nn.Module:
    """DDP across ranks, then torch.compile on the GPU (DDPOptimizer splits the graph at bucket
    boundaries so gradient communication overlaps the backward pass)."""
    wrapped = DistributedDataParallel(model, device_ids=[d.local_rank] if device == "cuda" else None) if d.on else model
    if device == "cuda" and compile_model:
        torch._logging.set_logs(recompiles=True)  # a recompile in steady state costs seconds: show it
        wrapped = torch.compile(wrapped)
    return wrapped


class TrainStep:
    def __init__(self, step_model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 loss_fn, mixer: BatchMixer | None, device: str, dtype: torch.dtype | None):
        self.step_model, self.optimizer, self.scaler = step_model, optimizer, scaler
        self.loss_fn, self.mixer, self.device, self.dtype = loss_fn, mixer, device, dtype

    def accumulate(self, images: torch.Tensor, targets: torch.Tensor, group: int, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch of a group of `group`; returns the (undivided)
        loss as a device tensor. targets: class indices (mixed here) or ready soft targets."""
        if self.mixer is not None:
            images, targets = self.mixer(images, targets)
        no_sync = getattr(self.step_model, "no_sync", None)
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            with autocast(self.device, self.dtype):
                logits = self.step_model(images)
            loss = self.loss_fn(logits, targets)
            self.scaler.scale(loss / group).backward()
        return loss.detach()

    def apply(self, lr: float) -> None:
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
