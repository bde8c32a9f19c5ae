"""The CPU train graph's random-resized-crop resize: torch's antialiased bilinear kernel for uint8
images, called from the DALI graph (`fn.python_function`, one call per batch).

Why not DALI's `fn.resize` on the CPU: its resampling is scalar code, ~490 us an image to 160 px
on one core of the 2-core machine, a third of the CPU loader's time; torch's uint8 kernel
(channels-last, AVX2: Pillow-SIMD's algorithm) resizes the same crops in ~60-70 us on one thread,
and is closer to PIL's BILINEAR resize, which timm's RandomResizedCrop calls (on these crops:
mean 0.03 levels from PIL, at most 2; DALI's: 0.17, at most 4). The A3 CPU loader at batch 64:
~1,350 -> ~1,670 img/s (README). The call holds the GIL only around the kernel's launch; the
kernel is single-threaded for one image, so two pipelines' calls use two cores, as DALI's threads
did. The GPU graph keeps DALI's GPU resize.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from nvidia.dali import fn


def resize_square(images, size: int):
    """CPU DataNode of HWC uint8 images of any sizes -> size x size, bilinear, antialiased."""
    return fn.python_function(images, function=functools.partial(resize_batch, size=size),
                              batch_processing=True, output_layouts="HWC")


def resize_batch(images: list[np.ndarray], size: int) -> list[np.ndarray]:
    """What the graph calls: HWC uint8 arrays -> size x size HWC uint8 arrays."""
    resized = []
    for image in images:
        # (H, W, C) -> (1, C, H, W) as a view: channels-last memory, the layout of torch's fast path
        nchw = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
        out = F.interpolate(nchw, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        resized.append(out[0].permute(1, 2, 0).numpy())  # channels-last result: HWC without a copy
    return resized
