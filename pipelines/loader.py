"""Loaders that any PyTorch trainer can iterate: `for images, labels in train_loader(...)`.

images: (B, 3, H, W) float16 (or float32), ImageNet-normalized, channels-last, on the device the
pipeline ran on. labels: (B,) int64 on the same device.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from .folder import DatasetError, ImageList, list_images
from .graphs import READER_NAME, train_pipeline, val_pipeline


class DaliLoader:
    """Wraps one DALI pipeline. Train loaders drop the last partial batch (fixed shapes: no
    torch.compile recompiles, the same number of steps on every rank); validation loaders return
    every image of the shard exactly once, the last batch short."""

    def __init__(self, pipe, images: ImageList, batch_size: int, train: bool):
        self.images = images
        self.batch_size = batch_size
        self.train = train
        policy = LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL
        self._iterator = DALIGenericIterator(pipe, ["images", "labels"], reader_name=READER_NAME,
                                             last_batch_policy=policy, auto_reset=True)

    @property
    def classes(self) -> list[str]:
        return self.images.classes

    def __len__(self) -> int:
        return len(self._iterator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for (batch,) in self._iterator:
            # HWC -> NCHW as a view: the memory is already channels-last.
            yield batch["images"].permute(0, 3, 1, 2), batch["labels"]


def _check_device(device: str) -> int | None:
    if device == "cpu":
        return None
    if device != "cuda":
        raise ValueError(f"device must be 'cuda' or 'cpu', not {device!r}")
    if not torch.cuda.is_available():
        raise DatasetError("device='cuda' was asked for, but no CUDA GPU is visible (use device='cpu')")
    return torch.cuda.current_device()


def _default_threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0))))


def train_loader(root: str | os.PathLike | ImageList, batch_size: int, img_size: int, *,
                 device: str = "cuda", shard_id: int = 0, num_shards: int = 1, seed: int = 0,
                 num_threads: int | None = None, dtype: str = "float16",
                 hw_decoder_load: float = 0.9, prefetch_queue_depth: int = 2) -> DaliLoader:
    """Random-resized-crop + flip training loader over an ImageFolder tree or a file list.

    batch_size is per shard (per GPU). Every epoch is a full reshuffle, the same on every shard
    (shuffle seed = `seed`), so the shards stay disjoint; the augmentation seed differs per shard.
    """
    images = root if isinstance(root, ImageList) else list_images(root)
    if len(images) // num_shards < batch_size:
        raise DatasetError(f"{len(images)} images over {num_shards} shard(s) do not fill one batch of {batch_size}")
    pipe = train_pipeline(
        files=images.files, labels=images.labels, img_size=img_size, device=device,
        shard_id=shard_id, num_shards=num_shards, shuffle_seed=seed, hw_decoder_load=hw_decoder_load,
        dtype=dtype, batch_size=batch_size, num_threads=num_threads or _default_threads(),
        device_id=_check_device(device), seed=seed * 1000 + shard_id,
        prefetch_queue_depth=prefetch_queue_depth)
    return DaliLoader(pipe, images, batch_size, train=True)


def val_loader(root: str | os.PathLike | ImageList, batch_size: int, img_size: int, crop_pct: float, *,
               device: str = "cuda", shard_id: int = 0, num_shards: int = 1,
               num_threads: int | None = None, dtype: str = "float16",
               hw_decoder_load: float = 0.9) -> DaliLoader:
    """Centre-crop evaluation loader: each image of the shard exactly once per epoch."""
    images = root if isinstance(root, ImageList) else list_images(root)
    pipe = val_pipeline(
        files=images.files, labels=images.labels, img_size=img_size, crop_pct=crop_pct,
        device=device, shard_id=shard_id, num_shards=num_shards, hw_decoder_load=hw_decoder_load,
        dtype=dtype, batch_size=batch_size, num_threads=num_threads or _default_threads(),
        device_id=_check_device(device), seed=0)
    return DaliLoader(pipe, images, batch_size, train=False)
