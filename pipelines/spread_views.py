"""Repeated augmentation with timm's layout, each image decoded once.

timm's RepeatAugSampler sends an image's R views to R different ranks, so that each rank's
batch (and its BatchNorm statistics) holds as many distinct images as views; each rank decodes
its own copy, R decodes per image. A fastrsb loader decodes an image once and cuts its R views
there (pipelines/graphs.py). With `spread_views` the views are then exchanged between the ranks
the step is about to run on: rank r keeps view 0 of its images and sends view k to rank r + k
(mod world), receiving view k of rank r - k's images in turn. Each rank's batch then holds R
blocks of distinct images, and each image's views sit on R different ranks in the same step, as
timm's sampler places them (on R or more ranks; on fewer, views share a rank there too).

The exchange is one batched point-to-point call per batch, its images, labels (and the torch
form's draws) together (NCCL on GPUs: no host sync, over NVLink within a machine; gloo on the
CPU), (R - 1) / R of the batch each way, and one copy of the batch on the device: the views a rank
sends are strided in the decoded layout, and NCCL sends contiguous buffers. It opens no NCCL
communicator of its own: torch's ProcessGroupNCCL runs a batch of point-to-point ops on the process
group's communicator, the one the gradient all-reduce uses (only a lone send or recv gets a
two-rank communicator per pair, made at its first call), and records the send buffers on its
stream, so a buffer dropped here is not reused before NCCL has sent it."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .image_list import DatasetError


def views_to_spread(asked: bool, repeats: int, shard_id: int, num_shards: int) -> bool:
    """Whether a loader exchanges its views: asked for, with views to exchange (repeats > 1) and
    ranks to exchange them with (num_shards > 1), which must be torch.distributed's."""
    if not (asked and repeats > 1 and num_shards > 1):
        return False
    if not (dist.is_available() and dist.is_initialized()):
        raise DatasetError("spread_views=True exchanges views between the shards' processes through torch.distributed: "
                           "initialize its process group first (torchrun and init_process_group)")
    if (dist.get_rank(), dist.get_world_size()) != (shard_id, num_shards):
        raise DatasetError(f"spread_views=True needs shard_id = rank and num_shards = world size (here shard "
                           f"{shard_id} of {num_shards}, rank {dist.get_rank()} of {dist.get_world_size()})")
    return True


def spread(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Each tensor of `batch` (images, labels, draws): (n, R, ...), this rank's n images with R views
    each -> (R, n, ...), whose block k is view k of the n images of rank (rank - k) % world. One
    batched call for them all; every rank makes it at the same batch."""
    ops, out = [], {}
    for key, views in batch.items():
        blocks = views.transpose(0, 1)  # (R, n, ...), block k: view k of each image (a view, not a copy)
        out[key] = torch.empty_like(blocks, memory_format=torch.contiguous_format)
        out[key][0].copy_(blocks[0])
        for k in range(1, blocks.shape[0]):
            to, since = (rank + k) % world, (rank - k) % world
            if to == rank:  # fewer ranks than views: this view stays
                out[key][k].copy_(blocks[k])
                continue
            ops += [dist.P2POp(dist.isend, blocks[k].contiguous(), to), dist.P2POp(dist.irecv, out[key][k], since)]
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()  # NCCL: the current stream waits, the host does not
    return out
