"""Images/s and peak memory: the loaders side by side, the training step, and the trainer end to end.

    python benchmarks/throughput.py --mode loader --synthetic-jpegs 2000 --img-size 160 --batch-size 128
    python benchmarks/throughput.py --mode step --recipe a3 --img-size 160 --batch-size 256
    python benchmarks/throughput.py --mode train --recipe a3 --synthetic-jpegs 20000 --batch-size 256
    torchrun --nproc_per_node=8 benchmarks/throughput.py --mode train ...   # per GPU and total

--mode loader: the train pipeline alone. Loaders: fastrsb's DALI pipeline on the GPU (dali-gpu)
and on the CPU (dali-cpu), a torchvision ImageFolder + DataLoader with PIL transforms (workers =
cores), and timm's own loader (timm.data.create_loader). All do the same work: decode,
random-resized-crop to --img-size, flip, normalize, deliver to the device. One process per loader;
--rounds N measures each loader N times, round-robin, and reports its median (shared machines vary);
--gpu-load times them beside matrix products that keep the GPU busy (gpu_load.py).
--mode step: mixup/cutmix, forward, loss, backward and LAMB on a device-resident synthetic batch,
channels-last, AMP and compiled as the recipe says: the trainer's own step (fastrsb.parts).
--mode train: the trainer's path end to end: DALI loader (the recipe's RandAugment and repeated
augmentation), mixup/cutmix, TrainStep.
--batch-size is per process (GPU). Warm-up steps are excluded; the device is synchronized only at
the boundaries. One JSON line per measurement, then a table (ratios against the first loader).
Every row also says how busy the main thread was over the timed steps (host_busy: its CPU time
over the wall time) and, on a GPU, the GPU (gpu_busy: NVML's utilization, sampled every 50 ms):
a busy host beside an idle GPU is a loop bound by its launches.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import synthetic_jpegs  # noqa: E402

from fastrsb.cli import count_option  # noqa: E402  (a whole number of 1 or more, as the CLI takes it)
from fastrsb.data_folder import split_folder  # noqa: E402  (train/, or timm's other names for it)


LOADERS = ("dali-gpu", "dali-cpu", "torchvision", "timm")


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def make_loader(name: str, root: Path, batch: int, size: int, device: str, threads: int, aa: str | None,
                hw_decoder_load: float | None = None, aa_impl: str = "auto", cuda_graphs: bool = False,
                compile_augment: bool = False, interpolation: str = "random", stream_handover: bool = False):
    if name.startswith("dali"):
        from fastrsb.pipelines import train_loader
        # The loader's default pixels, as the trainer takes them: float16 on the GPU, float32 on the
        # CPU (what the PIL loaders' ToTensor + Normalize give too).
        return train_loader(root, batch, size, device="cuda" if name == "dali-gpu" else "cpu", num_threads=threads,
                            aa=aa, hw_decoder_load=hw_decoder_load, aa_impl=aa_impl, cuda_graphs=cuda_graphs,
                            compile_augment=compile_augment, interpolation=interpolation,
                            stream_handover=stream_handover)
    if name == "torchvision":
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder
        # The same RandAugment as timm's loader (timm's PIL implementation), so all loaders do equal work.
        augment = []
        if aa:
            from timm.data.auto_augment import rand_augment_transform
            augment = [rand_augment_transform(aa, {"translate_const": int(size * 0.45), "img_mean": (124, 116, 104)})]
        modes = {"bilinear": [T.InterpolationMode.BILINEAR], "bicubic": [T.InterpolationMode.BICUBIC]}.get(
            interpolation, [T.InterpolationMode.BILINEAR, T.InterpolationMode.BICUBIC])  # random: one drawn per image
        crop = T.RandomChoice([T.RandomResizedCrop(size, interpolation=mode) for mode in modes])
        transform = T.Compose([crop, T.RandomHorizontalFlip(), *augment, T.ToTensor(),
                               T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        return torch.utils.data.DataLoader(ImageFolder(root, transform), batch_size=batch, shuffle=True,
                                           num_workers=threads, drop_last=True, persistent_workers=True,
                                           pin_memory=device == "cuda")
    if name == "timm":
        from timm.data import create_dataset, create_loader
        dataset = create_dataset("", root=str(root), split="train", is_training=True)
        return create_loader(dataset, input_size=(3, size, size), batch_size=batch, is_training=True,
                             num_workers=threads, use_prefetcher=device == "cuda", device=torch.device(device),
                             interpolation=interpolation, color_jitter=0.0, auto_augment=aa, persistent_workers=True)
    raise ValueError(f"unknown loader {name}")


def queued_batches(name: str, loader, workers: int) -> int:
    """Batches a loader holds ready before the consumer asks: DALI's prefetch queues, or a
    DataLoader's workers x prefetch_factor (2)."""
    if name.startswith("dali"):
        return loader.queued_batches
    return workers * 2


