"""The CPU train graph's random-resized-crop resize: torch's antialiased bilinear kernel for uint8
images, called from the DALI graph (`fn.python_function`, one call per batch).

Why not DALI's `fn.resize` on the CPU: its resampling is scalar code, ~490 us an image to 160 px
on one core of the 2-core machine, a third of the CPU loader's time; torch's uint8 kernel
(channels-last, AVX2: Pillow-SIMD's algorithm) resizes the same crops in ~60-70 us on one thread,
and is closer to PIL's BILINEAR resize, which timm's RandomResizedCrop calls (on these crops:
mean 0.03 levels from PIL, at most 2; DALI's: 0.17, at most 4). The A3 CPU loader at batch 64:
~1,350 -> ~1,670 img/s in an A/B (README). The kernel releases the GIL and is single-threaded for
one image: a pipeline with several threads splits its batch between as many threads (2 threads:
1.7x on 2 cores), so the call does not leave the pipeline's other threads idle. The GPU graph keeps
DALI's GPU resize.
"""
from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from nvidia.dali import fn
from nvidia.dali.pipeline import Pipeline

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def resize_square(images, size: int):
    """CPU DataNode of HWC uint8 images of any sizes -> size x size, bilinear, antialiased, on as
    many threads as the pipeline being defined has."""
    threads = Pipeline.current().num_threads
    return fn.python_function(images, function=functools.partial(resize_batch, size=size, threads=threads),
                              batch_processing=True, output_layouts="HWC")


def resize_batch(images: list[np.ndarray], size: int, threads: int = 1) -> list[np.ndarray]:
    """What the graph calls: HWC uint8 arrays -> size x size HWC uint8 arrays."""
    if threads <= 1 or len(images) < 2:
        return [_resize(image, size) for image in images]
    parts = min(threads, len(images))
    chunks = [images[k::parts] for k in range(parts)]  # every parts-th image: sizes spread evenly
    done = list(_shared_pool().map(lambda chunk: [_resize(image, size) for image in chunk], chunks))
    resized = [None] * len(images)
    for k, chunk in enumerate(done):
        resized[k::parts] = chunk
    return resized


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    # (H, W, C) -> (1, C, H, W) as a view: channels-last memory, the layout of torch's fast path
    nchw = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
    out = F.interpolate(nchw, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()  # channels-last result: HWC without a copy


def _shared_pool() -> ThreadPoolExecutor:
    """One pool for the process, a worker per core: each call uses as many as its pipeline has
    threads, and pipelines built anew (a resume, a validation pass) start no threads of their own."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(len(os.sched_getaffinity(0)), thread_name_prefix="fastrsb-resize")
        return _pool
