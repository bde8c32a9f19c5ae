"""LAMB as timm defines it, in multi-tensor (foreach) form, plus the per-step LR schedule.

Everything stays on the device: the global gradient norm, the clip factor, the per-tensor trust
ratios, the LR and bias corrections are tensors, so a step never waits on the GPU; compiled
(`Lamb(compiled=True)`; the recipe's where its step is a CUDA graph), the update of all groups is
one graph that never recompiles.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """timm's create_optimizer_v2 groups: no decay on biases and parameters with ndim <= 1."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    if not weight_decay:
        return [{"params": no_decay + decay, "weight_decay": 0.0}]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019) with timm's defaults and semantics (timm.optim.Lamb):
    a global gradient-norm clip at `max_grad_norm` (always on by default), Adam moments with bias
    correction, L2 weight decay added to the update, and a trust ratio ||p|| / ||update|| applied
    only where weight decay is on (or everywhere with always_adapt)."""

    def __init__(self, params, lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01,
                 grad_averaging: bool = True, max_grad_norm: float | None = 1.0,
                 trust_clip: bool = False, always_adapt: bool = False, compiled: bool = False):
        """compiled: run the update through torch.compile (fused kernels on the GPU)."""
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, grad_averaging=grad_averaging,
                        max_grad_norm=max_grad_norm, trust_clip=trust_clip, always_adapt=always_adapt)
        super().__init__(params, defaults)
        self.compiled = compiled
        self._update_fn = _compiled_step() if compiled else lamb_step
        self._scalars: dict[int, torch.Tensor] = {}  # per group: lr, bias corrections (device tensors)

    def use_eager_update(self) -> None:
        """From here on, the eager update: for a step that runs uncaptured after all (a CUDA-graph
        capture that failed), where the compiled one costs the host twice as much (make_optimizer)."""
        self.compiled, self._update_fn = False, lamb_step

    @torch.no_grad()
    def _clip_divisor(self) -> torch.Tensor | None:
        """max(||all grads|| / max_grad_norm, 1), as a 0-d device tensor."""
        max_norm = self.defaults["max_grad_norm"]
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if max_norm is None or not grads:
            return None
        norms = torch._foreach_norm(grads)
        return (torch.linalg.vector_norm(torch.stack(norms)) / max_norm).clamp_(min=1.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.update(self.prepare())
        return loss

    def prepare(self) -> list[dict]:
        """The host's part of a step (`advance`), then what the update works on (`work`)."""
        self.advance()
        return self.work()

    def advance(self) -> None:
        """Count a step and write its LR and bias corrections into the device scalars the update
        reads. Kept apart from `update` so that a CUDA graph can capture the update alone: a graph
        replays what its kernels read from memory, never a host value baked in at capture
        (fastrsb.step.GraphedStep)."""
        for index, group in enumerate(self.param_groups):
            # A Python int step (one per group, as in timm): no device tensor to read back.
            group["step"] = group.get("step", 0) + 1
            if group["params"]:
                self._write_scalars(index, group)

    def work(self) -> list[dict]:
        """Per group with gradients: its tensors, device scalars and settings, for `update`."""
        return [self._group_work(index, group, params) for index, group in enumerate(self.param_groups)
                if (params := [p for p in group["params"] if p.grad is not None])]

    @torch.no_grad()
    def update(self, work: list[dict]) -> None:
        """The device's part: the global-norm clip and every group's update, no host value read."""
        if not work:
            return
        divisor = self._clip_divisor()
        if divisor is None:
            divisor = torch.ones((), dtype=work[0]["params"][0].dtype, device=work[0]["params"][0].device)
        self._update_fn(work, divisor)  # every group in one call: one compiled graph

    def _write_scalars(self, index: int, group: dict) -> None:
        beta1, beta2 = group["betas"]
        step = group["step"]
        bc1 = 1 - beta1**step if group["bias_correction"] else 1.0
        bc2 = 1 - beta2**step if group["bias_correction"] else 1.0
        # What changes from step to step goes in as 0-d device tensors, filled in place (a kernel
        # argument, no copy, no sync), so the compiled update never recompiles for a new LR.
        # Keyed by the group's position: load_state_dict replaces the group dicts, not their order.
        scalars = self._scalars_of(index, group)
        for i, value in enumerate((group["lr"], bc1, math.sqrt(bc2))):
            scalars[i].fill_(value)

    def _scalars_of(self, index: int, group: dict) -> torch.Tensor:
        if index not in self._scalars:
            first = group["params"][0]
            self._scalars[index] = torch.zeros(3, dtype=first.dtype, device=first.device)
        return self._scalars[index]

    def _group_work(self, index: int, group: dict, params: list[torch.Tensor]) -> dict:
        for p in params:
            if not self.state[p]:
                self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                self.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        scalars = self._scalars_of(index, group)
        return dict(params=params, grads=[p.grad for p in params], exp_avgs=[self.state[p]["exp_avg"] for p in params],
                    exp_avg_sqs=[self.state[p]["exp_avg_sq"] for p in params], lr=scalars[0], bc1=scalars[1],
                    bc2_sqrt=scalars[2], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    grad_averaging=group["grad_averaging"],
                    adapt=bool(group["weight_decay"] or group["always_adapt"]), trust_clip=group["trust_clip"])