def check_warmup(warmup: int, steps: int, queued: int, name: str) -> None:
    """Refuse a measurement that would time batches prefetched before it began: with 16 DALI CPU
    pipelines, 25 timed batches after 5 of warm-up all came from full queues (415,764 img/s)."""
    if warmup < 2 * queued or steps < queued:
        sys.exit(f"{name}: {warmup} warm-up and {steps} timed batches, but the loader holds {queued} batches "
                 f"ready in its queues: time only after they are consumed (--warmup {2 * queued} or more, "
                 f"--steps {queued} or more; leave --warmup out to have it chosen)")


def measure_loader(name: str, args, root: Path) -> dict:
    device = "cuda" if name == "dali-gpu" or (torch.cuda.is_available() and name != "dali-cpu") else "cpu"
    threads = args.workers or _cores()
    aa = None if args.aa == "none" else args.aa
    before = {}
    if device == "cuda":  # the process's GPU memory before the loader: the CUDA context (NVML counts it too)
        from fastrsb.device import gib_outside_torch
        torch.zeros(1, device="cuda")  # the context, as the loader would make it
        gib = gib_outside_torch(device)
        before["nvml_before_loader_gib"] = round(gib, 3) if gib is not None else None
    loader = make_loader(name, root, args.batch_size, args.img_size, device, threads, aa, args.hw_decoder_load,
                         args.aa_impl or "auto", cuda_graphs=args.cuda_graphs and name == "dali-gpu",
                         compile_augment=args.compile_augment and name.startswith("dali"),
                         interpolation=args.interpolation, stream_handover=args.stream_handover and name == "dali-gpu")
    queued = queued_batches(name, loader, threads)
    warmup = args.warmup if args.warmup is not None else max(5, 2 * queued)
    check_warmup(warmup, args.steps, queued, name)
    batches = _forever(loader)
    sampler = MemorySampler()

    pixels = {}

    def one_batch():
        images, labels = next(batches)
        pixels["dtype"] = str(images.dtype).removeprefix("torch.")
        if device == "cuda" and not images.is_cuda:  # the CPU loaders hand batches to the GPU too
            images.cuda(non_blocking=True), labels.cuda(non_blocking=True)

    load = _gpu_load(args.gpu_load)
    with load:  # the warm-up too: the loader is timed in the steady state the load makes
        timing = _timed(one_batch, warmup, args.steps, device, sampler)
    return {"mode": "loader", "loader": name, "device": device, "img_size": args.img_size, "aa": aa,
            **({"gpu_load_tflops": round(load.tflops, 1)} if args.gpu_load else {}),
            "batch_size": args.batch_size, "workers": threads, "steps": args.steps, "warmup": warmup,
            "queued_batches": queued, "pixels": pixels["dtype"], "interpolation": args.interpolation,
            **(_dali_settings(loader) if name.startswith("dali") else {}),
            "images_per_sec": args.steps * args.batch_size / timing.seconds, **timing.shares(),
            **_memory(device, sampler), **before}


def _gpu_load(asked: bool):
    """--gpu-load: the loader timed beside products of large matrices on a stream and a thread of
    their own (gpu_load.py: whether the loader's work waits for the GPU's other work). The timing's
    last device sync waits for at most two of them queued (~3 ms on an H200); their matrices
    (0.4 GiB) count in the row's memory, which is not the loader's alone then."""
    if not asked:
        return contextlib.nullcontext()
    from gpu_load import GpuLoad
    return GpuLoad()


def _dali_settings(loader) -> dict:
    keys = ("pipelines", "aa_impl", "interpolation", "hw_decoder_load", "num_threads", "prefetch_queue_depth", "stream_policy",
            "concurrency", "exec_dynamic", "cuda_graphs", "augment_captured", "compile_augment", "augment_stream",
            "stream_handover")
    return {key: loader.settings[key] for key in keys if key in loader.settings}


def _forever(loader):
    while True:
        yield from loader


@dataclass
class Timing:
    seconds: float  # wall time of the timed calls, the device's queued work included
    host_busy: float  # the calling thread's CPU time over `seconds`
    gpu_busy: float | None  # NVML's utilization (the share of time a kernel ran) over them; None on the CPU

    def shares(self) -> dict:
        """host_busy and gpu_busy as a result row holds them. Read together: a host near 100% beside
        a GPU well below is a host-bound loop (the launches set the pace); both near 100%, a
        GPU-bound one (the host then spins in CUDA's launch queue, which counts as busy)."""
        return {"host_busy": round(self.host_busy, 3),
                **({"gpu_busy": round(self.gpu_busy, 3)} if self.gpu_busy is not None else {})}


def _timed(one_step, warmup: int, steps: int, device: str, sampler: MemorySampler) -> Timing:
    """`steps` calls timed after `warmup` untimed ones; device syncs at the two boundaries only."""
    for _ in range(warmup):
        one_step()
    if device == "cuda":
        torch.cuda.synchronize()
    sampler.sample()
    with GpuBusy(device) as gpu:
        start, host = time.perf_counter(), time.thread_time()
        for _ in range(steps):
            one_step()
        host = time.thread_time() - host  # before the sync below: its wait is not the loop's work
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    sampler.sample()
    return Timing(seconds, host / seconds, gpu.share)


