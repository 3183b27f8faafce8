"""Per-label Dice and HD95 (MONAI metrics) between predicted and reference label maps."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance


@dataclass(frozen=True)
class LabelScore:
    label: int
    name: str
    dice: float
    hd95_mm: float | None  # None when the label is absent from prediction or reference


def _one_hot(labels: np.ndarray, values: list[int]) -> torch.Tensor:
    return torch.stack([torch.as_tensor(labels == v) for v in values])[None].float()


def score_case(
    prediction: np.ndarray, reference: np.ndarray, label_names: Mapping[int, str], spacing: tuple[float, ...]
) -> list[LabelScore]:
    """Dice and HD95 (in mm, using the voxel spacing) for every named label."""
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} != reference shape {reference.shape}")
    values = sorted(label_names)
    pred, ref = _one_hot(prediction, values), _one_hot(reference, values)
    dice = compute_dice(pred, ref, include_background=True, ignore_empty=False)[0]
    scores = []
    for index, value in enumerate(values):
        both_present = bool(pred[0, index].any()) and bool(ref[0, index].any())
        hd95 = None
        if both_present:
            distance = compute_hausdorff_distance(
                pred[:, index : index + 1], ref[:, index : index + 1], percentile=95, spacing=list(spacing)
            )
            hd95 = float(distance.item())
        scores.append(LabelScore(value, label_names[value], float(dice[index].item()), hd95))
    return scores


def mean_dice(scores: list[LabelScore]) -> float:
    values = [s.dice for s in scores if not math.isnan(s.dice)]
    return float(np.mean(values)) if values else float("nan")


def auroc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` ranking ``positives`` above the rest (ties count half: the
    Mann-Whitney U statistic over average ranks); ``None`` when either side is empty."""
    from scipy.stats import rankdata

    scores, positives = np.ravel(scores), np.ravel(positives).astype(bool)
    n_pos = int(positives.sum())
    n_neg = positives.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
