"""One optimizer step, exactly as the trainer and `benchmarks/throughput.py` run it: mixup/cutmix
(outside the compiled region), forward under autocast, loss, backward (DDP all-reduce on the last
micro-batch of a group only), then LAMB through the GradScaler.

Host syncs: none with bf16 or float32. On the fp16 path (GPUs without bf16, e.g. V100 and T4) the
GradScaler's `step` reads its inf/NaN check back to the host once per optimizer step (inside
torch: `found_inf.item()`), so the host waits for the backward pass there every step."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastrsb.device import autocast
from fastrsb.distributed import Dist

# images (B, 3, H, W), labels (B,) int64 -> images, targets (B, K) float32
Prepare = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def wrap_model(model: nn.Module, d: Dist, device: str, compile_model: bool, cuda_graphs: bool = False) -> nn.Module:
    """DDP across ranks, then torch.compile if asked (DDPOptimizer splits the graph at bucket
    boundaries so gradient communication overlaps the backward pass). cuda_graphs: compile in
    "reduce-overhead" mode, which replays the forward and backward as CUDA graphs (one launch
    instead of hundreds; inputs copied into the graph's static buffers)."""
    if d.on:
        # broadcast_buffers=True (DDP's default, stated because exact resume depends on it): every
        # forward starts from rank 0's BatchNorm statistics, so the rank-0 statistics a mid-epoch
        # checkpoint saves are the ones every rank continues from.
        model = DistributedDataParallel(model, device_ids=[d.local_rank] if device == "cuda" else None,
                                        broadcast_buffers=True)
    if compile_model:
        torch._logging.set_logs(recompiles=True)  # a recompile in steady state costs seconds: show it
        model = torch.compile(model, mode="reduce-overhead" if cuda_graphs else None)
    return model


class TrainStep:
    def __init__(self, step_model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 loss_fn, prepare: Prepare | None, device: str, dtype: torch.dtype | None):
        """prepare: labels -> targets (the mixer, or one-hot targets); None: batches come with targets."""
        self.step_model, self.optimizer, self.scaler = step_model, optimizer, scaler
        self.loss_fn, self.prepare, self.device, self.dtype = loss_fn, prepare, device, dtype

    def accumulate(self, images: torch.Tensor, labels: torch.Tensor, group: int, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch of a group of `group`; returns the (undivided)
        loss as a device tensor."""
        images, targets = self.prepare(images, labels) if self.prepare is not None else (images, labels)
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
        self.scaler.step(self.optimizer)  # fp16 only: one host sync (see the module's docstring)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
