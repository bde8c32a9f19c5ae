"""Training losses: timm's BinaryCrossEntropy for dense (mixed) targets, or soft cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, target_thresh: float | None) -> torch.Tensor:
    """timm's BinaryCrossEntropy on dense targets: binarize with `targets > thresh` (strictly),
    then the mean of BCE-with-logits over all B x K elements."""
    if target_thresh is not None:
        targets = targets.gt(target_thresh).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """timm's SoftTargetCrossEntropy: -sum(targets * log_softmax(logits)), batch mean."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def make_loss(recipe: dict):
    """loss(logits (B, K), targets (B, K) float) -> scalar, as the recipe says."""
    if recipe["bce_loss"]:
        thresh = recipe["bce_target_thresh"]
        return lambda logits, targets: bce_loss(logits.float(), targets, thresh)
    return lambda logits, targets: soft_cross_entropy(logits.float(), targets)
