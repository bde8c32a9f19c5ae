"""An exponential moving average of the weights, as timm's ModelEmaV3 keeps it: every floating
state_dict entry (parameters and BN statistics) lerped towards the model's, integer buffers
copied, with multi-tensor operations and no host syncs."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs = None

    def decay_at(self, step: int) -> float:
        # timm's get_decay(step) without warmup: the first update copies the weights.
        return 0.0 if step <= 1 else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """step: the optimizer steps taken so far, including this one (timm's num_updates)."""
        if self._pairs is None:  # state_dict tensors share storage with the live ones: list them once
            own, other = self.module.state_dict(), model.state_dict()
            floats = [(own[k], other[k]) for k in own if own[k].is_floating_point()]
            self._pairs = ([a for a, _ in floats], [b for _, b in floats],
                           [(own[k], other[k]) for k in own if not own[k].is_floating_point()])
        ema, live, integers = self._pairs
        torch._foreach_lerp_(ema, live, 1.0 - self.decay_at(step))
        for mine, theirs in integers:
            mine.copy_(theirs)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
