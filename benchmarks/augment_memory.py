"""The torch RandAugment form alone (`aa_impl="torch"`), eager and compiled, in chunks (its default;
eager on a GPU only its warp is chunked: TorchRandAugment.chunk_size) and on the whole batch at
once: the most memory torch holds at once during one call (its output included, its input not),
and its time, on A3's batch.

    python benchmarks/augment_memory.py [--batch-size 256 --img-size 160 --aa rand-m6-mstd0.5-inc1]
                                        [--chunk-pixels 1638400 0]

Why: issue 13 bounds the GPU loader at 1.5 GiB (NVML, loader alone); at a70b3c8 the eager torch
form held 1.147 GiB of torch's memory on the H200, on top of ~1 GiB of DALI's and the CUDA
context's. On the CPU this counts torch's allocations through the profiler's memory events (the
same figure as CUDA's peak allocated: 1,232 MB on both for the eager form at A3's size); on the
GPU it reads torch.cuda.max_memory_allocated. Each sample draws one of the policy's ops (or none)
per layer and a magnitude as the loader's draws do; the pixels are random.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastrsb.pipelines import parse_rand_augment  # noqa: E402
from fastrsb.pipelines.randaugment import INTERPOLATIONS, _policy  # noqa: E402
from fastrsb.pipelines.torch_augment import CHUNK_PIXELS, WARP_TAIL, TorchRandAugment, warp_capacity  # noqa: E402
from profile_summary import summarize  # noqa: E402  (benchmarks/ is this script's folder)
from throughput import _emit, context  # noqa: E402


def batch(batch_size: int, size: int, ops: int, layers: int, device: str,
          interpolation: str = "random", prob: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W, 3) uint8 pixels and (N, 1 + layers x draws_per_layer(interpolation)) draws: flip,
    then each layer's op index by the policy's law (with probability `prob` one of the `ops`, each
    as likely; else one past the last: no op), signed magnitude around 6 and, for "random",
    bicubic or not."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, generator=generator)
    columns = [torch.rand(batch_size, generator=generator)]
    for _ in range(layers):
        index = torch.randint(0, ops, (batch_size,), generator=generator)
        index[torch.rand(batch_size, generator=generator) >= prob] = ops
        columns += [index.float(), torch.randn(batch_size, generator=generator) * 3 + 6]
        if interpolation == "random":
            columns.append(torch.rand(batch_size, generator=generator).round())
    return images.to(device), torch.stack(columns, 1).to(device)


def peak_mb(call, device: str) -> float:
    """The most torch held at once during `call()`, above what it held before (MB)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 1e6
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    # The trace's memory events: one per allocation and free, with the bytes (signed) and what the
    # allocator held right after it.
    with tempfile.TemporaryDirectory() as folder:
        prof.export_chrome_trace(f"{folder}/trace.json")
        events = json.loads(Path(folder, "trace.json").read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not memory:
        return 0.0
    before = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    peak = max(e["args"]["Total Allocated"] for e in memory) - before
    return peak / 1e6


def measure(augment: TorchRandAugment, images: torch.Tensor, draws: torch.Tensor, repeats: int) -> dict:
    device = images.device.type
    augment(images, draws)  # compiles, where compiled
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        augment(images, draws)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return {"peak_mb": round(peak_mb(lambda: augment(images, draws), device), 1),
            "ms_per_batch": round(1000 * best, 2), "compiled": augment.compiled}


def top_kernels(augment: TorchRandAugment, images: torch.Tensor, draws: torch.Tensor, count: int) -> list[dict]:
    """Where one call's time goes: its `count` costliest kernels on a GPU (each kernel's time
    summed by name over the call, as profile_summary ranks a training step's: which of the form's
    ops to make cheaper), its operators' own time on the CPU (ms). At c5b2a17 the compiled form
    alone took 5.1 ms a batch of 256 on the H200, and the A3 profile showed only its two largest
    kernels (2.0 and 0.66 ms a step)."""
    cuda = images.device.type == "cuda"
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        augment(images, draws)
        if cuda:
            torch.cuda.synchronize()
    summary = summarize(prof, steps=1, wall_seconds=time.perf_counter() - start, host_seconds=0.0,
                        data_wait_seconds=0.0, device=images.device.type, top=count)
    ranked = summary.get("top_kernels") or summary["top_cpu_ops"]  # (no kernels on the CPU)
    return [{"name": row["name"], "ms": round(row["ms_per_step"], 3)} for row in ranked]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=160)
    p.add_argument("--aa", default="rand-m6-mstd0.5-inc1", help="timm's RandAugment string")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default="random",
                   help="how the geometric ops resample (default: random, the recipes': bilinear or bicubic per sample)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls; the best is kept")
    p.add_argument("--chunk-pixels", type=int, nargs="+", default=[CHUNK_PIXELS, 0],
                   help="augment in chunks of at most this many pixels; 0: the whole batch at once "
                        f"(default: {CHUNK_PIXELS:,}, the form's default, then 0)")
    p.add_argument("--warp-tail", type=float, nargs="+", default=[WARP_TAIL],
                   help="the warp takes as many samples of a chunk as more of them draw a geometric op with at "
                        f"most this probability (default: {WARP_TAIL:g}, the form's); 0: every sample, whatever it "
                        "drew (the form until 2026-12-04); several: each in turn")
    p.add_argument("--top-kernels", type=int, default=0, metavar="N",
                   help="also profile one call and keep its N costliest kernels (on the CPU: operators)")
    p.add_argument("--json-out", type=Path, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    if min(args.chunk_pixels) < 0:
        p.error("--chunk-pixels: a number of pixels, or 0 for the whole batch")
    if not all(0 <= tail < 1 for tail in args.warp_tail):
        p.error("--warp-tail: a probability, from 0 (every sample warped) to below 1")
    if args.top_kernels < 0:
        p.error("--top-kernels: a number of kernels, 0 for none")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = parse_rand_augment(args.aa)
    images, draws = batch(args.batch_size, args.img_size, len(_policy(spec)[0]), spec.num_layers, device,
                          args.interpolation, spec.prob)
    dtype = torch.float16 if device == "cuda" else torch.float32
    results = []
    for chunk_pixels, tail, compiled in itertools.product(args.chunk_pixels, args.warp_tail, (False, True)):
        augment = TorchRandAugment(spec, args.img_size, dtype, compiled=compiled, chunk_pixels=chunk_pixels or None,
                                   interpolation=args.interpolation, warp_tail=tail)
        chunk = augment.chunk_size(images)  # eager on a GPU: the whole batch, its warp in chunks
        result = {**context(), "mode": "augment_memory", "device": device, "aa": args.aa,
                  "interpolation": args.interpolation, "warp_tail": tail,
                  "warp_capacity": warp_capacity(chunk, augment.geometric_share, tail),
                  "batch_size": args.batch_size, "img_size": args.img_size,
                  "variant": "compiled" if compiled else "eager", "chunk_pixels": chunk_pixels or None,
                  "chunk_images": chunk if chunk < args.batch_size else None,
                  **measure(augment, images, draws, args.repeats)}
        if args.top_kernels:
            result["top_kernels"] = top_kernels(augment, images, draws, args.top_kernels)
        results.append(result)
        _emit(result, args.json_out)
    return results


if __name__ == "__main__":
    main()
