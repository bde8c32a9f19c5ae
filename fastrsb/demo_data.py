"""A small generated ImageNet-style data set: textures a ResNet can learn to tell apart.

Each class is a family of patterns (stripes, checks, dots, rings, ...) with random colours,
scales, phases and noise, so it takes learning, not a lookup. Every class is unchanged in kind by
a horizontal flip and survives a random-resized crop. Sizes and aspect ratios vary as ImageNet's
do, and the odd files ImageNet holds are there too: a grayscale JPEG, a CMYK JPEG, a progressive
JPEG and a PNG saved under a .JPEG name. Deterministic for a given seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fastrsb.staging import staged_folder

CLASSES = ("n00_hstripes", "n01_vstripes", "n02_checks", "n03_dots", "n04_rings", "n05_blobs",
           "n06_crosshatch", "n07_spokes")


def _pattern(kind: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A (h, w) float mask in [0, 1] for class `kind`."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(6, 18) * max(h, w) / 128
    phase = rng.uniform(0, 2 * np.pi)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    wave = lambda t: 0.5 + 0.5 * np.sin(2 * np.pi * t / period + phase)  # noqa: E731
    if kind == 0:
        return wave(y)
    if kind == 1:
        return wave(x)
    if kind == 2:
        return ((np.floor(x / period) + np.floor(y / period)) % 2).astype(np.float32)
    if kind == 3:
        dy, dx = (y % period) - period / 2, (x % period) - period / 2
        return (dy**2 + dx**2 < (period * 0.3) ** 2).astype(np.float32)
    if kind == 4:
        return wave(np.hypot(y - cy, x - cx))
    if kind == 5:
        coarse = rng.random((4, 4)).astype(np.float32)
        return np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32) / 255
    if kind == 6:
        return np.maximum(wave(x + y), wave(x - y))
    spokes = rng.integers(5, 12)
    return 0.5 + 0.5 * np.sin(spokes * np.arctan2(y - cy, x - cx) + phase)


def make_image(kind: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class `kind`, ImageNet-like in size (scaled down) and aspect ratio."""
    aspect = rng.choice([rng.uniform(3 / 4, 4 / 3), rng.uniform(1 / 2, 2)], p=[0.8, 0.2])
    area = rng.uniform(90, 170) ** 2
    h, w = int(np.sqrt(area / aspect)), int(np.sqrt(area * aspect))
    mask = _pattern(kind, h, w, rng)[..., None]
    fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    while np.abs(fg - bg).sum() < 150:  # keep the pattern visible
        fg = rng.uniform(0, 255, 3)
    pixels = mask * fg + (1 - mask) * bg + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_demo(root: str | Path, train_per_class: int = 120, val_per_class: int = 30,
               seed: int = 0, num_classes: int = len(CLASSES), keep_existing: bool = False) -> Path:
    """Write root/train/<class>/*.JPEG and root/val/<class>/*.JPEG. Returns root.

    A new (or empty) root is written whole or not at all (fastrsb.staging): an interrupted
    generation, such as Ctrl-C during the first `fastrsb train demo`, leaves no partial data set
    that a later run would take for the whole one, and processes that race to write it (each
    rank of a torchrun) end with one complete copy. Into a root that holds files already, the
    files are written in place, unless keep_existing: then it is left as it is (another process
    may be reading the copy it just finished)."""
    root = Path(root)
    if not 2 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must lie in 2..{len(CLASSES)}")
    if root.is_dir() and any(root.iterdir()):
        if not keep_existing:
            _write_into(root, train_per_class, val_per_class, seed, num_classes)
        return root
    with staged_folder(root, existing="keep") as staging:  # "keep": a racer's copy is the same set
        _write_into(staging, train_per_class, val_per_class, seed, num_classes)
    return root


def _write_into(root: Path, train_per_class: int, val_per_class: int, seed: int, num_classes: int) -> None:
    for split, count, offset in (("train", train_per_class, 0), ("val", val_per_class, 1)):
        for kind, name in enumerate(CLASSES[:num_classes]):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, offset, kind, i])
                _save(make_image(kind, rng), folder / f"{name}_{split}_{i:05d}.JPEG", i)


def _save(image: Image.Image, path: Path, index: int) -> None:
    # ImageNet's odd files, once per class and split: grayscale, CMYK, progressive, PNG-as-JPEG.
    if index == 1:
        image.convert("L").save(path, format="JPEG", quality=90)
    elif index == 2:
        image.convert("CMYK").save(path, format="JPEG", quality=90)
    elif index == 3:
        image.save(path, format="JPEG", quality=90, progressive=True)
    elif index == 4:
        image.save(path, format="PNG")
    else:
        image.save(path, format="JPEG", quality=90)
