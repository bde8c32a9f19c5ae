"""The paper's global batch on any number of GPUs: how many micro-batches each optimizer step
takes (`--grad-accum-steps auto`, the default), from `--micro-batch N` or, on a GPU, a probe of
the largest micro-batch that fits with headroom. The global batch, and so the LR the recipe gives
for it, stays the paper's."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from fastrsb.errors import UserError

HEADROOM = 0.80  # the probe keeps a micro-batch whose peak memory stays under 80% of the GPU's (the loader's share and fragmentation)


def per_process_batch(batch: int, world: int) -> int:
    if batch % world:
        raise UserError(f"batch_size {batch} does not split over {world} processes: choose a process count that "
                        "divides it, or --set batch_size")
    return batch // world


def candidates(per_process: int, even: bool) -> list[int]:
    """Micro-batches that divide the per-process batch, largest first (even ones when mixing pairs images)."""
    return [m for m in range(per_process, 0, -1) if per_process % m == 0 and (m % 2 == 0 or not even)]


def choose_micro(per_process: int, even: bool, fits: Callable[[int], bool]) -> int:
    """The largest candidate that `fits`; candidates are tried largest first, halving the search
    through the divisors (a probe at ResNet-50 scale costs a second a try)."""
    options = candidates(per_process, even)
    low, high = 0, len(options) - 1  # options[high] is the smallest: assume nothing fits until shown
    if not options:
        raise UserError(f"no micro-batch divides {per_process} into even parts")
    if fits(options[0]):
        return options[0]
    best = None
    while low <= high:  # fits() is monotone: smaller micro-batches fit if larger ones do
        middle = (low + high) // 2
        if fits(options[middle]):
            best, high = options[middle], middle - 1
        else:
            low = middle + 1
    if best is None:
        where, remedy = getattr(fits, "where", ("on this GPU", "more GPUs"))  # gpu_fits', cpu_fits' own
        raise UserError(f"not even a micro-batch of {options[-1]} images fits {where} with {1 - HEADROOM:.0%} "
                        f"headroom: a smaller model or img_size, or {remedy}")
    return best


def plan(recipe: dict, world: int, grad_accum: str | int, micro_batch: int | None,
         fits: Callable[[int], bool] | None) -> tuple[int, int]:
    """(accumulation steps, micro-batch per process). grad_accum: an int, or "auto": from
    micro_batch if given, else the largest micro-batch `fits` allows (gpu_fits, cpu_fits), else
    the whole per-process batch in one step."""
    per_process = per_process_batch(recipe["batch_size"], world)
    if micro_batch is not None and micro_batch < 1:
        raise UserError(f"--micro-batch {micro_batch}: a micro-batch holds one image or more")
    if grad_accum != "auto":
        steps = int(grad_accum)
        if steps < 1 or per_process % steps:
            raise UserError(f"batch_size {recipe['batch_size']} does not split into {world} process(es) x {steps} "
                            "accumulation step(s): choose --grad-accum-steps so that the product divides it")
        if micro_batch is not None and micro_batch != per_process // steps:
            raise UserError(f"--micro-batch {micro_batch} and --grad-accum-steps {steps} disagree: {world} process(es) "
                            f"x {steps} x {micro_batch} is not batch_size {recipe['batch_size']}; give one of them")
        return steps, per_process // steps
    if micro_batch is not None:
        if per_process % micro_batch:
            options = ", ".join(map(str, candidates(per_process, False)[:8]))
            raise UserError(f"--micro-batch {micro_batch} does not divide the {per_process} images per process "
                            f"(batch_size {recipe['batch_size']} / {world}): e.g. {options}")
        return per_process // micro_batch, micro_batch
    even = recipe["mixup"] > 0 or recipe["cutmix"] > 0  # mixing pairs the images of a micro-batch
    if fits is None or not candidates(per_process, even):  # (an odd batch to mix: the run refuses it, saying why)
        return 1, per_process
    micro = choose_micro(per_process, even, fits)
    return per_process // micro, micro


def gpu_fits(model: torch.nn.Module, img_size: int, dtype: torch.dtype | None, num_classes: int) -> Callable[[int], bool]:
    """fits(micro): does a forward and backward of `micro` images at img_size peak under HEADROOM
    of the GPU's memory? The eager model (compiled ones use less: the answer is on the safe side);
    its weights, BatchNorm statistics and the random streams are left as they were."""
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory

    def fits(micro: int) -> bool:
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            images = torch.randn(micro, 3, img_size, img_size, device="cuda").contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                model(images).float().logsumexp(1).mean().backward()
            torch.cuda.synchronize()
            ok = torch.cuda.max_memory_allocated() < HEADROOM * total
        except torch.cuda.OutOfMemoryError:
            ok = False
        finally:
            model.zero_grad(set_to_none=True)
            model.load_state_dict(saved)
            torch.set_rng_state(rng)
            torch.cuda.set_rng_state(cuda_rng)
            torch.cuda.empty_cache()
        return ok
    fits.where = ("on this GPU", "more GPUs")  # for the run card, and choose_micro's refusal
    return fits


def cpu_fits(model: torch.nn.Module, img_size: int, processes: int = 1,
             available: int | None = None) -> Callable[[int], bool]:
    """fits(micro) on the CPU, where a step that runs out of memory is killed by the kernel without
    a word: does what a step adds to what the process holds now stay under HEADROOM of the memory
    the machine (or its cgroup) has left, shared by this machine's `processes`? What it adds: the
    tensors the forward keeps for the backward, measured (a fixed part and a part per image, from
    forwards of 2 and 4 images), and the gradients and LAMB's two moments (3 x the weights). The
    model's weights, BatchNorm statistics and the random stream are left as they were.
    available: bytes (default: memory_available())."""
    available = memory_available() if available is None else available
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    at_2, at_4 = saved_for_backward(model, 2, img_size), saved_for_backward(model, 4, img_size)
    per_image = (at_4 - at_2) / 2
    fixed = 3 * weights + at_2 - 2 * per_image

    def fits(micro: int) -> bool:
        return available is None or fixed + per_image * micro < HEADROOM * available / processes
    shared = f" to {processes} processes" if processes > 1 else ""
    fits.where = (f"in the {(available or 0) / 2**30:.1f} GiB of memory left{shared}",
                  "fewer processes" if processes > 1 else "a machine with more memory")
    return fits


def saved_for_backward(model: torch.nn.Module, images: int, img_size: int) -> int:
    """Bytes of the tensors a training forward of `images` images keeps for its backward (each
    storage once; the weights, which are held anyway, left out). The model's state and the random
    stream are restored."""
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor
    state, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    try:
        x = torch.randn(images, 3, img_size, img_size).contiguous(memory_format=torch.channels_last)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            model(x)
    finally:
        model.load_state_dict(state)
        torch.set_rng_state(rng)
    return sum(saved.values())


def memory_available(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process can still take: /proc/meminfo's MemAvailable, or less where one of its
    memory cgroups (its own or one above it: a SLURM job's, a container's) leaves less under its
    limit. None where none of them can be read."""
    figures = []
    try:
        with open(proc / "meminfo") as f:
            figures += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    for folder, limit, usage in _memory_cgroups(proc, cgroups):
        try:
            text = (folder / limit).read_text().strip()
            if text != "max" and int(text) < 2**60:  # v1 says "no limit" with a number near 2**63
                figures.append(max(int(text) - int((folder / usage).read_text()), 0))
        except (OSError, ValueError):  # a level with no limit file (the root's), or none mounted here
            pass
    return min(figures) if figures else None


def _memory_cgroups(proc: Path, cgroups: Path) -> list[tuple[Path, str, str]]:
    """(folder, limit file, usage file) of this process's memory cgroup and of each one above it,
    as /proc/self/cgroup names them: cgroup v2's ("0::/path") or v1's memory controller
    ("N:memory:/path"). Where a cgroup namespace shows the process's own as "/", the mount's top is
    its own: the walk up ends there."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, files = cgroups, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            base, files = cgroups / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        parts = Path(path).parts[1:]
        found += [(base.joinpath(*parts[:depth]), *files) for depth in range(len(parts), -1, -1)]
    return found
