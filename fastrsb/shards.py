"""The data shards of a multi-process run, checked before its first step.

Each process's DALI reader takes slice [floor(n r / N), floor(n (r + 1) / N)) of one permutation
of the file list, the same on every rank (one shuffle seed). The shards are disjoint and complete
exactly when every rank lists the same files in the same order, shuffles with the same seed, and
the ranks hold shard ids 0..N-1 of N once each. A node whose local copy of the data differs (a
file missing, an extra class), or a rank started with another seed, breaks that silently: here it
stops the run, naming the rank.
"""
from __future__ import annotations

import hashlib
import os

from fastrsb.distributed import Dist, agree, gather_to_main
from fastrsb.errors import UserError


def listing_fingerprint(files: list[str], labels: list[int]) -> str:
    """A short hash of a file listing and its labels, in order: equal on two machines exactly when
    their loaders would read the same files as the same classes. The paths are taken below the
    folder that holds them all: a copy of the data elsewhere (staged on a node's local disk, a job's
    scratch folder) lists the same files, and its batches are the same."""
    shared = os.path.commonprefix([min(files), max(files)]) if files else ""  # of them all: O(n), not commonpath's
    cut = shared.rfind(os.sep) + 1  # the folder's name whole, its separator included
    return hashlib.sha1("\n".join(f"{f[cut:]}\t{y}" for f, y in zip(files, labels)).encode()).hexdigest()[:16]


def shard_report(listing: str, files: int, settings: dict, batches: int, micro: int, d: Dist) -> dict:
    """What this rank reads: the whole listing (its listing_fingerprint and its number of files)
    and its own slice of it."""
    shard_id, num_shards = settings["shard_id"], settings["num_shards"]
    size = files * (shard_id + 1) // num_shards - files * shard_id // num_shards
    return {"rank": d.rank, "shard_id": shard_id, "num_shards": num_shards, "seed": settings["seed"],
            "files": files, "listing": listing, "shard_files": size, "samples_per_epoch": batches * micro,
            "repeats": settings["repeats"]}


def verify(reports: list[dict]) -> str:
    """The one-line verdict over every rank's report; UserError naming the first rank that differs."""
    first, world = reports[0], len(reports)
    for r in reports:
        for key, what in (("listing", "lists other files (or another order) than rank 0: is its copy of the data "
                                      "the same?"), ("files", "lists another number of files than rank 0"),
                          ("seed", "shuffles with another seed than rank 0"),
                          ("num_shards", f"splits the data into another number of shards than the {world} processes")):
            if r[key] != first[key] or (key == "num_shards" and r[key] != world):
                raise UserError(f"rank {r['rank']} {what} ({key} {r[key]!r} vs {first[key]!r}): its shard would "
                                "overlap the others or leave files out; stopping before the first step")
        if r["shard_id"] != r["rank"]:
            raise UserError(f"rank {r['rank']} reads shard {r['shard_id']}: every rank must read its own "
                            f"(0..{world - 1}), or shards overlap and files are left out")
    sizes = [r["shard_files"] for r in reports]
    assert sum(sizes) == first["files"]  # the floor bounds tile the listing: complete by construction
    shape = f"{sizes[0]:,}" if len(set(sizes)) == 1 else f"{min(sizes):,}-{max(sizes):,}"
    line = f"{world} shards x {shape} files, disjoint, complete"
    if first["repeats"] == 1:
        dropped = first["files"] - sum(r["samples_per_epoch"] for r in reports)
        line += f"; {dropped:,} left out of each epoch by the shards' last partial batches (drop-last)"
    return line


def check_shards(listing: str, files: int, loader, micro: int, d: Dist) -> str | None:
    """Collective: every rank reports, rank 0 verifies, all ranks learn the verdict (none waits on
    a rank that stopped). `listing` is the train listing's listing_fingerprint, `files` its length.
    Returns rank 0's line (None elsewhere, and in a single process)."""
    if not d.on:
        return None
    reports = gather_to_main(shard_report(listing, files, loader.settings, len(loader), micro, d), d)
    error, line = None, None
    if d.main:
        try:
            line = verify(reports)
        except UserError as err:
            error = err
    if agree([error is not None], d)[0]:
        raise error or UserError("rank 0 found the data shards inconsistent (its message names the rank)")
    return line
