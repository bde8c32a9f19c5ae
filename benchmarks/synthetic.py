"""ImageNet-like JPEGs for benchmarks: ImageNet's spread of sizes and aspect ratios (typical
500x375, mean about 400x350) and photo-like content (smooth shapes plus fine texture), so a file
at quality 90 weighs ~100 KB and decodes like a real photo. Cached: generated once per folder."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (400, 300), (640, 480), (300, 225)]


def _one(args) -> None:
    path, seed = args
    rng = np.random.default_rng(seed)
    w, h = SIZES[rng.integers(len(SIZES))] if rng.random() < 0.7 else (int(rng.integers(200, 700)), int(rng.integers(200, 600)))
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    texture = rng.normal(0, 18, (h // 2, w // 2, 3)).repeat(2, 0).repeat(2, 1)
    pixels = np.asarray(coarse, np.float32)
    pixels[: texture.shape[0], : texture.shape[1]] += texture
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def synthetic_jpegs(root: str | Path, count: int, classes: int = 10, workers: int | None = None) -> Path:
    """root/train/<class>/*.JPEG with `count` images in all; reused if already complete."""
    root = Path(root) / "train"
    jobs = []
    for i in range(count):
        folder = root / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:07d}.JPEG"
        if not path.exists():
            jobs.append((path, i))
    if jobs:
        print(f"generating {len(jobs)} synthetic JPEGs in {root} ...", flush=True)
        with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
            for done, _ in enumerate(pool.map(_one, jobs, chunksize=16), 1):
                if done % max(1, len(jobs) // 10) == 0:
                    print(f"  {done}/{len(jobs)}", flush=True)
    return root
