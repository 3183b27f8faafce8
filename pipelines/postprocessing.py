"""From class probabilities to a label map."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent


def label_array_dtype(num_classes: int) -> type[np.unsignedinteger]:
    """Label maps as written: uint8, uint16 past 256 classes."""
    return np.uint8 if num_classes <= 256 else np.uint16


def labels_from_probabilities(probabilities: torch.Tensor, num_classes: int) -> np.ndarray:
    """Argmax over classes as uint8 (uint16 past 256 classes)."""
    return torch.argmax(probabilities, dim=0).numpy().astype(label_array_dtype(num_classes))


def keep_largest_components(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """For each label in ``values``, keep its largest 26-connected component; others become background."""
    present = [int(v) for v in values if np.any(labels == v)]
    if not present:
        return labels
    transform = KeepLargestConnectedComponent(applied_labels=present, is_onehot=False, independent=True, connectivity=3)
    kept = transform(torch.as_tensor(labels[None].astype(np.int32)))
    return np.asarray(kept[0]).astype(labels.dtype)