class GpuBusy:
    """The GPU's busy share while `with` lasts: NVML's utilization (the share of the last sample
    period in which a kernel ran, any process's) read every INTERVAL seconds by a thread of its
    own, averaged. `share` is None on the CPU, without NVML or with no sample taken."""
    INTERVAL = 0.05

    def __init__(self, device: str):
        self.handle = None
        if device == "cuda":
            try:
                from fastrsb.device import nvml_handle
                self.handle = nvml_handle(torch.cuda.current_device())
            except Exception:  # noqa: BLE001 - no NVML: no figure, the timing stands
                self.handle = None
        self.samples: list[int] = []
        self._stop = threading.Event()
        self.share: float | None = None

    def __enter__(self) -> "GpuBusy":
        if self.handle is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        import pynvml
        while not self._stop.wait(self.INTERVAL):
            try:
                self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
            except pynvml.NVMLError:
                return

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self._stop.set()
            self._thread.join()
            self.share = sum(self.samples) / len(self.samples) / 100 if self.samples else None


# --variants: what may differ between the measurements of one process (one compile for them all).
VARIANT_KEYS = {"aa": str, "aa_impl": str, "hw_decoder_load": float, "workers": int, "prefetch": int, "pipelines": int,
                "high_priority_stream": bool, "stream_policy": str, "concurrency": str, "compile_augment": bool,
                "augment_stream": bool, "exec_dynamic": bool, "stream_handover": bool, "mixing": bool}
# Of those, what the step alone can vary (it has no loader).
STEP_VARIANT_KEYS = {"high_priority_stream", "mixing"}


def parse_variant(spec: str) -> dict:
    """'step' (the step alone, on a synthetic device batch), 'default' (the command line's settings)
    or 'key=value,...' over VARIANT_KEYS, e.g. 'aa_impl=batch,hw_decoder_load=1.0'; 'step,key=value'
    over STEP_VARIANT_KEYS, e.g. 'step,mixing=false' (the step alone without mixup/cutmix)."""
    if spec == "default":
        return {"step": False}
    items = spec.split(",")
    variant = {"step": items[0] == "step"}
    for item in items[1:] if variant["step"] else items:
        key, _, text = item.partition("=")
        if key not in VARIANT_KEYS or not text:
            raise ValueError(f"variant {spec!r}: {item!r} is not KEY=VALUE with KEY one of {', '.join(VARIANT_KEYS)}")
        kind = VARIANT_KEYS[key]
        try:
            if kind is bool and text.lower() not in ("true", "false"):
                raise ValueError
            variant[key] = text.lower() == "true" if kind is bool else kind(text)
        except ValueError:
            raise ValueError(f"variant {spec!r}: {key} takes a {kind.__name__}, not {text!r}") from None
    if variant.get("aa_impl", "tree") not in ("auto", "tree", "batch", "torch"):
        raise ValueError(f"variant {spec!r}: aa_impl is auto, tree, batch or torch")
    loader_keys = sorted(set(variant) - STEP_VARIANT_KEYS - {"step"})
    if variant["step"] and loader_keys:
        raise ValueError(f"variant {spec!r}: the step alone has no loader ({', '.join(loader_keys)}); it takes "
                         f"{', '.join(sorted(STEP_VARIANT_KEYS))}")
    return variant


def measure_training(mode: str, args, root: Path | None, d):
    """--mode step (synthetic device-resident batch) or --mode train (DALI loader + mixing + step),
    with the parts `fastrsb train` builds (fastrsb.parts): the same model, step, seeds and loader.
    Yields one result per --variants entry as it is measured, all on the model and step built (and
    compiled) once."""
    from fastrsb.mix import BatchMixer
    from fastrsb.parts import build_training
    from fastrsb.recipe import load_recipe
    device = "cuda" if torch.cuda.is_available() else "cpu"
    recipe = load_recipe(args.recipe, [*args.overrides, f"img_size={args.img_size}"])
    training = build_training(recipe, args.num_classes, device, d)
    specs = args.variants or ["step" if mode == "step" else "default"]
    for spec in specs:
        variant = parse_variant(spec)
        with _mixing(training, variant.get("mixing", True), recipe, args.num_classes):
            result = _measure_variant(variant, recipe, training, args, root, device, d,
                                      _profile_folder(args, spec, len(specs), d))
            result["mixing"] = isinstance(training.step.prepare, BatchMixer)  # what the step ran with
        gc.collect()  # the variant's loader (and its DALI pipelines) go before the next one's come
        yield {**({"variant": spec} if args.variants else {}), **result}


