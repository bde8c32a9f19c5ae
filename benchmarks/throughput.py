"""Images/s and peak memory of training data loaders, side by side, on the same images.

    python benchmarks/throughput.py --mode loader --synthetic-jpegs 2000 --img-size 160 --batch-size 128

Loaders: fastrsb's DALI pipeline on the GPU (dali-gpu) and on the CPU (dali-cpu), a torchvision
ImageFolder + DataLoader with PIL transforms (workers = cores), and timm's own loader
(timm.data.create_loader). All do the same work: decode, random-resized-crop to --img-size, flip,
normalize, deliver to the device. Warm-up batches are excluded; the device is synchronized only
at the boundaries. One JSON line per measurement, then a table with ratios against the first.
Only --mode loader exists so far (step and train modes: issue #5).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import synthetic_jpegs  # noqa: E402


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def make_loader(name: str, root: Path, batch: int, size: int, device: str, threads: int):
    if name.startswith("dali"):
        from fastrsb.pipelines import train_loader
        return train_loader(root, batch, size, device="cuda" if name == "dali-gpu" else "cpu",
                            num_threads=threads, dtype="float16")
    if name == "torchvision":
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder
        transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        return torch.utils.data.DataLoader(ImageFolder(root, transform), batch_size=batch, shuffle=True,
                                           num_workers=threads, drop_last=True, persistent_workers=True,
                                           pin_memory=device == "cuda")
    if name == "timm":
        from timm.data import create_dataset, create_loader
        dataset = create_dataset("", root=str(root), split="train", is_training=True)
        return create_loader(dataset, input_size=(3, size, size), batch_size=batch, is_training=True,
                             num_workers=threads, use_prefetcher=device == "cuda", device=torch.device(device),
                             interpolation="bilinear", color_jitter=0.0, persistent_workers=True)
    raise ValueError(f"unknown loader {name}")


def measure(name: str, args, root: Path) -> dict:
    device = "cuda" if name == "dali-gpu" or (torch.cuda.is_available() and name != "dali-cpu") else "cpu"
    threads = args.workers or _cores()
    loader = make_loader(name, root, args.batch_size, args.img_size, device, threads)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seen, start, timed = 0, None, 0
    while timed < args.steps:
        for images, labels in loader:
            if device == "cuda" and not images.is_cuda:  # the CPU loaders hand batches to the GPU too
                images, labels = images.cuda(non_blocking=True), labels.cuda(non_blocking=True)
            seen += 1
            if seen == args.warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            elif seen > args.warmup:
                timed += 1
                if timed == args.steps:
                    break
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    gpu_memory = _memory(device)
    del loader  # joins DataLoader workers, so that their peak RSS is counted below
    import gc
    gc.collect()
    result = {"mode": "loader", "loader": name, "device": device, "img_size": args.img_size,
              "batch_size": args.batch_size, "workers": threads, "steps": args.steps,
              "images_per_sec": args.steps * args.batch_size / seconds, **gpu_memory, **_memory("cpu")}
    return result


def _memory(device: str) -> dict:
    # ru_maxrss is in KiB on Linux; children: the DataLoader worker processes.
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    out = {"peak_rss_gib": round(own, 3), "peak_rss_children_gib": round(kids, 3)}
    if device == "cuda":
        out["torch_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["torch_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        try:  # NVML sees what DALI allocates outside torch
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            used = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == os.getpid()]
            out["nvml_process_gib"] = round(used[0] / 2**30, 3) if used and used[0] else None
        except Exception as err:  # noqa: BLE001 - report, do not fail the benchmark
            out["nvml_process_gib"] = f"unavailable: {err}"
    return out


def context() -> dict:
    import nvidia.dali
    import timm
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    return {"commit": commit, "torch": torch.__version__, "dali": nvidia.dali.__version__, "timm": timm.__version__,
            "cuda": torch.version.cuda, "device_name": torch.cuda.get_device_name() if torch.cuda.is_available()
            else f"CPU ({platform.processor() or platform.machine()}, {_cores()} cores)"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["loader"], default="loader")
    p.add_argument("--data", type=Path, help="a class-folder tree of JPEGs (e.g. imagenet/train)")
    p.add_argument("--synthetic-jpegs", type=int, help="generate (and cache) this many ImageNet-like JPEGs")
    p.add_argument("--cache", type=Path, default=Path("data/bench"), help="where synthetic JPEGs are kept")
    p.add_argument("--loaders", default=None, help="comma list (default: dali-gpu if a GPU, dali-cpu, torchvision, timm)")
    p.add_argument("--img-size", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="timed batches")
    p.add_argument("--warmup", type=int, default=5, help="batches before timing starts")
    p.add_argument("--workers", type=int, default=None, help="DALI threads / DataLoader workers (default: cores)")
    p.add_argument("--json-out", type=Path, help="also append the JSON lines to this file")
    args = p.parse_args()
    if not args.data and not args.synthetic_jpegs:
        p.error("give --data DIR or --synthetic-jpegs N")
    root = args.data or synthetic_jpegs(args.cache / f"synthetic-{args.synthetic_jpegs}", args.synthetic_jpegs)
    names = args.loaders.split(",") if args.loaders else \
        (["dali-gpu"] if torch.cuda.is_available() else []) + ["dali-cpu", "torchvision", "timm"]
    info = context()
    results = []
    for name in names:
        if len(names) == 1:
            result = {**info, **measure(name, args, root)}
        else:  # one process per loader, so that peak memory (RSS, GPU) is that loader's own
            argv = [a for a in sys.argv[1:] if not a.startswith("--json-out") and a != str(args.json_out)]
            argv = [a for i, a in enumerate(argv) if not (i and argv[i - 1] == "--loaders") and a != "--loaders"]
            child = subprocess.run([sys.executable, __file__, *argv, "--loaders", name, "--data", str(root)],
                                   capture_output=True, text=True)
            if child.returncode:
                sys.exit(f"{name} failed:\n{child.stderr[-2000:]}")
            result = json.loads(next(l for l in child.stdout.splitlines() if l.startswith("{")))
        results.append(result)
        line = json.dumps(result)
        print(line, flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(line + "\n")
    base = results[0]["images_per_sec"]
    print(f"\n{'loader':<12} {'device':<6} {'img/s':>9} {'ratio':>6}  on {info['device_name']}, {args.img_size} px, batch {args.batch_size}")
    for r in results:
        print(f"{r['loader']:<12} {r['device']:<6} {r['images_per_sec']:>9,.0f} {r['images_per_sec'] / base:>6.2f}")


if __name__ == "__main__":
    main()
