"""The training step as the trainer builds it: compiled without graph breaks or recompiles, the
AMP choice per GPU, targets without mixing."""
import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from fastrsb.device import amp_dtype
from fastrsb.distributed import Dist
from fastrsb.errors import UserError
from fastrsb.loss import make_loss
from fastrsb.mix import BatchMixer
from fastrsb.optim import make_optimizer
from fastrsb.parts import PlainTargets
from fastrsb.recipe import load_recipe
from fastrsb.step import GraphedStep, TrainStep, wrap_model


def test_compiled_step_has_one_graph_and_no_recompile():
    """The step the GPU runs, compiled with inductor on the CPU (a small model; a ResNet takes
    minutes to compile on 2 cores): mixup/cutmix outside the graph, the model in one graph, and
    steps with other mixing draws (mixup, cutmix, none) reuse it."""
    recipe = load_recipe("tiny")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, recipe)
    mixer = BatchMixer(4, recipe["mixup"], recipe["cutmix"], rng=np.random.RandomState(0))
    step = TrainStep(wrap_model(model, Dist(), "cpu", compile_model=True), optimizer,
                     torch.amp.GradScaler("cpu", enabled=False), make_loss(recipe), mixer, "cpu", None)
    torch._dynamo.reset()
    counters.clear()
    before = model[0].weight.detach().clone()
    for _ in range(4):
        images = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
        loss = step.accumulate(images, torch.randint(0, 4, (8,)), group=1, last=True)
        step.apply(0.01)
    assert torch.isfinite(loss) and not torch.equal(before, model[0].weight)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)


@pytest.mark.parametrize("major,expected", [(7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)])
def test_amp_dtype_asks_the_hardware(monkeypatch, major, expected):
    """A V100 (7.0) or T4 (7.5) trains in fp16 with a GradScaler: torch.cuda.is_bf16_supported()
    alone answers True there (emulation); the answer without emulation is what counts."""
    def is_bf16_supported(including_emulation=True):
        return True if including_emulation else major >= 8
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert amp_dtype("cuda", amp=True) == expected
    assert amp_dtype("cuda", amp=False) is None and amp_dtype("cpu", amp=True) is None


def test_plain_targets_without_mixing():
    images, labels = torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 1])
    same, targets = PlainTargets(num_classes=4, smoothing=0.1)(images, labels)
    assert same is images and targets.shape == (3, 4)
    assert torch.allclose(targets.sum(1), torch.ones(3)) and targets.argmax(1).tolist() == [0, 2, 1]
    assert targets[0, 0] == pytest.approx(0.9 + 0.1 / 4)


def test_gpu_memory_line_only_on_the_gpu():
    from fastrsb.device import gib_outside_torch, gpu_memory_line
    assert gpu_memory_line(nn.Linear(4, 4), "cpu", None) is None and gib_outside_torch("cpu") is None


def test_gpu_memory_line_tells_the_loaders_from_the_cuda_context(monkeypatch):
    """The loaders' share is what came outside torch after the loaders were built; NVML's figures
    stand in here (no GPU): 0.55 GiB before the loaders, 0.90 after."""
    import fastrsb.device as device
    monkeypatch.setattr(device, "gib_outside_torch", lambda _: 0.90)
    line = device.gpu_memory_line(nn.Linear(1024, 1024, bias=False), "cuda", 0.55)
    assert "loaders (DALI) 0.35 GiB, CUDA context and libraries 0.55 GiB, model state 0.02 GiB" in line
    monkeypatch.setattr(device, "gib_outside_torch", lambda _: None)
    assert "loaders (DALI) unknown (no NVML)" in device.gpu_memory_line(nn.Linear(4, 4), "cuda", 0.55)


