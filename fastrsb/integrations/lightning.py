"""fastrsb's DALI loaders as a PyTorch Lightning DataModule (pip install "fastrsb[lightning]").

    datamodule = DaliDataModule("imagenet", batch_size=256, img_size=160)
    trainer = L.Trainer(devices=8, strategy="ddp", use_distributed_sampler=False)
    trainer.fit(model, datamodule=datamodule)

What it takes care of:
- Sharding by the trainer's global rank and world size (asked of the trainer in `setup`, so it is
  right under any launcher); Lightning's sampler replacement does not apply to these loaders (they
  are not DataLoaders), and `use_distributed_sampler=False` says so.
- Exact mid-epoch resume through Lightning's own checkpoint: the train loader is stateful
  (`state_dict` / `load_state_dict`), which Lightning saves with the fit loop and restores before
  the first batch, so a resumed run continues with the next batch, not the first.
- Every validation pass starts at the first image (Lightning's sanity check leaves a pass after
  2 batches), and counts each image of the data set exactly once across ranks.
- Batches are device tensors already (the GPU's, or the CPU's): Lightning's transfer is a no-op.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L

from fastrsb.data_folder import split_folder
from fastrsb.pipelines import train_loader, val_loader


class DaliDataModule(L.LightningDataModule):
    def __init__(self, data: str | Path, batch_size: int, img_size: int = 160, val_img_size: int = 224,
                 crop_pct: float = 0.95, seed: int = 0, aa: str | None = None, repeats: int = 1,
                 num_threads: int | None = None, world_size: int | None = None, spread_views: bool = False):
        """data: a folder with train/<class>/ and val/<class>/. batch_size: per process (GPU).
        world_size: the number of processes the caller expects; if given, a trainer that reports
        another is refused (a launcher that started fewer processes than planned).
        spread_views: with repeats > 1, each image's views on different processes, as timm's
        RepeatAugSampler places them (fastrsb.pipelines.spread_views; Lightning's DDP has the
        process group up before setup())."""
        super().__init__()
        self.data = Path(data)
        self.batch_size, self.img_size, self.val_img_size, self.crop_pct = batch_size, img_size, val_img_size, crop_pct
        self.seed, self.aa, self.repeats, self.num_threads = seed, aa, repeats, num_threads
        self.expected_world_size, self.spread_views = world_size, spread_views
        self.train_data = self.val_data = None

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if trainer is None:  # setup() called by hand: the shard comes from the Trainer, which it lacks
            raise RuntimeError("DaliDataModule shards the data by the Lightning Trainer's rank and world size: "
                               "give it to trainer.fit(model, datamodule=...), which calls setup()")
        rank, world = trainer.global_rank, trainer.world_size
        if self.expected_world_size is not None and world != self.expected_world_size:
            raise ValueError(f"DaliDataModule(world_size={self.expected_world_size}) but the trainer runs {world} "
                             "process(es): each process reads 1/world of the data, so the two must agree")
        # The GPU Lightning placed this process on (cuda:LOCAL_RANK, made current before setup):
        # by its index, so that a mismatch is an error rather than every process's DALI on GPU 0.
        root = trainer.strategy.root_device
        device = root if root.type == "cuda" else "cpu"
        shard = dict(device=device, shard_id=rank, num_shards=world, num_threads=self.num_threads)
        if stage == "fit" and self.train_data is None:
            self.train_data = train_loader(split_folder(self.data, "train"), self.batch_size, self.img_size,
                                           seed=self.seed, aa=self.aa, repeats=self.repeats,
                                           spread_views=self.spread_views, **shard)
        if self.val_data is None:
            self.val_data = val_loader(split_folder(self.data, "val"), self.batch_size, self.val_img_size,
                                       self.crop_pct, **shard)

    @property
    def num_classes(self) -> int:
        from fastrsb.pipelines import class_folders
        return len(class_folders(split_folder(self.data, "train")))

    def train_dataloader(self):
        return self.train_data

    def val_dataloader(self):
        return self.val_data
