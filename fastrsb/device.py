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


def autocast(device: str, dtype: torch.dtype | None):
    return torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()