@contextlib.contextmanager
def _mixing(training, on: bool, recipe: dict, num_classes: int):
    """The step with the recipe's mixup/cutmix (on), or with plain one-hot targets (off) meanwhile."""
    from fastrsb.parts import PlainTargets
    prepare = training.step.prepare
    if not on:
        training.step.prepare = PlainTargets(num_classes, recipe["smoothing"])
    try:
        yield
    finally:
        training.step.prepare = prepare


def _profile_folder(args, spec: str, count: int, d) -> Path | None:
    if not args.profile or not d.main:
        return None
    return Path(args.profile) / spec.replace("=", "-").replace(",", "_") if count > 1 else Path(args.profile)


def _measure_variant(variant: dict, recipe: dict, training, args, root: Path | None, device: str, d,
                     profile_folder: Path | None) -> dict:
    from fastrsb.device import step_stream
    from fastrsb.parts import open_train_loader
    from fastrsb.pipelines import default_pixel_dtype, list_images
    batch, size, lr = args.batch_size, args.img_size, recipe["lr"]
    # On the CPU, the recipe's key is refused by build_training and a variant's by main().
    high_priority = variant.get("high_priority_stream", recipe["high_priority_stream"])
    if variant["step"]:
        pixels = getattr(torch, default_pixel_dtype(device))  # what the loaders hand over
        images = torch.randn(batch, 3, size, size, device=device, dtype=pixels).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, args.num_classes, (batch,), device=device)
        next_batch = lambda: (images, labels)  # noqa: E731  (mixed by the step, as in training)
        threads, loader, queued = None, None, 0
    else:
        images = list_images(root)
        if len(images.classes) > args.num_classes:
            sys.exit(f"{root} has {len(images.classes)} classes, more than --num-classes {args.num_classes}")
        # Threads: the trainer's default (the loader's: this process's share of the cores, at most 8)
        # unless told otherwise, so that what is measured is what `fastrsb train` runs.
        loader = open_train_loader(recipe, images, batch, device, d, variant.get("workers", args.workers),
                                   hw_decoder_load=variant.get("hw_decoder_load", args.hw_decoder_load),
                                   aa_impl=variant.get("aa_impl", args.aa_impl or recipe["aa_impl"]),
                                   prefetch_queue_depth=variant.get("prefetch", 2),
                                   stream_policy=variant.get("stream_policy"), concurrency=variant.get("concurrency"),
                                   **{key: variant[key] for key in ("compile_augment", "augment_stream", "pipelines",
                                                                    "exec_dynamic", "stream_handover")
                                      if key in variant},
                                   **({"aa": None if variant["aa"] == "none" else variant["aa"]} if "aa" in variant
                                      else {}))
        next_batch, queued, threads = _forever(loader).__next__, loader.queued_batches, loader.settings["num_threads"]
    sampler = MemorySampler()
    waits = []  # seconds in next(loader) per step, as the trainer's data share counts them

    def one_step():
        before = time.perf_counter()
        images, labels = next_batch()
        waits.append(time.perf_counter() - before)
        training.step.single(images, labels, lr)

    warmup = args.warmup if args.warmup is not None else max(5, 2 * queued)
    if queued:
        check_warmup(warmup, args.steps, queued, "train")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with step_stream(device, high_priority):
        timing = _timed(one_step, warmup, args.steps, device, sampler)
        profiled = {}
        if args.profile:  # after the timed steps, so that the profiler's overhead does not touch them
            profiled = _profile(one_step, args.profile_steps, device, waits, profile_folder, batch)
    mode = "step" if variant["step"] else "train"
    return {"mode": mode, "loader": "synthetic batch" if mode == "step" else ("dali-gpu" if device == "cuda" else "dali-cpu"),
            "device": device, "model": recipe["model"], "recipe": recipe["name"], "img_size": size, "batch_size": batch,
            "amp": str(training.dtype).removeprefix("torch.") if training.dtype else "float32",
            "compiled": device == "cuda" and recipe["compile"], "cuda_graphs": training.step.graphed is not None,
            "step_captured": training.step.captured,  # read after the steps, as what follows: what ran
            "high_priority_stream": high_priority, "workers": threads,
            # (a torch form whose compile failed ran eagerly; a capture that failed ran uncaptured)
            **({key: loader.settings[key] for key in ("aa", "repeats")} | _dali_settings(loader) if loader is not None else {}),
            "steps": args.steps, "warmup": warmup, "images_per_sec": args.steps * batch / timing.seconds,
            "data_wait": sum(waits[warmup:warmup + args.steps]) / timing.seconds, **timing.shares(), **profiled,
            **_memory(device, sampler)}


