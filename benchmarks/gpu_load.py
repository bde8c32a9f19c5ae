"""A steady load on the GPU from a thread and a CUDA stream of its own, to time something else
beside it: `throughput.py --mode loader --gpu-load`.

Why (issue 13): A3 end to end runs at about 1 / (1 / loader + 1 / step), as if the loader's work
waited for the step's instead of running beside it. Timing the loader alone, then beside this
load, which takes the SMs as the step does but depends on nothing the loader makes, tells the two
readings apart: if the loader keeps its pace, its work does not wait for the GPU's other work and
the trainer's loop is where they serialize; if it slows to about the sum of the two, something in
the loader waits for the whole GPU (a device-wide sync, or its kernels queued behind the load's).
"""
from __future__ import annotations

import collections
import threading
import time

import torch


class GpuLoad:
    """Products of two SIZE x SIZE bfloat16 matrices, back to back on a stream of their own,
    launched by a daemon thread that keeps at most DEPTH of them queued: it waits on an event of
    its stream, never on the device, so nothing else waits for it. Each product fills every SM
    for about 1.4 ms on an H200 at 8192 (1.1 TFLOP). After the block, `tflops` is the rate they
    ran at while it lasted (what the load took of the GPU) and `products` how many ran."""

    def __init__(self, size: int = 8192, depth: int = 2, device: int | None = None):
        self.size, self.depth, self.device = size, depth, device  # None: the current GPU, as the block begins
        self.products = 0
        self.tflops: float | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> "GpuLoad":
        if not torch.cuda.is_available():
            raise RuntimeError("a GPU load needs a GPU (none is visible here)")
        if self.device is None:
            self.device = torch.cuda.current_device()
        self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream):
            self._a = torch.randn(self.size, self.size, device=self.device, dtype=torch.bfloat16)
            self._b = torch.randn_like(self._a)
            self._out = torch.empty_like(self._a)
        self._stream.synchronize()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-load", daemon=True)
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def _run(self) -> None:
        queued: collections.deque = collections.deque()
        try:
            # The current device and stream are the thread's own: set them here, not in __enter__.
            with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                while not self._stop.is_set():
                    torch.mm(self._a, self._b, out=self._out)
                    done = torch.cuda.Event()
                    done.record(self._stream)
                    queued.append(done)
                    self.products += 1
                    if len(queued) > self.depth:
                        queued.popleft().synchronize()  # this thread only; the GIL is let go meanwhile
        except BaseException as error:  # noqa: BLE001 - raised in the caller's thread at the block's end
            self._error = error

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._stream.synchronize()
        seconds = time.perf_counter() - self._start
        self.tflops = 2 * self.size ** 3 * self.products / seconds / 1e12
        if self._error is not None and exc[0] is None:
            raise RuntimeError(f"the GPU load stopped: {self._error}") from self._error
