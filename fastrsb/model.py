"""The network: a timm model by name, channels-last."""
from __future__ import annotations

import timm
import torch
from torch import nn

from fastrsb.errors import UserError


def make_model(name: str, num_classes: int, drop_path: float = 0.0) -> nn.Module:
    """A randomly initialised timm model (timm's ResNets zero-init each block's last BN gamma,
    as the RSB recipes want), in channels-last memory format."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        raise UserError(f"unknown timm model '{name}'" + (f" (e.g. {', '.join(close)})" if close else ""))
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path or None)
    return model.to(memory_format=torch.channels_last)


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The one input size a model is built for (timm's vision transformers: a patch embedding over
    a fixed grid of positions), or None for a model that takes any size (timm's ResNets)."""
    for module in model.modules():  # timm's PatchEmbed, as `patch_embed` (ViT, Swin) or `stem` (MLP-Mixer)
        size = getattr(module, "img_size", None)
        if size and getattr(module, "strict_img_size", False):
            return tuple(size)
    return None


def check_input_sizes(model: nn.Module, sizes: dict[str, list[int]]) -> None:
    """Refuse, before any image is read, sizes a model cannot take (its forward would assert)."""
    fixed = fixed_input_size(model)
    if fixed is None:
        return
    wrong = [f"{what} is {', '.join(map(str, bad))}" for what, values in sizes.items()
             if (bad := [size for size in values if (size, size) != fixed])]
    if wrong:
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
        raise UserError(f"{name} takes {fixed[0]} x {fixed[1]} images only, and {' and '.join(wrong)}: use "
                        f"{fixed[0]}, or a model that takes any size (timm's ResNets do)")