def _profile(one_step, steps: int, device: str, waits: list, folder: Path | None, batch: int) -> dict:
    """Run `steps` more steps of `batch` images under torch.profiler and summarize them
    (profile_summary.py); write FOLDER/profile.txt and profile.json (rank 0) and print the text.
    Returns the headline figures."""
    from torch.profiler import ProfilerActivity, profile
    from profile_summary import render, summarize, write, write_trace
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    if device == "cuda":
        torch.cuda.synchronize()
    first, start, host = len(waits), time.perf_counter(), time.thread_time()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            one_step()
        if device == "cuda":
            torch.cuda.synchronize()
    summary = summarize(prof, steps=steps, wall_seconds=time.perf_counter() - start,
                        host_seconds=time.thread_time() - host, data_wait_seconds=sum(waits[first:]), device=device,
                        images_per_step=batch)
    if folder is None:
        return {}
    text, data = write(summary, folder)
    trace = write_trace(prof, folder)
    print(render(summary), file=sys.stderr)
    print(f"profile: {text}, {data}, " + (f"{trace} (the timeline)" if trace else "no trace (over the size limit)"),
          file=sys.stderr)
    return {"profile": {key: summary[key] for key in ("gpu_busy_share", "gpu_bound_images_per_sec",
                                                      "kernel_bound_images_per_sec", "data_wait_share",
                                                      "host_cpu_ms_per_step", "wall_ms_per_step", "gpu_ms_per_step")}}


def combine_ranks(results: list[dict]) -> dict:
    """One line for a torchrun run: images/s per GPU (mean), each rank's, the total, the highest memory."""
    first = dict(results[0])
    per_rank = [r["images_per_sec"] for r in results]
    total = sum(per_rank)
    first.update(world_size=len(results), images_per_sec=total / len(results), images_per_sec_total=total,
                 images_per_sec_per_rank=per_rank)
    # Each memory figure the most a rank held, of the ranks that have it (rank 0 may lack one).
    for key in {key for r in results for key in r if key.endswith("_gib")}:
        held = [r[key] for r in results if isinstance(r.get(key), (int, float))]
        first[key] = max(held) if held else first.get(key)
    return first


def _tree_pss_gib() -> float:
    """Proportional set size of this process and all its descendants (DataLoader workers), from
    /proc: shared pages are split between the processes instead of counted once per worker, as
    ru_maxrss of forked children would (a fork starts with its parent's whole RSS)."""
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
            for task in os.listdir(f"/proc/{pid}/task"):
                todo += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
        except OSError:  # the process ended meanwhile, or no /proc (not Linux)
            continue
    return total / 2**20


class MemorySampler:
    """Peak of the process tree's PSS, sampled at the timing boundaries (a read of /proc per
    sample, not per batch)."""
    def __init__(self):
        self.peak = 0.0

    def sample(self) -> None:
        self.peak = max(self.peak, _tree_pss_gib())


def _memory(device: str, sampler: MemorySampler | None = None) -> dict:
    out = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}  # KiB on Linux
    if sampler is not None:
        out["peak_pss_with_workers_gib"] = round(sampler.peak, 3)
    if device == "cuda":
        out["torch_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["torch_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        from fastrsb.device import process_gpu_bytes
        used = process_gpu_bytes()  # NVML sees what DALI allocates outside torch; None without NVML
        out["nvml_process_gib"] = round(used / 2**30, 3) if used is not None else None
    return out


# The environment variables that change what a row measures: DALI's (its memory resources, its
# executor's threads: DALI_USE_CUDA_MALLOC_ASYNC and the like), CUDA's hardware work queues a
# context opens (CUDA_DEVICE_MAX_CONNECTIONS: 8 unless set; streams beyond share one) and torch's
# allocator's settings.
ENV_SWITCHES = ("DALI_", "CUDA_DEVICE_MAX_CONNECTIONS", "PYTORCH_CUDA_ALLOC_CONF")


def context() -> dict:
    import nvidia.dali
    import timm
    from fastrsb.provenance import source_commit  # "+changes": numbers from uncommitted code say so
    # Environment switches change what a row measured: the row says those set.
    env = {key: value for key, value in sorted(os.environ.items()) if key.startswith(ENV_SWITCHES)}
    return {"commit": source_commit(), "torch": torch.__version__, "dali": nvidia.dali.__version__,
            "timm": timm.__version__, "cuda": torch.version.cuda, "device_name": torch.cuda.get_device_name()
            if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {_cores()} cores)",
            **({"env": env} if env else {})}


def _emit(result: dict, json_out: Path | None) -> None:
    line = json.dumps(result)
    print(line, flush=True)
    if json_out:
        with open(json_out, "a") as f:
            f.write(line + "\n")


def _loader_in_child(name: str, args, root: Path) -> dict:
    """One loader measured in a process of its own, so that peak memory (RSS, GPU) is its own."""
    argv = [a for a in sys.argv[1:] if not a.startswith("--json-out") and a != str(args.json_out)]
    # argparse keeps an option's last value: these override the parent's (--rounds=3 included).
    child = subprocess.run([sys.executable, __file__, *argv, "--loaders", name, "--rounds", "1", "--data", str(root),
                            "--child"],
                           capture_output=True, text=True)
    if child.returncode:
        sys.exit(f"{name} failed:\n{child.stderr[-2000:]}")
    return json.loads(next(line for line in child.stdout.splitlines() if line.startswith("{")))


