"""The training step as the trainer builds it: compiled without graph breaks or recompiles, the
AMP choice per GPU, targets without mixing."""
import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from fastrsb.device import amp_dtype
from fastrsb.distributed import Dist
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
