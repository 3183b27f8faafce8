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
    """For each label in ``values``, keep its largest 26-connected component; others become background.

    The labels of MONAI's ``KeepLargestConnectedComponent(independent=True, connectivity=3)`` (components
    numbered in C order and ranked by numpy's argsort as there, so equal largest ones give the same pick), each
    label's components found by cc3d within the label's
    bounding box (``scipy.ndimage.find_objects``, one pass): bench/whole_case.py measures it against MONAI's.
    """
    import cc3d
    from scipy import ndimage

    wanted = {int(v) for v in values}
    boxes = ndimage.find_objects(labels, max_label=max(wanted, default=0))
    kept = labels.copy()
    for value, box in enumerate(boxes, start=1):
        if box is None or value not in wanted:
            continue
        region = labels[box] == value
        components, count = cc3d.connected_components(region, connectivity=26, return_N=True, binary_image=True)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        sizes[0] = 0
        largest = int(np.argsort(sizes)[::-1][0])  # MONAI's own ranking: the same pick among equal sizes
        target = kept[box]
        target[region & (components != largest)] = 0
    return kept


def keep_largest_components_monai(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """MONAI's ``KeepLargestConnectedComponent`` over the whole grid: the reference the tests hold
    :func:`keep_largest_components` to."""
    present = [int(v) for v in values if np.any(labels == v)]
    if not present:
        return labels
    transform = KeepLargestConnectedComponent(applied_labels=present, is_onehot=False, independent=True, connectivity=3)
    kept = transform(torch.as_tensor(labels[None].astype(np.int32)))
    return np.asarray(kept[0]).astype(labels.dtype)
