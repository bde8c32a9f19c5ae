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
