"""The paper's global batch on any number of GPUs: how many micro-batches each optimizer step
takes (`--grad-accum-steps auto`, the default), from `--micro-batch N` or, on a GPU, a probe of
the largest micro-batch that fits with headroom. The global batch, and so the LR the recipe gives
for it, stays the paper's."""
from __future__ import annotations

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
        raise UserError(f"not even a micro-batch of {options[-1]} images fits on this GPU with {1 - HEADROOM:.0%} "
                        "headroom: a smaller model or img_size, or more GPUs")
    return best


def plan(recipe: dict, world: int, grad_accum: str | int, micro_batch: int | None,
         fits: Callable[[int], bool] | None) -> tuple[int, int]:
    """(accumulation steps, micro-batch per process). grad_accum: an int, or "auto": from
    micro_batch if given, else the largest micro-batch `fits` allows (GPU), else the whole
    per-process batch in one step (CPU)."""
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
    if fits is None:
        return 1, per_process
    micro = choose_micro(per_process, recipe["mixup"] > 0 or recipe["cutmix"] > 0, fits)
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
    return fits
