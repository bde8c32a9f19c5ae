"""One optimizer step, exactly as the trainer and `benchmarks/throughput.py` run it: mixup/cutmix
(outside the compiled region), forward under autocast, loss, backward (DDP all-reduce on the last
micro-batch of a group only), then LAMB through the GradScaler. With the recipe's cuda_graphs, a
step of one micro-batch replays forward, loss, backward and LAMB as one CUDA graph (GraphedStep).

Host syncs: none with bf16 or float32. On the fp16 path (GPUs without bf16, e.g. V100 and T4) the
GradScaler's `step` reads its inf/NaN check back to the host once per optimizer step (inside
torch: `found_inf.item()`), so the host waits for the backward pass there every step."""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastrsb.device import autocast
from fastrsb.distributed import Dist
from fastrsb.pipelines.cuda_graphs import capture, first_line, on_side_stream

# images (B, 3, H, W), labels (B,) int64 -> images, targets (B, K) float32
Prepare = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def wrap_model(model: nn.Module, d: Dist, device: str, compile_model: bool, shapes: int = 1) -> nn.Module:
    """DDP across ranks, then torch.compile if asked (DDPOptimizer splits the graph at bucket
    boundaries so gradient communication overlaps the backward pass). In inductor's default mode
    also with cuda_graphs: GraphedStep captures the whole step, the optimizer included, which
    "reduce-overhead" cannot (it skips the LAMB update, which mutates its inputs; and at a70b3c8
    a run with it died of a segfault on the H200).
    shapes: the batch shapes the step will meet (progressive resizing: one a crop size). Each is
    compiled static (dynamic=False): by default dynamo compiles the second shape it meets with
    symbolic sizes and runs every later one, the final size's epochs too, through kernels made for
    any size; and the recompile limit is raised to let each have its own."""
    if d.on:
        # Buffers broadcast before every forward (DDP's default, stated because exact resume depends
        # on it): every forward starts from rank 0's BatchNorm statistics, so the rank-0 statistics a
        # mid-epoch checkpoint saves are the ones every rank continues from.
        model = DistributedDataParallel(model, device_ids=[d.local_rank] if device == "cuda" else None,
                                        **_sync_buffers_every_forward())
    if compile_model:
        torch._logging.set_logs(recompiles=True)  # a recompile in steady state costs seconds: show it
        _allow_recompiles(shapes)
        model = torch.compile(model, dynamic=False)
    return model


def _allow_recompiles(shapes: int) -> None:
    """Dynamo's recompile limit a frame (8; `recompile_limit`, `cache_size_limit` before it was
    renamed) raised to the shapes and a margin (train and eval modes), never lowered: past it a
    frame runs uncompiled."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), shapes + 2))


def _sync_buffers_every_forward() -> dict:
    """DDP's keyword for it: `forward_sync_buffers` where torch has it (2.14 deprecates
    `broadcast_buffers` with a warning on every run), `broadcast_buffers` before (2.11)."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": True}
    return {"broadcast_buffers": True}


