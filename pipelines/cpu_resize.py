"""The CPU graphs' resizes: torch's antialiased kernels for uint8 images, called from the DALI
graph (`fn.python_function`, one call per batch): the train graph's random-resized-crop resize
(bilinear or bicubic, per image where drawn) and the validation graph's timm eval resize and
centre crop (bicubic).

Why not DALI's `fn.resize` on the CPU: its resampling is scalar code, ~490 us an image to 160 px
on one core of the 2-core machine, a third of the CPU loader's time; torch's uint8 kernel
(channels-last, AVX2: Pillow-SIMD's algorithm) resizes the same crops in ~60-70 us on one thread,
and is closer to PIL's BILINEAR resize, which timm's RandomResizedCrop calls (on these crops:
mean 0.03 levels from PIL, at most 2; DALI's: 0.17, at most 4). The A3 CPU loader at batch 64:
~1,350 -> ~1,670 img/s in an A/B at 1ff2943 on the 2-core machine (benchmarks/README.md:
"What changed at 1ff2943"). The kernel releases the GIL and is single-threaded for
one image: a pipeline with several threads splits its batch between as many threads (2 threads:
1.7x on 2 cores), so the call does not leave the pipeline's other threads idle. DALI's bicubic
CPU resize is slower still (the validation graph's; ~800 us an image). The GPU graphs keep DALI's
GPU resize.
"""
from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline

# DALI's interpolation types as torch's modes (the crop's resampling: timm's bilinear or bicubic).
_MODES = {types.INTERP_LINEAR: "bilinear", types.INTERP_CUBIC: "bicubic"}

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def resize_square(images, size: int, interp=types.INTERP_LINEAR):
    """CPU DataNode of HWC uint8 images of any sizes -> size x size, antialiased, on as many
    threads as the pipeline being defined has. interp: DALI's INTERP_LINEAR or INTERP_CUBIC
    (bilinear or bicubic), or a DataNode of those values (int32), one per image."""
    if isinstance(interp, types.DALIInterpType):
        return _in_graph(images, functools.partial(_resize_square, size=size, mode=_MODES[interp]))
    threads = Pipeline.current().num_threads
    return fn.python_function(images, interp, batch_processing=True, output_layouts="HWC",
                              function=functools.partial(_resize_each, size=size, threads=threads))


def eval_resize_and_crop(images, img_size: int, resize: int):
    """timm's eval transform on uint8 HWC images: the shorter side to `resize` and the longer to
    int(resize * long / short) (torchvision's Resize), bicubic, antialiased; then the centre
    img_size x img_size at torchvision's CenterCrop anchor, round((side - img_size) / 2)."""
    return _in_graph(images, functools.partial(_eval_resize_and_crop, img_size=img_size, resize=resize))


def resize_batch(images: list[np.ndarray], size: int, threads: int = 1, mode: str = "bilinear") -> list[np.ndarray]:
    """HWC uint8 arrays -> size x size HWC uint8 arrays, as the train graph resizes them."""
    return map_batch(functools.partial(_resize_square, size=size, mode=mode), images, threads)


def map_batch(one, images: list, threads: int = 1) -> list[np.ndarray]:
    """one(image) for every image (or whatever one takes: a tuple), in order, split between
    `threads` threads."""
    if threads <= 1 or len(images) < 2:
        return [one(image) for image in images]
    parts = min(threads, len(images))
    chunks = [images[k::parts] for k in range(parts)]  # every parts-th image: sizes spread evenly
    done = list(_shared_pool().map(lambda chunk: [one(image) for image in chunk], chunks))
    results = [None] * len(images)
    for k, chunk in enumerate(done):
        results[k::parts] = chunk
    return results


def _resize_each(images: list[np.ndarray], interps: list[np.ndarray], size: int, threads: int) -> list[np.ndarray]:
    """Each image resized to size x size with its own drawn interpolation (a DALI interp value)."""
    return map_batch(lambda pair: _resize_square(pair[0], size, _MODES[types.DALIInterpType(int(pair[1]))]),
                     list(zip(images, interps)), threads)


def _in_graph(images, one):
    threads = Pipeline.current().num_threads
    return fn.python_function(images, function=functools.partial(map_batch, one, threads=threads),
                              batch_processing=True, output_layouts="HWC")


def _interpolate(image: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """The resized image as an HWC view of torch's result, which is planar (C, H, W); the caller
    copies it into HWC order with numpy, single-threaded (torch's copy, ~2x faster alone, would
    start an OpenMP team inside DALI's threads, whose spinning cost more than it saves)."""
    # (H, W, C) -> (1, C, H, W) as a view: channels-last memory, the input of torch's fast path
    # (a planar copy of the input would take ~45% longer)
    nchw = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
    resized = F.interpolate(nchw, size=size, mode=mode, antialias=True, align_corners=False)
    return resized[0].permute(1, 2, 0).numpy()


def _resize_square(image: np.ndarray, size: int, mode: str = "bilinear") -> np.ndarray:
    return np.ascontiguousarray(_interpolate(image, (size, size), mode))


def _eval_resize_and_crop(image: np.ndarray, img_size: int, resize: int) -> np.ndarray:
    height, width = image.shape[:2]
    longer = int(resize * max(height, width) / min(height, width))
    out_h, out_w = (resize, longer) if height <= width else (longer, resize)
    top, left = int(round((out_h - img_size) / 2.0)), int(round((out_w - img_size) / 2.0))
    resized = _interpolate(image, (out_h, out_w), "bicubic")
    return np.ascontiguousarray(resized[top:top + img_size, left:left + img_size])


def _shared_pool() -> ThreadPoolExecutor:
    """One pool for the process, a worker per core: each call uses as many as its pipeline has
    threads, and pipelines built anew (a resume, a validation pass) start no threads of their own."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(len(os.sched_getaffinity(0)), thread_name_prefix="fastrsb-resize")
        return _pool
