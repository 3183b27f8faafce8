"""Training losses any family can use: Dice-CE, region-specific Tversky and their compound, with deep supervision.

Region-specific Tversky (MambaClinix): with p = softmax(logits) and one-hot y, for each foreground class and each
region r of a pooled grid (adaptive average pooling to ``regions``)::

    TP = pool(p y), FP = pool(p (1 - y)), FN = pool((1 - p) y)
    alpha = 0.3 + 0.4 (FP + s) / (FP + FN + s),  beta = 0.3 + 0.4 (FN + s) / (FP + FN + s)
    T = (TP + s) / (TP + alpha FP + beta FN + s)

and the score is the mean of T over foreground classes and regions (s = 1e-5, the weights not detached). Where
FP == FN, alpha = beta = 0.5 and T is the soft Dice of the region. The compound loss is
CE + (1 - soft Dice) + 0.8 (1 - RS-Tversky); with deep supervision each output i is weighted 1/2^i (normalised)
against the labels resized to its grid.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from models.families import LOSSES
from pipelines.errors import UsageError

SMOOTH = 1e-5


def region_tversky_score(probabilities: torch.Tensor, onehot: torch.Tensor,
                         regions: Sequence[int] = (8, 8, 8), smooth: float = SMOOTH) -> torch.Tensor:
    """Mean region-specific Tversky index over the foreground classes (channel 0 is background excluded).

    ``probabilities``, ``onehot``: (batch, K, D, H, W). 1 for a perfect prediction, about 0 for an inverted one.
    """
    if probabilities.shape != onehot.shape or probabilities.dim() != 5:
        raise ValueError(f"probabilities and one-hot labels must both be (batch, K, D, H, W), got "
                         f"{tuple(probabilities.shape)} and {tuple(onehot.shape)}")
    p, y = probabilities[:, 1:], onehot[:, 1:].to(probabilities.dtype)
    depth, height, width = (min(r, side) for r, side in zip(regions, p.shape[2:], strict=True))
    grid = (depth, height, width)
    tp = F.adaptive_avg_pool3d(p * y, grid)
    fp = F.adaptive_avg_pool3d(p * (1 - y), grid)
    fn = F.adaptive_avg_pool3d((1 - p) * y, grid)
    alpha = 0.3 + 0.4 * (fp + smooth) / (fp + fn + smooth)
    beta = 0.3 + 0.4 * (fn + smooth) / (fp + fn + smooth)
    return ((tp + smooth) / (tp + alpha * fp + beta * fn + smooth)).mean()


def soft_dice_score(probabilities: torch.Tensor, onehot: torch.Tensor, smooth: float = SMOOTH) -> torch.Tensor:
    """Soft Dice per foreground class over the whole batch, averaged."""
    p, y = probabilities[:, 1:], onehot[:, 1:].to(probabilities.dtype)
    dims = (0, 2, 3, 4)
    intersection = (p * y).sum(dims)
    return ((2 * intersection + smooth) / (p.sum(dims) + y.sum(dims) + smooth)).mean()


class CompoundLoss(nn.Module):
    """CE + (1 - soft Dice) + weight * (1 - RS-Tversky), from logits and an integer label map (batch, 1, ...)."""

    def __init__(self, tversky_weight: float = 0.8, regions: Sequence[int] = (8, 8, 8)) -> None:
        super().__init__()
        self.tversky_weight = tversky_weight
        self.regions = tuple(regions)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        target = label[:, 0].long()
        probabilities = logits.float().softmax(1)
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3).to(probabilities.dtype)
        ce = F.cross_entropy(logits.float(), target)
        dice = soft_dice_score(probabilities, onehot)
        tversky = region_tversky_score(probabilities, onehot, self.regions)
        return ce + (1 - dice) + self.tversky_weight * (1 - tversky)


class DeepSupervisionLoss(nn.Module):
    """A loss over one output, or over several (full resolution first) with weights 1/2^i normalised."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, label)
        weights = torch.tensor([0.5**i for i in range(len(outputs))])
        weights = weights / weights.sum()
        total = outputs[0].new_zeros(())
        for weight, output in zip(weights.tolist(), outputs, strict=True):
            resized = label if output.shape[2:] == label.shape[2:] else \
                F.interpolate(label.float(), size=output.shape[2:], mode="nearest")
            total = total + weight * self.loss(output, resized)
        return total


_LOSSES: dict[str, Callable[[], nn.Module]] = {
    "dicece": functools.partial(DiceCELoss, to_onehot_y=True, softmax=True),
    "compound": CompoundLoss,
}


def build_loss(name: str) -> nn.Module:
    """A training loss by name, taking a network's output (or deep-supervision outputs) and a label map."""
    if name not in _LOSSES:
        raise UsageError("BAD_LOSS", f"loss must be one of {LOSSES}, got {name!r}")
    return DeepSupervisionLoss(_LOSSES[name]())
