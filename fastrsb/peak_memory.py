"""The most memory a process held over an epoch (its training and its validation), for the epoch
line and metrics.jsonl: what decides whether a run fits its GPU, and whether it creeps up.

On a GPU: torch's caching allocator's peak reserve over the epoch (CUDA graphs' pools included)
plus what the process holds outside it at the epoch's end (DALI's pools, which grow with the
largest image decoded and are not given back, the CUDA context and libraries: NVML's figure for
the process less torch's reserve). That is the process's peak as NVML would have seen it, to
within DALI's growth during the epoch. Also torch's peak of live tensors (`peak_torch_gib`): the
reserve above it is the allocator's slack. Host-side counters and an NVML query, at the end of an
epoch's training (for its row saved before validation), after its validation and at a stop: no
device sync in one process (several: the all-reduce of two figures, read back there).

On the CPU: the process's peak resident set (the kernel's high-water mark, VmHWM, which DALI's
CPU pipelines and their threads count in), reset at the start of each epoch where Linux lets a
process reset its own (/proc/self/clear_refs, Linux 4.0 on); else the peak since the process
started.

Several processes: the largest of every process's figures (every rank calls it: a collective).

An epoch split by a stop and a resume (a preempted job) has its figure from both processes: the
part before the stop is saved in the checkpoint (`Position.peak`, or the trained epoch's row where
its validation is left to the next start) and `merged` with the part after it; a checkpoint that
holds none (written before 2026-12-04) leaves the epoch's figure unknown rather than understated."""
from __future__ import annotations

from pathlib import Path

import torch

from fastrsb.device import gib_outside_torch
from fastrsb.distributed import Dist, largest

GiB = 2 ** 30
_PROC = Path("/proc/self")


def reset(device: str, proc: Path = _PROC) -> None:
    """Start measuring this epoch's peak."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # "5": reset the peak resident set to the current one (proc(5)); harmless otherwise
        (proc / "clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not permitted: the peak since the process started


def resident_peak_bytes(proc: Path = _PROC) -> int | None:
    """The process's peak resident set (VmHWM) in bytes; None where /proc does not say."""
    try:
        for line in (proc / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def epoch_peak(device: str, d: Dist) -> dict:
    """{"peak_memory_gib": the process's peak (None where it cannot be known), and on a GPU
    "peak_torch_gib"}, the largest over the processes."""
    if device == "cuda":
        outside = gib_outside_torch(device)  # DALI's pools, the CUDA context (None without NVML)
        figures = [None if outside is None else torch.cuda.max_memory_reserved() / GiB + outside,
                   torch.cuda.max_memory_allocated() / GiB]
    else:
        peak = resident_peak_bytes()
        figures = [None if peak is None else peak / GiB]
    figures = largest([-1.0 if f is None else f for f in figures], d)
    names = ["peak_memory_gib", "peak_torch_gib"][:len(figures)]
    return {name: None if value < 0 else value for name, value in zip(names, figures)}


def describe(metrics: dict, device: str) -> str:
    """The epoch line's words for it, empty where nothing is known."""
    where = "a GPU" if device == "cuda" else "a process"
    if metrics.get("peak_memory_gib") is not None:
        return f", peak memory {metrics['peak_memory_gib']:.2f} GiB {where}"
    if metrics.get("peak_torch_gib") is not None:  # a GPU without NVML: torch's own share alone
        return f", peak memory of torch's tensors {metrics['peak_torch_gib']:.2f} GiB {where}"
    return ""


def merged(earlier: dict | None, now: dict) -> dict:
    """The epoch's figures from `now` (this process's part) and `earlier` (the figures of the part
    before a resume, or a row holding them; None where there was no such part): each the larger of
    the two, None where either is unknown (a figure `earlier` lacks)."""
    if earlier is None:
        return dict(now)
    return {name: None if value is None or earlier.get(name) is None else max(value, earlier[name])
            for name, value in now.items()}
