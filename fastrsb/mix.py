"""Mixup and CutMix on the whole batch, on the batch's device, with timm's semantics.

Mode 'batch' as in timm.data.Mixup: one lam per batch, row i mixed with row B-1-i, a CutMix box
whose lam is corrected to the box's real area. The random draws happen on the host in timm's
order (numpy), so nothing waits on the GPU; the pixels never leave it.
"""
from __future__ import annotations

import numpy as np
import torch


def soft_targets(labels: torch.Tensor, num_classes: int, lam: float, smoothing: float = 0.0) -> torch.Tensor:
    """lam * onehot(y) + (1 - lam) * onehot(y.flip(0)), smoothed as timm's mixup_target.
    labels: (B,) int64 -> (B, num_classes) float32."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    onehot = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    onehot.scatter_(1, labels.view(-1, 1), on)
    if lam == 1.0:
        return onehot
    return torch.lerp(onehot.flip(0), onehot, lam)


def mixing_enabled(mixup_alpha: float, cutmix_alpha: float) -> bool:
    return mixup_alpha > 0 or cutmix_alpha > 0


def check_pairable(batch: int) -> None:
    """Batch mode pairs row i with row B-1-i, so a mixed batch must be even (as timm asserts).
    The one owner of this rule: the trainer checks its micro-batch with it before the first step."""
    if batch % 2:
        raise ValueError(f"mixup/cutmix pair each image with its mirror in the batch, so a batch must be even, "
                         f"not {batch}")


class BatchMixer:
    """Draws and applies mixup/cutmix to a batch: `images, targets = mixer(images, labels)`."""

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, prob: float = 1.0,
                 switch_prob: float = 0.5, smoothing: float = 0.0, rng: np.random.RandomState | None = None):
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.smoothing = smoothing
        # RandomState, not Generator: the same call sequence as timm's np.random draws.
        self.rng = rng if rng is not None else np.random.RandomState(0)

    @property
    def enabled(self) -> bool:
        return mixing_enabled(self.mixup_alpha, self.cutmix_alpha)

    def draw(self) -> tuple[float, bool]:
        """(lam, use_cutmix) for one batch, in timm's order of draws."""
        if not self.enabled or not self.rng.rand() < self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(self.rng.rand() < self.switch_prob)
            alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        else:
            use_cutmix = self.cutmix_alpha > 0
            alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(self.rng.beta(alpha, alpha)), use_cutmix

    def cutmix_box(self, height: int, width: int, lam: float) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of a box covering about (1 - lam) of the image, centre uniform."""
        ratio = np.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy = self.rng.randint(0, height)
        cx = self.rng.randint(0, width)
        y0, y1 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + (cut_h + 1) // 2, 0, height)
        x0, x1 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + (cut_w + 1) // 2, 0, width)
        return int(y0), int(y1), int(x0), int(x1)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) any layout, labels (B,) int64 -> mixed images (new tensor, same
        layout; the input, which may be a DALI buffer, is never written), targets (B, K) float32."""
        check_pairable(images.shape[0])
        lam, use_cutmix = self.draw()
        if lam == 1.0:
            return images, soft_targets(labels, self.num_classes, 1.0, self.smoothing)
        if use_cutmix:
            height, width = images.shape[-2:]
            y0, y1, x0, x1 = self.cutmix_box(height, width, lam)
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
            mixed = images.clone()
            mixed[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
        else:
            mixed = torch.lerp(images.flip(0), images, lam)
        return mixed, soft_targets(labels, self.num_classes, lam, self.smoothing)

    def state_dict(self) -> dict:
        name, keys, pos, has_gauss, cached = self.rng.get_state()
        return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                "has_gauss": int(has_gauss), "cached": float(cached)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(("MT19937", state["keys"].numpy().astype(np.uint32), state["pos"],
                            state["has_gauss"], state["cached"]))
