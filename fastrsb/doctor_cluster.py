"""`fastrsb doctor` under torchrun: one report for the whole job, before a multi-node run.

Each machine's checks run once, on its first process (LOCAL_RANK 0): its GPUs, driver, DALI,
cores, disk and its copy of the data. Every process joins the process group a run would (NCCL on
GPUs, gloo on the CPU) and all-reduces a buffer the size of the recipe's gradients, as DDP does
every step: the sum is checked (every process reached every other) and the time taken is the
interconnect's figure a run will live with. With --data, rank 0 also compares what each machine's
copy of the data lists (files and labels), as a run's start-up would. Rank 0 prints every
machine's checks and the job's; every process exits with the same code."""
from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from fastrsb.distributed import Dist, broadcast_from_main, gather_to_main, init_distributed, shutdown
from fastrsb.data_folder import open_dataset
from fastrsb.doctor import Check, model_parameters, run_doctor, verdict
from fastrsb.errors import UserError
from fastrsb.shards import listing_fingerprint

# A doctor should answer, not wait: a process that never reaches a collective (a machine whose
# checks hang on a dead disk) fails the report after this, instead of a run's 30 minutes. Room
# enough for a slow machine's checks: the headers of 1.28 M files on a cold network disk.
TIMEOUT = datetime.timedelta(minutes=15)
REPEATS = 5  # timed all-reduces, after two untimed ones (NCCL sets its channels up on the first)


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run_cluster_doctor(data: str | None, out: str | None, recipe: str, keep_every: int | None = None
                       ) -> tuple[bool, list[dict] | None, list[Check]]:
    """(ok on every machine, each machine's checks on rank 0 (None elsewhere), the job's checks:
    with `data`, the data alike on every machine (rank 0 only), and the all-reduce). The same `ok`
    on every rank."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    d = init_distributed(device, timeout=TIMEOUT)
    try:
        collective = all_reduce_check(d, device, recipe)  # first: every process is there right after the start
        local = _machine_checks(data, out, recipe, keep_every) if d.local_rank == 0 else None
        listing = _listing(data) if data and d.local_rank == 0 else None
        node = int(os.environ.get("GROUP_RANK", "0"))  # torchrun's node rank
        found = gather_to_main({"node": node, "host": socket.gethostname(), "rank": d.rank, "listing": listing,
                                "checks": [asdict(c) for c in local] if local is not None else None}, d)
        machines = ok = None
        job = [collective]
        if d.main:
            machines = _by_machine(found)
            job.insert(0, same_software_check(machines))
            if data:
                job.insert(0, same_data_check(machines))
            ok = problems(machines, job) == 0
        return broadcast_from_main(ok, d), machines, job
    finally:
        shutdown(d)


def _machine_checks(data: str | None, out: str | None, recipe: str, keep_every: int | None) -> list[Check]:
    try:
        return run_doctor(data, out, recipe, keep_every)
    except Exception as err:  # noqa: BLE001 - said in the report; the other machines must not wait for this one
        return [Check("doctor", False, f"the checks stopped: {type(err).__name__}: {err}")]


def _by_machine(found: list[dict]) -> list[dict]:
    """One entry a machine (node rank): its host, its ranks, the checks its first process made and
    its data listing."""
    machines: dict[int, dict] = {}
    for entry in sorted(found, key=lambda e: e["rank"]):
        machine = machines.setdefault(entry["node"], {"node": entry["node"], "host": entry["host"], "ranks": [],
                                                      "checks": [], "listing": None})
        machine["ranks"].append(entry["rank"])
        machine["checks"] += entry["checks"] or []
        machine["listing"] = machine["listing"] or entry["listing"]
    return [machines[node] for node in sorted(machines)]


def _listing(data: str) -> dict | None:
    """What a run on this machine would read from `data`: counts and a fingerprint of every file
    and label, in the loaders' order (None where the folder cannot be opened: its check says why)."""
    try:
        train, val = open_dataset(data)
    except UserError:
        return None
    return {"train": len(train), "val": len(val),
            "fingerprint": "/".join(listing_fingerprint(split.files, split.labels) for split in (train, val))}


