"""The per-step GPU code, run on fake CUDA tensors here, without a GPU: torch's FakeTensorMode
gives tensors on "cuda" that carry shapes, dtypes and devices but no data, and refuses what a
CUDA tensor would refuse (an operand on the CPU beside one on the GPU) and what would read the
data back to the host (`.item()`, a data-sized output). The code's GPU branches run as on a GPU
(the eager torch RandAugment form takes the whole batch at once there); what a real GPU adds
(kernels, cuDNN, autocast, the backward pass, whose engine needs a CUDA context) is the GPU
tests' (tests/test_gpu.py). A GPU is lent for minutes, rarely: a tensor left on the CPU in a GPU
path should cost a test here, not a GPU run."""
import numpy as np
import pytest
import timm
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastrsb.mix
from fastrsb.loss import make_loss
from fastrsb.mix import BatchMixer
from fastrsb.optim import make_optimizer
from fastrsb.pipelines.augment_spec import parse_rand_augment
from fastrsb.pipelines.randaugment import draws_per_layer
from fastrsb.pipelines.torch_augment import TorchRandAugment, warp_capacity
from fastrsb.recipe import load_recipe


@pytest.mark.parametrize("interpolation", ["random", "bicubic"])
def test_the_torch_randaugment_form_keeps_a_gpu_batch_on_the_gpu(interpolation):
    """Every op of A1's policy (the torch form computes each op for the whole batch and keeps each
    sample's own), on the GPU's path: the whole batch at once, eager; its warp on 39 of 64 samples,
    those that drew a geometric op sorted first on the device."""
    spec = parse_rand_augment("rand-m7-mstd0.5-inc1")
    augment = TorchRandAugment(spec, 32, torch.float16, interpolation=interpolation)
    assert warp_capacity(64, augment.geometric_share) == 39
    with FakeTensorMode():
        images = torch.empty(64, 32, 32, 3, dtype=torch.uint8, device="cuda")
        draws = torch.zeros(64, 1 + spec.num_layers * draws_per_layer(interpolation), device="cuda")
        assert augment.chunk_size(images) == 64  # the GPU's eager path: one call for the batch
        out = augment(images, draws)
    assert (out.device.type, out.dtype, tuple(out.shape)) == ("cuda", torch.float16, (64, 3, 32, 32))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_a_training_step_keeps_everything_on_the_gpu(monkeypatch):
    """A3's parts on a model whose weights are on the GPU: mixup/cutmix (its draws the host's, its
    boxes and targets made on the batch's device), the forward, the BCE loss and LAMB's update
    (its moments and device scalars; the gradients filled in as a backward pass would leave them).
    (The EMA is left out: its deepcopy of the model gives fake tensors another fake mode.) Shown to
    fail where targets are made on the CPU."""
    recipe = load_recipe("a3", ["model=resnet10t"])
    with FakeTensorMode(), torch.device("cuda"):
        model = timm.create_model("resnet10t", num_classes=10)
        optimizer, loss_fn = make_optimizer(model, recipe), make_loss(recipe)
        mixer = BatchMixer(10, recipe["mixup"], recipe["cutmix"], rng=np.random.RandomState(0))
        images = torch.empty(8, 3, 32, 32).to(memory_format=torch.channels_last)
        labels = torch.zeros(8, dtype=torch.int64)
        for _ in range(4):  # mixup and cutmix both drawn (switch probability 0.5)
            mixed, targets = mixer(images, labels)
            loss = loss_fn(model(mixed), targets)
            for param in model.parameters():
                param.grad = torch.zeros_like(param)
            optimizer.step()
        moments = optimizer.state[next(model.parameters())]["exp_avg"]
        monkeypatch.setattr(fastrsb.mix, "soft_targets", lambda labels, k, lam, smoothing=0.0: torch.zeros(
            labels.shape[0], k, device="cpu"))  # a GPU path that made its targets on the CPU
        with pytest.raises(Exception, match="same device|different devices"):  # (torch 2.14 | 2.11)
            loss_fn(model(images), mixer(images, labels)[1])
    assert {t.device.type for t in (mixed, targets, loss, moments, *optimizer._scalars.values())} == {"cuda"}


def test_validation_counts_on_the_gpu_and_reads_back_once_at_the_end():
    """Validation's counting (top-1, top-5, the loss, ImageNet-ReaL's sets, each class's) on the GPU's batches:
    every sum stays on the device, and the one read back to the host is the totals' at the end
    (where fake tensors, which hold no data, can give no values: the read this test stops at)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException
    from fastrsb.real_labels import RealTargets
    from fastrsb.train import evaluate

    class Batches:  # what evaluate takes of a loader: its batches, their count, its images
        images = None

        def __len__(self):
            return 3

        def __iter__(self):
            for _ in range(3):
                yield torch.empty(4, 3, 32, 32, device="cuda"), torch.zeros(4, dtype=torch.int64, device="cuda")
    with FakeTensorMode(), torch.device("cuda"):
        model = timm.create_model("resnet10t", num_classes=10)
        real = RealTargets(torch.zeros(12, dtype=torch.int64), torch.zeros(12, 3, dtype=torch.int64), "")  # on the GPU
        for given, per_class in ((None, False), (real, False), (None, True)):  # --per-class: its counts too
            with pytest.raises(DataDependentOutputException) as caught:
                evaluate(model, Batches(), "cuda", None, real=given, per_class=per_class)
            assert caught.traceback[-1].name != "evaluate" and any(
                entry.name == "evaluate" and ".tolist()" in str(entry.statement) for entry in caught.traceback)


def test_predict_keeps_each_batchs_classes_on_the_gpu_until_the_end():
    """fastrsb predict's loop on the GPU's batches: the softmax and top-k stay on the device, and
    nothing is read back per batch (a read of fake tensors' data fails); the one copy to the host
    comes after the last batch."""
    from fastrsb.pipelines import ImageList
    from fastrsb.predict import _top_outputs

    with FakeTensorMode(), torch.device("cuda"):
        model = timm.create_model("resnet10t", num_classes=10)
        loader = [(torch.empty(4, 3, 32, 32, device="cuda"), torch.zeros(4, dtype=torch.int64, device="cuda"))] * 3
        probabilities, indices = _top_outputs(model, loader, ImageList([], [], []), "cuda", None, 5)
    assert [(t.device.type, tuple(t.shape)) for t in (probabilities, indices)] == [("cpu", (12, 5))] * 2
