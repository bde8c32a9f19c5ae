import copy
import inspect
import math

import pytest
import timm
import torch
from timm.optim import Lamb as TimmLamb
from timm.optim import create_optimizer_v2

from fastrsb.optim import Lamb, lr_at, param_groups

# timm's Lamb as its per-tensor loop: the reference form. timm 1.0.31 has a foreach form too, on by
# default; 1.0.29 (the GPU machine's) has only the loop and no `foreach` argument.
TIMM_LOOP = {"foreach": False} if "foreach" in inspect.signature(TimmLamb.__init__).parameters else {}


def test_weight_decay_groups_match_timm():
    model = timm.create_model("resnet50", num_classes=1000)
    ours = param_groups(model, 0.02)
    theirs = create_optimizer_v2(model, "lamb", lr=1e-3, weight_decay=0.02).param_groups
    as_ids = lambda groups: sorted((g["weight_decay"], sorted(map(id, g["params"]))) for g in groups)  # noqa: E731
    assert as_ids(ours) == as_ids(theirs)
    no_decay = next(g for g in ours if g["weight_decay"] == 0)
    assert len(no_decay["params"]) == 107 and sum(p.numel() for p in no_decay["params"]) == 54_120


@pytest.mark.parametrize("kwargs", [{}, {"always_adapt": True}, {"trust_clip": True, "max_grad_norm": None},
                                    {"grad_averaging": False, "bias_correction": False}])
def test_lamb_equals_timm_over_steps(kwargs):
    """The same gradients fed to both optimizers for several steps (fed, not recomputed, so
    float noise in the forward pass cannot hide or fake a difference in the update rule)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=7)
    with torch.no_grad():  # every other tensor's norm above its update's: trust ratios past 1 too
        for p in list(model.parameters())[1::2]:
            p.mul_(50)
    twin, unclipped = copy.deepcopy(model), copy.deepcopy(model)
    ours = Lamb(param_groups(model, 0.02), lr=5e-3, weight_decay=0.02, **kwargs)
    theirs = TimmLamb(param_groups(twin, 0.02), lr=5e-3, weight_decay=0.02, **TIMM_LOOP, **kwargs)
    nets = [(model, ours), (twin, theirs)]
    if kwargs.get("trust_clip"):  # the same without the trust clip: the clip must change the update
        nets.append((unclipped, Lamb(param_groups(unclipped, 0.02), lr=5e-3, weight_decay=0.02,
                                     **{**kwargs, "trust_clip": False})))
    for step in range(6):
        # Scaled so the global gradient norm is well above 1: the clip is exercised.
        grads = [torch.randn_like(p) * (0.5 + step) for p in model.parameters()]
        if step == 2:
            grads[0].zero_()  # a zero update norm: trust ratio falls back to 1
        for net, opt in nets:
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
    if kwargs.get("trust_clip"):
        assert not all(torch.allclose(a, b) for a, b in zip(model.parameters(), unclipped.parameters()))


def test_lamb_trains_a_toy_problem():
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = x @ torch.randn(10, 1)
    layer = torch.nn.Linear(10, 1)
    opt = Lamb(layer.parameters(), lr=0.05, weight_decay=0.0)
    first = None
    for _ in range(200):
        loss = torch.nn.functional.mse_loss(layer(x), y)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.01


def test_schedule_shape():
    kw = dict(steps_per_epoch=10, epochs=100, lr=8e-3, warmup_epochs=5, warmup_lr=1e-4, min_lr=1e-6)
    assert lr_at(0, **kw) == 1e-4
    assert math.isclose(lr_at(25, **kw), 1e-4 + (8e-3 - 1e-4) / 2)
    assert math.isclose(lr_at(50, **kw), 8e-3)  # the peak is reached exactly
    assert math.isclose(lr_at(1000, **kw), 1e-6)
    assert lr_at(1500, **kw) == lr_at(1000, **kw)  # past the end (none of a run's steps): the floor
    after = [lr_at(s, **kw) for s in range(50, 1000)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert math.isclose(lr_at(525, **kw), 1e-6 + 0.5 * (8e-3 - 1e-6))  # half way down the cosine


@pytest.mark.parametrize("epochs,warmup,per_epoch", [(100, 5, 7), (12, 1, 15), (3, 0, 4)])
def test_schedule_is_timms_cosine_stepped_per_update_after_a_warmup_prefix(epochs, warmup, per_epoch):
    """The recipes' schedule, in timm's own terms: CosineLRScheduler stepped per update
    (step_on_epochs=False, timm's --sched-on-updates) with the warmup as a prefix over the first
    `warmup` of the `epochs` (timm's --warmup-prefix; num_epochs counts the cosine's alone)."""
    from timm.scheduler import create_scheduler_v2
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=8e-3)
    scheduler, total = create_scheduler_v2(optimizer, sched="cosine", num_epochs=epochs - warmup,
                                           warmup_epochs=warmup, warmup_lr=1e-4, min_lr=1e-6, step_on_epochs=False,
                                           updates_per_epoch=per_epoch, warmup_prefix=True)
    assert total == epochs
    for step in range(epochs * per_epoch):
        scheduler.step_update(step)
        ours = lr_at(step, per_epoch, epochs, 8e-3, warmup, 1e-4, 1e-6)
        assert math.isclose(optimizer.param_groups[0]["lr"], ours, rel_tol=1e-12), step


@pytest.mark.parametrize("compiled", [False, True])
def test_lamb_equals_timm_in_float64(compiled):
    """In float64, with the clip active, over 10 steps: within 1e-10 of timm's Lamb, eager and
    compiled. Compiled, the LR and bias corrections go in as device tensors: one graph per
    parameter group, never recompiled as they change."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 5)).double()
    twin = copy.deepcopy(model)
    ours = Lamb(param_groups(model, 0.02), lr=5e-3, weight_decay=0.02, compiled=compiled)
    theirs = TimmLamb(param_groups(twin, 0.02), lr=5e-3, weight_decay=0.02, **TIMM_LOOP)
    torch._dynamo.reset()
    counters.clear()
    for step in range(10):
        grads = [torch.randn_like(p) * (2.0 + step) for p in model.parameters()]  # norm >> 1: clipped
        for net, opt in ((model, ours), (twin, theirs)):
            for group in opt.param_groups:
                group["lr"] = 5e-3 * (step + 1) / 10  # a new LR every step, as the schedule gives
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert (a - b).abs().max() < 1e-10, name
    if compiled:
        # Both groups (decay, no decay) in one graph, compiled once, with no graph break.
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)


def test_the_recipes_update_is_compiled_only_inside_a_cuda_graph():
    """Uncaptured, the compiled update costs the host twice the eager one (6.5 against 3.1 ms a
    step for ResNet-50 on the H200): the recipe's `compile` compiles it only where the step is
    replayed as a CUDA graph, and a capture that fails goes on with the eager update. Either way
    the update is the same LAMB (test_lamb_equals_timm_in_float64)."""
    from fastrsb.optim import lamb_step, make_optimizer
    from fastrsb.recipe import load_recipe
    recipe = load_recipe("a3", ["model=resnet10t"])
    model = torch.nn.Linear(4, 2)
    assert not make_optimizer(model, recipe, compiled=True, captured=False).compiled
    assert not make_optimizer(model, recipe, compiled=False, captured=True).compiled
    captured = make_optimizer(model, recipe, compiled=True, captured=True)
    assert captured.compiled and captured._update_fn is not lamb_step
    captured.use_eager_update()
    assert not captured.compiled and captured._update_fn is lamb_step
