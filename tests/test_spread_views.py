"""Repeated augmentation in timm's layout (pipelines/spread_views.py): three real processes, each
with its DALI loader over its shard, exchanging views through gloo (and NCCL, given 3 GPUs)."""
import json
import subprocess
import sys
from collections import Counter

import pytest
import torch
from PIL import Image

SCRIPT = r"""
import json, os, sys
import torch, torch.distributed as dist
from fastrsb.pipelines import train_loader
device = sys.argv[2]
if device == "cuda":
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl" if device == "cuda" else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
def loader(spread, state=None, **augment):
    return train_loader(sys.argv[1], batch_size=6, img_size=16, device=device, shard_id=rank, num_shards=world,
                        seed=3, repeats=3, num_threads=1, spread_views=spread, state=state, **augment)
def take(loader, count):
    return [(images.float().cpu().contiguous().flatten(1).tolist(), labels.tolist())
            for (images, labels), _ in zip(loader, range(count))]
result = {}
for spread in (False, True):
    first = loader(spread)
    gathered = [None] * world
    dist.all_gather_object(gathered, take(first, 2))
    result[str(spread)] = gathered
# A saved position continues exactly: every rank's next batches, exchanged, as if never stopped.
state = first.state_dict()
assert state["fingerprint"]["spread_views"] is True
following = take(first, 3)
resumed = take(loader(True, state), 3)
agreed = [None] * world
dist.all_gather_object(agreed, following == resumed)
result["resumed exactly"] = agreed
# The torch RandAugment form augments after the hand-over, on the rank a view went to: its draws
# travel with it (one exchange for images, labels and draws).
for spread in (False, True):
    gathered = [None] * world
    dist.all_gather_object(gathered, take(loader(spread, aa="rand-m9-mstd0.5-inc1", aa_impl="torch"), 2))
    result["torch " + str(spread)] = gathered
if rank == 0:
    print(json.dumps(result))
dist.destroy_process_group()
"""


def _exchange(folder, device: str) -> dict:
    """Each image its own label (a file list), so a label names the image a view was cut from."""
    lines = []
    for index in range(36):
        Image.new("RGB", (24 + index, 20), (7 * index, 255 - 7 * index, 3 * index)).save(folder / f"{index}.jpg")
        lines.append(f"{index}.jpg {index}")
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    (folder / "run.py").write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                           str(folder / "run.py"), str(folder / "list.txt"), device],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exchanged(tmp_path_factory):
    return _exchange(tmp_path_factory.mktemp("unique"), "cpu")


def test_each_rank_holds_distinct_images_and_each_image_is_on_three_ranks(exchanged):
    _check_layout(exchanged)


def _check_layout(exchanged):
    for step in range(2):
        kept = [exchanged["False"][rank][step][1] for rank in range(3)]
        spread = [exchanged["True"][rank][step][1] for rank in range(3)]
        # Kept in one batch: 2 images x 3 views on each rank.
        assert all(sorted(Counter(labels).values()) == [3, 3] for labels in kept)
        # Spread: 6 distinct images on each rank, in blocks of 2: view 0 of its own, view 1 of the
        # previous rank's, view 2 of the one before that.
        for rank, labels in enumerate(spread):
            assert len(set(labels)) == 6
            own, previous, before = (kept[(rank - k) % 3] for k in range(3))
            assert labels == [own[0], own[3], previous[1], previous[4], before[2], before[5]]
        # Every image's 3 views on 3 different ranks, in the same step.
        where = Counter(label for labels in spread for label in set(labels))
        assert set(where.values()) == {3} and set(where) == {label for labels in kept for label in labels}


def test_the_exchange_moves_views_and_changes_none(exchanged):
    """The same views, pixel for pixel, as the loaders cut them (and as the torch RandAugment form
    augments them, on the rank they went to, with the draws that went along): only their rank
    differs."""
    _check_pixels(exchanged)


def _check_pixels(exchanged):
    for step in range(2):
        def views(layout):
            return sorted((label, tuple(pixels)) for rank in range(3)
                          for pixels, label in zip(*exchanged[layout][rank][step]))
        assert views("True") == views("False")
        assert views("torch True") == views("torch False") != views("False")  # augmented, as drawn


def test_a_saved_position_continues_exactly_with_the_exchange(exchanged):
    assert exchanged["resumed exactly"] == [True, True, True]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 3, reason="needs 3 NVIDIA GPUs")
def test_gpu_views_exchanged_over_nccl(tmp_path):
    """The same over NCCL between 3 GPUs, each loader decoding on its own GPU."""
    exchanged = _exchange(tmp_path, "cuda")
    _check_layout(exchanged)
    _check_pixels(exchanged)
    assert exchanged["resumed exactly"] == [True, True, True]
