"""Region-specific Tversky and the compound loss: oracles on constructed predictions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.losses import CompoundLoss, DeepSupervisionLoss, build_loss, region_tversky_score, soft_dice_score
from pipelines.errors import UsageError


def _labels(seed: int = 0) -> torch.Tensor:
    """Two foreground classes as boxes in a 16^3 grid, batch 2: (batch, 1, 16, 16, 16) integers."""
    label = torch.zeros(2, 1, 16, 16, 16, dtype=torch.long)
    label[:, 0, 2:9, 3:12, 4:10] = 1
    label[:, 0, 10:15, 1:6, 8:15] = 2
    label[1] = label[1].roll(seed + 1, dims=1)
    return label


def _onehot(label: torch.Tensor, classes: int = 3) -> torch.Tensor:
    return F.one_hot(label[:, 0], classes).permute(0, 4, 1, 2, 3).double()


def test_perfect_prediction_scores_one_and_minimises_the_loss():
    y = _onehot(_labels())
    assert region_tversky_score(y, y).item() == pytest.approx(1.0, abs=1e-12)
    logits = (y * 2 - 1) * 60  # softmax of these is one-hot to within e^-120
    perfect = CompoundLoss()(logits, _labels()).item()
    assert perfect == pytest.approx(0.0, abs=1e-6)
    assert CompoundLoss()(logits * 0.05, _labels()).item() > perfect + 0.01


def test_inverted_prediction_scores_about_zero():
    y = _onehot(_labels())
    inverted = 1 - y
    assert region_tversky_score(inverted, y).item() < 1e-3


def test_equal_false_positives_and_negatives_give_soft_dice():
    """A box moved by one voxel has as many FP as FN voxels: alpha = beta = 1/2 and T is the soft Dice."""
    label = torch.zeros(1, 1, 16, 16, 16, dtype=torch.long)
    label[0, 0, 3:9, 4:11, 5:12] = 1
    moved = label.roll(1, dims=2)
    y, p = _onehot(label, 2), _onehot(moved, 2)
    tp = (p[:, 1] * y[:, 1]).sum()
    assert (p[:, 1] * (1 - y[:, 1])).sum() == ((1 - p[:, 1]) * y[:, 1]).sum()  # FP == FN
    exact = region_tversky_score(p, y, regions=(1, 1, 1), smooth=0.0).item()
    assert exact == pytest.approx(soft_dice_score(p, y, smooth=0.0).item(), rel=1e-12)
    tversky = region_tversky_score(p, y, regions=(1, 1, 1)).item()  # smoothing moves it by ~1e-8
    assert tversky == pytest.approx(soft_dice_score(p, y).item(), rel=1e-6)
    assert tversky == pytest.approx((2 * tp / (2 * tp + 2 * (y[:, 1].sum() - tp))).item(), rel=1e-6)


def test_region_weights_follow_the_errors():
    """More false negatives than positives in a region: beta > alpha there, so FN cost more than FP."""
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    label[0, 0, 2:6, 2:6, 2:6] = 1
    y = _onehot(label, 2)
    shrunk = torch.zeros_like(label)
    shrunk[0, 0, 3:5, 3:5, 3:5] = 1  # misses voxels: only FN
    grown = torch.zeros_like(label)
    grown[0, 0, 1:7, 1:7, 1:7] = 1  # adds voxels: only FP
    assert region_tversky_score(_onehot(shrunk, 2), y, (1, 1, 1)) < soft_dice_score(_onehot(shrunk, 2), y) + 1e-9
    assert region_tversky_score(_onehot(grown, 2), y, (1, 1, 1)) < 1.0


def test_gradients_flow_through_the_adaptive_weights():
    logits = torch.randn(2, 3, 16, 16, 16, dtype=torch.float64, requires_grad=True)
    CompoundLoss()(logits, _labels()).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_deep_supervision_weights_halve_and_normalise():
    class MeanOf(torch.nn.Module):
        def forward(self, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            assert output.shape[2:] == label.shape[2:]  # labels resized to each output's grid
            return output.mean()

    outputs = [torch.full((1, 2, 16, 16, 16), 1.0), torch.full((1, 2, 8, 8, 8), 2.0), torch.full((1, 2, 4, 4, 4), 3.0)]
    total = DeepSupervisionLoss(MeanOf())(outputs, _labels()[:1]).item()
    assert total == pytest.approx((1 * 1 + 2 * 0.5 + 3 * 0.25) / 1.75)
    assert DeepSupervisionLoss(MeanOf())(outputs[0], _labels()[:1]).item() == 1.0


def test_losses_by_name():
    logits = torch.randn(2, 3, 16, 16, 16)
    for name in ("dicece", "compound"):
        assert torch.isfinite(build_loss(name)(logits, _labels()))
    with pytest.raises(UsageError) as info:
        build_loss("focal")
    assert info.value.code == "BAD_LOSS"