def _median_round(rounds: list[dict]) -> dict:
    """The round with the median images/s, with every round's images/s alongside."""
    ranked = sorted(rounds, key=lambda r: r["images_per_sec"])
    result = dict(ranked[(len(ranked) - 1) // 2])
    if len(rounds) > 1:
        result["images_per_sec_rounds"] = [round(r["images_per_sec"], 1) for r in rounds]
    return result


def run_loaders(args, root: Path, info: dict) -> None:
    names = args.loaders.split(",") if args.loaders else \
        [name for name in LOADERS if name != "dali-gpu" or torch.cuda.is_available()]
    if len(names) == 1 and args.rounds == 1:
        rounds = {names[0]: [{**info, **measure_loader(names[0], args, root)}]}
    else:
        # Rounds go round-robin over the loaders, so that a slow spell of a shared machine falls on
        # all of them alike; each loader reports its median round.
        rounds = {name: [] for name in names}
        for _ in range(args.rounds):
            for name in names:
                rounds[name].append({**info, **_loader_in_child(name, args, root)})
    results = [_median_round(rounds[name]) for name in names]
    for result in results:
        _emit(result, args.json_out)
    if args.child:  # the parent prints the table
        return
    base = results[0]["images_per_sec"]
    spread = args.rounds > 1
    print(f"\n{'loader':<12} {'device':<6} {'img/s':>9} {'ratio':>6}{'  rounds (img/s)' if spread else ''}  "
          f"on {info['device_name']}, {args.img_size} px, batch {args.batch_size}, RandAugment {args.aa}"
          f"{f', median of {args.rounds} rounds' if spread else ''}{', beside a GPU load' if args.gpu_load else ''}")
    for r in results:
        extra = "  " + " ".join(f"{v:,.0f}" for v in r["images_per_sec_rounds"]) if spread else ""
        print(f"{r['loader']:<12} {r['device']:<6} {r['images_per_sec']:>9,.0f} {r['images_per_sec'] / base:>6.2f}{extra}")


def run_training(args, info: dict) -> None:
    import torch.distributed as dist
    from fastrsb.distributed import init_distributed, shutdown
    d = init_distributed("cuda" if torch.cuda.is_available() else "cpu")
    root = None
    if args.mode == "train":
        if d.main or args.data:
            root = _data_root(args)
        if d.on:
            dist.barrier()  # rank 0 generates the synthetic JPEGs once
            root = _data_root(args)
    results = []
    for mine in measure_training(args.mode, args, root, d):
        ranks = [mine]
        if d.on:
            ranks = [None] * d.world
            dist.all_gather_object(ranks, mine)
        if d.main:  # each line as soon as it is measured: a run cut short keeps what it measured
            result = {**info, **combine_ranks(ranks)}
            # The share of the step alone the trainer's path keeps, against the step that mixed as it did.
            step = next((r for r in results if r["mode"] == "step" and r["mixing"] == result["mixing"]), None)
            if step and result["mode"] == "train":
                result["vs_step"] = round(result["images_per_sec"] / step["images_per_sec"], 3)
            results.append(result)
            _emit(result, args.json_out)
    shutdown(d)
    if not d.main:
        return
    first = results[0]
    print(f"\n{first['model']} {first['img_size']} px, batch {first['batch_size']} per process, {first['amp']}"
          f"{' compiled' if first['compiled'] else ''} on {info['device_name']}:")
    for r in results:
        total = f", {r['images_per_sec_total']:,.0f} total over {r['world_size']}" if r["world_size"] > 1 else ""
        memory = r.get("nvml_process_gib") or r.get("peak_rss_gib")
        share = f" ({r['vs_step']:.2f}x the step)" if "vs_step" in r else ""
        gpu = f", GPU {r['gpu_busy']:.0%}" if "gpu_busy" in r else ""
        print(f"  {r.get('variant', r['mode']):<40} {r['images_per_sec']:>9,.0f} img/s per process{share}{total}; "
              f"data wait {r['data_wait']:.0%}; busy: host {r['host_busy']:.0%}{gpu}; peak memory {memory} GiB")


def _data_root(args) -> Path:
    return args.data or synthetic_jpegs(args.cache / f"synthetic-{args.synthetic_jpegs}", args.synthetic_jpegs)


def parse_args(argv: list[str] | None = None, gpu: bool | None = None) -> argparse.Namespace:
    """The command line, checked before anything is measured or generated: what needs a GPU (gpu:
    whether one is there; by default, whether torch sees one), the variants and, in the step and
    train modes, the recipe with its --set overrides. A mistake exits with a message (argparse's)."""
    gpu = torch.cuda.is_available() if gpu is None else gpu
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["loader", "step", "train"], default="loader")
    p.add_argument("--data", type=Path, help="a class-folder tree of JPEGs (e.g. imagenet/train), or the data "
                                             "folder `fastrsb train --data` takes (its train/ is read)")
    p.add_argument("--synthetic-jpegs", type=count_option, help="generate (and cache) this many ImageNet-like JPEGs")
    p.add_argument("--cache", type=Path, default=Path("data/bench"), help="where synthetic JPEGs are kept")
    p.add_argument("--loaders", default=None, help="loader mode: comma list (default: dali-gpu if a GPU, dali-cpu, torchvision, timm)")
    p.add_argument("--aa", default="rand-m6-mstd0.5-inc1",
                   help="loader mode: RandAugment for every loader (A3's by default), or none")
    p.add_argument("--recipe", default="a3", help="step/train modes: the recipe whose model, loss, optimizer and AMP run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="step/train modes: override a recipe value, e.g. --set model=resnet18 --set compile=false")
    p.add_argument("--num-classes", type=int, default=1000, help="step/train modes: classifier width")
    p.add_argument("--img-size", type=count_option, default=None,
                   help="train size in px (default: step/train modes, the recipe's, --set included; loader mode, "
                        "160, A3's)")
    p.add_argument("--batch-size", type=count_option, default=128, help="per process (GPU)")
    p.add_argument("--steps", type=count_option, default=30, help="timed batches")
    p.add_argument("--warmup", type=int, default=None,
                   help="batches before timing starts (compilation included); default 5, and at least twice the "
                        "batches the loader holds in its queues")
    p.add_argument("--rounds", type=count_option, default=1,
                   help="loader mode: measure every loader this many times, round-robin, and report the median")
    p.add_argument("--workers", type=count_option, default=None,
                   help="DALI threads / DataLoader workers (default: loader mode, cores; train mode, the trainer's)")
    p.add_argument("--aa-impl", choices=["auto", "tree", "batch", "torch"], default=None,
                   help="DALI loaders: RandAugment as a DALI conditionals tree, DALI batch-wide, or drawn by DALI and "
                        "applied in torch after the hand-over (pipelines/randaugment.py, torch_augment.py); default: "
                        "the recipe's aa_impl (train mode), the loader's default (loader mode)")
    p.add_argument("--interpolation", choices=["random", "bilinear", "bicubic"], default=None,
                   help="loader mode: how every loader resamples its random crops (default random: bilinear or "
                        "bicubic per image, timm's default and the recipes'; train mode: --set "
                        "train_interpolation=...)")
    p.add_argument("--hw-decoder-load", type=float, default=None,
                   help="dali-gpu: the share of JPEGs sent to the hardware decoders, 0-1 (default: the loader's, by GPU)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="loader mode, dali-gpu: the torch RandAugment form replayed as a CUDA graph (train mode: "
                        "--set cuda_graphs=true, which captures the whole step too)")
    p.add_argument("--compile-augment", action="store_true",
                   help="loader mode, DALI loaders: the torch RandAugment form through torch.compile (train mode: "
                        "the recipe's compile, on the GPU; variant compile_augment=false to compare)")
    p.add_argument("--stream-handover", action="store_true",
                   help="loader mode, dali-gpu: each batch handed over on the consumer's CUDA stream, which waits for "
                        "DALI's work on the GPU, instead of after a host wait for it (train mode: variant "
                        "stream_handover=true)")
    p.add_argument("--gpu-load", action="store_true",
                   help="loader mode, on a GPU: time each loader beside a steady load of bf16 matrix products on a "
                        "stream and a thread of their own (benchmarks/gpu_load.py): does the loader keep its pace "
                        "while the GPU is busy with work it does not depend on? The row says the load's TFLOP/s")
    p.add_argument("--json-out", type=Path, help="also append the JSON lines to this file")
    p.add_argument("--variants", nargs="+", metavar="SPEC",
                   help="train mode: measure each in turn with the model built and compiled once: 'step' (the step "
                        "alone), 'default', or KEY=VALUE[,KEY=VALUE] over " + ", ".join(VARIANT_KEYS) +
                        " (aa: RandAugment's string, or none; workers: DALI threads; prefetch: DALI's queue depth; "
                        "pipelines: DALI pipelines taking turns with whole batches; stream_policy, concurrency: DALI's "
                        "executor options; exec_dynamic=false: DALI's earlier executor, its batches copied into "
                        "torch's memory; augment_stream: the torch RandAugment form on a stream of its own; "
                        "stream_handover: batches handed over on the trainer's stream, no host wait; "
                        "mixing=false: one-hot targets, no mixup/cutmix), or 'step,KEY=VALUE' over "
                        + ", ".join(sorted(STEP_VARIANT_KEYS)) + ", e.g. step step,mixing=false aa_impl=tree "
                        "aa_impl=batch,hw_decoder_load=1.0; loader rows after 'step' get their share of it. "
                        "Each line is printed as it is measured. NVML memory is the process's, cumulative")
    p.add_argument("--profile", nargs="?", const="profile", metavar="DIR",
                   help="step/train modes: after the timed steps, profile --profile-steps more with torch.profiler "
                        "and write DIR/profile.txt and profile.json (default DIR: profile)")
    p.add_argument("--profile-steps", type=count_option, default=20)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one loader for a parent's rounds
    args = p.parse_args(argv)
    _refuse_mistakes(p, args, gpu)
    if args.mode == "loader" and args.interpolation is None:  # None until here: given or not, in train mode
        args.interpolation = "random"
    return args


def _refuse_mistakes(p: argparse.ArgumentParser, args: argparse.Namespace, gpu: bool) -> None:
    """p.error (exit 2, with the message) at the first thing that cannot run as asked."""
    if args.hw_decoder_load is not None and not 0.0 <= args.hw_decoder_load <= 1.0:
        p.error("--hw-decoder-load must lie in [0, 1]")
    _refuse_options_of_another_mode(p, args)
    if args.gpu_load and not gpu:
        p.error("--gpu-load keeps a GPU busy beside the loader: it needs a GPU (none is visible here)")
    if args.cuda_graphs and not gpu:
        p.error("--cuda-graphs replays GPU work as CUDA graphs: it needs a GPU (none is visible here)")
    if args.stream_handover and not gpu:
        p.error("--stream-handover hands GPU batches over on a CUDA stream: it needs a GPU (none is visible here)")
    if args.variants:
        if args.mode != "train":
            p.error("--variants is for --mode train ('step' among them measures the step alone)")
        for spec in args.variants:
            try:
                variant = parse_variant(spec)
            except ValueError as err:
                p.error(str(err))
            for key in ("high_priority_stream", "augment_stream", "stream_handover"):
                if variant.get(key) and not gpu:
                    p.error(f"variant {spec!r}: {key} needs a GPU")
    if args.loaders:
        unknown = [name for name in args.loaders.split(",") if name not in LOADERS]
        if unknown:
            p.error(f"--loaders: {', '.join(unknown)} unknown (loaders: {', '.join(LOADERS)})")
        if "dali-gpu" in args.loaders.split(",") and not gpu:
            p.error("--loaders dali-gpu needs a GPU (none is visible here)")
    if args.mode != "step" and not args.data and not args.synthetic_jpegs:
        p.error(f"--mode {args.mode} needs --data DIR or --synthetic-jpegs N")
    if args.data and split_folder(args.data, "train").is_dir() and split_folder(args.data, "val").is_dir():
        # fastrsb's data folder, as `fastrsb train --data` takes it: its train/ is what the train
        # loader reads (taken as it is, train/ and val/ would be measured as two classes).
        args.data = split_folder(args.data, "train")
    if args.mode == "loader":
        args.img_size = args.img_size or 160
        return
    from fastrsb.errors import UserError
    from fastrsb.recipe import load_recipe
    try:  # a wrong key or value stops here, not after the JPEGs are generated
        recipe = load_recipe(args.recipe, args.overrides)
        # The recipe's train size unless told (A1/A2 train at 224: measured at 160 they were not what
        # `fastrsb train a1` runs); one size, said once, in the rows and in what runs.
        if args.img_size and any(o.startswith("img_size=") for o in args.overrides) \
                and args.img_size != recipe["img_size"]:
            p.error(f"--img-size {args.img_size} and --set img_size={recipe['img_size']}: give one")
        args.img_size = args.img_size or recipe["img_size"]
        load_recipe(args.recipe, [*args.overrides, f"img_size={args.img_size}"])
    except UserError as err:
        p.error(str(err))


def _refuse_options_of_another_mode(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An option the chosen mode would not read is an error, not a setting silently ignored; the
    training modes take the loader's settings from the recipe (--set)."""
    loader_only = {"--loaders": args.loaders is not None, "--rounds": args.rounds != 1,
                   "--interpolation": args.interpolation is not None, "--cuda-graphs": args.cuda_graphs,
                   "--compile-augment": args.compile_augment, "--gpu-load": args.gpu_load,
                   "--stream-handover": args.stream_handover}
    training_only = {"--set": bool(args.overrides), "--profile": args.profile is not None}
    stray = [flag for flag, given in (training_only if args.mode == "loader" else loader_only).items() if given]
    if stray:
        instead = {"--interpolation": "--set train_interpolation=...", "--cuda-graphs": "--set cuda_graphs=true",
                   "--compile-augment": "the recipe's compile, on the GPU",
                   "--stream-handover": "--variants stream_handover=true"}
        hints = [f"{flag}: {instead[flag]}" for flag in stray if flag in instead]
        p.error(f"{', '.join(stray)}: not read in --mode {args.mode}" + (f" (there, {'; '.join(hints)})" if hints else ""))


def main(argv: list[str] | None = None) -> None:
    from fastrsb.errors import UserError
    from fastrsb.pipelines import DatasetError
    args = parse_args(argv)
    info = {} if args.child else context()  # a child's parent adds it (versions, commit: the same)
    try:
        if args.mode == "loader":
            run_loaders(args, _data_root(args), info)
        else:
            run_training(args, info)
    except (UserError, DatasetError) as err:  # too few images for a batch, a data folder that will not do
        print(f"throughput.py: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
