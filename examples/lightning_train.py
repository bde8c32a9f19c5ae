"""fastrsb's DALI loaders under PyTorch Lightning (pip install "fastrsb[lightning]"), with a timm ResNet.

    python examples/lightning_train.py --data data/demo --max-steps 50
    python examples/lightning_train.py --data /data/imagenet --devices 8 --max-steps 100000 --ckpt-every 1000
    python examples/lightning_train.py ... --resume runs/lightning/step=1000.ckpt   # continues with the next batch

Runs on the CPU (gloo) where there is no GPU. --batch-log FILE appends each step's batch
fingerprint (rank, step, labels, pixel sum), which the tests compare across a stop and a resume."""
import argparse
import json

import lightning as L
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from fastrsb.integrations.lightning import DaliDataModule


class Classifier(L.LightningModule):
    def __init__(self, model: str, num_classes: int, lr: float, batch_log: str | None = None):
        super().__init__()
        self.net = timm.create_model(model, num_classes=num_classes).to(memory_format=torch.channels_last)
        self.lr, self.batch_log = lr, batch_log

    def training_step(self, batch, batch_idx):
        images, labels = batch  # device tensors, channels-last: float16 on the GPU, float32 on the CPU
        loss = F.cross_entropy(self.net(images), labels)
        self.log("loss", loss, prog_bar=True)
        if self.batch_log:
            with open(self.batch_log, "a") as f:
                shard = self.trainer.datamodule.train_data.settings
                f.write(json.dumps({"rank": self.global_rank, "shard": [shard["shard_id"], shard["num_shards"]],
                                    "spread_views": shard["spread_views"], "step": self.global_step,
                                    "labels": labels.tolist(),
                                    "pixels": round(images.float().sum().item(), 2)}) + "\n")
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        hits = (self.net(images).argmax(1) == labels).sum()
        # Sums over batches and ranks: each val image is counted once, whatever the world size.
        self.log("val_hits", hits.float(), reduce_fx="sum", sync_dist=True, on_epoch=True)
        self.log("val_images", float(len(labels)), reduce_fx="sum", sync_dist=True, on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a folder with train/<class>/ and val/<class>/")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--devices", type=int, default=1, help="processes (GPUs, or CPU processes without a GPU)")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--out", default="runs/lightning", help="checkpoints and logs")
    p.add_argument("--ckpt-every", type=int, default=0, help="save a checkpoint every N steps (0: none)")
    p.add_argument("--resume", help="a checkpoint to continue from, exactly where it stopped")
    p.add_argument("--batch-log", help="append each step's batch fingerprint to this file (JSON lines)")
    p.add_argument("--val-every", type=int, default=None, help="validate every N steps (default: each epoch)")
    p.add_argument("--repeats", type=int, default=1, help="repeated augmentation: views of each decoded image")
    p.add_argument("--spread-views", action="store_true", help="each view on another process (timm's layout)")
    args = p.parse_args(argv)
    data = DaliDataModule(args.data, batch_size=args.batch_size, img_size=args.img_size,
                          val_img_size=args.img_size, world_size=args.devices, repeats=args.repeats,
                          spread_views=args.spread_views)
    model = Classifier(args.model, data.num_classes, lr=1e-3, batch_log=args.batch_log)
    gpu = torch.cuda.is_available()
    callbacks = [ModelCheckpoint(args.out, "{step}", every_n_train_steps=args.ckpt_every, save_top_k=-1)] \
        if args.ckpt_every else []
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu", devices=args.devices, max_steps=args.max_steps,
        strategy="ddp" if args.devices > 1 else "auto", precision="bf16-mixed" if gpu else "32-true",
        use_distributed_sampler=False,  # the loaders shard by rank themselves (DALI); nothing to replace
        default_root_dir=args.out, callbacks=callbacks, enable_checkpointing=bool(args.ckpt_every),
        val_check_interval=args.val_every, check_val_every_n_epoch=None if args.val_every else 1,
        logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data, ckpt_path=args.resume)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.global_rank == 0:
        print(json.dumps({"steps": trainer.global_step, "world_size": trainer.world_size, **metrics}))


if __name__ == "__main__":
    main()
