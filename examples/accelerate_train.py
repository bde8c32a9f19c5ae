"""fastrsb's DALI loaders under Hugging Face Accelerate (pip install "fastrsb[accelerate]").

    python examples/accelerate_train.py --data data/demo --max-steps 50
    accelerate launch --num_processes 8 examples/accelerate_train.py --data /data/imagenet --max-steps 1000
    torchrun --nproc_per_node 2 examples/accelerate_train.py --data data/demo --max-steps 20   # CPU: gloo

`accelerator.prepare` takes the model and the optimizer only: the loaders stay fastrsb's, sharded
by Accelerate's process index (DALI reads each process's part; Accelerate's own sharding is for
DataLoaders). The batches are already on the process's device."""
import argparse
import json

import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from fastrsb.pipelines import class_folders, train_loader, val_loader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a folder with train/<class>/ and val/<class>/")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--model", default="resnet10t")
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not gpu, mixed_precision="bf16" if gpu else "no")
    shard = dict(device=accelerator.device, shard_id=accelerator.process_index,  # cuda:LOCAL_RANK, or the CPU
                 num_shards=accelerator.num_processes)
    train = train_loader(f"{args.data}/train", args.batch_size, args.img_size, seed=0, **shard)
    val = val_loader(f"{args.data}/val", args.batch_size, args.img_size, crop_pct=0.875, **shard)
    model = timm.create_model(args.model, num_classes=len(class_folders(f"{args.data}/train")))
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = 0
    while step < args.max_steps:
        model.train()
        for images, labels in train:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            step += 1
            if step == args.max_steps:
                break
    model.eval()
    totals = torch.zeros(2, device=accelerator.device)  # correct, seen
    with torch.no_grad():
        for images, labels in val:
            totals += torch.stack([(model(images).argmax(1) == labels).sum().float(), torch.tensor(float(len(labels)),
                                                                                              device=accelerator.device)])
    totals = accelerator.reduce(totals, reduction="sum")  # every val image once, over all processes
    shard = torch.tensor([[train.settings["shard_id"], train.settings["num_shards"]]], device=accelerator.device)
    shards = accelerator.gather(shard).tolist()  # which part of the data each process read
    if accelerator.is_main_process:
        print(json.dumps({"steps": step, "world_size": accelerator.num_processes, "loss": loss.item(), "shards": shards,
                          "top1": (100 * totals[0] / totals[1]).item(), "val_images": int(totals[1])}))


if __name__ == "__main__":
    main()
