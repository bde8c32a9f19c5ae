"""fastrsb's DALI loaders in a plain PyTorch loop: any model, one process or `torchrun`.
    python examples/plain_loop.py --data data/demo --max-steps 20
    torchrun --nproc_per_node=8 examples/plain_loop.py --data /data/imagenet --max-steps 1000"""
import argparse, os
import torch, torch.distributed as dist, torch.nn.functional as F, torchvision
from fastrsb.pipelines import class_folders, train_loader, val_loader

p = argparse.ArgumentParser()
p.add_argument("--data", required=True), p.add_argument("--max-steps", type=int, default=100)
p.add_argument("--batch-size", type=int, default=32), p.add_argument("--img-size", type=int, default=64)
args = p.parse_args()
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun sets them
device = "cuda" if torch.cuda.is_available() else "cpu"
if device == "cuda":
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # before DALI picks its GPU
dist.init_process_group("nccl" if device == "cuda" else "gloo") if world > 1 else None
shard = dict(device=device, shard_id=rank, num_shards=world)  # each process its own part of the data
train = train_loader(f"{args.data}/train", args.batch_size, args.img_size, seed=0, **shard)
val = val_loader(f"{args.data}/val", args.batch_size, args.img_size, crop_pct=0.875, **shard)
model = torchvision.models.resnet18(num_classes=len(class_folders(f"{args.data}/train")))
model = model.to(device, memory_format=torch.channels_last)  # the batches are channels-last already
net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
step = 0
while step < args.max_steps:
    for images, labels in train:  # float16 on the GPU (autocast takes it), float32 on the CPU
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = F.cross_entropy(net(images), labels)
        opt.zero_grad(set_to_none=True), loss.backward(), opt.step()
        if (step := step + 1) == args.max_steps:
            break
model.eval()
hits = torch.zeros(2, device=device)  # correct, seen: summed over the ranks, every image once
with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
    for images, labels in val:
        hits += torch.stack([(model(images).argmax(1) == labels).sum(), torch.tensor(len(labels), device=device)])
if world > 1:
    dist.all_reduce(hits)
if rank == 0:
    print(f"{step} steps, loss {loss.item():.3f}, top1 {100 * hits[0] / hits[1]:.2f}% of {int(hits[1])} val images")