def test_graphed_steps_eager_path_is_the_plain_step():
    """GraphedStep's eager path (its warm-up steps, and every step after a capture that failed):
    the same weights, LAMB state and step count as the plain step, with a new LR every step and
    the mixer's draws. The captured path itself needs a GPU (tests/test_gpu.py)."""
    recipe = load_recipe("tiny")

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(8, 4))
        mixer = BatchMixer(4, recipe["mixup"], recipe["cutmix"], rng=np.random.RandomState(0))
        return model, TrainStep(model, make_optimizer(model, recipe), torch.amp.GradScaler("cpu", enabled=False),
                                make_loss(recipe), mixer, "cpu", None)
    plain_model, plain = build()
    graphed_model, step = build()
    graphed = GraphedStep(step)
    graphed.failed = True  # on the CPU there is nothing to capture: the eager path throughout
    generator = torch.Generator().manual_seed(0)
    for k in range(5):
        images, labels = torch.randn(8, 3, 16, 16, generator=generator), torch.randint(0, 4, (8,), generator=generator)
        lr = 1e-3 * (k + 1)
        torch.testing.assert_close(graphed(images, labels, lr), plain.single(images, labels, lr), rtol=0, atol=0)
    for a, b in zip(plain_model.parameters(), graphed_model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(step.optimizer.state[b]["exp_avg_sq"], plain.optimizer.state[a]["exp_avg_sq"],
                                   rtol=0, atol=0)
    assert [g["step"] for g in step.optimizer.param_groups] == [g["step"] for g in plain.optimizer.param_groups] == [5, 5]


def test_cuda_graphs_auto_is_on_where_the_step_can_be_a_graph():
    """cuda_graphs = auto: on for one GPU process in bf16 or float32 with one micro-batch a step,
    off (with the reason, for the start-up line) on the CPU, under DDP, in fp16 and with gradient
    accumulation; true refuses those instead, false is off everywhere. (The decision reads the
    device's name and the run's figures: no GPU is touched.)"""
    from fastrsb.parts import _cuda_graphs, graphs_unfit
    one, four = Dist(), Dist(rank=0, world=4)
    assert graphs_unfit("cuda", one, torch.bfloat16) is None and graphs_unfit("cuda", one, None) is None
    assert graphs_unfit("cpu", one, None) == "this run is on the CPU"
    assert "4 processes" in graphs_unfit("cuda", four, torch.bfloat16)
    assert "fp16" in graphs_unfit("cuda", one, torch.float16)
    assert graphs_unfit("cuda", one, torch.bfloat16, micro_batches=2).startswith("each step is 2 micro-batches")
    auto, true, false = ({"cuda_graphs": value} for value in ("auto", True, False))
    assert _cuda_graphs(auto, "cuda", one, torch.bfloat16) is True
    assert not any(_cuda_graphs(auto, device, d, dtype) for device, d, dtype in
                   (("cpu", one, None), ("cuda", four, torch.bfloat16), ("cuda", one, torch.float16)))
    assert _cuda_graphs(true, "cuda", one, torch.bfloat16) is True and _cuda_graphs(false, "cuda", one, None) is False
    for device, d, dtype, said in (("cpu", one, None, "needs a GPU"), ("cuda", four, torch.bfloat16, "one process"),
                                   ("cuda", one, torch.float16, "bf16 or float32")):
        with pytest.raises(UserError, match=said):
            _cuda_graphs(true, device, d, dtype)


def test_a_step_let_go_of_its_graph_updates_eagerly():
    """TrainStep.run_uncaptured (cuda_graphs = auto on a run that turns out to accumulate): no
    graph from then on, and LAMB's update the eager one, which an uncaptured step is built with."""
    recipe = load_recipe("tiny")
    model = nn.Linear(4, 2)
    optimizer = make_optimizer(model, recipe, compiled=True, captured=True)
    step = TrainStep(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), make_loss(recipe), None, "cpu",
                     None, cuda_graphs=True)
    assert step.graphed is not None and optimizer.compiled
    step.run_uncaptured()
    assert step.graphed is None and step.captured is None and not optimizer.compiled
    assert not make_optimizer(model, recipe, compiled=True, captured=False).compiled  # as built uncaptured


def test_the_start_up_line_says_why_auto_left_the_graphs_off():
    """The trainer's start-up line: "+ CUDA graphs" where the step is one, the reason where
    cuda_graphs = auto left them off on a GPU, nothing on the CPU (graphs are GPU work) or where
    the recipe says false."""
    from types import SimpleNamespace

    from fastrsb.train import _graphs_said

    def run(value, device="cuda", graphed=None, world=1, accumulate=1):
        return SimpleNamespace(recipe={"cuda_graphs": value}, device=device, d=Dist(rank=0, world=world),
                               training=SimpleNamespace(step=SimpleNamespace(graphed=graphed), dtype=torch.bfloat16),
                               schedule=SimpleNamespace(grad_accum_steps=accumulate))
    assert _graphs_said(run("auto", graphed=object())) == _graphs_said(run(True, graphed=object())) == " + CUDA graphs"
    assert _graphs_said(run("auto", accumulate=2)) == (" (no CUDA graphs: each step is 2 micro-batches "
                                                       "(gradient accumulation))")
    assert "2 processes" in _graphs_said(run("auto", world=2))
    assert _graphs_said(run("auto", device="cpu")) == _graphs_said(run(False)) == ""
