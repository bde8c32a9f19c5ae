"""The least memory one evaluation batch needs, found before anything is allocated: a test size far
above what the model was trained at (`fastrsb eval --img-size 2000`) needs tens of GiB a batch.
On a GPU that is an out-of-memory error; on the CPU the kernel's OOM killer ends the process
without a word, after it has driven the machine into the ground. So the floor is checked against
the memory free first, and a batch that cannot fit is refused with a batch size to try.

A floor, not an estimate: only what must exist at once is counted, so a batch it passes may still
not fit (then the GPU's error, caught by the caller, says so), but one it refuses cannot. It adds
the loader's batches (the one handed over and the one DALI prepares behind it) to the largest
activation of the forward pass: the biggest input plus output of any one convolution,
normalization or linear layer, whose input must stay while its output is written. The sizes come
from a forward pass on torch's meta device: shapes only, no memory, no arithmetic."""
from __future__ import annotations

import copy

import torch
from torch import nn

from fastrsb.accumulation import memory_available
from fastrsb.errors import UserError

GiB = 2 ** 30
_BOTH_LIVE = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.Linear, nn.LayerNorm, nn.GroupNorm)


def largest_activation(model: nn.Module, sizes: list[int], element_bytes: int) -> dict[int, int] | None:
    """For each SIZE, the bytes the largest layer of MODEL holds at once for one SIZE x SIZE image;
    None where the model does not run on the meta device (then nothing is checked)."""
    largest = 0

    def measure(module, inputs, output):
        nonlocal largest
        held = _numel(output) + (_numel(inputs) if isinstance(module, _BOTH_LIVE) else 0)
        largest = max(largest, held * element_bytes)

    try:
        shadow = copy.deepcopy(model).to("meta").eval()
    except Exception:  # a model whose parameters cannot move there: no floor
        return None
    hooks = [m.register_forward_hook(measure) for m in shadow.modules() if not list(m.children())]
    found = {}
    try:
        with torch.inference_mode():
            for size in sizes:
                largest = 0
                shadow(torch.empty(1, 3, size, size, device="meta"))
                found[size] = largest
    except Exception:  # an op without a meta kernel: no floor rather than no evaluation
        return None
    finally:
        for hook in hooks:
            hook.remove()
    return found


def _numel(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (tuple, list)):
        return sum(_numel(v) for v in value)
    return 0


def free_memory(device: str) -> int | None:
    """Bytes the process may still take: the GPU's free memory, or the machine's (less where its
    memory cgroup, a SLURM job's or a container's, leaves less: fastrsb.accumulation)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return memory_available()


def refuse_a_batch_that_cannot_fit(model: nn.Module, sizes: list[int], batch: int, device: str,
                                   activation_bytes: int, pixel_bytes: int, free: int | None = None) -> None:
    """Each test size's floor for BATCH images against the memory free (free: given, for tests).
    activation_bytes: 2 under AMP, else 4; pixel_bytes: what the loader hands over (2: float16 on a
    GPU, 4: float32 on the CPU)."""
    free = free_memory(device) if free is None else free
    if free is None:
        return
    activations = largest_activation(model, sorted(sizes, reverse=True), activation_bytes)
    for size, activation in (activations or {}).items():
        per_image = activation + 2 * 3 * size * size * pixel_bytes  # + two loader batches' pixels
        if batch * per_image <= free:
            continue
        where = "the GPU has" if device.startswith("cuda") else "this machine has"
        # The advice halves what the floor would allow: the forward pass holds more than its
        # largest layer (ResNet-10t at 2000 px on the CPU: 1.4x the floor a batch of 8).
        fits = free // per_image
        advice = (f"--batch-size {max(1, fits // 2)} or fewer (the floor allows {fits} with nothing else held)"
                  if fits else f"a smaller --img-size (one image alone needs {per_image / GiB:,.1f} GiB)")
        raise UserError(f"a batch of {batch} images at {size} px needs at least {batch * per_image / GiB:,.1f} GiB "
                        f"(the loader's batches and the model's largest layer) and {where} "
                        f"{free / GiB:,.1f} GiB free: {advice}")