def same_data_check(machines: list[dict]) -> Check:
    """Every machine's copy of the data lists the same files with the same labels (a copy cut short
    by a failed rsync, a class missing on one node): a run would stop at start-up on it."""
    listed = [m for m in machines if m["listing"] is not None]
    if not listed:
        return Check("same-data", False, "no machine could list the data folder (above)")
    first = listed[0]
    differ = [m for m in listed if m["listing"]["fingerprint"] != first["listing"]["fingerprint"]]
    if differ:
        names = ", ".join(f"machine {m['node']} ({m['listing']['train']:,} train / {m['listing']['val']:,} val)"
                          for m in differ)
        return Check("same-data", False, f"the machines' copies of the data differ: {names} against machine "
                                         f"{first['node']}'s {first['listing']['train']:,} train / "
                                         f"{first['listing']['val']:,} val files, or the same counts with other "
                                         "files: copy the data again where they differ")
    return Check("same-data", True, f"every machine lists the same {first['listing']['train']:,} train / "
                                    f"{first['listing']['val']:,} val files with the same labels "
                                    f"({len(listed)} of {len(machines)} machine(s) could list them)")


def same_software_check(machines: list[dict]) -> Check:
    """Every machine runs the same fastrsb commit, Python, torch, DALI, timm (its "software" line):
    a job across versions may run, but not as one version would, and a torch mismatch can break
    NCCL's collectives. A warning, naming the machines that differ from the first."""
    lines = {m["node"]: next((c["text"] for c in m["checks"] if c["name"] == "software"), None) for m in machines}
    first = machines[0]["node"]
    differ = [node for node, line in lines.items() if line != lines[first]]
    if differ:
        listed = "; ".join(f"machine {node}: {lines[node]}" for node in differ)
        return Check("same-software", False, f"the machines run different software: machine {first}: "
                                             f"{lines[first]}; {listed}", fatal=False)
    return Check("same-software", True, f"every machine runs the same software ({len(machines)} machine(s))")


def all_reduce_check(d: Dist, device: str, recipe: str) -> Check:
    """All-reduce (sum) a float32 buffer of the recipe's model's parameter count across every
    process: correct, and how long it takes (the slowest process's mean over REPEATS)."""
    from fastrsb.recipe import load_recipe
    model = load_recipe(recipe)["model"]
    values = model_parameters(model)
    buffer = torch.full((values,), float(d.rank + 1), dtype=torch.float32, device=device)
    expected = d.world * (d.world + 1) / 2  # every rank's rank + 1, summed
    dist.all_reduce(buffer)
    correct = bool((buffer == expected).all())  # exact: small integers in float32
    dist.all_reduce(buffer)
    _sync(device)
    start = time.perf_counter()
    for _ in range(REPEATS):
        dist.all_reduce(buffer)
    _sync(device)
    seconds = torch.tensor([(time.perf_counter() - start) / REPEATS], dtype=torch.float64, device=device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    everywhere = torch.tensor([int(correct)], device=device)
    dist.all_reduce(everywhere, op=dist.ReduceOp.MIN)
    correct = bool(everywhere.item())
    mib, took = values * 4 / 2**20, float(seconds.item())
    bus = values * 4 * 2 * (d.world - 1) / d.world / took / 1e9  # what each link carries (ring all-reduce)
    text = (f"all-reduce across {d.world} processes ({dist.get_backend()}): {model}'s gradients "
            f"({values / 1e6:.1f} M float32 values, {mib:.1f} MiB) in {took * 1e3:.1f} ms, a bus bandwidth of "
            f"{bus:.1f} GB/s (DDP overlaps it with each step's backward pass: a backward pass shorter than "
            "that waits for the network)")
    if not correct:
        return Check("all-reduce", False, f"{text}: the sum came out wrong on at least one process")
    return Check("all-reduce", True, text)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def problems(machines: list[dict], job: list[Check]) -> int:
    """The failed checks that stop a run, each machine's and the job's: a warning (fatal=False:
    machines on other software, too few cores a GPU) is said, not counted."""
    return (sum(not c["ok"] and c["fatal"] for m in machines for c in m["checks"])
            + sum(not c.ok and c.fatal for c in job))


def report_cluster(ok: bool, machines: list[dict], job: list[Check]) -> tuple[str, dict]:
    """Rank 0's report: each machine's checks under its name, then the job's own (the data alike on
    every machine, the all-reduce)."""
    lines = []
    for m in machines:
        ranks = m["ranks"]
        span = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        lines.append(f"machine {m['node']} ({m['host']}, {span}):")
        lines += [f"  {verdict(c['ok'], c['fatal'])}  {c['text']}" for c in m["checks"]]
    lines += [f"{verdict(c.ok, c.fatal)}  {c.text}" for c in job]
    found = problems(machines, job)
    lines.append(f"{found} problem(s) on {len(machines)} machine(s): "
                 + ("a run can start" if ok else "a run cannot start"))
    return "\n".join(lines), {"ok": ok, "problems": found, "machines": machines,
                              "job": [asdict(c) for c in job]}
