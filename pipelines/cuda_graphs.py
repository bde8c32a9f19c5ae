"""Replaying fixed-shape GPU work as CUDA graphs: one launch instead of hundreds, so that the host
thread that feeds the GPU (the trainer's main thread) stays free and the GPU does not wait between
kernels for it. Used by the torch form of RandAugment (CapturedCall below) and by the trainer's
whole-step graph (fastrsb.step.GraphedStep).

PyTorch's rules for capture, followed here: warm up on a side stream first (lazy allocations,
cuDNN's and inductor's first-call work happen there, not in the graph); capture in thread-local
mode, because DALI's own threads keep calling CUDA (allocations, their streams) while the main
thread captures; inputs are copied into the graph's own buffers before each replay; outputs are
the graph's own buffers, overwritten by the next replay."""
from __future__ import annotations

from typing import Callable

import torch


def on_side_stream(work: Callable[[], torch.Tensor], side: torch.cuda.Stream) -> torch.Tensor:
    """work() on `side`, ordered after and before the current stream's work.

    Every warm-up call of one graph passes the same side stream, as PyTorch's capture examples
    do: torch's allocator keeps a freed block for the stream it was allocated on, and
    torch.cuda.Stream() hands out its pool's streams in turn, so warm-ups on a fresh stream each
    would each cache a set of memory of their own until the capture empties the cache (likely
    why the A3 step alone at c5b2a17, 3 warm-ups on 3 streams, reserved 13.9 GiB at the peak for
    5.9 allocated, where the uncaptured step had reserved 6.8)."""
    outer = torch.cuda.current_stream()
    side.wait_stream(outer)
    with torch.cuda.stream(side):
        result = work()
    outer.wait_stream(side)
    result.record_stream(outer)  # made on the side stream, used and freed on the outer one
    return result


def capture(work: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """(graph, its output buffer): work() captured, not run (replay the graph to run it)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        result = work()
    return graph, result


def first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


class CapturedCall:
    """fn(*inputs) -> one tensor, for fixed-shape CUDA inputs and no host sync inside: the first
    `warmup` calls run eagerly on a side stream, the next is captured, and every later call copies
    its inputs into the graph's buffers and replays. Returns a tensor of its own (a copy of the
    graph's output), so a batch kept by the caller is not overwritten by the next one. Inputs of
    another shape than the captured ones, and every call after a capture that failed (said once),
    run eagerly."""

    def __init__(self, fn: Callable[..., torch.Tensor], name: str, warmup: int = 2):
        self.fn, self.name, self.warmup = fn, name, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.inputs: list[torch.Tensor] = []
        self.output: torch.Tensor | None = None
        self.side: torch.cuda.Stream | None = None  # every warm-up call's (on_side_stream)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.failed or not all(x.is_cuda for x in inputs):
            return self.fn(*inputs)
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            self.side = self.side or torch.cuda.Stream()
            return on_side_stream(lambda: self.fn(*inputs), self.side)
        if self.graph is None:
            self.inputs = [x.clone() for x in inputs]  # clone keeps the strides (channels-last too)
            try:
                self.graph, self.output = capture(lambda: self.fn(*self.inputs))
            except RuntimeError as err:
                self.failed = True
                print(f"{self.name}: could not be captured as a CUDA graph ({first_line(err)}); "
                      "running on without one", flush=True)
                return self.fn(*inputs)
        elif any(x.shape != s.shape or x.dtype != s.dtype for x, s in zip(inputs, self.inputs)):
            return self.fn(*inputs)
        else:
            for static, x in zip(self.inputs, inputs):
                static.copy_(x)
        self.graph.replay()
        return self.output.clone()
