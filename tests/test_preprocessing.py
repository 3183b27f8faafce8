"""Model space and back: the mapping must land exactly on the source grid."""

import nibabel as nib
import numpy as np
import pytest
import torch

from models.manifest import IntensitySpec, PreprocessingSpec
from pipelines.phantoms import make_phantom
from pipelines.preprocessing import prepare
from pipelines.volume import Volume, VolumeMetadata


def _volume(image: nib.Nifti1Image) -> Volume:
    array = np.asarray(image.dataobj, dtype=np.float32)
    return Volume(array, image.affine.astype(np.float64), VolumeMetadata("c", "c"))


def _one_hot(labels: np.ndarray, classes: int) -> torch.Tensor:
    return torch.stack([torch.as_tensor(labels == c, dtype=torch.float32) for c in range(classes)])


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "ASL", "RPI", "SPL"])
def test_orientation_matches_nibabel_canonical(orientation):
    phantom = make_phantom(7, orientation=orientation, spacing=(4.0, 4.0, 5.0))
    prepared = prepare(_volume(phantom.image), PreprocessingSpec(intensity=IntensitySpec(kind="none")))
    canonical = nib.as_closest_canonical(phantom.image)
    np.testing.assert_array_equal(prepared.image[0].numpy(), np.asarray(canonical.dataobj, dtype=np.float32))
    np.testing.assert_allclose(prepared.mapping.model_affine, canonical.affine, atol=1e-9)
    assert not prepared.mapping.resampled


@pytest.mark.parametrize("orientation", ["LPS", "ASL", "RPI"])
def test_round_trip_without_resampling_is_exact(orientation):
    phantom = make_phantom(8, orientation=orientation, spacing=(4.0, 4.0, 5.0))
    labels = np.asarray(phantom.label.dataobj)
    prepared = prepare(_volume(phantom.label), PreprocessingSpec(intensity=IntensitySpec(kind="none")))
    model_labels = prepared.image[0].numpy().astype(np.uint8)
    back = prepared.mapping.to_source(_one_hot(model_labels, 6)).argmax(0).numpy()
    assert back.shape == labels.shape
    np.testing.assert_array_equal(back, labels)


@pytest.mark.parametrize("orientation", ["LPS", "ASL"])
def test_round_trip_with_resampling_lands_on_the_source_grid(orientation):
    phantom = make_phantom(9, orientation=orientation, spacing=(2.0, 2.0, 3.5))
    labels = np.asarray(phantom.label.dataobj)
    spec = PreprocessingSpec(spacing=(2.5, 2.5, 2.5), intensity=IntensitySpec(kind="none"))
    prepared = prepare(_volume(phantom.label), spec)
    assert prepared.mapping.resampled
    # Probabilities in model space: the resampled one-hot (what a perfect model would output).
    model_onehot = prepare(
        Volume(_one_hot(labels, 6).numpy(), phantom.label.affine, VolumeMetadata("c", "c")), spec
    ).image
    back = prepared.mapping.to_source(model_onehot).argmax(0).numpy()
    assert back.shape == labels.shape
    for value in range(1, 6):
        a, b = back == value, labels == value
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.97, (value, dice)


def test_window_intensity():
    volume = Volume(np.array([[[-1000.0, 200.0], [700.0, 2000.0]]] * 2, np.float32), np.eye(4),
                    VolumeMetadata("c", "c"))
    spec = PreprocessingSpec(intensity=IntensitySpec(kind="window", a_min=-300, a_max=700))
    values = prepare(volume, spec).image.numpy().ravel()
    assert values.min() == 0.0 and values.max() == 1.0
    assert np.isclose(values[1], 0.5)


@pytest.mark.parametrize("spacing", [None, (3.0, 2.5, 4.0)])
@pytest.mark.parametrize("classes", [1, 13, 40])
def test_labels_to_source_in_class_chunks_equals_argmax_of_the_whole(spacing, classes):
    """The memory-saving path (a few classes resampled at a time, running argmax) gives the same labels."""
    phantom = make_phantom(10, orientation="ASL", spacing=(2.0, 2.0, 3.5))
    spec = PreprocessingSpec(spacing=spacing, intensity=IntensitySpec(kind="none"))
    prepared = prepare(_volume(phantom.image), spec)
    torch.manual_seed(classes)
    scores = torch.nn.functional.avg_pool3d(torch.randn(classes, *prepared.image.shape[1:]), 5, 1, 2)
    probabilities = torch.softmax(scores * 20, dim=0)
    probabilities[:, :2, :2, :2] = 1.0 / classes  # exact ties: both paths give the lowest class
    whole = prepared.mapping.to_source(probabilities).argmax(0).numpy()
    chunked = prepared.mapping.labels_to_source(probabilities, chunk=3, by_cells=False).numpy()
    assert chunked.shape == whole.shape == phantom.image.shape
    np.testing.assert_array_equal(chunked, whole)


