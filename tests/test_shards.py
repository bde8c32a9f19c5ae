"""The shard check of a multi-process run: disjoint and complete, or stopped naming the rank."""
import pytest

from fastrsb.errors import UserError
from fastrsb.distributed import Dist
from fastrsb.shards import listing_fingerprint, shard_report, verify

FILES = [f"/data/train/c{i % 3}/{i}.JPEG" for i in range(50)]
LABELS = [i % 3 for i in range(50)]


def _reports(world=2, batches=3, micro=8, **change):
    reports = []
    for rank in range(world):
        settings = {"shard_id": rank, "num_shards": world, "seed": 0, "repeats": 1}
        files, labels = FILES, LABELS
        if rank == world - 1:  # the deliberately wrong rank
            settings.update({k: v for k, v in change.items() if k in settings})
            files = change.get("files", files)
        listing = listing_fingerprint(files, labels)
        reports.append(shard_report(listing, len(files), settings, batches, micro, Dist(rank, world, rank)))
    return reports


def test_consistent_shards_give_one_line():
    # 50 files over 2 shards of 25; 3 batches of 8 each: 24 a shard, 2 left out of the epoch.
    assert verify(_reports()) == ("2 shards x 25 files, disjoint, complete; 2 left out of each epoch by the "
                                  "shards' last partial batches (drop-last)")
    assert verify(_reports(world=3, batches=2)).startswith("3 shards x 16-17 files")


@pytest.mark.parametrize("change,fragment", [
    (dict(files=FILES[:-1]), "rank 1 lists other files"),
    (dict(files=FILES[::-1]), "rank 1 lists other files (or another order)"),
    (dict(seed=1), "rank 1 shuffles with another seed"),
    (dict(shard_id=0), "rank 1 reads shard 0"),
    (dict(num_shards=3), "rank 1 splits the data into another number of shards"),
])
def test_a_wrong_shard_stops_the_run_naming_the_rank(change, fragment):
    with pytest.raises(UserError, match="stopping before the first step|every rank must read its own") as err:
        verify(_reports(**change))
    assert fragment in str(err.value)


def test_two_processes_stop_together_on_a_wrong_shard(tmp_path):
    """Under torchrun, rank 1 lists one file fewer (a node whose copy of the data differs): both
    ranks stop with a message (rank 0 names rank 1), neither waits for the other forever. Also the
    agreement on a per-rank choice (the GPU probe's micro-batch): the smallest, on every rank; and on
    a per-rank figure (an epoch's peak memory): the largest."""
    import subprocess
    import sys
    script = tmp_path / "shards.py"
    script.write_text(
        "from fastrsb.distributed import init_distributed, largest, shutdown, smallest\n"
        "from fastrsb.errors import UserError\n"
        "from fastrsb.shards import check_shards, listing_fingerprint\n"
        "d = init_distributed('cpu')\n"
        "print(f'rank {d.rank}: micro-batch {smallest(64 - 32 * d.rank, d)}')  # each rank probed its own GPU\n"
        "print(f'rank {d.rank}: peaks {largest([1.5 * d.rank, -1.0 - d.rank], d)}')  # each rank's memory\n"
        f"files = {FILES!r}[: 50 - d.rank]\n"
        "class Loader:\n"
        "    settings = {'shard_id': d.rank, 'num_shards': 2, 'seed': 0, 'repeats': 1}\n"
        "    def __len__(self): return 3\n"
        "try:\n"
        "    check_shards(listing_fingerprint(files, [0] * len(files)), len(files), Loader(), 8, d)\n"
        "    print(f'rank {d.rank}: passed')\n"
        "except UserError as err:\n"
        "    print(f'rank {d.rank}: stopped: {err}')\n"
        "shutdown(d)\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rank 0: stopped: rank 1 lists other files" in proc.stdout
    assert "rank 1: stopped: rank 0 found the data shards inconsistent" in proc.stdout
    # The micro-batch each rank's probe chose alone: every rank takes the smallest.
    assert "rank 0: micro-batch 32" in proc.stdout and "rank 1: micro-batch 32" in proc.stdout
    # A figure each rank measured alone (its peak memory): every rank takes the largest.
    assert "rank 0: peaks [1.5, -1.0]" in proc.stdout and "rank 1: peaks [1.5, -1.0]" in proc.stdout
