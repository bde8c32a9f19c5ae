import pytest
import torch
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

from fastrsb.loss import bce_loss, make_loss, soft_cross_entropy


@pytest.mark.parametrize("thresh", [0.2, None])
def test_bce_equals_timm(thresh):
    torch.manual_seed(0)
    logits = torch.randn(16, 10)
    targets = torch.softmax(torch.randn(16, 10) * 2, dim=1)  # dense, mixed-looking targets
    expected = BinaryCrossEntropy(smoothing=0.0, target_threshold=thresh)(logits, targets)
    assert torch.allclose(bce_loss(logits, targets, thresh), expected)


def test_threshold_is_strict():
    logits = torch.tensor([[1.0, -1.0, 0.5]])
    at, above = bce_loss(logits, torch.tensor([[0.2, 0.8, 0.0]]), 0.2), bce_loss(logits, torch.tensor([[0.2001, 0.8, 0.0]]), 0.2)
    assert at != above  # 0.2 is not > 0.2: a negative; 0.2001 is a positive


def test_soft_cross_entropy_equals_timm():
    logits, targets = torch.randn(8, 5), torch.softmax(torch.randn(8, 5), 1)
    assert torch.allclose(soft_cross_entropy(logits, targets), SoftTargetCrossEntropy()(logits, targets))


def test_make_loss_follows_recipe():
    logits, targets = torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1)
    assert torch.equal(make_loss({"bce_loss": True, "bce_target_thresh": 0.2})(logits, targets), bce_loss(logits, targets, 0.2))
    assert torch.equal(make_loss({"bce_loss": False, "bce_target_thresh": None})(logits, targets), soft_cross_entropy(logits, targets))