class TrainStep:
    def __init__(self, step_model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 loss_fn, prepare: Prepare | None, device: str, dtype: torch.dtype | None,
                 cuda_graphs: bool = False):
        """prepare: labels -> targets (the mixer, or one-hot targets); None: batches come with targets.
        cuda_graphs: steps of one micro-batch (`single`) replay a CUDA graph (GraphedStep)."""
        self.step_model, self.optimizer, self.scaler = step_model, optimizer, scaler
        self.loss_fn, self.prepare, self.device, self.dtype = loss_fn, prepare, device, dtype
        self.graphed = GraphedStep(self) if cuda_graphs else None

    def run_uncaptured(self) -> None:
        """Steps run eagerly from here on, where cuda_graphs = auto meets a run the graph does not
        fit (gradient accumulation, found once the batch is split): LAMB's update eager too, as
        make_optimizer makes it for a step never captured."""
        if self.graphed is not None:
            self.graphed = None
            self.optimizer.use_eager_update()

    @property
    def captured(self) -> bool | None:
        """With cuda_graphs: whether steps replay the graph (False during the warm-up steps and
        after a capture that failed); None without."""
        return None if self.graphed is None else self.graphed.graph is not None and not self.graphed.failed

    def single(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> torch.Tensor:
        """A whole optimizer step on one micro-batch; returns its loss as a device tensor."""
        if self.graphed is not None:
            return self.graphed(images, labels, lr)
        loss = self.accumulate(images, labels, group=1, last=True)
        self.apply(lr)
        return loss

    def accumulate(self, images: torch.Tensor, labels: torch.Tensor, group: int, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch of a group of `group`; returns the (undivided)
        loss as a device tensor."""
        images, targets = self.prepare(images, labels) if self.prepare is not None else (images, labels)
        no_sync = getattr(self.step_model, "no_sync", None)
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            loss = self.forward_backward(images, targets, group)
        return loss.detach()

    def forward_backward(self, images: torch.Tensor, targets: torch.Tensor, group: int = 1,
                         autocast_cache: bool = True) -> torch.Tensor:
        with autocast(self.device, self.dtype, cache=autocast_cache):
            logits = self.step_model(images)
        loss = self.loss_fn(logits, targets)
        self.scaler.scale(loss / group).backward()
        return loss

    def apply(self, lr: float) -> None:
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        self.scaler.step(self.optimizer)  # fp16 only: one host sync (see the module's docstring)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


class GraphedStep:
    """Forward, loss, backward, gradient clip and LAMB update of one micro-batch as one CUDA graph:
    the host launches one graph a step instead of hundreds of kernels (ResNet-50's forward and
    backward, inductor's and cuDNN's, and LAMB's), so the main thread is free for the loader's
    hand-over and the mixing, and the GPU does not wait between kernels for the host.

    The pattern of PyTorch's "whole-network capture": the first WARMUP steps run eagerly on a side
    stream (inductor compiles, cuDNN picks its algorithms, the gradients and LAMB's moments are
    allocated), the next one is captured and then replayed, and every later one copies its batch
    into the graph's input buffers and replays. Mixup/cutmix stays outside the graph (its draws
    are the host's: timm's np.random sequence), and so do the LR and bias corrections, which the
    host writes into device scalars before each replay (Lamb.advance). The gradients live in the
    graph's memory from the capture on and are overwritten, not accumulated, by each replay.

    Where it applies (fastrsb.parts refuses the rest before the first step): one process, bf16 or
    float32 (fp16's GradScaler reads back to the host each step), one micro-batch a step. The
    capture rules are fastrsb.pipelines.cuda_graphs'. A capture that fails is said once and the
    run continues with the eager step. Batches of another shape (a run's crops resized between
    epochs) are warmed up and captured anew."""

    WARMUP = 3

    def __init__(self, step: TrainStep):
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0
        self.failed = False
        self.images = self.targets = self.loss = None  # the graph's static input and output buffers
        self.side: torch.cuda.Stream | None = None  # every warm-up step's (on_side_stream)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> torch.Tensor:
        step = self.step
        images, targets = step.prepare(images, labels) if step.prepare is not None else (images, labels)
        for group in step.optimizer.param_groups:
            group["lr"] = lr
        if self.failed:
            return self._eager(images, targets)
        if self.graph is not None and images.shape != self.images.shape:  # progressive resizing: a new size
            self._forget()
        if self.graph is None and self.eager_steps < self.WARMUP:
            self.eager_steps += 1
            self.side = self.side or torch.cuda.Stream()
            return on_side_stream(lambda: self._eager(images, targets), self.side)
        if self.graph is None:
            return self._capture(images, targets)
        self.images.copy_(images)
        self.targets.copy_(targets)
        step.optimizer.advance()
        self.graph.replay()
        return self.loss.clone()  # the next replay overwrites the graph's own

    def _forget(self) -> None:
        """Batches of another shape: the graph (and with it its memory, once _eager has let go of
        the gradients it holds) is dropped, and the next steps warm up and capture anew."""
        self.graph = self.images = self.targets = self.loss = None
        self.eager_steps = 0

    def _eager(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        step = self.step
        step.optimizer.zero_grad(set_to_none=True)
        loss = step.forward_backward(images, targets, autocast_cache=False)
        step.optimizer.update(step.optimizer.prepare())
        return loss.detach()

    def _capture(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        step = self.step
        self.images, self.targets = images.clone(), targets.clone()  # clone keeps channels-last strides
        step.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients anew
        step.optimizer.advance()  # this step's LR and bias corrections, before the graph reads them

        def step_on_device():
            loss = step.forward_backward(self.images, self.targets, autocast_cache=False).detach()
            step.optimizer.update(step.optimizer.work())
            return loss
        try:
            graph, loss = capture(step_on_device)
        except RuntimeError as err:
            self.failed = True
            print(f"cuda_graphs: the step could not be captured ({first_line(err)}); "
                  "training on with the step uncaptured", flush=True)
            for group in step.optimizer.param_groups:  # this step was counted by advance(): not taken
                group["step"] -= 1
            step.optimizer.use_eager_update()  # compiled, it pays off inside a graph only (make_optimizer)
            return self._eager(images, targets)
        self.graph, self.loss = graph, loss
        graph.replay()  # capturing runs nothing: this replay is the step
        return self.loss.clone()
