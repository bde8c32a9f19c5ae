"""BatchMixer against timm's Mixup (mode 'batch'), given the same random draws."""
import numpy as np
import pytest
import torch
from timm.data import Mixup

from fastrsb.mix import BatchMixer


@pytest.mark.parametrize("mixup,cutmix,smoothing", [(0.1, 1.0, 0.0), (0.2, 1.0, 0.1), (0.8, 0.0, 0.0), (0.0, 1.0, 0.0)])
@pytest.mark.parametrize("seed", range(6))
def test_equals_timm(mixup, cutmix, smoothing, seed):
    torch.manual_seed(seed)
    images = torch.randn(8, 3, 24, 20).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (8,))
    timm_mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                     label_smoothing=smoothing, num_classes=10)
    np.random.seed(seed)
    expected_images, expected_targets = timm_mix(images.clone(), labels)
    ours = BatchMixer(10, mixup, cutmix, 1.0, 0.5, smoothing, np.random.RandomState(seed))
    original = images.clone()
    mixed, targets = ours(images, labels)
    assert torch.equal(images, original)  # the loader's buffer is never written
    assert torch.allclose(mixed, expected_images, atol=1e-6)
    assert torch.allclose(targets, expected_targets, atol=1e-6)
    assert mixed.is_contiguous(memory_format=torch.channels_last)


def test_a3_statistics():
    """Under A3's settings cutmix is chosen for about half of the batches (switch_prob 0.5)."""
    mixer = BatchMixer(10, 0.1, 1.0, 1.0, 0.5, 0.0, np.random.RandomState(0))
    draws = [mixer.draw() for _ in range(4000)]
    cutmix_share = np.mean([c for _, c in draws])
    assert 0.47 < cutmix_share < 0.53
    assert all(0.0 <= lam <= 1.0 for lam, _ in draws)


def test_prob_zero_leaves_the_batch_alone():
    mixer = BatchMixer(5, 0.1, 1.0, prob=0.0)
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixed, targets = mixer(images, labels)
    assert mixed is images and torch.equal(targets, torch.eye(5)[:4])


def test_odd_batch_is_refused():
    with pytest.raises(ValueError, match="even"):
        BatchMixer(5, 0.1, 1.0)(torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2]))


def test_state_round_trip():
    a = BatchMixer(5, 0.1, 1.0, rng=np.random.RandomState(3))
    a.draw()
    b = BatchMixer(5, 0.1, 1.0, rng=np.random.RandomState(99))
    b.load_state_dict(a.state_dict())
    assert [a.draw() for _ in range(5)] == [b.draw() for _ in range(5)]
