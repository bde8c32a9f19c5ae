"""Which device a run uses, and how it computes there."""
from __future__ import annotations

import contextlib

import torch

from fastrsb.errors import UserError


def resolve_device(requested: str | None) -> str:
    """'cuda' where a GPU is visible unless told otherwise; asking for cuda without one is an error."""
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible here (torch.cuda.is_available() is False); use --device cpu")
    if requested not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, not {requested!r}")
    return requested


def amp_dtype(device: str, amp: bool) -> torch.dtype | None:
    """bf16 on GPUs whose hardware has it (A100, H100: compute capability 8.0 and up), fp16 with a
    GradScaler on those that do not (V100, T4); the CPU trains in float32. The hardware answer:
    torch.cuda.is_bf16_supported() alone says True on a V100 too, where bf16 runs emulated."""
    if device != "cuda" or not amp:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device: str, dtype: torch.dtype | None, cache: bool = True):
    """cache=False where a CUDA graph is captured: autocast's cache of cast weights must not
    outlive the capture (PyTorch's CUDA-graph rules)."""
    return torch.autocast(device, dtype=dtype, cache_enabled=cache) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def step_stream(device: str, high_priority: bool):
    """Run the block on a high-priority CUDA stream where asked (the recipe's high_priority_stream).
    DALI's kernels run on its own streams at the default priority; when both have work waiting,
    the GPU's block scheduler starts the step's first, so the loader takes the SMs the step leaves
    idle instead of delaying it. DALI hands each batch to torch's current stream (the plugin makes
    that stream wait for it), so nothing else changes. No-op on the CPU or when not asked."""
    if device != "cuda" or not high_priority:
        yield
        return
    outer = torch.cuda.current_stream()
    inner = torch.cuda.Stream(priority=-100)  # out of range maps to the highest the GPU has
    inner.wait_stream(outer)  # the weights and state the outer stream wrote
    try:
        with torch.cuda.stream(inner):
            yield
    finally:
        outer.wait_stream(inner)


def nvml_handle(index: int):
    """NVML's handle of torch's CUDA device `index`. The two number the GPUs differently wherever
    CUDA_VISIBLE_DEVICES hides some (a job given GPUs 2 and 3 sees them as 0 and 1, NVML as 2 and
    3) or CUDA orders them fastest first (CUDA_DEVICE_ORDER's default) where NVML goes by PCI bus:
    matched by the UUID both report, by index only where NVML knows no such UUID."""
    import pynvml
    pynvml.nvmlInit()
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", ""))  # a torch without it: by index
    for name in (uuid, f"GPU-{uuid}") if uuid else ():  # NVML's form has the prefix; torch's has had it or not
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(name)
        except pynvml.NVMLError:
            continue
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def process_gpu_bytes() -> int | None:
    """What NVML counts for this process on its current CUDA device (torch's allocator, DALI's
    pools, the CUDA context and libraries), in bytes; None where NVML is missing, not permitted
    (some containers) or does not list the process."""
    try:
        import os
        import pynvml
        handle = nvml_handle(torch.cuda.current_device())
        used = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == os.getpid()]
    except Exception:  # noqa: BLE001 - no NVML: the callers say "unknown", nothing fails
        return None
    return used[0] if used and used[0] else None


def gib_outside_torch(device: str) -> float | None:
    """GiB this process holds on its GPU outside torch's caching allocator: NVML's figure for the
    process minus torch's reserve, i.e. the CUDA context, the libraries' loaded kernels and handles,
    and DALI's buffers (DALI allocates through its own pools). None on the CPU or without NVML."""
    used = process_gpu_bytes() if device == "cuda" else None
    return None if used is None else max(used - torch.cuda.memory_reserved(), 0) / 2**30


def gpu_memory_line(model: torch.nn.Module, device: str, outside_before_loaders: float | None) -> str | None:
    """What the run holds on its GPU before its first step: the loaders' (DALI), the CUDA context's
    and libraries' (what was outside torch before the loaders were built: `outside_before_loaders`,
    gib_outside_torch's figure then), and the model's state (weights, gradients and LAMB's two
    moments: 4 x the parameters). None on the CPU. Until 2026-12-01 the line gave the loader all
    that was outside torch, the CUDA context and libraries included."""
    if device != "cuda":
        return None
    state = 4 * sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    outside_now = gib_outside_torch(device)
    if outside_now is None or outside_before_loaders is None:
        memory = "loaders (DALI) unknown (no NVML)"
    else:
        memory = (f"loaders (DALI) {max(outside_now - outside_before_loaders, 0.0):.2f} GiB, "
                  f"CUDA context and libraries {outside_before_loaders:.2f} GiB")
    return (f"GPU memory before the first step: {memory}, model state {state:.2f} GiB "
            f"(weights, gradients, LAMB moments; activations come on top)")