def lamb_step(work: list[dict], divisor: torch.Tensor) -> None:
    """The update of every parameter group (`Lamb._group_work`'s dicts), clipped by `divisor`."""
    for group in work:
        lamb_update(divisor=divisor, **group)


def lamb_update(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], divisor: torch.Tensor, lr: torch.Tensor, bc1: torch.Tensor,
                bc2_sqrt: torch.Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
                grad_averaging: bool, adapt: bool, trust_clip: bool) -> None:
    """One LAMB update of a parameter group, in place, in multi-tensor form. Eager, the per-tensor
    trust ratios (0-d tensors) do not fit foreach's same-size fast path, so the last multiply runs
    one kernel per tensor (~54 launches for ResNet-50's decay group); compiled (Lamb(compiled=True),
    the recipe's `compile` on the GPU), inductor fuses the whole update into a few kernels."""
    grads = torch._foreach_div(grads, divisor)  # the global-norm clip; p.grad itself stays unclipped, as in timm
    if grad_averaging:
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    else:
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    # update = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(exp_avgs, denom)
    torch._foreach_div_(updates, bc1)
    if weight_decay:
        torch._foreach_add_(updates, params, alpha=weight_decay)
    if adapt:
        w_norm = torch.stack(torch._foreach_norm(params))
        u_norm = torch.stack(torch._foreach_norm(updates))
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        if trust_clip:
            ratio = ratio.clamp(max=1.0)
        torch._foreach_mul_(updates, list((ratio * lr).unbind(0)))
    else:
        torch._foreach_mul_(updates, lr)
    torch._foreach_sub_(params, updates)


_compiled_lamb_step = None


def _compiled_step():
    """lamb_step through torch.compile, wrapped once per process (compiled on first use). Never
    in inductor's "reduce-overhead" mode: it skips graphs for a function that mutates its inputs
    (every LAMB update does), and at a70b3c8 the run with it died of a segfault on the H200. The
    recipe's cuda_graphs captures the whole step instead (fastrsb.step.GraphedStep)."""
    global _compiled_lamb_step
    if _compiled_lamb_step is None:
        _compiled_lamb_step = torch.compile(lamb_step, dynamic=False)
    return _compiled_lamb_step


def lr_at(step: int, steps_per_epoch: int, epochs: int, lr: float, warmup_epochs: int,
          warmup_lr: float, min_lr: float) -> float:
    """Per-iteration schedule: linear warmup from warmup_lr to lr over warmup_epochs, then a
    cosine from lr down to min_lr at the last step. (timm steps per epoch by default; per
    iteration is smoother and reaches the peak exactly.)"""
    warmup_steps = warmup_epochs * steps_per_epoch
    total = epochs * steps_per_epoch
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, recipe: dict, compiled: bool = False, captured: bool = False) -> Lamb:
    """The recipe's LAMB. compiled (the recipe's `compile`, on the GPU) compiles the update only
    where the step is captured as a CUDA graph (captured: the recipe's cuda_graphs). Measured on
    the H200 at c5b2a17 (benchmarks/lamb_update.py, ResNet-50): uncaptured, the compiled update
    took 6.5 ms a step of host time (dynamo's guards over ~640 tensors and inductor's launches) to
    the eager foreach update's 3.1, on a step the host bounds (10,106 img/s at a70b3c8 with it,
    11,812 at 915cdf8 with the eager one); captured, 0.59 ms against 1.26 on the GPU, the host's
    part gone."""
    return Lamb(param_groups(model, recipe["weight_decay"]), lr=recipe["warmup_lr"],
                betas=tuple(recipe["opt_betas"]), eps=recipe["opt_eps"], weight_decay=recipe["weight_decay"],
                compiled=compiled and captured)
