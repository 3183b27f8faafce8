"""Keep-largest-component at library speed gives MONAI's labels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipelines.postprocessing import keep_largest_components, keep_largest_components_monai


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keep_largest_equals_monai_on_many_components(seed):
    """Blobs of 6 labels touching at corners (26-connectivity), a label left alone, one absent label asked for."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 7, size=(40, 33, 27)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.6] = 0
    labels = ndimage.median_filter(labels, size=2)
    applied = [1, 2, 3, 5, 6, 9]
    expected = keep_largest_components_monai(labels, applied)
    got = keep_largest_components(labels, applied)
    assert got.dtype == labels.dtype
    np.testing.assert_array_equal(got, expected)
    assert np.array_equal(got == 4, labels == 4)  # not applied: untouched


def test_keep_largest_ties_pick_what_monai_picks():
    labels = np.zeros((9, 9, 9), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    labels[6:8, 6:8, 6:8] = 1  # the same size, later in C order
    labels[1, 6:8, 6:8] = 2  # the same size as the next one, and first in C order
    labels[4, 0:2, 0:2] = 2
    labels[5, 5, 5] = 2
    got = keep_largest_components(labels, [1, 2])
    np.testing.assert_array_equal(got, keep_largest_components_monai(labels, [1, 2]))
    assert (got == 1).sum() == 8 and (got == 2).sum() == 4


def test_keep_largest_connects_through_corners_only_in_26_connectivity():
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[0, 0, 0] = labels[1, 1, 1] = labels[2, 2, 2] = 3  # one 26-connected component of 3
    labels[3, 0, 3] = 3
    got = keep_largest_components(labels, [3])
    assert got[2, 2, 2] == 3 and got[3, 0, 3] == 0