@pytest.mark.parametrize("orientation", ["ASL", "LPS", "RAS"])
@pytest.mark.parametrize("classes", [2, 13, 40])
def test_labels_by_cells_equal_resampled_argmax_but_for_float_ties(orientation, classes):
    """The fast way back (labels decided per model cell, boundaries interpolated) gives the labels of resampling
    every class and taking the argmax: on >= 99.99% of voxels, and where not, the two best classes of the resampled
    scores are within float32 rounding of each other. Exact ties still go to the lower class."""
    phantom = make_phantom(10, orientation=orientation, spacing=(2.0, 2.0, 3.5))
    spec = PreprocessingSpec(spacing=(3.0, 2.5, 4.0), intensity=IntensitySpec(kind="none"))
    prepared = prepare(_volume(phantom.image), spec)
    torch.manual_seed(classes)
    scores = torch.nn.functional.avg_pool3d(torch.randn(classes, *prepared.image.shape[1:]), 5, 1, 2)
    probabilities = torch.softmax(scores * 20, dim=0)
    probabilities[:, :3, :3, :3] = 1.0 / classes
    resampled = prepared.mapping.to_source(probabilities)
    whole = resampled.argmax(0).numpy()
    fast = prepared.mapping.labels_to_source(probabilities).numpy()
    assert fast.shape == whole.shape == phantom.image.shape
    differ = fast != whole
    assert differ.mean() <= 1e-4
    if differ.any():
        at = resampled[:, torch.from_numpy(differ)]
        ours = at.gather(0, torch.from_numpy(fast[differ]).long()[None])[0]
        assert (at.max(0).values - ours).abs().max() < 1e-5


def test_labels_by_cells_on_a_one_voxel_axis_and_without_resampling():
    """A model grid one voxel thick on an axis (no second corner): the other axes interpolated as by hand."""
    from pipelines.labels_back import AxisMap, labels_on_target

    torch.manual_seed(0)
    scores = torch.softmax(torch.randn(3, 1, 4, 5) * 5, 0)
    labels = labels_on_target(scores, AxisMap((0.5, 0.5, 0.25), (0.0, 0.0, 0.0)), (3, 7, 17))
    ys, xs = torch.arange(7) * 0.5, torch.arange(17) * 0.25
    y0, x0 = ys.floor().long().clamp(max=2), xs.floor().long().clamp(max=3)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None]
    s = scores[:, 0]
    expected = ((1 - wy) * (1 - wx) * s[:, y0][:, :, x0] + (1 - wy) * wx * s[:, y0][:, :, x0 + 1]
                + wy * (1 - wx) * s[:, y0 + 1][:, :, x0] + wy * wx * s[:, y0 + 1][:, :, x0 + 1]).argmax(0)
    assert torch.equal(labels, expected[None].expand(3, 7, 17).to(labels.dtype))


@pytest.mark.parametrize("depths", [(1,), (3, 1, 5), (2,) * 20])
def test_labels_fed_by_slabs_equal_the_whole(depths):
    """:class:`SlabLabels` fed consecutive model slabs of any depth gives exactly the labels of the whole."""
    from pipelines.labels_back import AxisMap, SlabLabels, labels_on_target

    torch.manual_seed(len(depths))
    scores = torch.softmax(torch.nn.functional.avg_pool3d(torch.randn(4, 40, 9, 11), 3, 1, 1) * 30, 0)
    mapping, target = AxisMap((0.37, 0.5, 0.8), (0.2, -0.4, 0.0)), (107, 19, 13)
    whole = labels_on_target(scores, mapping, target)
    slabs = SlabLabels(mapping, tuple(scores.shape[1:]), target, scores.device)
    start = 0
    for depth in list(depths) + [40]:
        if start >= 40:
            break
        slabs.add(start, scores[:, start : start + depth])
        start += depth
    assert torch.equal(slabs.finish(), whole)


def test_labels_fed_by_slabs_refuse_a_gap_or_too_few():
    from pipelines.labels_back import AxisMap, SlabLabels

    scores = torch.rand(3, 6, 4, 4)
    slabs = SlabLabels(AxisMap((0.5, 0.5, 0.5), (0.0, 0.0, 0.0)), (6, 4, 4), (11, 7, 7), scores.device)
    slabs.add(0, scores[:, :2])
    with pytest.raises(ValueError, match="expected 2"):
        slabs.add(3, scores[:, 3:])
    with pytest.raises(ValueError, match="cells along the first axis"):
        slabs.finish()
